"""Kernel backends of the upscaled linear: one module per implementation.

Each backend module exposes the same three launchers (see :class:`scale_kernels.backends.KernelBackend`):
``forward``, ``backward_input`` and ``backward_weight``. They take 2-D token-major tensors and a
route already normalised to a ``(M,)`` float tensor (or ``None`` when there is no W12 term).
"""
