"""``tools/checkpoint/convert.py --saver hf --lora-format peft`` (issue 16, acceptance 6).

LoRA runs (started from tiny HF models with ``--pretrained-checkpoint HF_DIR``) are exported as a
PEFT adapter plus their unmerged base, and as the merged model. References: ``peft`` itself
(``PeftModel.from_pretrained(base, adapter_dir)``) computes logits equal to transformers on the
merged export to 1e-5 (Llama with GQA: fused QKV and SwiGLU fc1 split into q/k/v and gate/up
adapters; GPT-2: Conv1D and its fused c_attn; QLoRA: the base is the NF4 round trip); the split of
the fused adapters is rebuilt here by hand from the checkpoint's tensors; a TP = 2 checkpoint cut
here from the TP = 1 one by the documented layout exports the same adapter, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import hf_models
import pytest
import torch
from pretrain_run import convert_tool, pretrain_in_process


TRAIN = ["--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "2e-2",
         "--train-iters", "3", "--log-interval", "1", "--eval-iters", "0", "--mock-data", "--device", "cpu",
         "--seed", "11", "--attention-dropout", "0", "--hidden-dropout", "0", "--vocab-size", str(hf_models.VOCAB),
         "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.05"]


def _flags(hf_dir: Path) -> list[str]:
    from megafast.convert.converter import HFSource, model_flags

    return model_flags(HFSource(str(hf_dir), 1).config)




CASES = {  # name -> (HF family of hf_models, extra run flags)
    "llama": ("llama_gqa", []),
    "qlora": ("llama_gqa", ["--qlora", "--qlora-block-size", "16"]),
    "gpt2": ("gpt2", ["--lora-target-modules", "linear_qkv", "linear_proj"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (HF base directory, LoRA checkpoint of a 3-iteration run from it)."""
    root = tmp_path_factory.mktemp("peft")
    out = {}
    for name, (family, extra) in CASES.items():
        hf_dir = root / f"{family}_hf"
        if not hf_dir.exists():
            hf_models.save(hf_models.build(family, seed=5), family, str(hf_dir))
        ckpt = root / f"{name}_lora"
        pretrain_in_process(_flags(hf_dir) + TRAIN + extra + ["--pretrained-checkpoint", str(hf_dir), "--save", str(ckpt)])
        out[name] = hf_dir, ckpt
    return out


def _exports(ckpt: Path, tmp: Path) -> tuple[Path, Path]:
    peft_dir, merged = tmp / "peft", tmp / "merged"
    convert_tool(["--loader", "megafast", "--saver", "hf", "--lora-format", "peft", "--load-dir", str(ckpt),
              "--save-dir", str(peft_dir)])
    convert_tool(["--loader", "megafast", "--saver", "hf", "--load-dir", str(ckpt), "--save-dir", str(merged)])
    return peft_dir, merged


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("name", list(CASES))
def test_peft_adapter_on_its_base_equals_the_merged_export(runs, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt = runs[name]
    peft_dir, merged = _exports(ckpt, tmp_path)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    targets = {"llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
               "gpt2": ["attn.c_proj", "c_attn"]}[CASES[name][0].split("_")[0]]
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.05)
    assert config["target_modules"] == targets and config["fan_in_fan_out"] == (name == "gpt2")
    assert config["base_model_name_or_path"] == str((peft_dir / "base").resolve())

    ids = torch.randint(0, hf_models.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(str(peft_dir / "base"), dtype=torch.float32)
    plain = _logits(base, ids)
    adapted = _logits(PeftModel.from_pretrained(base, str(peft_dir)), ids)
    want = _logits(AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32), ids)
    hf_models.assert_rel_close(adapted, want, 1e-5, f"{name}: PEFT adapter vs merged export")
    assert ((plain - want).abs().max() / want.abs().max()).item() > 1e-3, "the adapters changed nothing"

    original = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(str(peft_dir / "base"), dtype=torch.float32).state_dict()
    q = "transformer.h.0.attn.c_attn.weight" if name == "gpt2" else "model.layers.0.self_attn.q_proj.weight"
    embed = "transformer.wte.weight" if name == "gpt2" else "model.embed_tokens.weight"
    assert torch.equal(exported[embed], original[embed])  # never adapted: the HF weights themselves
    if name == "qlora":  # the base the adapters were trained on: NF4 blocks of 16 hold 16 levels each
        assert not torch.equal(exported[q], original[q])
        levels = [block.unique().numel() for block in exported[q].reshape(-1, 16)]
        assert max(levels) <= 16
    else:
        assert torch.equal(exported[q], original[q])


def _checkpoint_file(ckpt: Path) -> dict:
    return torch.load(ckpt / "iter_0000003" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)


