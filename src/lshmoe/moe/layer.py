"""The expert-parallel MoE layer: the six steps of DESIGN.md §1, one call each.

    x_TD ─► router ─► capacity ─► permute ─► compress ─► dispatch ─► experts ─► combine ─► restore ─► unpermute ─► y_TD

T local tokens, D model width, E global experts, K experts per token, N routed rows (T*K minus
drops), M payload rows actually sent (N for the identity compressor, #buckets for LSH-MoE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lshmoe.compress.base import IDENTITY, Compressor
from lshmoe.compress.lsh import LSHCompressor, LSHMeta
from lshmoe.config import LSHConfig, MoEConfig
from lshmoe.dist.comm import Comm
from lshmoe.moe.capacity import capacity_keep_mask, expert_capacity
from lshmoe.moe.dispatch import build_dispatcher
from lshmoe.moe.experts import GroupedExperts
from lshmoe.moe.permute import permute_rows, sort_by_expert, unpermute_combine
from lshmoe.moe.router import TopKRouter


@dataclass(kw_only=True, slots=True)
class MoEOutput:
    y_TD: torch.Tensor
    aux: dict[str, torch.Tensor]  # unweighted router losses
    tokens_per_expert_E: torch.Tensor  # kept rows per global expert, from this rank (detached)
    dropped: torch.Tensor  # assignments dropped by the capacity limit on this rank (0-dim int64)
    rows_routed: int  # N
    rows_sent: int  # M
    stats: dict[str, float] = field(default_factory=dict)  # per-layer metrics (compressor, bytes saved)


def build_compressor(cfg: MoEConfig, lsh: LSHConfig | None, d_model: int, layer_id: int, seed: int) -> Compressor:
    if cfg.compress == "lsh":
        lsh = lsh or LSHConfig()
        ids = lsh.layer_ids()
        if ids is None or layer_id in ids:
            return LSHCompressor(lsh, cfg.num_experts, d_model, layer_id, seed)
    return IDENTITY


class MoELayer(nn.Module):
    """Top-k routed experts, sharded over the `ep` group of `comm`."""

    def __init__(self, cfg: MoEConfig, d_model: int, comm: Comm, layer_id: int, *, lsh: LSHConfig | None = None,
                 seed: int = 0):
        super().__init__()
        group = comm.group("ep")
        self.cfg, self.layer_id, self.comm, self.ep_group = cfg, layer_id, comm, group
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        num_local = cfg.num_experts // group.size
        self.router = TopKRouter(d_model, cfg.num_experts, cfg.top_k, jitter=cfg.jitter,
                                 normalize_weights=cfg.normalize_weights)
        self.experts = GroupedExperts(num_local, d_model, cfg.d_expert, cfg.activation,
                                      first_expert=group.index * num_local)
        self.compressor = build_compressor(cfg, lsh, d_model, layer_id, seed)
        self.dispatcher = build_dispatcher(comm, group, cfg.num_experts, tag=f"moe{layer_id}")
        self.lsh = lsh
        self.step = 0

    def set_step(self, step: int) -> None:
        """The training step (seeds LSH projections and schedules the restore-error probe)."""
        self.step = step
        if isinstance(self.compressor, LSHCompressor):
            self.compressor.set_step(step)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]
        compressor = self._active_compressor()

        route = self.router(x_TD)
        keep_TK = None
        if self.cfg.capacity_factor is not None:
            cap = expert_capacity(T, self.num_experts, self.top_k, self.cfg.capacity_factor)
            keep_TK = capacity_keep_mask(route.topk_ids_TK, route.topk_probs_TK, self.num_experts, cap)
        perm_N, counts_E = sort_by_expert(route.topk_ids_TK, self.num_experts, keep_TK)
        rows_ND = permute_rows(x_TD, perm_N, self.top_k)

        payload_MD, sent_counts_E, cmeta = compressor.compress(rows_ND, counts_E)
        dmeta = self.dispatcher.plan(sent_counts_E)
        local_rows = self.dispatcher.dispatch(payload_MD, dmeta)
        local_out = self.experts(local_rows, dmeta.local_counts)
        out_MD = self.dispatcher.combine(local_out, dmeta)
        out_ND = compressor.restore(out_MD, cmeta)

        y_TD = unpermute_combine(out_ND, perm_N, route.weights_TK, T)
        if isinstance(cmeta, LSHMeta) and self._probe_due():
            self._probe(compressor, cmeta)
        return MoEOutput(
            y_TD=y_TD.view(shape),
            aux=route.aux,
            tokens_per_expert_E=counts_E.detach(),
            dropped=torch.tensor(T * self.top_k - perm_N.numel()),
            rows_routed=rows_ND.shape[0],
            rows_sent=payload_MD.shape[0],
            stats=self._stats(compressor, counts_E, sent_counts_E, x_TD),
        )

    # ---------------------------------------------------------------------------- compression extras

    def _active_compressor(self) -> Compressor:
        if not self.training and self.lsh is not None and not self.lsh.eval_compress:
            return IDENTITY
        return self.compressor

    def _probe_every(self) -> int:
        if self.lsh is None:
            return 0
        needs = self.lsh.target == "error" or self.lsh.compensation == "calibrated"
        return self.lsh.probe_every or (10 if needs else 0)

    def _probe_due(self) -> bool:
        every = self._probe_every()
        return self.training and every > 0 and self.step % every == 0

    @torch.no_grad()
    def _probe(self, compressor: LSHCompressor, cmeta: LSHMeta) -> None:
        """Off the gradient path: evaluate the experts on sampled rows and their centroids (all ranks
        take part on the same steps; its exchanges are recorded in phase `metrics`)."""
        with self.comm.ledger.in_phase("metrics"):
            rows_PD, counts_E, ctx = compressor.probe_rows(cmeta)
            meta = self.dispatcher.plan(counts_E)
            out = self.experts(self.dispatcher.dispatch(rows_PD, meta), meta.local_counts)
            sums = compressor.probe_sums(self.dispatcher.combine(out, meta), rows_PD, ctx).to(self.comm.device)
            self.comm.all_reduce(sums, self.comm.group("world"), f"moe{self.layer_id}.probe")
            compressor.probe_update(sums.cpu(), ctx)

    def _stats(self, compressor: Compressor, counts_E: torch.Tensor, sent_E: torch.Tensor,
               x_TD: torch.Tensor) -> dict[str, float]:
        stats = {"rows_routed": float(counts_E.sum()), "rows_sent": float(sent_E.sum())}
        if compressor is IDENTITY:
            return stats
        W, me = self.ep_group.size, self.ep_group.index
        saved_W = (counts_E - sent_E).view(W, -1).sum(1)
        wire_rows = float(saved_W.sum() - saved_W[me])
        row_bytes = x_TD.shape[-1] * x_TD.element_size()
        # dispatch + combine each move the saved rows once per direction of the pass
        stats["a2a_saved_bytes_fwd"] = stats["a2a_saved_bytes_bwd"] = 2 * wire_rows * row_bytes
        stats.update(compressor.stats)
        return stats
