"""Run a test function on N gloo ranks (CPU), each in its own spawned process.

    results = run_distributed(fn, world_size, *args)

`fn(rank, world_size, *args)` must be a module-level function (it is pickled by reference). The
ranks rendezvous through a FileStore in a fresh temporary directory, so concurrent tests never
collide on ports. A failure on any rank re-raises here with that rank's traceback; the list of
per-rank return values is returned otherwise.
"""

from __future__ import annotations

import io
import os
import tempfile
import queue as queue_module
import traceback

import torch
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 300


def _worker(fn, rank, world_size, init_file, args, queue):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            # Serialised to bytes: tensors in a Queue travel as shared-memory handles that vanish
            # when this process exits before the parent reads them.
            buf = io.BytesIO()
            torch.save(fn(rank, world_size, *args), buf)
            queue.put((rank, True, buf.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_distributed(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT_S) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="megafast-dist-") as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, init_file, args, queue), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, object] = {}
        errors: list[str] = []
        try:
            for _ in range(world_size):
                rank, ok, value = queue.get(timeout=timeout)
                if ok:
                    results[rank] = torch.load(io.BytesIO(value), weights_only=False)
                else:
                    errors.append(f"rank {rank} failed:\n{value}")
                    break  # the other ranks are likely blocked in a collective
        except queue_module.Empty:
            errors.append(f"timed out after {timeout}s waiting for ranks")
        finally:
            for p in procs:
                p.join(timeout=1 if errors else 30)
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            raise AssertionError("\n".join(errors))
        return [results[r] for r in range(world_size)]
