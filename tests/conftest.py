"""Test set-up: without a GPU the Triton kernels run in the Triton interpreter (TRITON_INTERPRET=1).

The variable must be set before triton is imported, hence here, before any scale_kernels import.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
