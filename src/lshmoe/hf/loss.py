"""The training loss of a converted model, as transformers defines it for the family.

    loss = CE(logits, targets) + coef * aux
    aux  = E * sum_e f_e * P_e, pooled over every MoE layer and token (transformers concatenates the
           layers' router logits): f_e = (assignments to e) / (T * L), P_e = mean router probability
    coef = router_aux_loss_coef when the config sets output_router_logits (else 0; DeepSeek-V3: 0)

It is K times lshmoe's per-layer load-balance loss for one layer (f over tokens, not assignments).
The routers' own losses (sequence-level, z-loss) are added with the MoEConfig weights when set.
An upcycled BERT (hf/upcycle.py) trains on the same loss: targets are the masked-LM labels and coef
is moe.aux_loss_weight (a dense checkpoint has no router_aux_loss_coef).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lshmoe.hf.model import moe_blocks


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pooled_aux(model: nn.Module) -> torch.Tensor:
    """transformers' load_balancing_loss_func over the last forward's routing of every MoE block."""
    blocks = [b for _, b in moe_blocks(model)]
    E = model.moe_cfg.num_experts
    counts_E, probs_E, rows = None, None, 0
    for b in blocks:
        r = b.last_route
        c = torch.bincount(r.topk_ids_TK.reshape(-1), minlength=E).to(r.probs_TE.dtype)
        p = r.probs_TE.sum(0)
        counts_E = c if counts_E is None else counts_E + c
        probs_E = p if probs_E is None else probs_E + p
        rows += r.probs_TE.shape[0]
    if not rows:
        return torch.zeros((), device=_device(model))
    return E * ((counts_E / rows) * (probs_E / rows)).sum()


def router_losses(model: nn.Module) -> torch.Tensor:
    """The MoEConfig-weighted sequence-level and z losses of every block (zero unless configured)."""
    cfg = model.moe_cfg
    total = torch.zeros((), device=_device(model))
    for _, b in moe_blocks(model):
        aux = b.last_route.aux
        total = total + cfg.z_loss_weight * aux["z_loss"] + cfg.seq_aux_weight * aux.get("seq_load_balance", 0.0)
    return total


def lm_loss(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward `input_ids` [B, S]; `targets` [B, S] are the tokens to predict at each position (-100:
    ignored): the next tokens for a causal LM, the masked-out tokens for a masked LM (hf/mlm.py).
    Returns loss, ce, aux (unweighted), logits."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(torch.float32 if logits.dtype != torch.float64 else logits.dtype),
        targets.reshape(-1),
    )
    coef = model.moe_cfg.aux_loss_weight
    aux = pooled_aux(model) if moe_blocks(model) else ce * 0
    extra = router_losses(model)
    return {"loss": ce + coef * aux + extra, "ce": ce, "aux": aux, "logits": logits}
