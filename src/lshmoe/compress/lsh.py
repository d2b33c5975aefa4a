"""LSH-MoE (Nie et al., NeurIPS 2024): send one centroid per LSH bucket instead of every routed row.

For each group of rows bound for the same expert on this (source) rank:
1. hash every row with L hash functions and AND-combine the codes into one bucket id;
2. compact the ids of the whole buffer (unique + inverse), keyed by (expert, bucket) so buckets
   never mix experts and stay grouped by expert, the layout the dispatch all-to-all needs;
3. centroid of each bucket = mean of its rows (index_add inside autograd);
4. only centroids travel; after the combine all-to-all every row is restored as
       y_n = E(c_b(n)) + a (x_n - c_b(n))       (residual compensation)
   and the layer applies the usual gate-weighted combine. a = 1 is the paper's compensation, a = 0
   sends E(c) alone; `calibrated` fits a = <E(x) - E(c), x - c> / |x - c|^2 from the restore-error
   probe: the best first-order correction whose Jacobian is a multiple of the identity.

Shapes: N routed rows, M buckets (payload rows), D width, E experts, L hashes.

Beyond the paper (options of the `lsh` section, PyTorch implementation only):
- `projection=pca` hashes each group in its own leading principal directions (hashing.py), computed
  from the group's rows on the sending rank. The receiver needs nothing: centroids are rows of the
  input space whatever decided the buckets, and restore runs on the sender.
- `exact_spread=t` sends rows exactly where merging does not pay: a row farther than t |x| from its
  bucket's centroid travels alone; the rest are re-averaged, and a bucket where a remaining row is
  still farther than t |x| from the new centroid travels row by row. Every merged row then has
  |x - c| <= t |x| (t = 0: every row exact, the uncompressed layer).
- `scope=inter_node` sends the rows bound for experts on this rank's node exactly (they cross no slow
  link) and compresses only the others.
- `causal` (on by default in a causal LM; compress/causal.py): a token's output never depends on a
  later token of its sequence, either because each bucket is represented by its rows at its earliest
  position (`causal_mode=earliest`) or because no bucket holds two rows of one sequence (`split`).
  Needs each row's sequence and position (`positions`); the statistics of centring and PCA mix every
  row of a group, later positions included, so those options need `causal=false`, and a rate target
  chooses L from the previous steps' rates only.
Exact rows get their own payload row after the expert's buckets (key = expert * (M + N) + slot).

Random projections come from a generator seeded by (seed, layer, step // redraw_every), so a
recomputed forward or a resumed run hashes identically. The hash itself runs without autograd
(bucket ids are integers); the centroid mean and the residual are differentiable, so the backward
all-to-alls move M rows too and the token gradient gets the identity path of the residual.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lshmoe.compress.causal import earliest_inverse, split_keys
from lshmoe.compress.hashing import (
    codes_from_projections,
    combine_codes,
    draw_projections,
    hash_codes,
    pca_projections,
    projections_per_hash,
)
from lshmoe.compress.kernels import use_triton
from lshmoe.compress.ops import restore_compensated, segment_mean
from lshmoe.compress.protocol import AllReduce, CompressorBase, Evaluate, Positions, Reduce, Stat
from lshmoe.compress.registry import CompressorContext
from lshmoe.compress.target import HashCountController
from lshmoe.config import ConfigError, LSHConfig
from lshmoe.errors import UserError
from lshmoe.indexing import inverse_permutation
from lshmoe.seeding import generator

# How each number of `stats` reduces in the metrics (the others are per-step means over ranks).
_PROBED = ("lsh_restore_err", "lsh_restore_err_nocomp", "lsh_restore_err_identity", "lsh_alpha_fit")


@dataclass(frozen=True, slots=True)
class LSHMeta:
    rows_ND: torch.Tensor  # routed rows (residual source)
    inverse_N: torch.Tensor  # bucket of each row
    centroids_MD: torch.Tensor
    expert_N: torch.Tensor  # destination expert of each row
    full_codes_N: torch.Tensor  # L_max-hash ids, for the probe's per-L' centroids
    positions: Positions | None = None  # each row's sequence and position (lsh.causal), for the probe


def build(ctx: CompressorContext) -> LSHCompressor | None:
    """The registry's entry: an LSH compressor for the layers `lsh.layers` selects (None elsewhere);
    `lsh.causal` none takes the model's word (`ctx.causal`)."""
    cfg = ctx.config().lsh
    ids = cfg.layer_ids()
    if ids is not None and ctx.layer_id not in ids:
        return None
    causal = ctx.causal if cfg.causal is None else cfg.causal
    mixing = [f"center={cfg.center}"] if cfg.center else []
    mixing += [f"projection={cfg.projection}"] if cfg.projection != "random" else []
    if cfg.causal_mode == "earliest" and cfg.exact_spread is not None:
        # NOTE: its second round sends a whole bucket exactly when any member is far: a later row decides
        mixing.append(f"exact_spread={cfg.exact_spread} (with causal_mode=earliest; causal_mode=split allows it)")
    if causal and mixing:
        why = "on by default in a causal LM" if cfg.causal is None else "set"
        raise ConfigError(
            f"lsh.causal ({why}) with lsh.{' and lsh.'.join(mixing)}: those statistics mix every row of a group, "
            "later positions included; set lsh.causal=false to allow it (the model may then see later tokens)"
        )
    local_E = tuple(n == ctx.my_node for n in ctx.node_of_E) or None
    return LSHCompressor(cfg, ctx.num_experts, ctx.d_model, ctx.layer_id, ctx.seed, local_E=local_E, causal=causal)


