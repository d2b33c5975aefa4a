"""Property-based fuzz of the configuration surface (YAML files, --set overrides, flag values): every
generated input either runs, or fails before any rank starts with one line that names a field (or
the file or override it came from): exit status 2, no traceback.

In CI the search is deterministic (derandomized: the same 150 inputs on every run) and the inputs a
wider search once found are kept as explicit examples. The wide random search is a separate, longer run:

    LSHMOE_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_config_fuzz.py

(new random inputs each time; a failure it finds becomes an `@example` here).
"""

from __future__ import annotations

import importlib
import os
import string

import pytest
import yaml
from cli_util import TINY, corpus
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lshmoe import cli, cliutil
from lshmoe import config as C

LEAVES = {dotted: (f, tp) for dotted, f, tp in C.leaf_fields()}
FLAGS = cliutil.flag_names()
# Paths the fuzz must not scatter over the disk, and the corpus choice (the `installed` corpus is ~30 MB):
# these are fixed by the base arguments instead.
FIXED = {"data.cache_dir", "train.out_dir", "train.ckpt_dir", "data.corpus", "data.path", "fault.max_restarts"}
FUZZED = sorted(set(LEAVES) - FIXED)
# Deterministic in CI; LSHMOE_FUZZ_EXAMPLES=N: a wide random search of N inputs (module docstring).
WIDE = int(os.environ.get("LSHMOE_FUZZ_EXAMPLES", "0") or 0)
SEARCH = (
    settings(max_examples=WIDE, derandomize=False, deadline=None)
    if WIDE
    else settings(max_examples=150, derandomize=True, database=None, deadline=None)
)


def _value(dotted: str) -> st.SearchStrategy:
    """Values for one field: in and around its range, its choices, other types, junk."""
    f, tp = LEAVES[dotted]
    m = f.metadata
    edges = [b for b in (m.get("ge"), m.get("gt"), m.get("le"), m.get("lt")) if b is not None]
    near = [e + d for e in edges for d in (-1, -0.5, 0, 0.5, 1)]
    return st.one_of(
        st.sampled_from(list(m.get("choices") or ()) or [f.default]),
        st.sampled_from(near or [0]),
        st.integers(-3, 64),
        st.floats(allow_nan=True, allow_infinity=True, width=32),
        st.booleans(),
        st.none(),
        st.text(string.printable, max_size=6),
    )


@st.composite
def inputs(draw) -> tuple[list[str], str | None]:
    """(extra argv, YAML text or None): some fields through YAML, some through --set, some through flags."""
    argv: list[str] = []
    text = None
    fields = draw(st.lists(st.sampled_from(FUZZED), min_size=1, max_size=4, unique=True))
    doc: dict = {}
    for dotted in fields:
        value = draw(_value(dotted))
        how = draw(st.sampled_from(["yaml", "set", "flag"]))
        section, key = dotted.split(".")
        if how == "yaml":
            doc.setdefault(section, {})[key] = value
        elif how == "set":
            argv += ["--set", f"{dotted}={'' if value is None else value}"]
        else:
            argv += [draw(st.sampled_from(FLAGS[dotted])), "none" if value is None else str(value)]
    junk = draw(st.sampled_from(["", "", "", "key", "section", "set", "yaml"]))
    if junk == "key":
        doc.setdefault("moe", {})[draw(st.text("abcxyz_", min_size=1, max_size=5))] = 1
    elif junk == "section":
        doc[draw(st.text("abcxyz", min_size=1, max_size=5))] = {"a": 1}
    elif junk == "set":
        argv += ["--set", draw(st.text(string.ascii_lowercase + ".=", max_size=10))]
    if doc:
        text = yaml.safe_dump(doc)
    if junk == "yaml":
        text = draw(st.sampled_from(["train: [1, 2\n", "- a\n- b\n", "model: 3\n", ":\n", "\t\n"]))
    return argv, text


