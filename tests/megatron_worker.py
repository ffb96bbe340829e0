"""Megatron-LM writes a checkpoint: the reference side of tests/test_megatron_checkpoint.py.

    python tests/megatron_worker.py --variant llama --tp 2 --pp 2 --out DIR

Builds megatron-core 0.19's own ``GPTModel`` from Megatron-LM's own argument parser
(``megatron.training.arguments``, sources at /work/megatron-lm), on CPU over gloo with
TP x PP spawned ranks, and saves it twice with Megatron-LM's own ``save_checkpoint``: the legacy
``torch`` format under ``DIR/torch`` and ``torch_dist`` under ``DIR/torch_dist``. Then it runs the
Megatron model's own forward (pipeline stages joined by send/recv) on fixed tokens and writes
``DIR/reference.pt``: the tokens, the logits [1, s, V] (fp32, padding columns cut) and the greedy
continuation of a prompt (full forward per new token). Megatron's CPU path needs a few stand-ins
(``torch.cuda.current_device``, ``get_rng_state``, ``synchronize``, ``get_device_properties``,
torch.compile off; ``typing.override`` on Python 3.11): they live in this process only. This file is a script run as a subprocess (the
torch_dist save re-imports ``__main__``), never imported by the tests. With ``--load CKPT`` it
reads CKPT with Megatron-LM's own ``load_checkpoint`` (as ``--finetune``) instead of saving, and
writes the same forward results to ``DIR/loaded.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing

MEGATRON_LM = os.environ.get("MEGATRON_LM_DIR", "/work/megatron-lm")
VOCAB = 100  # NullTokenizer vocabulary (end of document V - 1)
DIVISIBLE = 16
PROMPT_LEN, NEW_TOKENS, SEQ = 5, 4, 12

VARIANTS = {  # Megatron flags of each model variant
    "llama": ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
              "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--group-query-attention",
              "--num-query-groups", "2", "--rotary-base", "5000", "--norm-epsilon", "1e-6"],
    "gpt": ["--position-embedding-type", "learned_absolute", "--normalization", "LayerNorm"],
    "mixtral": ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
                "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--group-query-attention",
                "--num-query-groups", "2", "--rotary-base", "5000", "--norm-epsilon", "1e-6",
                "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "96",
                "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "0.01",
                "--moe-token-dispatcher-type", "allgather"],
}


def _stand_ins() -> None:
    import torch

    if not hasattr(typing, "override"):
        typing.override = lambda f: f
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = lambda *a, **k: torch.zeros(8, dtype=torch.uint8)
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(major=9, minor=0)
    torch._dynamo.config.disable = True  # Megatron's jit_fuser (torch.compile) fusions run eagerly, same maths
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def megatron_argv(variant: str, tp: int, pp: int, num_layers: int, save: str) -> list[str]:
    return [
        "--num-layers", str(num_layers), "--hidden-size", "64", "--num-attention-heads", "4",
        "--ffn-hidden-size", "96", "--seq-length", "16", "--max-position-embeddings", "32",
        "--micro-batch-size", "1", "--global-batch-size", "1",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
        "--make-vocab-size-divisible-by", str(DIVISIBLE),
        "--transformer-impl", "local", "--use-cpu-initialization", "--no-rope-fusion",
        "--no-persist-layer-norm", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
        "--attention-backend", "unfused", "--save", save, "--save-interval", "1", "--lr", "1e-4",
        "--train-iters", "10", "--init-method-std", "0.05", "--seed", "1234", *VARIANTS[variant],
    ]


def _worker(rank: int, world: int, opts: argparse.Namespace) -> None:
    _stand_ins()
    sys.path.insert(0, MEGATRON_LM)
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{opts.out}/.store", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.global_vars import set_global_variables

    sys.argv = ["pretrain_gpt.py", *megatron_argv(opts.variant, opts.tp, opts.pp, opts.num_layers, opts.out)]
    args = parse_args()
    validate_args(args)
    unit = DIVISIBLE * opts.tp
    args.padded_vocab_size = -(-VOCAB // unit) * unit  # what Megatron's tokenizer set-up computes
    set_global_variables(args, build_tokenizer=False)
    ps.initialize_model_parallel(opts.tp, opts.pp)
    torch.manual_seed(1234)  # the CPU initialisation draws every full weight from this stream
    config = core_transformer_config_from_args(args)
    model = GPTModel(
        config, get_gpt_layer_local_spec(args.num_experts, args.moe_grouped_gemm, normalization=args.normalization), vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), parallel_output=False,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
    )
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or dropped one shows
        gen = torch.Generator().manual_seed(99)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    if opts.load:  # Megatron-LM's own load_checkpoint reads a checkpoint written by megafast
        from megatron.training.checkpointing import load_checkpoint

        args.load, args.ckpt_format, args.use_dist_ckpt = opts.load, "torch", False
        args.finetune, args.no_load_optim, args.no_load_rng = True, True, True
        make_tensor = torch.tensor  # its read_metadata all-reduces the iteration in a device="cuda" tensor

        def cpu_tensor(*a, **k):
            return make_tensor(*a, **{**k, "device": "cpu"} if k.get("device") == "cuda" else k)

        torch.tensor = cpu_tensor
        iteration, _ = load_checkpoint([model], None, None, strict=True)
        assert iteration == 0, iteration
    else:
        for fmt in ("torch", "torch_dist"):
            args.save, args.ckpt_format = os.path.join(opts.out, fmt), fmt
            args.use_dist_ckpt = fmt != "torch"
            save_checkpoint(7, [model], None, None, 0)

    model.eval()
    from megatron.core.tensor_parallel import random as megatron_random  # the attention's RNG fork, on CPU

    megatron_random._get_cuda_rng_state = lambda *a, **k: torch.zeros(8, dtype=torch.uint8)
    megatron_random._set_cuda_rng_state = lambda *a, **k: None
    megatron_random.get_cuda_rng_tracker().add("model-parallel-rng", 1)
    tp_rank, pp_rank, last = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), opts.pp - 1

    def forward(tokens: torch.Tensor) -> torch.Tensor:  # [1, s] -> [1, s, Vp] on the last stage
        s = tokens.shape[1]
        positions = torch.arange(s).unsqueeze(0)
        mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)  # True: masked
        hidden = None
        if pp_rank > 0:
            hidden = torch.empty(s, 1, args.hidden_size)  # [s, b, h]
            dist.recv(hidden, rank - opts.tp)
        model.set_input_tensor(hidden)
        out = model(tokens, positions, mask)
        if pp_rank < last:
            dist.send(out.contiguous(), rank + opts.tp)
        return out

    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=gen)
    with torch.no_grad():
        out = forward(tokens)
        logits = out[..., :VOCAB].clone() if pp_rank == last else None
        greedy = tokens[:, :PROMPT_LEN].clone()
        for _ in range(NEW_TOKENS):
            step = forward(greedy)
            nxt = torch.zeros(1, 1, dtype=torch.long)
            if pp_rank == last:
                nxt = step[:, -1, :VOCAB].argmax(-1, keepdim=True)
            dist.broadcast(nxt, world - opts.tp)  # the last stage's TP rank 0
            greedy = torch.cat([greedy, nxt], dim=1)
    if pp_rank == last and tp_rank == 0:
        torch.save({"tokens": tokens, "logits": logits, "greedy": greedy[0, PROMPT_LEN:].tolist(),
                    "prompt": tokens[0, :PROMPT_LEN].tolist(), "padded_vocab_size": args.padded_vocab_size},
                   os.path.join(opts.out, "loaded.pt" if opts.load else "reference.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=sorted(VARIANTS), default="llama")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--out", required=True)
    p.add_argument("--load", default=None, help="load this legacy checkpoint with Megatron-LM instead of saving")
    opts = p.parse_args()
    os.makedirs(opts.out, exist_ok=True)
    world = opts.tp * opts.pp
    if world == 1:
        _worker(0, 1, opts)
    else:
        import torch.multiprocessing as mp

        mp.spawn(_worker, args=(world, opts), nprocs=world)


if __name__ == "__main__":
    main()
