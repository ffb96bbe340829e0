"""GPTModel at TP = 1, 2, 4 (with and without sequence parallelism) equals a plain-torch reference.

Each rank builds its shard of the model from the seed, runs forward/backward on the same batch,
and the gathered logits, loss and gradients must match tests/reference_model.py loaded with the
gathered initial weights, within 1e-5 relative (fp32). The gathered initial weights must also be
bit-identical at every TP size.
"""

from __future__ import annotations


import pytest
import torch

from dist import run_distributed
from seeding import draw_seed
from megafast.config import GPTConfig, ParallelConfig
from megafast.model import GPTModel
from megafast.parallel import ParallelState, sync_sequence_parallel_grads
from megafast.parallel.layers import gather_full
from megafast.parallel.mappings import gather_from_tensor_parallel_region
from reference_model import RefGPT

VOCAB = 1001


def llama_config(**kw) -> GPTConfig:
    base = dict(
        num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96,
        vocab_size=VOCAB, max_position_embeddings=64, position_embedding_type="rope", rotary_base=500000.0,
        normalization="RMSNorm", activation="swiglu", add_bias_linear=False, tie_embeddings=False,
        init_method_std=0.1, make_vocab_size_divisible_by=1,  # padded vocab 1001 / 1002 / 1004: not divisible by TP
    )
    base.update(kw)
    return GPTConfig(**base)


def gpt2_config(**kw) -> GPTConfig:
    base = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
        init_method_std=0.1, make_vocab_size_divisible_by=1,
    )
    base.update(kw)
    return GPTConfig(**base)


CONFIGS = {
    "llama": llama_config,
    "llama_tied_qkvbias": lambda: llama_config(tie_embeddings=True, add_qkv_bias=True, num_query_groups=8),
    "gpt2": gpt2_config,
    "gpt2_tanh": lambda: gpt2_config(activation="gelu_tanh", num_layers=1),
    # the output layer + loss fused (torch ops here; Triton below), and the Triton kernels
    # (interpreted): vocabulary-parallel cross-entropy and the fused residual-add + RMSNorm
    "llama_fused_ce": lambda: llama_config(fused_linear_cross_entropy=True),
    # Qwen3's per-head q/k norm (its weight's gradient summed over TP) and a sliding window of 5
    "llama_qknorm_window": lambda: llama_config(num_layers=2, qk_layernorm=True, window_size=(5, 0)),
    "llama_triton": lambda: llama_config(num_layers=2, kernels="triton", attention_backend="sdpa"),
    "llama_tied_triton_fused_ce": lambda: llama_config(
        num_layers=2, tie_embeddings=True, kernels="triton", attention_backend="sdpa",
        fused_linear_cross_entropy=True,
    ),
}


