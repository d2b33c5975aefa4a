"""Parameter counts of the five Hugging Face MoE families from config.json alone (no transformers).

Each count follows the family's transformers modules (v5), with the config classes' defaults for keys
a config.json leaves out; tests/test_plan_count.py checks every family against transformers' own
model built on the meta device. Per decoder layer (D hidden, H/Hk query/key-value heads, d head width,
E experts of width F, V vocabulary):

    every family     input + post-attention RMSNorm 2D
    MHA              q D*H*d, k and v D*Hk*d each, o H*d*D (+ biases: Qwen2-MoE q/k/v, `qkv_bias`;
                     Qwen3-MoE/OLMoE all four with `attention_bias`)
    q/k norms        Qwen3-MoE 2d (per head); OLMoE D + Hk*D/H (over the whole projection)
    MLA (DeepSeek)   q_a D*q_lora + norm q_lora + q_b q_lora*H*(nope+rope) (or q D*H*(nope+rope)),
                     kv_a D*(kv_lora+rope) + norm kv_lora + kv_b kv_lora*H*(nope+v), o H*v*D
    MoE layer        router E*D; experts E*3*D*F; Qwen2-MoE shared expert 3*D*F_s + gate D;
                     DeepSeek-V3 shared experts 3*D*(n_shared*F) and the correction bias E (not trained)
    dense layer      SwiGLU 3*D*intermediate_size (Qwen `mlp_only_layers` / `decoder_sparse_step`,
                     DeepSeek-V3's first `first_k_dense_replace` layers)
    root             embedding V*D + final norm D + head V*D unless `tie_word_embeddings`

DeepSeek-V3's multi-token-prediction module (`num_nextn_predict_layers`) is not part of transformers'
model and is not counted (it adds about 14 B parameters to the 671 B of V3).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lshmoe.errors import ConfigError
from lshmoe.plan.shape import AttnShape, LayerShape, ModelShape

# model_type -> its config class's defaults for the keys read here (transformers v5)
DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=None, num_experts_per_tok=2, num_local_experts=8, tie_word_embeddings=False,
    ),
    "qwen2_moe": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, head_dim=None, decoder_sparse_step=1, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_experts=60, mlp_only_layers=None,
        qkv_bias=True, tie_word_embeddings=False,
    ),
    "qwen3_moe": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=4, head_dim=None, attention_bias=False, decoder_sparse_step=1, moe_intermediate_size=768,
        num_experts_per_tok=8, num_experts=128, mlp_only_layers=None, tie_word_embeddings=False,
    ),
    "olmoe": dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=None, attention_bias=False, num_experts_per_tok=8, num_experts=64,
        tie_word_embeddings=False,
    ),
    "deepseek_v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, num_experts_per_tok=8, first_k_dense_replace=3, attention_bias=False,
        tie_word_embeddings=False,
    ),
}  # fmt: skip
FAMILIES = tuple(DEFAULTS)
# NOTE: transformers' attribute_map lets a config.json spell some keys two ways (Qwen3-MoE's published
# config says num_experts, transformers v5 writes num_local_experts); either is read.
ALIASES = {
    "num_experts": ("num_local_experts",),
    "num_local_experts": ("num_experts",),
    "n_routed_experts": ("num_local_experts",),
    "num_nextn_predict_layers": ("num_mtp_layers",),
}


class _Cfg:
    """config.json values with the family defaults; a missing or non-integer value is one line."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source
        self.defaults = DEFAULTS[raw["model_type"]]

    def get(self, key: str) -> Any:
        for name in (key, *ALIASES.get(key, ())):
            if name in self.raw:
                return self.raw[name]
        return self.defaults.get(key)

    def int(self, key: str, *, minimum: int = 1, optional: bool = False) -> int:
        value = self.get(key)
        if value is None and optional:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self.source}: {key}={value!r} must be an integer >= {minimum}")
        return value


