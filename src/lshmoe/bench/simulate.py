"""`lshmoe simulate`: project LSH-MoE's speedup on real clusters with the paper's analytic model.

The LSH-MoE authors (NeurIPS 2024, author response W1) model one training step per GPU as

    T_a2a     = 4 l (n k / w) h (w - 1) / B_inter          (2 all-to-alls forward, 2 backward, per MoE layer)
    T_compute = 96 n l h^2 / FLOPs                          (6 x tokens x 16 l h^2 parameters)
    T_a2a / T_compute = k FLOPs / (24 B_inter) x (w - 1) / (w h)

with n tokens per GPU, k experts per token, h hidden size, l layers, w servers, B_inter the
inter-server bandwidth. The formula counts elements, not bytes, and leaves open which bandwidth a GPU
gets; this module makes both explicit (bytes per element; bandwidth per GPU = the node's inter-node
bandwidth / GPUs per node, since a node's GPUs share its NICs in an all-to-all), lets only MoE
layers communicate (l_moe = l / moe_every), and extends the model with LSH-MoE:

    T_a2a'  = r T_a2a                                      (r: measured compression rate)
    T_lsh   = l_moe x passes x (n k h bytes) / (eff x HBM bandwidth)   (memory-bound clustering + restore)
    speedup = (T_a2a + T_compute) / (r T_a2a + T_compute + T_lsh),  Amdahl bound = 1 / ((1 - f) + f r)

Everything printed is a PROJECTION from these inputs, not a measurement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from lshmoe.cliutil import Parser
from lshmoe.errors import UserError


def amdahl_bound(f: float, r: float) -> float:
    """The speedup if only the all-to-all changes: the fraction f of the step it takes, scaled by r."""
    return 1.0 / ((1.0 - f) + f * r)


# Each input's valid range: (low, low is allowed, high or None); a value outside is one line naming the flag.
RANGES = {
    "nodes": (1, True, None),
    "gpus_per_node": (1, True, None),
    "inter_gbit_per_node": (0, False, None),
    "gpu_tflops": (0, False, None),
    "mfu": (0, False, 1),
    "hidden": (1, True, None),
    "layers": (1, True, None),
    "moe_every": (1, True, None),
    "tokens_per_gpu": (1, True, None),
    "top_k": (1, True, None),
    "bytes_per_elem": (1, True, None),
    "rate": (0, False, 1),
    "lsh_passes": (0, True, None),
    "lsh_bw_eff": (0, False, 1),
    "hbm_tbps": (0, False, None),
}


def check(m: ClusterModel) -> ClusterModel:
    """Every input finite and in range (`RANGES`; and moe_every <= layers); a one-line UserError naming
    the flag otherwise."""
    for name, (low, closed, high) in RANGES.items():
        v = getattr(m, name)
        flag = f"--{name.replace('_', '-')}"
        ok = math.isfinite(v) and (v >= low if closed else v > low) and (high is None or v <= high)
        if not ok:
            rng = f"{'>=' if closed else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise UserError(f"lshmoe simulate: {flag} {v} is out of range; must be a finite number {rng}")
    if m.moe_every > m.layers:
        raise UserError(f"lshmoe simulate: --moe-every {m.moe_every} is out of range; must be <= --layers {m.layers}")
    return m


@dataclass(kw_only=True)
class ClusterModel:
    nodes: int = 4
    gpus_per_node: int = 8
    inter_gbit_per_node: float = 200.0
    gpu_tflops: float = 312.0  # peak bf16 dense
    mfu: float = 0.4  # achieved fraction of the peak
    hidden: int = 768
    layers: int = 12
    moe_every: int = 1
    tokens_per_gpu: int = 8192
    top_k: int = 2
    bytes_per_elem: int = 2
    rate: float = 0.2  # LSH compression rate r (rows sent / rows routed)
    lsh_passes: float = 8.0  # memory passes over the routed rows by compress + restore, forward + backward
    lsh_bw_eff: float = 0.5  # fraction of HBM bandwidth those passes reach
    hbm_tbps: float = 2.0  # HBM bandwidth, TB/s


PRESETS = {
    # The paper's A100 cluster (4 servers x 8 A100-40GB, 200 Gb/s of RDMA per server) on GPT-MoE-15B shapes.
    "a100-4x8": ClusterModel(),
    # 64 servers x 8 H100 with one 400 Gb/s NIC per GPU, a 4k-wide 32-layer MoE with MoE every other layer.
    "h100-64x8": ClusterModel(
        nodes=64,
        gpus_per_node=8,
        inter_gbit_per_node=8 * 400.0,
        gpu_tflops=989.0,
        hidden=4096,
        layers=32,
        moe_every=2,
        tokens_per_gpu=8192,
        hbm_tbps=3.35,
    ),
}


@dataclass(kw_only=True)
class Projection:
    t_a2a_s: float
    t_compute_s: float
    a2a_share: float
    t_lsh_s: float
    speedup: float
    amdahl_bound: float
    paper_ratio: float  # the paper's closed form, T_a2a / T_compute (bytes made explicit, l_moe = l)


def project(m: ClusterModel) -> Projection:
    w, n, k, h = m.nodes, m.tokens_per_gpu, m.top_k, m.hidden
    l_moe = m.layers / m.moe_every
    b_gpu = m.inter_gbit_per_node * 1e9 / 8 / m.gpus_per_node  # bytes/s available to one GPU
    flops = m.gpu_tflops * 1e12 * m.mfu
    t_a2a = 4 * l_moe * (n * k / w) * (w - 1) * h * m.bytes_per_elem / b_gpu
    t_comp = 96 * n * m.layers * h * h / flops
    t_lsh = l_moe * m.lsh_passes * n * k * h * m.bytes_per_elem / (m.lsh_bw_eff * m.hbm_tbps * 1e12)
    f = t_a2a / (t_a2a + t_comp)
    paper = k * flops * m.bytes_per_elem / (24 * b_gpu) * (w - 1) / (w * h)
    return Projection(
        t_a2a_s=t_a2a,
        t_compute_s=t_comp,
        a2a_share=f,
        t_lsh_s=t_lsh,
        speedup=(t_a2a + t_comp) / (m.rate * t_a2a + t_comp + t_lsh),
        amdahl_bound=amdahl_bound(f, m.rate),
        paper_ratio=paper,
    )


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="lshmoe simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="start from a named cluster")
    for f in fields(ClusterModel):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    a = p.parse_args(argv)
    presets = [a.preset] if a.preset else sorted(PRESETS)
    for name in presets:
        m = check(
            replace(
                PRESETS[name],
                **{f.name: getattr(a, f.name) for f in fields(ClusterModel) if getattr(a, f.name) is not None},
            )
        )
        r = project(m)
        print(f"PROJECTION (analytic model, not a measurement) - preset {name}")
        print("  inputs: " + ", ".join(f"{k}={v}" for k, v in asdict(m).items()))
        print(
            f"  per GPU per step: all-to-all {1e3 * r.t_a2a_s:.1f} ms, compute {1e3 * r.t_compute_s:.1f} ms, "
            f"all-to-all share f = {100 * r.a2a_share:.1f}% (paper's T_a2a/T_compute = {r.paper_ratio:.3f})"
        )
        lit = project(replace(m, inter_gbit_per_node=m.inter_gbit_per_node * m.gpus_per_node))
        print(
            f"  (read literally, the paper's formula gives each GPU the node's whole inter-node bandwidth: "
            f"f = {100 * lit.a2a_share:.1f}%, speedup {lit.speedup:.2f}x)"
        )
        print(
            f"  LSH-MoE at r = {m.rate:g}: clustering + restore {1e3 * r.t_lsh_s:.2f} ms, projected speedup "
            f"{r.speedup:.2f}x, Amdahl bound {r.amdahl_bound:.2f}x\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
