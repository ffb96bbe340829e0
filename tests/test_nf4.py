"""NF4 (megafast.quant): the codebook and block absmax exactly as QLoRA / bitsandbytes define them,
checked against a plain-numpy quantizer written here; the Triton dequantize kernel (interpreter)
against its torch twin and numpy; the on-the-fly NF4 linear against plain torch."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megafast.kernels import nf4_dequantize as dispatch_dequantize
from megafast.quant import NF4_CODEBOOK, NF4Weight, dynamic_map, nf4_codebook, nf4_dequantize, nf4_quantize
from seeding import draw_seed

# the 16 values printed in the QLoRA paper's appendix E / bitsandbytes' get_4bit_type("nf4")
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def _rng(name: str = "seed") -> tuple[np.random.Generator, int]:
    seed = draw_seed(name)
    return np.random.default_rng(seed), seed


# ------------------------------------------------------------------------------ numpy reference


def np_dynamic_map() -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed=True): 7 exponents, linear fraction, 0 and 1."""
    data = []
    for i in range(7):
        b = np.linspace(0.1, 1, 2**i + 1, dtype=np.float32)
        means = (b[:-1] + b[1:]) / np.float32(2.0)
        data += list(np.float32(10.0 ** (i - 6)) * means) + list(-np.float32(10.0 ** (i - 6)) * means)
    return np.sort(np.array(data + [0.0, 1.0], dtype=np.float32))


