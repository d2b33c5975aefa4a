"""Bytes per rank of one training setting: parameters, gradients, optimizer state and activations.

Pure functions of a `ModelShape` (plan/shape.py), a `Setting` and a `Workload`; nothing is built.
docs/memory.md derives every term; in short:

Notation. P_d dense, P_e routed-expert, P_f stored-not-trained parameters (plan/shape.py); W ranks,
EP the expert-parallel size, efsdp = W / EP. m master bytes (4; 2 in pure bf16), c compute bytes
(4 in float32, 2 in either bf16 mode), r gradient-reduction bytes (4; 2 in pure bf16). The local
parameters without FSDP are P_loc = P_d + P_e / EP. U = the largest decoder layer as FSDP holds it
unsharded (its dense parameters + its local expert bank, dense + experts / EP), R0 = the root unit
(embeddings, final norm, head).

Model state (AdamW: two states per trained parameter, in the master dtype):

    dtype            params                                   grads                  optimizer
    no FSDP          m (P_loc + P_f)  [+ 2 P_loc bf16-MP]     m P_loc  [+ bucket]    2m P_loc
    FSDP2            m (P_d + P_e)/W + m P_f                  m (P_d + P_e)/W        2m (P_d + P_e)/W
                     + c (R0 + 2U)                            + max(c R0 + g U,
                                                                    g R0 - c (R0 + 2U))
                                                              [+ r P_loc no-sync accumulation]

- float32: m = c = r = 4, so 16 bytes per local parameter without FSDP.
- bf16-mp (fp32 masters, bf16 compute, fp32 reduction): without FSDP the autocast bf16 copy of every
  weight lives from its forward use to its backward (2 P_loc); with FSDP the bf16 copies are only the
  unsharded units (FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)).
- bf16-pure (what `--dtype bfloat16` is today): parameters, gradients and both AdamW states in bf16,
  8 bytes per parameter, no fp32 master; named as such because small updates round away.
- FSDP's working set: the root stays unsharded from its forward to the end of backward (FSDP2 does not
  reshard the root after forward), the running layer and the prefetched next one (2U) are unsharded;
  in backward a reducing unit holds its unsharded gradients (c), their cast to the reduction dtype
  (r, bf16-mp only) and the reduce-scatter input (r): g = c + r (+ r when c != r) bytes per element.
  The peak is the larger of two moments: a layer reducing while the root is unsharded and its gradient
  (c R0) accumulates, or the root reducing at the end of backward after its parameters were resharded.
  (Checked once against FSDPMemTracker on a 2-rank gloo toy, torch 2.13: within 4% in bf16-mp,
  8% above in float32; docs/memory.md.)
- `bucket`: without FSDP, GradSync concatenates gradients into flat buckets of 25 MiB that grow to
  hold a whole tensor: r (25 MiB / 4 + the largest tensor) when W > 1.
- Gradient accumulation over N micro-batches: without FSDP gradients accumulate in place (no extra
  bytes). With FSDP the default reduce-scatters every micro-batch (sharded, N times the traffic);
  `fsdp_no_sync` instead skips it until the last micro-batch and holds unsharded gradients r P_loc.

Activations per rank, for T = (batch / N) * seq tokens of one micro-batch. N_r = T K routed rows,
M = rate N_r payload rows (rate 1 for the identity compressor, < 1 for LSH), R = skew N_r rows
received (the busiest rank; exactly N_r when EP = 1). Saved for backward, summed over the layers:

    norm (pre-norm input, output,      layernorm: 2c T D + 8 T; fused rmsnorm: 2c T D + 4 T;
      per-token statistics)            transformers' RMSNorm: (4 + 2c) T D + 4 T (an fp32 copy, the
                                       normalised value, the output)
    attention (flash/SDPA, no S^2)     c T (H dq + Hk dq + Hk dv) (q, k, v) + c T H dv (the output,
                                       which the o projection reads as a view) + 4 T H (log-sum-exp)
                                       + (4 + c) T (H + Hk) dq for Qwen3/OLMoE q/k norms;
                                       MLA: (4 + 2c) T (q_lora + kv_lora) latents + c T H (2 dq + nope
                                       + dv) (query, key, the key/value projection) + c T H dv + 4 T H
    dense FFN (width w)                gelu 2c T w, swiglu 4c T w
    MoE layer                          router 8 T E (fp32 logits and probabilities) + 4 T D when c < 4
                                       (the router's fp32 input); indices 12 T K + 28 N_r + 16 T;
                                       received c R D; expert hidden h c R F (h = 2 gelu, 4 swiglu:
                                       silu input, up, silu output, product); combine 2c N_r D (the
                                       restored rows and the weighted rows index_add keeps); shared
                                       experts 4c T F_s (+ c T D when gated)
    head                               norm + 4 T V (fp32 log-probs)

What each activation-checkpointing mode removes (the region's input stays saved; one region is
recomputed at a time in backward):

    none      nothing
    experts   the expert hidden h c R F of every MoE layer (the received rows are the region's input)
    blocks    also every attention sub-block's internals and every dense layer's FFN (the norms before
              them stay: a norm's output is the region's input); the router, permutation, compression, dispatch,
              combine and restore stay outside any region, as do the shared experts

Plus the largest transient, once (a layer's working set at its peak, or its gradients in backward):

    MoE working set   c (N_r D routed + M D payload + R D received + h R F hidden + R D expert out
                      + M D combined + N_r D restored) + 8 T E
    attention         one sub-block's internals (recomputed under `blocks`)
    head backward     4 T V + c T V (the gradients of the log-probs and the logits)

activations = sum of saved + max(transients).

Assumed: dropless routing (a capacity factor drops rows: fewer), the identity compressor's restore (LSH
keeps a little more for its residual), every activation in the compute dtype. Under autocast (bf16-mp
without FSDP) the residual stream stays float32 unless the model casts it, so the norms' inputs and the
combine can be up to twice their count there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lshmoe.errors import UserError
from lshmoe.plan.shape import AttnShape, LayerShape, ModelShape

DTYPES = ("float32", "bf16-mp", "bf16-pure")
AC_MODES = ("none", "experts", "blocks")
BUCKET_BYTES = 25 * 2**20  # train/grad_sync.py's flat all-reduce bucket
HIDDEN_FACTOR = {"gelu": 2, "swiglu": 4, "linear": 0, "identity": 0}  # tensors of width F autograd saves
MLP_FACTOR = {"gelu": 2, "swiglu": 4}

# (master, compute, reduce) bytes per element
_BYTES = {"float32": (4, 4, 4), "bf16-mp": (4, 2, 4), "bf16-pure": (2, 2, 2)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Setting:
    """How a model is laid out and run on W ranks."""

    world: int
    ep: int
    fsdp: bool = False
    dtype: str = "float32"  # float32 | bf16-mp (fp32 masters, bf16 compute) | bf16-pure (no fp32 masters)
    ac: str = "none"  # none | experts | blocks
    micro_batches: int = 1  # gradient accumulation: N micro-batches per optimizer step
    fsdp_no_sync: bool = False  # FSDP + N > 1: hold unsharded gradients instead of reduce-scattering each

    def __post_init__(self) -> None:
        if self.world < 1 or self.ep < 1 or self.world % self.ep:
            raise UserError(f"ep={self.ep} must divide the world size {self.world} (both >= 1)")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.ac not in AC_MODES:
            raise UserError(f"ac={self.ac!r}: choose one of {', '.join(AC_MODES)}")
        if self.micro_batches < 1:
            raise UserError(f"micro_batches={self.micro_batches}: must be >= 1")

    @property
    def master_bytes(self) -> int:
        return _BYTES[self.dtype][0]

    @property
    def compute_bytes(self) -> int:
        return _BYTES[self.dtype][1]

    @property
    def reduce_bytes(self) -> int:
        return _BYTES[self.dtype][2]


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    """What one rank processes per optimizer step."""

    seq_len: int
    batch_size: int  # sequences per rank per optimizer step (split into the setting's micro-batches)
    skew: float = 1.25  # rows received by the busiest rank / the mean (EP > 1 only)
    payload_rate: float = 1.0  # payload rows / routed rows (1 = identity; LSH-MoE sends fewer)

    def tokens(self, micro_batches: int) -> int:
        """T: tokens per rank in one micro-batch."""
        if self.batch_size % micro_batches:
            raise UserError(f"grad-accum={micro_batches} must divide batch-size={self.batch_size}")
        return self.batch_size // micro_batches * self.seq_len


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelState:
    """Bytes per rank of parameters, gradients and optimizer state, with the parts they are made of."""

    params: int
    grads: int
    optim: int
    terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optim


@dataclass(frozen=True, kw_only=True, slots=True)
class Activations:
    """Bytes per rank of activations: `saved` for backward (by term), the largest `transient`."""

    saved: dict[str, int]
    transient: dict[str, int]
    removed: dict[str, int]  # what the setting's AC mode removed from `saved`, by term

    @property
    def total(self) -> int:
        return sum(self.saved.values()) + max(self.transient.values(), default=0)


@dataclass(frozen=True, kw_only=True, slots=True)
class Breakdown:
    """One setting's bytes per rank."""

    setting: Setting
    state: ModelState
    activations: Activations

    @property
    def params(self) -> int:
        return self.state.params

    @property
    def grads(self) -> int:
        return self.state.grads

    @property
    def optim(self) -> int:
        return self.state.optim

    @property
    def activation_bytes(self) -> int:
        return self.activations.total

    @property
    def total(self) -> int:
        return self.state.total + self.activations.total


