"""The two models `lshmoe bench memory` measures: lshmoe's GPT-MoE scaled up, and a random
Qwen3-MoE-shaped Hugging Face checkpoint written to a directory with transformers.

Both are sized so that the model state (16 bytes per parameter in float32 with AdamW) dominates a
rank's tensors, which makes FSDP's 1/W visible, and small enough that the whole matrix of settings
runs on a 2-core CPU in well under an hour. `quick` shrinks them to seconds (the bench's test).
The HF checkpoint borrows the GPT-MoE's byte-level BPE (the same text, the same 4096-id vocabulary),
so both models train on real text with a real tokenizer and nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lshmoe.bench.harness import base_config
from lshmoe.config import Config, apply_sets
from lshmoe.data import load_data

# section.key -> value on top of the defaults (the bench's base: no progress bar, one rank thread)
GPT = {
    "model.d_model": "256",
    "model.n_heads": "4",
    "model.n_layers": "4",
    "model.seq_len": "128",
    "moe.num_experts": "16",
    "moe.d_expert": "512",
    "train.batch_size": "4",
}
GPT_QUICK = {
    "model.d_model": "64",
    "model.n_heads": "2",
    "model.n_layers": "2",
    "model.seq_len": "32",
    "moe.num_experts": "4",
    "moe.d_expert": "64",
    "train.batch_size": "2",
}
# transformers' Qwen3MoeConfig fields (every layer sparse; vocab_size is the tokenizer's)
QWEN3 = dict(
    hidden_size=256,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=4,
)
QWEN3_QUICK = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    num_experts=4,
    num_experts_per_tok=2,
)
MODELS = ("gpt", "hf")


def base(sets: list[str]) -> Config:
    """The bench's common config: the harness's benchmark settings, then `--set`."""
    cfg = base_config([])
    cfg.train.eval_batches, cfg.train.eval_every, cfg.train.resume = 1, 0, "none"
    return apply_sets(cfg, sets)


def gpt_config(quick: bool, sets: list[str]) -> Config:
    cfg = base([])
    cfg = apply_sets(cfg, [f"{k}={v}" for k, v in (GPT_QUICK if quick else GPT).items()])
    return apply_sets(cfg, sets)


def write_qwen3(path: Path, cfg: Config, quick: bool) -> Path:
    """A random Qwen3-MoE checkpoint in `path` (config.json, safetensors) with the GPT-MoE's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = load_data(cfg.data, print)
    hf = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=data.vocab_size,
        max_position_embeddings=max(512, cfg.model.seq_len),
        norm_topk_prob=True,
        output_router_logits=True,
        **(QWEN3_QUICK if quick else QWEN3),
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf).save_pretrained(str(path))
    shutil.copy2(data.tokenizer_path, path / "tokenizer.json")
    return path


def hf_config(path: Path, quick: bool, sets: list[str]) -> Config:
    """`train --hf path` with the GPT-MoE's sequence length and batch (the checkpoint sets the model)."""
    gpt = gpt_config(quick, sets)
    cfg = base(sets)
    cfg.model.hf, cfg.model.seq_len, cfg.train.batch_size = str(path), gpt.model.seq_len, gpt.train.batch_size
    return cfg


def shape_of(kind: str, cfg: Config) -> Any:
    """The plan's `ModelShape` of the model a config builds (counted from the config alone)."""
    from lshmoe.plan import count_gpt, count_hf, read_config_json

    if kind == "gpt":
        return count_gpt(cfg, load_data(cfg.data).vocab_size)
    raw, source = read_config_json(cfg.model.hf)
    return count_hf(raw, source)


def describe(kind: str, cfg: Config) -> str:
    """One line for the report: the model's widths and parameter count."""
    shape = shape_of(kind, cfg)
    total = f"{shape.total_params / 1e6:.2f} M parameters ({shape.expert_params / 1e6:.2f} M in routed experts)"
    if kind == "gpt":
        m, e = cfg.model, cfg.moe
        return (
            f"GPT-MoE: d_model {m.d_model}, {m.n_layers} layers (MoE every {m.moe_every}), {e.num_experts} "
            f"{e.activation} experts of width {e.d_expert}, top-{e.top_k}, vocab {shape.vocab}; {total}"
        )
    raw = json.loads((Path(cfg.model.hf) / "config.json").read_text())
    return (
        f"Qwen3-MoE shape (random weights, transformers' save_pretrained): hidden {raw['hidden_size']}, "
        f"{raw['num_hidden_layers']} layers, {raw['num_attention_heads']}/{raw['num_key_value_heads']} heads of "
        f"{raw['head_dim']}, {shape.num_experts} SwiGLU experts of width {shape.d_expert}, top-{shape.top_k}, "
        f"vocab {shape.vocab}; {total}"
    )


__all__ = ["MODELS", "describe", "gpt_config", "hf_config", "shape_of", "write_qwen3"]
