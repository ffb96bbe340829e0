"""Builds megafast._C from csrc/.

Always: the pybind11 bindings and the C++ dataset helpers (needs only pybind11 + numpy headers,
compiles in seconds). Only when torch has CUDA and `nvcc` is on the PATH: the pure-CUDA kernels in
csrc/cuda/*.cu and their torch bindings in csrc/cuda_ops.cpp, linked into the same module.
Set MEGAFAST_NO_CUDA=1 to force the CPU-only build.
"""

import glob
import os
import shutil

from setuptools import setup


def _cuda_build_possible() -> bool:
    if os.environ.get("MEGAFAST_NO_CUDA") == "1" or shutil.which("nvcc") is None:
        return False
    if not glob.glob("csrc/cuda/*.cu"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


# -ffp-contract=off: no fused multiply-add beyond the ones written (csrc/cpu_adamw.cpp matches torch bit for bit)
CXX_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off"]
CPP_SOURCES = ["csrc/bindings.cpp", "csrc/cpu_adamw.cpp", "csrc/dataset_helpers.cpp"]

if _cuda_build_possible():
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    import torch

    ext = CUDAExtension(
        "megafast._C",
        sources=CPP_SOURCES + ["csrc/cuda_ops.cpp"] + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("MEGAFAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
        # torch's libraries (libc10, libtorch) found even when megafast._C is imported before torch
        # (the data tools import it for the dataset helpers alone)
        extra_link_args=[f"-Wl,-rpath,{os.path.join(os.path.dirname(torch.__file__), 'lib')}"],
    )
    cmdclass = {"build_ext": BuildExtension}
else:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext = Pybind11Extension("megafast._C", sources=CPP_SOURCES, extra_compile_args=CXX_FLAGS)
    cmdclass = {"build_ext": build_ext}

setup(ext_modules=[ext], cmdclass=cmdclass)
