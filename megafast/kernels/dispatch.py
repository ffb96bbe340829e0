"""The one place that picks an implementation for each fused op: Triton, CUDA or plain torch.

There is no global switch: the choice is the ``backend`` argument of each function below, which
the model passes from its :class:`megafast.config.KernelConfig` (fields ``kernels``,
``attention_backend`` and ``rope_kernel``, as ``GPTConfig``'s, i.e. ``--kernels``,
``--attention-backend`` and ``--rope-kernel``).

Element-wise and row-wise ops (``backend``):

- ``auto``: Triton on CUDA tensors (when Triton is installed), the plain-torch implementation otherwise
  (CPU: the same code the model always ran);
- ``triton``: always the Triton kernels; on CPU tensors only in Triton's interpreter
  (``TRITON_INTERPRET=1``, set before importing megafast: the CPU tests do);
- ``torch``: always the plain-torch implementation (``*_torch`` of each kernel file).

RoPE also takes ``cuda`` (the kernel of ``megafast._C``); ``rope_kernel="auto"`` follows ``backend``.

Attention (``attention``): ``auto`` uses flash-attn when it is importable and the tensors are CUDA
fp16/bf16, else ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``: FlashAttention-2 /
cuDNN on H100, the math kernel on CPU); ``flash`` and ``triton`` (our flash attention, no dropout)
force those, except that fp32 attention on a GPU always runs in SDPA (with a warning): the Triton
kernel's exact-fp32 dots use no tensor cores and spill registers on sm_80/sm_90a (see
``flash_attention_kernel.attention_dtypes``), so it is not offered there.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from megafast.kernels import add_rms_norm_kernel as _add_rms_norm
from megafast.kernels import cross_entropy_kernel as _ce
from megafast.kernels import flash_attention_kernel as _fa
from megafast.kernels import fused_linear_cross_entropy_kernel as _flce
from megafast.kernels import gelu_kernel as _gelu
from megafast.kernels import grouped_gemm_kernel as _gg
from megafast.kernels import layer_norm_kernel as _ln
from megafast.kernels import moe_permute_kernel as _perm
from megafast.kernels import nf4_dequantize_kernel as _nf4
from megafast.kernels import rms_norm_kernel as _rms
from megafast.kernels import rotary_kernel as _rope
from megafast.kernels import swiglu_kernel as _swiglu
from megafast.kernels._triton import HAS_TRITON, interpreting
from megafast.kernels.cuda_ext import cuda_available

try:  # optional attention backend, used on CUDA for fp16/bf16 when installed
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - not installable on the CPU machines
    flash_attn_func = None

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------- backend choice


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'triton' or 'torch' for an op on ``x`` under ``backend`` (auto | triton | torch)."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if HAS_TRITON and x.is_cuda and x.dtype in TRITON_DTYPES else "torch"
    if backend != "triton":
        raise ValueError(f"unknown kernel backend {backend!r}: choose one of auto, triton, torch")
    if not HAS_TRITON:
        raise ValueError("--kernels triton needs the triton package: pip install 'megafast[triton]', "
                         "or use --kernels auto/torch")
    if not x.is_cuda and not interpreting():
        raise ValueError(
            "--kernels triton on CPU tensors runs only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before starting Python (the tests do), or use --kernels auto/torch"
        )
    return "triton"


def resolve_attention(backend: str, q: torch.Tensor, dropout_p: float = 0.0) -> str:
    """'flash', 'sdpa' or 'triton' for attention on ``q`` under ``backend``."""
    half_cuda = q.is_cuda and q.dtype in HALF_DTYPES
    if backend == "auto":
        return "flash" if flash_attn_func is not None and half_cuda else "sdpa"
    if backend == "sdpa":
        return "sdpa"
    if backend == "flash":
        if flash_attn_func is None or not half_cuda:
            raise ValueError(
                "--attention-backend flash needs flash-attn and CUDA fp16/bf16 tensors (--bf16/--fp16)"
            )
        return "flash"
    if backend == "triton":
        if dropout_p > 0.0:
            raise ValueError(
                "the Triton flash attention has no dropout: set --attention-dropout 0 or use sdpa"
            )
        resolve_backend("triton", q)  # same availability rules as the other Triton kernels
        if q.is_cuda and q.dtype not in _fa.attention_dtypes():
            warnings.warn(  # shown once per process by Python's default warning filter
                f"--attention-backend triton: {q.dtype} attention on a GPU runs in torch SDPA (the Triton "
                "kernel is bf16/fp16 only on GPUs: its exact-fp32 dots spill registers)",
                stacklevel=3,
            )
            return "sdpa"
        return "triton"
    raise ValueError(f"unknown attention backend {backend!r}: choose one of auto, flash, sdpa, triton")


# ---------------------------------------------------------------------------------- the ops


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, backend: str = "auto"
) -> torch.Tensor:
    """``w * (x / sqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dimension, fp32 statistics."""
    if resolve_backend(backend, x) == "triton":
        return _rms.rms_norm_triton(x, weight, eps)
    return _rms.rms_norm_torch(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; returns ``(rms_norm(h), h)`` (one fused pass with Triton)."""
    if resolve_backend(backend, x) == "triton":
        return _add_rms_norm.add_rms_norm_triton(x, residual, weight, eps)
    return _add_rms_norm.add_rms_norm_torch(x, residual, weight, eps)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm over the last dimension, normalised in fp32, cast back to x's dtype."""
    if resolve_backend(backend, x) == "triton":
        return _ln.layer_norm_triton(x, weight, bias, eps)
    return _ln.layer_norm_torch(x, weight, bias, eps)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """RoPE (half-split) of ``x`` [s, b, heads, d] with ``cos``/``sin`` [s, d] or [s, 1, 1, d].

    ``backend`` also accepts 'cuda' (the CUDA kernel of ``megafast._C``).
    """
    if backend == "cuda":
        if not (x.is_cuda and cuda_available()):
            raise ValueError(
                "--rope-kernel cuda needs CUDA tensors and megafast's CUDA extension (pip install -e .)"
            )
        return _rope.apply_rotary_cuda(x, cos, sin)
    if resolve_backend(backend, x) == "triton":
        return _rope.apply_rotary_triton(x, cos, sin)
    return _rope.apply_rotary_torch(x, cos, sin)


def swiglu(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` for ``x`` = [..., gate | up] ([..., 2F] -> [..., F])."""
    if resolve_backend(backend, x) == "triton":
        return _swiglu.swiglu_triton(x)
    return _swiglu.swiglu_torch(x)


def gelu(x: torch.Tensor, approximate: str = "tanh", *, backend: str = "auto") -> torch.Tensor:
    """GELU, ``approximate`` 'tanh' (GPT-2) or 'none' (erf), as ``torch.nn.functional.gelu``."""
    if resolve_backend(backend, x) == "triton":
        return _gelu.gelu_triton(x, approximate)
    return _gelu.gelu_torch(x, approximate)


def nf4_dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    codebook: torch.Tensor,
    numel: int,
    block_size: int,
    dtype: torch.dtype,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``codebook[code] * absmax[block]`` of the first ``numel`` packed 4-bit codes ([numel], ``dtype``).

    ``codes`` [ceil(numel / 2)] uint8 (high nibble first), ``absmax`` [blocks] fp32, ``codebook``
    [16] fp32 (QLoRA's NF4 storage, see megafast.quant.nf4); ``backend`` chosen on ``absmax``.
    """
    if resolve_backend(backend, absmax) == "triton" and dtype in TRITON_DTYPES:
        return _nf4.nf4_dequantize_triton(codes, absmax, codebook, numel, block_size, dtype)
    return _nf4.nf4_dequantize_torch(codes, absmax, codebook, numel, block_size, dtype)


def _reduce(loss: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (target != ignore_index).sum().clamp_min(1)
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    *,
    vocab_size: Optional[int] = None,
    reduction: str = "none",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of full-vocabulary ``logits`` [..., V]: per-token fp32 loss (or its sum/mean over
    non-ignored tokens); columns >= ``vocab_size`` (padding) excluded, ``ignore_index`` targets give 0."""
    if resolve_backend(backend, logits) == "triton":
        loss = _ce.cross_entropy_triton(logits, target, ignore_index, vocab_size)
    else:
        from megafast.parallel.cross_entropy import vocab_parallel_cross_entropy as torch_ce

        loss = torch_ce(logits, target, None, vocab_size, ignore_index)
    return _reduce(loss, target, ignore_index, reduction)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group=None,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    *,
    backend: str = "auto",
    inplace: bool = False,
) -> torch.Tensor:
    """Per-token loss of vocabulary-parallel ``logits`` [..., V/p] (``megafast.parallel``'s contract).
    ``inplace``: the torch path may overwrite ``logits`` (a temporary of the caller's)."""
    if resolve_backend(backend, logits) == "triton":
        return _ce.vocab_parallel_cross_entropy_triton(logits, target, tp_group, vocab_size, ignore_index)
    from megafast.parallel.cross_entropy import vocab_parallel_cross_entropy as torch_ce

    return torch_ce(logits, target, tp_group, vocab_size, ignore_index, inplace)


def fused_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group=None,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    reduction: str = "none",
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``x @ weight.T`` (``weight`` [V/p, h], vocabulary-parallel over ``tp_group``).

    Triton: chunked over tokens, never holding the [tokens, V/p] logits; torch: the unfused
    matmul + cross-entropy. Under TP, x's gradient is this rank's partial sum (see
    ``fused_linear_cross_entropy.py``).
    """
    if resolve_backend(backend, x) == "triton":
        return _flce.fused_linear_cross_entropy_triton(
            x, weight, target, tp_group, vocab_size, ignore_index, reduction, chunk_size
        )
    loss = vocab_parallel_cross_entropy(
        x @ weight.t(), target, tp_group, vocab_size, ignore_index, backend="torch"
    )
    return _reduce(loss, target, ignore_index, reduction)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, q [b, H, s, d], k/v [b, G, s, d] (GQA: kv head h // (H/G)).

    Dropout uses the caller's RNG state (fork the tensor-parallel tracker around the call).
    The Triton kernel covers equal query/key lengths; other shapes use SDPA.
    """
    chosen = resolve_attention(backend, q, dropout_p)
    if chosen == "triton" and q.shape[2] == k.shape[2]:
        return _fa.flash_attention_triton(q, k, v, causal)
    if chosen == "flash":
        out = flash_attn_func(  # takes [b, s, heads, d] and GQA natively
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, causal=causal
        )
        return out.transpose(1, 2)
    heads, groups = q.shape[1], k.shape[1]
    if groups != heads:  # each group's k/v serves its H/G consecutive query heads
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)


# ------------------------------------------------------------------------------------- MoE ops


def grouped_gemm(
    x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]``: x [T, K] sorted by expert, w [E, K, N],
    tokens_per_expert [E] (rows past their sum: dropped slots, y = 0). fp32 on a GPU runs in torch
    (the Triton kernel is bf16/fp16 there: exact fp32 dots would be slow and spill); the torch path
    reads the counts on the host (one sync)."""
    if resolve_backend(backend, x) == "triton" and not (x.is_cuda and x.dtype not in HALF_DTYPES):
        return _gg.grouped_gemm(x, w, tokens_per_expert)
    return _gg.grouped_gemm_torch(x, w, tokens_per_expert)


def moe_permute(
    hidden: torch.Tensor, indices: torch.Tensor, num_experts: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(permuted [T*k, H] sorted by expert, row_id_map [T, k], tokens_per_expert [E]) for the top-k
    expert ids ``indices`` [T, k] (-1: a dropped choice); see ``moe_permute_kernel``."""
    if resolve_backend(backend, hidden) == "triton":
        return _perm.permute(hidden, indices, num_experts)
    return _perm.permute_torch(hidden, indices, num_experts)


def moe_unpermute(
    expert_out: torch.Tensor, row_id_map: torch.Tensor, probs: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """[T, H]: sum over token t's kept choices j of ``probs[t, j] * expert_out[row_id_map[t, j]]``."""
    if resolve_backend(backend, expert_out) == "triton":
        return _perm.unpermute(expert_out, row_id_map, probs)
    return _perm.unpermute_torch(expert_out, row_id_map, probs)
