"""Expert parallelism (--expert-model-parallel-size) on gloo ranks.

- The MoE layer at EP = 2 and 4 with the all-to-all and the all-gather token dispatcher equals the
  EP = 1 layer (every expert on one rank) run on each rank's tokens: outputs, input and router
  gradients per rank, and each rank's experts' gradients equal the EP = 1 gradients summed over
  the ranks' tokens (fp32, 1e-5); dropless and with a capacity factor, loop and grouped GEMM.
- Process groups: EP and expert-data-parallel ranks as Megatron draws them from the DP ranks.
- A tiny MoE Llama trained by pretrain_gpt.py: per-iteration lm_loss at (TP, PP, DP, EP) =
  (1,1,2,2), (1,2,2,2), (2,1,2,2) (+ sequence parallelism), (1,1,4,4), with the distributed
  optimizer (ZeRO-1; ZeRO-3 at (1,1,4,4)) and both dispatchers, equals (1,1,1,1) within 1e-5
  over 10 iterations, and so do the load-balancing loss and the gradient norm; exact resume at
  EP = 2.
- Configuration errors are one line.
"""

from __future__ import annotations

import pytest
import torch

from dist import run_distributed
from seeding import draw_seed

E, H, FFN = 4, 16, 12
S, B = 5, 3


def _config(**moe):
    from megafast.config import GPTConfig

    base = dict(
        num_layers=2, hidden_size=H, num_attention_heads=2, vocab_size=50, ffn_hidden_size=32,
        position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
        num_experts=E, moe_ffn_hidden_size=FFN, init_method_std=0.3, moe_router_topk=2,
        moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, kernels="torch",
    )
    base.update(moe)
    return GPTConfig(**base)


VARIANTS = [  # MoE config overrides checked for each dispatcher
    {},
    {"moe_expert_capacity_factor": 0.75},
    {"moe_grouped_gemm": True, "moe_router_score_function": "sigmoid"},
]


def _layer_vs_reference(rank: int, world: int, seed: int) -> tuple[list[tuple[str, float]], object]:
    from megafast.config import ParallelConfig
    from megafast.model.moe import MoELayer
    from megafast.parallel.state import ParallelState

    state = ParallelState.create(ParallelConfig(expert_model_parallel_size=world))
    assert (state.ep_size, state.ep_rank, state.expert_dp_size) == (world, rank, 1)
    local = E // world
    errors = []
    for dispatcher in ("alltoall", "allgather"):
        for variant in VARIANTS:
            config = _config(moe_token_dispatcher_type=dispatcher, **variant)
            gen = torch.Generator().manual_seed(seed)
            xs = torch.randn(world, S, B, H, generator=gen)
            gs = torch.randn(world, S, B, H, generator=gen)
            ours = MoELayer(config, state, layer_number=1, seed=seed)
            ref = MoELayer(config, ParallelState.single(), layer_number=1, seed=seed)
            x = xs[rank].clone().requires_grad_(True)
            out = ours(x)
            (out * gs[rank]).sum().backward()
            ref_expert_grads = {n: torch.zeros_like(p) for n, p in ref.experts.named_parameters()}
            for r in range(world):
                ref.zero_grad()
                xr = xs[r].clone().requires_grad_(True)
                yr = ref(xr)
                (yr * gs[r]).sum().backward()
                for n, p in ref.experts.named_parameters():
                    ref_expert_grads[n] += p.grad
                if r == rank:
                    want = {"out": yr.detach(), "x.grad": xr.grad, "router.grad": ref.router.weight.grad.clone()}
            name = f"{dispatcher} {variant} rank {rank} seed {seed}"
            got = {"out": out.detach(), "x.grad": x.grad, "router.grad": ours.router.weight.grad}
            for key in want:
                errors.append((f"{name} {key}", (got[key] - want[key]).abs().max().item()))
            for n, p in ours.experts.named_parameters():
                assert p.shape[0] == local and getattr(p, "expert_parallel", False)
                full_ref = ref.experts.get_parameter(n)
                errors.append((f"{name} {n} value", (p.detach() - full_ref[rank * local:(rank + 1) * local]).abs().max().item()))
                want_grad = ref_expert_grads[n][rank * local:(rank + 1) * local]
                errors.append((f"{name} {n}.grad", (p.grad - want_grad).abs().max().item()))
    return errors, _groups() if world == 4 else None


