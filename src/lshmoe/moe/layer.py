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
from lshmoe.config import ConfigError, LSHConfig, MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.moe.capacity import capacity_keep_mask, expert_capacity
from lshmoe.moe.dispatch import AllToAllDispatcher, DispatchMeta, Inflight, build_dispatcher
from lshmoe.moe.experts import GroupedExperts
from lshmoe.moe.permute import permute_rows, sort_by_expert, unpermute_combine
from lshmoe.moe.pipeline import pipelined_exchange
from lshmoe.moe.router import RouterOutput, RoutingOptions, TopKRouter
from lshmoe.moe.shared_experts import SharedExperts


@dataclass(kw_only=True, slots=True)
class MoEOutput:
    y_TD: torch.Tensor
    aux: dict[str, torch.Tensor]  # unweighted router losses
    tokens_per_expert_E: torch.Tensor  # kept rows per global expert, from this rank (detached)
    dropped: torch.Tensor  # assignments dropped by the capacity limit on this rank (0-dim int64)
    rows_routed: int  # N
    rows_sent: int  # M
    stats: dict[str, float] = field(default_factory=dict)  # per-layer metrics (compressor, bytes saved)


@dataclass(kw_only=True, slots=True)
class MoEState:
    """What the stages of one MoE call pass on (see MoELayer.begin / compute / finish)."""

    shape: torch.Size
    x_TD: torch.Tensor
    route: RouterOutput
    perm_N: torch.Tensor
    counts_E: torch.Tensor
    rows: int
    sent_counts_E: torch.Tensor
    payload_rows: int
    compressor: Compressor
    cmeta: object
    dmeta: DispatchMeta
    overlap: bool
    inflight: Inflight | None = None
    data: torch.Tensor | None = None


def build_compressor(cfg: MoEConfig, lsh: LSHConfig | None, d_model: int, layer_id: int, seed: int) -> Compressor:
    if cfg.compress == "lsh":
        lsh = lsh or LSHConfig()
        ids = lsh.layer_ids()
        if ids is None or layer_id in ids:
            return LSHCompressor(lsh, cfg.num_experts, d_model, layer_id, seed)
    return IDENTITY


