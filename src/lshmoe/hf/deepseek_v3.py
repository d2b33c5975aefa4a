"""DeepSeek-V3: sigmoid scores, a selection-only correction bias, group-limited selection (groups
scored by their two best biased scores), routed_scaling_factor, and n_shared_experts ungated shared
experts (one SwiGLU of width n * moe_intermediate_size). The first `first_k_dense_replace` layers are
dense. transformers computes no auxiliary loss for it (the bias does the balancing)."""

from lshmoe.hf.family import Family, register

FAMILY = register(
    Family(
        model_type="deepseek_v3",
        num_experts="n_routed_experts",
        d_expert="moe_intermediate_size",
        shared_name="shared_experts",
        routing=lambda c: dict(
            score="sigmoid",
            correction_bias=True,
            n_group=int(c.n_group or 0),
            topk_group=int(c.topk_group or 0),
            routed_scaling_factor=float(c.routed_scaling_factor),
            normalize_weights=bool(c.norm_topk_prob),
            normalize_top1=True,
            shared_experts=int(c.n_shared_experts or 0),
            d_shared=int(c.moe_intermediate_size),
        ),
    )
)
