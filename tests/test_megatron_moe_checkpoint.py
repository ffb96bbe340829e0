"""Megatron-LM MoE checkpoints in and out, against checkpoints megatron-core itself wrote.

tests/megatron_worker.py ``--variant mixtral`` builds megatron-core 0.19's GPTModel with a
Mixtral-like MoE MLP in every layer (4 SwiGLU experts of FFN size 96, softmax top-2 router, aux
loss; the local spec's SequentialMLP and the allgather dispatcher, what megatron-core builds on
CPU) and saves it with Megatron-LM's own ``save_checkpoint``: legacy ``torch``
(``mlp.experts.local_experts.{e}.linear_fc1.weight``) and ``torch_dist``
(``decoder.layers.mlp.experts.experts.linear_fc1.weight`` [L, E, 2F, h]). Both are converted to
megafast and to HF Mixtral and compared with Megatron's own forward; megafast's ``--saver
megatron`` output is read back by Megatron-LM's ``load_checkpoint``. Skipped without megatron-core
or Megatron-LM's sources.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from dist import run_distributed
from test_megatron_checkpoint import (
    FORMATS,
    _megafast_worker,
    _one_line_error,
    _run_worker,
    _wait,
    assert_close,
    convert,
    pytestmark,
)

from megafast.checkpoint.megatron_format import megatron_format, open_megatron_checkpoint

__all__ = ["pytestmark"]
LAYERS = 2


@pytest.fixture(scope="module")
def megatron_moe(tmp_path_factory):
    """(directory with torch/, torch_dist/, reference.pt; reference dict) of the Megatron MoE model."""
    out = tmp_path_factory.mktemp("megatron_moe")
    _wait(_run_worker(["--variant", "mixtral", "--num-layers", str(LAYERS), "--out", str(out)]), "Megatron MoE worker")
    return out, torch.load(out / "reference.pt")


def test_megatron_moe_reader_and_config(megatron_moe):
    out, _ = megatron_moe
    readers = [open_megatron_checkpoint(str(out / fmt)) for fmt in FORMATS]
    for fmt, reader in zip(FORMATS, readers):
        assert megatron_format(str(out / fmt)) == fmt
        c = reader.config
        assert (c.num_experts, c.moe_router_topk, c.moe_ffn_hidden_size, c.num_layers) == (4, 2, 96, LAYERS), fmt
        assert (c.moe_router_load_balancing_type, c.moe_aux_loss_coeff, c.activation) == ("aux_loss", 0.01, "swiglu")
        assert (c.moe_router_score_function, c.moe_router_pre_softmax, c.moe_layer_freq) == ("softmax", False, 1)
    legacy, dist_ = readers
    for (label, a), (_, b) in zip(legacy.groups(), dist_.groups()):
        assert a.keys() == b.keys(), label
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name}: legacy and torch_dist differ"
    # the stacked experts are megatron-core's per-expert weights, in expert order
    raw = torch.load(next((out / "torch").glob("iter_*/mp_rank_00/model_optim_rng.pt")), weights_only=False)["model"]
    full = dict(legacy.groups())["layer 1"]["decoder.layers.1.mlp.experts.linear_fc2.weight"]
    for e in range(4):
        assert torch.equal(full[e], raw[f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc2.weight"])


def test_megatron_moe_to_megafast_and_hf_match_megatron(megatron_moe, tmp_path):
    from transformers import AutoModelForCausalLM

    out, ref = megatron_moe
    cases = []
    for fmt in FORMATS:
        ckpt = tmp_path / f"megafast_{fmt}"
        convert("megatron", "megafast", out / fmt, ckpt)
        cases.append(((fmt, "converted"), str(ckpt), "megafast", ref["prompt"], ref["tokens"], len(ref["greedy"])))
        cases.append(((fmt, "direct"), str(out / fmt), "megatron", ref["prompt"], ref["tokens"], len(ref["greedy"])))
        hf_dir = tmp_path / f"hf_{fmt}"
        convert("megatron", "hf", out / fmt, hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        assert model.config.model_type == "mixtral"
        with torch.no_grad():
            assert_close(model(ref["tokens"]).logits, ref["logits"], 1e-5, f"{fmt} -> HF Mixtral vs Megatron")
    results = run_distributed(_megafast_worker, 1, cases)[0]
    for (fmt, how), (greedy, logits) in results.items():
        assert_close(logits, ref["logits"], 1e-5, f"{fmt} {how}: megafast vs Megatron logits")
        assert greedy == ref["greedy"], f"{fmt} {how}: megafast greedy {greedy} != Megatron {ref['greedy']}"


def test_megatron_moe_saver_is_read_by_megatron_lm(megatron_moe, tmp_path):
    """megafast -> --saver megatron (legacy, SequentialMLP names) -> Megatron-LM's own
    load_checkpoint (strict) -> Megatron's forward = megafast's logits."""
    out, ref = megatron_moe
    ckpt = tmp_path / "megafast"
    convert("megatron", "megafast", out / "torch_dist", ckpt)
    saved = tmp_path / "megatron"
    convert("megafast", "megatron", ckpt, saved)
    assert open_megatron_checkpoint(str(saved)).config == open_megatron_checkpoint(str(out / "torch")).config
    back = tmp_path / "back"
    _wait(_run_worker(["--variant", "mixtral", "--num-layers", str(LAYERS), "--out", str(back), "--load", str(saved)]),
          "Megatron-LM load_checkpoint")
    loaded = torch.load(back / "loaded.pt")
    megafast = run_distributed(_megafast_worker, 1, [("m", str(ckpt), "megafast", ref["prompt"], ref["tokens"],
                                                       len(ref["greedy"]))])[0]["m"]
    assert_close(loaded["logits"], megafast[1], 1e-5, "Megatron-LM's load of --saver megatron vs megafast")
    assert loaded["greedy"] == megafast[0] == ref["greedy"]


def test_unsupported_megatron_moe_args_are_one_line_errors(megatron_moe, tmp_path):
    """A Megatron MoE feature megafast does not implement is refused with one line naming it."""
    out, _ = megatron_moe
    legacy = tmp_path / "legacy"
    shutil.copytree(out / "torch", legacy)
    (path,) = legacy.glob("iter_*/mp_rank_00/model_optim_rng.pt")
    original = torch.load(path, weights_only=False)  # megatron-core is installed here: real classes
    cases = [
        ("moe_router_topk_scaling_factor", 2.5, "moe_router_topk_scaling_factor=2.5"),
        ("moe_router_enable_expert_bias", True, "moe_router_enable_expert_bias=True"),
        ("expert_model_parallel_size", 2, "expert_model_parallel_size=2"),
    ]
    for name, value, expected in cases:
        ckpt = torch.load(path, weights_only=False)
        setattr(ckpt["args"], name, value)
        torch.save(ckpt, path)
        target = tmp_path / f"out_{name}"
        line = _one_line_error(["--loader", "megatron", "--saver", "megafast", "--load-dir", str(legacy),
                                "--save-dir", str(target)])
        assert expected in line, f"{name}: {line}"
        assert not (target / "latest_checkpointed_iteration.txt").exists()
        torch.save(original, path)
