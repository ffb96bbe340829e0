"""The CUDA sources compile here, although nothing CUDA runs here (as `make check-cuda` in CI):
every csrc/cuda/*.cu with nvcc for sm_90a (skipped without nvcc), and the torch bindings
csrc/cuda_ops.cpp syntax-checked against the installed torch's headers (they use no torch CUDA
header, so a CPU-only torch suffices). All compilers run concurrently."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC_FLAGS = ["-std=c++17", "-gencode", "arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC"]


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """Start every compiler at once; {name: (returncode, output)} once all have finished."""
    out = tmp_path_factory.mktemp("cuda-build")
    procs = {}
    if shutil.which("nvcc"):
        for cu in CU_FILES:
            obj = out / (os.path.basename(cu) + ".o")
            procs[os.path.basename(cu)] = subprocess.Popen(
                ["nvcc", "-c", cu, "-o", str(obj), *NVCC_FLAGS],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx:
        from torch.utils.cpp_extension import include_paths

        includes = [f"-I{p}" for p in include_paths() + [sysconfig.get_paths()["include"]]]
        procs["cuda_ops.cpp"] = subprocess.Popen(
            [
                cxx,
                "-std=c++17",
                "-fsyntax-only",
                "-w",
                f"-I{os.path.join(ROOT, 'csrc')}",
                *includes,
                os.path.join(ROOT, "csrc", "cuda_ops.cpp"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    return {
        name: (p.wait(timeout=600), p.stdout.read().decode(errors="replace")) for name, p in procs.items()
    }


def test_there_are_cuda_kernels():
    assert {"multi_tensor_optim.cu", "rope.cu"} <= {os.path.basename(f) for f in CU_FILES}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("cu", [os.path.basename(f) for f in CU_FILES])
def test_cu_file_compiles_with_nvcc(cu, compiles):
    rc, output = compiles[cu]
    assert rc == 0, f"nvcc -c csrc/cuda/{cu} failed:\n{output[-4000:]}"


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_cuda_bindings_compile_against_torch_headers(compiles):
    rc, output = compiles["cuda_ops.cpp"]
    assert rc == 0, f"csrc/cuda_ops.cpp does not compile:\n{output[-4000:]}"
    with open(os.path.join(ROOT, "csrc", "cuda_ops.cpp")) as f:
        source = f.read()
    assert "void register_cuda_ops(pybind11::module_& m)" in source  # what csrc/bindings.cpp calls
    assert "cuda_runtime" not in source and "ATen/cuda" not in source and "c10/cuda" not in source
