"""Generation (issue 6): the KV cache, sampling, and tools/generate.py against transformers.

- Prefill + one-token decoding with megafast.model.kv_cache gives the logits of a full forward.
- top-k / top-p filtering equals transformers' logits warpers.
- ``torchrun tools/generate.py`` greedy at TP=2 x PP=2 equals ``model.generate(do_sample=False)``
  of the HF model for 32 new tokens (Llama GQA saved at (2,2); GPT-2 saved at (1,1) and
  re-sharded on load), and ``--prompt`` text through the tokenizer a conversion carries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import hf_models
import pytest
import torch

from megafast.checkpoint.reader import MegafastCheckpointReader
from megafast.config import GPTConfig
from megafast.convert.converter import ConvertOptions, convert_checkpoint
from megafast.generation.generator import Generator, load_for_generation
from megafast.generation.sampling import SamplingConfig, sample, top_k_filter, top_p_filter
from megafast.model import GPTModel
from megafast.model.kv_cache import InferenceParams
from megafast.parallel import ParallelState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_kv_cache_decoding_equals_full_forward(kind):
    base = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=61,
        max_position_embeddings=32,
        init_method_std=0.2,
    )
    if kind == "llama":
        base.update(
            num_query_groups=2,
            position_embedding_type="rope",
            normalization="RMSNorm",
            activation="swiglu",
            add_bias_linear=False,
        )
    model = GPTModel(GPTConfig(**base), seed=5).eval()
    ids = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)  # [b, s, V]
        cache = InferenceParams(2, 14)
        got = []
        for start, end in ((0, 5), (5, 9), (9, 10), (10, 11), (11, 14)):  # prefill, a chunk, single tokens
            positions = torch.arange(start, end).expand(2, end - start)
            got.append(model(ids[:, start:end], position_ids=positions, inference_params=cache))
            cache.advance(end - start)
    hf_models.assert_rel_close(torch.cat(got, dim=1), want, 1e-5, f"{kind} cached decoding")
    with pytest.raises(ValueError, match="KV cache holds 14 positions"):
        model(ids[:, :1], position_ids=torch.full((2, 1), 14), inference_params=cache)


def test_sampling_filters_match_transformers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    for k in (1, 5, 49):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits.clone()))
    assert torch.equal(sample(logits, SamplingConfig(temperature=0.0)), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingConfig(temperature=1.0, top_k=1)), logits.argmax(-1))
    draws = [sample(logits, SamplingConfig(0.7, 10, 0.9), torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    with pytest.raises(ValueError, match="--top-p must be in"):
        SamplingConfig(top_p=1.5)


def _hf_greedy(model, prompt: list[int], new: int, eos: bool = False) -> list[int]:
    model.generation_config.pad_token_id = model.config.eos_token_id
    if not eos:
        model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new,
        )
    return out[0, len(prompt) :].tolist()


def _torchrun_generate(ckpt: str, prompt: list[int], *extra: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "4",
        "tools/generate.py",
        "--load",
        ckpt,
        "--prompt-token-ids",
        ",".join(map(str, prompt)),
        "--max-new-tokens",
        "32",
        "--temperature",
        "0",
        "--ignore-eos",
        *extra,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 only
    return json.loads(lines[0])


@pytest.mark.parametrize("name,saved", [("llama_gqa", (2, 2)), ("gpt2", (1, 1))])
def test_generate_tp2_pp2_greedy_equals_transformers(name, saved, tmp_path):
    model = hf_models.build(name, seed=11)
    hf_dir = str(tmp_path / "hf")
    hf_models.save(model, name, hf_dir)
    ckpt = str(tmp_path / "ckpt")
    convert_checkpoint(
        ConvertOptions(
            "hf",
            "megafast",
            hf_dir,
            ckpt,
            target_tensor_parallel_size=saved[0],
            target_pipeline_parallel_size=saved[1],
            progress=False,
        )
    )
    prompt = [5, 17, 42, 8, 99, 23, 61]
    want = _hf_greedy(model, prompt, 32)
    got = _torchrun_generate(
        ckpt, prompt, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"
    )
    assert got["prompt_token_ids"] == prompt and got["text"] is None
    assert len(got["token_ids"]) == 32 and got["token_ids"] == want


def _tiny_tokenizer(directory: str) -> None:
    """A 101-token BPE (ids: <unk> 0, <s> 1, </s> 2) saved for transformers."""
    import inspect

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=hf_models.VOCAB, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60
    )
    tok.train_from_iterator(inspect.getsource(json).splitlines(), trainer)
    assert tok.get_vocab_size() <= hf_models.VOCAB
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(directory)


def test_generate_from_text_with_the_converted_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    model = hf_models.build("llama_tied", seed=4)
    hf_dir = str(tmp_path / "hf")
    hf_models.save(model, "llama_tied", hf_dir)
    _tiny_tokenizer(hf_dir)
    ckpt = str(tmp_path / "ckpt")
    convert_checkpoint(ConvertOptions("hf", "megafast", hf_dir, ckpt, progress=False))
    assert os.path.isfile(os.path.join(ckpt, "tokenizer", "tokenizer.json"))
    text = "def dumps(obj, indent"
    proc = subprocess.run(
        [
            sys.executable,
            "tools/generate.py",
            "--load",
            ckpt,
            "--prompt",
            text,
            "--max-new-tokens",
            "20",
            "--temperature",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    hf_tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    prompt = hf_tok.encode(text, add_special_tokens=False)
    want = _hf_greedy(model, prompt, 20, eos=True)  # stops at </s> like generate.py (the tokenizer's EOD)
    assert got["prompt_token_ids"] == prompt and got["token_ids"] == want
    assert got["text"] == hf_tok.decode(want)


def test_sampled_generation_is_reproducible_and_errors_are_clear(tmp_path):
    model = hf_models.build("qwen2", seed=2)
    hf_dir = str(tmp_path / "hf")
    hf_models.save(model, "qwen2", hf_dir)
    ckpt = str(tmp_path / "ckpt")
    convert_checkpoint(ConvertOptions("hf", "megafast", hf_dir, ckpt, progress=False))
    reader = MegafastCheckpointReader(ckpt)
    state = ParallelState.single()
    generator = Generator(load_for_generation(reader, state), state)
    sampling = SamplingConfig(temperature=0.9, top_k=30, top_p=0.95)
    runs = [generator.generate([3, 4, 5], 24, sampling, seed=9) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 24
    assert generator.generate([3, 4, 5], 24, sampling, seed=10) != runs[0]
    greedy = generator.generate([3, 4, 5], 8, SamplingConfig(temperature=0.0), eos_ids=[2])
    assert greedy == _hf_greedy(model, [3, 4, 5], 8, eos=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generator.generate([500], 4, sampling)

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import generate as generate_tool

    with pytest.raises(SystemExit, match="--prompt needs a tokenizer"):
        generate_tool.main(["--load", ckpt, "--prompt", "hello"])
    with pytest.raises(SystemExit, match="needs several processes"):
        generate_tool.main(["--load", ckpt, "--prompt-token-ids", "1,2", "--tensor-model-parallel-size", "2"])
