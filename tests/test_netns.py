"""The emulated cluster: namespaces, rate limits and clean-up on every exit path, and the byte cross-check
of the ledger against the interface counters. Skipped with the reason when namespaces cannot be made."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from lshmoe.bench.netns import EmulatedCluster, check_emulation, rate_bits

REASON = check_emulation()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"emulated cluster unavailable: {REASON}")


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _qdiscs(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show"], capture_output=True, text=True).stdout


def test_rate_parsing():
    assert rate_bits("1gbit") == 1e9 and rate_bits("500mbit") == 5e8 and rate_bits("10MBps") == 8e7
    with pytest.raises(ValueError):
        rate_bits("fast")


@pytest.mark.parametrize("nodes", [2, 3])
def test_setup_and_teardown(nodes):
    with EmulatedCluster(nodes, 2, "200mbit") as c:
        made = set(c.namespaces())
        assert made <= _netns() and len(made) == nodes + (nodes > 2)
        for i in range(nodes):
            assert "tbf" in _qdiscs(c.ns(i)) and "rate 200Mbit" in _qdiscs(c.ns(i))
        if nodes > 2:
            assert _qdiscs(c.switch_ns).count("tbf") == nodes, "the switch side limits traffic into each node"
        probe = f"import socket; socket.create_connection(('{c.addr(1)}', 9), timeout=2)"
        ping = subprocess.run(c.exec_prefix(0) + [sys.executable, "-c", probe], capture_output=True, text=True)
        assert "No route" not in ping.stderr  # the peer is reachable (refused, not unroutable)
    assert not made & _netns(), "its namespaces are gone (other jobs' namespaces may come and go meanwhile)"


def test_teardown_on_ctrl_c():
    code = (
        "import time; from lshmoe.bench.netns import EmulatedCluster\n"
        "with EmulatedCluster(2, 1, '1gbit') as c:\n    print('up', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    mine = {n for n in _netns() if n.startswith(f"lshmoe{proc.pid}")}  # other jobs' namespaces may come and go
    assert len(mine) == 2
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=20)
    time.sleep(0.2)
    assert not mine & _netns()


@pytest.mark.slow
def test_ledger_bytes_match_interface_counters(tmp_path):
    from lshmoe.bench.harness import ABSpec, Cluster, base_config, run_ab
    from lshmoe.bench.variants import apply

    cfg = base_config(["model.d_model=64", "model.n_layers=2", "train.batch_size=4", "model.seq_len=64"])
    spec = ABSpec(
        {"baseline": apply(cfg, {}, 4).to_dict()}, rounds=1, warmup_rounds=0, steps_per_round=3, evaluate=False
    )
    cluster = Cluster(nodes=2, ranks_per_node=2, link="1gbit", emulate=True)
    res = run_ab(spec, cluster, tmp_path)["variants"]["baseline"]
    ledger = sum(res["inter_node_bytes"])
    assert ledger > 1e5
    # TCP/IP headers and acknowledgements ride on top of the payload: a few percent, never less.
    assert 1.0 <= res["iface_tx_bytes"] / ledger < 1.10, (res["iface_tx_bytes"], ledger)
