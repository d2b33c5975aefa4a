"""What lshmoe needs to know about one Hugging Face MoE family, and the registry of families.

A family file (mixtral.py, qwen2_moe.py, ...) says three things: where the sparse block sits and
what its tensors are called on disk (router, experts, shared experts), and how the model config's
routing maps onto `MoEConfig`. Everything else about the model stays transformers' own code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lshmoe.errors import UserError


class HFError(UserError):
    """A Hugging Face checkpoint lshmoe cannot use as it is (one line naming the file or tensor)."""


@dataclass(frozen=True, kw_only=True)
class Family:
    model_type: str  # config.json's "model_type"
    num_experts: str  # config attribute holding E
    d_expert: str  # config attribute holding each routed expert's hidden width
    # on-disk names of one expert's SwiGLU matrices (nn.Linear layout [out, in]): gate, up, down
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # on-disk name of the sparse block, when it differs from the module attribute `mlp`
    disk_block: str = "mlp"
    shared_name: str | None = None  # the shared expert MLP inside the block (gate_proj/up_proj/down_proj)
    shared_gate_name: str | None = None  # its sigmoid gate, a Linear(D, 1)
    routing: Callable[[Any], dict[str, Any]] = field(default=lambda c: {})  # MoEConfig fields from the config
    aux_coef: Callable[[Any], float] = field(default=lambda c: 0.0)  # transformers' aux loss coefficient


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


def family_for(model_type: str) -> Family:
    from lshmoe.hf import deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401 - register

    if model_type not in FAMILIES:
        raise HFError(
            f"model_type={model_type!r} is not a supported MoE family; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def softmax_aux(config: Any) -> float:
    """transformers adds router_aux_loss_coef * aux only when the config asks for the router logits."""
    return float(config.router_aux_loss_coef) if getattr(config, "output_router_logits", False) else 0.0
