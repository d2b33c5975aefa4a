"""Tiny random checkpoints of every supported Hugging Face MoE family, built with transformers and
saved with `save_pretrained` (nothing is downloaded), plus a tiny character tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

V = 96  # vocabulary (the character tokenizer below fits in it)
COMMON = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
FAMILIES = {
    "qwen3_moe": dict(
        intermediate_size=24,
        moe_intermediate_size=8,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
    ),
    "mixtral": dict(  # top-1: transformers renormalises the single weight to 1
        intermediate_size=8,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=8,
        num_experts_per_tok=1,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
    ),
    "olmoe": dict(
        intermediate_size=8,
        num_key_value_heads=1,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        eos_token_id=1,
        pad_token_id=0,
    ),
    "qwen2_moe": dict(
        intermediate_size=24,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=12,
        num_key_value_heads=1,
        num_experts=8,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
    ),
    "deepseek_v3": dict(
        intermediate_size=24,
        moe_intermediate_size=8,
        num_key_value_heads=2,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        kv_lora_rank=8,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
        routed_scaling_factor=2.5,
    ),
}


def hf_config(family: str, **extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **extra})


def build_reference(family: str, seed: int = 0, **extra):
    """A transformers model of `family` with random weights large enough to make routing matter."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **extra), experts_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.1)
    return model


def save_tokenizer(path: Path) -> None:
    """A character-level tokenizer (printable ASCII) saved in the checkpoint directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for c in (chr(i) for i in range(32, 127)):
        if len(vocab) < V:
            vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(str(path))


def save_checkpoint(path: Path, family: str, seed: int = 0, **extra) -> Path:
    model = build_reference(family, seed, **extra)
    model.save_pretrained(str(path))
    save_tokenizer(path)
    return path
