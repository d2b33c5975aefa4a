"""An emulated multi-node cluster on one machine: Linux network namespaces joined by rate-limited links.

Each node is a network namespace. Two nodes are joined by one veth pair; more nodes hang off a Linux
bridge that lives in a namespace of its own. Every inter-node link is limited with `tc tbf` on the
egress of both of its ends, so both directions are throttled. The ranks of a node run inside its
namespace with GLOO_SOCKET_IFNAME set to the node's veth: traffic between ranks of one node takes
the kernel's local path (unthrottled, like NVLink next to a NIC), traffic between nodes crosses the
throttled link (the NIC). Addresses are private ones inside namespaces this module creates.

Everything is removed on every exit path: the context manager's exit, SIGINT/SIGTERM (turned into
exceptions so `finally` runs) and interpreter exit; stale namespaces of dead runs are removed at
start. Needs root and iproute2 (`ip`, `tc`); `check_emulation()` says in one line what is missing.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

PREFIX = "lshmoe"


def check_emulation() -> str | None:
    """None when namespaces can be used here, else a one-line reason."""
    if os.name != "posix" or not os.path.exists("/proc/self/ns/net"):
        return "network namespaces need Linux"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"iproute2 is missing ({', '.join(missing)} not found; apt-get install iproute2)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (run as root, or use --no-emulation)"
    return None


def _run(*args: str, check: bool = True) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def rate_bits(rate: str) -> float:
    """'1gbit', '500mbit', '10gbit', '100kbit' -> bits per second."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?)(bit|bps)?\s*", rate.lower())
    if not m:
        raise ValueError(f"link rate {rate!r}: expected a number with kbit/mbit/gbit, e.g. 1gbit")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return float(m.group(1)) * scale * (8 if m.group(3) == "bps" else 1)


def cleanup_stale() -> list[str]:
    """Delete namespaces left by runs whose process is gone; return their names."""
    removed = []
    for line in _run("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)[a-z]+\d*", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass
class EmulatedCluster:
    nodes: int
    ranks_per_node: int
    link: str | None = "1gbit"  # None = unlimited veth
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    subnet: str = "10.213.77"
    _created: list[str] = field(default_factory=list)
    _handlers: dict = field(default_factory=dict)

    # --------------------------------------------------------------------------- naming

    def ns(self, node: int) -> str:
        return f"{self.tag}n{node}"

    @property
    def switch_ns(self) -> str:
        return f"{self.tag}sw"

    def iface(self, node: int) -> str:
        return f"lv{node}"

    def addr(self, node: int) -> str:
        return f"{self.subnet}.{node + 1}"

    def exec_prefix(self, node: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns(node)]

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    # --------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> EmulatedCluster:
        reason = check_emulation()
        if reason:
            raise RuntimeError(reason)
        cleanup_stale()
        atexit.register(self.teardown)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.teardown()
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._created.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _limit(self, ns: str, dev: str) -> None:
        if self.link is None:
            return
        bits = rate_bits(self.link)
        burst = max(128 * 1024, int(bits / 8 / 250))  # at least one 4 ms tick of tokens
        _run(
            "ip",
            "netns",
            "exec",
            ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            self.link,
            "burst",
            str(burst),
            "latency",
            "100ms",
        )

    def setup(self) -> None:
        if self.nodes < 2:
            raise ValueError("an emulated cluster needs at least 2 nodes")
        for i in range(self.nodes):
            self._add_ns(self.ns(i))
        if self.nodes == 2:
            a, b = self.ns(0), self.ns(1)
            _run(
                "ip",
                "link",
                "add",
                self.iface(0),
                "netns",
                a,
                "type",
                "veth",
                "peer",
                "name",
                self.iface(1),
                "netns",
                b,
            )
        else:
            self._add_ns(self.switch_ns)
            sw = self.switch_ns
            _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", sw, "link", "set", "br0", "up")
            for i in range(self.nodes):
                _run(
                    "ip",
                    "link",
                    "add",
                    self.iface(i),
                    "netns",
                    self.ns(i),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    f"lb{i}",
                    "netns",
                    sw,
                )
                _run("ip", "-n", sw, "link", "set", f"lb{i}", "master", "br0")
                _run("ip", "-n", sw, "link", "set", f"lb{i}", "up")
                self._limit(sw, f"lb{i}")  # traffic into node i
        for i in range(self.nodes):
            ns, dev = self.ns(i), self.iface(i)
            _run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            self._limit(ns, dev)  # traffic out of node i

    def teardown(self) -> None:
        while self._created:
            _run("ip", "netns", "del", self._created.pop(), check=False)
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers.clear()

    # --------------------------------------------------------------------------- observation

    def tx_bytes(self, node: int) -> int:
        """Bytes the node's link interface has transmitted (headers included)."""
        path = f"/sys/class/net/{self.iface(node)}/statistics/tx_bytes"
        out = _run("ip", "netns", "exec", self.ns(node), "cat", path)
        return int(out.strip())

    def rank_env(self, rank: int, port: int) -> dict[str, str]:
        """torchrun-style environment for a rank of this cluster."""
        node = self.node_of(rank)
        return {
            "RANK": str(rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(rank % self.ranks_per_node),
            "LOCAL_WORLD_SIZE": str(self.ranks_per_node),
            "MASTER_ADDR": self.addr(0),
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": self.iface(node),
        }

    def namespaces(self) -> list[str]:
        return list(self._created)


def run_job_ranks(
    cmd: list[str], nodes: int, ranks_per_node: int, link: str | None, emulate: bool, grace_s: float = 30.0
) -> int:
    """Run `cmd` as every rank of a nodes x ranks_per_node job, on an emulated cluster (namespaces,
    throttled links) or on loopback with the same topology; return the job's exit status."""
    from lshmoe.distributed.launch import loopback_envs, supervise

    world = nodes * ranks_per_node
    if emulate:
        with EmulatedCluster(nodes, ranks_per_node, link) as cluster:
            port = 29400 + os.getpid() % 500
            return supervise(
                [cluster.exec_prefix(cluster.node_of(r)) + cmd for r in range(world)],
                [cluster.rank_env(r, port) for r in range(world)],
                grace_s=grace_s,
            )
    return supervise([cmd] * world, loopback_envs(world, ranks_per_node), grace_s=grace_s)
