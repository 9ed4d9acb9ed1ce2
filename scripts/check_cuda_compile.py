"""Compile-check the CUDA sources in ``csrc/`` without a GPU and without a CUDA build of torch.

* every ``csrc/*.cu`` (torch-free) is compiled with ``nvcc -c`` for each requested architecture, with the
  same half/bf16 macros torch's ``CUDAExtension`` adds, warnings as errors;
* ``csrc/binding.cpp`` gets a ``g++ -fsyntax-only`` against the installed torch's headers (a CPU wheel
  lacks one CMake-generated header, ``c10/cuda/impl/cuda_cmake_macros.h``; a one-line stub stands in);
* the CPU test library (``build_cpu_test_library``): the extension's ops (``csrc/ops.h``, the checker
  ``csrc/arg_check.cpp``) registered for CPU tensors as ``torch.ops.scale_kernels_cuda_emu``, with the decode
  kernel's device code run by the CPU emulation (``csrc/emulate/``); needs only g++ and the installed torch.

Usage (from the repository root): ``python -m scripts.check_cuda_compile [--arch 80 --arch 90a] [--jobs 2]
[--no-binding] [--no-cpu-lib]``. Exit status 0 when everything compiled, 1 on a failure, 77 when nvcc is not found
(a skip). ``tests/test_csrc_compile.py`` imports it (``from scripts import check_cuda_compile``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = ("80", "90a")
# what torch.utils.cpp_extension passes to nvcc for every CUDAExtension source
TORCH_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)
SKIP_STATUS = 77
_STUB_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


@dataclass
class Result:
    """One compiler run: what was compiled, its exit status, its diagnostics."""

    name: str
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def find_nvcc() -> str | None:
    """nvcc from PATH, $CUDA_HOME/bin, /usr/local/bin or /usr/local/cuda/bin (None if absent)."""
    candidates = [shutil.which("nvcc")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates.append(str(Path(cuda_home) / "bin" / "nvcc"))
    candidates += ["/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def cu_sources() -> list[Path]:
    """Every CUDA source of the extension."""
    return sorted(CSRC.glob("*.cu"))


def gencode(arch: str) -> str:
    """``80`` -> ``-gencode=arch=compute_80,code=sm_80`` (``90a`` likewise)."""
    return f"-gencode=arch=compute_{arch},code=sm_{arch}"


def nvcc_command(nvcc: str, src: Path, out: Path, archs: tuple[str, ...]) -> list[str]:
    """The ``nvcc -c`` command compiling ``src`` for ``archs`` (one invocation: one host pass)."""
    return [
        nvcc,
        "-c",
        str(src),
        "-o",
        str(out),
        "-std=c++17",
        "-O3",
        f"-I{CSRC}",
        *TORCH_NVCC_FLAGS,
        *(gencode(a) for a in archs),
        "--Werror",
        "all-warnings",
        "-Xcompiler",
        "-Wall",
    ]


def _run(name: str, cmd: list[str]) -> Result:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return Result(name, proc.returncode, (proc.stdout + proc.stderr).strip())


def _run_all(tasks: list[tuple[str, list[str]]], jobs: int) -> list[Result]:
    """``(name, command)`` tasks, ``jobs`` at a time; results in task order."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda t: _run(*t), tasks))


def compile_cu(nvcc: str, archs: tuple[str, ...], out_dir: Path, jobs: int = 2) -> list[Result]:
    """Compile every ``.cu`` for ``archs`` into ``out_dir`` (``jobs`` compilers at a time)."""
    tasks = [
        (f"{src.name} [{','.join(archs)}]", nvcc_command(nvcc, src, out_dir / f"{src.stem}.o", archs))
        for src in cu_sources()
    ]
    return _run_all(tasks, jobs)


