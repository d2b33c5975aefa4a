"""What the memory model needs to know about a model: its parameters split the way they are placed
(dense, routed experts, not trained), per decoder layer, and the widths its activations are made of.

Counted from a config alone (plan/hf_count.py for a transformers config.json, plan/gpt_count.py for
lshmoe's GPT-MoE `Config`), never from a built model: a 671 B-parameter model is planned on a laptop.

    P_d  dense parameters: embeddings, head, norms, attention, routers, shared experts, dense FFNs;
         replicated on every rank without FSDP, sharded over the world with it
    P_e  routed-expert parameters (all E experts of all MoE layers); a rank holds P_e / EP of them
    P_f  parameters that are stored but not trained (DeepSeek-V3's selection-only correction bias):
         no gradient, no optimizer state
"""

from __future__ import annotations

from dataclasses import dataclass, field

NORMS = ("layernorm", "rmsnorm", "hf_rmsnorm")  # lshmoe's nn.LayerNorm / nn.RMSNorm, transformers' RMSNorm
ACTIVATIONS = ("gelu", "swiglu", "linear", "identity")


@dataclass(frozen=True, kw_only=True, slots=True)
class AttnShape:
    """One attention sub-block's widths. kind "mha" covers multi-head and grouped-query attention
    (n_kv_heads <= n_heads); "mla" is DeepSeek's multi-head latent attention."""

    kind: str = "mha"  # mha | mla
    n_heads: int
    n_kv_heads: int
    head_dim: int  # query/key width per head (MLA: nope + rope)
    v_head_dim: int
    qk_norm: int = 0  # elements normalised per token by q/k norms (Qwen3: (H + Hk) d; OLMoE: the same, whole)
    fused_qkv: bool = False  # one q|k|v projection output (lshmoe's GPT attention)
    q_lora_rank: int = 0  # MLA: query latent width (0 = a direct q projection)
    kv_lora_rank: int = 0  # MLA: key/value latent width
    rope_dim: int = 0  # MLA: the rotary part of head_dim, shared by all heads


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerShape:
    """One decoder layer (one FSDP unit of dense parameters plus, for an MoE layer, one of experts)."""

    dense: int  # parameters of the layer other than the routed experts (attention, norms, router, shared, FFN)
    experts: int = 0  # routed-expert parameters of all E experts (0: a dense layer)
    frozen: int = 0  # stored, not trained (the correction bias)
    attn_blocks: int = 1  # attention sub-blocks (a ScMoE pair holds two)
    mlp_widths: tuple[int, ...] = ()  # hidden widths of the dense FFNs the layer runs (dense layer, GPT shared MLP)
    moe_passes: int = 0  # routed passes per token set (1 for an MoE layer; DGMoE: 2)
    shared_width: int = 0  # hidden width of the SwiGLU shared experts inside the MoE layer (all of them)
    shared_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelShape:
    """A model as the memory model sees it (see the module docstring)."""

    name: str  # e.g. "qwen3_moe" or "gpt-moe"
    d_model: int
    vocab: int
    tied: bool  # the head reuses the token embedding
    root: int  # parameters outside every decoder layer: embeddings, the final norm, the head unless tied
    layers: tuple[LayerShape, ...]
    attn: AttnShape
    num_experts: int
    top_k: int
    d_expert: int
    expert_activation: str = "swiglu"
    mlp_activation: str = "swiglu"  # the dense FFNs' (gelu: lshmoe's MLP with biases)
    norm: str = "hf_rmsnorm"
    notes: tuple[str, ...] = field(default=())  # what the count leaves out (e.g. DeepSeek-V3's MTP module)

    @property
    def dense_params(self) -> int:
        """P_d: every trained parameter that is not a routed expert."""
        return self.root + sum(layer.dense for layer in self.layers)

    @property
    def expert_params(self) -> int:
        """P_e: all routed experts of all MoE layers."""
        return sum(layer.experts for layer in self.layers)

    @property
    def frozen_params(self) -> int:
        """P_f: stored, not trained."""
        return sum(layer.frozen for layer in self.layers)

    @property
    def total_params(self) -> int:
        return self.dense_params + self.expert_params + self.frozen_params

    @property
    def moe_layers(self) -> int:
        return sum(1 for layer in self.layers if layer.experts)

    @property
    def active_params(self) -> int:
        """Parameters one token uses: dense + K of the E experts of each MoE layer."""
        if not self.num_experts:
            return self.dense_params
        return self.dense_params + self.expert_params * self.top_k // self.num_experts

    def local_params(self, ep: int) -> int:
        """Trained parameters a rank holds without FSDP: P_d + P_e / EP."""
        return self.dense_params + self.expert_params // ep


__all__ = ["ACTIVATIONS", "NORMS", "AttnShape", "LayerShape", "ModelShape"]