class MoELayer(nn.Module):
    """Top-k routed experts, sharded over the `ep` group of `comm`."""

    def __init__(
        self, cfg: MoEConfig, d_model: int, comm: Comm, layer_id: int, *, lsh: LSHConfig | None = None, seed: int = 0
    ):
        super().__init__()
        group = comm.group("ep")
        self.cfg, self.layer_id, self.comm, self.ep_group = cfg, layer_id, comm, group
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        num_local = cfg.num_experts // group.size
        self.router = TopKRouter(
            d_model,
            cfg.num_experts,
            cfg.top_k,
            jitter=cfg.jitter,
            normalize_weights=cfg.normalize_weights,
            gate=cfg.router,
            node_bias=cfg.node_bias,
            options=RoutingOptions.from_config(cfg),
        )
        # Which node hosts each global expert: expert e lives on EP rank e // num_local.
        self.node_of_E = torch.tensor(
            [comm.node_of.get(group.ranks[e // num_local], 0) for e in range(cfg.num_experts)]
        )
        self.my_node = comm.node_of.get(comm.rank, 0)
        per_node = cfg.num_experts // (int(self.node_of_E.max()) + 1)
        if cfg.node_limit and cfg.node_limit < int(self.node_of_E.max()) + 1 and cfg.node_limit * per_node < cfg.top_k:
            raise ConfigError(
                f"moe.node_limit={cfg.node_limit} nodes hold {cfg.node_limit * per_node} experts, fewer "
                f"than moe.top_k={cfg.top_k}; raise node_limit to >= {-(-cfg.top_k // per_node)}"
            )
        self.router.set_topology(self.node_of_E, self.my_node, cfg.node_limit, locality=cfg.locality_weight > 0)
        self.experts = GroupedExperts(
            num_local, d_model, cfg.d_expert, cfg.activation, first_expert=group.index * num_local
        )
        self.shared = None
        if cfg.shared_experts:
            d_shared = cfg.d_shared or cfg.d_expert
            self.shared = SharedExperts(d_model, d_shared, cfg.shared_experts, cfg.shared_gate)
        self.compressor = build_compressor(cfg, lsh, d_model, layer_id, seed)
        self.dispatcher = build_dispatcher(comm, group, cfg.num_experts, tag=f"moe{layer_id}", kind=cfg.a2a)
        self.lsh = lsh
        self.step = 0

    def set_step(self, step: int) -> None:
        """The training step (seeds LSH projections and schedules the restore-error probe)."""
        self.step = step
        if isinstance(self.compressor, LSHCompressor):
            self.compressor.set_step(step)

    def forward(self, x: torch.Tensor, route: RouterOutput | None = None) -> MoEOutput:
        if self.shared is None:
            return self.finish(self.compute(self.begin(x, route)))
        st = self.begin(x, route, overlap=True)  # the shared experts run while the dispatch travels
        shared_TD = self.shared(st.x_TD)
        out = self.finish(self.compute(st))
        out.y_TD = out.y_TD + shared_TD.view(st.shape)
        return out

    # The same six steps in three stages, so that a caller can overlap the exchanges with its own
    # dense work (ScMoE): begin issues the dispatch, compute runs the experts and issues the combine,
    # finish waits for it and restores. With overlap=False every exchange completes inside its stage.

    def begin(self, x: torch.Tensor, route: RouterOutput | None = None, overlap: bool = False) -> MoEState:
        """Route, drop, permute, compress, exchange counts, start the dispatch."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]
        compressor = self._active_compressor()
        route = route if route is not None else self.router(x_TD, seq_len=shape[-2] if x.dim() == 3 else None)
        keep_TK = None
        if self.cfg.capacity_factor is not None:
            cap = expert_capacity(T, self.num_experts, self.top_k, self.cfg.capacity_factor)
            keep_TK = capacity_keep_mask(route.topk_ids_TK, route.topk_probs_TK, self.num_experts, cap)
        perm_N, counts_E = sort_by_expert(route.topk_ids_TK, self.num_experts, keep_TK)
        rows_ND = permute_rows(x_TD, perm_N, route.topk_ids_TK.shape[-1])
        payload_MD, sent_counts_E, cmeta = compressor.compress(rows_ND, counts_E)
        dmeta = self.dispatcher.plan(sent_counts_E)
        st = MoEState(
            shape=shape,
            x_TD=x_TD,
            route=route,
            perm_N=perm_N,
            counts_E=counts_E,
            rows=rows_ND.shape[0],
            sent_counts_E=sent_counts_E,
            payload_rows=payload_MD.shape[0],
            compressor=compressor,
            cmeta=cmeta,
            dmeta=dmeta,
            overlap=overlap,
        )
        if self._pipelined():
            st.data = payload_MD  # dispatched piece by piece in compute()
        elif overlap:
            st.inflight = self.dispatcher.dispatch_start(payload_MD, dmeta)
        else:
            st.data = self.dispatcher.dispatch(payload_MD, dmeta)
        return st

    def _pipelined(self) -> bool:
        return self.cfg.a2a_chunks > 1 and isinstance(self.dispatcher, AllToAllDispatcher)

    def compute(self, st: MoEState) -> MoEState:
        """Wait for the dispatch, run the local experts, start the combine."""
        if self._pipelined():
            st.data = pipelined_exchange(
                st.data,
                st.dmeta.send_WG,
                st.dmeta.recv_WG,
                self.experts,
                self.comm,
                self.ep_group,
                f"moe{self.layer_id}",
                self.cfg.a2a_chunks,
            )
            st.overlap = False
            return st
        local_rows = self.dispatcher.dispatch_wait(st.inflight, st.dmeta) if st.overlap else st.data
        local_out = self.experts(local_rows, st.dmeta.local_counts)
        if st.overlap:
            st.inflight = self.dispatcher.combine_start(local_out, st.dmeta)
        else:
            st.data = self.dispatcher.combine(local_out, st.dmeta)
        return st

    def finish(self, st: MoEState) -> MoEOutput:
        """Wait for the combine, restore every row, combine with the gate weights."""
        out_MD = self.dispatcher.combine_wait(st.inflight, st.dmeta) if st.overlap else st.data
        out_ND = st.compressor.restore(out_MD, st.cmeta)
        T = st.x_TD.shape[0]
        y_TD = unpermute_combine(out_ND, st.perm_N, st.route.weights_TK, T)
        if isinstance(st.cmeta, LSHMeta) and self._probe_due():
            self._probe(st.compressor, st.cmeta)
        K = st.route.topk_ids_TK.shape[-1]
        return MoEOutput(
            y_TD=y_TD.view(st.shape),
            aux=st.route.aux,
            tokens_per_expert_E=st.counts_E.detach(),
            dropped=torch.tensor(T * K - st.perm_N.numel()),
            rows_routed=st.rows,
            rows_sent=st.payload_rows,
            stats=self._stats(st.compressor, st.counts_E, st.sent_counts_E, st.x_TD),
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

    def _stats(
        self, compressor: Compressor, counts_E: torch.Tensor, sent_E: torch.Tensor, x_TD: torch.Tensor
    ) -> dict[str, float]:
        stats = {"rows_routed": float(counts_E.sum()), "rows_sent": float(sent_E.sum())}
        if int(self.node_of_E.max()) > 0:  # several nodes: how much of the routing stays on this one
            stats["rows_local"] = float(counts_E.cpu()[self.node_of_E == self.my_node].sum())
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
