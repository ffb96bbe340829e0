"""KV-cached autoregressive generation over tensor- and pipeline-parallel ranks.

Each rank holds one pipeline stage of one TP shard (one model chunk). A step forwards the new
tokens through the stages: the first embeds them, every stage runs its layers with its KV cache
(megafast.model.kv_cache) and hands the hidden states [s, b, h] to the next stage with a
blocking send/recv over the pipeline group; the last stage gathers the vocabulary-parallel
logits of the last position over TP, picks the next token (megafast.generation.sampling), and
the token is broadcast from the last stage to every rank, which feeds it to the next step.

Step 0 (prefill) forwards the whole prompt at positions 0 .. n-1; step t > 0 one token at
position n + t - 1. Every rank stops at the same step (an EOS token, or ``max_new_tokens``).

Batches (:meth:`Generator.generate_batch`): prompts of different lengths are left-padded to the
longest (the KV cache masks each row's padding, megafast.model.kv_cache; each row's positions
start at 0 at its first real token), and each row has its own length limit, sampling settings and
seed (its own ``torch.Generator``, so a row draws the same tokens in any batch) and stop rules
(megafast.generation.stopping). A finished row leaves the batch (its cache rows are dropped);
the batch ends when every row has finished. Every rank applies the same stop rules to the same
broadcast tokens, so all ranks agree on which rows remain.
Data-parallel replicas (world > tp x pp) all compute the same tokens; the broadcast comes from
replica 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from megafast.checkpoint.reader import MegafastCheckpointReader, load_resharded
from megafast.generation.sampling import SamplingConfig, sample
from megafast.generation.stopping import Detokenize, TextTracker
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


@dataclass
class SequenceRequest:
    """One sequence of a batch: prompt token ids and how to continue it (plain data: picklable)."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    seed: int = 1234
    eos_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop sequences (need the generator's detokenize)


@dataclass
class SequenceResult:
    token_ids: list[int]  # the generated tokens (an EOS or the stop sequence's last token included)
    finish_reason: str  # "stop" (EOS or stop sequence) or "length"
    text: Optional[str]  # the decoded text without EOS / stop sequence (None without a tokenizer)


# on_step(row, tracker) after each new token of a row (the tracker's finish_reason is set on its last)
StepCallback = Callable[[int, TextTracker], None]


class Generator:
    """Generates continuations of token prompts with ``model`` (this rank's stage and TP shard).

    ``detokenize`` (a tokenizer's) gives results their text and makes stop sequences possible."""

    def __init__(self, model: GPTModel, state: ParallelState, detokenize: Optional[Detokenize] = None) -> None:
        self.model = model.eval()
        self.state = state
        self.config = model.config
        self.detokenize = detokenize
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
        request = SequenceRequest(list(prompt), max_new_tokens, sampling, seed, tuple(eos_ids))
        return self.generate_batch([request])[0].token_ids

    def validate(self, request: SequenceRequest) -> None:
        """Raise ValueError (one line) for a request this model cannot run."""
        prompt, new = request.prompt, request.max_new_tokens
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if new < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {new}")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if request.stop and self.detokenize is None:
            raise ValueError("stop sequences need a tokenizer to decode the text: pass --tokenizer-* flags")
        if (
            self.config.position_embedding_type == "learned_absolute"
            and len(prompt) + new > self.config.max_position_embeddings
        ):
            raise ValueError(
                f"prompt ({len(prompt)}) + --max-new-tokens ({new}) exceed the model's "
                f"{self.config.max_position_embeddings} learned positions: shorten them"
            )

    @torch.no_grad()
    def generate_batch(
        self, requests: Sequence[SequenceRequest], on_step: Optional[StepCallback] = None
    ) -> list[SequenceResult]:
        """Every request continued in one left-padded batch (module docstring); results in order."""
        if not requests:
            return []
        for request in requests:
            self.validate(request)
        b = len(requests)
        lengths = [len(r.prompt) for r in requests]
        longest = max(lengths)
        total = longest + max(r.max_new_tokens for r in requests)  # cache slots
        if self.model.rotary is not None:
            self.model.rotary(total, self.device)  # one RoPE table for every step
        pads = [longest - n for n in lengths]
        padding = torch.tensor(pads, device=self.device) if any(pads) else None  # [b]
        cache = InferenceParams(b, total, padding)
        trackers = [TextTracker(self.detokenize, r.stop, r.eos_ids) for r in requests]
        generators = [torch.Generator(device=self.device).manual_seed(r.seed) for r in requests]
        tokens = torch.tensor([[0] * p + r.prompt for p, r in zip(pads, requests)], device=self.device)  # [b, s]
        active = list(range(b))  # the requests still in the batch, in row order
        while active:
            logits = self._forward(tokens, cache)  # [b', V] on the last stage
            cache.advance(tokens.shape[1])
            new = self._sample(logits, [requests[i] for i in active], [generators[i] for i in active])
            new = self._broadcast(new, len(active)).tolist()  # [b'] on every rank
            keep: list[int] = []
            for row, (i, token) in enumerate(zip(active, new)):
                tracker = trackers[i]
                if tracker.add(token) is None and len(tracker.token_ids) >= requests[i].max_new_tokens:
                    tracker.finish("length")
                if tracker.finish_reason is None:
                    keep.append(row)
                if on_step is not None:
                    on_step(i, tracker)
            tokens = torch.tensor(new, device=self.device).view(-1, 1)  # [b', 1]
            if len(keep) < len(active):
                rows = torch.tensor(keep, dtype=torch.long, device=self.device)
                if keep:
                    cache.select(rows)
                    tokens = tokens.index_select(0, rows)
                active = [active[row] for row in keep]
        return [
            SequenceResult(t.token_ids, t.finish_reason or "length", t.text if self.detokenize else None)
            for t in trackers
        ]

    def _sample(
        self,
        logits: Optional[torch.Tensor],
        requests: list[SequenceRequest],
        generators: list[torch.Generator],
    ) -> Optional[torch.Tensor]:
        """Next tokens [b'] from logits [b', V], each row with its own settings and generator."""
        if logits is None:
            return None
        if all(r.sampling.greedy for r in requests):
            return logits.argmax(dim=-1)
        return torch.cat(
            [sample(logits[i : i + 1], r.sampling, g) for i, (r, g) in enumerate(zip(requests, generators))]
        )

    def _forward(self, tokens: torch.Tensor, cache: InferenceParams) -> Optional[torch.Tensor]:
        """One step through this stage: the last stage returns fp32 logits [b, V] of the last position."""
        st, b, s = self.state, tokens.shape[0], tokens.shape[1]
        start = cache.sequence_len_offset
        positions = torch.arange(start, start + s, device=self.device).expand(b, s)
        if cache.padding is not None:  # each row's positions start at its first real token
            positions = (positions - cache.padding[:, None]).clamp_min(0)
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

    def _broadcast(self, token: Optional[torch.Tensor], b: int) -> torch.Tensor:
        """The tokens [b] chosen on the last stage (tp rank 0 of DP replica 0), on every rank."""
        if not self.distributed:
            return token
        st = self.state
        buf = token.clone() if token is not None else torch.zeros(b, dtype=torch.long, device=self.device)
        src = (st.pp_size - 1) * st.dp_size * st.tp_size  # rank (pp = last, dp = 0, tp = 0)
        dist.broadcast(buf, src=src, group=dist.group.WORLD)
        return buf
