"""What lshmoe needs to know about each Hugging Face MoE family: one table, `FAMILIES`.

A family entry says three things: where the sparse block sits and what its tensors are called on
disk (router, experts, shared experts), and how the model config's routing maps onto `MoEConfig`.
Everything else about the model stays transformers' own code. The table is plain data, complete at
import; a new family is one entry in it (and a test case in tests/hf_cases.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lshmoe.errors import UserError


class HFError(UserError):
    """A Hugging Face checkpoint lshmoe cannot use as it is (one line naming the file or tensor)."""


@dataclass(frozen=True, kw_only=True)
class Family:
    model_type: str  # config.json's "model_type"
    num_experts: str  # config attribute holding E
    d_expert: str  # config attribute holding each routed expert's hidden width
    # on-disk names of one expert's SwiGLU matrices (nn.Linear layout [out, in]): gate, up, down
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # on-disk name of the sparse block, when it differs from the module attribute `mlp`
    disk_block: str = "mlp"
    shared_name: str | None = None  # the shared expert MLP inside the block (gate_proj/up_proj/down_proj)
    shared_gate_name: str | None = None  # its sigmoid gate, a Linear(D, 1)
    routing: Callable[[Any], dict[str, Any]] = field(default=lambda c: {})  # MoEConfig fields from the config
    aux_coef: Callable[[Any], float] = field(default=lambda c: 0.0)  # transformers' aux loss coefficient


def softmax_aux(config: Any) -> float:
    """transformers adds router_aux_loss_coef * aux only when the config asks for the router logits."""
    return float(config.router_aux_loss_coef) if getattr(config, "output_router_logits", False) else 0.0


def renormalised_topk(config: Any) -> dict[str, Any]:
    """Softmax top-k renormalised when `norm_topk_prob`, with transformers' top-1 rule (OLMoE, Qwen3-MoE)."""
    return {"normalize_weights": bool(config.norm_topk_prob), "normalize_top1": True}


def _deepseek_v3_routing(c: Any) -> dict[str, Any]:
    return dict(
        score="sigmoid",
        correction_bias=True,
        n_group=int(c.n_group or 0),
        topk_group=int(c.topk_group or 0),
        routed_scaling_factor=float(c.routed_scaling_factor),
        normalize_weights=bool(c.norm_topk_prob),
        normalize_top1=True,
        shared_experts=int(c.n_shared_experts or 0),
        d_shared=int(c.moe_intermediate_size),
    )


def _qwen2_moe_routing(c: Any) -> dict[str, Any]:
    return dict(
        normalize_weights=bool(c.norm_topk_prob),
        normalize_top1=True,
        shared_experts=1,
        d_shared=int(c.shared_expert_intermediate_size),
        shared_gate=True,
    )


_TABLE = (
    # Mixtral: softmax top-k, always renormalised (also at K = 1, where the weight becomes 1).
    Family(
        model_type="mixtral",
        num_experts="num_local_experts",
        d_expert="intermediate_size",
        expert_names=("w1", "w3", "w2"),
        disk_block="block_sparse_moe",
        routing=lambda c: dict(normalize_weights=True, normalize_top1=True),
        aux_coef=softmax_aux,
    ),
    # Qwen2-MoE: softmax top-k plus one shared SwiGLU expert gated by sigmoid(w . x).
    Family(
        model_type="qwen2_moe",
        num_experts="num_experts",
        d_expert="moe_intermediate_size",
        shared_name="shared_expert",
        shared_gate_name="shared_expert_gate",
        routing=_qwen2_moe_routing,
        aux_coef=softmax_aux,
    ),
    # Qwen3-MoE: softmax top-k, renormalised when `norm_topk_prob`; dense layers in `mlp_only_layers`.
    Family(
        model_type="qwen3_moe",
        num_experts="num_experts",
        d_expert="moe_intermediate_size",
        routing=renormalised_topk,
        aux_coef=softmax_aux,
    ),
    # OLMoE: softmax top-k, renormalised when `norm_topk_prob`.
    Family(
        model_type="olmoe",
        num_experts="num_experts",
        d_expert="intermediate_size",
        routing=renormalised_topk,
        aux_coef=softmax_aux,
    ),
    # DeepSeek-V3: sigmoid scores, a selection-only correction bias, group-limited selection (groups
    # scored by their two best biased scores), routed_scaling_factor, and n_shared_experts ungated
    # shared experts (one SwiGLU of width n * moe_intermediate_size). The first
    # `first_k_dense_replace` layers are dense. transformers computes no auxiliary loss for it (the
    # bias does the balancing).
    Family(
        model_type="deepseek_v3",
        num_experts="n_routed_experts",
        d_expert="moe_intermediate_size",
        shared_name="shared_experts",
        routing=_deepseek_v3_routing,
    ),
)
FAMILIES: dict[str, Family] = {f.model_type: f for f in _TABLE}


def family_for(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise HFError(
            f"model_type={model_type!r} is not a supported MoE family; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
