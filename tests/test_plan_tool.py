"""tools/plan.py: Megatron flags or an HF config.json in, a ranked table or JSON out, errors in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megafast.planner import total_parameter_count
from megafast.planner.memory import GB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "plan.py")
LLAMA_70B = (
    "--num-layers 80 --hidden-size 8192 --num-attention-heads 64 --group-query-attention "
    "--num-query-groups 8 --ffn-hidden-size 28672 --swiglu --normalization RMSNorm "
    "--position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights "
    "--vocab-size 128256 --seq-length 4096 --hidden-dropout 0 --global-batch-size 1024"
).split()


@pytest.fixture(scope="module")
def plan_tool():
    spec = importlib.util.spec_from_file_location("plan_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_json_for_70b_on_64_gpus():
    out = run_tool(*LLAMA_70B, "--num-gpus", "64", "--gpu-memory-gb", "80", "--tokens", "2T", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["model"]["parameters"] == 70_553_706_496  # Llama-3-70B's count
    usable = 80 * 0.9
    assert plan["feasible"] and all(e["fits"] and e["memory_gb"]["total"] <= usable for e in plan["feasible"])
    speeds = [e["tokens_per_s"] for e in plan["feasible"]]
    assert speeds == sorted(speeds, reverse=True)
    best = plan["feasible"][0]
    assert best["days"] == pytest.approx(2e12 / best["tokens_per_s"] / 86400)
    assert best["tflops_per_gpu"] == pytest.approx(best["mfu"] * 989.0)
    pure_dp = [e for e in plan["rejected"] if e["layout"]["tp"] == 1 and e["layout"]["pp"] == 1]
    assert pure_dp and all(not e["fits"] and e["reason"].startswith("needs ") for e in pure_dp)


def test_table_with_rejected_layouts_fixed_tp(plan_tool, capsys):
    assert (
        plan_tool.main(
            [
                *LLAMA_70B,
                "--num-gpus",
                "64",
                "--tensor-model-parallel-size",
                "8",
                "--micro-batch-size",
                "1",
                "--show-rejected",
                "--tokens",
                "300B",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "70.55B parameters" in text and "layouts fit, fastest first" in text and "days" in text
    assert "rejected layouts" in text and "why not" in text and "GB usable of 80 GB" in text


def test_hf_config_matches_transformers(plan_tool, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cases = {
        "llama": (
            transformers.LlamaConfig(
                vocab_size=1000,
                hidden_size=64,
                num_attention_heads=8,
                num_key_value_heads=2,
                num_hidden_layers=3,
                intermediate_size=160,
                max_position_embeddings=128,
                tie_word_embeddings=True,
            ),
            transformers.LlamaForCausalLM,
        ),
        "qwen2": (
            transformers.Qwen2Config(
                vocab_size=1000,
                hidden_size=64,
                num_attention_heads=8,
                num_key_value_heads=4,
                num_hidden_layers=2,
                intermediate_size=160,
                max_position_embeddings=128,
                tie_word_embeddings=False,
            ),
            transformers.Qwen2ForCausalLM,
        ),
        "gpt2": (
            transformers.GPT2Config(vocab_size=1000, n_embd=64, n_head=8, n_layer=2, n_positions=128),
            transformers.GPT2LMHeadModel,
        ),
    }
    for name, (hf_config, cls) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(hf_config.to_json_string())
        config = plan_tool.config_from_hf(json.loads(path.read_text()))
        assert total_parameter_count(config, padded=False) == sum(
            p.numel() for p in cls(hf_config).parameters()
        ), name
        assert (
            plan_tool.main(
                ["--hf-config", str(path), "--num-gpus", "2", "--global-batch-size", "8", "--json"]
            )
            == 0
        )
        plan = json.loads(capsys.readouterr().out)
        assert plan["seq_length"] == 128 and plan["feasible"]
        assert plan["model"]["parameters"] == total_parameter_count(config, padded=False)


def test_nothing_fits_explains_the_closest_layouts(plan_tool, capsys):
    assert plan_tool.main([*LLAMA_70B, "--num-gpus", "8", "--micro-batch-size", "1", "--data-parallel-sharding-strategy",
                           "optim", "--no-optimizer-cpu-offload"]) == 0
    text = capsys.readouterr().out
    assert "0 layouts fit" in text and "no layout fits" in text and "needs " in text


def test_user_errors_are_one_line(plan_tool, tmp_path):
    out = run_tool("--num-gpus", "8", "--num-layers", "2")
    assert out.returncode == 1
    expected = (
        "error: give --hf-config, or the model flags --hidden-size, --num-attention-heads, --vocab-size, "
        "--seq-length"
    )
    assert out.stderr.strip().splitlines() == [expected]
    with pytest.raises(SystemExit, match="cannot read --hf-config"):
        plan_tool.main(["--hf-config", str(tmp_path / "missing.json"), "--num-gpus", "8"])
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    with pytest.raises(SystemExit, match="has no 'hidden_size' entry"):
        plan_tool.main(["--hf-config", str(partial), "--num-gpus", "8"])
    bad = tmp_path / "t5.json"
    bad.write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(SystemExit, match="model_type 't5' is not supported"):
        plan_tool.main(["--hf-config", str(bad), "--num-gpus", "8"])
    with pytest.raises(SystemExit, match="compute_efficiency must be in"):
        plan_tool.main([*LLAMA_70B, "--num-gpus", "8", "--compute-efficiency", "2"])
    with pytest.raises(SystemExit):
        plan_tool.main([*LLAMA_70B, "--num-gpus", "8", "--tokens", "lots"])
    assert plan_tool.token_count("2T") == 2e12 and plan_tool.token_count("1.5e9") == 1.5e9


def test_memory_column_is_the_breakdown_total(plan_tool, capsys):
    assert (
        plan_tool.main(
            [
                *LLAMA_70B,
                "--num-gpus",
                "64",
                "--tensor-model-parallel-size",
                "8",
                "--pipeline-model-parallel-size",
                "4",
                "--micro-batch-size",
                "1",
                "--recompute-granularity",
                "none",
                "--use-distributed-optimizer",
                "--data-parallel-sharding-strategy",
                "optim",
                "--json",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    (only,) = plan["feasible"]
    m = only["memory_gb"]
    parts = m["weights"] + m["gradients"] + m["master_weights"] + m["optimizer_states"] + m["activations"]
    assert parts == pytest.approx(m["total"])
    assert only["layout"]["tp"] == 8 and only["layout"]["pp"] == 4 and only["layout"]["distributed_optimizer"]
    assert m["total"] < 80 * 0.9 and GB == 1e9


def test_recompute_method_and_fused_loss_flags(plan_tool, capsys):
    """block recompute of 2 layers keeps more than uniform (every layer checkpointed) and runs
    faster; the fused linear + cross-entropy keeps less on the last stage."""

    def best(*flags: str, pp: str = "4") -> dict:
        argv = [*LLAMA_70B, "--num-gpus", "64", "--tensor-model-parallel-size", "8",
                "--pipeline-model-parallel-size", pp, "--micro-batch-size", "1",
                "--no-distributed-optimizer", "--gpu-memory-gb", "1000", "--json", *flags]
        assert plan_tool.main(argv) == 0
        (layout,) = json.loads(capsys.readouterr().out)["feasible"]
        return layout

    uniform = best("--recompute-granularity", "full")
    block = best("--recompute-granularity", "full", "--recompute-method", "block",
                 "--recompute-num-layers", "2")
    assert block["layout"]["recompute_method"] == "block" and block["layout"]["recompute_num_layers"] == 2
    assert block["memory_gb"]["activations"] > uniform["memory_gb"]["activations"]
    assert block["tokens_per_s"] > uniform["tokens_per_s"]
    plain = best("--recompute-granularity", "none", pp="1")
    fused = best("--recompute-granularity", "none", "--fused-linear-cross-entropy", pp="1")
    assert fused["memory_gb"]["activations"] < plain["memory_gb"]["activations"]


def test_without_num_gpus_reports_size_and_memory(plan_tool, tmp_path, capsys):
    """No --num-gpus: parameters, memory per module and per GPU for each TP x PP x recompute
    strategy. Module parameters equal transformers' modules; bytes follow the per-parameter rule
    (bf16 weights 2, fp32 gradients 4, fp32 masters 4, Adam moments 8 + a 4-byte step per tensor)."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=1024,  # a multiple of 128: megafast's padded vocabulary is the same
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=4,
        intermediate_size=160,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    path = tmp_path / "config.json"
    path.write_text(hf_config.to_json_string())
    assert plan_tool.main(["--hf-config", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    model = transformers.LlamaForCausalLM(hf_config)
    assert plan["model"]["parameters"] == sum(p.numel() for p in model.parameters())

    def count(*modules) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    layers = model.model.layers
    expected = {  # module -> (parameters, megafast tensors: fused QKV, [gate; up] fc1)
        "embedding": (count(model.model.embed_tokens), 1),
        "attention": (count(*(layer.self_attn for layer in layers)), 2 * len(layers)),
        "mlp": (count(*(layer.mlp for layer in layers)), 2 * len(layers)),
        "norms": (count(*(m for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm))),
                  2 * len(layers)),
        "final_norm": (count(model.model.norm), 1),
        "output_layer": (count(model.lm_head), 1),
    }
    modules = {m["module"]: m for m in plan["modules"]}
    assert set(modules) == set(expected)
    for name, (params, tensors) in expected.items():
        m = modules[name]
        assert m["parameters"] == params, name
        assert m["count"] == (4 if name in ("attention", "mlp", "norms") else 1), name
        gb = m["memory_gb"]
        assert gb["weights"] * 1e9 == pytest.approx(2 * params), name
        assert gb["gradients"] * 1e9 == pytest.approx(4 * params), name
        assert gb["master_weights"] * 1e9 == pytest.approx(4 * params), name
        assert gb["optimizer_states"] * 1e9 == pytest.approx(8 * params + 4 * tensors), name

    by_layout = {(s["layout"]["tp"], s["layout"]["pp"], s["layout"]["recompute"]): s for s in plan["strategies"]}
    assert {(t, p) for t, p, _ in by_layout} == {(t, p) for t in (1, 2, 4, 8) for p in (1, 2, 4)}
    assert "does not divide 2 query groups" in by_layout[(4, 1, None)]["reason"]  # 2 query groups: TP 4 and 8 impossible
    single = by_layout[(1, 1, None)]["memory_gb"]
    whole = sum(m["memory_gb"]["total"] for m in plan["modules"])
    assert single["weights"] + single["gradients"] + single["master_weights"] + single["optimizer_states"] == (
        pytest.approx(whole))
    assert single["activations"] > by_layout[(1, 1, "full")]["memory_gb"]["activations"] > 0
    assert by_layout[(2, 1, None)]["memory_gb"]["weights"] < single["weights"]
    assert by_layout[(1, 2, None)]["memory_gb"]["weights"] < single["weights"]
    assert all(s["fits"] for s in plan["strategies"] if "fits" in s)  # a tiny model on 80 GB

    tight = str(single["total"] * 0.99 / 0.9)  # GB (90% usable): TP = PP = 1 no longer fits
    assert plan_tool.main(["--hf-config", str(path), "--json", "--gpu-memory-gb", tight]) == 0
    fits = {(s["layout"]["tp"], s["layout"]["pp"], s["layout"]["recompute"]): s.get("fits")
            for s in json.loads(capsys.readouterr().out)["strategies"]}
    assert fits[(1, 1, None)] is False and fits[(2, 2, "full")] is True and fits[(4, 1, None)] is None

    assert plan_tool.main(["--hf-config", str(path)]) == 0
    text = capsys.readouterr().out
    assert "memory per module" in text and "memory per GPU" in text and "--num-gpus N adds" in text
    with pytest.raises(SystemExit, match="--tokens .* needs --num-gpus"):
        plan_tool.main(["--hf-config", str(path), "--tokens", "1T"])


def test_qlora_row_and_explanation(plan_tool, capsys):
    """The per-strategy table has a QLoRA row: Llama-3-70B's adapted weights in NF4 (0.5 byte per
    element + a 4-byte fp32 absmax per 64), the rest frozen in bf16, rank-16 adapters with fp32
    gradients, masters and Adam moments (counted here from the model's shapes); and the layout
    search says where QLoRA stands (70B on 8 GPUs without offload: no full-training layout fits,
    QLoRA does)."""
    assert plan_tool.main([*LLAMA_70B, "--json", "--tensor-model-parallel-size", "1",
                           "--pipeline-model-parallel-size", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)["sharding"]
    h, ffn, layers, vocab, r = 8192, 28672, 80, 128256, 16
    qkv_out = (64 + 2 * 8) * 128
    shapes = [(qkv_out, h), (h, h), (2 * ffn, h), (h, ffn)]  # [out, in] of qkv, proj, fc1 ([gate; up]), fc2
    nf4 = layers * sum(o * i for o, i in shapes)
    adapters = layers * sum(r * (o + i) for o, i in shapes)
    frozen = 2 * vocab * h + (2 * layers + 1) * h
    want = {
        "weights": nf4 // 2 + 4 * (nf4 // 64) + 2 * frozen + 2 * adapters,
        "gradients": 4 * adapters,
        "master_weights": 4 * adapters,
        "optimizer_states": 8 * adapters + 4 * 2 * len(shapes) * layers,
    }
    q = rows["qlora"]
    for key, value in want.items():
        assert q[key] * GB == pytest.approx(value, rel=1e-12), key
    assert q["total"] * GB == pytest.approx(sum(want.values()), rel=1e-12)
    assert q["total"] < rows["no_shard"]["total"] / 10  # ~48 GB against 1.1 TB

    assert plan_tool.main([*LLAMA_70B, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
                           "--lora-rank", "8"]) == 0
    assert "QLoRA (NF4 base, LoRA rank 8; fine-tuning)" in capsys.readouterr().out

    assert plan_tool.main([*LLAMA_70B, "--num-gpus", "8", "--micro-batch-size", "1", "--no-optimizer-cpu-offload",
                           "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not plan["feasible"]
    assert "no full-training layout fits; a QLoRA fine-tune holds" in plan["explanation"][-1]
    assert "which fits 72.0 GB usable" in plan["explanation"][-1]
    assert plan_tool.main([*LLAMA_70B, "--num-gpus", "64", "--tensor-model-parallel-size", "8",
                           "--micro-batch-size", "1"]) == 0
    text = capsys.readouterr().out
    assert "QLoRA (NF4 base + rank-16 adapters)" in text and "not a candidate here" in text
