"""Token-choice top-k router with its auxiliary losses.

Shapes: T tokens, D model width, E experts, K experts per token.

    logits_TE = x_TD @ W_gate_ED^T            (in float32, or float64 for float64 inputs)
    scores_TE = softmax(logits_TE)  or  sigmoid(logits_TE)            (`score`, DeepSeek-V3: sigmoid)
    select_TE = scores_TE + bias_E                                     (`correction_bias`: selection only)
    groups:    the E experts in n_group groups, a group scored by the sum of its two best select
               scores; only the topk_group best groups are eligible    (`n_group`, `topk_group`)
    topk_ids_TK = topk(select_TE, K);  topk_probs_TK = scores_TE[topk_ids_TK]
    weights_TK = s * topk_probs_TK / sum_k topk_probs_TK   (when normalize_weights; else s * the raw
               scores; with K = 1 the weight stays the raw score unless normalize_top1, HF's rule, sets
               it to 1); s = routed_scaling_factor

The correction bias is not learnt by gradient: DeepSeek-V3's auxiliary-loss-free balancing moves it
after every step, bias_e += u * sign(mean_e load - load_e), with the load counted over every rank
(`update_correction_biases`).

Auxiliary losses (returned unweighted; the model applies the configured weights), and with a
topology the locality loss of LocMoE (moe/locality.py):
- load balance (Switch Transformer / GShard): E * sum_e f_e * P_e, with f_e the fraction of the T*K
  assignments that chose expert e and P_e the mean router probability of e. It is 1 under a uniform
  router and grows as the load concentrates.
  P_e uses the scores normalised per token (the probabilities themselves for softmax). With the
  `hf` convention it is multiplied by K (f_e as the fraction of the T tokens, as transformers counts
  it), so `aux_loss_weight` means what `router_aux_loss_coef` means there.
- sequence-level load balance (DeepSeek-V3's complementary loss, with `seq_aux`): the same loss
  computed over each sequence's tokens, then averaged over the sequences.
- z-loss (ST-MoE): mean_t logsumexp(logits_t)^2, which keeps the logits small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lshmoe.distributed.comm import Comm
from lshmoe.moe.locality import GrAPGate, locality_loss, node_limited_mask
from lshmoe.moe.param_kinds import ParamKind, mark


@dataclass(kw_only=True, slots=True)
class RouterOutput:
    topk_ids_TK: torch.Tensor  # int64 expert ids, best first
    topk_probs_TK: torch.Tensor  # router probabilities of the chosen experts (float32/64)
    weights_TK: torch.Tensor  # combine weights in the input dtype
    aux: dict[str, torch.Tensor]  # unweighted auxiliary losses
    probs_TE: torch.Tensor | None = None  # per-token normalised scores (the aux losses' P), with grad


@dataclass(kw_only=True, slots=True)
class RoutingOptions:
    """How scores become a choice of experts (see the module docstring); defaults = softmax top-k."""

    score: str = "softmax"  # softmax | sigmoid
    n_group: int = 0  # 0/1 = no group-limited selection
    topk_group: int = 0
    correction_bias: bool = False  # a selection-only bias per expert (e_score_correction_bias)
    bias_update_rate: float = 0.0  # u of the auxiliary-loss-free update; 0 = the bias stays fixed
    scaling_factor: float = 1.0  # routed_scaling_factor
    normalize_top1: bool = False  # with normalize_weights and K = 1: weight 1 (HF) instead of the raw score
    aux_convention: str = "lshmoe"  # lshmoe: f_e over T*K assignments; hf: over T tokens (x K)
    seq_aux: bool = False  # also return the sequence-level load-balance loss

    @classmethod
    def from_config(cls, cfg) -> RoutingOptions:  # cfg: MoEConfig (not imported: config imports nothing of moe)
        same = (
            "score",
            "n_group",
            "topk_group",
            "correction_bias",
            "bias_update_rate",
            "normalize_top1",
            "aux_convention",
        )
        return cls(
            **{k: getattr(cfg, k) for k in same},
            scaling_factor=cfg.routed_scaling_factor,
            seq_aux=cfg.seq_aux_weight > 0,
        )


def router_math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def load_balance_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_e (fraction of assignments to e) * (mean probability of e)."""
    num_experts = probs_TE.shape[-1]
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0
    counts_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
    f_E = counts_E / topk_ids_TK.numel()
    return num_experts * (f_E * probs_TE.mean(0)).sum()


