"""Command line: `lshmoe VERB [ARGS]`, every verb one module with `main(argv) -> int`.

`VERBS` is the one table of them. `lshmoe VERB ARGS` imports the verb's module and calls
`main(ARGS)`; the verb parses its own flags (lshmoe/cliutil.py: `Parser`, `add_config_flags`) and
returns its exit status. Errors become one line and a status here, for every verb alike (the
statuses are defined in lshmoe/errors.py): a mistake in the input exits 2, a failed peer 3, a
numerical stop 4, Ctrl-C 130.

Adding a verb (e.g. `data`, `plan`) is one module with `main(argv) -> int` (a `Parser` with
`prog="lshmoe <verb>"` gives it `--help` and one-line errors) and one line in `VERBS`.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import os
import sys
from typing import NoReturn

from lshmoe.cliutil import Parser, under_launcher
from lshmoe.errors import (
    EXIT_DIST,
    EXIT_INTERRUPTED,
    EXIT_NUMERIC,
    EXIT_STOPPED,
    EXIT_USER,
    DistError,
    NumericalError,
    Stopped,
    UserError,
)

# verb -> (module with main(argv) -> int, one line for `lshmoe --help`)
VERBS = {
    "train": ("lshmoe.commands.train", "fine-tune a Hugging Face MoE (--hf DIR), or train a GPT-MoE from scratch"),
    "export": ("lshmoe.commands.export", "write a train --hf checkpoint as a Hugging Face checkpoint"),
    "infer": ("lshmoe.infer.run", "score a trained checkpoint with Lina's expert placement"),
    "bench": ("lshmoe.commands.bench", "run a benchmark (results in runs/bench/; --out docs/bench to commit)"),
    "simulate": ("lshmoe.bench.simulate", "project LSH-MoE speedups on real clusters (analytic model)"),
    "demo": ("lshmoe.bench.demo", "side-by-side baseline vs LSH-MoE on an emulated 2-node cluster"),
    "plan": ("lshmoe.plan.command", "per-rank memory of a model for each parallel setting, and which fit"),
    "data": ("lshmoe.commands.data", "prepare token shards once (prepare), check them (verify)"),
}


def build_parser() -> Parser:
    """The top level: which verb (its own arguments are the verb's to parse)."""
    width = max(map(len, VERBS))
    verbs = "\n".join(f"  {name:<{width}}  {help}" for name, (_, help) in VERBS.items())
    p = Parser(
        prog="lshmoe",
        description="Communication-efficient distributed MoE training: fine-tune Hugging Face MoE models\n"
        "(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) expert-parallel on your data and export them\n"
        "back (lshmoe train --hf DIR --data PATH; lshmoe export), or train lshmoe's GPT-MoE from scratch.",
        epilog=f"verbs:\n{verbs}\n\n`lshmoe VERB --help` lists a verb's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("verb", choices=list(VERBS), help="what to do (see below)")
    p.add_argument("args", nargs="*", default=[], metavar="ARGS", help="the verb's arguments (lshmoe VERB --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The `lshmoe` command. Run as a program (argv None) inside a launched rank, the process ends
    through `_end_rank` once the verb returns."""
    as_program = argv is None
    if as_program and under_launcher():
        faulthandler.enable(all_threads=True)  # a rank that dies on a signal prints every thread's stack
    try:
        rc = _main(list(sys.argv[1:] if argv is None else argv))
    except BaseException as e:  # a traceback follows; the launcher learns which rank failed first
        _note(e)
        raise
    if as_program and under_launcher():
        _end_rank(rc)
    return rc


def _note(e: BaseException) -> None:
    """Inside a rank of lshmoe's launcher: when and how this rank failed (distributed/launch.py)."""
    if under_launcher():
        from lshmoe.distributed.launch import note_failure

        note_failure(e)


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
        # NOTE: only the verb is parsed here: the rest may hold anything (`--help`, `--`), all the verb's.
        verb = build_parser().parse_args(argv[:1]).verb
        return importlib.import_module(VERBS[verb][0]).main(argv[1:])
    except UserError as e:
        _note(e)
        if rank == 0:
            print(f"lshmoe: error: {e}", file=sys.stderr)
        return EXIT_USER
    except DistError as e:
        _note(e)
        print(f"lshmoe: {e}", file=sys.stderr, flush=True)
        if under_launcher():
            # NOTE: a rank whose peers are gone exits at once: a thread still blocked on the dead peer or
            # store (gloo's, the watchdog's) would be unwound at interpreter exit and abort the process.
            sys.stdout.flush()
            os._exit(EXIT_DIST)
        return EXIT_DIST
    except NumericalError as e:
        _note(e)
        if rank == 0:
            print(f"lshmoe: error: {e}", file=sys.stderr)
        return EXIT_NUMERIC
    except Stopped as e:
        if rank == 0:
            print(f"lshmoe: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("lshmoe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