def test_fused_adapters_split_into_q_k_v_and_gate_up_by_hand(runs, tmp_path):
    """PEFT's q/k/v share the fused adapter's A and take its rows of B: per query group g of 2, the
    group's 2 query heads, then its k head, then its v head (8 rows each); gate/up: B's two halves."""
    from safetensors.torch import load_file

    _, ckpt = runs["llama"]
    peft_dir, _ = _exports(ckpt, tmp_path)
    got = load_file(str(peft_dir / "adapter_model.safetensors"))
    model = _checkpoint_file(ckpt)["model"]
    p, d = "decoder.layers.1.", 8
    a, b = model[f"{p}self_attention.linear_qkv.adapter.linear_in.weight"], model[f"{p}self_attention.linear_qkv.adapter.linear_out.weight"]
    q_rows, k_rows, v_rows = [], [], []
    for g in range(2):
        start = g * 4 * d  # (2 q heads + k + v) x d rows per group
        q_rows += range(start, start + 2 * d)
        k_rows += range(start + 2 * d, start + 3 * d)
        v_rows += range(start + 3 * d, start + 4 * d)
    h = "base_model.model.model.layers.1."
    for proj, rows in (("q_proj", q_rows), ("k_proj", k_rows), ("v_proj", v_rows)):
        assert torch.equal(got[f"{h}self_attn.{proj}.lora_A.weight"], a)
        assert torch.equal(got[f"{h}self_attn.{proj}.lora_B.weight"], b[rows])
    a, b = model[f"{p}mlp.linear_fc1.adapter.linear_in.weight"], model[f"{p}mlp.linear_fc1.adapter.linear_out.weight"]
    assert torch.equal(got[f"{h}mlp.gate_proj.lora_B.weight"], b[:48]) and torch.equal(got[f"{h}mlp.up_proj.lora_B.weight"], b[48:])
    assert torch.equal(got[f"{h}mlp.gate_proj.lora_A.weight"], a) and torch.equal(got[f"{h}mlp.up_proj.lora_A.weight"], a)
    assert torch.equal(got[f"{h}self_attn.o_proj.lora_B.weight"], model[f"{p}self_attention.linear_proj.adapter.linear_out.weight"])
    assert len(got) == 4 * 7 * 2  # 4 layers x 7 modules x (A, B)


def _cut_tp2(src: Path, dst: Path) -> None:
    """The TP = 1 LoRA checkpoint as TP = 2 rank files, cut by megafast.model.lora's layout: column
    layers (qkv: contiguous rows; SwiGLU fc1: [gate_r; up_r]) keep A whole and split B's rows, row
    layers (proj, fc2) split A's columns and keep B whole."""
    ckpt = _checkpoint_file(src)
    for r in range(2):
        model = {}
        for name, t in ckpt["model"].items():
            if ".linear_qkv." in name and name.endswith("linear_out.weight"):
                t = t.chunk(2, dim=0)[r]
            elif ".linear_fc1." in name and name.endswith("linear_out.weight"):
                gate, up = t.chunk(2, dim=0)
                t = torch.cat([gate.chunk(2, dim=0)[r], up.chunk(2, dim=0)[r]])
            elif (".linear_proj." in name or ".linear_fc2." in name) and name.endswith("linear_in.weight"):
                t = t.chunk(2, dim=1)[r]
            model[name] = t.clone()
        args = dict(ckpt["args"], tensor_model_parallel_size=2)
        out = {"model": model, "lora": ckpt["lora"], "iteration": 3, "consumed_samples": ckpt["consumed_samples"],
               "args": args, "checkpoint_version": 3.0,
               "parallel_layout": dict(ckpt["parallel_layout"], tensor_model_parallel_size=2)}
        path = dst / "iter_0000003" / f"mp_rank_{r:02d}_000" / "model_optim_rng.pt"
        path.parent.mkdir(parents=True)
        torch.save(out, path)
    (dst / "latest_checkpointed_iteration.txt").write_text("3")


def test_tp2_checkpoint_exports_the_same_adapter_and_base(runs, tmp_path):
    from safetensors.torch import load_file

    _, ckpt = runs["llama"]
    tp2 = tmp_path / "tp2"
    _cut_tp2(ckpt, tp2)
    one, _ = _exports(ckpt, tmp_path / "one")
    two, _ = _exports(tp2, tmp_path / "two")
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("model-00001-of-00001.safetensors", "config.json"):
        assert (one / "base" / f).read_bytes() == (two / "base" / f).read_bytes()


def test_errors_are_one_line(runs, tmp_path):
    hf_dir, ckpt = runs["llama"]
    with pytest.raises(SystemExit, match=r"^error: --lora-format applies to --loader megafast --saver hf"):
        convert_tool(["--loader", "hf", "--saver", "megafast", "--lora-format", "peft", "--load-dir", str(hf_dir),
                  "--save-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match=r"contradict each other"):
        convert_tool(["--loader", "megafast", "--saver", "hf", "--merge-lora", "--lora-format", "peft", "--load-dir",
                  str(ckpt), "--save-dir", str(tmp_path / "y")])
    full = tmp_path / "full"
    convert_tool(["--loader", "hf", "--saver", "megafast", "--load-dir", str(hf_dir), "--save-dir", str(full)])
    with pytest.raises(SystemExit, match=r"--lora-format peft: .* holds no LoRA adapters \(a full model\): drop the flag"):
        convert_tool(["--loader", "megafast", "--saver", "hf", "--lora-format", "peft", "--load-dir", str(full),
                  "--save-dir", str(tmp_path / "z")])
