"""Megatron-LM checkpoints in and out, against checkpoints megatron-core itself wrote.

tests/megatron_worker.py (a subprocess: Megatron-LM's own argument parser, megatron-core 0.19's
GPTModel, Megatron-LM's own ``save_checkpoint`` on CPU over gloo) writes each model in both
formats (legacy ``torch`` and ``torch_dist``) and records the Megatron model's own logits and
greedy continuation. Covered layouts: a GPT-2-style model (learned positions, LayerNorm, fused
bias-GELU, tied embeddings) at TP 1 / PP 1, a Llama-style one (RoPE, RMSNorm, SwiGLU, GQA,
untied) at TP 2 / PP 2. Skipped when megatron-core or Megatron-LM's sources are absent.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist import run_distributed

from megafast.checkpoint.megatron_format import megatron_format, open_megatron_checkpoint
from megafast.convert.converter import ConvertOptions, HFSource, convert_checkpoint, finetune_flags
from megafast.planner.parameters import total_parameter_count

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "megatron_worker.py"
MEGATRON_LM = os.environ.get("MEGATRON_LM_DIR", "/work/megatron-lm")
CASES = {"gpt": (1, 1), "llama": (2, 2)}  # variant -> Megatron's (tp, pp)
FORMATS = ("torch", "torch_dist")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("megatron.core") is None or not os.path.isdir(os.path.join(MEGATRON_LM, "megatron", "training")),
    reason="needs megatron-core and Megatron-LM's sources (megatron/training)",
)


def _run_worker(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MEGATRON_LM_DIR": MEGATRON_LM}
    return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=ROOT)


def _wait(proc: subprocess.Popen, what: str) -> None:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"{what} failed:\n{out[-4000:]}"


@pytest.fixture(scope="module")
def megatron(tmp_path_factory):
    """variant -> (directory with torch/, torch_dist/, reference.pt; reference dict)."""
    root = tmp_path_factory.mktemp("megatron")
    procs = {}
    for variant, (tp, pp) in CASES.items():
        out = root / variant
        procs[variant] = (out, _run_worker(["--variant", variant, "--tp", str(tp), "--pp", str(pp), "--out", str(out)]))
    result = {}
    for variant, (out, proc) in procs.items():
        _wait(proc, f"Megatron worker {variant}")
        result[variant] = (out, torch.load(out / "reference.pt"))
    return result


def convert(loader: str, saver: str, load: str, save: str, **kw) -> str:
    return convert_checkpoint(ConvertOptions(loader=loader, saver=saver, load_dir=str(load), save_dir=str(save),
                                             progress=False, **kw))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """max |a - e| <= tol * max |e| over the whole tensor."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol}"


def test_reader_sees_megatron_layout_and_config(megatron):
    for variant, (out, ref) in megatron.items():
        tp, pp = CASES[variant]
        for fmt in FORMATS:
            directory = str(out / fmt)
            assert megatron_format(directory) == fmt
            reader = open_megatron_checkpoint(directory)
            assert (reader.tp, reader.pp, reader.iteration) == (tp, pp, 7)
            config = reader.config
            assert config.vocab_size == 100 and config.num_layers == 4 and config.hidden_size == 64
            if variant == "llama":
                assert (config.num_query_groups, config.kv_channels, config.rotary_base) == (2, 16, 5000.0)
                assert (config.activation, config.normalization, config.norm_epsilon) == ("swiglu", "RMSNorm", 1e-6)
                assert not config.tie_embeddings and not config.add_bias_linear
            else:  # Megatron's default fused bias-GELU is the tanh approximation
                assert (config.activation, config.position_embedding_type) == ("gelu_tanh", "learned_absolute")
                assert config.tie_embeddings and config.add_bias_linear
    # the two formats hold the same tensors
    for variant, (out, _) in megatron.items():
        legacy, dist_ = (open_megatron_checkpoint(str(out / f)) for f in FORMATS)
        for (label, a), (_, b) in zip(legacy.groups(), dist_.groups()):
            assert a.keys() == b.keys()
            for name in a:
                assert torch.equal(a[name], b[name]), f"{variant} {name}: legacy and torch_dist differ"


def test_megatron_to_hf_logits_match_megatron(megatron, tmp_path):
    from transformers import AutoModelForCausalLM

    for variant, (out, ref) in megatron.items():
        for fmt in FORMATS:
            hf_dir = tmp_path / f"{variant}_{fmt}"
            convert("megatron", "hf", out / fmt, hf_dir)
            model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = model(ref["tokens"]).logits
            assert_close(logits, ref["logits"], 1e-5, f"{variant} {fmt} -> HF vs Megatron")


