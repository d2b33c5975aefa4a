"""`lshmoe train`: fine-tune / upcycle a Hugging Face checkpoint (`--hf`), or train a GPT-MoE.

    lshmoe train [--hf DIR] [--data PATH] [--config FILE.yaml] [--set section.key=value ...] [--<field> value ...]

Every config field has a flag (lshmoe/cliutil.py), e.g. `--steps 100 --top-k 1 --nproc 2 --data
corpus.txt`; `--help` shows the common ones, `--help all` every one. Precedence: defaults < YAML < --set
< flags. Under torchrun the process is one rank; otherwise `--nproc N` (N > 1) spawns N local ranks.
Mistakes in the input print one line and exit with 2, before any rank starts.

A run without `--out-dir` writes to a new directory, named here once (train/run_dir.py) and handed to
every rank and restart of the job. Both kinds of run go through the one training loop (train/loop.py),
from `run_gpt` and `run_hf`.
"""

from __future__ import annotations

import argparse
import sys

from lshmoe import config as C
from lshmoe.cliutil import Parser, add_config_flags, apply_flags, flag_names, under_launcher

# What a fine-tuner sets first: `--help` shows these (in this order) and the table of sections.
COMMON = (
    "model.hf",
    "data.path",
    "data.format",
    "train.steps",
    "train.lr",
    "train.batch_size",
    "model.seq_len",
    "train.dtype",
    "train.compute_dtype",
    "train.save_every",
    "train.out_dir",
    "train.resume",
    "dist.nproc",
    "moe.ep_size",
    "moe.compress",
    "train.progress",
)

DESCRIPTION = """\
Fine-tune a Hugging Face MoE checkpoint (--hf DIR: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3;
a dense BERT is upcycled into an MoE) on your text, or train lshmoe's GPT-MoE from scratch: expert-
parallel over --nproc local ranks or torchrun, with a compressed all-to-all (--compress fp8|lsh|auto)."""

EPILOG = """\
examples:
  lshmoe train --hf ./Qwen3-30B-A3B --data corpus.txt --nproc 4 --steps 2000 --seq-len 1024 \\
      --compute-dtype bfloat16 --compress fp8          # fine-tune; lr 1e-5, saved at the end
  lshmoe export --checkpoint runs/Qwen3-30B-A3B-<date>-<time>/checkpoints --hf-out ./finetuned
  lshmoe train --nproc 2 --compress lsh                # the GPT-MoE on the embedded corpus"""


def parser() -> Parser:
    p = Parser(
        prog="lshmoe train",
        usage="lshmoe train [--hf DIR] [--data PATH] [--steps N] [--lr X] [--nproc N] [--config FILE] "
        "[--set SECTION.KEY=VALUE] [--FLAG VALUE ...]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    p.add_argument("--config", metavar="FILE", help="YAML config file (sections: " + ", ".join(C.SECTIONS) + ")")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config field (repeatable)"
    )
    add_config_flags(p, common=COMMON)
    return p


def config_from_args(ns: argparse.Namespace) -> C.Config:
    """defaults < YAML < --set < flags."""
    cfg = C.load_yaml(ns.config) if ns.config else C.Config()
    C.apply_sets(cfg, ns.set)
    return apply_flags(cfg, ns)


def origin(ns: argparse.Namespace, dotted: str) -> str:
    """Where a field's value came from (flags win over --set, --set over the YAML file)."""
    if dotted in vars(ns):
        return flag_names()[dotted][-1]
    for item in reversed(ns.set):
        key = item.split("=", 1)[0].strip()
        if "." in key and ".".join(C.resolve(*key.split(".", 1))) == dotted:
            return f"--set {item}"
    return f"--config {ns.config}" if ns.config else "the default"


def run_gpt(cfg: C.Config) -> None:
    """Train the GPT-MoE in this process (one rank)."""
    from lshmoe.train.gpt_task import train

    train(cfg)


def run_hf(cfg: C.Config) -> None:
    """Fine-tune or upcycle `cfg.model.hf` in this process (one rank)."""
    from lshmoe.hf.train import train_hf

    train_hf(cfg)


