"""Typed configuration, YAML loading, CLI overrides, and every validation rule in one place.

A config is a tree of dataclasses (`Config` holds `model`, `moe`, `data`, `train`, `dist`). Each leaf
field declares its help text and valid range through `_f(...)`; `validate()` checks ranges, choices
and the few cross-field rules, and raises `ConfigError` with one line that names the field, the bad
value and what is allowed. YAML files and `--flag value` overrides are coerced to the declared types,
so a wrong type or an unknown key fails the same way, before any process is started.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lshmoe.errors import ConfigError


def _f(
    default: Any,
    help: str,
    *,
    choices: tuple = (),
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    flag: str | None = None,
) -> Any:
    """A config field with its help text and valid range (checked by `validate`)."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "flag": flag}
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class ModelConfig:
    """The GPT-MoE decoder."""

    arch: str = _f(
        "gpt",
        "gpt: top-k MoE blocks; shared: + a shared dense expert; scmoe: shortcut-connected "
        "MoE (ScMoE); dgmoe: two top-1 passes on the current and preceding representations",
        choices=("gpt", "shared", "scmoe", "dgmoe"),
    )
    shortcut: str = _f(
        "pos2",
        "ScMoE: the routed experts read the preceding block's output (pos1), its "
        "post-attention representation (pos2) or its input (pos3); none = shared-expert MoE",
        choices=("pos1", "pos2", "pos3", "none"),
    )
    combine: str = _f(
        "cg1",
        "shared/ScMoE: add SE and MoE outputs, or gate the SE by sigmoid(w.z) (cg1) or mix both by softmax(W z) (cg2)",
        choices=("add", "cg1", "cg2"),
    )
    overlap: bool = _f(True, "ScMoE/DGMoE: overlap the all-to-alls with the dense work of the window")
    expert_slot: int = _f(
        -1,
        "ScMoE: position of the expert computation in the window; -1 = chosen by the "
        "paper's Eq. 11 from times measured in warm-up steps",
        ge=-1,
    )
    slot_warmup: int = _f(5, "ScMoE: synchronous steps that measure op and all-to-all times before overlapping", ge=0)
    d_model: int = _f(128, "model (residual stream) width D", ge=1)
    n_layers: int = _f(4, "number of transformer blocks", ge=1)
    n_heads: int = _f(4, "attention heads; must divide d_model", ge=1)
    seq_len: int = _f(128, "tokens per training sequence", ge=2)
    moe_every: int = _f(2, "an MoE block replaces the MLP in every n-th block (1 = all blocks)", ge=1)
    mlp_ratio: float = _f(4.0, "dense MLP hidden width as a multiple of d_model", gt=0)
    norm: str = _f("layernorm", "normalisation layer", choices=("layernorm", "rmsnorm"))
    dropout: float = _f(0.0, "dropout probability", ge=0, lt=1)


