"""`--compress auto`: each MoE layer chooses its compressor from what it measures on its own rows.

Candidates (`auto.candidates`): identity (exact rows; deduplicated per destination rank when the
dispatcher is `dedup`), fp8, int8, lsh and lsh+fp8. The layer runs uncompressed until step
`auto.start`, then decides, and decides again every `auto.every` steps (LSH's rate drifts as the
model trains). On a decision step, before the dispatch, every candidate is tried off the path on this
rank's routed rows (no autograd; the step itself runs the current choice):

    bytes_c    = rows sent to other ranks x sum over the four exchanges of the row's wire bytes
                 (LSH: bucket centroids instead of rows; FP8: D + D/128 bytes instead of D x dtype size)
    overhead_c = 2 x measured forward time of its compress + restore + wire encode/decode
                 (the backward repeats about the forward's passes)
    error_c    = mean |x - c(x)| / |x| of the rows and the centroids that would replace them (LSH)

The link: on the `SAMPLES` steps up to each decision that still run uncompressed, the layer times
its forward dispatch and combine on the comm ledger, less one latency each (the fastest of its
count exchanges, a few bytes), and divides by their wire bytes; the median of those samples is the
link's seconds per byte s_B (or `auto.link_gbit`). The predicted time of the layer's exchanges is then,
as in `lshmoe simulate`'s analytic model (bytes over the link plus memory-bound compression passes;
the latency is the same for every candidate and drops out),

    T_c = bytes_c x s_B + overhead_c

averaged over the ranks (one all-reduce, so every rank takes the same decision and the wire formats
agree; once a layer compresses, its last link estimate is kept). The choice is the fastest
candidate whose error is within `auto.max_error`, if it beats identity by more than `auto.margin` of
identity's time (otherwise identity: never predicted slower than the baseline) and the current
choice by as much (no switching on timing noise). The choice takes effect from the next step, is
checkpointed, and appears in the metrics as `auto_choice` (index into the candidate list) with
`auto_pred_speedup`, and as one line on rank 0 when it changes.

The prediction is then checked against the clock (`auto.verify`): the layer's span from compress to
restore (its forward exchanges, the experts between them, the compression passes) is timed on the
sampled uncompressed steps and on the `SAMPLES` steps after a switch; if the new choice's median span,
averaged over the ranks, is not below uncompressed's, the layer goes back to identity (one line on
rank 0) and `auto_measured_speedup` says by how much it missed. The span holds the same expert work
under every choice (fewer rows under LSH, which is part of its saving), so their ratio is the
measured gain of the choice on this machine and link, whatever the model of its cost left out.
"""

from __future__ import annotations

import collections
import math
import time
from statistics import median
from typing import Any

import torch

from lshmoe.compress.compose import compose
from lshmoe.compress.protocol import AllReduce, CompressorBase, Evaluate, Positions, Reduce, Stat
from lshmoe.compress.registry import CompressorContext, build_compressor
from lshmoe.config import AutoConfig
from lshmoe.distributed.wire import Wires

BACKWARD_FACTOR = 2.0  # forward + backward passes of a compressor, as a multiple of the forward's
SAMPLES = 5  # steps before each decision whose exchanges are timed
REPEATS = 3  # a candidate's overhead is the fastest of this many trials


def parse_candidates(text: str) -> tuple[str, ...]:
    """`auto.candidates` as names, identity first (`AutoConfig.candidate_names`)."""
    return AutoConfig(candidates=text).candidate_names()


def build(ctx: CompressorContext) -> AutoCompressor:
    cfg = ctx.config().auto
    names = cfg.candidate_names()
    # the names were checked against config.AUTO_CHOICES, the one list; the composite is built below
    parts = {n: build_compressor(n, ctx) for n in names if n != "lsh+fp8"}
    if "lsh+fp8" in names:  # shares the LSH part (projections, controller) with `lsh`
        lsh = parts.get("lsh") or build_compressor("lsh", ctx)
        parts["lsh+fp8"] = compose(lsh, parts.get("fp8") or build_compressor("fp8", ctx))
    return AutoCompressor(cfg, {n: parts[n] for n in names}, ctx)


def _wire_row_bytes(wires: Wires, width: int, dtype_bytes: int) -> float:
    """Bytes one payload row costs over the four exchanges (dispatch and combine, both directions)."""
    codecs = (wires.dispatch.fwd, wires.dispatch.bwd, wires.combine.fwd, wires.combine.bwd)
    return float(sum(c.row_bytes(width) if c is not None else width * dtype_bytes for c in codecs))


