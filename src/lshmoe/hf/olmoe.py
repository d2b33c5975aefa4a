"""OLMoE: softmax top-k, renormalised when `norm_topk_prob`."""

from lshmoe.hf.family import Family, register, softmax_aux

FAMILY = register(
    Family(
        model_type="olmoe",
        num_experts="num_experts",
        d_expert="intermediate_size",
        routing=lambda c: dict(normalize_weights=bool(c.norm_topk_prob), normalize_top1=True),
        aux_coef=softmax_aux,
    )
)