@dataclass(kw_only=True)
class MoEConfig:
    """The expert-parallel MoE layer (DESIGN.md §1)."""

    num_experts: int = _f(8, "experts per MoE layer E", ge=1)
    top_k: int = _f(2, "experts per token K; 1 <= K <= num_experts", ge=1)
    d_expert: int = _f(256, "hidden width of each expert FFN", ge=1)
    activation: str = _f(
        "gelu",
        "expert FFN kind (identity/linear are analysis experts)",
        choices=("gelu", "swiglu", "linear", "identity"),
    )
    capacity_factor: float | None = _f(None, "tokens per expert = ceil(cf*T*K/E); none = dropless", gt=0)
    jitter: float = _f(0.0, "multiplicative router-input noise U(1-j, 1+j) in training", ge=0, lt=1)
    normalize_weights: bool = _f(True, "renormalise the top-k router probabilities to sum to 1")
    aux_loss_weight: float = _f(0.01, "weight of the Switch/GShard load-balance loss", ge=0)
    z_loss_weight: float = _f(0.001, "weight of the router z-loss", ge=0)
    compress: str = _f(
        "identity", "all-to-all payload compressor (lsh = LSH-MoE centroids)", choices=("identity", "lsh")
    )
    ep_size: int = _f(0, "expert-parallel group size; 0 = world size", ge=0)
    router: str = _f(
        "topk",
        "gate: topk = learnable linear softmax top-k; locmoe = LocMoE's GrAP gate (fixed "
        "orthogonal slice means + learnable bias)",
        choices=("topk", "locmoe"),
    )
    locality_weight: float = _f(
        0.0, "weight mu of the locality loss -log(router mass on node-local experts)", ge=0, flag="locality-weight"
    )
    node_bias: bool = _f(
        False,
        "learnable per-node router bias whose gradient is reduced within the node only, so "
        "each node's routing can lean towards its own experts (LocMoE's epsilon_i)",
        flag="node-bias",
    )
    node_limit: int = _f(
        0,
        "each token may use experts on at most g nodes (group-limited routing); 0 = no limit",
        ge=0,
        flag="node-limit",
    )
    a2a_chunks: int = _f(
        1,
        "cut each all-to-all into n micro-ops along the tokens so the experts compute one "
        "while the next travels (Lina); 1 = off",
        ge=1,
    )
    a2a: str = _f(
        "flat",
        "all-to-all: flat, or hierarchical (within the node, then between nodes; needs EP = world)",
        choices=("flat", "hierarchical"),
        flag="a2a",
    )


@dataclass(kw_only=True)
class LSHConfig:
    """LSH-MoE compression (used when moe.compress=lsh); see docs/lsh.md for how defaults were chosen."""

    family: str = _f(
        "cross_polytope",
        "hash family: cross-polytope (argmax of [xR; -xR]) or hyperplane (signs)",
        choices=("cross_polytope", "hyperplane"),
        flag="hash-family",
    )
    num_hashes: int = _f(
        6,
        "hash functions L, AND-combined into one bucket id (the maximum in target modes)",
        ge=1,
        le=62,
        flag="num-hashes",
    )
    buckets_per_hash: int = _f(
        4, "buckets b of each hash (cross-polytope: even; hyperplane: power of two)", ge=2, flag="buckets-per-hash"
    )
    center: bool = _f(False, "hash x - mean(group) instead of x (activations share a large mean component)")
    compensation: str = _f(
        "none",
        "restore y = E(c) + a (x - c): identity a=1 (the paper), none a=0, "
        "calibrated a = <E(x)-E(c), x-c> / |x-c|^2 fitted by the probe",
        choices=("identity", "none", "calibrated"),
    )
    redraw_every: int = _f(1, "draw new random projections every n steps; 0 = once per run", ge=0)
    target: str = _f(
        "none",
        "choose L per layer to hold a target: rate = rows sent / rows routed, error = relative restore error",
        choices=("none", "rate", "error"),
        flag="lsh-target",
    )
    target_value: float = _f(0.2, "the target compression rate or restore-error budget", gt=0, le=1)
    probe_every: int = _f(0, "measure the restore error every n training steps (0 = only when target=error)", ge=0)
    probe_rows: int = _f(128, "rows sampled per layer and rank by the restore-error probe", ge=1)
    ema: float = _f(0.9, "smoothing of the running statistics the target modes choose L from", ge=0, lt=1)
    layers: str = _f("all", "MoE blocks that compress: all, or comma-separated block indices")
    eval_compress: bool = _f(True, "compress in evaluation too (false: exact experts at eval)")

    def layer_ids(self) -> set[int] | None:
        """None = every MoE layer."""
        if self.layers.strip() == "all":
            return None
        return {int(t) for t in self.layers.split(",") if t.strip()}


