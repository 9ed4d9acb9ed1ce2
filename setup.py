"""Optional CUDA extension build (everything else is configured in pyproject.toml).

By default nothing is compiled: ``pip install .`` works on any machine, without nvcc or a CUDA torch, and
the ``cuda`` backend reports itself unavailable. To build ``scale_kernels._C`` from ``csrc/``::

    SCALE_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation .

Environment:
    SCALE_KERNELS_BUILD_CUDA=1          build the extension (needs nvcc and a CUDA build of torch)
    SCALE_KERNELS_CUDA_ARCHS="80;90a"   target architectures (sm_80 or newer; default "80;90a"); PTX of the
                                        lowest non-"a" arch is embedded too, for newer GPUs
    MAX_JOBS=N                          parallel compile jobs (read by torch's BuildExtension / ninja)

See docs/cuda.md.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD_FLAG = "SCALE_KERNELS_BUILD_CUDA"
ARCHS_VAR = "SCALE_KERNELS_CUDA_ARCHS"
DEFAULT_ARCHS = "80;90a"


def _archs() -> list[str]:
    """The requested architectures, validated: the bf16 mma.sync of the decode kernel needs sm_80 or newer."""
    raw = os.environ.get(ARCHS_VAR, DEFAULT_ARCHS)
    archs = [a.strip() for a in re.split(r"[;, ]+", raw) if a.strip()]
    for a in archs:
        m = re.fullmatch(r"(\d+)(a?)", a)
        if m is None or int(m.group(1)) < 80:
            raise RuntimeError(f"{ARCHS_VAR}: {a!r} is not a CUDA architecture >= 80 (e.g. '80;90a')")
    if not archs:
        raise RuntimeError(f"{ARCHS_VAR} is empty; e.g. {DEFAULT_ARCHS!r}")
    return archs


def _cuda_build() -> dict:
    """setup() arguments for the extension, or {} unless SCALE_KERNELS_BUILD_CUDA=1."""
    if os.environ.get(BUILD_FLAG, "0").strip() != "1":
        return {}
    archs = _archs()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # plus PTX of the lowest portable arch, so GPUs newer than every listed arch can JIT-compile it
    portable = sorted(int(a) for a in archs if not a.endswith("a"))
    if portable:
        gencode.append(f"-gencode=arch=compute_{portable[0]},code=compute_{portable[0]}")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            f"{BUILD_FLAG}=1 needs torch importable at build time: pip install --no-build-isolation ."
        ) from exc
    if torch.version.cuda is None:
        raise RuntimeError(f"{BUILD_FLAG}=1 needs a CUDA build of torch, found torch {torch.__version__}")
    if CUDA_HOME is None:
        raise RuntimeError(f"{BUILD_FLAG}=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
    ext = CUDAExtension(
        name="scale_kernels._C",
        sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cu"))]
        + ["csrc/arg_check.cpp", "csrc/binding.cpp"],
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_cuda_build())
