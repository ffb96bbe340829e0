"""Checkpoint conversion (issue 6): HF <-> megafast at every layout, re-sharding, errors, tokenizers.

Tiny random HF models (tests/hf_models.py: Llama GQA untied and tied, Mistral, Qwen2 with QKV
bias, GPT-2; safetensors single/sharded and pytorch_model.bin single/sharded) are converted to
megafast at (TP, PP) in {(1,1), (2,1), (1,2), (2,2)}; one 4-rank gloo spawn loads every one of
them with the training loader and runs the stages, and the logits must equal transformers'
within 1e-4 relative. Exports back to HF must reproduce every tensor bit for bit with the same
config.json meaning; megafast re-sharding (2,2) -> (1,1) -> (2,1) must keep every gathered tensor.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import hf_models
import pytest
import torch
from dist import run_distributed
from tp_shards import chunk_unshard, megatron_partition

from megafast.checkpoint.args import config_from_args
from megafast.checkpoint.reader import MegafastCheckpointReader
from megafast.convert.converter import ConvertOptions, convert_checkpoint, finetune_flags
from megafast.convert.reshard import reshard_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def to_megafast(hf_dir: str, out: str, tp: int, pp: int, **kw) -> str:
    return convert_checkpoint(
        ConvertOptions(
            "hf",
            "megafast",
            hf_dir,
            out,
            target_tensor_parallel_size=tp,
            target_pipeline_parallel_size=pp,
            progress=False,
            **kw,
        )
    )


def to_hf(ckpt: str, out: str, **kw) -> str:
    return convert_checkpoint(ConvertOptions("megafast", "hf", ckpt, out, progress=False, **kw))


def checkpoint_args(ckpt: str) -> dict:
    path = glob.glob(os.path.join(ckpt, "*", "mp_rank_*", "model_optim_rng.pt"))[0]
    return torch.load(path, map_location="cpu", weights_only=False)["args"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (HF model, HF dir, ids, HF logits, {(tp, pp): megafast checkpoint dir})."""
    root = tmp_path_factory.mktemp("convert")
    ids = torch.randint(0, hf_models.VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    out = {}
    for i, name in enumerate(hf_models.NAMES):
        model = hf_models.build(name, seed=i)
        hf_dir = str(root / f"{name}_hf")
        hf_models.save(model, name, hf_dir)
        with torch.no_grad():
            logits = model(ids).logits
        ckpts = {}
        for tp, pp in LAYOUTS:
            ckpts[(tp, pp)] = str(root / f"{name}_tp{tp}pp{pp}")
            to_megafast(hf_dir, ckpts[(tp, pp)], tp, pp)
        out[name] = (model, hf_dir, ids, logits, ckpts)
    return out


def logits_worker(rank: int, world: int, cases: list) -> dict:
    """Every (model, layout) case on this rank: load with the trainer's loader, run the stages."""
    from hf_models import forward_stages

    from megafast.config import ParallelConfig
    from megafast.parallel import ParallelState
    from megafast.pipeline.partition import build_model_chunks
    from megafast.training.checkpointing import load_checkpoint

    states, out = {}, {}
    for key, tp, pp, ckpt, args, ids in cases:
        if (tp, pp) not in states:
            states[(tp, pp)] = ParallelState.create(ParallelConfig(tp, pp))
        state = states[(tp, pp)]
        config = config_from_args(args)
        chunks = build_model_chunks(config, state, seed=3)
        loaded = load_checkpoint(ckpt, chunks, None, None, state, finetune=True)
        assert loaded is not None and loaded.iteration == 0
        logits = forward_stages(chunks[0].eval(), state, ids, config.vocab_size)
        if logits is not None and state.tp_rank == 0 and state.dp_rank == 0:
            out[key] = logits
    return out


def test_hf_to_megafast_logits_match_transformers_at_every_layout(models):
    cases = []
    for name, (_, _, ids, _, ckpts) in models.items():
        for (tp, pp), ckpt in ckpts.items():
            assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "release"
            names = sorted(os.listdir(os.path.join(ckpt, "release")))
            assert names == [f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(pp)]
            cases.append(((name, tp, pp), tp, pp, ckpt, checkpoint_args(ckpt), ids))
    results = {}
    for part in run_distributed(logits_worker, 4, cases):
        results.update(part)
    assert set(results) == {c[0] for c in cases}
    for (name, tp, pp), got in results.items():
        hf_models.assert_rel_close(got, models[name][3], 1e-4, f"{name} at TP={tp} PP={pp}")


def _hf_config_meaning(directory: str) -> dict:
    from transformers import AutoConfig

    d = AutoConfig.from_pretrained(directory, local_files_only=True).to_dict()
    for key in ("transformers_version", "_name_or_path"):
        d.pop(key, None)
    return d


def test_hf_megafast_hf_roundtrip_is_bit_identical(models, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    for name, (model, hf_dir, ids, logits, ckpts) in models.items():
        out = str(tmp_path / name)
        to_hf(ckpts[(2, 2)], out, max_shard_size="20KB")
        index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 1 and files[0].startswith("model-00001-of-")
        tensors = {}
        for file in files:
            with safe_open(os.path.join(out, file), framework="pt") as f:
                assert f.metadata() == {"format": "pt"}
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
        want = hf_models.hf_state_dict(model)
        assert set(tensors) == set(want) == set(index["weight_map"]), name
        for k, v in want.items():
            assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), (
                f"{name}: {k} differs after the round trip"
            )
        assert _hf_config_meaning(out) == _hf_config_meaning(hf_dir), name
        generation = json.load(open(os.path.join(out, "generation_config.json")))
        assert generation["eos_token_id"] == model.config.eos_token_id
        reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, logits), (
                f"{name}: the exported model computes differently"
            )