@dataclass(kw_only=True)
class DataConfig:
    """Training text and tokenizer."""

    path: str | None = _f(None, "text file or directory of text files; none = embedded docstring corpus", flag="data")
    corpus: str = _f(
        "stdlib",
        "embedded corpus: docstrings of the stdlib, or of stdlib + site-packages",
        choices=("stdlib", "installed"),
    )
    vocab_size: int = _f(4096, "BPE vocabulary size (byte-level, trained offline)", ge=260, le=65535)
    val_fraction: float = _f(0.05, "fraction of documents held out for validation", gt=0, lt=1)
    cache_dir: str | None = _f(None, "corpus/tokenizer cache; none = $XDG_CACHE_HOME/lshmoe")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation, evaluation and logging."""

    steps: int = _f(200, "optimizer steps", ge=1)
    batch_size: int = _f(8, "sequences per rank per step", ge=1)
    lr: float = _f(3e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of lr (cosine floor)", ge=0, le=1)
    warmup_steps: int = _f(20, "linear warmup steps", ge=0)
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only)", ge=0)
    beta1: float = _f(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = _f(0.95, "AdamW beta2", ge=0, lt=1)
    grad_clip: float = _f(1.0, "global gradient-norm clip; 0 = off", ge=0)
    seed: int = _f(0, "seed for weights, data order and router noise", ge=0)
    eval_every: int = _f(50, "validate every n steps (and at the end); 0 = only at the end", ge=0)
    eval_batches: int = _f(8, "validation batches per rank", ge=1)
    log_every: int = _f(10, "write a metrics line every n steps", ge=1)
    out_dir: str = _f("runs/latest", "metrics.jsonl and the run summary go here")
    dtype: str = _f("float32", "parameter and activation dtype", choices=("float32", "bfloat16", "float64"))
    progress: bool = _f(True, "progress bar on rank 0")
    save_every: int = _f(0, "save a checkpoint every n steps (and at the end); 0 = no checkpoints", ge=0)
    keep_last: int = _f(3, "checkpoints to keep (older ones are deleted); 0 = keep all", ge=0)
    ckpt_dir: str | None = _f(None, "checkpoint directory; none = <out_dir>/checkpoints")
    # fault tolerance (with dist.fault and dist.max_restarts)
    resume: str = _f(
        "auto",
        "auto = continue from the latest intact checkpoint in ckpt_dir when there is one (falling back to "
        "the previous one if it is corrupted), else start afresh; none = start afresh; or a checkpoint directory",
    )
    grad_sync: str = _f(
        "sync",
        "dense gradients: sync = all-reduced after backward; fair = chunks issued as soon as "
        "ready (DDP-like, competing with all-to-alls); priority = Lina: chunks yield to all-to-alls",
        choices=("sync", "fair", "priority"),
    )
    chunk_mb: float = _f(30.0, "size of a gradient all-reduce micro-op (fair/priority), MB", gt=0)
    nan_policy: str = _f(
        "skip", "on a non-finite loss or gradient: skip the step, or stop (save and exit)", choices=("skip", "stop")
    )


@dataclass(kw_only=True)
class DistConfig:
    """Processes and communication."""

    nproc: int = _f(1, "ranks to spawn locally (ignored under torchrun)", ge=1)
    backend: str = _f(
        "auto", "process-group backend; auto = nccl on CUDA, gloo on CPU", choices=("auto", "gloo", "nccl")
    )
    device: str = _f(
        "auto", "compute device; auto = cuda when every rank can have a GPU", choices=("auto", "cpu", "cuda")
    )
    timeout_s: float = _f(300.0, "seconds a collective may wait for a peer before failing", gt=0)
    ranks_per_node: int = _f(0, "ranks per node for the topology map; 0 = LOCAL_WORLD_SIZE or all", ge=0)
    threads: int = _f(0, "torch threads per rank; 0 = cores / local ranks", ge=0)
    heartbeat_s: float = _f(
        1.0, "peer heartbeat interval; a peer silent for timeout_s is declared failed; 0 = off", ge=0
    )
    malloc_trim_every: int = _f(
        10,
        "return the C heap's free pages to the system every N steps, so resident memory stays flat (glibc); 0 = never",
        ge=0,
    )
    # fault tolerance (with train.resume)
    fault: str = _f(
        "",
        "fault injection for testing: kind:rank:step[,kind:rank:step...], kind in kill|stall|nan|killsave; "
        "each fires once per out_dir (recorded in <out_dir>/faults.fired)",
    )
    max_restarts: int = _f(
        0,
        "--nproc launcher: restart the job up to N times after a rank fails; it resumes from the latest "
        "checkpoint (under torchrun use its --max-restarts)",
        ge=0,
    )


@dataclass(kw_only=True)
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    lsh: LSHConfig = field(default_factory=LSHConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
# Sections whose fields get `--<prefix><key>` as their short flag (their names are too generic alone).
FLAG_PREFIX = {"lsh": "lsh-"}


# --------------------------------------------------------------------------------------------- types


def _leaf_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    name = getattr(base, "__name__", str(base))
    return f"{name} or none" if _is_optional(tp) else name


def _is_optional(tp: Any) -> bool:
    return (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in typing.get_args(tp)


def coerce(path: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the declared type, or raise a one-line ConfigError."""
    if _is_optional(tp):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    bad = ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int | float):
            value = float(value)
        elif isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - programming error


