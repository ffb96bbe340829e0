"""HF weights in and out of training (issue 16, acceptance 4): ``--pretrained-checkpoint HF_DIR`` and
``--save-hf`` equal the offline converter, bit for bit.

References: the offline path, run separately: ``tools/checkpoint/convert.py --loader hf --saver
megafast`` at the run's TP (and vocabulary padding) then ``--pretrained-checkpoint`` of that
checkpoint gives the same losses and gradient norms at every iteration, compared with ``==``;
``convert.py --loader megafast --saver hf`` of the run's saved checkpoint (merged for LoRA) gives
the same bytes in every file as the run's ``--save-hf`` export. And transformers itself: the first
loss of a zero-learning-rate run from the HF directory equals the loss transformers computes on the
same batch. Bad inputs: one-line errors before any model is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hf_models
import pytest
import torch
from pretrain_run import convert_tool, pretrain_in_process, torchrun

from megafast.convert.converter import ConvertOptions, convert_checkpoint
from megafast.training import trainer

HF_FLAGS = [  # hf_models' llama_gqa (the flags convert.py prints for it) and its vocabulary
    "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "48",
    "--kv-channels", "8", "--max-position-embeddings", "128", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-06", "--group-query-attention", "--num-query-groups", "2",
    "--rotary-base", "500000.0", "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    "--make-vocab-size-divisible-by", "1",
]
TRAIN = ["--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2",
         "--train-iters", "3", "--log-interval", "1", "--eval-iters", "0", "--mock-data", "--device", "cpu",
         "--seed", "7", "--attention-dropout", "0", "--hidden-dropout", "0"]


def _tokenizer(directory: Path, vocab: int) -> None:
    """A word-level HF tokenizer of exactly ``vocab`` tokens (the last one the EOS) saved into ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)} | {"<unk>": vocab - 2, "</s>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(str(directory))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "llama"
    hf_models.save(hf_models.build("llama_gqa", seed=3), "llama_gqa", str(out))
    _tokenizer(out, hf_models.VOCAB)
    return out




def _records(path: Path) -> list[tuple[float, float]]:
    return [(r["lm_loss"], r["grad_norm"]) for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "train"]


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert any(str(n).endswith(".safetensors") for n in names) and Path("config.json") in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


def test_hf_start_and_save_hf_equal_the_offline_converter(hf_dir, tmp_path):
    tok = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf_dir)]
    run = tmp_path / "run"
    pretrain_in_process(HF_FLAGS + TRAIN + tok + ["--pretrained-checkpoint", str(hf_dir), "--save", str(run),
                                          "--save-interval", "2", "--save-hf", "--log-jsonl", str(tmp_path / "a.jsonl")])
    converted = tmp_path / "converted"
    convert_checkpoint(ConvertOptions("hf", "megafast", str(hf_dir), str(converted), make_vocab_size_divisible_by=1,
                                      progress=False))
    pretrain_in_process(HF_FLAGS + TRAIN + tok + ["--pretrained-checkpoint", str(converted),
                                          "--log-jsonl", str(tmp_path / "b.jsonl")])
    a, b = _records(tmp_path / "a.jsonl"), _records(tmp_path / "b.jsonl")
    assert len(a) == 3 and a == b

    hf = run / "hf"
    assert sorted(p.name for p in hf.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]
    assert os.readlink(hf / "latest") == "iter_0000003"
    convert_tool(["--loader", "megafast", "--saver", "hf", "--load-dir", str(run), "--save-dir", str(tmp_path / "off")])
    _same_files(tmp_path / "off", hf / "iter_0000003")
    config = json.loads((hf / "latest" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["bos_token_id"] == 1  # from the HF start
    assert (hf / "latest" / "tokenizer.json").is_file()  # the run's HF tokenizer travels with the weights


def test_first_loss_equals_transformers(hf_dir, tmp_path):
    """lr 0, one iteration from the HF directory: the logged loss is transformers' mean next-token loss
    on the same mock batch (megafast.data.mock_dataset, read back here)."""
    from transformers import AutoModelForCausalLM

    from megafast.data.mock_dataset import MockGPTDataset

    log = tmp_path / "log.jsonl"
    train = [x if x != "1e-2" else "0" for x in TRAIN]
    pretrain_in_process(HF_FLAGS + train + ["--pretrained-checkpoint", str(hf_dir), "--vocab-size", str(hf_models.VOCAB),
                                    "--train-iters", "1", "--log-jsonl", str(log)])
    ds = MockGPTDataset(1 * 4, 16, hf_models.VOCAB, 7)  # what the trainer builds for 1 iteration of 4 samples
    samples = [ds[i] for i in range(4)]
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()
    assert _records(log)[0][0] == pytest.approx(want, rel=1e-5)


def test_lora_tp2_hf_start_and_merged_save_hf_equal_the_offline_converter(hf_dir, tmp_path):
    """TP = 2 over gloo with LoRA: the base converted in memory to the 2-way layout; the --save-hf
    export merges the adapters into that base exactly as convert.py (merged, the default) does."""
    lora = ["--tensor-model-parallel-size", "2", "--lora-rank", "4", "--lora-alpha", "8",
            "--vocab-size", str(hf_models.VOCAB)]
    run = tmp_path / "run"
    torchrun(2, HF_FLAGS + TRAIN + lora + ["--pretrained-checkpoint", str(hf_dir), "--save", str(run),
                                           "--save-hf", str(tmp_path / "hf"), "--log-jsonl", str(tmp_path / "a.jsonl")])
    converted = tmp_path / "converted"
    convert_checkpoint(ConvertOptions("hf", "megafast", str(hf_dir), str(converted), target_tensor_parallel_size=2,
                                      make_vocab_size_divisible_by=1, progress=False))
    torchrun(2, HF_FLAGS + TRAIN + lora + ["--pretrained-checkpoint", str(converted),
                                           "--log-jsonl", str(tmp_path / "b.jsonl")])
    a, b = _records(tmp_path / "a.jsonl"), _records(tmp_path / "b.jsonl")
    assert len(a) == 3 and a == b
    convert_tool(["--loader", "megafast", "--saver", "hf", "--load-dir", str(run), "--save-dir", str(tmp_path / "off")])
    _same_files(tmp_path / "off", tmp_path / "hf" / "iter_0000003")
    base = json.loads((tmp_path / "off" / "model.safetensors.index.json").read_text())
    assert "model.layers.0.self_attn.q_proj.weight" in base["weight_map"]


def _setup_error(argv: list[str], monkeypatch) -> str:
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        trainer.setup(argv)  # fails before any process group exists (MASTER_PORT 1 is never used)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("error: ")
    return message


def _replace(flags: list[str], flag: str, value: str) -> list[str]:
    out = list(flags)
    out[out.index(flag) + 1] = value
    return out


@pytest.mark.parametrize("change, message", [
    (lambda f: _replace(f, "--hidden-size", "64"), r"config.json gives hidden_size=32 but this run has 64 \(--hidden-size\); "
                                                   r"pass this model's flags: --num-layers 4 --hidden-size 32 "),
    (lambda f: _replace(f, "--num-layers", "2"), r"num_layers=4 but this run has 2 \(--num-layers\)"),
    (lambda f: [x for x in f if x != "--swiglu"], r"activation='swiglu' but this run has 'gelu'"),
    (lambda f: [x for x in f if x != "--untie-embeddings-and-output-weights"], r"tie_embeddings=False but this run has True"),
    (lambda f: f + ["--vocab-size", "200"], r"the run's vocabulary has 200 tokens .* embedding has 101 rows: "
                                            r"the vocabulary does not fit"),
    (lambda f: f + ["--vocab-size", "50"], r"config.json has vocab_size 101 but the run's vocabulary has 50 tokens: "
                                           r"pass --vocab-size 101"),
])
def test_config_mismatches_are_one_line_errors(hf_dir, monkeypatch, change, message):
    import re

    argv = change(HF_FLAGS) + TRAIN + ["--pretrained-checkpoint", str(hf_dir)]
    if "--vocab-size" not in argv:
        argv += ["--vocab-size", str(hf_models.VOCAB)]
    got = _setup_error(argv, monkeypatch)
    assert re.search(message, got), got
    assert got.startswith(f"error: --pretrained-checkpoint {hf_dir}: ")


def test_bad_hf_directories_and_save_hf_flags(hf_dir, tmp_path, monkeypatch):
    base = HF_FLAGS + TRAIN + ["--vocab-size", "101"]
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((hf_dir / "config.json").read_text())
    assert "error: --pretrained-checkpoint: " in _setup_error(base + ["--pretrained-checkpoint", str(empty)], monkeypatch)
    assert "holds no weights: expected model.safetensors" in _setup_error(base + ["--pretrained-checkpoint", str(empty)],
                                                                          monkeypatch)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    for index in hf_dir.glob("model*.safetensors*"):
        (odd / index.name).write_bytes(index.read_bytes())
    assert "architecture ['BertModel'] is not supported" in _setup_error(base + ["--pretrained-checkpoint", str(odd)],
                                                                        monkeypatch)
    assert "--save-hf writes HF weights after each committed checkpoint: add --save DIR" in _setup_error(
        base + ["--save-hf"], monkeypatch)
    assert "must differ from --save" in _setup_error(base + ["--save", str(tmp_path / "s"), "--save-hf",
                                                             str(tmp_path / "s")], monkeypatch)


def _pp2_worker(rank: int, world: int, hf_dir: str, converted: str) -> bool:
    """Both loads at PP = 2 (bf16 parameters from fp32 weights): every state-dict tensor equal."""
    from megafast.config import ParallelConfig
    from megafast.convert.hf_pretrained import load_hf_into_chunks, open_hf_pretrained
    from megafast.parallel.state import ParallelState
    from megafast.pipeline.partition import build_model_chunks
    from megafast.training.checkpointing import load_checkpoint

    state = ParallelState.create(ParallelConfig(pipeline_model_parallel_size=world))
    source, _ = open_hf_pretrained(hf_dir, _tied_config(hf_dir))
    models = []
    for seed in (1, 2):
        chunks = build_model_chunks(source.config, state, seed=seed, params_dtype=torch.bfloat16)
        models.append(chunks)
    load_hf_into_chunks(source, models[0], source.config, state.tp_rank, state.tp_size)
    assert load_checkpoint(converted, models[1], None, None, state, finetune=True) is not None
    a, b = models[0][0].state_dict(), models[1][0].state_dict()
    assert a.keys() == b.keys() and ("output_layer.weight" in a) == (rank == world - 1)
    return all(torch.equal(a[k], b[k]) for k in a)


def _tied_config(hf_dir: str):
    from megafast.convert.converter import HFSource

    return HFSource(hf_dir, 1).config


def test_pp2_tied_embeddings_load_equals_the_converted_checkpoint(tmp_path):
    """Each pipeline stage reads only its own layers; the last stage's tied output layer is the embedding."""
    from dist import run_distributed

    hf_dir = tmp_path / "tied"
    hf_models.save(hf_models.build("llama_tied", seed=4), "llama_tied", str(hf_dir))
    converted = tmp_path / "converted"
    convert_checkpoint(ConvertOptions("hf", "megafast", str(hf_dir), str(converted), target_pipeline_parallel_size=2,
                                      make_vocab_size_divisible_by=1, progress=False))
    assert run_distributed(_pp2_worker, 2, str(hf_dir), str(converted)) == [True, True]
