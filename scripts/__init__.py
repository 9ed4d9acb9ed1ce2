"""Developer tools for the CUDA extension, run as modules from the repository root (``scripts`` is not installed):

    python -m scripts.check_cuda_compile   # compile-check csrc/ without a GPU (also imported by the tests)
    python -m scripts.bench_cuda --out F   # benchmark the cuda backend (needs a GPU; run by gpu_check_cuda.sh)
"""
