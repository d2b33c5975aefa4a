"""Parameter counts of lshmoe's own GPT-MoE (models/gpt.py) from its `Config`, without building it.

D model width, H heads, F_d = round(mlp_ratio * D) the dense MLP width, E experts of width F, V the
vocabulary, n(D) a norm (LayerNorm 2D, RMSNorm D):

    root           token embedding V*D + learned positions seq_len*D + final norm n(D); the head is tied
    attention      qkv D*3D + 3D, proj D*D + D
    MLP            D*F_d + F_d + F_d*D + D
    MoE layer      router E*D (LocMoE's GrAP gate: a learnable bias E, its weight is a buffer);
                   experts E*2*D*F (gelu), E*3*D*F (swiglu), E*(D*D + D) (linear), 0 (identity),
                   + E*(F + D) biases (gelu) or E*(2F + D) (swiglu) with expert_bias;
                   shared experts 3*D*(n*d_shared) (+ D gated); a per-node bias E (LocMoE);
                   the correction bias E (stored, not trained)
    block          n(D) + attention + n(D) + MLP or MoE layer      (arch gpt)
                   + the shared MLP and the combine gate (D for cg1, 2D for cg2) (arch shared)
    ScMoE/DGMoE    a unit per MoE layer: with moe_every=2 a Block-MLP first (2 n(D) + attention +
                   MLP), then n(D) + attention + 2 n(D) + the MoE layer, + MLP and gate for scmoe
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lshmoe.plan.shape import AttnShape, LayerShape, ModelShape

if TYPE_CHECKING:
    from lshmoe.config import Config

_COMBINE = {"add": 0, "cg1": 1, "cg2": 2}  # Combiner's gate outputs


def _norm(kind: str, D: int) -> int:
    return D if kind == "rmsnorm" else 2 * D


def _experts(cfg: Config) -> int:
    e, D = cfg.moe, cfg.model.d_model
    E, F = e.num_experts, e.d_expert
    per = {"gelu": 2 * D * F, "swiglu": 3 * D * F, "linear": D * D + D, "identity": 0}[e.activation]
    if e.expert_bias and e.activation in ("gelu", "swiglu"):
        per += F + D + (F if e.activation == "swiglu" else 0)
    return E * per


def _moe_dense(cfg: Config) -> tuple[int, int]:
    """(trained non-expert parameters, frozen parameters) of one MoELayer."""
    e, D = cfg.moe, cfg.model.d_model
    router = e.num_experts if e.router == "locmoe" else e.num_experts * D
    node_bias = e.num_experts if cfg.locmoe.node_bias else 0
    shared = 0
    if e.shared_experts:
        shared = 3 * D * e.shared_experts * (e.d_shared or e.d_expert) + (D if e.shared_gate else 0)
    frozen = e.num_experts if e.correction_bias else 0
    return router + node_bias + shared, frozen


def count_gpt(cfg: Config, vocab_size: int | None = None) -> ModelShape:
    """The `ModelShape` of `GPTMoE(cfg.model, cfg.moe, vocab_size, ...)` (default: data.vocab_size)."""
    m, e = cfg.model, cfg.moe
    D, V = m.d_model, vocab_size or cfg.data.vocab_size
    n = _norm(m.norm, D)
    Fd = int(round(m.mlp_ratio * D))
    attn = 4 * D * D + 4 * D
    mlp = 2 * D * Fd + Fd + D
    moe_dense, frozen = _moe_dense(cfg)
    experts = _experts(cfg)
    shared_width = e.shared_experts * (e.d_shared or e.d_expert)
    moe = dict(experts=experts, frozen=frozen, moe_passes=1, shared_width=shared_width, shared_gate=e.shared_gate)
    layers: list[LayerShape] = []
    if m.arch in ("scmoe", "dgmoe"):
        pair = m.moe_every == 2
        for _ in range(1 if pair else 0, m.n_layers, m.moe_every):
            dense = (2 * n + attn + mlp if pair else 0) + 3 * n + attn + moe_dense
            widths = (Fd,) if pair else ()
            if m.arch == "scmoe":
                dense += mlp + _COMBINE[cfg.scmoe.combine] * D
                widths += (Fd,)
            layers.append(
                LayerShape(
                    dense=dense,
                    attn_blocks=2 if pair else 1,
                    mlp_widths=widths,
                    **{**moe, "moe_passes": 2 if m.arch == "dgmoe" else 1},
                )
            )
    else:
        moe_ids = set(m.moe_block_ids())
        for i in range(m.n_layers):
            if i not in moe_ids:
                layers.append(LayerShape(dense=2 * n + attn + mlp, mlp_widths=(Fd,)))
            elif m.arch == "shared":
                dense = 2 * n + attn + mlp + moe_dense + _COMBINE[cfg.scmoe.combine] * D
                layers.append(LayerShape(dense=dense, mlp_widths=(Fd,), **moe))
            else:
                layers.append(LayerShape(dense=2 * n + attn + moe_dense, **moe))
    H = m.n_heads
    return ModelShape(
        name=f"gpt-moe ({m.arch})",
        d_model=D,
        vocab=V,
        tied=True,
        root=V * D + m.seq_len * D + n,
        layers=tuple(layers),
        attn=AttnShape(n_heads=H, n_kv_heads=H, head_dim=D // H, v_head_dim=D // H, fused_qkv=True),
        num_experts=e.num_experts,
        top_k=e.top_k,
        d_expert=e.d_expert,
        expert_activation=e.activation,
        mlp_activation="gelu",
        norm=m.norm,
    )


__all__ = ["count_gpt"]
