"""`lshmoe plan`: which training settings of a model fit the GPUs of a cluster.

    lshmoe plan --hf PATH --nodes N --gpus-per-node G --gpu-mem 80GiB [--seq-len S --batch-size B ...]
    lshmoe plan --config my.yaml [--set section.key=value ...] --nodes N --gpus-per-node G ...
    lshmoe plan --gpt [--set section.key=value ...] ...          (lshmoe's default GPT-MoE)

Reads only the model's config (a Hugging Face checkpoint's config.json, or lshmoe's YAML for its own
GPT-MoE), enumerates EP sizes, FSDP off/on, compute dtype, activation checkpointing and micro-batches,
and prints the bytes per rank of parameters, gradients, optimizer state and activations of each, which
fit, and the one to use (plan/search.py says how it is chosen; docs/memory.md derives the formulas).
`--batch-size` is sequences per rank per optimizer step; `--grad-accum N` splits it into N micro-batches.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from typing import Any

from lshmoe.errors import UserError
from lshmoe.plan.memory import AC_MODES, DTYPES, Workload
from lshmoe.plan.search import Budget, Choices, Cluster, GiB, Row, plan, recommend, smallest_cluster
from lshmoe.plan.shape import ModelShape

_UNITS = {
    "": GiB, "b": 1, "k": 2**10, "m": 2**20, "g": GiB, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": GiB, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}  # fmt: skip
DEFAULT_SEQ_LEN, DEFAULT_BATCH = 2048, 4


def parse_size(text: str, flag: str, zero: bool = False) -> int:
    """'80GiB', '141GB', '80G' (binary), '80' (GiB) -> bytes; anything else is one line naming the flag."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) < 0 or (float(m.group(1)) == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise UserError(f"{flag} {text!r}: not a size {bound}; write e.g. 80GiB, 141GB or 40960MiB")
    return int(float(m.group(1)) * _UNITS[unit])


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        raise UserError(f"{self.prog}: {message}")