def _names_a_field(line: str, files: tuple[str, ...] = ()) -> bool:
    """The line names a config field, a section, the override or flag, or the file it came from."""
    return (
        any(f in line for f in files)
        or any(d in line for d in LEAVES)
        or any(f"{s}." in line for s in C.SECTIONS)
        or any(tok in line for tok in ("--config", "--set", "override", "unknown section", "--resume"))
        or "unrecognized arguments" in line  # the line quotes the argument itself
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    return tmp, [
        *TINY,
        "--data",
        str(corpus(tmp)),
        "--cache-dir",
        str(tmp / "cache"),
        "--out-dir",
        str(tmp / "out"),
        "--num-experts",
        "4",
        "--steps",
        "1",
    ]


@settings(SEARCH, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=inputs())
# found by the search: a YAML value of another type for model.hf named neither the field nor the file
@example(case=([], "model:\n  hf: 0\n"))
@example(case=(["--set", "model.hf=0"], None))
@example(case=(["--hf", "nothere"], "train:\n  steps: 2\n"))
@example(case=(["--moe.expert_bias", "-:"], None))  # a bool flag's value that starts with "-"
def test_every_input_starts_or_fails_first_with_one_line(base, case, monkeypatch, capsys):
    tmp, base_argv = base
    extra, text = case
    argv = ["train", *base_argv]
    if text is not None:
        path = tmp / "fuzz.yaml"
        path.write_text(text)
        argv += ["--config", str(path)]
    started = []
    # the modules themselves: `lshmoe.train` is also the name of the public train() function
    monkeypatch.setattr(importlib.import_module("lshmoe.train.gpt_task"), "train", lambda cfg: started.append(cfg))
    monkeypatch.setattr(
        importlib.import_module("lshmoe.distributed.launch"), "launch", lambda *a, **k: started.append(a) or 0
    )
    rc = cli.main(argv + extra)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("lshmoe: error:")]
    if rc == 0:
        assert len(started) == 1 and not errors, err
        return
    assert rc == 2, err
    assert not started, "it failed after a rank was started"
    assert len(errors) == 1 and "Traceback" not in err, err
    assert _names_a_field(errors[0], (str(tmp / "fuzz.yaml"),)), errors[0]


def test_the_search_is_deterministic_unless_a_wide_one_is_asked_for():
    """CI draws the same inputs every run (and keeps the found cases), so it passes or fails on the code."""
    fuzz = test_every_input_starts_or_fails_first_with_one_line
    used = fuzz._hypothesis_internal_use_settings
    assert used.derandomize == (not WIDE) and (used.database is None or WIDE)
    found = [ex.kwargs["case"] for ex in fuzz.hypothesis_explicit_examples]
    assert ([], "model:\n  hf: 0\n") in found


@st.composite
def valid_small(draw) -> list[str]:
    """Flags that each pass validation on their own, with small values (so that a run is quick)."""
    argv = []
    for dotted in draw(
        st.lists(
            st.sampled_from(
                [
                    "model.norm",
                    "moe.activation",
                    "moe.top_k",
                    "moe.capacity_factor",
                    "moe.compress",
                    "moe.router",
                    "model.arch",
                    "lsh.num_hashes",
                    "lsh.family",
                    "train.grad_sync",
                    "moe.a2a_chunks",
                    "moe.jitter",
                    "model.moe_every",
                    "lsh.compensation",
                    "train.dtype",
                ]
            ),
            max_size=3,
            unique=True,
        )
    ):
        f, _ = LEAVES[C.ALIASES.get(dotted, dotted)]  # an old key still works as a flag
        choices = f.metadata.get("choices")
        small = {
            "moe.top_k": [1, 2],
            "moe.capacity_factor": ["none", 0.5, 1.25],
            "lsh.num_hashes": [1, 3],
            "moe.a2a_chunks": [1, 2],
            "moe.jitter": [0.0, 0.1],
            "model.moe_every": [1, 2],
        }
        value = draw(st.sampled_from(list(choices) if choices else small[dotted]))
        argv += [f"--{dotted}", str(value)]
    return argv


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=valid_small())
def test_accepted_configs_really_run(base, extra, capsys):
    """An input that is accepted trains: one step on one rank, in this process."""
    _, base_argv = base
    rc = cli.main(["train", *base_argv, "--resume", "none", "--save-every", "0", *extra])
    err = capsys.readouterr().err
    if rc == 2:  # a cross-field rule rejected the combination: one line, as above
        lines = [ln for ln in err.splitlines() if ln.startswith("lshmoe: error:")]
        assert len(lines) == 1 and _names_a_field(lines[0]), err
        return
    assert rc == 0, err
    assert "done: val loss" in err, err