def _megafast_worker(rank: int, world: int, cases: list) -> dict:
    """Greedy continuation and logits of each megafast checkpoint (and Megatron directory, read
    directly) at TP=world with megafast's generator."""
    from megafast.checkpoint.megatron_format import open_megatron_checkpoint
    from megafast.checkpoint.reader import MegafastCheckpointReader
    from megafast.config import ParallelConfig
    from megafast.generation.generator import Generator, load_for_generation
    from megafast.generation.sampling import SamplingConfig
    from megafast.parallel import ParallelState
    from megafast.parallel.mappings import gather_from_tensor_parallel_region

    state = ParallelState.create(ParallelConfig(world, 1))
    out = {}
    for key, directory, kind, prompt, tokens, n in cases:
        reader = open_megatron_checkpoint(directory) if kind == "megatron" else MegafastCheckpointReader(directory)
        model = load_for_generation(reader, state)
        greedy = Generator(model, state).generate(prompt, n, SamplingConfig(temperature=0.0))
        with torch.no_grad():
            logits = gather_from_tensor_parallel_region(model(tokens), state.tp_group)  # [b, s, Vp]
        out[key] = (greedy, logits[..., : reader.config.vocab_size])
    return out


def test_megatron_to_megafast_greedy_matches_megatron(megatron, tmp_path):
    cases = []
    for variant, (out, ref) in megatron.items():
        for fmt in FORMATS:
            ckpt = tmp_path / f"{variant}_{fmt}"
            convert("megatron", "megafast", out / fmt, ckpt, target_tensor_parallel_size=1,
                    target_pipeline_parallel_size=1)
            n = len(ref["greedy"])
            cases.append(((variant, fmt, "converted"), str(ckpt), "megafast", ref["prompt"], ref["tokens"], n))
            cases.append(((variant, fmt, "direct"), str(out / fmt), "megatron", ref["prompt"], ref["tokens"], n))
    results = run_distributed(_megafast_worker, 2, cases)[0]  # TP 2
    for (variant, fmt, how), (greedy, logits) in results.items():
        ref = megatron[variant][1]
        assert greedy == ref["greedy"], f"{variant} {fmt} {how}: megafast greedy {greedy} != Megatron {ref['greedy']}"
        assert_close(logits, ref["logits"], 1e-5, f"{variant} {fmt} {how}: megafast vs Megatron logits")