@pytest.mark.parametrize("world", [2, 4])
def test_dispatchers_equal_the_single_rank_layer(world):
    seed = draw_seed("seed")
    for rank, (rank_errors, groups) in enumerate(run_distributed(_layer_vs_reference, world, seed)):
        for name, err in rank_errors:
            assert err <= 1e-5, f"{name}: max abs error {err:.2e}"
        if world == 4:  # DP 4, EP 2: EP groups are consecutive DP ranks, expert-DP ones those of equal EP rank
            ep_rank, edp_rank, edp_size, ep_group, edp_group = groups
            assert (ep_rank, edp_rank, edp_size) == (rank % 2, rank // 2, 2)
            assert ep_group == [rank // 2 * 2, rank // 2 * 2 + 1]
            assert edp_group == [rank % 2, rank % 2 + 2]


def _groups() -> tuple:
    import torch.distributed as dist

    from megafast.config import ParallelConfig
    from megafast.parallel.state import ParallelState

    st = ParallelState.create(ParallelConfig(expert_model_parallel_size=2))
    ranks = lambda g: None if g is None else dist.get_process_group_ranks(g)  # noqa: E731
    return (st.ep_rank, st.expert_dp_rank, st.expert_dp_size, ranks(st.ep_group), ranks(st.expert_dp_group))


# ----------------------------------------------------------------------- training under torchrun

MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
       "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff", "0.001"]
EP_LAYOUTS = [  # (nproc, flags): (TP, PP, DP, EP) in the comment
    (1, []),  # (1,1,1,1): the reference
    (2, ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]),  # (1,1,2,2)
    (4, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
         "--moe-token-dispatcher-type", "allgather"]),  # (1,2,2,2)
    (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2",
         "--use-distributed-optimizer"]),  # (2,1,2,2)
    (4, ["--expert-model-parallel-size", "4", "--data-parallel-sharding-strategy", "optim_grads_params"]),  # (1,1,4,4), ZeRO-3
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, int]:
    """Learnable documents (each counts up from a random start with a random stride)."""
    import numpy as np

    from megafast.data.indexed_dataset import IndexedDatasetBuilder
    from pretrain_run import VOCAB

    seed = draw_seed("corpus_seed")
    prefix = str(tmp_path_factory.mktemp("ep_corpus") / "corpus_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(200):
        start, stride, length = rng.integers(0, VOCAB - 1), rng.integers(1, 4), rng.integers(5, 60)
        doc = ((start + stride * np.arange(length)) % (VOCAB - 1)).tolist() + [VOCAB - 1]
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix, seed


def test_expert_parallel_layouts_train_the_same(corpus, tmp_path):
    import numpy as np

    from pretrain_run import MODEL, TRAIN, data_args, torchrun, train_records

    prefix, seed = corpus
    runs = []
    for i, (nproc, extra) in enumerate(EP_LAYOUTS):
        log = tmp_path / f"layout{i}.jsonl"
        torchrun(nproc, MODEL + MOE + TRAIN + data_args(prefix, tmp_path) + extra +
                 ["--train-iters", "10", "--attention-dropout", "0", "--hidden-dropout", "0", "--log-jsonl", str(log)])
        recs = train_records(log)
        assert sorted(recs) == list(range(1, 11))
        runs.append({key: np.array([recs[it][key] for it in range(1, 11)])
                     for key in ("lm_loss", "load_balancing_loss", "grad_norm")})
    ref = runs[0]
    assert ref["lm_loss"][-1] < ref["lm_loss"][0], f"loss did not fall: {ref['lm_loss']} (corpus seed {seed})"
    for (nproc, extra), got in zip(EP_LAYOUTS[1:], runs[1:]):
        for key, want in ref.items():
            err = np.max(np.abs(got[key] - want) / np.abs(want))
            assert err <= 1e-5, (f"{nproc} procs {extra}: {key} relative error {err:.2e} (corpus seed {seed})\n"
                                 f"{got[key].tolist()}\n{want.tolist()}")


def test_resume_at_expert_parallel_2_is_bit_exact(corpus, tmp_path):
    """EP = 2 with the distributed optimizer, async save and dropout on: a run resumed from the
    iteration-4 checkpoint logs exactly what the straight run logged."""
    import os

    from megafast.checkpoint.commit import write_commit
    from pretrain_run import MODEL, TRAIN, data_args, torchrun, train_records

    prefix, seed = corpus
    common = (MODEL + MOE + TRAIN + data_args(prefix, tmp_path) +
              ["--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--async-save",
               "--train-iters", "8", "--save-interval", "4"])
    straight, resumed = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    torchrun(2, common + ["--save", str(tmp_path / "a"), "--log-jsonl", str(straight)])
    iter4 = tmp_path / "a" / "iter_0000004"
    assert sorted(os.listdir(iter4)) == ["mp_rank_00_000_000", "mp_rank_00_000_001"]
    for ep in range(2):
        assert sorted(os.listdir(iter4 / f"mp_rank_00_000_{ep:03d}")) == [
            f"distrib_optim_dp{ep:03d}.pt", "model_optim_rng.pt"]
    write_commit(str(tmp_path / "a"), 4)  # resume from iteration 4
    torchrun(2, common + ["--load", str(tmp_path / "a"), "--log-jsonl", str(resumed)])
    a, b = train_records(straight), train_records(resumed)
    assert sorted(b) == list(range(5, 9))
    for it in range(5, 9):
        for key in ("lm_loss", "grad_norm", "lr", "consumed_samples", "load_balancing_loss"):
            assert a[it][key] == b[it][key], f"iteration {it} {key}: {a[it][key]} != {b[it][key]} (corpus seed {seed})"


def test_expert_parallel_flag_errors_are_one_line():
    from megafast.arguments import parse_args, validate_args
    from pretrain_run import MODEL, TRAIN

    base = MODEL + TRAIN + ["--mock-data", "--vocab-size", "100", "--train-iters", "1"]
    for flags, world, message in (
        (MOE + ["--expert-model-parallel-size", "3"], 1, "--expert-model-parallel-size 3 does not divide --num-experts 4"),
        (MOE + ["--expert-model-parallel-size", "4"], 2, "--expert-model-parallel-size 4 does not divide the data-parallel size 2"),
        (MOE + ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2"], 2,
         "--expert-model-parallel-size 2 does not divide the data-parallel size 1"),
        (["--expert-model-parallel-size", "2"], 2, "--expert-model-parallel-size 2 needs a mixture-of-experts model"),
        (MOE + ["--expert-model-parallel-size", "0"], 1, "--expert-model-parallel-size must be >= 1"),
    ):
        with pytest.raises(SystemExit) as err:
            validate_args(parse_args(base + flags), world)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(SystemExit):  # argparse: not a dispatcher
        parse_args(base + MOE + ["--moe-token-dispatcher-type", "flex"])
    validate_args(parse_args(base + MOE + ["--expert-model-parallel-size", "2"]), 4)  # DP 4, EP 2: fine


# ------------------------------------------------------------------------------- conversion

def _tiny_mixtral(path: str) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=101, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                           intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    model = MixtralForCausalLM(config)
    g = torch.Generator().manual_seed(draw_seed("mixtral_seed"))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path, max_shard_size="40KB")


