"""`make demo`: the whole job on its embedded default, on a CPU.

demo corpus (Python's standard library as jsonl) -> SentencePiece BPE tokenizer -> indexed dataset
-> `torchrun --nproc-per-node 4 pretrain_gpt.py` of a small Llama-style model with TP=2 and PP=2
-> checkpoint -> Hugging Face export (`tools/checkpoint/convert.py`, tokenizer included) and a
sample generated from it by `transformers`, offline; then prints where everything is and the
first and last loss. Steps whose output already exists are skipped, so a second run only trains
(and exports) again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODEL = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "8", "--group-query-attention",
    "--num-query-groups", "4", "--ffn-hidden-size", "352", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
]


def step(title: str, cmd: list[str], output: Path) -> None:
    if output.exists():
        print(f"==> {title}: {output} exists, skipped", flush=True)
        return
    print(f"==> {title}\n    {' '.join(cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"    done in {time.time() - start:.1f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="demo", help="where everything goes (default ./demo)")
    p.add_argument("--nproc", type=int, default=4, help="ranks: TP=2 x PP=2 x DP=nproc/4")
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--corpus-mb", type=float, default=4.0)
    p.add_argument("--vocab-size", type=int, default=4000)
    args = p.parse_args()
    if args.nproc % 4:
        raise SystemExit(f"error: --nproc {args.nproc} must be a multiple of 4 (TP=2 x PP=2)")
    missing = [m for m in ("transformers", "tensorboard") if importlib.util.find_spec(m) is None]
    if missing:  # the TensorBoard log and the sample from the HF export (megafast/extras.py)
        raise SystemExit(f"error: the demo needs the {' and '.join(missing)} package: "
                         "pip install 'megafast[demo]' (make demo installs it)")

    out = Path(args.dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    corpus, sp_prefix = out / "corpus.jsonl", out / "tokenizer"
    data_prefix = out / "data" / "corpus"
    dataset = Path(f"{data_prefix}_text_document")
    ckpt, log = out / "checkpoints", out / "train_log.jsonl"
    started = time.time()

    step("demo corpus", [py, "tools/make_demo_corpus.py", "--output", str(corpus), "--size-mb", str(args.corpus_mb)],
         corpus)
    step("tokenizer", [py, "tools/train_tokenizer.py", "--input", str(corpus), "--model-prefix", str(sp_prefix),
                       "--vocab-size", str(args.vocab_size), "--model-type", "bpe"], Path(f"{sp_prefix}.model"))
    data_prefix.parent.mkdir(exist_ok=True)
    step("preprocess", [py, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix", str(data_prefix),
                        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", f"{sp_prefix}.model",
                        "--append-eod", "--workers", "2"], Path(f"{dataset}.idx"))

    if log.exists():
        log.unlink()
    train = [
        py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", "pretrain_gpt.py",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", *MODEL,
        "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", str(16 * args.nproc // 4),
        "--train-iters", str(args.train_iters), "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "20", "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--data-path", str(dataset), "--split", "98,2,0", "--data-cache-path", str(out / "index_cache"),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", f"{sp_prefix}.model",
        "--save", str(ckpt), "--save-interval", str(args.train_iters), "--log-interval", "10",
        "--eval-interval", "100", "--eval-iters", "2", "--log-jsonl", str(log),
        "--tensorboard-dir", str(out / "tensorboard"), "--device", "cpu",
    ]
    print(f"==> pretraining (TP=2, PP=2, {args.nproc} ranks)\n    {' '.join(train)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train, check=True, cwd=ROOT, env=env)

    records = [json.loads(line) for line in log.read_text().splitlines()]
    losses = [r for r in records if r["type"] == "train"]
    first, last = losses[0], losses[-1]
    print(f"\nmegafast demo finished in {time.time() - started:.0f} s")
    print(f"  lm loss {first['lm_loss']:.3f} at iteration {first['iteration']} -> {last['lm_loss']:.3f} "
          f"at iteration {last['iteration']} ({last['tokens_per_sec']:.0f} tokens/s)")
    print(f"  corpus       {corpus}")
    print(f"  tokenizer    {sp_prefix}.model")
    print(f"  dataset      {dataset}.bin / .idx")
    print(f"  checkpoint   {ckpt}/iter_{last['iteration']:07d}")
    print(f"  log          {log} (TensorBoard: {out / 'tensorboard'})")
    if last["lm_loss"] >= first["lm_loss"]:
        raise SystemExit("error: the loss did not fall during the demo run")

    hf_dir = out / "hf"
    export = [py, "tools/checkpoint/convert.py", "--model-type", "GPT", "--loader", "megafast", "--saver", "hf",
              "--load-dir", str(ckpt), "--save-dir", str(hf_dir), "--overwrite", "--no-progress"]
    print(f"==> Hugging Face export\n    {' '.join(export)}", flush=True)
    subprocess.run(export, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    prompt = "def main("
    print(f"  hf export    {hf_dir} (transformers: AutoModelForCausalLM / AutoTokenizer.from_pretrained)")
    print(f"  sample       {prompt!r} -> {hf_sample(hf_dir, prompt)!r}")


def hf_sample(hf_dir: Path, prompt: str, max_new_tokens: int = 40) -> str:
    """A continuation of ``prompt`` sampled by transformers from the exported model, offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # no BOS, as in training
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8, top_k=40,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


if __name__ == "__main__":
    main()
