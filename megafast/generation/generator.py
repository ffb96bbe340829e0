"""KV-cached autoregressive generation over tensor- and pipeline-parallel ranks.

Each rank holds one pipeline stage of one TP shard (one model chunk). A step forwards the new
tokens through the stages: the first embeds them, every stage runs its layers with its KV cache
(megafast.model.kv_cache) and hands the hidden states [s, b, h] to the next stage with a
blocking send/recv over the pipeline group; the last stage gathers the vocabulary-parallel
logits of the last position over TP, picks the next token (megafast.generation.sampling), and
the token is broadcast from the last stage to every rank, which feeds it to the next step.

Step 0 (prefill) forwards the whole prompt at positions 0 .. n-1; step t > 0 one token at
position n + t - 1. Every rank stops at the same step (an EOS token, or ``max_new_tokens``).
Data-parallel replicas (world > tp x pp) all compute the same tokens; the broadcast comes from
replica 0.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megafast.checkpoint.reader import MegafastCheckpointReader, load_resharded
from megafast.generation.sampling import SamplingConfig, sample
from megafast.model.gpt import GPTModel
from megafast.model.kv_cache import InferenceParams
from megafast.parallel.mappings import gather_from_tensor_parallel_region
from megafast.parallel.state import ParallelState
from megafast.pipeline.partition import build_model_chunks


def load_for_generation(
    reader: MegafastCheckpointReader,
    state: ParallelState,
    *,
    params_dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> GPTModel:
    """This rank's stage of the checkpoint's model at ``state``'s layout (any TP/PP), in eval mode."""
    config = dataclasses.replace(
        reader.config, hidden_dropout=0.0, attention_dropout=0.0, recompute_granularity=None
    )
    chunks = build_model_chunks(config, state, seed=0, params_dtype=params_dtype, device=device)
    load_resharded(reader, chunks, state)
    return chunks[0].eval()


class Generator:
    """Generates continuations of token prompts with ``model`` (this rank's stage and TP shard)."""

    def __init__(self, model: GPTModel, state: ParallelState) -> None:
        self.model = model.eval()
        self.state = state
        self.config = model.config
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.distributed = dist.is_available() and dist.is_initialized() and state.world_size > 1

    @torch.no_grad()
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig,
        *,
        eos_ids: Iterable[int] = (),
        seed: int = 1234,
    ) -> list[int]:
        """The new token ids (at most ``max_new_tokens``, ending with an EOS id if one was drawn)."""
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})"
            )
        total = len(prompt) + max_new_tokens
        if (
            self.config.position_embedding_type == "learned_absolute"
            and total > self.config.max_position_embeddings
        ):
            raise ValueError(
                f"prompt ({len(prompt)}) + --max-new-tokens ({max_new_tokens}) exceed the model's "
                f"{self.config.max_position_embeddings} learned positions: shorten them"
            )
        if self.model.rotary is not None:
            self.model.rotary(total, self.device)  # one RoPE table for every step
        cache = InferenceParams(1, total)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        eos = set(eos_ids)
        tokens = torch.tensor([prompt], dtype=torch.long, device=self.device)  # [1, s]
        out: list[int] = []
        for _ in range(max_new_tokens):
            logits = self._forward(tokens, cache)
            cache.advance(tokens.shape[1])
            token = sample(logits, sampling, generator) if logits is not None else None
            token = self._broadcast(token)  # [1] on every rank
            out.append(int(token.item()))
            if out[-1] in eos:
                break
            tokens = token.view(1, 1)
        return out

    def _forward(self, tokens: torch.Tensor, cache: InferenceParams) -> Optional[torch.Tensor]:
        """One step through this stage: the last stage returns fp32 logits [b, V] of the last position."""
        st, b, s = self.state, tokens.shape[0], tokens.shape[1]
        start = cache.sequence_len_offset
        positions = torch.arange(start, start + s, device=self.device).expand(b, s)
        if st.is_first_stage:
            x = self.model(tokens, position_ids=positions, inference_params=cache)
        else:
            x = torch.empty(s, b, self.config.hidden_size, dtype=self.dtype, device=self.device)  # [s, b, h]
            dist.recv(x, src=st.pp_ranks[st.pp_rank - 1], group=st.pp_group)
            x = self.model(hidden_states=x, position_ids=positions, inference_params=cache)
        if not st.is_last_stage:
            dist.send(x.contiguous(), dst=st.pp_ranks[st.pp_rank + 1], group=st.pp_group)
            return None
        local = x[:, -1].contiguous()  # [b, V_padded/p]
        full = gather_from_tensor_parallel_region(local, st.tp_group)  # [b, V_padded]
        return full[:, : self.config.vocab_size].float()

    def _broadcast(self, token: Optional[torch.Tensor]) -> torch.Tensor:
        """The token chosen on the last stage (tp rank 0 of DP replica 0), on every rank."""
        if not self.distributed:
            return token
        st = self.state
        buf = token.clone() if token is not None else torch.zeros(1, dtype=torch.long, device=self.device)
        src = (st.pp_size - 1) * st.dp_size * st.tp_size  # rank (pp = last, dp = 0, tp = 0)
        dist.broadcast(buf, src=src, group=dist.group.WORLD)
        return buf
