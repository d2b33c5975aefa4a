"""OLMoE: softmax top-k, renormalised when `norm_topk_prob`."""

from lshmoe.hf.family import Family, register, renormalised_topk, softmax_aux

FAMILY = register(
    Family(
        model_type="olmoe",
        num_experts="num_experts",
        d_expert="intermediate_size",
        routing=renormalised_topk,
        aux_coef=softmax_aux,
    )
)
