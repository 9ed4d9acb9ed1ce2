"""Developer tools for the CUDA extension, run as modules from the repository root (``scripts`` is not installed).

- ``python -m scripts.check_cuda_compile``: compile-check ``csrc/`` without a GPU (the tests import it too).
- ``python -m scripts.bench_cuda --out FILE``: benchmark the ``cuda`` backend (needs a GPU; run by
  ``scripts/gpu_check_cuda.sh``).
"""
