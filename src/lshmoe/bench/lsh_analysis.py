"""LSH-MoE on real activations: compression rate and restore error versus the hash settings, and the
LSH overhead against the all-to-all time it saves.

1. Train the default GPT-MoE (identity compression) for `--train-steps` steps on the embedded corpus
   (cached after the first run), so the MoE inputs are those of a model that has learned something.
2. Capture the inputs of every MoE layer on validation batches, cut into per-rank batches of
   `batch_size x seq_len` tokens (the (source rank, expert) groups LSH-MoE hashes).
3. For every family, b, L and centering: compress each group with the LSH compressor, run the trained
   experts on the centroids and on the exact rows, and report
     rate        = rows sent / rows routed,
     err         = ||E(x) - (E(c) + x - c)|| / ||E(x)||   (with residual compensation),
     err_nocomp  = ||E(x) - E(c)|| / ||E(x)||,
     err_cal     = ||E(x) - (E(c) + a (x - c))|| / ||E(x)||  with the calibrated a (the least-squares fit),
   each aggregated over all rows of all groups (sum of squares).
4. Overhead: the measured forward+backward time of compress + restore for one rank's rows, divided
   by the all-to-all time its byte saving is worth on a link of `--link-gbit` Gbit/s (dispatch and
   combine, forward and backward, the (W-1)/W share of rows that leaves the rank). The emulated
   cluster benchmark measures the same saving on real throttled links.
5. Causal safety (`lsh.causal`, section `lsh_causal`): the same rows with causal off, `causal_mode=split`
   (more rows sent) and `earliest` (the same rows, each bucket sent as the mean of its rows at its
   earliest position): rate and errors side by side.

Run: `lshmoe bench lsh` (`--causal-only`: step 5 alone).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from lshmoe.bench.harness import bench_parser, recorded_args
from lshmoe.bench.report import md_table, median, print_table, save_plot, write_section
from lshmoe.compress.protocol import Compressor, Positions
from lshmoe.compress.registry import CompressorContext, build_compressor
from lshmoe.config import Config, LSHConfig
from lshmoe.data import default_cache_dir, load_data
from lshmoe.distributed.comm import Comm
from lshmoe.models.gpt import GPTMoE
from lshmoe.moe.layer import MoELayer
from lshmoe.moe.permute import permute_rows, sort_by_expert
from lshmoe.train.gpt_task import GPTTask
from lshmoe.train.loop import Trainer


def trained_model(cfg: Config, steps: int) -> tuple[GPTMoE, object]:
    """The default model after `steps` baseline steps (weights cached by config hash)."""
    cfg.train.steps, cfg.train.progress, cfg.train.eval_every = steps, False, 0
    key = hashlib.blake2b(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    path = default_cache_dir() / "bench" / f"model-{key}.pt"
    comm = Comm.local()
    data = load_data(cfg.data, print)
    trainer = Trainer(cfg, comm, GPTTask(data=data))
    if path.exists():
        trainer.model.load_state_dict(torch.load(path))
    else:
        cfg.train.out_dir = str(path.parent / f"train-{key}")
        print(f"training the default model for {steps} steps to get meaningful activations ...")
        trainer.run()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trainer.model.state_dict(), path)
    trainer.model.eval()
    return trainer.model, data


@torch.no_grad()
def capture(model: GPTMoE, data, cfg: Config, batches: int) -> dict[int, list[torch.Tensor]]:
    """MoE-layer inputs per layer, one [tokens_per_rank, D] tensor per emulated rank batch."""
    grabbed: dict[int, list[torch.Tensor]] = {}
    hooks = [
        layer.register_forward_hook(
            lambda m, args, out: grabbed.setdefault(m.layer_id, []).append(
                args[0].reshape(-1, args[0].shape[-1]).clone()
            )
        )
        for layer in model.moe_layers
    ]
    for i in range(batches):
        x, y = data.val_batch(i, 0, 1, cfg.train.batch_size, cfg.model.seq_len, torch.device("cpu"), batches)
        model(x, y)
    for h in hooks:
        h.remove()
    return grabbed


def lsh_compressor(layer: MoELayer, lsh: LSHConfig, d_model: int) -> Compressor:
    """The compressor that `moe.compress=lsh` with these hash settings builds for `layer` (`lsh.causal`
    none: off, as in a model that is not a causal LM)."""
    ctx = CompressorContext(layer.num_experts, d_model, layer.layer_id, seed=0, settings=replace(Config(), lsh=lsh))
    return build_compressor("lsh", ctx)


@torch.no_grad()
def analyse(layer: MoELayer, chunks: list[torch.Tensor], lsh: LSHConfig, seq_len: int = 0) -> dict[str, float]:
    """Rate and errors over the rank batches; `seq_len` (a chunk is [B * seq_len, D]) gives the rows'
    positions, which `lsh.causal` needs."""
    sq_exact = sq_err = sq_nocomp = cross = sq_dx = 0.0
    routed = sent = 0
    for step, x in enumerate(chunks):
        route = layer.router(x)
        perm, counts = sort_by_expert(route.topk_ids_TK, layer.num_experts)
        rows = permute_rows(x, perm, layer.top_k)
        token = perm // layer.top_k
        at = Positions(token // seq_len, token % seq_len) if seq_len else None
        # restored without compensation, every row gets its bucket's row: E(c) and c per row
        comp = lsh_compressor(layer, replace(lsh, compensation="none"), x.shape[-1])
        comp.set_step(step)
        payload, sent_E, meta = comp.compress(rows, counts, at)
        exact = layer.experts(rows, counts.tolist()).double()
        e_c = comp.restore(layer.experts(payload, sent_E.tolist()), meta).double()
        dx = (rows - comp.restore(payload, meta)).double()
        sq_exact += float(exact.square().sum())
        sq_err += float((exact - e_c - dx).square().sum())
        sq_nocomp += float((exact - e_c).square().sum())
        cross += float(((exact - e_c) * dx).sum())
        sq_dx += float(dx.square().sum())
        routed += rows.shape[0]
        sent += payload.shape[0]
    a = min(1.5, max(0.0, cross / sq_dx)) if sq_dx else 0.0  # the calibrated residual scale
    err_cal = max(0.0, sq_nocomp - 2 * a * cross + a * a * sq_dx) ** 0.5 / sq_exact**0.5
    return {
        "rate": sent / routed,
        "err": (sq_err / sq_exact) ** 0.5,
        "err_nocomp": (sq_nocomp / sq_exact) ** 0.5,
        "err_calibrated": err_cal,
        "alpha": a,
    }


def overhead(layer: MoELayer, x: torch.Tensor, lsh: LSHConfig, reps: int = 15) -> float:
    """Median seconds of compress + restore, forward and backward, on one rank batch's rows."""
    with torch.no_grad():
        route = layer.router(x)
        perm, counts = sort_by_expert(route.topk_ids_TK, layer.num_experts)
        rows0 = permute_rows(x, perm, layer.top_k)
    comp = lsh_compressor(layer, lsh, x.shape[-1])
    times = []
    for i in range(reps + 2):
        rows = rows0.clone().requires_grad_(True)
        comp.set_step(i)
        t0 = time.perf_counter()
        payload, _, meta = comp.compress(rows, counts)
        out = comp.restore(payload * 1.0, meta)  # a stand-in expert: the expert's own time is not LSH's
        out.sum().backward()
        times.append(time.perf_counter() - t0)
    return median(times[2:])


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench lsh", __doc__, cluster=False)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--batches", type=int, default=8, help="rank batches of captured activations")
    p.add_argument("--world", type=int, default=2, help="ranks the wire share (W-1)/W assumes")
    p.add_argument("--link-gbit", type=float, default=1.0)
    p.add_argument("--causal-only", action="store_true", help="only the causal-safety table (section lsh_causal)")
    return p


