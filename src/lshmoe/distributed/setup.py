"""Process-group initialisation from torchrun-style environment variables.

Reads RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE (set by torchrun or by `lshmoe.distributed.launch`),
initialises the default process group with a finite timeout (so a dead peer fails a collective
instead of hanging it), builds the world / expert-parallel / expert-data-parallel groups once, in
the same order on every rank, and returns the rank's `Comm`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lshmoe.config import DistConfig
from lshmoe.distributed.comm import Comm, Group
from lshmoe.distributed.ledger import CommLedger
from lshmoe.distributed.topology import Topology, edp_groups, ep_groups
from lshmoe.distributed.watchdog import Watchdog
from lshmoe.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RankEnv:
    """This process's place in the job, as torchrun describes it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_environ(cls) -> RankEnv:
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(
            rank=int(env.get("RANK", "0")),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
        )


def pick_device(cfg: DistConfig, env: RankEnv) -> torch.device:
    """`auto` takes a GPU per local rank when there are enough, else the CPU."""
    want = cfg.device
    if want == "auto":
        enough = torch.cuda.is_available() and torch.cuda.device_count() >= env.local_world_size
        want = "cuda" if enough else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("dist.device=cuda but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def pick_backend(cfg: DistConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


def set_threads(cfg: DistConfig, env: RankEnv) -> None:
    """Give each local rank its share of the cores (torchrun would set OMP_NUM_THREADS=1)."""
    n = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, env.local_world_size))
    torch.set_num_threads(n)


def init_comm(cfg: DistConfig, ep_size: int = 0, timeline: int = 0) -> Comm:
    """Initialise torch.distributed (when WORLD_SIZE > 1) and build this rank's groups and ledger."""
    env = RankEnv.from_environ()
    set_threads(cfg, env)
    device = pick_device(cfg, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rpn = cfg.ranks_per_node or env.local_world_size or env.world_size
    if env.world_size % rpn:
        raise ConfigError(f"dist.ranks_per_node={rpn} must divide the world size {env.world_size}")
    topo = Topology(env.world_size, rpn)
    ep = ep_size or env.world_size
    if env.world_size == 1:
        comm = Comm.local(device)
        comm.ledger = CommLedger(0, topo.node_map(), timeline)
        return comm
    if not dist.is_initialized():
        dist.init_process_group(
            backend=pick_backend(cfg, device),
            timeout=timedelta(seconds=cfg.timeout_s),
            rank=env.rank,
            world_size=env.world_size,
            store=_attempt_store(env, cfg.timeout_s),
        )
    comm = build_comm(env.rank, env.world_size, ep, topo, device, timeline)
    if cfg.heartbeat_s > 0 and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        comm.watchdog = Watchdog(
            env.rank, env.world_size, lambda: comm.seq, cfg.heartbeat_s, dead_after_s=cfg.timeout_s
        ).start()
        _WATCHDOGS.append(comm.watchdog)
    return comm


def _attempt_store(env: RankEnv, timeout_s: float) -> dist.Store | None:
    """Under torchrun's agent store, a store whose keys are this restart attempt's own.

    NOTE: the agent keeps its store across restarts, and (seen with torch 2.13 and gloo) the workers
    of a restarted attempt read their peers' addresses from the attempt before and never connect; a
    prefix per attempt (TORCHELASTIC_RESTART_COUNT) keeps the attempts apart. None: let torch use env://.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env.world_size,
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.PrefixStore(f"lshmoe/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", base)


_WATCHDOGS: list[Watchdog] = []  # started by init_comm; shutdown() stops and joins them


def build_comm(
    rank: int, world_size: int, ep_size: int, topo: Topology, device: torch.device, timeline: int = 0
) -> Comm:
    """Create the groups (every rank calls new_group for every group, in the same order)."""
    groups: dict[str, Group] = {"world": Group("world", tuple(range(world_size)), rank, dist.group.WORLD)}
    rpn = topo.ranks_per_node
    layouts = (
        ("ep", ep_groups(world_size, ep_size)),
        ("edp", edp_groups(world_size, ep_size)),
        ("node", [topo.node_ranks(n) for n in range(topo.num_nodes)]),  # ranks sharing a node
        ("lane", [tuple(range(i, world_size, rpn)) for i in range(rpn)]),  # same local index, every node
        # the world again, as its own process group: gradient all-reduces issued from the
        # scheduler thread never interleave with the model's collectives on one group
        ("grad", [tuple(range(world_size))]),
    )
    for name, layout in layouts:
        for ranks in layout:
            if len(ranks) == world_size and name != "grad":
                pg = dist.group.WORLD
            elif len(ranks) == 1:
                pg = None
            else:
                pg = dist.new_group(list(ranks))
            if rank in ranks:
                groups[name] = Group(name, ranks, ranks.index(rank), pg)
    return Comm(rank, world_size, groups, CommLedger(rank, topo.node_map(), timeline), device, topo.node_map())


def shutdown() -> None:
    """Stop this process's watchdogs (joined, see Watchdog.stop), then tear the process group down."""
    while _WATCHDOGS:
        _WATCHDOGS.pop().stop()
    if dist.is_initialized():
        dist.destroy_process_group()