def _raw_model_tensors(ckpt: str) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """{(tp, pp): state dict} straight from the files (no megafast conversion code involved)."""
    out = {}
    for path in glob.glob(os.path.join(ckpt, "*", "mp_rank_*", "model_optim_rng.pt")):
        tp, pp = os.path.basename(os.path.dirname(path)).split("_")[2:]
        out[(int(tp), int(pp))] = torch.load(path, map_location="cpu", weights_only=False)["model"]
    return out


def _gather_by_hand(raw: dict, config, tp: int) -> dict[str, torch.Tensor]:
    """Full tensors from raw TP shards, by Megatron's partition rules written out (tp_shards.py)."""
    full = {}
    for (_, pp), sd in sorted(raw.items()):
        for name in sd:
            if name in full:
                continue
            parts = [raw[(t, pp)][name] for t in range(tp)]
            split = megatron_partition(name, config.activation == "swiglu")
            t = chunk_unshard(parts, *split) if split and tp > 1 else parts[0]
            vocab = name in ("embedding.word_embeddings.weight", "output_layer.weight")
            full[name] = t[: config.vocab_size] if vocab else t
    return full


def test_megafast_reshard_chain_keeps_every_gathered_tensor(models, tmp_path):
    for name, (_, _, _, _, ckpts) in models.items():
        source = ckpts[(2, 2)]
        one = reshard_checkpoint(source, str(tmp_path / f"{name}_11"), 1, 1, progress=False)
        two = reshard_checkpoint(
            str(tmp_path / f"{name}_11"), str(tmp_path / f"{name}_21"), 2, 1, progress=False
        )
        assert one.endswith("release") and two.endswith("release")
        config = config_from_args(checkpoint_args(source))
        want = _gather_by_hand(_raw_model_tensors(source), config, 2)
        got11 = _gather_by_hand(_raw_model_tensors(str(tmp_path / f"{name}_11")), config, 1)
        got21 = _gather_by_hand(_raw_model_tensors(str(tmp_path / f"{name}_21")), config, 2)
        for got, where in ((got11, "(1,1)"), (got21, "(2,1)")):
            assert set(got) - {"output_layer.weight"} == set(want) - {"output_layer.weight"}, (name, where)
            for k, v in got.items():
                assert torch.equal(v, want[k]), f"{name}: {k} changed when re-sharding to {where}"
        args = checkpoint_args(str(tmp_path / f"{name}_21"))
        assert (args["tensor_model_parallel_size"], args["pipeline_model_parallel_size"]) == (2, 1)
        reader = MegafastCheckpointReader(str(tmp_path / f"{name}_21"))
        assert reader.config == config and (reader.tp, reader.pp) == (2, 1)