class LSHCompressor(CompressorBase):
    name = "lsh"

    def __init__(
        self,
        cfg: LSHConfig,
        num_experts: int,
        d_model: int,
        layer_id: int,
        seed: int = 0,
        local_E: tuple[bool, ...] | None = None,
        causal: bool = False,
    ):
        self.cfg, self.num_experts, self.d_model = cfg, num_experts, d_model
        # causal-safe buckets (compress/causal.py): the layer then hands `compress` each row's position
        self.causal = self.needs_positions = causal
        self.split = causal and cfg.causal_mode == "split"
        self.earliest = causal and cfg.causal_mode == "earliest"
        # which experts live on this rank's node (None: all of them, a single-node run)
        self.local_E = torch.tensor(local_E if local_E is not None else (True,) * num_experts)
        self.torch_only = bool(cfg.torch_only())
        self.layer_id, self.seed = layer_id, seed
        self.step = 0
        self.controller = (
            HashCountController(cfg.target, cfg.target_value, cfg.num_hashes, cfg.ema) if cfg.target != "none" else None
        )
        self.num_hashes = cfg.num_hashes
        # residual scale a in E(c) + a (x - c): the paper's 1, none's 0, or fitted by the probe (from 0)
        self.alpha = {"identity": 1.0, "none": 0.0, "calibrated": 0.0}[cfg.compensation]
        self._fitted = False
        self._proj: tuple[tuple, torch.Tensor] | None = None
        self._stats: dict[str, float] = {}

    @property
    def stats(self) -> dict[str, Stat]:
        def reduce(k: str) -> Reduce:
            return Reduce.PER_PROBE if k in _PROBED else Reduce.PROBES if k == "lsh_probe_n" else Reduce.MEAN

        return {k: Stat(v, reduce(k)) for k, v in self._stats.items()}

    def active(self, training: bool) -> bool:
        return training or self.cfg.eval_compress

    # ------------------------------------------------------------------------------ checkpointed state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running state a resumed run needs to continue exactly: the L controller's averages and
        the calibrated compensation's fitted scale (the projections are a function of the step)."""
        out = {}
        if self.controller is not None:
            st = self.controller.state_dict()
            out["controller"] = torch.tensor([st["rate"], st["error"]], dtype=torch.float64)
        if self.cfg.compensation == "calibrated":
            out["alpha"] = torch.tensor([self.alpha, float(self._fitted)], dtype=torch.float64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "controller" in state and self.controller is not None:
            rate, err = state["controller"].tolist()
            self.controller.load_state_dict({"rate": rate, "error": err})
        if "alpha" in state and self.cfg.compensation == "calibrated":
            alpha, fitted = state["alpha"].tolist()
            self.alpha, self._fitted = alpha, bool(fitted)

    # ------------------------------------------------------------------------------ projections

    @property
    def grad_alpha(self) -> float:
        """The scale of the residual x - c in the restore's gradient (`lsh.grad_compensation`, else alpha)."""
        return self.alpha if self.cfg.grad_compensation is None else self.cfg.grad_compensation

    def projection_key(self) -> tuple:
        epoch = self.step // self.cfg.redraw_every if self.cfg.redraw_every else 0
        return (self.seed, "lsh", self.layer_id, epoch)

    def projections(self, device: torch.device) -> torch.Tensor:
        """R_DLP for all L_max hashes of the current step (cached until the key changes)."""
        key = self.projection_key()
        if self._proj is None or self._proj[0] != key or self._proj[1].device != device:
            R = draw_projections(
                self.cfg.family, self.d_model, self.cfg.num_hashes, self.cfg.buckets_per_hash, generator(*key)
            )
            # NOTE: pinned and non-blocking on CUDA: a pageable host-to-device copy is a host sync per redraw
            self._proj = (key, R.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else R.to(device))
        return self._proj[1]

    # ------------------------------------------------------------------------------ bucketing

    def bucket_ids(self, rows_ND: torch.Tensor, expert_N: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Combined ids of all L_max hashes, [N] int64 (centred per expert group if configured)."""
        if self.cfg.projection == "pca":
            x = rows_ND.detach()  # the SVD needs float32 or float64
            return self._pca_bucket_ids(x if x.dtype in (torch.float32, torch.float64) else x.float(), counts_E)
        R_DLP = self.projections(rows_ND.device)
        if not self.cfg.center:
            return combine_codes(hash_codes(rows_ND.detach(), R_DLP, self.cfg.family), self.cfg.buckets_per_hash)
        # (x - mean_e) R = x R - mean_e R: centre the N x L*P projections, not the N x D rows.
        D, L, P = R_DLP.shape
        z_NK = rows_ND.detach().to(R_DLP.dtype) @ R_DLP.reshape(D, L * P)
        sums_EK = z_NK.new_zeros(self.num_experts, L * P).index_add_(0, expert_N, z_NK)
        cnt_E = torch.bincount(expert_N, minlength=self.num_experts).clamp(min=1).to(z_NK.dtype)
        z_NK = z_NK - (sums_EK / cnt_E[:, None]).index_select(0, expert_N)
        return combine_codes(codes_from_projections(z_NK.view(-1, L, P), self.cfg.family), self.cfg.buckets_per_hash)

    def _pca_bucket_ids(self, rows_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Bucket ids from each expert group's own principal directions (hashing.pca_projections)."""
        L, b, k = self.cfg.num_hashes, self.cfg.buckets_per_hash, self.cfg.pca_rank
        P = projections_per_hash(self.cfg.family, b)
        rotation = None
        if k:  # seeded like the random projections, so every rank rotates alike (not required)
            rotation = draw_projections(self.cfg.family, k, L, b, generator(*self.projection_key(), "pca"))
            rotation = rotation.reshape(k, L * P)
        z_NK = rows_ND.new_empty(rows_ND.shape[0], L * P)
        for x_nD, z_nK in zip(rows_ND.split(counts_E.tolist()), z_NK.split(counts_E.tolist()), strict=True):
            z_nK.copy_(pca_projections(x_nD, k or L * P, rotation))
        return combine_codes(codes_from_projections(z_NK.view(-1, L, P), self.cfg.family), b)

    def payload_keys(
        self,
        full_N: torch.Tensor,
        expert_N: torch.Tensor,
        num_hashes: int,
        rows_ND: torch.Tensor,
        at: Positions | None = None,
    ) -> tuple[torch.Tensor, int, int]:
        """Sortable payload key of every row, the span of one expert's keys (expert = key // span) and
        the number of rows sent exactly (scope and exact_spread); with `causal_mode=split` a bucket is
        split so that it holds at most one row of each sequence."""
        keys_N = self.keys(full_N, expert_N, num_hashes)
        span = self.cfg.buckets_per_hash**num_hashes
        if self.split and at is not None and keys_N.numel():
            uniq, slot_N = torch.unique(keys_N, return_inverse=True)
            span = uniq.numel() * keys_N.numel()
            keys_N = expert_N * span + split_keys(slot_N, at)
        exact_N = self.exact_rows(keys_N, expert_N, rows_ND)
        if exact_N is None:
            return keys_N, span, 0
        return (*split_exact(keys_N, expert_N, exact_N), int(exact_N.sum()))

    @torch.no_grad()
    def exact_rows(self, keys_N: torch.Tensor, expert_N: torch.Tensor, rows_ND: torch.Tensor) -> torch.Tensor | None:
        """Rows to send exactly, bool [N], or None when every row may merge."""
        exact_N = None
        if self.cfg.scope == "inter_node":
            exact_N = self.local_E.to(expert_N.device).index_select(0, expert_N)
        t = self.cfg.exact_spread
        if t is None:
            return exact_N
        x = rows_ND.detach()
        limit_N = t * x.norm(dim=1)
        exact_N = torch.zeros_like(expert_N, dtype=torch.bool) if exact_N is None else exact_N
        for whole_bucket in (False, True):
            _, inv_N, size_M = torch.unique(
                split_exact(keys_N, expert_N, exact_N)[0], return_inverse=True, return_counts=True
            )
            c_MD = x.new_zeros(size_M.numel(), x.shape[1]).index_add_(0, inv_N, x).div_(size_M[:, None].to(x.dtype))
            far_N = (x - c_MD.index_select(0, inv_N)).norm(dim=1) > limit_N
            if whole_bucket:  # a bucket with a row still too far after the re-average goes row by row
                far_N = (torch.zeros_like(size_M).index_add_(0, inv_N, far_N.long()) > 0).index_select(0, inv_N)
            exact_N = exact_N | far_N
        return exact_N

    def keys(self, full_N: torch.Tensor, expert_N: torch.Tensor, num_hashes: int) -> torch.Tensor:
        """(expert, first-`num_hashes` bucket) as one sortable int64 key."""
        span = self.cfg.buckets_per_hash**num_hashes
        return expert_N * span + torch.remainder(full_N, span)

    def _prefix_rates(
        self, full_N: torch.Tensor, expert_N: torch.Tensor, rows_ND: torch.Tensor, at: Positions | None
    ) -> list[float]:
        n = full_N.numel()
        if n == 0:
            return [float("nan")] * self.cfg.num_hashes
        return [
            torch.unique(self.payload_keys(full_N, expert_N, L, rows_ND, at)[0]).numel() / n
            for L in range(1, self.cfg.num_hashes + 1)
        ]

    def _choose_hashes(self, rates) -> None:
        """Feed this step's per-L' rates (a callable, run only in rate mode) to the controller and pick L.
        Causal: L comes from the previous steps' rates, before this step's are seen (they depend on
        every row of the step, later positions included)."""
        if self.controller is None:
            return
        if self.causal:
            self._choose_from_history()
        if self.cfg.target == "rate":
            self.controller.observe_rates(rates())
        if not self.causal:
            self.num_hashes = self.controller.choose()

    def _choose_from_history(self) -> None:
        """L from earlier steps' measurements only; before the first rate is seen, the most hashes (the
        fewest merges) rather than the controller's empty-history choice of one."""
        if self.cfg.target == "rate" and not self.controller.has_rates():
            self.num_hashes = self.cfg.num_hashes
        else:
            self.num_hashes = self.controller.choose()

    def _positions(self, at: Positions | None) -> Positions | None:
        """The rows' positions when causal (a one-line error when the layer could not give them)."""
        if not self.causal:
            return None
        if at is None:
            raise UserError(
                "lsh.causal needs each routed row's sequence and position: the MoE layer's input must be "
                "[batch, seq, dim] (or set lsh.causal=false for a model that is not a causal LM)"
            )
        return at

    def centroids(
        self, rows_ND: torch.Tensor, inverse_N: torch.Tensor, size_M: torch.Tensor, at: Positions | None, mean=None
    ) -> torch.Tensor:
        """Each bucket's payload row: the mean of its rows, or with `causal_mode=earliest` of its rows at
        its earliest position (`mean`: the segment-mean implementation, the reference's by default)."""
        mean = mean or segment_mean
        if not (self.earliest and at is not None):
            return mean(rows_ND, inverse_N, size_M)
        M = size_M.numel()
        lead_inv, lead_size = earliest_inverse(inverse_N, at, M)
        return mean(rows_ND, lead_inv, lead_size)[:M]

    # ------------------------------------------------------------------------------ seam

    def compress(
        self, rows_ND: torch.Tensor, counts_E: torch.Tensor, positions: Positions | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, LSHMeta]:
        at = self._positions(positions)
        if not self.torch_only and use_triton(self.cfg.kernels, rows_ND.device):
            return self._compress_fused(rows_ND, counts_E, at)
        t0 = time.perf_counter()
        E = self.num_experts
        expert_N = torch.repeat_interleave(torch.arange(E, device=rows_ND.device), counts_E.to(rows_ND.device))
        with torch.no_grad():
            full_N = self.bucket_ids(rows_ND, expert_N, counts_E)
            self._choose_hashes(lambda: self._prefix_rates(full_N, expert_N, rows_ND, at))
            keys_N, span, n_exact = self.payload_keys(full_N, expert_N, self.num_hashes, rows_ND, at)
        t1 = time.perf_counter()
        uniq_M, inverse_N, size_M = torch.unique(keys_N, sorted=True, return_inverse=True, return_counts=True)
        sent_counts_E = torch.bincount(uniq_M // span, minlength=E)
        centroids_MD = self.centroids(rows_ND, inverse_N, size_M, at)
        t2 = time.perf_counter()
        self._set_stats(t1 - t0, t2 - t1)
        if self.torch_only:
            self._stats["lsh_exact_frac"] = n_exact / max(1, rows_ND.shape[0])
        # full_N is kept for the restore-error probe (a reference to a tensor that exists anyway)
        meta = LSHMeta(
            rows_ND=rows_ND,
            inverse_N=inverse_N,
            centroids_MD=centroids_MD,
            expert_N=expert_N,
            full_codes_N=full_N,
            positions=at,
        )
        return centroids_MD, sent_counts_E, meta

    def _set_stats(self, hash_s: float, cluster_s: float) -> None:
        self._stats = {
            "lsh_hashes": float(self.num_hashes),
            "lsh_hash_s": hash_s,
            "lsh_cluster_s": cluster_s,
            "lsh_alpha": self.alpha,
            "lsh_restore_err": 0.0,
            "lsh_restore_err_nocomp": 0.0,
            "lsh_restore_err_identity": 0.0,
            "lsh_alpha_fit": 0.0,
            "lsh_probe_n": 0.0,
        }

    def restore(self, out_MD: torch.Tensor, meta: LSHMeta) -> torch.Tensor:
        t0 = time.perf_counter()
        if not self.torch_only and use_triton(self.cfg.kernels, out_MD.device):
            from lshmoe.compress.kernels import lsh as fused

            out_ND = fused.restore_compensated(
                out_MD, meta.centroids_MD, meta.rows_ND, meta.inverse_N, self.alpha, self.grad_alpha
            )
        elif self.alpha != 0.0 or self.grad_alpha != 0.0:
            out_ND = restore_compensated(
                out_MD, meta.centroids_MD, meta.rows_ND, meta.inverse_N, self.alpha, self.grad_alpha
            )
        else:
            out_ND = out_MD.index_select(0, meta.inverse_N)
        self._stats["lsh_restore_s"] = time.perf_counter() - t0
        return out_ND

    def _compress_fused(
        self, rows_ND: torch.Tensor, counts_E: torch.Tensor, at: Positions | None
    ) -> tuple[torch.Tensor, torch.Tensor, LSHMeta]:
        """`compress` with the Triton kernels (lshmoe.compress.kernels.lsh): same ids, payload order and meta."""
        from lshmoe.compress.kernels import lsh as fused

        t0 = time.perf_counter()
        dev, E, cfg = rows_ND.device, self.num_experts, self.cfg
        expert_N = torch.repeat_interleave(
            torch.arange(E, device=dev), counts_E.to(dev), output_size=rows_ND.shape[0]
        )  # output_size: no host sync
        if self.controller is not None and (cfg.target == "error" or self.causal):
            self._choose_from_history()
        with torch.no_grad():
            full_N, keys_N, hist = fused.hash_rows(
                rows_ND.detach(),
                self.projections(dev),
                expert_N,
                family=cfg.family,
                buckets=cfg.buckets_per_hash,
                num_hashes=self.num_hashes,
                num_experts=E,
                center=cfg.center,
            )
            if self.controller is not None and cfg.target == "rate":
                self.controller.observe_rates(self._prefix_rates(full_N, expert_N, rows_ND, at))
                if not self.causal and self.controller.choose() != self.num_hashes:
                    self.num_hashes = self.controller.choose()
                    keys_N = self.keys(full_N, expert_N, self.num_hashes)
                    hist = torch.bincount(keys_N, minlength=E * cfg.buckets_per_hash**self.num_hashes).int()
        t1 = time.perf_counter()
        if self.split:
            span = cfg.buckets_per_hash**self.num_hashes
            inverse_N, size_M, sent_counts_E = fused.compact_split(keys_N, hist, at, E, span)
        else:
            inverse_N, size_M, sent_counts_E = fused.compact(keys_N, hist, E)
        centroids_MD = self.centroids(rows_ND, inverse_N, size_M, at, fused.segment_mean)
        t2 = time.perf_counter()
        self._set_stats(t1 - t0, t2 - t1)
        meta = LSHMeta(
            rows_ND=rows_ND,
            inverse_N=inverse_N,
            centroids_MD=centroids_MD,
            expert_N=expert_N,
            full_codes_N=full_N,
            positions=at,
        )
        return centroids_MD, sent_counts_E, meta

    # ------------------------------------------------------------------------------ restore-error probe

    def probe_due(self, training: bool) -> bool:
        """Every `probe_every` training steps (10 by default when a mode needs the measurement)."""
        needs = self.cfg.target == "error" or self.cfg.compensation == "calibrated"
        every = self.cfg.probe_every or (10 if needs else 0)
        return training and every > 0 and self.step % every == 0

    def probe(self, meta: LSHMeta, evaluate: Evaluate, all_reduce: AllReduce) -> None:
        """Evaluate the experts on sampled rows and on their centroids, sum the error statistics
        over the world, then fit the residual scale and feed the error target."""
        rows_PD, counts_E, ctx = self.probe_rows(meta)
        sums = self.probe_sums(evaluate(rows_PD, counts_E), rows_PD, ctx)
        self.probe_update(all_reduce(sums).cpu(), ctx)

    def probe_candidates(self) -> list[int]:
        if self.cfg.target == "error":
            return list(range(1, self.cfg.num_hashes + 1))
        return [self.num_hashes]

    def probe_rows(self, meta: LSHMeta) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Rows to evaluate on the experts: sampled tokens x_S, then their centroids under every
        candidate L', all grouped by expert. Returns (rows_PD, counts_E, context for `probe_error`)."""
        x, n = meta.rows_ND.detach(), meta.rows_ND.shape[0]
        g = generator(self.seed, "probe", self.layer_id, self.step)
        idx_S = torch.randperm(n, generator=g)[: self.cfg.probe_rows].sort().values.to(x.device)
        expert_S = meta.expert_N.index_select(0, idx_S)
        blocks, cands = [x.index_select(0, idx_S)], self.probe_candidates()
        for L in cands:
            keys_N = self.payload_keys(meta.full_codes_N, meta.expert_N, L, x, meta.positions)[0]
            _, inv, size = torch.unique(keys_N, return_inverse=True, return_counts=True)
            c = self.centroids(x, inv, size, meta.positions)
            blocks.append(c.index_select(0, inv.index_select(0, idx_S)))
        rows = torch.cat(blocks)
        expert_P = expert_S.repeat(len(blocks))
        order = torch.sort(expert_P, stable=True).indices
        counts_E = torch.bincount(expert_P, minlength=self.num_experts)
        return rows.index_select(0, order), counts_E, {"order": order, "blocks": len(blocks), "cands": cands}

    def probe_sums(self, out_PD: torch.Tensor, rows_PD: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Sufficient statistics of the restore error, float64 [1 + 3 C] for C candidate L':
        |E(x)|^2, then per candidate |dE|^2, <dE, dx>, |dx|^2 with dE = E(x) - E(c), dx = x - c.
        Sums over ranks give the error for any residual scale a: |dE - a dx|^2 / |E(x)|^2."""
        unsort = inverse_permutation(ctx["order"])
        out = out_PD.index_select(0, unsort).double().chunk(ctx["blocks"])
        rows = rows_PD.index_select(0, unsort).double().chunk(ctx["blocks"])
        sums = [out[0].square().sum()]
        for j in range(len(ctx["cands"])):
            dE, dx = out[0] - out[j + 1], rows[0] - rows[j + 1]
            sums += [dE.square().sum(), (dE * dx).sum(), dx.square().sum()]
        return torch.stack(sums) if sums[0].numel() else torch.zeros(1 + 3 * len(ctx["cands"]), dtype=torch.float64)

    def probe_update(self, sums: torch.Tensor, ctx: dict) -> None:
        """From (all-reduced) probe sums: fit the residual scale, feed the error target, record the errors."""
        s = sums.tolist()
        norm, cands = s[0], ctx["cands"]
        if norm <= 0:
            return
        fits, errs = [], []
        for j in range(len(cands)):
            s_oo, s_ox, s_xx = s[1 + 3 * j : 4 + 3 * j]
            fit = min(1.5, max(0.0, s_ox / s_xx)) if s_xx > 0 else 0.0
            a = fit if self.cfg.compensation == "calibrated" else self.alpha
            fits.append(fit)
            errs.append(max(0.0, s_oo - 2 * a * s_ox + a * a * s_xx) ** 0.5 / norm**0.5)
        j = cands.index(self.num_hashes) if self.num_hashes in cands else len(cands) - 1
        if self.cfg.compensation == "calibrated":
            ema = self.cfg.ema if self._fitted else 0.0
            self.alpha, self._fitted = ema * self.alpha + (1 - ema) * fits[j], True
        if self.controller is not None and self.cfg.target == "error":
            self.controller.observe_errors(errs)
        s_oo, s_ox, s_xx = s[1 + 3 * j : 4 + 3 * j]
        self._stats.update(
            lsh_restore_err=errs[j],
            lsh_restore_err_nocomp=(s_oo / norm) ** 0.5,
            lsh_restore_err_identity=max(0.0, s_oo - 2 * s_ox + s_xx) ** 0.5 / norm**0.5,
            lsh_alpha_fit=fits[j],
            lsh_probe_n=1.0,
        )


def split_exact(keys_N: torch.Tensor, expert_N: torch.Tensor, exact_N: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Keys where every `exact_N` row has a bucket of its own: expert * (M + N) + slot, slot = the
    rank of the row's (expert, bucket) key among the M distinct ones, or M + n for exact row n; the
    keys stay grouped by expert, buckets before exact rows. Returns the keys and their span M + N."""
    N = keys_N.numel()
    if N == 0:
        return keys_N, 1
    uniq_M, slot_N = torch.unique(keys_N, return_inverse=True)
    span = uniq_M.numel() + N
    own_N = uniq_M.numel() + torch.arange(N, device=keys_N.device)
    return expert_N * span + torch.where(exact_N, own_N, slot_N), span
