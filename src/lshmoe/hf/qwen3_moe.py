"""Qwen3-MoE: softmax top-k, renormalised when `norm_topk_prob`; dense layers in `mlp_only_layers`."""

from lshmoe.hf.family import Family, register, renormalised_topk, softmax_aux

FAMILY = register(
    Family(
        model_type="qwen3_moe",
        num_experts="num_experts",
        d_expert="moe_intermediate_size",
        routing=renormalised_topk,
        aux_coef=softmax_aux,
    )
)