def np_nearest(x: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """argmin |x - table| per element, and whether the runner-up is a tie (within float32 rounding)."""
    d = np.abs(x[:, None] - table[None, :])
    idx = np.argmin(d, axis=1)
    srt = np.sort(d, axis=1)
    tie = srt[:, 1] - srt[:, 0] <= 4 * np.finfo(np.float32).eps
    return idx, tie


def np_nf4(x: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """QLoRA's blockwise NF4 of the float32 vector x: absmax per block, nearest codes, dequantized."""
    n = x.size
    padded = np.zeros(-(-n // block) * block, dtype=np.float32)
    padded[:n] = x
    blocks = padded.reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1)
    safe = np.where(absmax > 0, absmax, np.float32(1.0)).astype(np.float32)
    normalized = (blocks / safe[:, None]).reshape(-1)
    code, tie = np_nearest(normalized, np.array(PAPER_NF4, dtype=np.float32))
    deq = np.array(PAPER_NF4, dtype=np.float32)[code] * np.repeat(absmax, block)
    return {"absmax": absmax, "code": code, "tie": tie, "deq": deq[:n]}


def np_unpack(packed: np.ndarray) -> np.ndarray:
    """Two codes per byte, the even element in the high nibble."""
    return np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)


# ------------------------------------------------------------------------------------ codebook


def test_codebook_is_the_papers_and_rederives_from_normal_quantiles():
    assert list(NF4_CODEBOOK) == PAPER_NF4
    # QLoRA section 3: quantiles of N(0, 1), offset delta = (1/30 + 1/32) / 2 so the ends are finite;
    # 8 positive levels (0 dropped), 7 negative, an exact 0, scaled to [-1, 1]
    offset = 1 - (1 / 30 + 1 / 32) / 2
    assert abs(offset - 0.9677083) < 1e-7
    ppf = NormalDist().inv_cdf
    pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array(pos + neg + [0.0]))
    values /= values.max()
    assert len(values) == 16
    np.testing.assert_allclose(values, PAPER_NF4, rtol=0, atol=2e-7)


# ------------------------------------------------------------------------------------ quantize


@pytest.mark.parametrize("shape", [(64, 64), (3, 37, 31), (1531,), (7,), (128, 200)])
@pytest.mark.parametrize("block", [64, 128])
def test_codes_absmax_and_values_are_qloras(shape, block):
    rng, seed = _rng()
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0)).astype(np.float32)
    x.reshape(-1)[:5] = 0.0  # exact zeros quantize to the exact 0 (code 7)
    q = nf4_quantize(torch.from_numpy(x), block_size=block)
    ref = np_nf4(x.reshape(-1), block)
    n = x.size
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == -(-n // block) * block // 2, f"seed={seed}"
    assert np.array_equal(q.absmax.numpy(), ref["absmax"]), f"seed={seed}"
    codes = np_unpack(q.codes.numpy())
    bad = (codes != ref["code"]) & ~ref["tie"]
    assert not bad.any(), f"seed={seed}: {bad.sum()} codes differ from the nearest NF4 value"
    assert (codes[n:] == 7).all()  # padding is the exact zero
    assert (codes[:5] == 7).all()
    out = nf4_dequantize(q)
    assert out.shape == torch.Size(shape) and out.dtype == torch.float32
    # dequantized == codebook[code] * absmax, with the codes the quantizer chose
    expect = np.array(PAPER_NF4, dtype=np.float32)[codes] * np.repeat(ref["absmax"], block)
    assert np.array_equal(out.numpy().reshape(-1), expect[:n]), f"seed={seed}"


def test_round_trip_error_is_within_half_a_codebook_gap():
    rng, seed = _rng()
    x = rng.standard_normal((96, 333)).astype(np.float32)
    q = nf4_quantize(torch.from_numpy(x))
    err = np.abs(nf4_dequantize(q).numpy() - x).reshape(-1)
    half_gap = np.diff(PAPER_NF4).max() / 2  # 0.1385: between 0.7230 and 1
    scale = np.repeat(q.absmax.numpy(), 64)[: x.size]
    assert (err <= scale * half_gap * (1 + 1e-6)).all(), f"seed={seed}"
    # on Gaussian weights NF4's mean error is far below the worst case: ~0.1 of the absmax of 64
    rel = err.mean() / np.abs(x).mean()
    assert rel < 0.12, f"seed={seed}: mean relative error {rel:.4f}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_come_back_in_their_dtype(dtype):
    rng, seed = _rng()
    x = torch.from_numpy(rng.standard_normal((5, 130)).astype(np.float32)).to(dtype)
    q = nf4_quantize(x)
    ref = np_nf4(x.float().numpy().reshape(-1), 64)
    out = nf4_dequantize(q)
    assert out.dtype == dtype and out.shape == x.shape
    expect = torch.from_numpy(np.array(PAPER_NF4, dtype=np.float32)[np_unpack(q.codes.numpy())]
                              * np.repeat(ref["absmax"], 64))[: x.numel()].to(dtype)
    assert torch.equal(out.reshape(-1), expect), f"seed={seed}"


def test_all_zero_blocks_and_bad_arguments():
    out = nf4_dequantize(nf4_quantize(torch.zeros(3, 100)))
    assert torch.equal(out, torch.zeros(3, 100))
    with pytest.raises(ValueError, match="block size"):
        nf4_quantize(torch.ones(10), block_size=63)
    with pytest.raises(ValueError, match="floating-point"):
        nf4_quantize(torch.ones(10, dtype=torch.int32))


def test_bits_per_element():
    x = torch.randn(4096, 1024)
    q = nf4_quantize(x)
    assert q.nbytes == x.numel() // 2 + x.numel() // 64 * 4
    assert q.bits_per_element == 4.5  # 4 bits + one fp32 absmax per 64
    dq = nf4_quantize(x, double_quant=True)
    blocks = x.numel() // 64
    assert dq.nbytes == x.numel() // 2 + blocks + blocks // 256 * 4 + 4
    assert abs(dq.bits_per_element - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-5  # QLoRA's 4.127
    odd = nf4_quantize(torch.randn(1000))  # 16 blocks, the last padded: 8 bytes of codes each
    assert odd.nbytes == 16 * 32 + 16 * 4


# ------------------------------------------------------------------------------- double quant


def test_double_quant_absmax_is_8bit_blockwise_of_the_centred_absmax():
    rng, seed = _rng()
    x = (rng.standard_normal(64 * 700 + 9) * rng.uniform(0.1, 2.0, 64 * 700 + 9)).astype(np.float32)
    q = nf4_quantize(torch.from_numpy(x), double_quant=True)
    assert q.absmax is None and q.double_quant.block_size == 256
    ref = np_nf4(x, 64)
    absmax = ref["absmax"]  # first level, fp32 [701]
    offset = np.float32(absmax.mean(dtype=np.float64))
    np.testing.assert_allclose(q.double_quant.offset.numpy(), [offset], rtol=1e-6)
    centred = absmax - q.double_quant.offset.numpy()[0]
    padded = np.zeros(-(-centred.size // 256) * 256, dtype=np.float32)
    padded[: centred.size] = centred
    scale = np.abs(padded.reshape(-1, 256)).max(axis=1)
    assert np.array_equal(q.double_quant.scale.numpy(), scale), f"seed={seed}"
    table = np_dynamic_map()
    assert table.size == 256 and table[0] < 0 and table[-1] == 1.0
    # numpy's and torch's float32 linspace differ in the last bit for a few entries
    np.testing.assert_allclose(dynamic_map().numpy(), table, rtol=2.5e-7, atol=0)
    code, tie = np_nearest((padded.reshape(-1, 256) / scale[:, None]).reshape(-1)[: centred.size], table)
    got = q.double_quant.codes.numpy().astype(np.int64)
    assert not ((got != code) & ~tie).any(), f"seed={seed}"
    restored = table[got] * np.repeat(scale, 256)[: centred.size] + q.double_quant.offset.numpy()[0]
    # the 8-bit map keeps ~1% of each block's spread
    assert np.abs(restored - absmax).max() <= 0.02 * np.abs(centred).max(), f"seed={seed}"
    out = nf4_dequantize(q).numpy()
    expect = np.array(PAPER_NF4, dtype=np.float32)[np_unpack(q.codes.numpy())] * np.repeat(restored, 64)
    np.testing.assert_allclose(out, expect[: x.size], rtol=5e-7, atol=0)


# ---------------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("numel", [1, 63, 1531, 3 * 37 * 31, 4096 + 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_matches_torch_twin_and_numpy(numel, dtype):
    pytest.importorskip("triton")
    rng, seed = _rng()
    x = torch.from_numpy(rng.standard_normal(numel).astype(np.float32))
    q = nf4_quantize(x)
    book = nf4_codebook()
    tri = dispatch_dequantize(q.codes, q.absmax, book, numel, 64, dtype, backend="triton")
    ref = dispatch_dequantize(q.codes, q.absmax, book, numel, 64, dtype, backend="torch")
    expect = (np.array(PAPER_NF4, dtype=np.float32)[np_unpack(q.codes.numpy())]
              * np.repeat(q.absmax.numpy(), 64))[:numel]
    assert torch.equal(ref, torch.from_numpy(expect).to(dtype)), f"seed={seed}"
    if dtype == torch.bfloat16 and tri.device.type == "cpu":
        # Triton's CPU interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest even):
        # within one bf16 step of the fp32 value, on the zero side
        exact = torch.from_numpy(expect)
        assert (tri.float().abs() <= exact.abs()).all() and torch.allclose(tri.float(), exact, rtol=2**-7, atol=0)
    else:
        assert torch.equal(tri, ref), f"seed={seed}"


def test_triton_kernel_with_double_quant_and_other_block_size():
    pytest.importorskip("triton")
    rng, seed = _rng()
    x = torch.from_numpy(rng.standard_normal((70, 129)).astype(np.float32))
    for block, dq in ((64, True), (128, False), (32, True)):
        q = nf4_quantize(x, block_size=block, double_quant=dq)
        assert torch.equal(nf4_dequantize(q, backend="triton"), nf4_dequantize(q, backend="torch")), f"seed={seed}"


# ------------------------------------------------------------------------------- the NF4 linear


def test_nf4_linear_forward_and_backward_use_the_dequantized_weight_and_keep_no_copy():
    g = torch.Generator().manual_seed(draw_seed())
    w = torch.randn(48, 64, generator=g)
    bias = torch.randn(48, generator=g, requires_grad=True)
    x = torch.randn(5, 3, 64, generator=g, requires_grad=True)
    nf4 = NF4Weight.from_weight(w, double_quant=True)
    w_hat = nf4_dequantize(nf4.nf4())
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = nf4(x, bias)
    assert (48, 64) not in saved and (64, 48) not in saved  # no full-precision weight kept for backward
    x2 = x.detach().clone().requires_grad_(True)
    b2 = bias.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, w_hat, b2)  # plain torch on the same dequantized weight
    assert torch.equal(y, y2)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-6, atol=1e-6)
    assert nf4.state_dict() == {}  # never written into checkpoints
