"""The verb table: every verb a module with `main(argv)`, its `--help`, its one-line errors; `infer`'s
flags generated from `InferConfig` as `train`'s are from the whole config."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from lshmoe import cli, cliutil
from lshmoe import config as C
from lshmoe.errors import EXIT_USER


def test_top_level_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for verb, (_, help_line) in cli.VERBS.items():
        assert f"  {verb} " in out and help_line in out, verb


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_every_verb_is_a_module_with_main_and_help(verb, capsys):
    assert callable(importlib.import_module(cli.VERBS[verb][0]).main)
    with pytest.raises(SystemExit) as e:
        cli.main([verb, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lshmoe {verb}")


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "lshmoe: the following arguments are required: verb"),
        (["tain"], "argument verb: invalid choice: 'tain'"),
        (["export", "--checkpoint", "x"], "lshmoe export: the following arguments are required: --hf-out"),
        (["bench", "nope"], "lshmoe bench: argument name: invalid choice: 'nope'"),
        (["infer", "--checkpoint", ".", "--match-k", "0"], "infer.match_k=0 is out of range; must be >= 1"),
        (["infer", "--checkpoint", ".", "--profile-routes", "some"], "infer.profile_routes='some' is not valid"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(argv, needle, capsys):
    assert cli.main(argv) == EXIT_USER
    err = capsys.readouterr().err.strip()
    assert err.startswith("lshmoe: error: ") and needle in err and len(err.splitlines()) == 1, err


def test_every_infer_field_is_a_flag_of_lshmoe_infer():
    from lshmoe.infer.run import build_parser, parse

    flags = cliutil.flag_names()
    values = {"path_len": 5, "placement": "uniform", "estimate_top_k": 3, "match_k": 4, "ordered_match": True,
              "profile_routes": "all", "dtype": "float64"}  # fmt: skip
    assert set(values) == {f.name for f in dataclasses.fields(C.InferConfig)}
    argv = ["--checkpoint", "ckpt"]
    for name, value in values.items():
        argv += [flags[f"infer.{name}"][-1], str(value)]  # the short flag (--path-len, --infer-dtype, ...)
    _, icfg = parse(argv)
    assert dataclasses.asdict(icfg) == values
    # the same flags as `lshmoe train` has for these fields
    infer_opts = {o for a in build_parser()._actions for o in a.option_strings}
    assert {f for name in values for f in flags[f"infer.{name}"]} <= infer_opts
    _, default = parse(["--checkpoint", "ckpt"])
    assert default == C.InferConfig()


def test_exit_statuses_are_defined_once():
    from lshmoe import errors
    from lshmoe.distributed import launch

    codes = (errors.EXIT_USER, errors.EXIT_DIST, errors.EXIT_NUMERIC, errors.EXIT_INTERRUPTED, errors.EXIT_STOPPED)
    assert codes == (2, 3, 4, 130, 143) and errors.Stopped.exit_status == errors.EXIT_STOPPED
    final = (0, errors.EXIT_USER, errors.EXIT_NUMERIC, errors.EXIT_INTERRUPTED, errors.EXIT_STOPPED)
    assert launch.FINAL_STATUSES == final


def test_lshmoe_help_says_it_fine_tunes_hf_moe_models(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "fine-tune Hugging Face MoE models" in out and "lshmoe export" in out


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *argv])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_train_help_leads_with_what_a_fine_tuner_needs(capsys):
    """`train --help` is the common flags (the --hf run first) and a table of the sections; every flag is
    one `--help all` (or `--help SECTION`) away."""
    short = _help(capsys, "--help")
    assert len(short.splitlines()) < 130, len(short.splitlines())
    assert "Hugging Face MoE" in short.split("common flags")[0]  # the description says what it is for
    common = short[short.index("common flags") :]
    first = ("--hf PATH", "--data PATH", "--steps N", "--lr X", "--dtype NAME", "--compute-dtype", "--save-every",
             "--out-dir", "more flags, by section")  # fmt: skip
    order = [common.index(f) for f in first]
    assert order == sorted(order), order
    assert "--lsh-target" not in short and "--placement" not in short  # strategy flags: by section
    everything = _help(capsys, "--help", "all")
    assert _help(capsys, "--help-all") == everything
    flags = cliutil.flag_names()
    assert all(flags[d][-1] in everything for d, _, _ in C.leaf_fields()), "every field's flag in --help all"
    sections = [everything.index(f"\n{s}:\n") for s in ("model", "moe", "data", "train", "dist", "lsh", "infer")]
    assert sections == sorted(sections) and everything.index("common flags") < sections[0]
    moe = _help(capsys, "--help", "moe")
    assert "--top-k N" in moe and "--lsh-target" not in moe
    assert cli.main(["train", "--help", "nosuch"]) == EXIT_USER
    assert "no such section" in capsys.readouterr().err
