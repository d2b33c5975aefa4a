"""GPT-MoE: a decoder-only language model whose every n-th block is an expert-parallel MoE layer.

Token and learned position embeddings, pre-norm blocks, a final norm, and an output head tied to the
token embedding. Block i holds an MoE layer when (i + 1) % moe_every == 0, so `moe_every=2` makes
blocks 1, 3, 5, ... MoE (the GShard/Switch alternation).

Initialisation is reproducible and independent of the expert-parallel size: dense weights come from
one generator seeded by `seed`, expert weights from per-expert generators (see `moe/experts.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lshmoe.config import Config, ModelConfig, MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.models.blocks import MLP, Block, make_norm
from lshmoe.models.scmoe import SharedExpertBlock, ShortcutPair
from lshmoe.moe.layer import MoELayer, MoEOutput
from lshmoe.moe.param_kinds import is_expert_param
from lshmoe.seeding import generator

INIT_STD = 0.02


@dataclass(kw_only=True, slots=True)
class LMOutput:
    logits_BSV: torch.Tensor
    loss: torch.Tensor | None  # cross-entropy + weighted router losses (what to backpropagate)
    ce_loss: torch.Tensor | None  # the language-model loss alone
    aux_loss: torch.Tensor  # weighted sum of every MoE layer's router losses
    moe: dict[int, MoEOutput]  # per MoE layer id (the index of its block)


def build_units(
    mcfg: ModelConfig, ecfg: MoEConfig, comm: Comm, moe_factory: MoEFactory, settings: Config, seed: int
) -> list[nn.Module]:
    """The model's blocks for `mcfg.arch`; each unit maps x -> (x, MoEOutput or None) and has `layer_id`."""
    D, units = mcfg.d_model, []
    sc = settings.scmoe
    if mcfg.arch in ("scmoe", "dgmoe"):
        pair = mcfg.moe_every == 2
        for i in range(1 if pair else 0, mcfg.n_layers, mcfg.moe_every):
            units.append(
                ShortcutPair(
                    mcfg,
                    ecfg,
                    comm,
                    i,
                    with_mlp_block=pair,
                    arch=mcfg.arch,
                    shortcut=sc.shortcut,
                    combine=sc.combine,
                    overlap=sc.overlap,
                    slot=sc.expert_slot,
                    warmup=sc.slot_warmup,
                    settings=settings,
                    seed=seed,
                )
            )
        return units
    moe_ids = set(mcfg.moe_block_ids())
    for i in range(mcfg.n_layers):
        if i not in moe_ids:
            unit: nn.Module = Block(
                D, mcfg.n_heads, MLP(D, int(round(mcfg.mlp_ratio * D))), mcfg.norm, mcfg.dropout, is_moe=False
            )
        elif mcfg.arch == "shared":
            unit = SharedExpertBlock(mcfg, ecfg, comm, i, combine=sc.combine, settings=settings, seed=seed)
        else:
            unit = Block(
                D,
                mcfg.n_heads,
                moe_factory(ecfg, D, comm, i, settings=settings, seed=seed, causal=True),
                mcfg.norm,
                mcfg.dropout,
                is_moe=True,
            )
        unit.layer_id = i
        units.append(unit)
    return units


MoEFactory = Callable[..., nn.Module]  # (moe cfg, d_model, comm, layer_id, *, settings, seed, causal) -> layer


class GPTMoE(nn.Module):
    """`moe_factory(cfg, d_model, comm, layer_id)` builds each MoE layer (default `MoELayer`); it is the
    seam through which benchmarks put a peer system's layer into the same model."""

    def __init__(
        self,
        mcfg: ModelConfig,
        ecfg: MoEConfig,
        vocab_size: int,
        comm: Comm,
        moe_factory: MoEFactory = MoELayer,
        *,
        settings: Config | None = None,
        seed: int = 0,
    ):
        super().__init__()
        settings = settings or Config()
        self.mcfg, self.ecfg, self.vocab_size = mcfg, ecfg, vocab_size
        self.locmoe = settings.locmoe
        self.my_node = comm.node_of.get(comm.rank, 0)  # keys the per-node parameters in checkpoints
        D = mcfg.d_model
        self.tok_emb = nn.Embedding(vocab_size, D)
        self.pos_emb = nn.Embedding(mcfg.seq_len, D)
        self.drop = nn.Dropout(mcfg.dropout)
        self.blocks = nn.ModuleList(build_units(mcfg, ecfg, comm, moe_factory, settings, seed))
        self.norm_f = make_norm(mcfg.norm, D)
        self.moe_ids = [u.layer_id for u in self.blocks if u.is_moe]

    @property
    def moe_layers(self) -> list[nn.Module]:
        """Every MoE layer of the model (lshmoe's own layers; a peer's layer is listed too)."""
        return [m for m in self.modules() if isinstance(m, MoELayer)] or [
            getattr(u, "ffn", u) for u in self.blocks if u.is_moe
        ]

    def set_step(self, step: int) -> None:
        """Tell every MoE layer the training step (compressors key their randomness and probes by it)."""
        for layer in self.moe_layers:
            if hasattr(layer, "set_step"):
                layer.set_step(step)

    def reset_parameters(self, seed: int) -> None:
        """GPT-2 style: N(0, 0.02) matrices, residual projections scaled by 1/sqrt(2 * layers)."""
        g = generator(seed, "dense")
        out_std = INIT_STD / math.sqrt(2 * self.mcfg.n_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if is_expert_param(p):
                    continue
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name:
                    p.fill_(1.0)
                else:
                    std = out_std if name.endswith("proj.weight") else INIT_STD
                    p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
            for layer in self.moe_layers:
                if isinstance(layer, MoELayer):
                    layer.experts.reset_parameters(seed, layer.layer_id, INIT_STD, out_std)

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> LMOutput:
        B, S = idx_BS.shape
        pos = torch.arange(S, device=idx_BS.device)
        x = self.drop(self.tok_emb(idx_BS) + self.pos_emb(pos))
        moe: dict[int, MoEOutput] = {}
        for unit in self.blocks:
            x, out = unit(x)
            if out is not None:
                moe[unit.layer_id] = out
        logits = F.linear(self.norm_f(x), self.tok_emb.weight)
        wide = logits if logits.dtype == torch.float64 else logits.float()
        e = self.ecfg
        aux = sum(
            (
                e.aux_loss_weight * o.aux["load_balance"]
                + e.z_loss_weight * o.aux["z_loss"]
                + self.locmoe.locality_weight * o.aux.get("locality", 0.0)
                + e.seq_aux_weight * o.aux.get("seq_load_balance", 0.0)
                for o in moe.values()
            ),
            start=wide.new_zeros(()),
        )
        ce = loss = None
        if targets_BS is not None:
            ce = F.cross_entropy(wide.view(-1, self.vocab_size), targets_BS.reshape(-1))
            loss = ce + aux
        return LMOutput(logits_BSV=logits, loss=loss, ce_loss=ce, aux_loss=aux, moe=moe)