def _safetensors(directory: str) -> dict:
    import os

    from safetensors import safe_open

    out = {}
    for file in sorted(os.listdir(directory)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(directory, file), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _load_at_ep2(rank: int, world: int, ckpt: str) -> dict:
    from megafast.config import ParallelConfig
    from megafast.parallel.state import ParallelState
    from megafast.pipeline.partition import build_model_chunks
    from megafast.checkpoint import layout
    from megafast.checkpoint.reader import MegafastCheckpointReader
    from megafast.training.checkpointing import load_checkpoint

    state = ParallelState.create(ParallelConfig(expert_model_parallel_size=2))
    reader = MegafastCheckpointReader(ckpt)
    chunks = build_model_chunks(reader.config, state, seed=3)
    assert load_checkpoint(ckpt, chunks, None, None, state, finetune=True) is not None
    errors = {}
    for name, tensor in chunks[0].state_dict().items():
        full = layout.shard_full(name, reader.full(name), reader.config, 0, 1)  # vocabulary padded
        want = full[rank * 2:(rank + 1) * 2] if ".mlp.experts." in name else full
        errors[name] = bool(torch.equal(tensor, want.to(tensor.dtype)))
    return errors


def test_hf_to_megafast_at_ep2_and_back_is_bit_identical(tmp_path):
    import os

    from megafast.checkpoint.reader import MegafastCheckpointReader
    from megafast.convert.converter import ConvertOptions, convert_checkpoint

    hf_dir = str(tmp_path / "hf")
    _tiny_mixtral(hf_dir)
    ep2 = str(tmp_path / "ep2")
    convert_checkpoint(ConvertOptions("hf", "megafast", hf_dir, ep2, target_tensor_parallel_size=2,
                                      target_pipeline_parallel_size=2, target_expert_parallel_size=2, progress=False))
    iteration = os.path.join(ep2, "release")
    assert sorted(os.listdir(iteration)) == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2)
                                             for e in range(2)]
    part = torch.load(os.path.join(iteration, "mp_rank_01_001_001", "model_optim_rng.pt"), weights_only=False)
    assert part["model"]["decoder.layers.3.mlp.experts.linear_fc1.weight"].shape == (2, 48, 32)  # 2 of 4 experts
    assert MegafastCheckpointReader(ep2).ep == 2

    back = convert_checkpoint(ConvertOptions("megafast", "hf", ep2, str(tmp_path / "back"), progress=False))
    got, want = _safetensors(back), _safetensors(hf_dir)
    assert len([k for k in want if ".experts." in k]) == 3 * 4 * 4
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:4]
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{k} differs after HF -> EP=2 -> HF"

    # re-shard EP=2 (TP=2, PP=2) -> EP=1 (TP=1, PP=1) -> EP=4: the same full tensors
    ep1, ep4 = str(tmp_path / "ep1"), str(tmp_path / "ep4")
    convert_checkpoint(ConvertOptions("megafast", "megafast", ep2, ep1, target_tensor_parallel_size=1,
                                      target_pipeline_parallel_size=1, target_expert_parallel_size=1, progress=False))
    convert_checkpoint(ConvertOptions("megafast", "megafast", ep1, ep4, target_expert_parallel_size=4, progress=False))
    readers = [MegafastCheckpointReader(d) for d in (ep2, ep1, ep4)]
    assert [r.ep for r in readers] == [2, 1, 4]
    for (label, tensors), *others in zip(readers[0].groups(), readers[1].groups(), readers[2].groups()):
        for (_, other) in others:
            assert set(other) == set(tensors) and all(torch.equal(other[k], v) for k, v in tensors.items()), label

    # a training run at DP=2, EP=2 loads the EP=2 checkpoint (TP=1, PP=1: re-sharded from ep1) with its experts
    ep2_tp1 = str(tmp_path / "ep2_tp1")
    convert_checkpoint(ConvertOptions("megafast", "megafast", ep1, ep2_tp1, target_expert_parallel_size=2,
                                      progress=False))
    for rank_ok in run_distributed(_load_at_ep2, 2, ep2_tp1):
        assert all(rank_ok.values()), [n for n, ok in rank_ok.items() if not ok]