# ---------------------------------------------------------------------------------------- building


def from_dict(raw: dict[str, Any], base: Config | None = None, source: str = "config") -> Config:
    """Overlay a nested dict (e.g. parsed YAML) on `base`; unknown keys and wrong types are errors."""
    cfg = _deepcopy(base) if base is not None else Config()
    if raw is None:
        return cfg
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
        sub = getattr(cfg, section)
        hints = _leaf_types(type(sub))
        for key, value in values.items():
            if key not in hints:
                near = ", ".join(sorted(hints))
                raise ConfigError(f"{source}: unknown key {section}.{key}; valid keys: {near}")
            setattr(sub, key, coerce(f"{section}.{key}", value, hints[key]))
    return cfg


def _deepcopy(cfg: Config) -> Config:
    return Config(**{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS})


def load_yaml(path: str | Path, base: Config | None = None) -> Config:
    """Read a YAML config file; a missing or malformed file is a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--config {p}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {p}: not a UTF-8 text file") from None
    return from_dict(raw or {}, base, source=str(p))


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Apply one `section.key=value` override (strings coerced to the field's type)."""
    if "." not in dotted:
        raise ConfigError(f"override {dotted!r}: expected section.key (sections: {', '.join(SECTIONS)})")
    section, key = dotted.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override {dotted!r}: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
    sub = getattr(cfg, section)
    hints = _leaf_types(type(sub))
    if key not in hints:
        raise ConfigError(f"override {dotted!r}: unknown key; valid keys: {', '.join(sorted(hints))}")
    setattr(sub, key, coerce(dotted, value, hints[key]))


