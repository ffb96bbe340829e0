"""Running one batch of sequences on every rank of a TP/PP layout.

Rank 0 holds the HTTP server and the scheduler; the other ranks only compute. For each batch,
rank 0 broadcasts the list of requests (plain data, pickled) over a gloo control group, then all
ranks run ``Generator.generate_batch`` on it together (the generator's own collectives carry the
activations and the chosen tokens). An empty list is a heartbeat (the followers wait in a
collective, which would otherwise time out while the server is idle); ``None`` tells the
followers to return.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Optional, Sequence

import torch.distributed as dist

from megafast.generation.generator import Generator, SequenceRequest, SequenceResult, StepCallback


class ServingEngine:
    """The generator of this rank, plus the control channel from rank 0 to the others."""

    HEARTBEAT_S = 60.0  # rank 0 sends a heartbeat when idle this long (well inside the timeout)

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        state = generator.state
        self.rank = state.rank
        self.group = None
        if generator.distributed:  # every rank creates the group, in the same order
            self.group = dist.new_group(backend="gloo", timeout=timedelta(minutes=30))

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def _send(self, message: Optional[list[SequenceRequest]]) -> None:
        if self.group is not None:
            dist.broadcast_object_list([message], src=0, group=self.group)

    def run(self, requests: Sequence[SequenceRequest], on_step: Optional[StepCallback] = None) -> list[SequenceResult]:
        """Rank 0: generate ``requests`` as one batch on every rank."""
        assert self.is_leader
        for request in requests:  # a bad request fails here, before the followers see it
            self.generator.validate(request)
        self._send(list(requests))
        return self.generator.generate_batch(requests, on_step)

    def heartbeat(self) -> None:
        """Rank 0, idle: keep the followers' wait from timing out."""
        self._send([])

    def shutdown(self) -> None:
        """Rank 0: release the followers."""
        self._send(None)

    def follow(self) -> None:
        """Ranks > 0: run every batch rank 0 broadcasts, until it shuts down."""
        assert not self.is_leader and self.group is not None
        while True:
            message: list = [None]
            dist.broadcast_object_list(message, src=0, group=self.group)
            if message[0] is None:
                return
            if message[0]:
                self.generator.generate_batch(message[0])


__all__ = ["ServingEngine"]