def _first_loss(load_flags: list[str], flags: list[str], tmp: Path, name: str) -> float:
    """Iteration 1's lm loss of a one-iteration pretrain_gpt.py run on mock data."""
    log = tmp / f"{name}.jsonl"
    cmd = [sys.executable, "pretrain_gpt.py", *flags, *load_flags, "--seq-length", "16", "--micro-batch-size", "2",
           "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-4", "--mock-data", "--eval-iters", "0",
           "--log-interval", "1", "--device", "cpu", "--seed", "11", "--log-jsonl", str(log),
           "--attention-dropout", "0", "--hidden-dropout", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    assert "loaded" in proc.stdout + proc.stderr, f"{name}: no checkpoint was loaded"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return next(r["lm_loss"] for r in records if r.get("type") == "train" and r["iteration"] == 1)


def _without(flags: list[str], flag: str, nargs: int) -> list[str]:
    i = flags.index(flag)
    return flags[:i] + flags[i + 1 + nargs:]


def test_pretrain_loads_a_megatron_checkpoint_directly(megatron, tmp_path):
    """--load MEGATRON --finetune and --pretrained-checkpoint MEGATRON (Megatron's TP 2 / PP 2, this
    run's TP 1 / PP 1) give the first-iteration loss of the converted checkpoint, bit for bit."""
    out, _ = megatron["llama"]
    converted = tmp_path / "converted"
    convert("megatron", "megafast", out / "torch", converted, target_tensor_parallel_size=1,
            target_pipeline_parallel_size=1)
    flags = _without(finetune_flags(str(converted)), "--load", 1)
    flags = _without(flags, "--finetune", 0)
    want = _first_loss(["--load", str(converted), "--finetune"], flags, tmp_path, "converted")
    assert _first_loss(["--load", str(out / "torch"), "--finetune"], flags, tmp_path, "legacy") == want
    assert _first_loss(["--pretrained-checkpoint", str(out / "torch_dist")], flags, tmp_path, "dist") == want
    # without --finetune / --no-load-optim: an error (its optimizer state is Megatron's own)
    from megafast.parallel import ParallelState
    from megafast.training.checkpointing import load_checkpoint

    with pytest.raises(ValueError, match="pass --finetune"):
        load_checkpoint(str(out / "torch"), [torch.nn.Linear(1, 1)], None, None, ParallelState.single())


def test_saver_megatron_is_read_by_megatron_lm(megatron, tmp_path):
    """megafast (converted from Megatron at TP 2 / PP 2) -> --saver megatron at TP 1 / PP 2 ->
    Megatron-LM's own load_checkpoint -> Megatron's forward = megafast's logits and greedy."""
    out, ref = megatron["llama"]
    ckpt = tmp_path / "megafast"
    convert("megatron", "megafast", out / "torch_dist", ckpt)
    saved = tmp_path / "megatron"
    convert("megafast", "megatron", ckpt, saved, target_tensor_parallel_size=1, target_pipeline_parallel_size=2)
    assert megatron_format(str(saved)) == "torch"
    assert sorted(os.listdir(saved / "release")) == ["mp_rank_00_000", "mp_rank_00_001"]
    back = tmp_path / "back"
    _wait(_run_worker(["--variant", "llama", "--tp", "1", "--pp", "2", "--out", str(back), "--load", str(saved)]),
          "Megatron-LM load_checkpoint")
    loaded = torch.load(back / "loaded.pt")
    megafast = run_distributed(_megafast_worker, 1, [("m", str(ckpt), "megafast", ref["prompt"], ref["tokens"],
                                                       len(ref["greedy"]))])[0]["m"]
    assert_close(loaded["logits"], megafast[1], 1e-5, "Megatron-LM's load of --saver megatron vs megafast")
    assert loaded["greedy"] == megafast[0] == ref["greedy"]


def test_converter_aliases(megatron, tmp_path):
    """Megatron-LM's and Fast-LLM's --loader/--saver spellings, and tools/checkpoint/util.py."""
    main = _convert_main()
    out, ref = megatron["gpt"]
    assert "was saved with --transformer-impl local" in _one_line_error(
        ["--loader", "mcore", "--loader-transformer-impl", "transformer_engine", "--saver", "hf", "--load-dir",
         str(out / "torch_dist"), "--save-dir", str(tmp_path / "hf")])
    main(["--model-type", "GPT", "--loader", "mcore", "--saver", "hf", "--load-dir", str(out / "torch_dist"),
          "--save-dir", str(tmp_path / "hf"), "--no-progress", "--loader-transformer-impl", "local"])
    # Megatron's --model-size is checked against the HF model's parameter count, --megatron-path for megatron/
    hf_to = ["--loader", "llama_mistral", "--load-dir", str(tmp_path / "hf"), "--saver", "mcore", "--save-dir",
             str(tmp_path / "bad")]
    assert "names a 7B model but" in _one_line_error([*hf_to, "--model-size", "llama2-7B"])
    assert "holds no megatron/ package" in _one_line_error([*hf_to, "--megatron-path", str(tmp_path)])
    assert not (tmp_path / "bad").exists()
    billions = total_parameter_count(HFSource(str(tmp_path / "hf"), None).config, padded=False) / 1e9
    main(["--model-type", "GPT", "--loader", "llama_mistral", "--checkpoint-type", "hf", "--saver", "mcore",
          "--load-dir", str(tmp_path / "hf"), "--save-dir", str(tmp_path / "mcore"), "--no-progress",
          "--model-size", f"tiny-{billions:.9f}B"]
         + (["--megatron-path", MEGATRON_LM] if os.path.isdir(os.path.join(MEGATRON_LM, "megatron")) else []))
    main(["--model-type", "GPT", "--loader", "legacy", "--saver", "legacy", "--load-dir", str(tmp_path / "mcore"),
          "--save-dir", str(tmp_path / "legacy"), "--target-tensor-parallel-size", "2", "--no-progress"])
    proc = subprocess.run([sys.executable, "tools/checkpoint/util.py", "--model-type", "GPT", "--loader", "llama2_hf",
                           "--saver", "megatron", "--load-dir", str(tmp_path / "hf"), "--save-dir",
                           str(tmp_path / "fastllm"), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    source = open_megatron_checkpoint(str(out / "torch"))
    for directory in ("mcore", "legacy", "fastllm"):
        reader = open_megatron_checkpoint(str(tmp_path / directory))
        # via HF the vocabulary padding unit is the HF default (128), the model is the same
        assert dataclasses.replace(reader.config, make_vocab_size_divisible_by=16) == source.config, directory
        for (_, a), (_, b) in zip(source.groups(), reader.groups()):
            for name in a:
                assert torch.equal(a[name], b[name]), f"{directory}: {name} differs after the alias round trip"
    assert open_megatron_checkpoint(str(tmp_path / "legacy")).tp == 2


def _convert_main():
    sys.path.insert(0, str(ROOT / "tools" / "checkpoint"))
    try:
        from convert import main
    finally:
        sys.path.pop(0)
    return main


def _one_line_error(args: list[str]) -> str:
    """tools/checkpoint/convert.py's message for ``args``: it must exit with one line."""
    with pytest.raises(SystemExit) as info:
        _convert_main()(["--model-type", "GPT", "--no-progress", *args])
    line = str(info.value.code)
    assert line.startswith("error: ") and "\n" not in line, line
    return line


def _nothing_valid(directory: Path) -> None:
    assert not (directory / "config.json").exists() and not (directory / "latest_checkpointed_iteration.txt").exists()


def test_bad_megatron_checkpoints_are_one_line_errors(megatron, tmp_path):
    def load_megatron_pickle(p: str):  # megatron-core is installed here: real classes, so it saves again
        return torch.load(p, weights_only=False)

    out, _ = megatron["gpt"]
    legacy = tmp_path / "legacy"
    shutil.copytree(out / "torch", legacy)
    path = legacy / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    original = load_megatron_pickle(str(path))

    def save_edited(edit) -> None:
        ckpt = load_megatron_pickle(str(path))
        edit(ckpt)
        torch.save(ckpt, path)

    cases = [
        ("rotary_interleaved", lambda c: setattr(c["args"], "rotary_interleaved", True), "rotary_interleaved=True"),
        ("position_embedding_type", lambda c: setattr(c["args"], "position_embedding_type", "mrope"),
         "position_embedding_type='mrope'"),
        ("missing tensor", lambda c: c["model"].pop("decoder.layers.1.mlp.linear_fc2.weight"),
         "decoder.layers.1.mlp.linear_fc2.weight is missing"),
    ]
    for what, edit, expected in cases:
        save_edited(edit)
        target = tmp_path / f"out_{what.replace(' ', '_')}"
        line = _one_line_error(["--loader", "megatron", "--saver", "hf", "--load-dir", str(legacy), "--save-dir",
                                str(target)])
        assert expected in line, f"{what}: {line}"
        _nothing_valid(target)
        torch.save(original, path)
    # a truncated legacy file, then a truncated torch_dist data file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = _one_line_error(["--loader", "megatron", "--saver", "megafast", "--load-dir", str(legacy), "--save-dir",
                            str(tmp_path / "t1")])
    assert "truncated" in line, line
    _nothing_valid(tmp_path / "t1")
    dist_dir = tmp_path / "dist"
    shutil.copytree(out / "torch_dist", dist_dir)
    (distcp,) = glob.glob(str(dist_dir / "iter_0000007" / "*.distcp"))
    with open(distcp, "r+b") as f:
        f.truncate(os.path.getsize(distcp) // 3)
    line = _one_line_error(["--loader", "megatron", "--saver", "hf", "--load-dir", str(dist_dir), "--save-dir",
                            str(tmp_path / "t2")])
    assert "truncated" in line, line
    _nothing_valid(tmp_path / "t2")


def test_reading_needs_no_megatron_core(megatron):
    """With megatron importing nothing (as on a machine without megatron-core), both formats still
    read: the pickled args' megatron-core enums become stand-ins."""
    out, _ = megatron["llama"]
    code = (
        "import sys; sys.modules['megatron'] = None\n"
        "from megafast.checkpoint.megatron_format import open_megatron_checkpoint\n"
        "from megafast.checkpoint.megatron_args import StandIn\n"
        f"for fmt in ('torch', 'torch_dist'):\n"
        f"    r = open_megatron_checkpoint({str(out)!r} + '/' + fmt)\n"
        "    assert isinstance(r.args['attention_backend'], StandIn), r.args['attention_backend']\n"
        "    assert sum(len(t) for _, t in r.groups()) > 0\n"
        "print('ok', r.config.num_query_groups)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok 2", proc.stderr[-2000:]