def test_converted_checkpoint_starts_a_pretrain_gpt_run(models, tmp_path):
    """pretrain_gpt.py --load DIR --finetune on an HF conversion (lr 0: the weights must come back
    unchanged), then the trained checkpoint re-shards (1,1) -> (2,2) -> (1,1) exactly."""
    ckpt = models["llama_gqa"][4][(1, 1)]
    out = str(tmp_path / "run")
    cmd = [
        sys.executable,
        "pretrain_gpt.py",
        *finetune_flags(ckpt),
        "--seq-length",
        "16",
        "--micro-batch-size",
        "2",
        "--train-iters",
        "1",
        "--lr",
        "0.0",
        "--weight-decay",
        "0.0",
        "--mock-data",
        "--eval-iters",
        "0",
        "--save",
        out,
        "--log-interval",
        "1",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded checkpoint" in proc.stdout + proc.stderr
    before, after = _raw_model_tensors(ckpt)[(0, 0)], _raw_model_tensors(out)[(0, 0)]
    assert set(before) == set(after)
    for k in before:
        assert torch.equal(before[k], after[k]), (
            f"{k} changed in a zero-lr run: the checkpoint was not loaded"
        )
    reshard_checkpoint(out, str(tmp_path / "run22"), 2, 2, progress=False)
    reshard_checkpoint(str(tmp_path / "run22"), str(tmp_path / "run11"), 1, 1, progress=False)
    again = _raw_model_tensors(str(tmp_path / "run11"))[(0, 0)]
    assert all(torch.equal(again[k], after[k]) for k in after)
    args = checkpoint_args(str(tmp_path / "run11"))
    assert open(os.path.join(tmp_path / "run11", "latest_checkpointed_iteration.txt")).read() == "1"
    assert args["lr"] == 0.0 and args["tensor_model_parallel_size"] == 1  # training args kept, layout updated


def test_target_dtype_and_layout_defaults(models, tmp_path):
    _, hf_dir, _, _, ckpts = models["qwen2"]
    to_megafast(hf_dir, str(tmp_path / "bf16"), 2, 1, target_params_dtype="bf16")
    raw = _raw_model_tensors(str(tmp_path / "bf16"))
    assert all(t.dtype == torch.bfloat16 for sd in raw.values() for t in sd.values())
    assert checkpoint_args(str(tmp_path / "bf16"))["bf16"] is True
    # megafast -> megafast with no target sizes keeps the source layout
    reshard = convert_checkpoint(
        ConvertOptions("megafast", "megafast", ckpts[(1, 2)], str(tmp_path / "same"), progress=False)
    )
    assert sorted(os.listdir(reshard)) == ["mp_rank_00_000", "mp_rank_00_001"]


# ----------------------------------------------------------------------------------- errors


def _copy_hf(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_clear_errors(models, tmp_path):
    _, hf_dir, _, _, ckpts = models["llama_gqa"]

    bad = _copy_hf(hf_dir, str(tmp_path / "arch"))
    cfg = json.load(open(os.path.join(bad, "config.json")))
    json.dump(
        {**cfg, "architectures": ["FalconForCausalLM"], "model_type": "falcon"},
        open(os.path.join(bad, "config.json"), "w"),
    )
    with pytest.raises(ValueError, match=r"architecture \['FalconForCausalLM'\] is not supported"):
        to_megafast(bad, str(tmp_path / "o1"), 1, 1)

    bad = _copy_hf(hf_dir, str(tmp_path / "shard"))
    os.remove(
        os.path.join(bad, "model-00002-of-%05d.safetensors" % len(glob.glob(os.path.join(bad, "model-*"))))
    )
    with pytest.raises(
        ValueError, match=r"shard\(s\) model-00002-of-\d+\.safetensors listed in .* are missing"
    ):
        to_megafast(bad, str(tmp_path / "o2"), 1, 1)

    bad = _copy_hf(hf_dir, str(tmp_path / "shape"))
    json.dump({**cfg, "intermediate_size": 64}, open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(
        ValueError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[48, 32\]"
    ):
        to_megafast(bad, str(tmp_path / "o3"), 1, 1)

    with pytest.raises(ValueError, match="tensor parallel size 4 does not divide 2 query groups"):
        to_megafast(hf_dir, str(tmp_path / "o4"), 4, 1)

    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="is not empty: .* --overwrite"):
        to_megafast(hf_dir, str(target), 1, 1)
    to_megafast(hf_dir, str(target), 1, 1, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "release").is_dir()

    for key, value, what in (
        (
            "rope_scaling",
            {"rope_type": "dynamic", "factor": 2.0},  # llama3/linear/yarn convert (tests/test_hf_families.py)
            "RoPE scaling",
        ),
        ("hidden_act", "gelu", "silu"),
    ):
        bad = str(tmp_path / f"feature_{key}")
        if not os.path.isdir(bad):
            _copy_hf(hf_dir, bad)
        json.dump(
            {**{k: v for k, v in cfg.items() if k != "rope_parameters"}, key: value},
            open(os.path.join(bad, "config.json"), "w"),
        )
        with pytest.raises(ValueError, match=f"{key}=.*{what}.*cannot be converted exactly"):
            to_megafast(bad, str(tmp_path / f"o_{key}"), 1, 1)

    bad = _copy_hf(models["qwen2"][1], str(tmp_path / "window"))  # a window on some layers only
    qcfg = json.load(open(os.path.join(bad, "config.json")))
    qcfg.pop("layer_types", None)
    qcfg.update(use_sliding_window=True, sliding_window=16, max_window_layers=2)
    json.dump(qcfg, open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(ValueError, match="max_window_layers=2 .*mixed"):
        to_megafast(bad, str(tmp_path / "o6"), 1, 1)

    import shutil

    broken = str(tmp_path / "broken_ckpt")
    shutil.copytree(ckpts[(2, 2)], broken)
    os.remove(os.path.join(broken, "release", "mp_rank_01_001", "model_optim_rng.pt"))
    with pytest.raises(ValueError, match="is missing release/mp_rank_01_001/model_optim_rng.pt"):
        to_hf(broken, str(tmp_path / "o7"))

    with pytest.raises(ValueError, match="--loader hf --saver hf converts nothing"):
        convert_checkpoint(ConvertOptions("hf", "hf", hf_dir, str(tmp_path / "o8"), progress=False))


def test_convert_tool_reports_errors_in_one_line(models, tmp_path):
    hf_dir = models["llama_gqa"][1]
    cmd = [
        sys.executable,
        "tools/checkpoint/convert.py",
        "--model-type",
        "GPT",
        "--loader",
        "hf",
        "--saver",
        "megafast",
        "--load-dir",
        hf_dir,
        "--save-dir",
        str(tmp_path / "o"),
        "--target-tensor-parallel-size",
        "3",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: tensor parallel size 3 does not divide")
    ok = subprocess.run(
        cmd[:-3] + ["--target-pipeline-parallel-size", "2", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "pretrain_gpt.py --load" in ok.stdout and "--num-query-groups 2" in ok.stdout


# ------------------------------------------------------------------------------ key maps / tokenizer


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_layout_partition_matches_the_model_parameters(kind):
    from megafast.checkpoint import layout
    from megafast.config import GPTConfig
    from megafast.model import GPTModel

    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=50)
    if kind == "llama":
        base.update(
            num_query_groups=2,
            position_embedding_type="rope",
            normalization="RMSNorm",
            activation="swiglu",
            add_bias_linear=False,
            add_qkv_bias=True,
            tie_embeddings=False,
        )
    config = GPTConfig(**base)
    params = dict(GPTModel(config).named_parameters())
    specs = {n: s for _, group in layout.groups(config) for n, s in group.items()}
    assert set(specs) == set(params)
    for name, p in params.items():
        split = layout.tp_partition(name, config)
        attrs = (p.partition_dim, p.partition_stride) if getattr(p, "tensor_model_parallel", False) else None
        assert split == attrs, name
        if name in layout.VOCAB_TENSORS:  # Megatron pads 50 up to a multiple of 128 (x TP 1): 128 rows
            assert specs[name] == (50, 32) and tuple(p.shape) == (128, 32), name
        else:
            assert tuple(p.shape) == specs[name], name


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_export_encodes_like_sentencepiece(tmp_path, model_type):
    import inspect
    import json as json_module

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megafast.convert.hf_tokenizer import export_tokenizer

    texts = [inspect.getsource(m) for m in (json_module, subprocess, glob)]
    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=600,
        model_type=model_type,
        minloglevel=2,
        num_threads=1,
    )
    out = tmp_path / "hf"
    out.mkdir()
    ids = export_tokenizer("SentencePieceTokenizer", str(tmp_path / "sp.model"), None, None, str(out), 128)
    assert ids == {"bos_token_id": 1, "eos_token_id": 2}
    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    samples = [t[:3000] for t in texts] + [
        "  leading   and trailing spaces  ",
        "tabs\tand\nnewlines",
        "ünïcødé ½ ﬁ",
    ]
    for text in samples:
        want = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False) == want
        assert hf.decode(want) == sp.decode(want)
    assert hf.eos_token_id == sp.eos_id()
