"""The package's floors (docs/design.md): every import runs downward, the config sits at the bottom,
and the registries are data, complete at import."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lshmoe"

# Lowest first. A unit is a top-level package or module of lshmoe; it may import its own floor and
# those below, never one above.
FLOORS = [
    {"errors", "seeding", "integrity", "indexing"},
    {"config"},
    {"cliutil", "plan", "data"},
    {"distributed"},
    {"compress"},
    {"moe"},
    {"models", "sched", "testing"},
    {"train"},
    {"hf"},
    {"infer", "bench"},
    {"commands", "cli", "__main__", "__init__"},
]
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}
# Arrows known to run up, each with the change that removes it; one that is gone must leave this list.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def _unit(path: Path) -> str:
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _imported_units(path: Path) -> set[str]:
    """lshmoe units `path` imports, at its top or inside a function (both are arrows)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lshmoe":
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "lshmoe" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "lshmoe"]
        out |= {n.split(".")[1] for n in names if n.count(".") >= 1}
    return out


def test_every_import_runs_down_a_floor():
    units = {_unit(p) for p in SRC.rglob("*.py")}
    assert units <= set(FLOOR), f"place {sorted(units - set(FLOOR))} on a floor"
    upward = {}
    for path in sorted(SRC.rglob("*.py")):
        me = _unit(path)
        for other in _imported_units(path) - {me}:
            if FLOOR[other] > FLOOR[me]:
                upward.setdefault((me, other), []).append(str(path.relative_to(SRC)))
    new = {k: v for k, v in upward.items() if k not in KNOWN_UPWARD}
    assert not new, f"imports that run up a floor: {new}"
    stale = set(KNOWN_UPWARD) - set(upward)
    assert not stale, f"{sorted(stale)} no longer run up: remove them from KNOWN_UPWARD"


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _imported_modules(path: Path, modules: set[str]) -> set[str]:
    """lshmoe modules (files) `path` imports anywhere in it; `from pkg import name` counts as pkg.name
    when that is a module, else as pkg. Package faces (__init__.py) hand names on and are not followed."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lshmoe":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "lshmoe"}
    return out


def test_no_module_imports_itself_through_others():
    files = {_module_of(p): p for p in SRC.rglob("*.py")}
    faces = {m for m, p in files.items() if p.name == "__init__.py"}
    graph = {
        m: _imported_modules(p, set(files)) & (set(files) - faces) - {m} for m, p in files.items() if m not in faces
    }
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def cycle_from(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := cycle_from(n, stack)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = cycle_from(m, [])
            assert found is None, "an import circle: " + " -> ".join(found)


def _fresh(code: str) -> str:
    """Run `code` in a fresh interpreter (nothing of lshmoe imported yet); its stdout."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout


def test_importing_the_config_imports_nothing_above_it():
    loaded = json.loads(
        _fresh("import json, sys, lshmoe.config; print(json.dumps(sorted(m for m in sys.modules if 'lshmoe' in m)))")
    )
    above = ("lshmoe.moe", "lshmoe.compress", "lshmoe.distributed", "lshmoe.train", "lshmoe.kernels")
    assert loaded and not [m for m in loaded if m.startswith(above)], loaded
    assert set(loaded) <= {"lshmoe", "lshmoe.errors"} | {m for m in loaded if m.startswith("lshmoe.config")}, loaded


def test_the_config_lists_what_the_registries_hold():
    from lshmoe.compress.registry import NAMES, REGISTRY
    from lshmoe.config import AUTO_CHOICES, MoEConfig, Registered
    from lshmoe.moe.dispatch.build import KINDS

    fields = MoEConfig.__dataclass_fields__
    for field, names in (("compress", NAMES), ("a2a", KINDS)):
        choices = fields[field].metadata["choices"]
        assert isinstance(choices, Registered) and tuple(choices) == names and names[0] in choices
    assert set(AUTO_CHOICES) < set(REGISTRY) and "auto" not in AUTO_CHOICES  # auto picks among registered ones


def test_hf_families_are_complete_at_import():
    out = _fresh("import lshmoe.hf as h; print(' '.join(sorted(h.FAMILIES)))")
    assert out.split() == ["deepseek_v3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]
    from lshmoe.hf.family import FAMILIES

    assert all(name == f.model_type for name, f in FAMILIES.items())


@pytest.mark.parametrize("place", ["moe", "models", "infer", "hf/model.py"])
def test_settings_are_typed_not_fetched_by_name(place):
    """A section is read as `settings.<section>`: a misspelt one fails, it never falls back to defaults."""
    files = [SRC / place] if place.endswith(".py") else sorted((SRC / place).rglob("*.py"))
    offenders = [str(p.relative_to(SRC)) for p in files if "getattr(settings" in p.read_text()]
    assert not offenders, offenders


def test_the_layer_reads_no_compressor_section():
    """`moe/` names no compressor's section (`split` is the layer's own option, `moe.split`)."""
    for path in sorted((SRC / "moe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.Attribute) and node.attr == "lsh"), path
            assert not (isinstance(node, ast.Constant) and node.value == "lsh"), path
