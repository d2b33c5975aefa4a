"""LSH-MoE's rate at the batch sizes GPU jobs run: 256 to 16k rows per (source rank, expert) group,
on all-MiniLM-L6-v2's real activations, with a random and with a trained router
(`lshmoe bench lsh-real --scale`).

1. Tokens: the embedded stdlib-docstring corpus through the model's own tokenizer, concatenated and
   cut into full windows of `--seq-len` tokens ([CLS] ... [SEP], no padding): `--pool` tokens.
2. Two routers over the same windows, the MoE layers an `--upcycle-every 2` model has (1, 3, 5):
   - `random`: the pretrained dense model's FFN inputs, routed top-K of E by a seeded random linear
     router on centred rows; every expert is the layer's pretrained FFN (an upcycled MoE at step 0);
   - `trained`: an upcycled MiniLM-MoE (E experts, top-K, every 2nd layer) trained `--train-steps`
     masked-LM steps on the same corpus (one process, cached), its FFN inputs, its router's choices
     and its trained experts (captured with hf/capture.py, a chunk of windows at a time).
3. Group sizes: for n rows per group a source rank holds n E / K consecutive tokens, so the same pool
   is cut into pool K / (n E) ranks; every rank's rows go through the LSH compressor (one compressor
   per layer and rank, projections of step 0). Rates count every row; errors are measured on a fixed
   random sample of `--sample` rows per layer (their exact expert output and their centroid's):
   in_err = |x - c| / |x|, out_err = |E(x) - E(c)| / |E(x)|, both means over the sampled rows.
4. Settings: the defaults; the real-model recommendation of docs/lsh.md (b = 2, L = 8, PCA
   projections, exact_spread 0.5); rates held at 20% and 40% (`lsh.target=rate`: the largest L' <= 24
   whose rate on the rank's rows is within the target, PCA b = 2 and random b = 4); and the defaults
   with causal safety (`split`, `earliest`), the rows' positions being those of their windows.

The table of GPU settings maps tokens per rank, top-k and experts to rows per group (T K / E; EP only
decides which groups cross the network) and reads the expected rate off the measured curves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lshmoe.bench.minilm import MODEL
from lshmoe.bench.report import md_table, print_table, save_plot, write_section
from lshmoe.compress.protocol import Positions
from lshmoe.compress.registry import CompressorContext, build_compressor
from lshmoe.config import Config, LSHConfig, set_value, validate
from lshmoe.data import default_cache_dir
from lshmoe.data.corpus import embedded_corpus
from lshmoe.distributed.comm import Comm
from lshmoe.seeding import generator

LAYERS = (1, 3, 5)  # the FFNs an `--upcycle-every 2` model makes MoE layers
SIZES = (256, 512, 1024, 2048, 4096, 8192, 16384)

SETTINGS: dict[str, LSHConfig] = {
    "defaults (random b=4, L=6)": LSHConfig(),
    "recommended (pca b=2, L=8, exact 0.5)": LSHConfig(
        buckets_per_hash=2, num_hashes=8, projection="pca", exact_spread=0.5
    ),
    "pca b=2 held at 20%": LSHConfig(
        buckets_per_hash=2, num_hashes=24, projection="pca", target="rate", target_value=0.2
    ),
    "pca b=2 held at 40%": LSHConfig(
        buckets_per_hash=2, num_hashes=24, projection="pca", target="rate", target_value=0.4
    ),
    "random b=4 held at 20%": LSHConfig(num_hashes=24, target="rate", target_value=0.2),
    "random b=4 held at 40%": LSHConfig(num_hashes=24, target="rate", target_value=0.4),
    "defaults, causal split": LSHConfig(causal=True, causal_mode="split"),
    "defaults, causal earliest": LSHConfig(causal=True, causal_mode="earliest"),
}

# (model, tokens per rank, top-k, experts, EP) of common GPU jobs
GPU_SETTINGS = (
    ("Mixtral-8x7B-like", 4096, 2, 8, 8),
    ("Mixtral-8x7B-like", 8192, 2, 8, 8),
    ("Mixtral-8x7B-like", 16384, 2, 8, 8),
    ("OLMoE-1B-7B", 8192, 8, 64, 8),
    ("Qwen3-30B-A3B", 8192, 8, 128, 8),
    ("Qwen3-30B-A3B", 16384, 8, 128, 16),
    ("DeepSeek-V3", 8192, 8, 256, 64),
    ("DeepSeek-V3", 32768, 8, 256, 64),
    ("the paper's GPT-MoE 15B", 8192, 2, 512, 16),
)


@dataclass(frozen=True)
class Layer:
    """One MoE layer's routed rows over the whole pool: row n is token token_N[n] sent to expert_N[n]
    (rows sorted by token, then expert); `experts(rows, expert_N)` evaluates them exactly."""

    rows_ND: torch.Tensor
    expert_N: torch.Tensor
    token_N: torch.Tensor
    experts: object


# ---------------------------------------------------------------------------------------- tokens


def windows(tokenizer, pool: int, seq_len: int) -> torch.Tensor:
    """[pool // seq_len, seq_len] token ids: the corpus concatenated, cut into [CLS] ... [SEP] windows."""
    docs = embedded_corpus("stdlib")
    body = seq_len - 2
    need = pool // seq_len * body
    ids: list[int] = []
    for start in range(0, len(docs), 256):
        for enc in tokenizer(docs[start : start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"the corpus has {len(ids)} tokens, fewer than the {need} asked for")
    w = torch.tensor(ids[:need]).view(-1, body)
    cls = torch.full((w.shape[0], 1), tokenizer.cls_token_id)
    sep = torch.full((w.shape[0], 1), tokenizer.sep_token_id)
    return torch.cat([cls, w, sep], 1)


# ---------------------------------------------------------------------------------------- routers


def _ffn_fn(bert_layer):
    inter, out = bert_layer.intermediate, bert_layer.output
    W1, b1, W2, b2 = inter.dense.weight, inter.dense.bias, out.dense.weight, out.dense.bias

    def run(x_ND: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:  # every expert is the FFN
        x = x_ND.to(W1.dtype)
        return torch.nn.functional.gelu(x @ W1.T + b1) @ W2.T + b2

    return run


@torch.no_grad()
def random_router(ids_WS: torch.Tensor, a: argparse.Namespace) -> list[Layer]:
    from lshmoe.bench.minilm import load_model, route

    model, _ = load_model()
    grabbed: dict[int, list[torch.Tensor]] = {i: [] for i in LAYERS}
    hooks = [
        model.encoder.layer[i].intermediate.register_forward_hook(lambda m, args, out, i=i: grabbed[i].append(args[0]))
        for i in LAYERS
    ]
    for chunk in ids_WS.split(32):
        model(input_ids=chunk)
    for h in hooks:
        h.remove()
    out = []
    for i in LAYERS:
        x_TD = torch.cat([g.reshape(-1, g.shape[-1]) for g in grabbed[i]])
        ids_TK = route(x_TD.double(), x_TD.double().mean(0), a.experts, a.top_k, a.seed, i)
        token_N = torch.arange(x_TD.shape[0]).repeat_interleave(a.top_k)
        out.append(Layer(x_TD.index_select(0, token_N), ids_TK.reshape(-1), token_N, _ffn_fn(model.encoder.layer[i])))
    return out


def _train_config(a: argparse.Namespace) -> Config:
    cfg = Config()
    for k, v in {
        "model.hf": MODEL,
        "moe.num_experts": a.experts,
        "moe.top_k": a.top_k,
        "upcycle.every": 2,
        "model.seq_len": a.seq_len,
        "train.steps": a.train_steps,
        "train.batch_size": 8,
        "train.lr": 3e-4,
        "train.warmup_steps": 20,
        "train.eval_every": 0,
        "train.log_every": 50,
        "train.progress": "false",
        "dist.threads": a.threads,
    }.items():
        set_value(cfg, k, str(v))
    return validate(cfg, 1)


def trained_model(a: argparse.Namespace):
    """The upcycled MiniLM-MoE after `--train-steps` masked-LM steps on one process (weights cached by
    config). NOTE: the one place this bench runs the training loop in-process (train/loop.py's Trainer
    on the upcycling task); the capture needs the model in memory, at a batch larger than the training batch."""
    from lshmoe.hf.task import task_for
    from lshmoe.hf.upcycle import upcycle_bert
    from lshmoe.train.loop import Trainer

    cfg = _train_config(a)
    key = hashlib.blake2b(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    path = default_cache_dir() / "bench" / f"minilm-moe-{key}.pt"
    comm = Comm.local()
    if path.exists():
        model, _ = upcycle_bert(MODEL, comm, cfg)
        model.load_state_dict(torch.load(path))
        return model.eval(), cfg
    cfg.train.out_dir = str(path.parent / f"train-minilm-{key}")
    print(f"training the upcycled {MODEL} ({a.experts} experts, top-{a.top_k}) for {a.train_steps} steps ...")
    trainer = Trainer(cfg, comm, task_for(MODEL))
    trainer.run()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(trainer.model.state_dict(), path)
    return trainer.model.eval(), cfg


def _expert_fn(moe):
    def run(x_ND: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
        order = torch.sort(expert_N, stable=True).indices
        counts = torch.bincount(expert_N, minlength=moe.num_experts).tolist()
        y = moe.experts(x_ND.index_select(0, order).to(moe.experts.w1_GDF.dtype), counts)
        return torch.empty_like(y).index_copy_(0, order, y)

    return run


def trained_router(ids_WS: torch.Tensor, a: argparse.Namespace) -> tuple[list[Layer], dict]:
    from lshmoe.hf.capture import capture_ffn_inputs
    from lshmoe.hf.model import moe_blocks

    model, cfg = trained_model(a)  # trains outside no_grad
    torch.set_grad_enabled(False)
    comm = Comm.local()
    blocks = dict(moe_blocks(model))
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {i: [] for i in blocks}
    offset = 0
    for chunk in ids_WS.split(32):
        cap = capture_ffn_inputs(model, comm, chunk)
        for i, layer in cap["layers"].items():
            expert_N = torch.repeat_interleave(torch.arange(a.experts), layer["counts_WE"][0])
            parts[i].append((layer["rows_ND"], expert_N, layer["token_N"] + offset))
        offset += chunk.numel()
    out = []
    for i in sorted(blocks):
        rows, expert, token = (torch.cat(t) for t in zip(*parts[i], strict=True))
        order = torch.sort(token * a.experts + expert).indices  # by token, then expert
        out.append(Layer(rows[order], expert[order], token[order], _expert_fn(blocks[i].moe)))
    torch.set_grad_enabled(True)
    return out, {"train_steps": a.train_steps, "train_config": cfg.to_dict()}


# ---------------------------------------------------------------------------------------- measuring


@torch.no_grad()
def measure(lsh: LSHConfig, layers: list[Layer], n: int, a: argparse.Namespace, samples: list[torch.Tensor]) -> dict:
    """Rate over every row and errors over the sampled rows, at n rows per group (ranks of n E / K tokens)."""
    E, seq = a.experts, a.seq_len
    per_rank = n * E // a.top_k
    sent = routed = 0
    in_err, out_err, chosen = [], [], []
    for li, (layer, sample) in enumerate(zip(layers, samples, strict=True)):
        rank_N = layer.token_N // per_rank
        picked = torch.zeros(layer.rows_ND.shape[0], dtype=torch.bool)
        picked[sample] = True
        for r in range(int(rank_N.max()) + 1):
            idx = torch.nonzero(rank_N == r).squeeze(1)
            if idx.numel() == 0:
                continue
            order = idx[torch.sort(layer.expert_N[idx], stable=True).indices]  # expert-major, token order
            rows, expert, token = layer.rows_ND[order], layer.expert_N[order], layer.token_N[order]
            counts = torch.bincount(expert, minlength=E)
            ctx = CompressorContext(E, rows.shape[1], LAYERS[li], a.seed, replace(Config(), lsh=lsh))
            comp = build_compressor("lsh", ctx)
            comp.set_step(0)
            at = Positions(token // seq, token % seq)
            payload, _, meta = comp.compress(rows, counts, at)
            sent, routed = sent + payload.shape[0], routed + rows.shape[0]
            chosen.append(comp.num_hashes)
            mine = torch.nonzero(picked[order]).squeeze(1)
            if mine.numel():
                bucket = meta.inverse_N[mine]
                uniq, inv = torch.unique(bucket, return_inverse=True)
                cent_expert = expert[mine].new_empty(uniq.numel()).scatter_(0, inv, expert[mine])
                e_c = layer.experts(payload[uniq], cent_expert).double()[inv]
                x, c = rows[mine].double(), meta.centroids_MD[bucket].double()  # an exact row is its own c
                e_x = layer.experts(rows[mine], expert[mine]).double()
                in_err.append((x - c).norm(dim=1) / x.norm(dim=1))
                out_err.append((e_x - e_c).norm(dim=1) / e_x.norm(dim=1))
    return {
        "rate": sent / routed,
        "in_err": float(torch.cat(in_err).mean()),
        "out_err": float(torch.cat(out_err).mean()),
        "hashes_mean": sum(chosen) / len(chosen),
    }


def expected_rate(curve: list[tuple[int, float]], n: float) -> tuple[float, str]:
    """The rate at n rows per group, interpolated in log2(n) between measured sizes (outside them, the
    nearest end's, with a note)."""
    pts = sorted(curve)
    if n < pts[0][0]:
        return pts[0][1], f"fewer rows than measured: the rate at {pts[0][0]}"
    if n > pts[-1][0]:
        return pts[-1][1], f"more rows than measured: the rate at {pts[-1][0]}"
    for (n0, r0), (n1, r1) in zip(pts, pts[1:], strict=False):
        if n0 <= n <= n1:
            f = (math.log2(n) - math.log2(n0)) / (math.log2(n1) - math.log2(n0))
            return r0 + f * (r1 - r0), ""
    raise AssertionError(n)


def run(a: argparse.Namespace) -> int:
    from lshmoe.bench.minilm import load_model

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    _, tokenizer = load_model()
    ids = windows(tokenizer, a.pool, a.seq_len)
    sizes = [n for n in SIZES if n * a.experts // a.top_k <= ids.numel()]
    routers = {"random": random_router(ids, a)}
    trained, meta = trained_router(ids, a)
    routers["trained"] = trained
    print(f"{ids.numel()} tokens, {len(LAYERS)} layers, routers ready in {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for rname, layers in routers.items():
        g = generator(a.seed, "lsh-real-sample", rname)
        samples = [torch.randperm(layer.rows_ND.shape[0], generator=g)[: a.sample] for layer in layers]
        balance = [torch.bincount(layer.expert_N, minlength=a.experts).double() for layer in layers]
        print(f"{rname}: expert load max/mean " + ", ".join(f"{float(b.max() / b.mean()):.2f}" for b in balance))
        for sname, lsh in SETTINGS.items():
            for n in sizes:
                r = {"router": rname, "setting": sname, "rows_per_group": n, **measure(lsh, layers, n, a, samples)}
                results.append(r)
                print(
                    f"{rname:7s} {sname:40s} n={n:6d} rate {r['rate']:.3f} in {r['in_err']:.3f} "
                    f"out {r['out_err']:.3f} L {r['hashes_mean']:.1f}",
                    flush=True,
                )
    _write(a, results, meta, time.perf_counter() - t0, ids.numel())
    return 0


# ---------------------------------------------------------------------------------------- report


def _plot(results: list[dict], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, sname in enumerate(SETTINGS):
        for rname, style in (("random", "--"), ("trained", "-")):
            rs = [r for r in results if r["router"] == rname and r["setting"] == sname]
            xs = [r["rows_per_group"] for r in rs]
            kw = dict(color=f"C{i}", ls=style, marker="o", ms=3, label=f"{sname} ({rname})")
            axes[0].plot(xs, [100 * r["rate"] for r in rs], **kw)
            axes[1].plot(xs, [r["out_err"] for r in rs], **kw)
    axes[0].set(xscale="log", xlabel="rows per (source rank, expert) group", ylabel="rows sent / rows routed (%)")
    axes[1].set(xscale="log", xlabel="rows per (source rank, expert) group", ylabel="out err |E(x) - E(c)| / |E(x)|")
    for ax in axes:
        ax.set_xticks(list(SIZES), [str(n) for n in SIZES])
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, bbox_to_anchor=(0.5, -0.16))
    return save_plot(fig, out, "lsh_real_scale")


def gpu_table(results: list[dict]) -> tuple[list[str], list[list]]:
    cols = ["model", "tokens/rank", "top-k", "experts", "EP", "rows per group", "rows leaving a rank"]
    picks = [("defaults (random b=4, L=6)", "random"), ("defaults (random b=4, L=6)", "trained")]
    picks += [("recommended (pca b=2, L=8, exact 0.5)", "trained")]
    cols += [f"rate: {'defaults' if s.startswith('defaults') else 'recommended'}, {r} router" for s, r in picks]
    rows = []
    for model, T, K, E, ep in GPU_SETTINGS:
        n = T * K / E
        cells: list = [model, T, K, E, ep, f"{n:,.0f}", f"{100 * (ep - 1) / ep:.0f}%"]
        for s, r in picks:
            curve = [(x["rows_per_group"], x["rate"]) for x in results if x["setting"] == s and x["router"] == r]
            rate, note = expected_rate(curve, n)
            cells.append(f"{100 * rate:.0f}%" + (f" ({note})" if note else ""))
        rows.append(cells)
    return cols, rows


def _write(a: argparse.Namespace, results: list[dict], meta: dict, wall_s: float, tokens: int) -> None:
    png = _plot(results, a.out)
    cols = ["setting", "router", *[f"{n}" for n in sorted({r["rows_per_group"] for r in results})]]
    tables = []
    for key, label in (("rate", "rate"), ("in_err", "in err |x - c| / |x|"), ("out_err", "out err")):
        body = []
        for sname in SETTINGS:
            for rname in ("random", "trained"):
                rs = sorted(
                    (r for r in results if r["setting"] == sname and r["router"] == rname),
                    key=lambda r: r["rows_per_group"],
                )
                fmt = (lambda v: f"{100 * v:.1f}%") if key == "rate" else (lambda v: f"{v:.3f}")
                body.append([sname, rname, *[fmt(r[key]) for r in rs]])
        tables.append(f"#### {label}, by rows per (source rank, expert) group\n\n{md_table(cols, body)}")
        print_table(cols, body)
    held = [
        [r["setting"], r["router"], r["rows_per_group"], f"{r['hashes_mean']:.1f}"]
        for r in results
        if "held" in r["setting"]
    ]
    gcols, grows = gpu_table(results)
    steps = meta["train_steps"]
    body = (
        f"{MODEL} (6-layer BERT, D = 384) on the embedded stdlib-docstring corpus, {tokens:,} tokens in windows of "
        f"{a.seq_len} (the model's tokenizer, documents concatenated, no padding); the FFN inputs of layers "
        f"{', '.join(map(str, LAYERS))} (those an `--upcycle-every 2` model makes MoE layers), top-{a.top_k} of "
        f"{a.experts} experts. Router `random`: the pretrained dense model, a seeded random linear router on "
        "centred rows, every expert the layer's pretrained FFN. Router `trained`: an upcycled MiniLM-MoE "
        f"(noise 0.01, router std 0.01) trained {steps} masked-LM steps on one process (8 x {a.seq_len} tokens a "
        "step, lr 3e-4, all parameters), its own routing and trained experts, captured in eval mode. A source "
        "rank holds n E / K consecutive tokens for n rows per group; every row is compressed (rates), errors "
        f"on {a.sample} sampled rows per layer. Cross-polytope; projections of step 0. Held rates: the largest "
        "L' <= 24 whose rate on the rank's rows is within the target (`lsh.target=rate`, one step). Causal "
        "rows: the rows' positions in their windows (MiniLM is an encoder; the rows stand in for a causal "
        f"model's). Wall time {wall_s:.0f} s. Plot: solid lines the trained router, dashed the random one."
        f"\n\n![rate and error by rows per group]({png})\n\n"
        + "\n\n".join(tables)
        + "\n\n#### Hashes the held rates chose (mean over layers and ranks)\n\n"
        + md_table(["setting", "router", "rows per group", "L"], held)
        + "\n\n### Common GPU settings: rows per group and the rate to expect\n\n"
        "Rows per (source rank, expert) group = tokens per rank x top-k / experts, whatever the EP size "
        "(EP decides only which groups leave the rank: (EP - 1) / EP of the rows). The rate is read off the "
        "curves above (log-linear between measured sizes), so it is MiniLM's activations at these settings, "
        "not the named model's.\n\n" + md_table(gcols, grows) + "\n"
    )
    data = {"results": results, "gpu": {"columns": gcols, "rows": grows}, "meta": meta}
    data["args"] = {k: v for k, v in vars(a).items() if k != "out"}
    data["settings"] = {k: asdict(v) for k, v in SETTINGS.items()}
    write_section(a.out, "lsh_real_scale", f"LSH-MoE's rate at GPU batch sizes on {MODEL}", body, data)