def make_batch(seed: int, b: int = 2, s: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    labels[0, :3] = -100  # ignored tokens
    return ids, labels


def run_shard(state: ParallelState, config: GPTConfig, seed: int, data_seed: int) -> dict:
    """Forward/backward one batch on this rank; return gathered (full, unpadded) tensors."""
    model = GPTModel(config, state, seed=seed)
    params = dict(model.named_parameters())
    tp = state.tp_group

    def full(t: torch.Tensor, name: str) -> torch.Tensor:
        out = gather_full(t, params[name], tp).detach().clone()
        return out[: config.vocab_size] if name.endswith(("word_embeddings.weight", "output_layer.weight")) else out

    init = {n: full(p, n) for n, p in params.items()}
    ids, labels = make_batch(data_seed)
    token_loss = model(ids, labels=labels)  # [b, s]
    mean_loss = token_loss.sum() / (labels != -100).sum()
    mean_loss.backward()
    sync_sequence_parallel_grads(model, tp)
    with torch.no_grad():
        logits = gather_from_tensor_parallel_region(model(ids), tp)[..., : config.vocab_size]
    return {
        "init": init,
        "grads": {n: full(p.grad, n) for n, p in params.items()},
        "loss": token_loss.detach(),
        "logits": logits,
    }


def worker(rank: int, world: int, cases: list[tuple[str, bool]], seed: int, data_seed: int) -> dict:
    out = {}
    for name, sp in cases:
        state = ParallelState.create(ParallelConfig(tensor_model_parallel_size=world, sequence_parallel=sp))
        result = run_shard(state, CONFIGS[name](), seed, data_seed)
        if rank == 0:
            out[(name, sp)] = result
    return out


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    """max |a - e| <= tol * max |e| (the scale-relative error of the whole tensor)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol}"


def reference(config: GPTConfig, init: dict, data_seed: int) -> dict:
    ref = RefGPT(config)
    ref.load_megafast(init)
    ids, labels = make_batch(data_seed)
    token_loss = ref.loss(ids, labels)
    (token_loss.sum() / (labels != -100).sum()).backward()
    with torch.no_grad():
        logits = ref(ids)
    return {"loss": token_loss.detach(), "logits": logits, "grads": ref.grads_in_megafast_layout()}


@pytest.fixture(scope="module")
def seeds() -> tuple[int, int]:
    return draw_seed("seed"), draw_seed("data_seed")


@pytest.fixture(scope="module")
def tp1_results(seeds):
    torch.manual_seed(0)
    seed, data_seed = seeds
    return {(n, False): run_shard(ParallelState.single(), CONFIGS[n](), seed, data_seed) for n in CONFIGS}


def check_against_reference(results: dict, data_seed: int) -> None:
    for (name, sp), got in results.items():
        want = reference(CONFIGS[name](), got["init"], data_seed)
        tag = f"{name} sp={sp}"
        assert_rel_close(got["logits"], want["logits"], what=f"{tag} logits")
        assert_rel_close(got["loss"], want["loss"], what=f"{tag} loss")
        assert set(got["grads"]) == set(want["grads"])
        for n in want["grads"]:
            assert_rel_close(got["grads"][n], want["grads"][n], what=f"{tag} grad {n}")


def test_tp1_matches_reference(tp1_results, seeds):
    check_against_reference(tp1_results, seeds[1])


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_reference_and_init_is_tp_invariant(tp, tp1_results, seeds):
    seed, data_seed = seeds
    cases = [(n, sp) for n in CONFIGS for sp in (False, True)]
    results = run_distributed(worker, tp, cases, seed, data_seed)[0]
    check_against_reference(results, data_seed)
    for (name, sp), got in results.items():
        base = tp1_results[(name, False)]["init"]
        for n, w in got["init"].items():
            assert torch.equal(w, base[n]), f"{name} sp={sp}: initial {n} differs between TP=1 and TP={tp}"


def test_seed_changes_weights():
    a = GPTModel(llama_config(), seed=1).state_dict()
    b = GPTModel(llama_config(), seed=2).state_dict()
    c = GPTModel(llama_config(), seed=1).state_dict()
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert not torch.equal(a[name], b[name])
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_pipeline_stages_compose_to_the_full_model(seeds):
    """Two stages (in one process) passing hidden states equal the one-stage model; the tied
    output layer of the last stage starts equal to the embedding, and its gradient plus the
    embedding's equals the reference's tied gradient."""
    seed, data_seed = seeds
    config = llama_config(tie_embeddings=True)
    ids, labels = make_batch(data_seed)
    whole = GPTModel(config, seed=seed)
    want = whole(ids, labels=labels)
    want.sum().backward()

    stages = [GPTModel(config, ParallelState(pp_size=2, pp_rank=r), seed=seed) for r in range(2)]
    assert stages[0].layer_range == (0, 2) and stages[1].layer_range == (2, 4)
    assert stages[1].embedding is None and stages[0].decoder.final_layernorm is None
    assert torch.equal(stages[1].output_layer.weight, stages[0].embedding.word_embeddings.weight)
    hidden = stages[0](ids)
    hidden_in = hidden.detach().requires_grad_()  # what stage 1 receives over p2p
    got = stages[1](hidden_states=hidden_in, labels=labels)
    got.sum().backward()
    hidden.backward(hidden_in.grad)  # the gradient stage 1 sends back
    assert torch.equal(got, want)
    whole_grads = {n: p.grad for n, p in whole.named_parameters()}
    for stage in stages:
        for n, p in stage.named_parameters():
            if n != "output_layer.weight" and not n.startswith("embedding."):
                assert_rel_close(p.grad, whole_grads[n], what=f"stage grad {n}")
    tied = stages[0].embedding.word_embeddings.weight.grad + stages[1].output_layer.weight.grad
    assert_rel_close(tied, whole_grads["embedding.word_embeddings.weight"], what="tied embedding grad")
    assert stages[1].shared_embedding_parameters() == [stages[1].output_layer.weight]


def _layer_keys(i: int, bias: bool, norm_bias: bool) -> list[str]:
    """DESIGN.md's names for layer i, in module order (weight before bias)."""
    def wb(name: str, has_bias: bool) -> list[str]:
        return [f"decoder.layers.{i}.{name}.weight"] + ([f"decoder.layers.{i}.{name}.bias"] if has_bias else [])
    return (wb("input_layernorm", norm_bias) + wb("self_attention.linear_qkv", bias)
            + wb("self_attention.linear_proj", bias) + wb("pre_mlp_layernorm", norm_bias)
            + wb("mlp.linear_fc1", bias) + wb("mlp.linear_fc2", bias))


def test_state_dict_keys_are_the_design_names():
    """The exact state-dict keys (and order) of DESIGN.md for GPT-2 (tied, learned positions, biases),
    Llama (untied), a tied two-stage pipeline and LoRA on the output layer; written out by hand."""
    from megafast.config import LoRAConfig
    from megafast.model.lora import LoRAAdapter

    gpt2 = GPTModel(gpt2_config(), seed=3).state_dict()
    assert list(gpt2) == (
        ["embedding.word_embeddings.weight", "embedding.position_embeddings.weight"]
        + _layer_keys(0, True, True) + _layer_keys(1, True, True)
        + ["decoder.final_layernorm.weight", "decoder.final_layernorm.bias"]
    )  # tied on one stage: no output_layer.weight

    llama = GPTModel(llama_config(), seed=3)
    keys = (["embedding.word_embeddings.weight"] + [k for i in range(4) for k in _layer_keys(i, False, False)]
            + ["decoder.final_layernorm.weight", "output_layer.weight"])
    assert list(llama.state_dict()) == keys
    assert [n for n, _ in llama.named_parameters()] == keys
    adapter = LoRAAdapter(llama.output_layer, LoRAConfig(2, 4.0, 0.0), "output_layer", 3, llama.tracker)
    llama.output_layer.adapter = adapter
    assert list(llama.state_dict()) == keys + [
        "output_layer.adapter.linear_in.weight", "output_layer.adapter.linear_out.weight"
    ]
    assert adapter.linear_out.weight.shape == (VOCAB, 2) and adapter.column

    config = llama_config(tie_embeddings=True)
    stages = [GPTModel(config, ParallelState(pp_size=2, pp_rank=r), seed=3).state_dict() for r in range(2)]
    first = ["embedding.word_embeddings.weight"] + _layer_keys(0, False, False) + _layer_keys(1, False, False)
    assert list(stages[0]) == first
    assert list(stages[1]) == (_layer_keys(2, False, False) + _layer_keys(3, False, False)
                               + ["decoder.final_layernorm.weight", "output_layer.weight"])
    assert torch.equal(stages[1]["output_layer.weight"], stages[0]["embedding.word_embeddings.weight"])
