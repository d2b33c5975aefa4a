"""Fine-tuning throughput of a Qwen3-MoE-shaped model: lshmoe's expert-parallel conversion against
transformers' own MoE implementation on the same weights and batches.

One random checkpoint (saved with save_pretrained, default D=512, 16 experts, top-4) is fine-tuned
with AdamW on random token batches: at EP 1 by transformers (its eager expert loop and, where the
installed version has it, its grouped-mm expert backend) and by lshmoe, alternating blocks of steps
in one process (A/B interleaved, the order rotating every round); then by lshmoe at EP 2 and 4 on
gloo ranks (CPU). Reported: median step time as tokens/s, and per rank the expert memory (weights +
gradients + Adam moments) and the peak memory (CUDA: max allocated per variant; CPU: peak resident
set of the rank process).

Run: `lshmoe bench hf [--out docs/bench]` (on a GPU machine: `lshmoe bench hf --device cuda --dtype bfloat16
--worlds ''`).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lshmoe.bench.harness import add_out_arg
from lshmoe.bench.report import md_table, print_table, write_section
from lshmoe.testing import run_ranks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _config(a: argparse.Namespace):
    from transformers import AutoConfig

    heads = max(1, a.d_model // 64)
    return AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=a.vocab,
        hidden_size=a.d_model,
        intermediate_size=4 * a.d_model,
        moe_intermediate_size=a.d_expert,
        num_hidden_layers=a.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        head_dim=64,
        num_experts=a.experts,
        num_experts_per_tok=a.top_k,
        norm_topk_prob=True,
        output_router_logits=True,
        max_position_embeddings=max(512, a.seq),
    )


def _save_checkpoint(a: argparse.Namespace, path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(a)).save_pretrained(str(path))


def _batch(step: int, rank: int, a: argparse.Namespace, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g).to(device)


def _hf_step(model, opt, ids) -> None:
    model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _lshmoe_step(model, opt, ids) -> None:
    from lshmoe.hf import lm_loss

    lm_loss(model, ids[:, :-1], ids[:, 1:])["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _expert_bytes(model) -> int:
    """Weights + gradients + two Adam moments of the routed experts held by this rank."""
    n = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".experts." in name)
    return 4 * n


def _state_bytes(model) -> int:
    """Weights + gradients + two Adam moments of every parameter this rank holds."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters())


