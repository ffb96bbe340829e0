"""ParallelState: the tensor/context/data/pipeline-parallel process groups of one rank, passed explicitly.

Rank order is Megatron's: tensor-parallel fastest, then context-parallel, then data-parallel, then
pipeline::

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

Context-parallel ranks hold different parts of the same sequences with the same weights, so dense
gradients are summed (and the distributed optimizer sharded) over the DP x CP group
(``dp_cp_group``; :meth:`with_context_in_data` folds CP into DP for the data-parallel machinery).

Expert parallelism (``ep_size`` E, Megatron's scheme with expert tensor parallelism 1): the E
expert-parallel ranks of a group are E consecutive data-parallel ranks (same pipeline, TP and CP
rank), ``dp_rank = expert_dp_index * E + ep_rank``, and each holds ``num_experts / E`` of every MoE
layer's experts (the MoE layer's token dispatcher exchanges tokens over ``ep_group``). The ranks
holding the same experts, the ``dp / E`` ranks of equal ``ep_rank`` times the CP ranks, form
``expert_dp_group``, over which expert gradients are summed and the distributed optimizer shards
expert parameters (dense parameters: ``dp_cp_group``). With E = 1 experts are dense parameters and
no expert group is created.

A group attribute is ``None`` only when that dimension has size 1 (every collective on it is then
the identity); no code here or elsewhere treats ``None`` as "the global group".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megafast.config import ParallelConfig

Group = Optional[dist.ProcessGroup]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


@dataclass
class ParallelState:
    """This rank's coordinates and groups. Build with :meth:`from_env` (torchrun) or :meth:`create`."""

    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    sequence_parallel: bool = False
    tp_group: Group = None
    pp_group: Group = None
    dp_group: Group = None
    cp_size: int = 1
    cp_rank: int = 0
    cp_comm_type: str = "p2p"  # 'p2p' ring attention or 'a2a' all-to-all over heads
    cp_group: Group = None
    cp_ranks: list[int] = field(default_factory=lambda: [0])  # global ranks of this CP group, by cp rank
    dp_cp_group: Group = None  # DP x CP: dense gradient reduction (dp_group when cp == 1)
    # Ranks sharing a tied embedding/output weight: first and last pipeline stage (pp > 1 only).
    embedding_group: Group = None
    # Every rank holding a different part of one model replica (tp x pp): for global grad norms.
    model_parallel_group: Group = None
    pp_ranks: list[int] = field(default_factory=lambda: [0])  # global ranks of this pipeline
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Group = None  # ranks holding different experts of the same layers (E consecutive DP ranks)
    expert_dp_size: int = 1  # dp / E x cp ranks holding the same experts (ep_size > 1 only)
    expert_dp_rank: int = 0
    expert_dp_group: Group = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.dp_size * self.cp_size

    @property
    def rank(self) -> int:
        return ((self.pp_rank * self.dp_size + self.dp_rank) * self.cp_size + self.cp_rank) * self.tp_size + self.tp_rank

    @property
    def dp_cp_size(self) -> int:
        return self.dp_size * self.cp_size

    @property
    def dp_cp_rank(self) -> int:
        return self.dp_rank * self.cp_size + self.cp_rank

    def with_context_in_data(self) -> "ParallelState":
        """This state with CP folded into DP (dp' = dp x cp, dp_rank' = dp_rank x cp + cp_rank,
        dp_group' = the DP x CP group): the view of gradient reduction, the distributed optimizer and
        checkpoint shards, for which CP ranks are replicas. ``rank`` and ``world_size`` are unchanged."""
        if self.cp_size == 1:
            return self
        return replace(self, dp_size=self.dp_cp_size, dp_rank=self.dp_cp_rank, dp_group=self.dp_cp_group,
                       cp_size=1, cp_rank=0, cp_group=None, cp_ranks=[self.rank], cp_comm_type="p2p")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @classmethod
    def single(cls) -> "ParallelState":
        """One process, no parallelism, no process group needed."""
        return cls()

    @classmethod
    def create(cls, config: ParallelConfig) -> "ParallelState":
        """Split the initialised default process group into Megatron's tp/dp/pp groups.

        Every rank must call this with the same config (``new_group`` is collective).
        """
        world, rank = dist.get_world_size(), dist.get_rank()
        tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
        cp = config.context_parallel_size
        dp = config.data_parallel_size(world)

        def coord(r: int) -> tuple[int, int, int, int]:  # (pp_rank, dp_rank, cp_rank, tp_rank)
            return r // (dp * cp * tp), (r // (cp * tp)) % dp, (r // tp) % cp, r % tp

        def rank_of(p: int, d: int, t: int, c: int = 0) -> int:
            return ((p * dp + d) * cp + c) * tp + t

        def own_group(groups: list[list[int]]) -> Group:
            """Create every group (collective, same order on all ranks); return the one holding us."""
            mine = None
            for ranks in groups:
                g = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    mine = g
            return mine

        cs = range(cp)
        tp_groups = [[rank_of(p, d, t, c) for t in range(tp)] for p in range(pp) for d in range(dp) for c in cs]
        dp_groups = [[rank_of(p, d, t, c) for d in range(dp)] for p in range(pp) for c in cs for t in range(tp)]
        pp_groups = [[rank_of(p, d, t, c) for p in range(pp)] for d in range(dp) for c in cs for t in range(tp)]
        mp_groups = [[rank_of(p, d, t, c) for p in range(pp) for t in range(tp)] for d in range(dp) for c in cs]
        emb_groups = [[g[0], g[-1]] for g in pp_groups] if pp > 1 else [[r] for r in range(world)]
        pp_rank, dp_rank, cp_rank, tp_rank = coord(rank)
        dp_group = own_group(dp_groups)
        ep = config.expert_model_parallel_size
        if dp % ep:
            raise ValueError(
                f"--expert-model-parallel-size {ep} does not divide the data-parallel size {dp}: "
                "change --nproc-per-node or the parallel sizes"
            )
        ep_group = expert_dp_group = None
        if ep > 1:  # created only with EP, so that ep == 1 makes exactly the groups it made before
            edp = dp // ep
            ep_groups = [[rank_of(p, x * ep + e, t, c) for e in range(ep)]
                         for p in range(pp) for x in range(edp) for c in cs for t in range(tp)]
            edp_groups = [[rank_of(p, x * ep + e, t, c) for x in range(edp) for c in cs]
                          for p in range(pp) for e in range(ep) for t in range(tp)]
            ep_group, expert_dp_group = own_group(ep_groups), own_group(edp_groups)
        cp_group = dp_cp_group = None
        cp_ranks = [rank]
        if cp > 1:  # created only with CP, so that cp == 1 makes exactly the groups it made before
            cp_groups = [[rank_of(p, d, t, c) for c in cs] for p in range(pp) for d in range(dp) for t in range(tp)]
            dp_cp_groups = [[rank_of(p, d, t, c) for d in range(dp) for c in cs] for p in range(pp) for t in range(tp)]
            cp_group, dp_cp_group = own_group(cp_groups), own_group(dp_cp_groups)
            cp_ranks = next(g for g in cp_groups if rank in g)
        return cls(
            tp_size=tp,
            pp_size=pp,
            dp_size=dp,
            tp_rank=tp_rank,
            pp_rank=pp_rank,
            dp_rank=dp_rank,
            sequence_parallel=config.sequence_parallel,
            tp_group=own_group(tp_groups),
            dp_group=dp_group,
            pp_group=own_group(pp_groups),
            model_parallel_group=own_group(mp_groups),
            embedding_group=own_group(emb_groups),
            pp_ranks=next(g for g in pp_groups if rank in g),
            cp_size=cp,
            cp_rank=cp_rank,
            cp_comm_type=config.cp_comm_type,
            cp_group=cp_group,
            cp_ranks=cp_ranks,
            dp_cp_group=dp_cp_group if cp > 1 else dp_group,
            ep_size=ep,
            ep_rank=dp_rank % ep,
            ep_group=ep_group,
            expert_dp_size=(dp // ep) * cp if ep > 1 else 1,
            expert_dp_rank=(dp_rank // ep) * cp + cp_rank if ep > 1 else 0,
            expert_dp_group=expert_dp_group,
        )

    @classmethod
    def from_env(
        cls, config: ParallelConfig, backend: Optional[str] = None, timeout_minutes: float = 10.0
    ) -> "ParallelState":
        """Initialise the default process group from torchrun's environment, then :meth:`create`.

        The layout is validated against WORLD_SIZE before any process group work starts.
        """
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing and not dist.is_initialized():
            raise ValueError(
                f"torch.distributed environment variables {', '.join(missing)} are not set: "
                "launch with torchrun (e.g. `torchrun --nproc-per-node N ...`)"
            )
        if not dist.is_initialized():
            config.data_parallel_size(int(os.environ["WORLD_SIZE"]))
            backend = backend or default_backend()
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
        return cls.create(config)