class AutoCompressor(CompressorBase):
    name = "auto"

    def __init__(self, cfg: AutoConfig, options: dict[str, Any], ctx: CompressorContext):
        self.cfg, self.options, self.names = cfg, options, tuple(options)
        self.ep_size, self.ep_index, self.num_experts = ctx.ep_size, ctx.ep_index, ctx.num_experts
        self.layer_id, self._link, self._log = ctx.layer_id, ctx.link, ctx.log
        self.choice = "identity"
        # causal-safe LSH candidates need the rows' positions, whichever candidate runs now
        self.needs_positions = any(c.needs_positions for c in options.values())
        # the one candidate whose state is checkpointed: lsh and lsh+fp8 share one LSH part
        self._lsh = next((n for n in ("lsh", "lsh+fp8") if n in options), None)
        self.step = 0
        self.sec_per_byte = 8 / (cfg.link_gbit * 1e9) if cfg.link_gbit > 0 else float("nan")
        self._samples: collections.deque[tuple[float, float, int, float]] = collections.deque(maxlen=4 * SAMPLES)
        self._trial: torch.Tensor | None = None  # per candidate: predicted-time parts, set on decision steps
        self._pred_speedup = 1.0
        # the measured check: compress -> restore spans uncompressed and under a new choice
        self._spans_identity: collections.deque[float] = collections.deque(maxlen=4 * SAMPLES)
        self._spans_new: list[float] = []
        self._verify_at: int | None = None  # the step whose probe compares the spans
        self._t0: float | None = None
        self._measured_speedup = float("nan")
        self._training = True  # the mode of the call, told by `active` before each compress

    # ------------------------------------------------------------------------------ the current choice

    @property
    def current(self):
        return self.options[self.choice]

    @property
    def rows_are_tokens(self) -> bool:  # type: ignore[override]
        return self.current.rows_are_tokens

    @property
    def stats(self) -> dict[str, Stat]:
        out = dict(self.current.stats)
        # states, not per-step amounts: the metrics report their value at the interval's end
        out["auto_choice"] = Stat(float(self.names.index(self.choice)), Reduce.LAST)
        out["auto_pred_speedup"] = Stat(self._pred_speedup, Reduce.LAST)
        if not math.isnan(self._measured_speedup):
            out["auto_measured_speedup"] = Stat(self._measured_speedup, Reduce.LAST)
        return out

    def wires(self) -> Wires:
        return self.current.wires()

    def set_step(self, step: int) -> None:
        self.step = step
        for c in self.options.values():
            c.set_step(step)

    def active(self, training: bool) -> bool:
        self._training = training
        return self.current.active(training)

    def decision_due(self, training: bool) -> bool:
        if not training or self.step < self.cfg.start:
            return False
        if self.cfg.every == 0:
            return self.step == self.cfg.start
        return (self.step - self.cfg.start) % self.cfg.every == 0

    def compress(
        self, rows_ND: torch.Tensor, counts_E: torch.Tensor, positions: Positions | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if self.decision_due(self._training):
            self._trial = self._try_all(rows_ND, counts_E, positions)
        self._t0 = None
        if self._training and self._span_due():
            sync(rows_ND)
            self._t0 = time.perf_counter()
        cur = self.current
        payload, sent_E, meta = cur.compress(rows_ND, counts_E, positions)
        return payload, sent_E, (cur, meta)

    def restore(self, out_MD: torch.Tensor, meta: Any) -> torch.Tensor:
        cur, m = meta
        if self._training and self._sampling_due():  # after the combine: the layer's exchanges are on the ledger
            self._sample_link()
        out_ND = cur.restore(out_MD, m)
        if self._t0 is not None:
            sync(out_ND)
            span = time.perf_counter() - self._t0
            (self._spans_identity if self.choice == "identity" else self._spans_new).append(span)
            self._t0 = None
        return out_ND

    def probe_due(self, training: bool) -> bool:
        return (
            self.current.probe_due(training)
            or (self._trial is not None and self.decision_due(training))
            or (training and self._verify_at == self.step)
        )

    def probe(self, meta: Any, evaluate: Evaluate, all_reduce: AllReduce) -> None:
        cur, m = meta
        if cur.probe_due(True):
            cur.probe(m, evaluate, all_reduce)
        if self._trial is not None and self.decision_due(True):
            self._decide(all_reduce)
        elif self._verify_at == self.step:
            self._verify(all_reduce)

    # ------------------------------------------------------------------------------ measuring

    def _rows_to_others(self, counts_E: torch.Tensor) -> float:
        per_rank = counts_E.detach().to("cpu", torch.float64).view(self.ep_size, -1).sum(1)
        return float(per_rank.sum() - per_rank[self.ep_index])

    @torch.no_grad()
    def _try_all(self, rows_ND: torch.Tensor, counts_E: torch.Tensor, positions: Positions | None) -> torch.Tensor:
        """[candidates, 3]: wire bytes, overhead seconds, centroid error (0 for candidates without
        centroids) on this rank."""
        width, dtype_bytes = rows_ND.shape[-1], rows_ND.element_size()
        out = torch.zeros(len(self.names), 3, dtype=torch.float64)
        for i, name in enumerate(self.names):
            c = self.options[name]
            c.active(True)  # a composed candidate picks its parts for a training step
            elapsed = float("inf")
            for _ in range(REPEATS if name != "identity" else 1):
                sync(rows_ND)
                t0 = time.perf_counter()
                payload, sent_E, meta = c.compress(rows_ND, counts_E, positions)
                back = c.restore(payload, meta)  # an identity "expert": the rows the receiver would restore
                wires = c.wires()
                for codec in {wires.dispatch.fwd, wires.combine.bwd, wires.dispatch.bwd, wires.combine.fwd} - {None}:
                    codec.decode(codec.encode(payload), width, payload.dtype)
                sync(back)
                elapsed = min(elapsed, time.perf_counter() - t0) if name != "identity" else 0.0
            out[i, 0] = self._rows_to_others(sent_E) * _wire_row_bytes(wires, width, dtype_bytes)
            out[i, 1] = BACKWARD_FACTOR * elapsed
            lm = _lsh_meta(meta)
            if lm is not None:
                err_N = (lm.rows_ND - lm.centroids_MD.index_select(0, lm.inverse_N)).norm(dim=-1)
                out[i, 2] = float((err_N / lm.rows_ND.norm(dim=-1).clamp_min(1e-12)).mean()) if err_N.numel() else 0.0
        return out

    def _sampling_due(self) -> bool:
        """The `SAMPLES` training steps up to each decision (the ledger's timings cost a device sync)."""
        if self.step > self.cfg.start and self.cfg.every == 0:
            return False
        ahead = (
            self.cfg.start - self.step
            if self.step <= self.cfg.start
            else -(self.step - self.cfg.start) % self.cfg.every
        )
        return ahead < SAMPLES

    def _span_due(self) -> bool:
        """Time this step's span: a sampled uncompressed step before a decision (not the decision step,
        whose trial runs inside compress), or a step of the check after a switch."""
        if self._verify_at is not None:
            return self.step <= self._verify_at
        return self.choice == "identity" and self._sampling_due() and not self.decision_due(True)

    def _verify(self, all_reduce: AllReduce) -> None:
        """Keep the new choice only if its spans are measured shorter than uncompressed's (both the
        median over this rank's steps, averaged over the ranks: every rank takes the same branch)."""
        self._verify_at = None
        new, old, self._spans_new = self._spans_new, self._spans_identity, []
        mine = torch.tensor(
            [median(new) if new else 0.0, median(old) if old else 0.0, float(bool(new and old)), 1.0],
            dtype=torch.float64,
        )
        total = all_reduce(mine).to("cpu", torch.float64)
        if float(total[2]) < float(total[3]):
            return  # a rank has no spans to compare (resumed mid-check): keep the choice
        t_new, t_old = float(total[0]) / float(total[3]), float(total[1]) / float(total[3])
        self._measured_speedup = t_old / t_new if t_new > 0 else float("nan")
        if t_new < t_old:
            return
        if self._log is not None:
            self._log(
                f"layer {self.layer_id} step {self.step}: auto measured {self.choice} at {t_new * 1e3:.2f} ms "
                f"per forward against {t_old * 1e3:.2f} ms uncompressed (predicted {self._pred_speedup:.2f}x "
                "faster); back to identity"
            )
        self.choice, self._pred_speedup = "identity", 1.0

    def _sample_link(self) -> None:
        """Record this step's forward exchanges while they run uncompressed (see `link_estimate`)."""
        if self._link is None or self.choice != "identity":
            return
        nbytes, seconds, exchanges, counts_s = self._link()
        if nbytes > 0:
            self._samples.append((nbytes, seconds, exchanges, counts_s))

    def link_estimate(self) -> float:
        """Seconds per byte of the link: the median over the samples of (exchange time - latency) / bytes,
        the latency being the fastest count exchange seen (its slower ones include the ranks' skew,
        which the count exchange absorbs before the payload moves). NaN without samples."""
        if not self._samples:
            return float("nan")
        latency = min(c for *_, c in self._samples)
        return median(max(0.0, s - n * latency) / b for b, s, n, _ in self._samples)

    def _decide(self, all_reduce: AllReduce) -> None:
        trial, self._trial = self._trial, None
        spb = self.sec_per_byte if self.cfg.link_gbit > 0 or not self._samples else self.link_estimate()
        known = not math.isnan(spb)
        # one all-reduce: every rank's trial, its link estimate (and whether it has one) and a count
        n = len(self.names)
        extra = torch.tensor([spb if known else 0.0, float(known), 1.0], dtype=torch.float64)
        total = all_reduce(torch.cat([trial.flatten(), extra])).to("cpu", torch.float64)
        per = total[: 3 * n].view(n, 3) / float(total[-1])  # means over ranks
        if float(total[-2]) == 0:
            return  # no uncompressed exchange measured yet: keep the current choice
        self.sec_per_byte = float(total[-3]) / float(total[-2])
        t_C = [float(per[i, 0]) * self.sec_per_byte + float(per[i, 1]) for i in range(n)]
        allowed = [i for i in range(n) if not float(per[i, 2]) > self.cfg.max_error]
        best = min(allowed, key=lambda i: t_C[i])
        now = self.names.index(self.choice)
        keep = 1.0 - self.cfg.margin
        if t_C[best] > keep * t_C[0]:
            best = 0  # not clearly faster than uncompressed
        elif now in allowed and t_C[best] > keep * t_C[now]:
            best = now  # not clearly faster than the current choice: no switching on noise
        self._pred_speedup = t_C[0] / t_C[best] if t_C[best] > 0 else 1.0
        choice = self.names[best]
        if choice != self.choice and self._log is not None:
            told = ", ".join(
                f"{name} {t_C[i] * 1e3:.2f} ms" + (f" (err {float(per[i, 2]):.2f})" if float(per[i, 2]) else "")
                for i, name in enumerate(self.names)
            )
            self._log(
                f"layer {self.layer_id} step {self.step}: auto chose {choice} (link "
                f"{self.link_bytes_per_s * 8 / 1e9:.3g} Gbit/s; predicted exchange time per step: {told})"
            )
        if self.cfg.verify and choice != self.choice and choice != "identity" and self._spans_identity:
            if self.cfg.every == 0 or self.cfg.every > SAMPLES:  # the check ends before the next decision
                self._verify_at, self._spans_new = self.step + SAMPLES, []
        self.choice = choice

    @property
    def link_bytes_per_s(self) -> float:
        return 1.0 / self.sec_per_byte if self.sec_per_byte > 0 else float("inf")

    # ------------------------------------------------------------------------------ checkpointed state

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"choice": torch.tensor([self.names.index(self.choice)], dtype=torch.int64)}
        out["sec_per_byte"] = torch.tensor([self.sec_per_byte], dtype=torch.float64)
        if self._lsh is not None:
            out.update({f"{self._lsh}.{k}": v for k, v in self.options[self._lsh].state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "choice" in state:
            self.choice = self.names[int(state["choice"][0])]
        if "sec_per_byte" in state:
            self.sec_per_byte = float(state["sec_per_byte"][0])
        if self._lsh is not None:
            prefix = f"{self._lsh}."
            self.options[self._lsh].load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )


def _lsh_meta(meta: Any):
    """The LSH part's meta inside a candidate's meta (composed candidates nest (part, meta) pairs)."""
    if isinstance(meta, tuple):
        for _, m in meta:
            if hasattr(m, "centroids_MD"):
                return m
        return None
    return meta if hasattr(meta, "centroids_MD") else None


def sync(t: torch.Tensor) -> None:
    """Wait for the device, so a decision step's timings are the work's (CUDA only; decision steps only)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
