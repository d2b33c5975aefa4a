"""Locality-sensitive hash families (pure functions).

Shapes: N rows, D width, L hash functions, b buckets per hash, P projections per hash.

- cross-polytope (Andoni et al. 2015; the LSH-MoE paper's choice): hash l projects x on P = b/2
  orthonormal random directions R_l (a random rotation restricted to P axes) and returns the index
  of the largest entry of [x R_l ; -x R_l], i.e. the nearest of the 2P signed axes. b = 2 is the
  sign of one random projection.
- hyperplane (SimHash; our reading of the paper's "spherical-plane" family): hash l is the P =
  log2(b) sign bits of x R_l, read as a binary number.

Both are invariant to the scale of x. The L codes are AND-combined into one mixed-radix integer
`sum_l code_l * b^l`: two rows share a bucket only when all L hashes agree, so more hashes mean
more, smaller buckets. Because hash l sits at digit l, the bucket id of the first L' hashes is the
combined id modulo b^L', which the target modes use to evaluate every L' <= L in one pass.

Data-aware projections (`lsh.projection=pca`, beyond the paper): instead of random directions, a
group's rows are centred and projected on the group's own leading principal directions V (top-k of
an SVD of the centred rows, signs fixed so the largest entry of each direction is positive), either
in order (hash l reads directions lP .. lP+P-1, so a prefix of L' hashes reads the L'P leading ones)
or through a seeded random rotation Q of the k leading ones (R = V Q). The bucket ids are a function
of the group's rows alone: nothing about the directions crosses the network.
"""

from __future__ import annotations

import math

import torch

FAMILIES = ("cross_polytope", "hyperplane")


def projections_per_hash(family: str, buckets: int) -> int:
    if family == "cross_polytope":
        return buckets // 2
    return int(math.log2(buckets))


def draw_projections(family: str, d_model: int, num_hashes: int, buckets: int, gen: torch.Generator) -> torch.Tensor:
    """Random directions R_DLP (float32, CPU) from `gen`; cross-polytope columns are orthonormal per hash."""
    P = projections_per_hash(family, buckets)
    g = torch.randn(num_hashes, d_model, P, generator=gen, dtype=torch.float32)
    if family == "cross_polytope" and P > 1:
        g = torch.linalg.qr(g).Q  # [L, D, P], orthonormal columns: a rotation restricted to P axes
    return g.permute(1, 0, 2).contiguous()  # [D, L, P]


def hash_codes(x_ND: torch.Tensor, R_DLP: torch.Tensor, family: str) -> torch.Tensor:
    """Per-hash bucket codes [N, L] in [0, b)."""
    D, L, P = R_DLP.shape
    return codes_from_projections((x_ND.to(R_DLP.dtype) @ R_DLP.reshape(D, L * P)).view(-1, L, P), family)


def codes_from_projections(z_NLP: torch.Tensor, family: str) -> torch.Tensor:
    """Bucket codes [N, L] from projected rows [N, L, P]."""
    P = z_NLP.shape[-1]
    if family == "cross_polytope":
        # argmax over [z; -z]: the axis of largest |z|, in the upper half when its sign is negative
        axis = z_NLP.abs().argmax(dim=-1, keepdim=True)
        negative = torch.gather(z_NLP, -1, axis) < 0
        return (axis + P * negative.long()).squeeze(-1)
    weights_P = 2 ** torch.arange(P, device=z_NLP.device)
    return ((z_NLP > 0).long() * weights_P).sum(-1)


def combine_codes(codes_NL: torch.Tensor, buckets: int) -> torch.Tensor:
    """AND-combination: one int64 id per row, sum_l code_l * b^l."""
    L = codes_NL.shape[1]
    radix_L = buckets ** torch.arange(L, device=codes_NL.device, dtype=torch.int64)
    return (codes_NL.long() * radix_L).sum(-1)


def principal_directions(x_nD: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and the k leading principal directions V_Dk of the rows (columns orthonormal, each
    signed so its largest-magnitude entry is positive; zero columns beyond the rank of the centred rows)."""
    n, D = x_nD.shape
    mean_D = x_nD.mean(0) if n else x_nD.new_zeros(D)
    V_Dk = x_nD.new_zeros(D, k)
    if n < 2:
        return mean_D, V_Dk
    _, S, Vh = torch.linalg.svd(x_nD - mean_D, full_matrices=False)
    # NOTE: directions of a zero singular value (beyond the rank of the centred rows) are arbitrary
    rank = int((S > S[0] * max(n, D) * torch.finfo(S.dtype).eps).sum()) if float(S[0]) > 0 else 0
    Vh = Vh[: min(k, rank)]  # [min(k, rank), D]
    big = Vh.abs().argmax(dim=1, keepdim=True)
    V_Dk[:, : Vh.shape[0]] = (Vh * torch.gather(Vh, 1, big).sign()).T
    return mean_D, V_Dk


def pca_projections(x_nD: torch.Tensor, k: int, rotation_kK: torch.Tensor | None = None) -> torch.Tensor:
    """Centred rows on their k leading principal directions [n, k], or on a rotation of them [n, K]."""
    mean_D, V_Dk = principal_directions(x_nD, k)
    R = V_Dk if rotation_kK is None else V_Dk @ rotation_kK.to(V_Dk.dtype)
    return (x_nD - mean_D) @ R
