"""Command line: `lshmoe train` (and the other verbs as they land).

    lshmoe train [--config FILE.yaml] [--set section.key=value ...] [--<field> value ...]

Every config field has a flag: `--section.key` always, and the bare `--key` (hyphenated) when the
name is unique across sections, e.g. `--steps 100 --top-k 1 --nproc 2 --data corpus.txt`.
Precedence: defaults < YAML < --set < flags. Under torchrun the process is one rank; otherwise
`--nproc N` (N > 1) spawns N local ranks. Mistakes in the input print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
from typing import NoReturn

from lshmoe import config as C
from lshmoe.errors import DistError, NumericalError, Stopped, UserError

EXIT_USER, EXIT_DIST, EXIT_NUMERIC = 2, 3, 4

PASS_THROUGH = {
    "simulate": "lshmoe.bench.simulate",
    "demo": "lshmoe.bench.demo",
    "infer": "lshmoe.infer.run",
    "plan": "lshmoe.plan.command",
}

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
    "gpu": ("lshmoe.bench.gpu", "CUDA tests, fused LSH kernel times, MoE layer vs transformers: one bounded GPU run"),
}


def _flag_names() -> dict[str, list[str]]:
    """dotted field -> its flags."""
    leaves = C.leaf_fields()
    counts: dict[str, int] = {}
    for dotted, _, _ in leaves:
        counts[dotted.split(".")[1]] = counts.get(dotted.split(".")[1], 0) + 1
    out = {}
    for dotted, f, _ in leaves:
        section, key = dotted.split(".")
        flags = [f"--{dotted}"]
        if f.metadata.get("flag"):
            flags.append(f"--{f.metadata['flag']}")
        elif section in C.FLAG_PREFIX:
            flags.append(f"--{C.FLAG_PREFIX[section]}{key.replace('_', '-')}")
        elif counts[key] == 1:
            flags.append(f"--{key.replace('_', '-')}")
        out[dotted] = flags
    for old, new in C.ALIASES.items():  # a moved key keeps its old dotted flag
        out[new].append(f"--{old}")
    return out


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (sections: " + ", ".join(C.SECTIONS) + ")")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config field (repeatable)"
    )
    flags = _flag_names()
    for section in C.SECTIONS:
        grp = p.add_argument_group(f"{section} config")
        for dotted, f, tp in C.leaf_fields():
            if not dotted.startswith(section + "."):
                continue
            help_text = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                help_text += f" ({'|'.join(f.metadata['choices'])})"
            help_text += f" [default: {f.default}]"
            is_bool = tp is bool
            grp.add_argument(
                *flags[dotted],
                dest=dotted,
                default=argparse.SUPPRESS,
                metavar="V",
                nargs="?" if is_bool else None,
                const="true" if is_bool else None,
                help=help_text,
            )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lshmoe", description="Communication-efficient distributed MoE training.")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    train = sub.add_parser(
        "train",
        help="train a GPT-MoE language model",
        description="Train a GPT-MoE on the embedded corpus or --data PATH.",
    )
    _add_config_flags(train)
    bench = sub.add_parser(
        "bench",
        help="run a benchmark (writes runs/bench/ and runs/benchmarks.md; --out docs/bench for the committed report)",
        description="Benchmarks: " + ", ".join(f"{k} ({v[1]})" for k, v in BENCHES.items()),
    )
    bench.add_argument("name", choices=sorted(BENCHES))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments of that benchmark (see its --help)")
    sim = sub.add_parser("simulate", help="project LSH-MoE speedups on real clusters (analytic model)", add_help=False)
    sim.add_argument("args", nargs=argparse.REMAINDER)
    demo = sub.add_parser("demo", help="side-by-side baseline vs LSH-MoE on an emulated 2-node cluster", add_help=False)
    demo.add_argument("args", nargs=argparse.REMAINDER)
    exp = sub.add_parser(
        "export",
        help="write a train --hf checkpoint as a Hugging Face checkpoint (experts gathered)",
        description="Export a `train --hf` checkpoint (saved at any EP size) as sharded safetensors + config.json "
        "that transformers loads unchanged.",
    )
    exp.add_argument("--checkpoint", required=True, help="checkpoint directory, or a checkpoints root with 'latest'")
    exp.add_argument("--hf-out", required=True, help="output directory")
    plan = sub.add_parser(
        "plan",
        help="per-rank memory of a model for each parallel setting, and which fit (reads config.json)",
        add_help=False,
    )
    plan.add_argument("args", nargs=argparse.REMAINDER)
    infer = sub.add_parser("infer", help="score a trained checkpoint with Lina's expert placement", add_help=False)
    infer.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def config_from_args(ns: argparse.Namespace) -> C.Config:
    cfg = C.load_yaml(ns.config) if ns.config else C.Config()
    C.apply_sets(cfg, ns.set)
    for dotted, _, _ in C.leaf_fields():
        if dotted in vars(ns):
            C.set_value(cfg, dotted, getattr(ns, dotted))
    return cfg


def _under_launcher() -> bool:
    """True inside a rank started by torchrun or by `lshmoe.distributed.launch`."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def prepare(cfg: C.Config) -> None:
    """Everything that can be checked before a rank starts: the config for the world size, the device,
    `--resume` (verified), the token data (built once, here) against the sequence length. Raises a
    one-line UserError."""
    C.validate(cfg, world_size=cfg.dist.nproc)
    if "cuda" in (cfg.dist.device, "nccl" if cfg.dist.backend == "nccl" else ""):
        import torch

        if not torch.cuda.is_available():
            what = "dist.device=cuda" if cfg.dist.device == "cuda" else "dist.backend=nccl"
            raise C.ConfigError(f"{what} but no CUDA device is visible; use --device cpu / --backend gloo")
    if cfg.dist.backend == "nccl" and cfg.dist.device == "cpu":
        raise C.ConfigError("dist.backend=nccl needs dist.device=cuda (or auto); use --backend gloo on the CPU")
    from lshmoe.train.checkpoint import preflight
    from lshmoe.train.data import load_data

    preflight(cfg)
    data = load_data(cfg.data, lambda m: print(f"[lshmoe] {m}", file=sys.stderr, flush=True))
    data.check_seq_len(cfg.model.seq_len)