def read_config_json(path: str | Path) -> tuple[dict[str, Any], str]:
    """(config dict, its path as text) from a checkpoint directory or a config.json file."""
    p = Path(path).expanduser()
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"--hf {path}: no config.json there; give a Hugging Face checkpoint directory or its file")
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not readable JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: a JSON object expected, got {type(raw).__name__}")
    return raw, str(file)


def count_hf(raw: dict[str, Any], source: str = "config.json") -> ModelShape:
    """The `ModelShape` of a config.json dict of one of the supported families."""
    model_type = raw.get("model_type")
    if model_type not in DEFAULTS:
        raise ConfigError(
            f"{source}: model_type={model_type!r} is not a supported MoE family; supported: {', '.join(FAMILIES)}"
        )
    return _COUNTERS[model_type](_Cfg(raw, source))


# ---------------------------------------------------------------------------------------- pieces


def _root(cfg: _Cfg, D: int) -> tuple[int, int, bool]:
    V = cfg.int("vocab_size")
    tied = bool(cfg.get("tie_word_embeddings"))
    return V, V * D + D + (0 if tied else V * D), tied


def _mha(cfg: _Cfg, D: int, *, qkv_bias: bool, o_bias: bool, qk_norm: str) -> tuple[int, AttnShape]:
    H = cfg.int("num_attention_heads")
    Hk = cfg.int("num_key_value_heads", optional=True) or H
    d = cfg.get("head_dim") or D // H
    params = D * H * d + 2 * D * Hk * d + H * d * D
    params += (H * d + 2 * Hk * d) * qkv_bias + D * o_bias
    norm_width = {"none": 0, "head": 2 * d, "full": D + (D // H) * Hk}[qk_norm]
    shape = AttnShape(n_heads=H, n_kv_heads=Hk, head_dim=d, v_head_dim=d, qk_norm=(H + Hk) * d if norm_width else 0)
    return params + norm_width, shape


def _moe_layer(D: int, E: int, F: int, *, shared: int = 0, gate: bool = False, frozen: int = 0) -> LayerShape:
    dense = 2 * D + E * D + 3 * D * shared + (D if gate else 0)
    return LayerShape(
        dense=dense, experts=E * 3 * D * F, frozen=frozen, moe_passes=1, shared_width=shared, shared_gate=gate
    )


def _dense_layer(D: int, F: int) -> LayerShape:
    return LayerShape(dense=2 * D + 3 * D * F, mlp_widths=(F,))


def _with_attn(layer: LayerShape, attn_params: int) -> LayerShape:
    return replace(layer, dense=layer.dense + attn_params)


def _shape(name: str, cfg: _Cfg, D: int, attn: AttnShape, layers: list[LayerShape], E: int, F: int, **kw) -> ModelShape:
    V, root, tied = _root(cfg, D)
    return ModelShape(
        name=name,
        d_model=D,
        vocab=V,
        tied=tied,
        root=root,
        layers=tuple(layers),
        attn=attn,
        num_experts=E,
        top_k=cfg.int("num_experts_per_tok"),
        d_expert=F,
        **kw,
    )


# -------------------------------------------------------------------------------------- families


def _qwen_sparse(cfg: _Cfg, i: int) -> bool:
    only = cfg.get("mlp_only_layers") or []
    return i not in only and cfg.int("num_experts", minimum=0) > 0 and (i + 1) % cfg.int("decoder_sparse_step") == 0


def _qwen2_moe(cfg: _Cfg) -> ModelShape:
    D, L = cfg.int("hidden_size"), cfg.int("num_hidden_layers")
    E, F = cfg.int("num_experts", minimum=0), cfg.int("moe_intermediate_size")
    attn_p, attn = _mha(cfg, D, qkv_bias=bool(cfg.get("qkv_bias")), o_bias=False, qk_norm="none")
    Fs, Fd = cfg.int("shared_expert_intermediate_size"), cfg.int("intermediate_size")
    moe = _moe_layer(D, E, F, shared=Fs, gate=True)
    layers = [moe if _qwen_sparse(cfg, i) else _dense_layer(D, Fd) for i in range(L)]
    return _shape("qwen2_moe", cfg, D, attn, [_with_attn(x, attn_p) for x in layers], E, F)


def _qwen3_moe(cfg: _Cfg) -> ModelShape:
    D, L = cfg.int("hidden_size"), cfg.int("num_hidden_layers")
    E, F = cfg.int("num_experts", minimum=0), cfg.int("moe_intermediate_size")
    bias = bool(cfg.get("attention_bias"))
    attn_p, attn = _mha(cfg, D, qkv_bias=bias, o_bias=bias, qk_norm="head")
    moe, dense = _moe_layer(D, E, F), _dense_layer(D, cfg.int("intermediate_size"))
    layers = [moe if _qwen_sparse(cfg, i) else dense for i in range(L)]
    return _shape("qwen3_moe", cfg, D, attn, [_with_attn(x, attn_p) for x in layers], E, F)


def _mixtral(cfg: _Cfg) -> ModelShape:
    D, L = cfg.int("hidden_size"), cfg.int("num_hidden_layers")
    E, F = cfg.int("num_local_experts"), cfg.int("intermediate_size")
    attn_p, attn = _mha(cfg, D, qkv_bias=False, o_bias=False, qk_norm="none")
    layers = [_with_attn(_moe_layer(D, E, F), attn_p) for _ in range(L)]
    return _shape("mixtral", cfg, D, attn, layers, E, F)


def _olmoe(cfg: _Cfg) -> ModelShape:
    D, L = cfg.int("hidden_size"), cfg.int("num_hidden_layers")
    E, F = cfg.int("num_experts"), cfg.int("intermediate_size")
    bias = bool(cfg.get("attention_bias"))
    attn_p, attn = _mha(cfg, D, qkv_bias=bias, o_bias=bias, qk_norm="full")
    layers = [_with_attn(_moe_layer(D, E, F), attn_p) for _ in range(L)]
    return _shape("olmoe", cfg, D, attn, layers, E, F)


def _mla(cfg: _Cfg, D: int) -> tuple[int, AttnShape]:
    H = cfg.int("num_attention_heads")
    qr, kvr = cfg.int("q_lora_rank", optional=True), cfg.int("kv_lora_rank")
    rope, nope, dv = cfg.int("qk_rope_head_dim"), cfg.int("qk_nope_head_dim"), cfg.int("v_head_dim")
    bias = bool(cfg.get("attention_bias"))
    dq = nope + rope
    q = D * qr + qr * bias + qr + qr * H * dq if qr else D * H * dq
    kv = D * (kvr + rope) + (kvr + rope) * bias + kvr + kvr * H * (nope + dv)
    o = H * dv * D + D * bias
    shape = AttnShape(
        kind="mla", n_heads=H, n_kv_heads=H, head_dim=dq, v_head_dim=dv, q_lora_rank=qr, kv_lora_rank=kvr,
        rope_dim=rope,
    )  # fmt: skip
    return q + kv + o, shape


def _deepseek_v3(cfg: _Cfg) -> ModelShape:
    D, L = cfg.int("hidden_size"), cfg.int("num_hidden_layers")
    E, F = cfg.int("n_routed_experts"), cfg.int("moe_intermediate_size")
    attn_p, attn = _mla(cfg, D)
    shared = cfg.int("n_shared_experts", minimum=0, optional=True) * F
    first_dense = cfg.int("first_k_dense_replace", minimum=0, optional=True)
    Fd = cfg.int("intermediate_size")
    layers = [
        _dense_layer(D, Fd) if i < first_dense else _moe_layer(D, E, F, shared=shared, frozen=E) for i in range(L)
    ]
    notes = ("multi-token-prediction layers not counted",) if cfg.get("num_nextn_predict_layers") else ()
    return _shape("deepseek_v3", cfg, D, attn, [_with_attn(x, attn_p) for x in layers], E, F, notes=notes)


_COUNTERS: dict[str, Callable[[_Cfg], ModelShape]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
}

__all__ = ["FAMILIES", "count_hf", "read_config_json"]