def _check_device(cfg: C.Config) -> None:
    if "cuda" in (cfg.dist.device, "nccl" if cfg.dist.backend == "nccl" else ""):
        import torch

        if not torch.cuda.is_available():
            what = "dist.device=cuda" if cfg.dist.device == "cuda" else "dist.backend=nccl"
            raise C.ConfigError(f"{what} but no CUDA device is visible; use --device cpu / --backend gloo")
    if cfg.dist.backend == "nccl" and cfg.dist.device == "cpu":
        raise C.ConfigError("dist.backend=nccl needs dist.device=cuda (or auto); use --backend gloo on the CPU")


def name_out_dir(cfg: C.Config) -> bool:
    """A job without `--out-dir` gets a new directory, named once here (True when named)."""
    if cfg.train.out_dir is not None:
        return False
    from lshmoe.train.run_dir import new_run_dir

    cfg.train.out_dir = new_run_dir(cfg)
    print(
        f"[lshmoe] writing to {cfg.train.out_dir} (a new directory for this job; --out-dir names one)", file=sys.stderr
    )
    return True


def prepare(cfg: C.Config) -> None:
    """Everything that can be checked before a rank starts: the config for the world size, the device,
    `--resume` (verified; of this model and, found by auto, this data; steps left), the token data (built
    once, here) against the sequence length. Raises a one-line UserError."""
    C.validate(cfg, world_size=cfg.dist.nproc)
    _check_device(cfg)
    from lshmoe.data import load_data
    from lshmoe.train.checkpoint import preflight

    log = lambda m: print(f"[lshmoe] {m}", file=sys.stderr, flush=True)  # noqa: E731
    name_out_dir(cfg)
    preflight(cfg, data=lambda: load_data(cfg.data, log))
    data = load_data(cfg.data, log)
    data.check_seq_len(cfg.model.seq_len)


def prepare_hf(cfg: C.Config, ns: argparse.Namespace | None = None) -> None:
    """What can be checked before a `--hf` rank starts: the config for the world size, the checkpoint's
    config.json and weight files (a bad directory is one line that names the field and where it was
    set), and `--resume` as for the GPT-MoE."""
    from lshmoe.hf.family import HFError
    from lshmoe.hf.task import task_for

    C.validate(cfg)
    _check_device(cfg)
    where = f" (from {origin(ns, 'model.hf')})" if ns is not None else ""
    try:
        task = task_for(cfg.model.hf)
        task.hf_config = task.check(cfg, cfg.dist.nproc)
    except HFError as e:
        raise HFError(f"model.hf={cfg.model.hf}{where}: {e}") from None
    from lshmoe.train.checkpoint import preflight

    name_out_dir(cfg)

    def data():
        from lshmoe.data import hf_token_data

        return task.batches(hf_token_data(task.src, cfg, task.hf_config.vocab_size))

    task.cfg = cfg
    # NOTE: the model type only: the config digest is of the config as the built model holds it (a rank
    # compares it before loading)
    preflight(cfg, {"hf.model_type": task.hf_config.model_type}, data=data)


def main(argv: list[str]) -> int:
    ns = parser().parse_args(argv)
    cfg = config_from_args(ns)
    if cfg.model.hf:
        if under_launcher():
            run_hf(cfg)
            return 0
        prepare_hf(cfg, ns)
        run = run_hf
    else:
        if under_launcher():
            run_gpt(cfg)
            return 0
        prepare(cfg)
        run = run_gpt
    if cfg.dist.nproc == 1 and cfg.fault.max_restarts == 0:
        run(cfg)
        return 0
    return _launch(cfg, [*argv, "--out-dir", cfg.train.out_dir])


def _launch(cfg: C.Config, argv: list[str]) -> int:
    """`--nproc` local ranks (restarted after a failure up to `fault.max_restarts` times; SIGTERM lets
    them save and stop within `dist.timeout_s`). `argv` names the output directory, so every rank of
    every attempt writes to (and a restart resumes from) the same one."""
    from lshmoe.distributed.launch import launch

    return launch(
        ["train", *argv], cfg.dist.nproc, max_restarts=cfg.fault.max_restarts, stop_grace_s=cfg.dist.timeout_s
    )
