"""Parameter counts from a config alone (lshmoe.plan) against the real models: transformers' own model
of each family built on the meta device from the same config.json, and lshmoe's GPTMoE on one rank.

The published configs under tests/data/plan/ are the config.json files of Qwen3-30B-A3B, Mixtral-8x7B,
Qwen1.5-MoE-A2.7B, OLMoE-1B-7B-0924 and DeepSeek-V3 as published on the Hugging Face Hub (DeepSeek-V3
without its FP8 quantization block, which holds no shape)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hf_cases import FAMILIES, hf_config

from lshmoe.config import Config, ConfigError, validate
from lshmoe.distributed.comm import Comm
from lshmoe.models.gpt import GPTMoE
from lshmoe.moe.param_kinds import is_expert_param
from lshmoe.plan import count_gpt, count_hf, read_config_json

PUBLISHED = Path(__file__).parent / "data" / "plan"


def _saved_config(tmp_path: Path, family: str, **extra) -> dict:
    """The config.json transformers writes for a tiny model of `family` (what `--hf` reads)."""
    hf_config(family, **extra).save_pretrained(str(tmp_path))
    return read_config_json(tmp_path)[0]


def _meta_model(raw: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_")})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _split(model) -> tuple[int, int, int, dict[int, tuple[int, int]]]:
    """(dense, experts, correction-bias buffers, per layer (dense, experts)) of a transformers model."""
    dense = experts = 0
    per_layer: dict[int, list[int]] = {}
    for name, p in model.named_parameters():
        is_expert = ".experts." in name
        dense, experts = dense + p.numel() * (not is_expert), experts + p.numel() * is_expert
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m:
            per_layer.setdefault(int(m.group(1)), [0, 0])[is_expert] += p.numel()
    frozen = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    return dense, experts, frozen, {i: tuple(v) for i, v in per_layer.items()}


def _check(raw: dict) -> None:
    shape = count_hf(raw)
    dense, experts, frozen, per_layer = _split(_meta_model(raw))
    assert (shape.dense_params, shape.expert_params, shape.frozen_params) == (dense, experts, frozen)
    assert {i: (layer.dense, layer.experts) for i, layer in enumerate(shape.layers)} == per_layer


VARIANTS = [
    (family, {}) for family in FAMILIES
] + [
    (family, {"tie_word_embeddings": True}) for family in FAMILIES
] + [
    ("mixtral", {"head_dim": None, "num_key_value_heads": 2}),
    ("qwen2_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [1], "qkv_bias": False, "num_hidden_layers": 4}),
    ("qwen3_moe", {"attention_bias": True, "mlp_only_layers": [0]}),
    ("olmoe", {"attention_bias": True, "num_key_value_heads": 2}),
    ("deepseek_v3", {"q_lora_rank": None, "attention_bias": True, "first_k_dense_replace": 0}),
    ("deepseek_v3", {"n_shared_experts": 0, "first_k_dense_replace": 2, "num_hidden_layers": 3}),
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # DeepSeek-V3 without shared experts
@pytest.mark.parametrize(("family", "extra"), VARIANTS, ids=lambda v: v if isinstance(v, str) else str(v))
def test_hf_counts_equal_transformers(tmp_path, family, extra):
    _check(_saved_config(tmp_path, family, **extra))


# published totals (model cards): total and activated parameters, to the precision they are stated, and
# whether the activated count leaves the input embedding out (DeepSeek-V3's 37 B does: 37.55 B - 0.93 B)
CARDS = {
    "qwen3-30b-a3b.json": (30.5e9, 3.3e9, 0.1e9, False),
    "mixtral-8x7b.json": (46.7e9, 12.9e9, 0.1e9, False),
    "qwen1.5-moe-a2.7b.json": (14.3e9, 2.7e9, 0.1e9, False),
    "olmoe-1b-7b.json": (6.9e9, 1.3e9, 0.1e9, False),
    "deepseek-v3.json": (671e9, 37e9, 1e9, True),
}


@pytest.mark.parametrize("name", sorted(CARDS))
def test_published_configs(name):
    """The published configs count as transformers builds them (DeepSeek-V3 cut to 5 layers there, to
    stay fast) and to the totals their model cards state."""
    raw = json.loads((PUBLISHED / name).read_text())
    _check({**raw, "num_hidden_layers": 5} if raw["model_type"] == "deepseek_v3" else raw)
    shape = count_hf(raw)
    total, active, step, no_embedding = CARDS[name]
    assert abs(shape.total_params - total) < step, shape.total_params  # cards round or truncate
    counted = shape.active_params - (shape.vocab * shape.d_model if no_embedding else 0)
    assert abs(counted - active) < step, counted


GPT_VARIANTS = [
    {},
    {"moe.activation": "swiglu", "moe.expert_bias": True},
    {"moe.activation": "gelu", "moe.expert_bias": True, "model.norm": "rmsnorm"},
    {"moe.activation": "linear"},
    {"moe.activation": "identity"},
    {"moe.shared_experts": 2, "moe.d_shared": 8, "moe.shared_gate": True, "moe.correction_bias": True},
    {"moe.router": "locmoe", "locmoe.node_bias": True},
    {"model.arch": "shared", "scmoe.combine": "cg2"},
    {"model.arch": "scmoe"},
    {"model.arch": "scmoe", "model.moe_every": 1, "scmoe.shortcut": "pos1", "scmoe.combine": "add"},
    {"model.arch": "dgmoe", "moe.top_k": 1},
    {"model.moe_every": 1, "model.mlp_ratio": 2.5},
]


@pytest.mark.parametrize("changes", GPT_VARIANTS, ids=str)
def test_gpt_counts_equal_gptmoe(changes):
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.seq_len = 32, 4, 4, 16
    cfg.moe.num_experts, cfg.moe.d_expert = 4, 24
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, value)
    validate(cfg, world_size=1)
    model = GPTMoE(cfg.model, cfg.moe, 50, Comm.local(), settings=cfg)
    shape = count_gpt(cfg, 50)
    params = list(model.parameters())
    assert shape.expert_params == sum(p.numel() for p in params if is_expert_param(p))
    assert shape.dense_params == sum(p.numel() for p in params if not is_expert_param(p) and p.requires_grad)
    assert shape.frozen_params == sum(p.numel() for p in params if not p.requires_grad)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"model_type": "llama"}, r"model_type='llama' is not a supported MoE family; supported: mixtral"),
        ({"hidden_size": 16}, r"model_type=None is not a supported"),
        ({"model_type": "mixtral", "hidden_size": "wide"}, r"hidden_size='wide' must be an integer >= 1"),
        ({"model_type": "qwen3_moe", "num_hidden_layers": 0}, r"num_hidden_layers=0 must be an integer >= 1"),
    ],
)
def test_bad_config_values_are_one_line(raw, match):
    with pytest.raises(ConfigError, match=match):
        count_hf(raw)


def test_bad_config_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"no config.json there"):
        read_config_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not readable JSON"):
        read_config_json(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"a JSON object expected, got list"):
        read_config_json(tmp_path / "config.json")