CAUSAL = (("off", False, "earliest"), ("split", True, "split"), ("earliest", True, "earliest"))


def causal_plot(rows: list[dict], out: Path) -> str:
    """Rate against output error (no compensation) for b = 4, L = 2..10, one line per causal mode: the
    price of causal safety read as a frontier (lower-left is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for name, _, _ in CAUSAL:
        pts = sorted((r["L"], r["rate"], r["err_nocomp"]) for r in rows if r["b"] == 4 and r["causal"] == name)
        ax.plot([100 * p[1] for p in pts], [p[2] for p in pts], marker="o", label=f"causal {name}")
        for L, rate, err in pts:
            ax.annotate(f"L={L}", (100 * rate, err), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="rows sent (%)", ylabel="output error |E(x) - E(c)| / |E(x)|", title="cross-polytope, b = 4")
    ax.legend(fontsize=8)
    return save_plot(fig, out, "lsh_causal")


def causal_cost(a, cfg: Config, layers: dict[int, MoELayer], acts: dict[int, list[torch.Tensor]]) -> list[dict]:
    """Rate and errors of cross-polytope settings with `lsh.causal` off, split and earliest."""
    rows = []
    for b, L in ((4, 2), (4, 4), (4, 6), (4, 8), (4, 10), (2, 6), (2, 10)):
        for name, causal, mode in CAUSAL:
            lsh = LSHConfig(buckets_per_hash=b, num_hashes=L, causal=causal, causal_mode=mode)
            res = [analyse(layers[i], acts[i], lsh, cfg.model.seq_len) for i in sorted(layers)]
            rows.append({"b": b, "L": L, "causal": name, **{k: sum(r[k] for r in res) / len(res) for k in res[0]}})
        print_table(
            ["b", "L", "causal", "rate", "err none", "err identity"],
            [[r["b"], r["L"], r["causal"], r["rate"], r["err_nocomp"], r["err"]] for r in rows[-3:]],
        )
    body_rows = []
    for r in rows:
        off = next(o for o in rows if (o["b"], o["L"], o["causal"]) == (r["b"], r["L"], "off"))
        body_rows.append(
            [
                r["b"],
                r["L"],
                r["causal"],
                f"{100 * r['rate']:.1f}%",
                f"{r['rate'] / off['rate']:.2f}x",
                r["err_nocomp"],
                r["err"],
            ]
        )
    table = md_table(
        ["b", "L", "lsh.causal", "rate", "rate vs off", "out err, none", "out err, identity (paper)"], body_rows
    )
    tokens = cfg.train.batch_size * cfg.model.seq_len
    body = (
        f"Default GPT-MoE (D={cfg.model.d_model}, {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}) trained "
        f"{a.train_steps} steps without compression; MoE-layer inputs of {a.batches} validation rank batches "
        f"of {cfg.train.batch_size} sequences x {cfg.model.seq_len} tokens ({tokens * cfg.moe.top_k} routed rows "
        f"a batch, {tokens * cfg.moe.top_k // cfg.moe.num_experts} per (rank, expert) group on average), "
        "cross-polytope hashes, no compensation in the forward. `split`: no bucket holds two rows of one "
        "sequence (the occurrence split); `earliest`: the same buckets as `off`, each sent as the mean of its "
        "rows at its earliest position. Errors are relative, root of summed squares over all rows, mean over "
        "the MoE layers: `none` = |E(x) - E(c)|, `identity` = with the paper's E(c) + x - c.\n\n"
        f"{table}\n\n![rate against error by causal mode]({causal_plot(rows, a.out)})\n"
    )
    write_section(
        a.out,
        "lsh_causal",
        "LSH-MoE causal safety: what it costs in rate and error",
        body,
        {"rows": rows, "args": recorded_args(a)},
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    torch.set_num_threads(1)  # one rank's share of a 2-core machine running 2 ranks
    cfg = Config()
    model, data = trained_model(cfg, a.train_steps)
    acts = capture(model, data, cfg, a.batches)
    layers = {layer.layer_id: layer for layer in model.moe_layers}
    if a.causal_only:
        causal_cost(a, cfg, layers, acts)
        return 0

    sweep = []
    for family, b, center in itertools.product(("cross_polytope", "hyperplane"), (2, 4), (False, True)):
        for L in (2, 4, 6, 8, 10):
            lsh = LSHConfig(family=family, buckets_per_hash=b, num_hashes=L, center=center)
            res = [analyse(layers[i], acts[i], lsh) for i in sorted(layers)]
            row = {
                "family": family,
                "b": b,
                "center": center,
                "L": L,
                "rate": sum(r["rate"] for r in res) / len(res),
                "err": sum(r["err"] for r in res) / len(res),
                "err_nocomp": sum(r["err_nocomp"] for r in res) / len(res),
                "err_calibrated": sum(r["err_calibrated"] for r in res) / len(res),
                "alpha": sum(r["alpha"] for r in res) / len(res),
                "per_layer": {f"moe{i}": r for i, r in zip(sorted(layers), res, strict=True)},
            }
            sweep.append(row)
        print_table(
            ["family", "b", "center", "L", "rate", "err", "err no-comp", "err calibrated", "a"],
            [
                [
                    r["family"],
                    r["b"],
                    r["center"],
                    r["L"],
                    r["rate"],
                    r["err"],
                    r["err_nocomp"],
                    r["err_calibrated"],
                    r["alpha"],
                ]
                for r in sweep[-5:]
            ],
        )

    # Overhead versus the all-to-all time saved, for the cross-polytope settings.
    D = cfg.model.d_model
    layer0 = layers[min(layers)]
    x0 = acts[min(layers)][0]
    ovh = []
    for b, center in ((2, False), (2, True), (4, False), (4, True)):
        for L in (2, 6, 10):
            lsh = LSHConfig(buckets_per_hash=b, num_hashes=L, center=center)
            t = overhead(layer0, x0, lsh)
            rate = next(
                r["rate"]
                for r in sweep
                if (r["family"], r["b"], r["center"], r["L"]) == ("cross_polytope", b, center, L)
            )
            rows = x0.shape[0] * layer0.top_k
            saved_bytes = rows * (1 - rate) * D * 4 * 4 * (a.world - 1) / a.world  # disp+comb, fwd+bwd
            t_saved = saved_bytes * 8 / (a.link_gbit * 1e9)
            ovh.append(
                {
                    "b": b,
                    "center": center,
                    "L": L,
                    "rate": rate,
                    "lsh_s": t,
                    "saved_s": t_saved,
                    "overhead_frac": t / t_saved if t_saved else float("inf"),
                }
            )
    print_table(
        ["b", "center", "L", "rate", "LSH ms", "a2a ms saved", "overhead"],
        [
            [o["b"], o["center"], o["L"], o["rate"], 1000 * o["lsh_s"], 1000 * o["saved_s"], o["overhead_frac"]]
            for o in ovh
        ],
    )
    _write(a, cfg, sweep, ovh, x0.shape[0] * layer0.top_k)
    return 0


def _plot(sweep: list[dict], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for family, b, center in sorted({(r["family"], r["b"], r["center"]) for r in sweep}):
        rs = [r for r in sweep if (r["family"], r["b"], r["center"]) == (family, b, center)]
        label = f"{'CP' if family == 'cross_polytope' else 'HP'} b={b}{' centred' if center else ''}"
        style = "-" if family == "cross_polytope" else ":"
        axes[0].plot([r["L"] for r in rs], [r["rate"] for r in rs], style, marker="o", label=label)
        axes[1].plot([r["L"] for r in rs], [r["err"] for r in rs], style, marker="o", label=label)
    axes[0].axhline(0.2, color="grey", lw=0.8)
    axes[0].set(xlabel="hashes L", ylabel="compression rate (rows sent / routed)", yscale="log")
    axes[1].set(xlabel="hashes L", ylabel="relative restore error (compensated)")
    axes[0].legend(fontsize=7, ncol=2)
    return save_plot(fig, out, "lsh_compression")


def _write(a, cfg: Config, sweep: list[dict], ovh: list[dict], rows: int) -> None:
    png = _plot(sweep, a.out)
    table = md_table(
        ["family", "b", "centred", "L", "rate", "err, identity (paper)", "err, none", "err, calibrated", "fitted a"],
        [
            [
                "CP" if r["family"] == "cross_polytope" else "HP",
                r["b"],
                "yes" if r["center"] else "no",
                r["L"],
                f"{100 * r['rate']:.1f}%",
                r["err"],
                r["err_nocomp"],
                r["err_calibrated"],
                r["alpha"],
            ]
            for r in sweep
        ],
    )
    otable = md_table(
        ["b", "centred", "L", "rate", "LSH fwd+bwd ms", f"a2a ms saved @ {a.link_gbit:g} Gbit/s", "overhead / saved"],
        [
            [
                o["b"],
                "yes" if o["center"] else "no",
                o["L"],
                f"{100 * o['rate']:.1f}%",
                1000 * o["lsh_s"],
                1000 * o["saved_s"],
                f"{100 * o['overhead_frac']:.1f}%",
            ]
            for o in ovh
        ],
    )
    body = (
        f"Default GPT-MoE (D={cfg.model.d_model}, {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}) trained "
        f"{a.train_steps} steps without compression; MoE-layer inputs of {a.batches} validation rank batches "
        f"of {cfg.train.batch_size}x{cfg.model.seq_len} tokens ({rows} routed rows each), hashed per "
        "(rank, expert) group. Rates and errors are averaged over the MoE layers; errors aggregate all rows "
        "(root of summed squares). CP = cross-polytope, HP = hyperplane (sign bits).\n\n"
        f"{table}\n\n![compression vs L]({png})\n\n"
        f"### Overhead against the all-to-all time saved\n\nCompress + restore forward and backward on one "
        f"rank's {rows} rows (1 thread, median of 15), against the transfer time of the rows it saves over a "
        f"{a.link_gbit:g} Gbit/s link (dispatch + combine, forward + backward, the {a.world - 1}/{a.world} of "
        f"rows that leave a rank of {a.world}).\n\n{otable}\n"
    )
    write_section(
        a.out,
        "lsh_compression",
        "LSH-MoE compression rate, restore error and overhead",
        body,
        {"sweep": sweep, "overhead": ovh, "args": recorded_args(a)},
    )


if __name__ == "__main__":
    raise SystemExit(main())
