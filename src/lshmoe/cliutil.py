"""What every `lshmoe` verb parses with: the one-line-error parser and the config flags.

A verb is a module with `main(argv) -> int` (cli.py's `VERBS` names them). It builds a `Parser`, whose
mistakes raise `UserError` (the CLI prints one line and exits 2), and adds the flags of the config
sections it reads with `add_config_flags`. Every config field has a flag: `--section.key` always, and
the bare `--key` (hyphenated) when the name is unique across sections (`--top-k 2`), or the field's
own `flag=`, or `--<prefix><key>` in a section of `FLAG_PREFIX` (`--lsh-target`); a key that moved
(`ALIASES`) keeps its old flags. A field's flags are the same in every verb.

This module sits just above the config (it imports nothing else of lshmoe), so a verb anywhere in the
package, `infer/run.py` say, parses its flags without importing the CLI.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterable
from typing import NoReturn

from lshmoe import config as C
from lshmoe.errors import UserError

# A flag's value that starts with "-" yet is a number: argparse alone knows only -3 and -0.5
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: `UserError("<prog>: <message>")`, exit status 2 in the CLI.
    A negative number in any notation (-1e-3, -inf) is a flag's value, never taken for a flag, so that a
    bad one is reported by the field it was given to (`--progress -1e9`: `train.progress: expected bool`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


def under_launcher() -> bool:
    """True inside a rank started by torchrun or by `lshmoe.distributed.launch`."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def flag_names() -> dict[str, list[str]]:
    """dotted field -> its flags (see the module docstring)."""
    leaves = C.leaf_fields()
    counts: dict[str, int] = {}
    for dotted, _, _ in leaves:
        key = dotted.split(".")[1]
        counts[key] = counts.get(key, 0) + 1
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
    for old, new in C.ALIASES.items():  # a moved key keeps its old dotted flag, and its old prefixed one
        section, key = old.split(".")
        out[new].append(f"--{old}")
        if section in C.FLAG_PREFIX:
            out[new].append(f"--{C.FLAG_PREFIX[section]}{key.replace('_', '-')}")
    return out


def add_config_flags(p: argparse.ArgumentParser, sections: Iterable[str] = C.SECTIONS) -> None:
    """A flag for every field of `sections`, one argument group per section; a flag not given is absent
    from the namespace (so `apply_flags` sets only what the user set)."""
    flags, leaves = flag_names(), C.leaf_fields()
    for section in sections:
        grp = p.add_argument_group(f"{section} config")
        for dotted, f, tp in leaves:
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
                help=help_text.replace("%", "%%"),
            )


def apply_flags(cfg: C.Config, ns: argparse.Namespace) -> C.Config:
    """Set on `cfg` every config field given as a flag (coerced to its type; a bad value is one line)."""
    for dotted, _, _ in C.leaf_fields():
        if dotted in vars(ns):
            C.set_value(cfg, dotted, getattr(ns, dotted))
    return cfg
