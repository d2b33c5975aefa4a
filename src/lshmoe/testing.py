"""Run a Python function on W local ranks joined by a real gloo process group.

Used by the multi-process tests and the benchmarks: each rank is a fresh spawned interpreter, the
process group rendezvous through a file (no ports to collide), every collective has a short timeout,
and each rank's return value is sent back to the caller. An exception on any rank is re-raised in
the caller with that rank's traceback; the other ranks are terminated, never left hanging.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from lshmoe.distributed.comm import Comm
from lshmoe.distributed.setup import build_comm
from lshmoe.distributed.topology import Topology


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    ep_size: int,
    ranks_per_node: int,
    store_path: str,
    out_dir: str,
    timeout_s: float,
    threads: int,
    args: tuple,
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank % ranks_per_node),
        LOCAL_WORLD_SIZE=str(ranks_per_node),
    )
    torch.set_num_threads(threads)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        if world_size > 1:
            dist.init_process_group(
                "gloo",
                init_method=f"file://{store_path}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
            comm = build_comm(
                rank, world_size, ep_size or world_size, Topology(world_size, ranks_per_node), torch.device("cpu")
            )
        else:
            comm = Comm.local()
        result = fn(comm, *args)
        torch.save({"ok": True, "result": result}, result_path)
    except BaseException as e:  # noqa: BLE001 - report every failure to the caller
        torch.save(
            {"ok": False, "error": f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"}, result_path
        )
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    ep_size: int = 0,
    ranks_per_node: int = 0,
    timeout_s: float = 60.0,
    threads: int = 1,
    deadline_s: float = 900.0,
) -> list[Any]:
    """Call `fn(comm, *args)` on `world_size` spawned ranks; return the per-rank results in rank order.

    `fn` must be importable by name (a module-level function). Results travel via torch.save, so
    tensors and plain Python values are fine. Ranks still running after `deadline_s` are killed.
    """
    rpn = ranks_per_node or world_size
    with tempfile.TemporaryDirectory(prefix="lshmoe-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, ep_size, rpn, store, tmp, timeout_s, threads, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        start = time.monotonic()
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() - start > deadline_s:
                    for p in ctx.processes:
                        p.kill()
                    raise TimeoutError(f"ranks still running after {deadline_s:.0f} s; killed")
        except ProcessException:
            errors = []
            for r in range(world_size):
                path = os.path.join(tmp, f"rank{r}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        errors.append(rec["error"])
            if errors:
                raise RuntimeError("\n".join(errors)) from None
            raise
        results = []
        for r in range(world_size):
            rec = torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
            results.append(rec["result"])
        return results
