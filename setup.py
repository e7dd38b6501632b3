"""Build gradfuse's compiled modules without torch.

* ``gradfuse._C_cpu``: csrc/cpu, built with the system C++ compiler (portable: no -march=native;
  the kernels pick AVX2/AVX-512 at run time through function multiversioning).
* ``gradfuse._C_cuda``: csrc/cuda, built when nvcc is found (``GRADFUSE_CUDA=auto``, the default),
  always (``=1``, a missing nvcc is an error) or never (``=0``). Architectures: sm_80 and sm_90 with
  PTX for newer GPUs, or ``GRADFUSE_CUDA_ARCH_LIST`` / ``TORCH_CUDA_ARCH_LIST`` ("8.0;9.0+PTX").

Neither module links libtorch: they take addresses and sizes as plain integers, so one build
serves every torch version and ``pip install .`` works in an isolated environment with no torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
ABI_HEADER = "csrc/gradfuse_abi.h"


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_arch_flags() -> list[str]:
    """-gencode flags from GRADFUSE_CUDA_ARCH_LIST / TORCH_CUDA_ARCH_LIST, default sm_80 + sm_90 + PTX."""
    spec = os.environ.get("GRADFUSE_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX"
    flags = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        arch = item.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


class BuildExt(build_ext):
    """build_ext that compiles .cu sources with nvcc and links the CUDA runtime statically."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if not cu_sources:
            return super().build_extension(ext)
        nvcc = find_nvcc()
        objects = []
        build_temp = Path(self.build_temp)
        build_temp.mkdir(parents=True, exist_ok=True)
        for src in cu_sources:
            obj = build_temp / (Path(src).stem + ".cu.o")
            cmd = [
                nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17", f"-I{ROOT / 'csrc'}",
                "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "-lineinfo",
                *cuda_arch_flags(),
            ]  # fmt: skip
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            objects.append(str(obj))
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        # The .cu objects arrive as extra_objects, which the up-to-date check ignores.
        ext.depends = list(ext.depends or []) + cu_sources
        ext.extra_objects = list(ext.extra_objects or []) + objects
        cuda_lib = Path(nvcc).resolve().parent.parent / "lib64"
        if not cuda_lib.exists():
            cuda_lib = Path(nvcc).resolve().parent.parent / "lib"
        ext.library_dirs = list(ext.library_dirs or []) + [str(cuda_lib)]
        ext.libraries = list(ext.libraries or []) + ["cudart_static", "rt", "dl", "pthread"]
        super().build_extension(ext)


def extensions():
    exts = [
        Pybind11Extension(
            "gradfuse._C_cpu",
            sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp")),
            depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.h")) + [ABI_HEADER],
            include_dirs=["csrc"],  # gradfuse_abi.h, generated from gradfuse/_abi.py
            cxx_std=17,
            extra_compile_args=["-O3", "-fvisibility=hidden", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ]
    want_cuda = os.environ.get("GRADFUSE_CUDA", "auto").lower()
    if want_cuda not in ("0", "1", "auto"):
        sys.exit(f"GRADFUSE_CUDA must be 0, 1 or auto, not {want_cuda!r}")
    nvcc = find_nvcc()
    if want_cuda == "1" and nvcc is None:
        sys.exit("GRADFUSE_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on the PATH)")
    if want_cuda != "0" and nvcc is not None:
        cuda_dir = ROOT / "csrc" / "cuda"
        sources = sorted(str(p.relative_to(ROOT)) for p in cuda_dir.glob("*.cpp"))
        sources += sorted(str(p.relative_to(ROOT)) for p in cuda_dir.glob("*.cu"))
        headers = sorted(str(p.relative_to(ROOT)) for pattern in ("*.h", "*.cuh") for p in cuda_dir.glob(pattern))
        include = Path(nvcc).resolve().parent.parent / "include"
        exts.append(
            Pybind11Extension(
                "gradfuse._C_cuda",
                sources,
                depends=headers + [ABI_HEADER],
                cxx_std=17,
                include_dirs=["csrc", str(include)],  # gradfuse_abi.h, generated from gradfuse/_abi.py
                extra_compile_args=["-O3", "-fvisibility=hidden"],
            )
        )
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
