"""Qwen2-MoE: softmax top-k plus one shared SwiGLU expert gated by sigmoid(w . x)."""

from lshmoe.hf.family import Family, register, softmax_aux

FAMILY = register(
    Family(
        model_type="qwen2_moe",
        num_experts="num_experts",
        d_expert="moe_intermediate_size",
        shared_name="shared_expert",
        shared_gate_name="shared_expert_gate",
        routing=lambda c: dict(
            normalize_weights=bool(c.norm_topk_prob),
            normalize_top1=True,
            shared_experts=1,
            d_shared=int(c.shared_expert_intermediate_size),
            shared_gate=True,
        ),
        aux_coef=softmax_aux,
    )
)