def apply_sets(cfg: Config, items: list[str]) -> Config:
    """Apply `--set SECTION.KEY=VALUE` items in order; return `cfg`."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value)
    return cfg


def leaf_fields() -> list[tuple[str, dataclasses.Field, Any]]:
    """Every (dotted name, field, type) of the config tree, in declaration order."""
    out = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        hints = _leaf_types(cls)
        for f in dataclasses.fields(cls):
            out.append((f"{section.name}.{f.name}", f, hints[f.name]))
    return out


# ---------------------------------------------------------------------------------------- validation


def _range_text(meta: dict[str, Any], tp: Any) -> str:
    parts = []
    for op, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(op) is not None:
            bound = meta[op]
            parts.append(f"{sym} {int(bound) if float(bound).is_integer() else bound}")
    return " and ".join(parts)


def _check_leaf(path: str, value: Any, meta: dict[str, Any], tp: Any) -> None:
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{path}={value!r} is not valid; choose one of: {', '.join(meta['choices'])}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    ok = all(
        bound is None or cmp(value, bound)
        for bound, cmp in (
            (meta.get("ge"), lambda v, b: v >= b),
            (meta.get("gt"), lambda v, b: v > b),
            (meta.get("le"), lambda v, b: v <= b),
            (meta.get("lt"), lambda v, b: v < b),
        )
    )
    if not ok:
        raise ConfigError(f"{path}={value} is out of range; must be {_range_text(meta, tp)}")


def _validate_lsh(cfg: Config) -> None:
    h = cfg.lsh
    b = h.buckets_per_hash
    if h.family == "cross_polytope" and b % 2:
        raise ConfigError(f"lsh.buckets_per_hash={b} must be even for the cross-polytope family (2, 4, 6, ...)")
    if h.family == "cross_polytope" and b // 2 > cfg.model.d_model:
        raise ConfigError(f"lsh.buckets_per_hash={b} is out of range; must be <= 2 * model.d_model")
    if h.family == "hyperplane" and b & (b - 1):
        raise ConfigError(f"lsh.buckets_per_hash={b} must be a power of two for the hyperplane family")
    bits = h.num_hashes * math.log2(b) + math.log2(max(2, cfg.moe.num_experts))
    if bits > 62:
        raise ConfigError(
            f"lsh.num_hashes={h.num_hashes} is out of range for buckets_per_hash={b} and "
            f"{cfg.moe.num_experts} experts; bucket ids need L*log2(b)+log2(E) <= 62 bits"
        )
    try:
        h.layer_ids()
    except ValueError:
        raise ConfigError(f"lsh.layers={h.layers!r} must be 'all' or comma-separated block indices") from None


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Check every field and cross-field rule; raise a one-line ConfigError on the first violation.

    `world_size` (when known) enables the checks that depend on it: the expert-parallel size must
    divide the world size and the number of experts.
    """
    for dotted, f, tp in leaf_fields():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        _check_leaf(dotted, value, dict(f.metadata), tp)
    m, e = cfg.model, cfg.moe
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model}")
    if m.arch in ("scmoe", "dgmoe"):
        if m.moe_every not in (1, 2) or m.n_layers % m.moe_every:
            raise ConfigError(
                f"model.moe_every={m.moe_every} with model.arch={m.arch}: must be 1 (every block) or 2 "
                f"(Block-MLP + Block-MoE pairs) and divide model.n_layers={m.n_layers}"
            )
        if m.moe_every == 1 and m.shortcut != "pos1" and m.arch == "scmoe":
            raise ConfigError(
                f"model.shortcut={m.shortcut} with model.moe_every=1: MoE in every block takes the shortcut at pos1"
            )
        if m.arch == "dgmoe" and (e.top_k != 1 or m.moe_every != 2):
            raise ConfigError(
                f"model.arch=dgmoe needs moe.top_k=1 and model.moe_every=2 (got top_k={e.top_k}, "
                f"moe_every={m.moe_every})"
            )
    if e.router == "locmoe" and m.d_model % e.num_experts:
        raise ConfigError(
            f"moe.router=locmoe needs model.d_model={m.d_model} divisible by moe.num_experts="
            f"{e.num_experts} (each expert's gate is the mean of one slice of the width)"
        )
    if e.top_k > e.num_experts:
        raise ConfigError(f"moe.top_k={e.top_k} is out of range; must be in [1, moe.num_experts={e.num_experts}]")
    if m.moe_every > m.n_layers:
        raise ConfigError(
            f"model.moe_every={m.moe_every} is out of range; must be in [1, model.n_layers={m.n_layers}] "
            "so that the model has at least one MoE block"
        )
    _validate_lsh(cfg)
    if cfg.dist.fault:
        from lshmoe.train.faults import parse_faults

        parse_faults(cfg.dist.fault)
    if cfg.data.path is not None and not Path(cfg.data.path).expanduser().exists():
        raise ConfigError(f"--data {cfg.data.path}: no such file or directory")
    if world_size is not None:
        ep = e.ep_size or world_size
        if world_size % ep:
            raise ConfigError(f"moe.ep_size={ep} must divide the world size {world_size}")
        if e.a2a == "hierarchical" and ep != world_size:
            raise ConfigError(
                f"moe.a2a=hierarchical needs the expert-parallel group to be the world "
                f"(moe.ep_size={e.ep_size}, world size {world_size})"
            )
        if e.num_experts % ep:
            raise ConfigError(
                f"moe.num_experts={e.num_experts} is not divisible by the expert-parallel size {ep}; "
                f"use a multiple of {ep} experts or a different ep_size/--nproc"
            )
    return cfg