def test_conversion_layout_errors(tmp_path):
    import os
    import shutil

    from megafast.convert.converter import ConvertOptions, convert_checkpoint

    hf_dir = str(tmp_path / "hf")
    _tiny_mixtral(hf_dir)
    with pytest.raises(ValueError, match="--expert-model-parallel-size 3 does not divide --num-experts 4"):
        convert_checkpoint(ConvertOptions("hf", "megafast", hf_dir, str(tmp_path / "x"), target_expert_parallel_size=3,
                                          progress=False))
    ep2 = str(tmp_path / "ep2")
    convert_checkpoint(ConvertOptions("hf", "megafast", hf_dir, ep2, target_expert_parallel_size=2, progress=False))
    with pytest.raises(ValueError, match="apply to --saver megafast"):
        convert_checkpoint(ConvertOptions("megafast", "hf", ep2, str(tmp_path / "y"), target_expert_parallel_size=2,
                                          progress=False))
    path = os.path.join(ep2, "release", "mp_rank_00_000_001", "model_optim_rng.pt")
    state = torch.load(path, weights_only=False)
    del state["model"]["decoder.layers.2.mlp.experts.linear_fc2.weight"]  # one EP rank lost an expert stack
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"decoder\.layers\.2\.mlp\.experts\.linear_fc2\.weight"):
        convert_checkpoint(ConvertOptions("megafast", "hf", ep2, str(tmp_path / "z"), progress=False))
    shutil.rmtree(os.path.dirname(path))  # a missing EP rank's file
    with pytest.raises(ValueError, match="is missing|incomplete"):
        convert_checkpoint(ConvertOptions("megafast", "hf", ep2, str(tmp_path / "w"), progress=False))
