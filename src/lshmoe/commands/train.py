"""`lshmoe train`: train a GPT-MoE, or fine-tune / upcycle a Hugging Face checkpoint (`--hf`).

    lshmoe train [--config FILE.yaml] [--set section.key=value ...] [--<field> value ...]

Every config field has a flag (lshmoe/cliutil.py), e.g. `--steps 100 --top-k 1 --nproc 2 --data
corpus.txt`. Precedence: defaults < YAML < --set < flags. Under torchrun the process is one rank;
otherwise `--nproc N` (N > 1) spawns N local ranks. Mistakes in the input print one line and exit with 2.

Both kinds of run go through the one training loop (train/loop.py), from `run_gpt` and `run_hf`.
"""

from __future__ import annotations

import argparse
import sys

from lshmoe import config as C
from lshmoe.cliutil import Parser, add_config_flags, apply_flags, under_launcher


def parser() -> Parser:
    p = Parser(prog="lshmoe train", description="Train a GPT-MoE on the embedded corpus or --data PATH.")
    p.add_argument("--config", help="YAML config file (sections: " + ", ".join(C.SECTIONS) + ")")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config field (repeatable)"
    )
    add_config_flags(p)
    return p


def config_from_args(ns: argparse.Namespace) -> C.Config:
    """defaults < YAML < --set < flags."""
    cfg = C.load_yaml(ns.config) if ns.config else C.Config()
    C.apply_sets(cfg, ns.set)
    return apply_flags(cfg, ns)


def run_gpt(cfg: C.Config) -> None:
    """Train the GPT-MoE in this process (one rank)."""
    from lshmoe.train.gpt_task import train

    train(cfg)


def run_hf(cfg: C.Config) -> None:
    """Fine-tune or upcycle `cfg.model.hf` in this process (one rank)."""
    from lshmoe.hf.train import train_hf

    train_hf(cfg)


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
    from lshmoe.data import load_data
    from lshmoe.train.checkpoint import preflight

    preflight(cfg)
    data = load_data(cfg.data, lambda m: print(f"[lshmoe] {m}", file=sys.stderr, flush=True))
    data.check_seq_len(cfg.model.seq_len)


def prepare_hf(cfg: C.Config) -> None:
    """What can be checked before a `--hf` rank starts: the config, and the checkpoint's config.json
    (read once here; a bad directory is one line that names the field)."""
    C.validate(cfg)
    from lshmoe.hf.family import HFError
    from lshmoe.hf.task import task_for

    try:
        task = task_for(cfg.model.hf)
        task.read_config(task.src)
    except HFError as e:
        raise HFError(f"model.hf: {e}") from None


def _train_hf(cfg: C.Config, argv: list[str]) -> int:
    if under_launcher():
        run_hf(cfg)
        return 0
    prepare_hf(cfg)
    if cfg.dist.nproc == 1 and cfg.fault.max_restarts == 0:
        run_hf(cfg)
        return 0
    return _launch(cfg, argv)


def main(argv: list[str]) -> int:
    cfg = config_from_args(parser().parse_args(argv))
    if cfg.model.hf:
        return _train_hf(cfg, argv)
    if under_launcher():
        run_gpt(cfg)
        return 0
    prepare(cfg)
    if cfg.dist.nproc == 1 and cfg.fault.max_restarts == 0:
        run_gpt(cfg)
        return 0
    return _launch(cfg, argv)


def _launch(cfg: C.Config, argv: list[str]) -> int:
    """`--nproc` local ranks (restarted after a failure up to `fault.max_restarts` times; SIGTERM lets
    them save and stop within `dist.timeout_s`)."""
    from lshmoe.distributed.launch import launch

    return launch(
        ["train", *argv], cfg.dist.nproc, max_restarts=cfg.fault.max_restarts, stop_grace_s=cfg.dist.timeout_s
    )
