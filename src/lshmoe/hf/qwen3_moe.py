"""Qwen3-MoE: softmax top-k, renormalised when `norm_topk_prob`; dense layers in `mlp_only_layers`."""

from lshmoe.hf.family import Family, register, softmax_aux

FAMILY = register(
    Family(
        model_type="qwen3_moe",
        num_experts="num_experts",
        d_expert="moe_intermediate_size",
        routing=lambda c: dict(normalize_weights=bool(c.norm_topk_prob), normalize_top1=True),
        aux_coef=softmax_aux,
    )
)
