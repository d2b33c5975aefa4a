"""The memory model (lshmoe.plan.memory) against real tensors on one process: the parameter, gradient
and AdamW bytes of a real model after one optimizer step, and the bytes autograd saves for backward
in a real forward (GPT-MoE, and lshmoe's conversion of each Hugging Face family)."""

from __future__ import annotations

import pytest
import torch
from hf_cases import hf_config

from lshmoe.config import Config, TrainConfig, validate
from lshmoe.distributed.comm import Comm
from lshmoe.errors import UserError
from lshmoe.models.gpt import GPTMoE
from lshmoe.plan import Setting, Workload, activation_bytes, count_gpt, count_hf, memory_per_rank, model_state_bytes
from lshmoe.plan.memory import unit_params
from lshmoe.train.optim import build_optimizer

V, B, S = 200, 4, 32


def _gpt_cfg(activation: str = "gelu", **moe) -> Config:
    cfg = Config()
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.seq_len = 64, 4, 4, S
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.d_expert, cfg.moe.activation = 4, 2, 96, activation
    for k, v in moe.items():
        setattr(cfg.moe, k, v)
    validate(cfg, world_size=1)
    return cfg


def _gpt(cfg: Config, dtype: torch.dtype) -> GPTMoE:
    torch.manual_seed(0)
    model = GPTMoE(cfg.model, cfg.moe, V, Comm.local(), settings=cfg)
    model.reset_parameters(0)
    return model.to(dtype)


