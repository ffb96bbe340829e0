"""The CUDA kernels of ``megafast._C`` (csrc/cuda/*.cu), when the extension was built with them.

``pip install -e .`` on a machine whose torch has CUDA and whose PATH has ``nvcc`` compiles them in
(setup.py); everywhere else ``cuda_extension()`` is None and callers fall back to Triton/torch.
The bindings take the CUDA stream explicitly: :func:`current_stream` gives the one torch is
using on the tensor's device.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

import torch

OPS = ("rope", "multi_tensor_adamw", "multi_tensor_lion")


@functools.lru_cache(maxsize=None)
def cuda_extension() -> Optional[ModuleType]:
    """``megafast._C`` if it holds the CUDA ops, else None."""
    try:
        from megafast import _C
    except ImportError:
        return None
    if not getattr(_C, "has_cuda", False) or not all(hasattr(_C, op) for op in OPS):
        return None
    return _C


def cuda_available() -> bool:
    return cuda_extension() is not None and torch.cuda.is_available()


def require_cuda_extension(what: str) -> ModuleType:
    ext = cuda_extension()
    if ext is None or not torch.cuda.is_available():
        raise ValueError(
            f"{what} needs megafast's CUDA extension: on a CUDA machine with nvcc run "
            "`pip install --no-build-isolation -e .` (or choose the triton/torch implementation)"
        )
    return ext


def current_stream(device: torch.device) -> int:
    """The raw ``cudaStream_t`` torch is using on ``device``."""
    return torch.cuda.current_stream(device).cuda_stream
