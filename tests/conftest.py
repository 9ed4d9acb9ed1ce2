"""Test set-up: without a GPU the Triton kernels run in the Triton interpreter (TRITON_INTERPRET=1).

The variable must be set before triton is imported, hence here, before any scale_kernels import.

Hypothesis profiles (property-based tests in ``test_fuzz_upscaled_linear.py``):

* ``ci`` (default): a bounded number of examples per test so the suite stays fast on 2 CPU cores.
* ``thorough``: >= 1000 examples per test; select it with ``pytest --hypothesis-profile=thorough`` (or the
  environment variable ``SCALE_KERNELS_HYPOTHESIS_PROFILE=thorough``).

Both disable the per-example deadline: the Triton interpreter's first call of a kernel configuration is slow.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
# the hypothesis pytest plugin applies --hypothesis-profile (if given) after this default
settings.load_profile(os.environ.get("SCALE_KERNELS_HYPOTHESIS_PROFILE", "ci"))
