"""A transformers MoE model made expert-parallel: every sparse block replaced by lshmoe's layer.

    build_model(config, comm)   the family's *ForCausalLM built on the meta device (no memory, no
                                weights), each sparse MoE block swapped for an `HFMoEBlock` holding only
                                this rank's E / EP experts, then materialised on `comm.device`
    HFMoEBlock                  the drop-in block: hidden_states [B, S, D] -> [B, S, D], as
                                transformers' decoder layer expects; it keeps the last routing for the
                                auxiliary loss, computed as transformers computes it (hf/loss.py)

Attention, norms, embeddings, the LM head and generation stay transformers' modules. The weights are
left uninitialised: load them with `hf.load.load_weights` (or a training checkpoint).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lshmoe.config import Config, ConfigError, MoEConfig, validate
from lshmoe.distributed.comm import Comm
from lshmoe.hf.family import Family, HFError, family_for
from lshmoe.moe.layer import MoELayer
from lshmoe.moe.param_kinds import kinds_kept
from lshmoe.moe.router import RouterOutput


class HFMoEBlock(nn.Module):
    """lshmoe's expert-parallel MoE layer with transformers' sparse-block interface."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe
        self.last_route: RouterOutput | None = None
        self.last_out = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        route = self.moe.router(x_TD, seq_len=hidden_states.shape[-2] if hidden_states.dim() == 3 else None)
        out = self.moe(hidden_states, route)
        self.last_route, self.last_out = route, out
        return out.y_TD


def moe_config(config: Any, family: Family, overrides: dict[str, Any] | None = None) -> MoEConfig:
    """The MoEConfig that computes what the family's sparse block computes (plus any overrides)."""
    if getattr(config, "hidden_act", "silu") != "silu":
        raise HFError(f"hidden_act={config.hidden_act!r}: lshmoe's experts are SwiGLU (silu); got another activation")
    fields = dict(
        num_experts=int(getattr(config, family.num_experts)),
        top_k=int(config.num_experts_per_tok),
        d_expert=int(getattr(config, family.d_expert)),
        activation="swiglu",
        capacity_factor=None,
        jitter=0.0,
        aux_convention="hf",
        aux_loss_weight=family.aux_coef(config),
        z_loss_weight=0.0,
        **family.routing(config),
    )
    fields.update(overrides or {})
    known = {f.name for f in dataclasses.fields(MoEConfig)}
    bad = sorted(set(fields) - known)
    if bad:
        raise ConfigError(f"unknown MoE option {bad[0]}; valid keys: {', '.join(sorted(known))}")
    return MoEConfig(**fields)


def check_ep(mcfg: MoEConfig, ep_size: int, world_size: int) -> None:
    """The checkpoint's experts must split evenly over the EP group (the usual one-line errors)."""
    validate(Config(moe=dataclasses.replace(mcfg, ep_size=ep_size)), world_size=world_size)


def is_sparse_block(module: nn.Module) -> bool:
    """transformers' sparse MoE blocks all hold a router `gate` and an experts bank `experts`."""
    return hasattr(module, "experts") and hasattr(module, "gate") and not isinstance(module, HFMoEBlock)


def _fresh_rotary(model: nn.Module, config: Any, device: torch.device) -> None:
    """Rotary embeddings keep their frequencies in non-persistent buffers, which the meta device
    cannot hold and no checkpoint carries: build those modules again on the real device."""
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("RotaryEmbedding"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(
                parent, name.rsplit(".", 1)[-1], type(mod)(mod.config if hasattr(mod, "config") else config).to(device)
            )


def build_model(
    config: Any,
    comm: Comm,
    *,
    dtype: torch.dtype = torch.float32,
    overrides: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    settings: Config | None = None,
    materialize: bool = True,
) -> tuple[nn.Module, MoEConfig]:
    """The family's causal LM with expert-parallel MoE blocks, uninitialised, on `comm.device`.
    `settings` (the run's `Config`; None = defaults) gives the MoE layers their compressor / LocMoE /
    Lina sections. `materialize=False` leaves every parameter on the meta device (no memory), to be
    sharded first and then given storage by `materialize_model` (FSDP's deferred initialisation)."""
    from transformers import AutoModelForCausalLM

    family = family_for(getattr(config, "model_type", None))
    mcfg = moe_config(config, family, overrides)
    check_ep(mcfg, comm.group("ep").size, comm.world_size)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # The sparse blocks never leave the meta device: they are dropped first, and lshmoe's layers
    # (this rank's experts only) are created on the device after the rest is materialised.
    sparse = [i for i, layer in enumerate(model.model.layers) if is_sparse_block(getattr(layer, "mlp", None))]
    for i in sparse:
        model.model.layers[i].mlp = nn.Identity()
    if materialize:
        model.to_empty(device=comm.device)
        _fresh_rotary(model, config, comm.device)
    model.to(dtype)
    for i in sparse:
        moe = MoELayer(mcfg, config.hidden_size, comm, layer_id=i, settings=settings, causal=True)  # a causal LM
        block = HFMoEBlock(moe).to(device=comm.device, dtype=dtype)
        if not materialize:  # its buffers (the routers' load counters) are restored by materialize_model
            block.buffers_at_init = {n: b.clone() for n, b in block.named_buffers()}
            with kinds_kept(block):  # new parameter objects
                block.to("meta")
        model.model.layers[i].mlp = block
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    # The swapped blocks record their routing for hf/loss.py; transformers' own aux loss would find
    # no router logits to pool. export() writes the original setting back.
    model.hf_output_router_logits = getattr(config, "output_router_logits", None)
    if model.hf_output_router_logits is not None:
        model.config.output_router_logits = False
    model.hf_family, model.moe_cfg = family, mcfg
    return model, mcfg


def materialize_model(model: nn.Module, device: torch.device) -> None:
    """Give a model built with `materialize=False` (and possibly sharded since) storage on `device`:
    uninitialised parameters (load them: hf.load.load_weights, or a checkpoint), the MoE blocks' buffers
    as they were built, fresh rotary frequencies."""
    with kinds_kept(model):  # new parameter objects
        model.to_empty(device=device)
    _fresh_rotary(model, model.config, device)
    for m in model.modules():
        if isinstance(m, HFMoEBlock) and hasattr(m, "buffers_at_init"):
            with torch.no_grad():
                for n, b in m.named_buffers():
                    b.copy_(m.buffers_at_init[n])


def moe_blocks(model: nn.Module) -> list[tuple[int, HFMoEBlock]]:
    """(layer index, block) of every swapped block, in layer order (decoder layers, or the encoder
    layers of an upcycled BERT)."""
    return [(m.moe.layer_id, m) for m in model.modules() if isinstance(m, HFMoEBlock)]


__all__ = ["HFError", "HFMoEBlock", "build_model", "check_ep", "materialize_model", "moe_blocks", "moe_config"]