def seq_load_balance_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The load-balance loss of each sequence of `seq_len` consecutive tokens, averaged over sequences."""
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0
    B, K = T // seq_len, topk_ids_TK.shape[-1]
    onehot_BE = torch.zeros(B, E, dtype=probs_TE.dtype, device=probs_TE.device)
    onehot_BE.scatter_add_(1, topk_ids_TK.reshape(B, -1), torch.ones(B, seq_len * K, dtype=probs_TE.dtype))
    f_BE = onehot_BE / (seq_len * K)
    return E * (f_BE * probs_TE.reshape(B, seq_len, E).mean(1)).sum(-1).mean()


def group_limited_mask(select_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Experts eligible per token: those of the `topk_group` groups whose two best scores sum highest."""
    T, E = select_TE.shape
    per_group = select_TE.view(T, n_group, E // n_group)
    group_score_TG = per_group.topk(min(2, E // n_group), dim=-1).values.sum(-1)
    best_TG = torch.topk(group_score_TG, topk_group, dim=-1).indices
    keep_TG = torch.zeros(T, n_group, dtype=torch.bool, device=select_TE.device).scatter_(1, best_TG, True)
    return keep_TG[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class TopKRouter(nn.Module):
    """Softmax top-k over a gate's logits; optional multiplicative jitter on the input while training.

    The gate is a learnable linear map (`gate="topk"`) or LocMoE's GrAP (`gate="locmoe"`). With a
    topology (`set_topology`), the router can add the locality loss and limit every token to the
    experts of at most `node_limit` nodes (moe/locality.py)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        jitter: float = 0.0,
        normalize_weights: bool = True,
        gate: str = "topk",
        node_bias: bool = False,
        options: RoutingOptions | None = None,
    ):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.jitter, self.normalize_weights = jitter, normalize_weights
        self.options = opt = options or RoutingOptions()
        # Not trained by gradient (requires_grad=False), but a parameter so that checkpoints hold it.
        bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False) if opt.correction_bias else None
        self.register_parameter("e_score_correction_bias", bias)
        self.register_buffer("load_E", torch.zeros(num_experts), persistent=False)  # since the last bias update
        if gate == "locmoe":
            self.grap = GrAPGate(d_model, num_experts)
        else:
            self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        # Per-node bias (ParamKind.NODE): the same on the ranks of one node, different between nodes.
        bias = mark(nn.Parameter(torch.zeros(num_experts)), ParamKind.NODE) if node_bias else None
        self.register_parameter("node_bias", bias)
        self.node_of_E: torch.Tensor | None = None
        self.local_E: torch.Tensor | None = None
        self.node_limit = 0

    def set_topology(self, node_of_E: torch.Tensor, my_node: int, node_limit: int, locality: bool) -> None:
        """Which node hosts each expert; enables the locality loss and/or node-limited routing."""
        self.node_of_E, self.node_limit = node_of_E, node_limit
        self.local_E = (node_of_E == my_node) if locality else None

    def gate_vectors(self) -> torch.Tensor:
        """The experts' gate vectors w_i [E, D] (LocMoE's capacity bound measures cos(x, w_i))."""
        return self.grap.weight if hasattr(self, "grap") else self.weight.detach()

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """fp32 (float64 in float64 runs) whatever the compute dtype: bf16 logits flip top-k choices."""
        math_dtype = router_math_dtype(x_TD)
        with torch.autocast(x_TD.device.type, enabled=False):
            if hasattr(self, "grap"):
                return self.grap(x_TD.to(math_dtype))
            return x_TD.to(math_dtype) @ self.weight.to(math_dtype).t()

    def forward(
        self, x_TD: torch.Tensor, exclude_T: torch.Tensor | None = None, seq_len: int | None = None
    ) -> RouterOutput:
        """Route `x_TD`; `exclude_T` (expert id per token, or -1) bars one expert per token (DGMoE);
        `seq_len` (tokens per sequence, consecutive) enables the sequence-level load-balance loss."""
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        logits_TE = self.logits(x_TD)
        if self.node_bias is not None:
            logits_TE = logits_TE + self.node_bias.to(logits_TE.dtype)
        allowed_TE = None
        if self.node_limit > 0 and self.node_of_E is not None:
            allowed_TE = node_limited_mask(
                torch.softmax(logits_TE, -1), self.node_of_E.to(logits_TE.device), self.node_limit
            )
        local_E = None if self.local_E is None else self.local_E.to(logits_TE.device)
        out = route(
            logits_TE,
            self.top_k,
            self.normalize_weights,
            x_TD.dtype,
            exclude_T,
            allowed_TE,
            local_E,
            options=self.options,
            bias_E=self.e_score_correction_bias,
            seq_len=seq_len,
        )
        if self.training and self.options.bias_update_rate > 0:
            self.load_E += torch.bincount(out.topk_ids_TK.reshape(-1), minlength=self.num_experts).to(self.load_E)
        return out


@torch.no_grad()
def update_correction_biases(model: nn.Module, comm: Comm) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3), after an optimizer step: every router with a
    bias update rate u moves its selection bias by u * sign(mean load - load), the load summed over
    every rank since the last update, so all ranks keep the same bias."""
    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and m.options.bias_update_rate > 0]
    if not routers:
        return
    load_LE = torch.stack([r.load_E for r in routers]).to(comm.device)
    comm.all_reduce(load_LE, comm.group("world"), "router.load")
    for r, load_E in zip(routers, load_LE.to(routers[0].load_E.device), strict=True):
        step_E = r.options.bias_update_rate * torch.sign(load_E.mean() - load_E)
        r.e_score_correction_bias.add_(step_E.to(r.e_score_correction_bias))
        r.load_E.zero_()


def route(
    logits_TE: torch.Tensor,
    top_k: int,
    normalize_weights: bool,
    out_dtype: torch.dtype,
    exclude_T: torch.Tensor | None = None,
    allowed_TE: torch.Tensor | None = None,
    local_E: torch.Tensor | None = None,
    *,
    options: RoutingOptions | None = None,
    bias_E: torch.Tensor | None = None,
    seq_len: int | None = None,
) -> RouterOutput:
    """Top-k routing of precomputed logits (shared by every gate that produces logits).

    With `exclude_T`, a token's barred expert cannot be chosen (its next-ranked expert is); with
    `allowed_TE`, only the allowed experts can be; the weights stay the unmasked scores of the
    chosen experts. With `local_E`, the locality loss is added to the auxiliary losses."""
    opt = options or RoutingOptions()
    if opt.score == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
    else:
        scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
    select_TE = scores_TE.detach() if bias_E is None else scores_TE.detach() + bias_E.to(scores_TE.dtype)
    if opt.n_group > 1:
        select_TE = select_TE.masked_fill(~group_limited_mask(select_TE, opt.n_group, opt.topk_group), -math.inf)
    if allowed_TE is not None:
        select_TE = select_TE.masked_fill(~allowed_TE, -math.inf)
    if exclude_T is not None:
        barred = (exclude_T >= 0)[:, None] & (
            torch.arange(scores_TE.shape[-1], device=scores_TE.device)[None, :] == exclude_T[:, None]
        )
        select_TE = select_TE.masked_fill(barred, -math.inf)
    topk_ids_TK = torch.topk(select_TE, top_k, dim=-1).indices
    topk_probs_TK = scores_TE.gather(-1, topk_ids_TK)
    weights_TK = topk_probs_TK
    if normalize_weights and (top_k > 1 or opt.normalize_top1):
        weights_TK = topk_probs_TK / topk_probs_TK.sum(-1, keepdim=True)
    if opt.scaling_factor != 1.0:
        weights_TK = weights_TK * opt.scaling_factor
    lb_scale = top_k if opt.aux_convention == "hf" else 1
    aux = {"load_balance": lb_scale * load_balance_loss(probs_TE, topk_ids_TK), "z_loss": z_loss(logits_TE)}
    if opt.seq_aux and seq_len:
        aux["seq_load_balance"] = lb_scale * seq_load_balance_loss(probs_TE, topk_ids_TK, seq_len)
    if local_E is not None:
        aux["locality"] = locality_loss(probs_TE, local_E)
    return RouterOutput(
        topk_ids_TK=topk_ids_TK,
        topk_probs_TK=topk_probs_TK.detach(),
        weights_TK=weights_TK.to(out_dtype),
        aux=aux,
        probs_TE=probs_TE,
    )