def cmd_train_hf(cfg: C.Config, argv: list[str]) -> int:
    from lshmoe.hf.train import train_hf

    if _under_launcher() or (cfg.dist.nproc == 1 and cfg.fault.max_restarts == 0):
        train_hf(cfg)
        return 0
    C.validate(cfg)
    from lshmoe.hf.task import task_for

    task = task_for(cfg.model.hf)
    task.read_config(task.src)  # a bad directory fails here, once, before any rank starts
    from lshmoe.distributed.launch import launch

    return launch(argv, cfg.dist.nproc, max_restarts=cfg.fault.max_restarts, stop_grace_s=cfg.dist.timeout_s)


def cmd_export(ns: argparse.Namespace) -> int:
    from lshmoe.hf.train import export_checkpoint

    out = export_checkpoint(ns.checkpoint, ns.hf_out)
    print(f"[lshmoe] exported {ns.checkpoint} to {out}", file=sys.stderr)
    return 0


def cmd_train(ns: argparse.Namespace, argv: list[str]) -> int:
    cfg = config_from_args(ns)
    if cfg.model.hf:
        return cmd_train_hf(cfg, argv)
    if _under_launcher():
        from lshmoe.train.gpt_task import train

        train(cfg)
        return 0
    prepare(cfg)
    if cfg.dist.nproc == 1 and cfg.fault.max_restarts == 0:
        from lshmoe.train.gpt_task import train

        train(cfg)
        return 0
    from lshmoe.distributed.launch import launch

    return launch(argv, cfg.dist.nproc, max_restarts=cfg.fault.max_restarts, stop_grace_s=cfg.dist.timeout_s)


def main(argv: list[str] | None = None) -> int:
    """The `lshmoe` command. Run as a program (argv None) inside a launched rank, the process ends
    through `_end_rank` once the verb returns."""
    as_program = argv is None
    if as_program and _under_launcher():
        faulthandler.enable(all_threads=True)  # a rank that dies on a signal prints every thread's stack
    rc = _main(list(sys.argv[1:] if argv is None else argv))
    if as_program and _under_launcher():
        _end_rank(rc)
    return rc


def _end_rank(rc: int) -> NoReturn:
    """End a rank whose work is done, written and closed, without interpreter finalization.

    NOTE: at finalization a daemon thread still inside a C++ call that released the GIL (a gloo
    collective, a store client's wait, a timed-out join left it there) is unwound through noexcept
    frames when it wakes, which aborts the process ("terminate called without an active exception",
    signal 6) after the job has succeeded: seen once in several hundred 2-rank runs of the tests."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc)


def _main(argv: list[str]) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        if argv and argv[0] in PASS_THROUGH:  # these parse their own flags
            import importlib

            return importlib.import_module(PASS_THROUGH[argv[0]]).main(argv[1:])
        ns = build_parser().parse_args(argv)
        if ns.verb == "train":
            return cmd_train(ns, argv)
        if ns.verb == "export":
            return cmd_export(ns)
        if ns.verb == "bench":
            import importlib

            return importlib.import_module(BENCHES[ns.name][0]).main(ns.args)
        return EXIT_USER
    except UserError as e:
        if rank == 0:
            print(f"lshmoe: error: {e}", file=sys.stderr)
        return EXIT_USER
    except DistError as e:
        print(f"lshmoe: {e}", file=sys.stderr, flush=True)
        if _under_launcher():
            # NOTE: a rank whose peers are gone exits at once: a thread still blocked on the dead peer or
            # store (gloo's, the watchdog's) would be unwound at interpreter exit and abort the process.
            sys.stdout.flush()
            os._exit(EXIT_DIST)
        return EXIT_DIST
    except NumericalError as e:
        if rank == 0:
            print(f"lshmoe: error: {e}", file=sys.stderr)
        return EXIT_NUMERIC
    except Stopped as e:
        if rank == 0:
            print(f"lshmoe: {e}", file=sys.stderr)
        return Stopped.exit_status
    except KeyboardInterrupt:
        print("lshmoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