def _rss_mb() -> float:
    """Resident set size now (Linux), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ep1_variants(a, path: Path, device, dtype) -> dict[str, tuple[Any, Any, Any]]:
    from transformers import AutoModelForCausalLM

    import lshmoe.hf as H

    out = {}
    for impl in ("eager", "grouped_mm"):
        try:
            m = AutoModelForCausalLM.from_pretrained(str(path), experts_implementation=impl, dtype=dtype).to(device)
        except (ValueError, TypeError, ImportError) as e:
            print(f"transformers experts_implementation={impl} unavailable: {str(e).splitlines()[0]}")
            continue
        out[f"transformers {impl}"] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4), _hf_step)
    from lshmoe.distributed.comm import Comm

    m = H.from_pretrained(path, Comm.local(device), dtype=dtype)
    out["lshmoe EP 1"] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4), _lshmoe_step)
    return out


def _measure_ep1(a, path: Path, device, dtype) -> list[dict[str, Any]]:
    variants = _ep1_variants(a, path, device, dtype)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    peak: dict[str, float] = {}
    step = 0
    for r in range(a.rounds + 1):  # round 0 warms every variant up
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            model, opt, fn = variants[n]
            model.train()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(a.steps):
                ids = _batch(step, 0, a, device)
                step += 1
                _sync(device)
                t0 = time.perf_counter()
                fn(model, opt, ids)
                _sync(device)
                if r > 0:
                    times[n].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak[n] = max(peak.get(n, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    tokens = a.batch * a.seq
    rows = []
    for n in names:
        model = variants[n][0]
        rows.append(
            dict(
                variant=n,
                ep=1,
                tokens_per_s=tokens / statistics.median(times[n]),
                step_ms=1000 * statistics.median(times[n]),
                expert_mb=_expert_bytes(model) / 2**20,
                state_mb=_state_bytes(model) / 2**20,
                peak_mb=peak.get(n, float("nan")),
            )
        )
    return rows


def _ep_worker(comm, path: str, a: argparse.Namespace) -> dict[str, Any]:
    import lshmoe.hf as H
    from lshmoe.train.grad_sync import GradSync

    rss0 = _rss_mb()
    model = H.from_pretrained(path, comm, dtype=DTYPES[a.dtype])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync = GradSync(model, comm)
    times = []
    for step in range(a.steps * (a.rounds + 1)):
        ids = _batch(step, comm.rank, a, comm.device)
        t0 = time.perf_counter()
        H.lm_loss(model, ids[:, :-1], ids[:, 1:])["loss"].backward()
        sync.sync()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {
        "times": times[a.steps :],
        "expert_mb": _expert_bytes(model) / 2**20,
        "state_mb": _state_bytes(model) / 2**20,
        "rss_mb": _rss_mb() - rss0,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lshmoe bench hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--d-expert", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    p.add_argument("--worlds", default="2,4", help="EP sizes on gloo CPU ranks after EP 1 ('' = none)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=1, help="torch threads of the EP 1 process and of each EP rank")
    return add_out_arg(p, name="hf")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
    dtype = DTYPES[a.dtype]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lshmoe-bench-hf-") as tmp:
        path = Path(tmp) / "qwen3moe"
        _save_checkpoint(a, path)
        rows += _measure_ep1(a, path, device, dtype)
        for w in [int(x) for x in a.worlds.split(",") if x.strip()]:
            res = run_ranks(_ep_worker, w, str(path), a, timeout_s=600, threads=a.threads)
            step_s = statistics.median(max(ts) for ts in zip(*(r["times"] for r in res), strict=True))
            rows.append(
                dict(
                    variant=f"lshmoe EP {w} (gloo, CPU)",
                    ep=w,
                    tokens_per_s=w * a.batch * a.seq / step_s,
                    step_ms=1000 * step_s,
                    expert_mb=res[0]["expert_mb"],
                    state_mb=max(r["state_mb"] for r in res),
                    peak_mb=max(r["rss_mb"] for r in res),
                )
            )
    best_hf = max((r["tokens_per_s"] for r in rows if r["variant"].startswith("transformers")), default=float("nan"))
    headers = ["variant", "EP", "tokens/s", "median step ms", "vs best transformers", "expert MB/rank"]
    headers += ["model state MB/rank", "memory MB/rank"]
    table = [
        [
            r["variant"],
            r["ep"],
            r["tokens_per_s"],
            r["step_ms"],
            f"{r['tokens_per_s'] / best_hf:.2f}x",
            r["expert_mb"],
            r["state_mb"],
            r["peak_mb"],
        ]
        for r in rows
    ]
    print_table(headers, table)
    peak_kind = (
        "max CUDA memory allocated"
        if device.type == "cuda"
        else "growth of the rank process's resident set from before the model was built to the end of its "
        "steps (EP > 1 only: the EP 1 variants share one process)"
    )
    body = (
        f"Qwen3-MoE shape: D={a.d_model}, {a.layers} layers, {a.experts} experts of width {a.d_expert}, top-{a.top_k}, "
        f"vocab {a.vocab}; {a.batch} x {a.seq} tokens per rank per step, AdamW, {a.dtype} on {device.type}. EP 1 "
        f"variants alternate blocks of {a.steps} steps in one process for {a.rounds} rounds after a warm-up "
        f"round; EP > 1 are gloo ranks on this machine's cores (step = slowest rank); {a.threads} torch thread(s) "
        f"per process. Expert MB = weights + gradients + Adam moments of the experts a rank holds; model "
        f"state MB = the same for all its parameters; memory MB = {peak_kind}.\n\n"
        f"{md_table(headers, table)}\n"
    )
    write_section(
        a.out, a.name, f"Hugging Face MoE fine-tuning: lshmoe vs transformers ({device.type})", body, {"rows": rows}
    )
    return 0
