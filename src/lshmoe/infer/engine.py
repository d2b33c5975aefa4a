"""Inference with Lina's placement: a trained GPT-MoE whose every rank holds every expert.

The model is built as if expert parallelism had size 1 (each MoE layer holds all E experts, so a
checkpoint, which stores experts per global id, loads whole on every rank), then each MoE layer's
dispatcher is a `ReplicaDispatcher` over the world group driven by the `TwoPhaseScheduler`:

    block i's pre-hook: phase 1 (this rank's popularity estimate from its tokens' paths)
    MoE layer i:        gate -> plan = phase 2 (sum estimate + actual counts over ranks, compare, maybe re-plan)
                        -> count exchange -> dispatch to replicas -> experts (timed) -> combine
                        -> record top-1 ids (the next layers' paths), rows computed, wall time

Every rank scores its own sequences (data parallel); the outputs are identical to unreplicated
inference because a replica computes the same expert on the same rows, and combine returns every
row to its place before the gate weights are applied.

`InferenceEngine.profile(batches)` records top-1 routing on training batches (uniform placement),
gathers it from every rank and builds the same `PathProfile` everywhere. `score(x, y)` runs one
batch and returns the model output and the batch's `BatchMetrics`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lshmoe.config import DTYPES, Config, InferConfig, MoEConfig, from_dict, validate_inference
from lshmoe.distributed.comm import Comm, Group
from lshmoe.infer.dispatch import ReplicaDispatcher
from lshmoe.infer.metrics import BatchMetrics
from lshmoe.infer.profile import PathProfile, build_profile
from lshmoe.infer.scheduler import TwoPhaseScheduler
from lshmoe.infer.servable import check_servable
from lshmoe.models.gpt import GPTMoE, LMOutput
from lshmoe.moe.layer import MoELayer, MoEOutput
from lshmoe.train import checkpoint as ckpt


def expert_local_view(comm: Comm) -> Comm:
    """The same rank, groups and ledger, but an expert-parallel group of this rank alone, so that a
    model built with it holds every expert of every MoE layer."""
    groups = {**comm.groups, "ep": Group("ep", (comm.rank,), 0, None)}
    view = Comm(comm.rank, comm.world_size, groups, comm.ledger, comm.device, comm.node_of)
    view.watchdog = comm.watchdog
    return view


@dataclass(frozen=True, slots=True)
class Serving:
    """What every MoE layer of a served model shares: the world it dispatches over, the two-phase
    scheduler, and each layer id's index among the MoE layers."""

    world: Comm
    scheduler: TwoPhaseScheduler
    index_of: dict[int, int]


class LinaMoELayer(MoELayer):
    """`MoELayer` with all experts local and, from construction, a replica dispatcher over the
    serving world (source-major: one matmul per source, so each row gets an unreplicated forward's
    arithmetic); records every call's routing and timing with the scheduler. The layer's stages run
    here one by one (begin, experts, combine, finish: `MoELayer.compute` without its overlap branch),
    so that the expert computation is timed by its caller and no call leaves state on the dispatcher."""

    def __init__(self, cfg: MoEConfig, d_model: int, comm: Comm, layer_id: int, *, serving: Serving, **layer_kw):
        index, world = serving.index_of[layer_id], serving.world
        policy = serving.scheduler.policy(index)
        replicas = ReplicaDispatcher(world, world.group("world"), cfg.num_experts, layer_id, policy, source_major=True)
        super().__init__(cfg, d_model, comm, layer_id, dispatcher=replicas, **layer_kw)
        assert self.experts.num_local == cfg.num_experts, "build with expert_local_view(comm)"
        self.index, self.scheduler, self.replicas = index, serving.scheduler, replicas

    def forward(self, x: torch.Tensor) -> MoEOutput:
        t0 = time.perf_counter()
        st = self.begin(x)
        c0 = time.process_time()
        out_RD = self.replicas.run_experts(self.experts, st.received, st.dmeta)
        if out_RD.is_cuda:
            torch.cuda.synchronize(out_RD.device)
        compute_s = time.process_time() - c0
        out = self.finish(replace(st, received=None, combined=self.replicas.combine(out_RD, st.dmeta)))
        if out.y_TD.is_cuda:
            torch.cuda.synchronize(out.y_TD.device)
        self.scheduler.routed(
            self.index, st.route.topk_ids_TK, sum(st.dmeta.local_counts), time.perf_counter() - t0, compute_s
        )
        return out


