"""What every `lshmoe` verb parses with: the one-line-error parser and the config flags.

A verb is a module with `main(argv) -> int` (cli.py's `VERBS` names them). It builds a `Parser`, whose
mistakes raise `UserError` (the CLI prints one line and exits 2), and adds the flags of the config
sections it reads with `add_config_flags`. Every config field has a flag: `--section.key` always, and
the bare `--key` (hyphenated) when the name is unique across sections (`--top-k 2`), or the field's
own `flag=`, or `--<prefix><key>` in a section of `FLAG_PREFIX` (`--lsh-target`); a key that moved
(`ALIASES`) keeps its old flags. A field's flags are the same in every verb.

A verb with many sections (`train`) passes `common=`: those fields' flags come first, in one group,
and `--help` shows only them and a table of the sections; `--help SECTION` shows one section's flags and
`--help all` (or `--help-all`) every flag, sections in `SECTION_ORDER`.

This module sits just above the config (it imports nothing else of lshmoe), so a verb anywhere in the
package, `infer/run.py` say, parses its flags without importing the CLI.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
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
        if message.startswith("unrecognized arguments:"):  # e.g. `--expert-bias -x`: the value read as a flag
            message += " (a flag's value that starts with '-' is read as a flag: write --flag=VALUE)"
        raise UserError(f"{self.prog}: {message}")

    # ---------------------------------------------------------------- help in levels (add_config_flags)

    sections: dict[str, argparse._ArgumentGroup] | None = None  # set by add_config_flags(common=...)
    common: argparse._ArgumentGroup | None = None

    def format_help(self, level: str = "") -> str:
        """`level` "" = the common flags and the table of sections, "all" = every flag, or one section."""
        if self.sections is None:
            return super().format_help()
        groups = sorted(self._action_groups, key=lambda g: g is not self.common)  # the common flags first
        shown = [g for g in groups if g.title not in self.sections and g._group_actions]
        if level == "all":
            shown += list(self.sections.values())
        elif level:
            shown = [self.sections[level]]
        fmt = self._get_formatter()
        fmt.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
        fmt.add_text(self.description)
        for g in shown:
            fmt.start_section(g.title)
            fmt.add_text(g.description)
            fmt.add_arguments(g._group_actions)
            fmt.end_section()
        if level != "all":
            others = [(n, g) for n, g in self.sections.items() if n != level]
            fmt.start_section("more flags, by section (--help SECTION lists one, --help all every flag)")
            fmt.add_text("\n".join(f"{n:<8} {len(g._group_actions):>3}  {g.description}" for n, g in others))
            fmt.end_section()
        fmt.add_text(self.epilog)
        return fmt.format_help()


class LevelledHelp(argparse.Action):
    """`--help [SECTION|all]` and `--help-all` for a Parser with config sections."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        nargs = 0 if option_strings == ["--help-all"] else "?"
        super().__init__(option_strings, dest, nargs=nargs, default=default, help=help, metavar="SECTION|all")

    def __call__(self, parser, namespace, values, option_string=None):
        level = "all" if option_string == "--help-all" else (values or "")
        if level and level != "all" and level not in parser.sections:
            parser.error(f"--help {level}: no such section; choose all or one of: {', '.join(parser.sections)}")
        parser._print_message(parser.format_help(level), sys.stdout)
        parser.exit()


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


# The order of the sections in `--help all` and in the table of `--help`: the model, the run, then the
# compressors' options and the systems'.
SECTION_ORDER = ("model", "moe", "data", "train", "dist", "fault", "lsh", "quant", "auto", "upcycle", "scmoe",
                 "locmoe", "lina", "infer")  # fmt: skip
PATH_FIELDS = {"model.hf", "data.path", "data.cache_dir", "train.out_dir", "train.ckpt_dir", "train.resume",
               "upcycle.capture"}  # fmt: skip


def _metavar(dotted: str, f, tp) -> str:
    if dotted in PATH_FIELDS:
        return "PATH"
    base = next((a for a in getattr(tp, "__args__", ()) if a is not type(None)), tp)
    if f.metadata.get("choices"):
        return "NAME"
    return {bool: "BOOL", int: "N", float: "X"}.get(base, "TEXT")


def _add_flag(grp, flags: list[str], dotted: str, f, tp) -> None:
    help_text = f.metadata.get("help", "")
    if f.metadata.get("choices"):
        help_text += f" ({'|'.join(f.metadata['choices'])})"
    default = "none" if f.default is None else f.default
    help_text += f" [default: {default}]"
    is_bool = tp is bool
    grp.add_argument(
        *flags,
        dest=dotted,
        default=argparse.SUPPRESS,
        metavar=_metavar(dotted, f, tp),
        nargs="?" if is_bool else None,
        const="true" if is_bool else None,
        help=help_text.replace("%", "%%"),
    )


def add_config_flags(
    p: argparse.ArgumentParser, sections: Iterable[str] = C.SECTIONS, common: Iterable[str] = ()
) -> None:
    """A flag for every field of `sections`, one argument group per section; a flag not given is absent
    from the namespace (so `apply_flags` sets only what the user set). `common` (dotted fields) come
    first, in their own group and this order; with them, a `Parser`'s help comes in levels (module
    docstring) and the sections follow `SECTION_ORDER`."""
    flags, leaves = flag_names(), {d: (f, tp) for d, f, tp in C.leaf_fields()}
    common = list(common)
    if common:
        first = p.add_argument_group("common flags (what a fine-tune needs; every flag: --help all)")
        for dotted in common:
            _add_flag(first, flags[dotted], dotted, *leaves[dotted])
        sections = sorted(sections, key=lambda s: SECTION_ORDER.index(s) if s in SECTION_ORDER else len(SECTION_ORDER))
    groups = {}
    for section in sections:
        doc = (C.section_class(section).__doc__ or "").strip().splitlines()[0]
        grp = (
            p.add_argument_group(section, doc if common else None)
            if common
            else p.add_argument_group(f"{section} config")
        )
        groups[section] = grp
        for dotted, (f, tp) in leaves.items():
            if dotted.startswith(section + ".") and dotted not in common:
                _add_flag(grp, flags[dotted], dotted, f, tp)
    if common and isinstance(p, Parser):
        p.sections, p.common = groups, first
        p.add_argument("-h", "--help", action=LevelledHelp, help="this help; --help SECTION: that section's flags; "
                       "--help all: every flag")  # fmt: skip
        p.add_argument("--help-all", action=LevelledHelp, help="every flag, by section")


def apply_flags(cfg: C.Config, ns: argparse.Namespace) -> C.Config:
    """Set on `cfg` every config field given as a flag (coerced to its type; a bad value is one line)."""
    for dotted, _, _ in C.leaf_fields():
        if dotted in vars(ns):
            C.set_value(cfg, dotted, getattr(ns, dotted))
    return cfg
