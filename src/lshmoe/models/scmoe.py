"""Shortcut-connected MoE (ScMoE) and DGMoE blocks, and the shared-expert MoE baseline (ICML 2025).

A ScMoE pair is a Block-MLP (layer l) followed by a Block-MoE (layer l+1), pre-norm:

    hA = x  + attnA(norm(x))          H^MH_l      (x = H_{l-1}, the pair's input)
    hL = hA + mlpA(norm(hA))          H_l
    hB = hL + attnB(norm(hL))         H^MH_{l+1}
    out = hB + combine(SE(norm(hB)), MoE(norm(shortcut)))

The routed MoE reads a shortcut: Pos-3 = x, Pos-2 = hA (the paper's default), Pos-1 = hL, or none
= hB, which is exactly the shared-expert MoE. `combine` is a direct add, CG-1 (sigmoid(w . z) SE +
MoE) or CG-2 (softmax(W z) mixing SE and MoE), z = the SE input. With MoE in every block the pair is
a single Block-MoE whose shortcut is its own input (Pos-1).

Because the shortcut exists before the dense ops after it, the dispatch all-to-all is issued as soon
as the gate and permutation are done; the dense ops of the window run while rows travel; the experts
run at slot K of the window; the combine is issued and waited for only at the end. Backward overlaps
the same way (lshmoe.distributed.async_autograd). K is forced (`--expert-slot`) or chosen after a warm-up of
synchronous steps from the measured op and all-to-all times (the paper's Eq. 11).

DGMoE: two top-1 passes through one gate and expert set, on hA and on hB; a token never gets the same
expert twice (hB's pass takes its next-ranked expert instead). Its hA pass is dispatched early.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lshmoe.config import Config, ModelConfig, MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.distributed.tags import MoEOp, Tag
from lshmoe.models.blocks import MLP, CausalSelfAttention, make_norm
from lshmoe.moe.layer import MoELayer, MoEOutput

STAGES = ("attnA", "mlpA", "attnB", "se")
AVAILABLE_AFTER = {"pos3": 0, "pos2": 1, "pos1": 2, "none": 3}  # stages done before the shortcut exists
SHORTCUT_REP = {"pos3": "x", "pos2": "hA", "pos1": "hL", "none": "hB"}


def eq11_slot(op_s: list[float], t_dispatch: float, t_combine: float) -> int:
    """The paper's Eq. 11: K* = argmin_K |sum_{i<K} op_i - T_disp| + |sum_{i>=K} op_i - T_comb|."""
    total = sum(op_s)
    best, best_k = float("inf"), 0
    for k in range(len(op_s) + 1):
        before = sum(op_s[:k])
        cost = abs(before - t_dispatch) + abs(total - before - t_combine)
        if cost < best - 1e-15:
            best, best_k = cost, k
    return best_k


def block_time(op_s: list[float], t_dispatch: float, t_combine: float, t_expert: float, k: int) -> float:
    """Critical path of a window with the experts at slot k: communication only hides behind dense ops."""
    before, after = sum(op_s[:k]), sum(op_s[k:])
    return max(before, t_dispatch) + t_expert + max(after, t_combine)