class InferenceEngine:
    """A GPT-MoE for inference with per-batch expert placement (see the module docstring)."""

    def __init__(self, cfg: Config, comm: Comm, vocab_size: int, icfg: InferConfig | None = None):
        icfg = icfg or cfg.infer
        validate_inference(cfg)
        self.cfg, self.comm, self.icfg = cfg, comm, icfg
        ecfg = dataclasses.replace(cfg.moe, compress="identity", ep_size=0)
        m = cfg.model
        moe_ids = m.moe_block_ids()
        self.scheduler = TwoPhaseScheduler(
            comm,
            ecfg.num_experts,
            len(moe_ids),
            placement=icfg.placement,
            estimate_top_k=icfg.estimate_top_k,
            match_k=icfg.match_k,
            ordered_match=icfg.ordered_match,
        )
        serving = Serving(comm, self.scheduler, {lid: i for i, lid in enumerate(moe_ids)})
        factory = functools.partial(LinaMoELayer, serving=serving)
        self.model = GPTMoE(m, ecfg, vocab_size, expert_local_view(comm), factory, seed=cfg.train.seed)
        self.model.to(device=comm.device, dtype=DTYPES[icfg.dtype or cfg.train.dtype])
        self.model.reset_parameters(cfg.train.seed)
        self.model.eval()
        self.moe_ids = moe_ids
        for unit in self.model.blocks:
            if unit.is_moe:
                index = moe_ids.index(unit.layer_id)
                unit.register_forward_pre_hook(lambda mod, args, i=index: self.scheduler.start_estimate(i))

    # ------------------------------------------------------------------------------------ weights

    @classmethod
    def from_checkpoint(cls, path: Path, comm: Comm, icfg: InferConfig | None = None) -> InferenceEngine:
        """The model a trainer saved in checkpoint `path` (any expert-parallel layout), with its config."""
        meta = ckpt.read_meta(path)
        if "hf" in meta:
            check_servable(path, meta)
        cfg = from_dict(meta["config"])
        engine = cls(cfg, comm, int(meta["model"]["data.vocab_size(actual)"]), icfg)
        engine.load(path)
        return engine

    def load(self, path: Path) -> None:
        """Load the model weights of checkpoint `path` (every expert, on every rank)."""
        want = ckpt.model_signature(self.cfg, self.model.vocab_size)
        ckpt.check_compatible(path, ckpt.read_meta(path), want, self.cfg)
        scratch = torch.optim.AdamW(self.model.parameters())  # state_entries names optimizer entries too
        entries = ckpt.state_entries(self.model, scratch, self.comm.rank, {})
        ckpt.load(path, {k: v for k, v in entries.items() if k.startswith("model/")})

    # ------------------------------------------------------------------------------------ profile

    @torch.no_grad()
    def record_routes(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        """Routed experts (best first) of this rank's `batches` under uniform placement, gathered from
        every rank: int64 [L, tokens of all ranks, K] (every rank must give as many tokens)."""
        mode = self.scheduler.mode
        self.scheduler.set_mode("uniform")
        parts = []
        try:
            for x in batches:
                self.scheduler.begin_batch(x.numel())
                self.model(x)
                parts.append(torch.stack(self.scheduler.batch.routes))
                self.comm.ledger.end_step()
        finally:
            self.scheduler.set_mode(mode)
        L, K = len(self.moe_ids), self.cfg.moe.top_k
        local_LTK = torch.cat(parts, 1) if parts else torch.zeros(L, 0, K, dtype=torch.int64)
        world = self.comm.group("world")
        n = torch.tensor([local_LTK.shape[1], -local_LTK.shape[1]], dtype=torch.int64, device=self.comm.device)
        self.comm.all_reduce(n, world, "lina.profile.size", op="max", phase="setup")
        if int(n[0]) != -int(n[1]):
            raise ValueError(f"every rank must profile the same number of tokens ({-int(n[1])} to {int(n[0])})")
        all_WLTK = self.comm.all_gather(local_LTK.to(self.comm.device), world, "lina.profile", phase="setup").cpu()
        self.comm.ledger.end_step()
        return all_WLTK.permute(1, 0, 2, 3).reshape(L, -1, K)

    def profile(self, batches: Iterable[torch.Tensor], routes: str | None = None) -> PathProfile:
        """Build the path profile from this rank's `batches` and every other rank's, use it, return it.
        `routes`: predict the next layer's top-1 expert ("top1") or its K routed experts ("all");
        default `InferConfig.profile_routes`."""
        routes = routes or self.icfg.profile_routes
        if routes not in ("top1", "all"):
            raise ValueError(f"routes={routes!r}; choose top1 or all")
        ids_LTK = self.record_routes(batches)
        profile = build_profile(
            ids_LTK[:, :, 0],
            self.cfg.moe.num_experts,
            self.icfg.path_len,
            routes_LTK=ids_LTK if routes == "all" else None,
        )
        self.set_profile(profile)
        return profile

    def set_profile(self, profile: PathProfile) -> None:
        self.scheduler.profile = profile

    # ------------------------------------------------------------------------------------ scoring

    def set_placement(self, placement: str) -> None:
        """Switch between `popularity` and `uniform` placement (same model, same weights)."""
        self.scheduler.set_mode(placement)

    @torch.no_grad()
    def score(self, x_BS: torch.Tensor, y_BS: torch.Tensor | None = None) -> tuple[LMOutput, BatchMetrics]:
        """One batch: this rank's sequences through the model; metrics agreed by every rank."""
        comm, world = self.comm, self.comm.group("world")
        comm.all_reduce(torch.zeros(1, device=comm.device), world, "lina.barrier", phase="metrics")
        self.scheduler.begin_batch(x_BS.numel())
        t0 = time.perf_counter()
        with comm.ledger.in_phase("eval"):
            out = self.model(x_BS, y_BS)
        if comm.device.type == "cuda":
            torch.cuda.synchronize()
        batch_s = time.perf_counter() - t0
        metrics = self._agree(batch_s, out)
        comm.ledger.end_step()
        return out, metrics

    def _agree(self, batch_s: float, out: LMOutput) -> BatchMetrics:
        """Gather every rank's times and rows; the placement records are identical on every rank."""
        L = len(self.moe_ids)
        recs = [self.scheduler.batch.records[i] for i in range(L)]
        loss = float(out.ce_loss) if out.ce_loss is not None else float("nan")
        mine = torch.tensor(
            [r.seconds for r in recs]
            + [float(r.rows) for r in recs]
            + [r.compute_s for r in recs]
            + [batch_s, sum(r.estimate_s for r in recs), loss],
            dtype=torch.float64,
        )
        all_WV = self.comm.all_gather(
            mine.to(self.comm.device), self.comm.group("world"), "lina.metrics", phase="metrics"
        ).cpu()
        return BatchMetrics(
            placement=self.scheduler.mode,
            layer_s=all_WV[:, :L].max(0).values.tolist(),
            rows_LW=all_WV[:, L : 2 * L].t().to(torch.int64).tolist(),
            compute_s=all_WV[:, 2 * L : 3 * L].max(0).values.tolist(),
            compute_mean_s=all_WV[:, 2 * L : 3 * L].mean(0).tolist(),
            batch_s=float(all_WV[:, 3 * L].max()),
            estimate_s=float(all_WV[:, 3 * L + 1].max()),
            ce_loss=float(all_WV[:, 3 * L + 2].mean()),
            matched=[r.matched for r in recs],
            replanned=[r.replanned for r in recs],
            replicas_LE=[r.placement.replica_counts() for r in recs],
        )