# ----------------------------------------------------------------------------------- model state


def unit_params(shape: ModelShape, ep: int) -> int:
    """U: the largest decoder layer as FSDP unshards it (dense + local experts)."""
    return max((layer.dense + layer.experts // ep for layer in shape.layers), default=0)


def largest_tensor(shape: ModelShape, ep: int) -> int:
    """Elements of the largest single parameter a rank holds without FSDP (the embedding or one expert
    matrix bank): GradSync's bucket grows to hold it."""
    mats = {"swiglu": 3, "gelu": 2}.get(shape.expert_activation, 1)
    bank = max((layer.experts // ep // mats for layer in shape.layers), default=0)
    return max(shape.vocab * shape.d_model, bank)


def model_state_bytes(shape: ModelShape, s: Setting) -> ModelState:
    """Parameters, gradients and AdamW state per rank (the table of the module docstring)."""
    m, c, r = s.master_bytes, s.compute_bytes, s.reduce_bytes
    local = shape.local_params(s.ep)
    frozen = shape.frozen_params
    if not s.fsdp:
        working = 2 * local if s.dtype == "bf16-mp" else 0
        bucket = r * (BUCKET_BYTES // 4 + largest_tensor(shape, s.ep)) if s.world > 1 else 0
        terms = {
            "params.master": m * (local + frozen),
            "params.working": working,
            "grads.local": m * local,
            "grads.bucket": bucket,
            "optim.adamw": 2 * m * local,
        }
    else:
        shard = (shape.dense_params + shape.expert_params) // s.world
        unit, root = unit_params(shape, s.ep), shape.root
        working = c * (root + 2 * unit)
        reducing = c + (r if r != c else 0) + r  # per element of a reducing unit: its grads, their cast, the input
        terms = {
            "params.master": m * (shard + frozen),
            "params.working": working,
            "grads.local": m * shard,
            # NOTE: the larger of two moments: a layer reducing while the root is unsharded and accumulating,
            # or the root itself reducing at the end of backward, after its parameters were resharded
            "grads.unsharded": max(c * root + reducing * unit, reducing * root - working),
            "grads.no_sync": r * local if s.fsdp_no_sync and s.micro_batches > 1 else 0,
            "optim.adamw": 2 * m * shard,
        }
    return ModelState(
        params=sum(v for k, v in terms.items() if k.startswith("params.")),
        grads=sum(v for k, v in terms.items() if k.startswith("grads.")),
        optim=terms["optim.adamw"],
        terms=terms,
    )


# ----------------------------------------------------------------------------------- activations


def norm_saved(shape: ModelShape, c: int, T: int, width: int) -> int:
    """A pre-norm's saved input and output and its per-token statistics (see the module docstring)."""
    if shape.norm == "hf_rmsnorm":
        return (4 + 2 * c) * T * width + 4 * T
    return 2 * c * T * width + (8 * T if shape.norm == "layernorm" else 4 * T)


def attention_internals(shape: ModelShape, c: int, T: int) -> int:
    """What one attention sub-block saves after its norm (flash/SDPA: no S x S scores)."""
    a: AttnShape = shape.attn
    H, Hk = a.n_heads, a.n_kv_heads
    out = c * T * H * a.v_head_dim + 4 * T * H  # the output (the o projection's input is a view of it)
    if a.kind == "mla":
        nope = a.head_dim - a.rope_dim
        latents = (4 + 2 * c) * T * (a.q_lora_rank + a.kv_lora_rank)
        return out + latents + c * T * H * (2 * a.head_dim + nope + a.v_head_dim)
    qkv = c * T * (H * a.head_dim + Hk * a.head_dim + Hk * a.v_head_dim)
    return out + qkv + (4 + c) * T * a.qk_norm


def routed_rows(shape: ModelShape, s: Setting, w: Workload, T: int) -> tuple[int, int, int]:
    """(N_r routed, M payload, R received by the busiest rank) rows of one MoE pass."""
    n = T * shape.top_k
    received = n if s.ep == 1 else int(round(n * w.skew))
    return n, int(round(n * w.payload_rate)), received


def _moe_saved(shape: ModelShape, layer: LayerShape, s: Setting, w: Workload, T: int) -> dict[str, int]:
    c, D, E, F, K = s.compute_bytes, shape.d_model, shape.num_experts, shape.d_expert, shape.top_k
    n, _, received = routed_rows(shape, s, w, T)
    p = layer.moe_passes
    out = {
        "moe.router": p * (8 * T * E + (4 * T * D if c < 4 else 0)),
        "moe.indices": p * (12 * T * K + 28 * n + 16 * T),
        "moe.received": p * c * received * D,
        "moe.expert_hidden": p * HIDDEN_FACTOR[shape.expert_activation] * c * received * F,
        "moe.combine": p * 2 * c * n * D,
    }
    if layer.shared_width:
        out["moe.shared"] = 4 * c * T * layer.shared_width + (c * T * D if layer.shared_gate else 0)
    return out


def layer_saved(shape: ModelShape, layer: LayerShape, s: Setting, w: Workload, T: int) -> dict[str, int]:
    """Bytes one decoder layer saves for backward with no activation checkpointing, by term."""
    c, D = s.compute_bytes, shape.d_model
    out = {
        "attn.norm": layer.attn_blocks * norm_saved(shape, c, T, D),
        "attn.internals": layer.attn_blocks * attention_internals(shape, c, T),
        "ffn.norm": (len(layer.mlp_widths) + (1 if layer.moe_passes else 0)) * norm_saved(shape, c, T, D),
        "ffn.mlp": sum(MLP_FACTOR[shape.mlp_activation] * c * T * width for width in layer.mlp_widths),
    }
    if layer.moe_passes:
        out.update(_moe_saved(shape, layer, s, w, T))
    return out


def checkpointed(shape: ModelShape, layer: LayerShape, saved: dict[str, int], s: Setting, T: int) -> dict[str, int]:
    """`saved` with what the setting's AC mode recomputes taken out (the module docstring's table)."""
    out = dict(saved)
    if s.ac in ("experts", "blocks") and "moe.expert_hidden" in out:
        out["moe.expert_hidden"] = 0
    if s.ac == "blocks":  # train/recompute.py: the attention modules and the dense *MLP modules
        out["attn.internals"] = 0
        out["ffn.mlp"] = 0
    return out


def activation_bytes(shape: ModelShape, s: Setting, w: Workload) -> Activations:
    """Activation bytes per rank for one micro-batch (the module docstring's formulas)."""
    T = w.tokens(s.micro_batches)
    c, D, V = s.compute_bytes, shape.d_model, shape.vocab
    saved: dict[str, int] = {}
    removed: dict[str, int] = {}
    for layer in shape.layers:
        full = layer_saved(shape, layer, s, w, T)
        kept = checkpointed(shape, layer, full, s, T)
        for k, v in full.items():
            saved[k] = saved.get(k, 0) + kept[k]
            if v != kept[k]:
                removed[k] = removed.get(k, 0) + v - kept[k]
    saved["head.norm"] = norm_saved(shape, c, T, D)
    saved["head.logprobs"] = 4 * T * V  # (the logits themselves are dropped once the loss is computed)
    transient = {"head.backward": 4 * T * V + c * T * V, "attn.block": attention_internals(shape, c, T)}
    if shape.moe_layers:
        n, m, received = routed_rows(shape, s, w, T)
        h = HIDDEN_FACTOR[shape.expert_activation]
        rows = n * D + m * D + received * D + received * D + m * D + n * D
        transient["moe.working_set"] = c * (rows + h * received * shape.d_expert) + 8 * T * shape.num_experts
    return Activations(saved=saved, transient=transient, removed=removed)


def memory_per_rank(shape: ModelShape, s: Setting, w: Workload) -> Breakdown:
    """Everything one rank holds at its peak for this setting."""
    return Breakdown(setting=s, state=model_state_bytes(shape, s), activations=activation_bytes(shape, s, w))


__all__ = [
    "AC_MODES",
    "DTYPES",
    "Activations",
    "Breakdown",
    "ModelState",
    "Setting",
    "Workload",
    "activation_bytes",
    "attention_internals",
    "layer_saved",
    "memory_per_rank",
    "model_state_bytes",
    "unit_params",
]
