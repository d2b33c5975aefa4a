"""Mixtral: softmax top-k, always renormalised (also at K = 1, where the weight becomes 1)."""

from lshmoe.hf.family import Family, register, softmax_aux

FAMILY = register(
    Family(
        model_type="mixtral",
        num_experts="num_local_experts",
        d_expert="intermediate_size",
        expert_names=("w1", "w3", "w2"),
        disk_block="block_sparse_moe",
        routing=lambda c: dict(normalize_weights=True, normalize_top1=True),
        aux_coef=softmax_aux,
    )
)
