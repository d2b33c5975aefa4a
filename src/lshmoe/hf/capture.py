"""The FFN inputs of a converted model's MoE layers, grouped as the compressor receives them.

LSH-MoE compresses, per (source rank, destination expert) group, the rows a rank sends to one
expert. To measure it on real activations (of an upcycled BERT after some masked-LM steps, say),
`capture_ffn_inputs` runs one forward and keeps, for every MoE layer, the rows each rank routes to
each expert (after capacity drops, before compression), gathered from all ranks.

File format (torch.save of a dict; every tensor on the CPU):

    "format":       1
    "world_size":   W (source ranks), "num_experts": E, "top_k": K, "d_model": D
    "dtype":        the activations' dtype, as a string (e.g. "torch.float32")
    "meta":         the caller's dict (model, steps, compressor, ...)
    "layers":       {layer index: {
        "rows_ND":    [N, D]  the rows, ordered by source rank, then expert (expert-major per rank)
        "counts_WE":  [W, E]  int64: group (r, e) has counts_WE[r, e] rows
        "token_N":    [N]     int64: each row's token index in its source rank's batch (B * S order)
    }}

Group (r, e) is rows_ND[o : o + counts_WE[r, e]] with o = counts_WE.flatten()[: r * E + e].sum();
`groups(layer)` splits a layer into that list. A token routed to K experts appears K times, once
in each group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lshmoe.distributed.comm import Comm
from lshmoe.hf.model import moe_blocks

FORMAT = 1


def _gather_rows(comm: Comm, rows_ND: torch.Tensor, counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows (padded to the longest, gathered, trimmed) and counts, in rank order."""
    world = comm.group("world")
    counts_WE = comm.all_gather(counts_E.to(torch.int64), world, "capture.counts")
    rows_W = counts_WE.sum(1)
    padded = rows_ND.new_zeros((int(rows_W.max()), *rows_ND.shape[1:]))
    padded[: rows_ND.shape[0]] = rows_ND
    gathered = comm.all_gather(padded, world, "capture.rows")
    return torch.cat([gathered[r, : int(n)] for r, n in enumerate(rows_W)]), counts_WE


@torch.no_grad()
def capture_ffn_inputs(
    model: nn.Module,
    comm: Comm,
    input_ids: torch.Tensor,
    path: str | Path | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Forward this rank's `input_ids` [B, S] (eval mode, no dropout) and return the capture, the same
    on every rank; rank 0 also writes it to `path` when given. All ranks must call it together."""
    blocks = moe_blocks(model)
    assert blocks, "the model has no MoE layers"
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        b.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, args[0].detach())) for i, b in blocks
    ]
    was_training = model.training
    model.eval()
    try:
        with comm.ledger.in_phase("metrics"):
            model(input_ids=input_ids)
            layers = {}
            for i, b in blocks:
                x_TD = seen[i].reshape(-1, seen[i].shape[-1])
                perm_N, counts_E, rows_ND = b.moe.group_rows(x_TD, b.last_route)
                K = b.last_route.topk_ids_TK.shape[-1]
                token_N, _ = _gather_rows(comm, (perm_N // K).to(torch.int64)[:, None], counts_E)
                rows_ND, counts_WE = _gather_rows(comm, rows_ND, counts_E)
                layers[i] = {"rows_ND": rows_ND.cpu(), "counts_WE": counts_WE.cpu(), "token_N": token_N[:, 0].cpu()}
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    mcfg, first = model.moe_cfg, blocks[0][1].moe.experts
    out = {
        "format": FORMAT,
        "world_size": comm.world_size,
        "num_experts": mcfg.num_experts,
        "top_k": mcfg.top_k,
        "d_model": first.d_model,
        "dtype": str(seen[blocks[0][0]].dtype),
        "meta": dict(meta or {}),
        "layers": layers,
    }
    if path is not None and comm.rank == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def groups(layer: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
    """One captured layer as groups[r][e]: the [n, D] rows source rank r sent to expert e."""
    W, E = layer["counts_WE"].shape
    parts = torch.split(layer["rows_ND"], layer["counts_WE"].flatten().tolist())
    return [list(parts[r * E : (r + 1) * E]) for r in range(W)]


__all__ = ["capture_ffn_inputs", "groups"]
