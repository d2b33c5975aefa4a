"""`lshmoe bench NAME [ARGS]`: run one benchmark; `BENCHES` is the table of them.

A benchmark is a module with `main(argv) -> int` and a `parser()`; adding one is one module plus
one line here. Each writes its section to runs/bench/ (or `--out docs/bench` for the committed report).
"""

from __future__ import annotations

import argparse
import importlib

from lshmoe.cliutil import Parser

# benchmark name -> (module with main(argv) -> int, what it measures)
BENCHES = {
    "layer": ("lshmoe.bench.moe_layer", "MoE layer fwd+bwd tokens/s vs DeepSpeed"),
    "train": ("lshmoe.bench.train_e2e", "end-to-end training tokens/s"),
    "lsh": ("lshmoe.bench.lsh_analysis", "LSH compression rate, restore error and overhead vs hash settings"),
    "lsh-real": ("lshmoe.bench.lsh_real", "LSH rate vs restore and expert-output error on pretrained MiniLM"),
    "upcycle": ("lshmoe.bench.upcycle_bench", "the upcycled MiniLM-MoE: baseline, dedup, fp8, lsh, lsh+fp8, auto"),
    "rate": ("lshmoe.bench.rate_curve", "LSH-MoE compression rate of the default model over a long run"),
    "cluster": ("lshmoe.bench.cluster", "baseline vs LSH-MoE step time on an emulated multi-node cluster"),
    "quality": ("lshmoe.bench.quality", "validation loss of variants over seeds, time-to-target"),
    "soak": ("lshmoe.bench.soak", "thousands of steps with memory sampled (no growth)"),
    "scmoe": ("lshmoe.bench.scmoe_bench", "exposed all-to-all time of top-2, shared-expert, ScMoE, DGMoE"),
    "locmoe": ("lshmoe.bench.locmoe_bench", "inter-node bytes, balance and loss versus the locality weight"),
    "lina-train": ("lshmoe.bench.lina_train", "all-to-all slowdown and step time: sync vs fair vs Lina priority"),
    "lina-infer": ("lshmoe.bench.lina_infer", "inference MoE-layer latency: Lina's popularity placement vs uniform"),
    "chaos": ("lshmoe.bench.chaos", "ranks killed again and again, restarts, final state bitwise vs uninterrupted"),
    "hf": ("lshmoe.bench.hf_bench", "fine-tuning tokens/s and memory: lshmoe on a Qwen3-MoE shape vs transformers"),
    "data": ("lshmoe.bench.data_bench", "token data: prepare time, start-up and RSS per rank, shards vs text"),
    "memory": ("lshmoe.bench.memory_bench", "model state per rank vs the plan's formula: FSDP x EP, bf16 MP, AC"),
    "lsh-accum": ("lshmoe.bench.lsh_accum", "LSH-MoE compression rate vs micro-batches per step (grad accum)"),
    "gpu": ("lshmoe.bench.gpu", "fused LSH kernel times and MoE layer vs transformers: one bounded GPU run"),
}


def parser() -> Parser:
    p = Parser(prog="lshmoe bench", description="Benchmarks: " + ", ".join(f"{k} ({v[1]})" for k, v in BENCHES.items()))
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of that benchmark (see its --help)")
    return p


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    return importlib.import_module(BENCHES[a.name][0]).main(a.args)