class Combiner(nn.Module):
    """add: SE + MoE; cg1: sigmoid(w . z) SE + MoE; cg2: softmax(W z)[0] SE + softmax(W z)[1] MoE."""

    def __init__(self, kind: str, d_model: int):
        super().__init__()
        self.kind = kind
        if kind != "add":
            self.gate = nn.Linear(d_model, 1 if kind == "cg1" else 2, bias=False)

    def forward(self, se: torch.Tensor, moe: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "add":
            return se + moe
        if self.kind == "cg1":
            return torch.sigmoid(self.gate(z)) * se + moe
        coef = torch.softmax(self.gate(z), dim=-1)
        return coef[..., :1] * se + coef[..., 1:] * moe


def merge_outputs(a: MoEOutput, b: MoEOutput, y: torch.Tensor) -> MoEOutput:
    """One layer's two MoE passes (DGMoE) as one output: sums, and the mean of the router losses."""
    stats = {k: a.stats.get(k, 0.0) + b.stats.get(k, 0.0) for k in a.stats.keys() | b.stats.keys()}
    return MoEOutput(
        y_TD=y,
        aux={k: (a.aux[k] + b.aux[k]) / 2 for k in a.aux},
        tokens_per_expert_E=a.tokens_per_expert_E + b.tokens_per_expert_E,
        dropped=a.dropped + b.dropped,
        rows_routed=a.rows_routed + b.rows_routed,
        rows_sent=a.rows_sent + b.rows_sent,
        stats=stats,
        reduce={**a.reduce, **b.reduce},
    )


class SharedExpertBlock(nn.Module):
    """The shared-expert MoE baseline: a dense shared expert and routed experts on the same input."""

    def __init__(
        self,
        mcfg: ModelConfig,
        ecfg: MoEConfig,
        comm: Comm,
        layer_id: int,
        *,
        combine: str,
        settings: Config | None,
        seed: int,
    ):
        super().__init__()
        D = mcfg.d_model
        self.is_moe, self.layer_id = True, layer_id
        self.norm1, self.attn = make_norm(mcfg.norm, D), CausalSelfAttention(D, mcfg.n_heads, mcfg.dropout)
        self.norm2, self.se = make_norm(mcfg.norm, D), MLP(D, int(round(mcfg.mlp_ratio * D)))
        self.moe = MoELayer(ecfg, D, comm, layer_id, settings=settings, seed=seed, causal=True)  # a decoder
        self.combine = Combiner(combine, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEOutput]:
        h = x + self.attn(self.norm1(x))
        z = self.norm2(h)
        out = self.moe(z)
        return h + self.combine(self.se(z), out.y_TD, z), out


class ShortcutPair(nn.Module):
    """A ScMoE / DGMoE unit (see the module docstring): Block-MLP + Block-MoE, or a Block-MoE alone."""

    def __init__(
        self,
        mcfg: ModelConfig,
        ecfg: MoEConfig,
        comm: Comm,
        layer_id: int,
        *,
        with_mlp_block: bool,
        arch: str,
        shortcut: str,
        combine: str,
        overlap: bool,
        slot: int,
        warmup: int,
        settings: Config | None,
        seed: int,
    ):
        super().__init__()
        D, H = mcfg.d_model, mcfg.n_heads
        self.is_moe, self.arch, self.overlap = True, arch, overlap
        self.shortcut = shortcut if with_mlp_block else "pos1"
        self.stages = list(STAGES if with_mlp_block else STAGES[2:])
        self.available = AVAILABLE_AFTER[self.shortcut] - (0 if with_mlp_block else 2)
        self.shortcut_rep = SHORTCUT_REP[self.shortcut] if with_mlp_block else "x"  # a lone block's own input
        if with_mlp_block:
            self.normA1, self.attnA = make_norm(mcfg.norm, D), CausalSelfAttention(D, H, mcfg.dropout)
            self.normA2, self.mlpA = make_norm(mcfg.norm, D), MLP(D, int(round(mcfg.mlp_ratio * D)))
        self.normB1, self.attnB = make_norm(mcfg.norm, D), CausalSelfAttention(D, H, mcfg.dropout)
        self.norm_moe = make_norm(mcfg.norm, D)  # the routed experts' input norm (on the shortcut)
        self.norm_se = make_norm(mcfg.norm, D)  # the shared expert's (DGMoE: the current pass's) input norm
        if arch == "scmoe":
            self.se = MLP(D, int(round(mcfg.mlp_ratio * D)))
            self.combine = Combiner(combine, D)
        self.moe = MoELayer(ecfg, D, comm, layer_id, settings=settings, seed=seed, causal=True)  # a decoder
        self.comm, self.layer_id = comm, layer_id
        self.slot, self.warmup = slot, warmup  # slot < 0: adaptive after `warmup` synchronous steps
        self._times: dict[str, float] = {}
        self._seen = 0

    # ------------------------------------------------------------------------------------ stages

    def _run(self, stage: str, st: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        if stage == "attnA":
            st["hA"] = st["x"] + self.attnA(self.normA1(st["x"]))
        elif stage == "mlpA":
            st["hL"] = st["hA"] + self.mlpA(self.normA2(st["hA"]))
        elif stage == "attnB":
            src = st["hL"] if "hL" in st else st["x"]
            st["hB"] = src + self.attnB(self.normB1(src))
        else:
            st["se"] = self.se(self.norm_se(st["hB"]))
        self._note(stage, time.perf_counter() - t0)

    def _note(self, key: str, seconds: float) -> None:
        if self.training and self._measuring():
            prev = self._times.get(key)
            self._times[key] = seconds if prev is None else 0.5 * (prev + seconds)

    def _measuring(self) -> bool:
        return self.slot < 0 and self._seen < self.warmup

    def window_slot(self) -> int:
        """Where the experts run in the window: forced, or Eq. 11 on the warm-up measurements."""
        window = self._window()
        if self.slot >= 0:
            return min(self.slot, len(window))
        if not all(k in self._times for k in (*window, "dispatch", "combine")):
            return len(window) // 2
        return eq11_slot([self._times[k] for k in window], self._times["dispatch"], self._times["combine"])

    def _window(self) -> list[str]:
        stages = [s for s in self.stages if s != "se"] if self.arch == "dgmoe" else self.stages
        return stages[self.available :]

    def _overlap_now(self) -> bool:
        return self.overlap and not (self.training and self._measuring())

    def _a2a_times(self) -> None:
        """During warm-up, read this step's dispatch and combine times from the ledger."""
        if not (self.training and self._measuring()):
            return
        for rec in reversed(self.comm.ledger.records):
            tag = Tag(rec.tag)
            for op in (MoEOp.DISPATCH, MoEOp.COMBINE):
                kind = op.value
                if (
                    tag.layer == self.layer_id
                    and tag.op == kind
                    and tag.part is None
                    and rec.phase == "forward"
                    and kind not in self._step_seen
                ):
                    self._step_seen.add(kind)
                    self._note(kind, rec.seconds)

    # ------------------------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEOutput]:
        st: dict[str, torch.Tensor] = {"x": x}
        self._step_seen: set[str] = set()
        overlap = self._overlap_now()
        k = self.window_slot()
        if self.arch == "dgmoe":
            out = self._forward_dgmoe(st, overlap, k)
        else:
            for stage in self.stages[: self.available]:
                self._run(stage, st)
            moe_state = self.moe.begin(self.norm_moe(st[self.shortcut_rep]), overlap=overlap)
            window = self._window()
            for stage in window[:k]:
                self._run(stage, st)
            moe_state = self.moe.compute(moe_state)
            for stage in window[k:]:
                self._run(stage, st)
            out = self.moe.finish(moe_state)
            y = st["hB"] + self.combine(st["se"], out.y_TD, self.norm_se(st["hB"]))
            out.stats["scmoe_slot"] = float(k)
        self._a2a_times()
        if self.training:
            self._seen += 1
        return (y if self.arch != "dgmoe" else out.y_TD), out

    def _forward_dgmoe(self, st: dict[str, torch.Tensor], overlap: bool, k: int) -> MoEOutput:
        """DGMoE: the hA pass is dispatched after attnA; the hB pass excludes hA's top-1 expert."""
        self._run("attnA", st)
        prev_in = self.norm_moe(st["hA"])
        prev = self.moe.begin(prev_in, overlap=overlap)
        window = self._window()  # mlpA, attnB
        for stage in window[:k]:
            self._run(stage, st)
        prev = self.moe.compute(prev)
        for stage in window[k:]:
            self._run(stage, st)
        cur_in = self.norm_se(st["hB"])
        route = self.moe.router(cur_in.reshape(-1, cur_in.shape[-1]), exclude_T=prev.route.topk_ids_TK[:, 0])
        cur = self.moe.compute(self.moe.begin(cur_in, route=route, overlap=overlap))
        a, b = self.moe.finish(prev), self.moe.finish(cur)
        merged = merge_outputs(a, b, st["hB"] + a.y_TD + b.y_TD)
        same = prev.route.topk_ids_TK[:, 0].eq(route.topk_ids_TK[:, 0])
        merged.stats["dgmoe_repeat"] = float(same.float().mean()) if same.numel() else 0.0
        merged.stats["scmoe_slot"] = float(k)
        return merged