def cuda_include_dir(nvcc: str) -> Path | None:
    """The CUDA toolkit include dir next to nvcc (holding cuda_runtime_api.h), if any."""
    for base in (Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")):
        if (base / "include" / "cuda_runtime_api.h").is_file():
            return base / "include"
    return None


def _gxx() -> str | None:
    """The host C++ compiler (g++, else c++), None if absent."""
    return shutil.which("g++") or shutil.which("c++")


_WARNINGS = ("-Wall", "-Wextra", "-Werror")


def binding_syntax_command(nvcc: str, stub_dir: Path) -> list[str] | str:
    """``g++ -fsyntax-only`` of binding.cpp against torch's headers, or the reason it cannot run."""
    gxx = _gxx()
    if gxx is None:
        return "no host C++ compiler (g++) found"
    try:
        import torch.utils.cpp_extension as cpp_ext
    except ImportError as exc:
        return f"torch is not importable: {exc}"
    cuda_inc = cuda_include_dir(nvcc)
    if cuda_inc is None:
        return "cuda_runtime_api.h not found next to nvcc"
    torch_incs = cpp_ext.include_paths()
    if not any((Path(p) / "c10" / "cuda" / "CUDAGuard.h").is_file() for p in torch_incs):
        return "this torch ships no c10/cuda headers"
    # CPU wheels lack the CMake-generated macros header; a stub with its one define stands in
    macros = stub_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True, exist_ok=True)
    macros.write_text(_STUB_MACROS)
    return [
        gxx,
        "-fsyntax-only",
        "-std=c++17",
        *_WARNINGS,
        f"-I{CSRC}",
        f"-I{stub_dir}",
        *(f"-isystem{p}" for p in torch_incs),
        f"-isystem{cuda_inc}",
        f"-I{sysconfig.get_paths()['include']}",
        str(CSRC / "binding.cpp"),
    ]


def cpu_test_library_commands(out_dir: Path) -> tuple[list[list[str]], list[str], Path]:
    """(compile commands, link command, library path) of the CPU test library (see the module docstring).

    Three translation units: the torch-free checker (C++17), the kernel emulation (C++20, no torch) and the
    ops for CPU tensors (torch headers), linked against the installed torch's libraries.
    """
    import torch
    import torch.utils.cpp_extension as cpp_ext

    gxx = _gxx()
    if gxx is None:
        raise FileNotFoundError("no host C++ compiler (g++) to build the CPU test library")
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    common = ["-O1", "-fPIC", *_WARNINGS, abi, f"-I{CSRC}"]
    units = {
        "arg_check": ["-std=c++17", str(CSRC / "arg_check.cpp")],
        "decode_emulator": [
            "-std=c++20",
            "-pthread",
            "-Wno-unknown-pragmas",
            str(CSRC / "emulate" / "decode_emulator.cpp"),
        ],
        "cpu_ops": [
            "-std=c++17",
            *(f"-isystem{p}" for p in cpp_ext.include_paths()),
            str(CSRC / "emulate" / "cpu_ops.cpp"),
        ],
    }
    objects = {name: out_dir / f"{name}.o" for name in units}
    compiles = [[gxx, "-c", *common, *args, "-o", str(objects[name])] for name, args in units.items()]
    lib = out_dir / "scale_kernels_cpu_test.so"
    link = [gxx, "-shared", "-pthread", *map(str, objects.values()), "-o", str(lib), f"-L{torch_lib}", "-lc10"]
    link += ["-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    return compiles, link, lib


def build_cpu_test_library(out_dir: Path, jobs: int = 2) -> Path:
    """Build the CPU test library into ``out_dir``; raises CalledProcessError (with the compiler's stderr) on
    a compile error and FileNotFoundError without g++."""
    compiles, link, lib = cpu_test_library_commands(out_dir)
    for cmd, result in zip(compiles, _run_all([(cmd[-1], cmd) for cmd in compiles], jobs)):
        if not result.ok:
            raise subprocess.CalledProcessError(result.returncode, cmd, stderr=result.output)
    subprocess.run(link, check=True, capture_output=True, text=True)
    return lib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.check_cuda_compile", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="e.g. 80, 90a (repeatable; default 80 and 90a)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes")
    parser.add_argument("--no-binding", action="store_true", help="skip the binding.cpp syntax check")
    parser.add_argument("--no-cpu-lib", action="store_true", help="skip building the CPU test library")
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("SKIP: nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/bin, /usr/local/cuda/bin)")
        return SKIP_STATUS
    archs = tuple(args.arch or DEFAULT_ARCHS)
    with tempfile.TemporaryDirectory(prefix="scale_kernels_cu_") as tmp:
        results = compile_cu(nvcc, archs, Path(tmp), args.jobs)
        if not args.no_binding:
            cmd = binding_syntax_command(nvcc, Path(tmp) / "stub")
            if isinstance(cmd, str):
                print(f"SKIP binding.cpp syntax check: {cmd}")
            else:
                results.append(_run("binding.cpp [g++ -fsyntax-only]", cmd))
        if not args.no_cpu_lib:
            try:
                build_cpu_test_library(Path(tmp), args.jobs)
                results.append(Result("CPU test library [g++]", 0, ""))
            except subprocess.CalledProcessError as exc:
                results.append(Result("CPU test library [g++]", exc.returncode, exc.stderr))
    for r in results:
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.name}")
        if not r.ok:
            print(r.output)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
