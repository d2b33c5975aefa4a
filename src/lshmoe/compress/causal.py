"""Causal-safe buckets (`lsh.causal`): in a causal LM a token's output never depends on a later token
of its own sequence.

A bucket that merges rows of one sequence at positions p < q hands position p the centroid of both,
so p's output depends on the later token q: in training the model can learn to read the future
through the merge. Two ways out, `lsh.causal_mode`:

- `earliest` (strict): a bucket is represented by the mean of its rows at the bucket's earliest
  position (several sequences may have a row there), and every member restores from that
  representative. A row's output then depends on its own hash and on rows at positions <= its own, of
  any sequence; by induction over the layers every hidden state at position p depends only on tokens
  at positions <= p, so no chain of merges through other sequences can carry a later token back,
  however many layers compress. The buckets, and so the rows sent, are those of the non-causal
  compressor; the price is restore error (a member's distance to a few rows of the bucket instead of
  to its mean).
- `split`: no bucket holds two rows of one sequence. A row's occurrence index is the number of rows of
  its own sequence at earlier positions in its bucket; sub-bucket k holds the k-th row of every
  sequence that has one there, with the mean as its centroid. A bucket where some sequence has c rows
  needs at least c sub-buckets, so this sends the fewest rows any such split can. It removes the direct
  path only: with two or more compressing layers a later token of sequence s can reach an earlier
  position of s through a row of another sequence (merged with it in one layer, merged with the
  earlier position in a later one), a second-order leak that `earliest` does not have.

Pure tensor code without host syncs; the PyTorch path (`compress/lsh.py`) and the fused path
(`compress/kernels/lsh.py`) share it.
"""

from __future__ import annotations

import torch

from lshmoe.compress.protocol import Positions


def occurrence(group_N: torch.Tensor, at: Positions) -> torch.Tensor:
    """occ[n] = the number of rows m with group[m] == group[n], seq[m] == seq[n] and an earlier
    position (int64 [N]; positions within a sequence are distinct)."""
    N = group_N.numel()
    if N == 0:
        return group_N.new_zeros(0)
    order = torch.sort(at.pos_N, stable=True).indices  # rows by (group, seq, position): the last key first
    for key in (at.seq_N, group_N):
        order = order.index_select(0, torch.sort(key.index_select(0, order), stable=True).indices)
    g, s = group_N.index_select(0, order), at.seq_N.index_select(0, order)
    new = torch.ones(N, dtype=torch.bool, device=group_N.device)
    new[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    idx = torch.arange(N, device=group_N.device)
    run_start = torch.cummax(torch.where(new, idx, 0), 0).values
    occ = torch.empty_like(idx)
    occ[order] = idx - run_start
    return occ


def split_keys(slot_N: torch.Tensor, at: Positions) -> torch.Tensor:
    """`split`: a sortable key of each row's sub-bucket, slot * N + occurrence, where `slot_N` is the
    rank of the row's (expert, bucket) key among the distinct ones. Sorted, the keys keep the buckets'
    order and put a bucket's sub-buckets in occurrence order."""
    return slot_N * slot_N.numel() + occurrence(slot_N, at)


def earliest_inverse(inverse_N: torch.Tensor, at: Positions, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`earliest`: the rows that represent their bucket (those at its earliest position) keep their
    bucket id, every other row goes to an extra bucket `buckets`; returns (that inverse, its sizes
    [buckets + 1]). A segment mean over them, last row dropped, is each bucket's representative."""
    first_M = torch.full((buckets,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=inverse_N.device)
    first_M.scatter_reduce_(0, inverse_N, at.pos_N, "amin")
    lead_inv = torch.where(at.pos_N == first_M.index_select(0, inverse_N), inverse_N, buckets)
    size = torch.zeros(buckets + 1, dtype=torch.int64, device=inverse_N.device)
    return lead_inv, size.index_add_(0, lead_inv, torch.ones_like(lead_inv))  # the extra one may be empty