def _hf(family: str, dtype: torch.dtype, tmp_path):
    """lshmoe's expert-parallel conversion of a small `family` model on one rank, and its config.json."""
    from lshmoe.hf.model import build_model
    from lshmoe.plan import read_config_json

    extra = {"v_head_dim": 8} if family == "deepseek_v3" else {"hidden_size": 64, "num_attention_heads": 4}
    if family in ("qwen3_moe", "mixtral"):
        extra["head_dim"] = 16
    config = hf_config(family, **extra)
    config.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    model, _ = build_model(config, Comm.local(), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model, read_config_json(tmp_path)[0]


def _hf_loss(model, idx):
    from lshmoe.hf.loss import lm_loss

    return lm_loss(model, idx, idx)["loss"]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_after_step(model, loss_fn) -> dict[str, int]:
    opt = build_optimizer(model, TrainConfig())
    loss_fn().backward()
    opt.step()
    states = [st for st in opt.state.values()]
    steps = _tensor_bytes(st["step"] for st in states)
    assert steps <= 4 * len(states)  # NOTE: AdamW's per-tensor step counters: 4 bytes each, left out
    return {
        "params": _tensor_bytes(model.parameters()),
        "grads": _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optim": _tensor_bytes(st[k] for st in states for k in ("exp_avg", "exp_avg_sq")),
    }


@pytest.mark.parametrize(("dtype", "name"), [(torch.float32, "float32"), (torch.bfloat16, "bf16-pure")])
def test_gpt_model_state_equals_real_adamw(dtype, name):
    cfg = _gpt_cfg("swiglu", shared_experts=1, correction_bias=True)  # frozen bias: stored, no grad, no state
    model = _gpt(cfg, dtype)
    idx = torch.randint(0, V, (B, S))
    real = _state_after_step(model, lambda: model(idx, idx).loss)
    state = model_state_bytes(count_gpt(cfg, V), Setting(world=1, ep=1, dtype=name))
    assert (state.params, state.grads, state.optim) == (real["params"], real["grads"], real["optim"])


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_hf_model_state_equals_real_adamw(family, tmp_path):
    model, raw = _hf(family, torch.float32, tmp_path)
    idx = torch.randint(0, 96, (B, S))
    real = _state_after_step(model, lambda: _hf_loss(model, idx))
    state = model_state_bytes(count_hf(raw), Setting(world=1, ep=1, dtype="float32"))
    assert (state.params, state.grads, state.optim) == (real["params"], real["grads"], real["optim"])


def saved_bytes(model, fn) -> int:
    """Bytes of the distinct storages autograd saves for backward during `fn()`, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _formula_saved(shape, dtype: str) -> int:
    act = activation_bytes(shape, Setting(world=1, ep=1, dtype=dtype), Workload(seq_len=S, batch_size=B))
    return sum(act.saved.values())


@pytest.mark.parametrize(
    ("activation", "dtype", "name", "tol"),
    [
        ("gelu", torch.float32, "float32", 0.01),
        ("swiglu", torch.float32, "float32", 0.01),
        ("swiglu", torch.bfloat16, "bf16-pure", 0.04),  # CPU LayerNorm keeps bf16 statistics
    ],
)
def test_gpt_saved_activations_match_formula(activation, dtype, name, tol):
    cfg = _gpt_cfg(activation)
    model = _gpt(cfg, dtype)
    idx = torch.randint(0, V, (B, S))
    measured = saved_bytes(model, lambda: model(idx, idx))
    assert _formula_saved(count_gpt(cfg, V), name) == pytest.approx(measured, rel=tol)


# NOTE: DeepSeek's MLA is within 6%: on the CPU its rotary tables are copied per layer and the
# latent's fp32 copy keeps the rope columns; the formula follows the GPU kernels.
@pytest.mark.parametrize(
    ("family", "tol"),
    [("mixtral", 0.02), ("qwen2_moe", 0.02), ("qwen3_moe", 0.02), ("olmoe", 0.02), ("deepseek_v3", 0.06)],
)
def test_hf_saved_activations_match_formula(family, tol, tmp_path):
    model, raw = _hf(family, torch.float32, tmp_path)
    idx = torch.randint(0, 96, (B, S))
    measured = saved_bytes(model, lambda: _hf_loss(model, idx))
    assert _formula_saved(count_hf(raw), "float32") == pytest.approx(measured, rel=tol)


# ------------------------------------------------------------------------------- the formulas' structure


def _qwen3_like():
    return count_hf(
        dict(model_type="qwen3_moe", hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128, vocab_size=1000)
    )  # fmt: skip


def test_ac_modes_remove_what_they_recompute():
    shape = _qwen3_like()
    w = Workload(seq_len=128, batch_size=2)
    none, experts, blocks = (
        activation_bytes(shape, Setting(world=4, ep=4, dtype="bf16-mp", ac=ac), w)
        for ac in ("none", "experts", "blocks")
    )
    assert (
        experts.removed == {"moe.expert_hidden": none.saved["moe.expert_hidden"]}
        and experts.saved["moe.expert_hidden"] == 0
    )
    # swiglu: four R x F tensors per layer, R = skew * T * K rows on the busiest rank
    R = round(1.25 * 2 * 128 * 4)
    assert none.saved["moe.expert_hidden"] == 4 * 4 * 2 * R * 128
    assert blocks.saved["attn.internals"] == 0 and blocks.saved["ffn.mlp"] == 0
    # never recomputed: the router and everything around the exchange; the norms (a region's input)
    for kept in ("moe.received", "moe.combine", "moe.router", "attn.norm", "ffn.norm", "head.logprobs"):
        assert none.saved[kept] == experts.saved[kept] == blocks.saved[kept]
    assert none.total > experts.total > blocks.total


def test_micro_batches_divide_activations_not_state():
    shape = _qwen3_like()
    w = Workload(seq_len=128, batch_size=4)
    one, four = (memory_per_rank(shape, Setting(world=2, ep=2, dtype="bf16-mp", micro_batches=n), w) for n in (1, 4))
    assert one.state == four.state
    assert one.activations.saved["moe.received"] == 4 * four.activations.saved["moe.received"]


def test_fsdp_shards_model_state_as_one_over_world():
    shape = _qwen3_like()
    for ep in (1, 2, 4):
        states = {W: model_state_bytes(shape, Setting(world=W, ep=ep, fsdp=True, dtype="bf16-mp")) for W in (4, 8, 16)}
        for W, st in states.items():
            sharded = (shape.dense_params + shape.expert_params) // W
            assert st.terms["optim.adamw"] == 8 * sharded and st.terms["grads.local"] == 4 * sharded
            # bf16 working copies: the root and two layers, each with its local expert bank
            assert st.terms["params.working"] == 2 * (shape.root + 2 * unit_params(shape, ep))
    no_fsdp = model_state_bytes(shape, Setting(world=4, ep=4, dtype="float32"))
    assert no_fsdp.terms["params.master"] + no_fsdp.terms["grads.local"] + no_fsdp.optim == 16 * shape.local_params(4)


def test_bad_settings_are_one_line():
    with pytest.raises(UserError, match=r"ep=3 must divide the world size 4"):
        Setting(world=4, ep=3)
    with pytest.raises(UserError, match=r"dtype='bf16'.*float32, bf16-mp, bf16-pure"):
        Setting(world=1, ep=1, dtype="bf16")
    with pytest.raises(UserError, match=r"ac='all'"):
        Setting(world=1, ep=1, ac="all")
    with pytest.raises(UserError, match=r"grad-accum=3 must divide batch-size=4"):
        Workload(seq_len=8, batch_size=4).tokens(3)