def _positive(flag: str, lo: float = 1, hi: float | None = None, kind: type = int):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise UserError(f"{flag} {text!r}: must be {'an integer' if kind is int else 'a number'} {bound}")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lshmoe plan", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="PATH", help="Hugging Face checkpoint directory (or its config.json)")
    src.add_argument("--config", metavar="YAML", help="lshmoe config of a GPT-MoE")
    src.add_argument("--gpt", action="store_true", help="lshmoe's default GPT-MoE (change it with --set)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="with --config/--gpt")
    p.add_argument("--vocab-size", type=_positive("--vocab-size"), help="GPT-MoE vocabulary [data.vocab_size]")
    p.add_argument("--nodes", type=_positive("--nodes"), default=1, help="nodes [1]")
    p.add_argument("--gpus-per-node", type=_positive("--gpus-per-node"), default=8, help="GPUs per node [8]")
    p.add_argument("--gpu-mem", default="80GiB", help="memory of one GPU, e.g. 80GiB, 141GB [80GiB]")
    p.add_argument("--seq-len", type=_positive("--seq-len"), help=f"tokens per sequence [{DEFAULT_SEQ_LEN}]")
    p.add_argument(
        "--batch-size", type=_positive("--batch-size"), help=f"sequences per rank per step [{DEFAULT_BATCH}]"
    )
    p.add_argument("--grad-accum", type=_positive("--grad-accum"), help="micro-batches per step [all divisors]")
    p.add_argument("--ep", type=_positive("--ep"), help="expert-parallel size [every size that divides]")
    p.add_argument("--fsdp", choices=("on", "off", "both"), default="both", help="[both]")
    p.add_argument(
        "--compute-dtype",
        choices=(*DTYPES, "all"),
        default="all",
        help="float32; bf16-mp = fp32 master weights and AdamW, bf16 compute (train --compute-dtype bfloat16); "
        "bf16-pure = no fp32 masters, what train --dtype bfloat16 does [all]",
    )
    p.add_argument("--ac", choices=(*AC_MODES, "all"), default="all", help="activation checkpointing [all]")
    p.add_argument("--skew", type=_positive("--skew", 1.0, 64.0, float), default=1.25,
                   help="rows received by the busiest rank / the mean, EP > 1 [1.25]")  # fmt: skip
    p.add_argument("--payload-rate", type=_positive("--payload-rate", 0.01, 1.0, float), default=1.0,
                   help="rows sent / rows routed (LSH-MoE < 1) [1.0]")  # fmt: skip
    p.add_argument("--reserve", default="2GiB", help="per GPU, for the CUDA context, NCCL and workspaces [2GiB]")
    p.add_argument("--fragmentation", type=_positive("--fragmentation", 0.0, 0.5, float), default=0.10,
                   help="share of GPU memory lost to allocator fragmentation [0.10]")  # fmt: skip
    p.add_argument("--top", type=_positive("--top"), default=12, help="fitting rows to print [12]")
    p.add_argument("--all", action="store_true", help="print every setting")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def load_shape(ns: argparse.Namespace) -> tuple[ModelShape, dict[str, int]]:
    """The model and, for a GPT-MoE config, the defaults it sets: seq_len, batch_size and ep (0: any)."""
    if ns.hf:
        if ns.set:
            raise UserError("--set changes a GPT-MoE config (--config/--gpt); a --hf model is planned as it is")
        from lshmoe.plan.hf_count import count_hf, read_config_json

        raw, source = read_config_json(ns.hf)
        return count_hf(raw, source), {}
    from lshmoe import config as C
    from lshmoe.plan.gpt_count import count_gpt

    cfg = C.load_yaml(ns.config) if ns.config else C.Config()
    C.apply_sets(cfg, ns.set)
    C.validate(cfg)
    own = {"seq_len": cfg.model.seq_len, "batch_size": cfg.train.batch_size, "ep": cfg.moe.ep_size}
    return count_gpt(cfg, ns.vocab_size), own


def _choices(ns: argparse.Namespace, shape: ModelShape, cluster: Cluster, batch: int) -> Choices:
    if ns.ep is not None and (cluster.world % ns.ep or (shape.num_experts or 1) % ns.ep):
        raise UserError(f"--ep {ns.ep}: must divide the world size {cluster.world} and the {shape.num_experts} experts")
    if ns.grad_accum is not None and batch % ns.grad_accum:
        raise UserError(f"--grad-accum {ns.grad_accum}: must divide --batch-size {batch}")
    return Choices(
        eps=(ns.ep,) if ns.ep else None,
        fsdp={"on": (True,), "off": (False,), "both": (False, True)}[ns.fsdp],
        dtypes=DTYPES if ns.compute_dtype == "all" else (ns.compute_dtype,),
        acs=AC_MODES if ns.ac == "all" else (ns.ac,),
        micro_batches=(ns.grad_accum,) if ns.grad_accum else None,
    )


def describe(row: Row, workload: Workload) -> str:
    s = row.setting
    micro = workload.batch_size // s.micro_batches
    parts = [f"EP {s.ep}", "FSDP" if s.fsdp else "no FSDP", s.dtype, f"AC {s.ac}"]
    parts.append(f"{s.micro_batches} micro-batch{'es' if s.micro_batches > 1 else ''} of {micro} sequence(s)")
    return ", ".join(parts)


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 10**9 else f"{n / 1e6:.2f} M"


def unit_of(rows: list[Row]) -> tuple[str, int]:
    """GiB, or MiB when every total is under 1 GiB."""
    return ("GiB", GiB) if max((r.breakdown.total for r in rows), default=0) >= GiB else ("MiB", 2**20)


def table(rows: list[Row], workload: Workload) -> str:
    name, unit = unit_of(rows)
    head = ("EP", "FSDP", "dtype", "AC", "N", "mb", "params", "grads", "optim", "activ", "total", "fits")
    lines = [head]
    for r in rows:
        s, b = r.setting, r.breakdown
        size = [f"{v / unit:.1f}" for v in (b.params, b.grads, b.optim, b.activation_bytes, b.total)]
        lines.append(
            (
                str(s.ep), "on" if s.fsdp else "off", s.dtype, s.ac, str(s.micro_batches),
                str(workload.batch_size // s.micro_batches), *size, "yes" if r.fits else "no",
            )
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out[:1] + ["  ".join("-" * w for w in widths)] + out[1:])


def _row_json(r: Row, workload: Workload) -> dict[str, Any]:
    b = r.breakdown
    return {
        **asdict(r.setting),
        "micro_batch_size": workload.batch_size // r.setting.micro_batches,
        "params_bytes": b.params,
        "grads_bytes": b.grads,
        "optim_bytes": b.optim,
        "activation_bytes": b.activation_bytes,
        "total_bytes": b.total,
        "fits": r.fits,
        "cost": r.cost,
        "terms": {**b.state.terms, **{f"act.{k}": v for k, v in b.activations.saved.items()}},
    }


def recommendation(rows, shape, workload, cluster, budget, choices) -> tuple[str, Row | None]:
    best = recommend(rows)
    gpus = f"{cluster.world} GPU{'s' if cluster.world > 1 else ''} ({cluster.nodes} x {cluster.gpus_per_node})"
    if best is not None:
        b = best.breakdown
        return (
            f"recommended: {describe(best, workload)}: {_size(b.total)} of {_size(budget.usable)} usable per GPU "
            f"on {gpus}",
            best,
        )
    pure = next((r for r in rows if r.fits), None)
    bigger = smallest_cluster(shape, workload, cluster, budget, choices)
    if bigger:
        more = (
            f"; with fp32 master weights it fits on {bigger[0].nodes} x {bigger[0].gpus_per_node} GPUs: "
            f"{describe(bigger[1], workload)}"
        )
    else:  # NOTE: every rank keeps every layer's activations (no pipeline or sequence parallelism)
        least = min(r.breakdown.activation_bytes for r in rows)
        more = (
            f"; more GPUs do not help: the activations alone need {_size(least)} per rank at best, "
            f"use a shorter --seq-len or a smaller --batch-size"
        )
    if pure is not None:
        return (
            f"nothing with fp32 master weights fits on {gpus}; only pure bf16 does ({describe(pure, workload)}), "
            f"which rounds small updates away{more}",
            None,
        )
    least = min(rows, key=lambda r: r.breakdown.total)
    return (
        f"nothing fits in {_size(budget.usable)} usable per GPU on {gpus}; the smallest setting needs "
        f"{_size(least.breakdown.total)} ({describe(least, workload)}){more}",
        None,
    )


def main(argv: list[str] | None = None) -> int:
    """`lshmoe plan`; a mistake in the input raises UserError (one line naming the flag)."""
    ns = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    budget = Budget(
        gpu_bytes=parse_size(ns.gpu_mem, "--gpu-mem"),
        reserve_bytes=parse_size(ns.reserve, "--reserve", zero=True),
        fragmentation=ns.fragmentation,
    )
    if budget.usable <= 0:
        raise UserError(f"--gpu-mem {ns.gpu_mem}: nothing is left after --reserve {ns.reserve} and --fragmentation")
    shape, own = load_shape(ns)
    ns.ep = ns.ep or own.get("ep") or None
    workload = Workload(
        seq_len=ns.seq_len or own.get("seq_len", DEFAULT_SEQ_LEN),
        batch_size=ns.batch_size or own.get("batch_size", DEFAULT_BATCH),
        skew=ns.skew,
        payload_rate=ns.payload_rate,
    )
    cluster = Cluster(nodes=ns.nodes, gpus_per_node=ns.gpus_per_node)
    choices = _choices(ns, shape, cluster, workload.batch_size)
    rows = plan(shape, workload, cluster, budget, choices)
    line, best = recommendation(rows, shape, workload, cluster, budget, choices)
    if ns.json:
        print(json.dumps(_report(shape, workload, cluster, budget, rows, line, best), indent=1))
        return 0
    fitting = [r for r in rows if r.fits]
    shown = rows if ns.all else fitting[: ns.top] + [r for r in rows if not r.fits][:3]
    print(_header(shape, workload, cluster, budget, unit_of(shown)[0]))
    print(table(shown, workload))
    print(f"{len(fitting)} of {len(rows)} settings fit" + ("" if ns.all else " (--all prints every one)"))
    print(line)
    return 0


def _header(shape: ModelShape, workload: Workload, cluster: Cluster, budget: Budget, unit: str) -> str:
    notes = "".join(f"; {n}" for n in shape.notes)
    return (
        f"{shape.name}: {_count(shape.total_params)} parameters (dense {_count(shape.dense_params)}, "
        f"experts {_count(shape.expert_params)} in {shape.moe_layers} MoE layers, "
        f"{_count(shape.active_params)} active){notes}\n"
        f"{cluster.nodes} x {cluster.gpus_per_node} GPUs of {_size(budget.gpu_bytes)}, {_size(budget.usable)} "
        f"usable each; {workload.batch_size} sequence(s) of {workload.seq_len} tokens per rank per step; "
        f"bytes per rank in {unit}"
    )


def _report(shape, workload, cluster, budget, rows, line, best) -> dict[str, Any]:
    return {
        "model": {
            "name": shape.name,
            "total_params": shape.total_params,
            "dense_params": shape.dense_params,
            "expert_params": shape.expert_params,
            "frozen_params": shape.frozen_params,
            "active_params": shape.active_params,
            "moe_layers": shape.moe_layers,
        },
        "cluster": asdict(cluster) | {"world": cluster.world},
        "workload": asdict(workload),
        "budget": asdict(budget) | {"usable_bytes": budget.usable},
        "rows": [_row_json(r, workload) for r in rows],
        "recommended": None if best is None else _row_json(best, workload),
        "recommendation": line,
    }


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"lshmoe: error: {e}", file=sys.stderr)
        sys.exit(2)
