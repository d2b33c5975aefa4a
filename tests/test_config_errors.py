"""Bad configuration fails fast with one line naming the field and the valid range; no traceback, no hang."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from lshmoe import config as C
from lshmoe.cli import main


def _run(capsys, *argv: str) -> str:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lshmoe: error:"), err
    return err


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--num-experts", "4", "--top-k", "5"], ["moe.top_k=5", "[1, moe.num_experts=4]"]),
        (["--num-experts", "6", "--nproc", "4"], ["moe.num_experts=6", "expert-parallel size 4"]),
        (["--num-experts", "8", "--nproc", "3", "--ep-size", "2"], ["moe.ep_size=2", "world size 3"]),
        (["--d-model", "0"], ["model.d_model=0", ">= 1"]),
        (["--n-layers", "-2"], ["model.n_layers=-2", ">= 1"]),
        (["--steps", "0"], ["train.steps=0", ">= 1"]),
        (["--nproc", "0"], ["dist.nproc=0", ">= 1"]),
        (["--capacity-factor", "-1"], ["moe.capacity_factor=-1", "> 0"]),
        (["--lr", "abc"], ["train.lr", "expected float", "'abc'"]),
        (["--steps", "1.5"], ["train.steps", "expected int"]),
        (["--activation", "relu"], ["moe.activation='relu'", "gelu, swiglu"]),
        (["--d-model", "30", "--n-heads", "4"], ["model.n_heads=4", "model.d_model=30"]),
        (["--data", "/nonexistent/corpus.txt"], ["--data /nonexistent/corpus.txt", "no such file"]),
        (["--set", "moe.bogus=1"], ["moe.bogus", "unknown key"]),
        (["--set", "nosection.x=1"], ["unknown section 'nosection'"]),
        (["--compress", "fp9"], ["moe.compress='fp9'", "fp8, int8, lsh+fp8"]),
        (["--quant-directions", "some"], ["quant.directions='some'", "deepseek, all"]),
        (["--a2a", "dedup", "--a2a-chunks", "2"], ["lina.a2a_chunks=2", "moe.a2a=dedup"]),
    ],
)
def test_cli_rejects_bad_values(capsys, argv, needles):
    err = _run(capsys, "train", *argv, "--steps" if "--steps" not in argv else "--log-every", "1")
    for n in needles:
        assert n in err, (n, err)


def test_unknown_flag(capsys):
    err = _run(capsys, "train", "--no-such-flag", "3")
    assert "--no-such-flag" in err


@pytest.mark.parametrize(
    "text, needles",
    [
        ("moe:\n  top_k: 2\n  expertz: 4\n", ["unknown key moe.expertz", "num_experts"]),
        ("modle:\n  d_model: 64\n", ["unknown section 'modle'"]),
        ("train:\n  steps: many\n", ["train.steps", "expected int", "'many'"]),
        ("train: [1, 2\n", ["malformed YAML", "line"]),
        ("- just\n- a list\n", ["expected a mapping"]),
        ("model:\n  d_model: true\n", ["model.d_model", "expected int", "True"]),
    ],
)
def test_yaml_errors(tmp_path, capsys, text, needles):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    err = _run(capsys, "train", "--config", str(f))
    for n in needles:
        assert n in err, (n, err)


def test_missing_config_file(capsys):
    err = _run(capsys, "train", "--config", "/nonexistent.yaml")
    assert "file not found" in err


def test_yaml_and_flag_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("moe:\n  top_k: 1\n  num_experts: 4\ntrain:\n  steps: 7\n")
    from lshmoe.commands.train import config_from_args, parser

    ns = parser().parse_args(["--config", str(f), "--set", "train.steps=9", "--top-k", "2"])
    cfg = config_from_args(ns)
    assert (cfg.moe.top_k, cfg.moe.num_experts, cfg.train.steps) == (2, 4, 9)
    assert cfg.moe.capacity_factor is None
    C.validate(cfg, world_size=4)


def test_none_and_bool_coercion():
    cfg = C.Config()
    C.set_value(cfg, "moe.capacity_factor", "1.25")
    assert cfg.moe.capacity_factor == 1.25
    C.set_value(cfg, "moe.capacity_factor", "none")
    assert cfg.moe.capacity_factor is None
    C.set_value(cfg, "train.progress", "off")
    assert cfg.train.progress is False


def test_console_shows_one_line_not_a_traceback(tmp_path):
    """The real console: a spawned `lshmoe train` with a bad value prints one line and exits 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "lshmoe", "train", "--nproc", "2", "--num-experts", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "moe.num_experts=3" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_heap_trim_is_validated_and_runs():
    from lshmoe.train.allocator import HeapTrimmer

    cfg = C.Config()
    cfg.dist.malloc_trim_every = -1
    with pytest.raises(C.ConfigError, match="dist.malloc_trim_every"):
        C.validate(cfg, 1)
    assert not HeapTrimmer(0).active  # 0 = never
    t = HeapTrimmer(2)
    if platform.libc_ver()[0] == "glibc":
        assert t.active
    for _ in range(4):
        t.step()
    assert t.count == (4 if t.active else 0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: C.MoEConfig(top_k=9, num_experts=8), "moe.top_k=9 is out of range; must be in [1, moe.num_experts=8]"),
        (lambda: C.MoEConfig(num_experts=0), "moe.num_experts=0 is out of range; must be >= 1"),
        (lambda: C.MoEConfig(compress="fp9"), "moe.compress='fp9' is not valid; choose one of:"),
        (lambda: C.MoEConfig(top_k="2"), "moe.top_k: expected int, got '2'"),
        (lambda: C.MoEConfig(jitter=float("nan")), "moe.jitter: must be a finite number, got nan"),
        (lambda: C.ModelConfig(d_model=30), "model.n_heads=4 must divide model.d_model=30"),
        (lambda: C.TrainConfig(batch_size=6, grad_accum=4), "train.grad_accum=4 must divide train.batch_size=6"),
        (lambda: C.LSHConfig(buckets_per_hash=3), "lsh.buckets_per_hash=3 must be even"),
        (lambda: C.FaultConfig(inject="kill:1"), "fault.inject='kill:1': item 'kill:1' must be kind:rank:step"),
        (lambda: C.DataConfig(field=" "), "data.field='' is not valid"),
    ],
)
def test_config_classes_check_themselves_on_construction(make, message):
    """A Python user's config fails where it is written, with the message the CLI gives for the same value."""
    with pytest.raises(C.ConfigError) as e:
        make()
    assert str(e.value).startswith(message), str(e.value)


def test_construction_checks_leave_the_building_paths_alone(tmp_path):
    """Configs built field by field (YAML, --set, flags, code that mutates) pass through invalid states; only
    validate() judges the result, and a base config overlaid by YAML is copied, not rebuilt."""
    cfg = C.Config(moe=C.MoEConfig(num_experts=4, top_k=4))
    cfg.moe.top_k = 9  # mutated: not checked until validate()
    with pytest.raises(C.ConfigError, match=r"moe.top_k=9 is out of range; must be in \[1, moe.num_experts=4\]"):
        C.validate(cfg)
    f = tmp_path / "c.yaml"
    f.write_text("moe: {top_k: 6, num_experts: 8}\n")  # top_k=6 before num_experts=8 is set
    assert C.validate(C.load_yaml(f, base=cfg)).moe.top_k == 6
    assert C.MoEConfig(top_k=8, num_experts=8).top_k == 8
