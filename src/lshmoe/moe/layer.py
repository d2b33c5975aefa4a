"""The expert-parallel MoE layer: the six steps of docs/design.md, one call each.

    x_TD ─► router ─► capacity ─► permute ─► compress ─► dispatch ─► experts ─► combine ─► restore ─► unpermute ─► y_TD

T local tokens, D model width, E global experts, K experts per token, N routed rows (T*K minus
drops), M payload rows actually sent (N for the identity compressor, #buckets for LSH-MoE).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lshmoe.compress.protocol import Compressor, Positions, Reduce, Stat
from lshmoe.compress.registry import CompressorContext, build_compressor
from lshmoe.config import Config, MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.distributed.tags import MoEOp, Tag
from lshmoe.moe.capacity import capacity_keep_mask, expert_capacity
from lshmoe.moe.dispatch import Dispatcher, DispatchMeta, Inflight, TokenRows, build_dispatcher
from lshmoe.moe.experts import GroupedExperts
from lshmoe.moe.permute import permute_rows, sort_by_expert, unpermute_combine
from lshmoe.moe.router import RouterOutput, RoutingOptions, TopKRouter
from lshmoe.moe.shared_experts import SharedExperts
from lshmoe.seeding import generator


@dataclass(kw_only=True, slots=True)
class MoEOutput:
    y_TD: torch.Tensor
    aux: dict[str, torch.Tensor]  # unweighted router losses
    tokens_per_expert_E: torch.Tensor  # kept rows per global expert, from this rank (detached)
    dropped: torch.Tensor  # assignments dropped by the capacity limit on this rank (0-dim int64)
    rows_routed: int  # N
    rows_sent: int  # M
    stats: dict[str, float] = field(default_factory=dict)  # per-layer metrics (compressor, bytes saved)
    reduce: dict[str, Reduce] = field(default_factory=dict)  # how each of `stats` reduces (default SUM)


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEState:
    """What the stages of one MoE call pass on (MoELayer.begin -> compute -> finish); each stage
    returns a new state with its own field filled: `received` (begin, synchronous), `combined`
    (compute, synchronous), or `inflight` (an exchange issued for the next stage to wait for)."""

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
    received: torch.Tensor | None = None  # rows for the local experts (expert-major)
    combined: torch.Tensor | None = None  # expert outputs back in payload order
    inflight: Inflight | None = None


class MoELayer(nn.Module):
    """Top-k routed experts, sharded over the `ep` group of `comm`.

    `settings` is the run's config tree (None = defaults): the layer reads `locmoe` (locality
    routing) and `lina` (micro-op pipelining), and hands it to its compressor, which reads its own
    section (e.g. `lsh`). `dispatcher` replaces the one `moe.a2a` selects (Lina's inference engine
    passes its replica dispatcher). `causal`: the layer sits in a causal LM (the model builder says
    so), so its compressor must never let a token's output depend on a later token of its sequence
    (`lsh.causal`)."""

    def __init__(
        self,
        cfg: MoEConfig,
        d_model: int,
        comm: Comm,
        layer_id: int,
        *,
        settings: Config | None = None,
        seed: int = 0,
        dispatcher: Dispatcher | None = None,
        causal: bool = False,
    ):
        super().__init__()
        group = comm.group("ep")
        self.cfg, self.layer_id, self.comm, self.ep_group = cfg, layer_id, comm, group
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        num_local = cfg.num_experts // group.size
        settings = settings or Config()
        loc, lina = settings.locmoe, settings.lina
        self.router = TopKRouter(
            d_model,
            cfg.num_experts,
            cfg.top_k,
            jitter=cfg.jitter,
            normalize_weights=cfg.normalize_weights,
            gate=cfg.router,
            node_bias=loc.node_bias,
            options=RoutingOptions.from_config(cfg),
        )
        # Which node hosts each global expert: expert e lives on EP rank e // num_local.
        self.node_of_E = torch.tensor(
            [comm.node_of.get(group.ranks[e // num_local], 0) for e in range(cfg.num_experts)]
        )
        self.my_node = comm.node_of.get(comm.rank, 0)
        self.router.set_topology(self.node_of_E, self.my_node, loc.node_limit, locality=loc.locality_weight > 0)
        self.experts = GroupedExperts(
            num_local, d_model, cfg.d_expert, cfg.activation, first_expert=group.index * num_local, bias=cfg.expert_bias
        )
        self.shared = None
        if cfg.shared_experts:
            d_shared = cfg.d_shared or cfg.d_expert
            self.shared = SharedExperts(d_model, d_shared, cfg.shared_experts, cfg.shared_gate)
        ctx = CompressorContext(
            cfg.num_experts,
            d_model,
            layer_id,
            seed,
            settings,
            node_of_E=tuple(self.node_of_E.tolist()),
            my_node=self.my_node,
            ep_size=group.size,
            ep_index=group.index,
            link=self._link_sample,
            log=self._log,
            causal=causal,
        )
        self.compressor = build_compressor(cfg.compress, ctx)
        self.identity = build_compressor("identity", ctx)
        self.dispatcher = dispatcher or build_dispatcher(
            comm, group, cfg.num_experts, layer_id, kind=cfg.a2a, chunks=lina.a2a_chunks
        )
        self.split = cfg.split
        self.step = 0
        self.exact = False  # True: the compressor is bypassed (exact evaluation, train/evaluate.py)

    def reset_parameters(self, seed: int = 0, std: float = 0.02, out_std: float | None = None) -> None:
        """Initialise independently of the parallel layout: the router from one (seed, layer)
        generator (identical on every rank), each expert from its (seed, layer, global id) one, so a
        layer built on W ranks computes the same function as on one. `out_std` scales the experts'
        output projections (default `std`); a per-node bias starts at zero."""
        with torch.no_grad():
            w = getattr(self.router, "weight", None)
            if isinstance(w, nn.Parameter):
                g = generator(seed, "router", self.layer_id)
                w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float64).mul_(std))
            if self.router.node_bias is not None:
                self.router.node_bias.zero_()
            if self.router.e_score_correction_bias is not None:
                self.router.e_score_correction_bias.zero_()
            if self.shared is not None:
                g = generator(seed, "shared", self.layer_id)
                for p in self.shared.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul_(std))
        self.experts.reset_parameters(seed, self.layer_id, std, std if out_std is None else out_std)

    def set_step(self, step: int) -> None:
        """The training step (seeds the compressor's randomness and schedules its probe)."""
        self.step = step
        self.compressor.set_step(step)

    def forward(self, x: torch.Tensor, route: RouterOutput | None = None) -> MoEOutput:
        if self.split != "none" and self.training and not self.exact and self.compressor.active(True):
            return self._split_forward(x, route)
        if self.shared is None:
            return self.finish(self.compute(self.begin(x, route)))
        st = self.begin(x, route, overlap=True)  # the shared experts run while the dispatch travels
        shared_TD = self.shared(st.x_TD)
        out = self.finish(self.compute(st))
        out.y_TD = out.y_TD + shared_TD.view(st.shape)
        return out

    def _split_forward(self, x: torch.Tensor, route: RouterOutput | None) -> MoEOutput:
        """`moe.split` (analysis): the layer runs once compressed and once exact on the same routing and
        returns the values of one path with the gradients of the other, so a quality gap can be pinned
        on the forward values (split=forward: compressed values, exact gradients) or on the gradients
        (split=backward). Twice the all-to-alls forward; the backward ones of the path giving gradients."""
        if route is None:
            route = self.router(x.reshape(-1, x.shape[-1]), seq_len=x.shape[-2] if x.dim() == 3 else None)
        lossy = self.finish(self.compute(self.begin(x, route, compressor=self.compressor)))
        exact = self.finish(self.compute(self.begin(x, route, compressor=self.identity)))
        if self.split == "forward":
            y = exact.y_TD + (lossy.y_TD - exact.y_TD).detach()
        else:
            y = lossy.y_TD + (exact.y_TD - lossy.y_TD).detach()
        if self.shared is not None:
            y = y + self.shared(x.reshape(-1, x.shape[-1])).view(x.shape)
        return replace(lossy, y_TD=y)

    # The same six steps in three stages, so that a caller can overlap the exchanges with its own
    # dense work (ScMoE): begin issues the dispatch, compute runs the experts and issues the combine,
    # finish waits for it and restores. With overlap=False every exchange completes inside its stage.

    def begin(
        self,
        x: torch.Tensor,
        route: RouterOutput | None = None,
        overlap: bool = False,
        compressor: Compressor | None = None,
    ) -> MoEState:
        """Route, drop, permute, compress, exchange counts, start the dispatch (`compressor`: this
        call's, instead of the layer's own when active)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        kind = x_TD.device.type
        if torch.is_autocast_enabled(kind):  # mixed precision: the payload travels in the compute dtype
            x_TD = x_TD.to(torch.get_autocast_dtype(kind))
        if compressor is None:
            lossy = not self.exact and self.compressor.active(self.training)
            compressor = self.compressor if lossy else self.identity
        route = route if route is not None else self.router(x_TD, seq_len=shape[-2] if x.dim() == 3 else None)
        perm_N, counts_E, rows_ND = self.group_rows(x_TD, route)
        at = None
        if compressor.needs_positions and x.dim() == 3:  # x is [batch, seq, dim]: where each row's token sits
            token_N = perm_N // route.topk_ids_TK.shape[-1]
            at = Positions(seq_N=token_N // shape[-2], pos_N=token_N % shape[-2])
        payload_MD, sent_counts_E, cmeta = compressor.compress(rows_ND, counts_E, at)
        dmeta = self.dispatcher.plan(sent_counts_E, self._token_rows(compressor, route, perm_N), compressor.wires())
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
        if overlap:
            return replace(st, inflight=self.dispatcher.dispatch_start(payload_MD, dmeta))
        return replace(st, received=self.dispatcher.dispatch(payload_MD, dmeta))

    def group_rows(self, x_TD: torch.Tensor, route: RouterOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drop over capacity and permute: (perm_N, counts_E, rows_ND), the rows grouped by destination
        expert (expert-major, `counts_E[e]` rows for global expert e), as the compressor receives them."""
        keep_TK = None
        if self.cfg.capacity_factor is not None:
            cap = expert_capacity(x_TD.shape[0], self.num_experts, self.top_k, self.cfg.capacity_factor)
            keep_TK = capacity_keep_mask(route.topk_ids_TK, route.topk_probs_TK, self.num_experts, cap)
        perm_N, counts_E = sort_by_expert(route.topk_ids_TK, self.num_experts, keep_TK)
        return perm_N, counts_E, permute_rows(x_TD, perm_N, route.topk_ids_TK.shape[-1])

    def compute(self, st: MoEState) -> MoEState:
        """Wait for the dispatch, run the local experts, start the combine."""
        d = self.dispatcher
        received = d.dispatch_wait(st.inflight, st.dmeta) if st.overlap else st.received
        local_out = d.run_experts(self.experts, received, st.dmeta)
        if st.overlap:
            return replace(st, received=None, inflight=d.combine_start(local_out, st.dmeta))
        return replace(st, received=None, combined=d.combine(local_out, st.dmeta))

    def finish(self, st: MoEState) -> MoEOutput:
        """Wait for the combine, restore every row, combine with the gate weights."""
        out_MD = self.dispatcher.combine_wait(st.inflight, st.dmeta) if st.overlap else st.combined
        out_ND = st.compressor.restore(out_MD, st.cmeta)
        T = st.x_TD.shape[0]
        # a dispatcher that weighted the rows on the experts' side (dedup) hands back weighted sums
        w_TK = torch.ones_like(st.route.weights_TK) if st.dmeta.weighted else st.route.weights_TK
        y_TD = unpermute_combine(out_ND, st.perm_N, w_TK, T)
        if st.compressor.probe_due(self.training):
            self._probe(st.compressor, st.cmeta)
        K = st.route.topk_ids_TK.shape[-1]
        stats, reduce = self._stats(st.compressor, st.counts_E, st.sent_counts_E, st.x_TD)
        return MoEOutput(
            y_TD=y_TD.view(st.shape),
            aux=st.route.aux,
            tokens_per_expert_E=st.counts_E.detach(),
            dropped=torch.tensor(T * K - st.perm_N.numel()),
            rows_routed=st.rows,
            rows_sent=st.payload_rows,
            stats=stats,
            reduce=reduce,
        )

    @staticmethod
    def _token_rows(compressor: Compressor, route: RouterOutput, perm_N: torch.Tensor) -> TokenRows | None:
        """The token and gate weight of each payload row, when the payload rows are token copies."""
        if not compressor.rows_are_tokens:
            return None
        K = route.topk_ids_TK.shape[-1]
        return TokenRows(token_M=perm_N // K, weight_M=route.weights_TK.reshape(-1).index_select(0, perm_N))

    # ---------------------------------------------------------------------------- compression extras

    def _link_sample(self) -> tuple[float, float, int, float]:
        """This layer's forward exchanges so far in this step, from the ledger: (wire bytes and seconds
        of its dispatch and combine, how many of them, seconds of its count exchange: a few bytes, so
        latency plus the ranks' skew)."""
        nbytes = seconds = counts_s = 0.0
        exchanges = 0
        for r in self.comm.ledger.records:
            t = Tag(r.tag)
            if r.phase != "forward" or t.layer != self.layer_id:
                continue
            if t.op == MoEOp.COUNTS:
                counts_s += r.seconds
            elif t.op in (MoEOp.DISPATCH, MoEOp.COMBINE):
                nbytes, seconds, exchanges = nbytes + r.wire_send_bytes, seconds + r.seconds, exchanges + 1
        return nbytes, seconds, exchanges, counts_s

    def _log(self, msg: str) -> None:
        if self.comm.rank == 0:
            print(f"[lshmoe] {msg}", file=sys.stderr, flush=True)

    @torch.no_grad()
    def _probe(self, compressor: Compressor, cmeta: object) -> None:
        """The compressor's off-path measurement: the experts evaluated exactly on rows it picks,
        through the same dispatcher (every rank takes part on the same steps; its exchanges are
        recorded in phase `metrics`)."""
        d, comm = self.dispatcher, self.comm

        def evaluate(rows_PD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
            meta = d.plan(counts_E)
            return d.combine(d.run_experts(self.experts, d.dispatch(rows_PD, meta), meta), meta)

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            t = t.to(comm.device)
            comm.all_reduce(t, comm.group("world"), Tag.moe(self.layer_id, MoEOp.PROBE))
            return t

        with comm.ledger.in_phase("metrics"):
            compressor.probe(cmeta, evaluate, all_reduce)

    def _stats(
        self, compressor: Compressor, counts_E: torch.Tensor, sent_E: torch.Tensor, x_TD: torch.Tensor
    ) -> tuple[dict[str, float], dict[str, Reduce]]:
        stats = {"rows_routed": float(counts_E.sum()), "rows_sent": float(sent_E.sum())}
        if int(self.node_of_E.max()) > 0:  # several nodes: how much of the routing stays on this one
            stats["rows_local"] = float(counts_E.cpu()[self.node_of_E == self.my_node].sum())
        if compressor is self.identity:
            return stats, {}
        W, me = self.ep_group.size, self.ep_group.index
        saved_W = (counts_E - sent_E).view(W, -1).sum(1)
        wire_rows = float(saved_W.sum() - saved_W[me])
        row_bytes = x_TD.shape[-1] * x_TD.element_size()
        # dispatch + combine each move the saved rows once per direction of the pass
        stats["a2a_saved_bytes_fwd"] = stats["a2a_saved_bytes_bwd"] = 2 * wire_rows * row_bytes
        comp: dict[str, Stat] = compressor.stats
        stats.update({k: s.value for k, s in comp.items()})
        return stats, {k: s.reduce for k, s in comp.items()}
