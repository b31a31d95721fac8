r"""Symmetric positive definite (SPD) building blocks: blocked Gram matrices and the diagonal of an inverse.

HeW needs only :math:`\mathrm{diag}(K^{-1})` of an SPD matrix K (n x n, or C x C in its Woodbury form), batched and
differentiable. With :math:`K = L L^\top` (Cholesky) and :math:`M = L^{-1}`, :math:`K^{-1} = M^\top M`, so
:math:`(K^{-1})_{ll} = \sum_i M_{il}^2`: a sum of squares, without cancellation. :func:`inverse_cholesky_factor`
computes M by recursion on 2 x 2 blocks,

.. math::
    M_{11} = \mathrm{chol}(K_{11})^{-1}, \quad L_{21} = K_{21} M_{11}^\top, \quad
    M_{22} = \mathrm{chol}(K_{22} - L_{21} L_{21}^\top)^{-1}, \quad M_{21} = -M_{22} L_{21} M_{11},

so everything but the small diagonal blocks is a matrix product (GEMM). Why not torch's own calls: on CPU
``torch.linalg.cholesky`` copies its input into a column-major triangle element by element before LAPACK runs
(an ad-hoc ``torch.profiler`` reading for one 3072 x 3072 float32 matrix on 2 cores: 98 ms of copying beside
39 ms of factorisation), and ``torch.cholesky_inverse`` runs below GEMM speed. ``benchmarks/bench_heat.py``
times :func:`inverse_diagonal` against ``cholesky_inverse(cholesky(K)).diagonal()`` at n = 512 and 3072 (its
"inverse diagonal" rows). Never batched LU (``environment.md``).

Only the lower triangle of K is read (LAPACK reads the lower triangle of the leaves; with autograd they are
symmetrised from it, so the gradient is that of a function of the lower triangle), so a caller may pass a matrix
whose strictly upper blocks were never computed, and the gradient is exact.
"""

from __future__ import annotations

import itertools

import torch

__all__ = [
    "BASE",
    "SOLVE_BASE",
    "block_edges",
    "cholesky_blocks_",
    "forward_substitute_",
    "inverse_cholesky_factor",
    "inverse_diagonal",
    "lower_gram",
]

#: Largest matrix factorised directly by LAPACK in :func:`inverse_cholesky_factor` (the recursion's leaves).
#: Ad-hoc timings at n = 512 and 3072 (2 cores): leaves of 256-512 alike within 10 %, 128 about 10 % slower.
BASE = 384

#: Leaf size of :func:`cholesky_blocks_` / :func:`forward_substitute_`. Ad-hoc timings of HeW's Woodbury path at
#: C = 512 (8 images, 2 Intel cores, 2026-12-02): leaves of 64 about 5 % faster than 32 and 128.
SOLVE_BASE = 64


def block_edges(n: int, blocks: int) -> list[int]:
    """``blocks + 1`` increasing edges splitting ``range(n)`` into nearly equal parts (empty parts dropped)."""
    return sorted({n * i // blocks for i in range(blocks + 1)})


def lower_gram(z: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    r""":math:`Z Z^\top` of ``z`` (..., n, C) with only its lower block triangle computed, (..., n, n).

    The n rows are cut into ``blocks`` parts; block row i is ``z_i @ z[:end_i].T`` (the diagonal blocks in full,
    the strictly upper blocks left 0): :math:`(b + 1) / (2b)` of the multiply-adds of the full product. The
    result is meant for :func:`inverse_cholesky_factor`, which reads only the lower triangle.
    """
    n = z.shape[-2]
    edges = block_edges(n, blocks)
    if len(edges) <= 2:
        return z @ z.mT
    if not (z.requires_grad or torch.compiler.is_compiling()):  # write the blocks in place: no pads, no cat
        out = z.new_zeros((*z.shape[:-1], n))
        for a, b in itertools.pairwise(edges):
            torch.matmul(z[..., a:b, :], z[..., :b, :].mT, out=out[..., a:b, :b])
        return out
    rows = []
    for a, b in itertools.pairwise(edges):
        part = z[..., a:b, :] @ z[..., :b, :].mT
        pad = part.new_zeros((*part.shape[:-1], n - b))
        rows.append(torch.cat([part, pad], dim=-1))
    return torch.cat(rows, dim=-2)


def _leaf(k: torch.Tensor) -> torch.Tensor:
    """The inverse Cholesky factor of a small SPD ``k`` from its lower triangle; NaN where not SPD."""
    if k.requires_grad:  # LAPACK reads the lower triangle anyway; symmetrised, the gradient is that of the lower one
        k = k.tril() + k.tril(-1).mT
    factor, info = torch.linalg.cholesky_ex(k)
    bad = (info != 0)[..., None, None]
    if factor.requires_grad:
        factor = torch.where(bad, torch.full_like(factor, float("nan")), factor)
    else:
        factor.masked_fill_(bad, float("nan"))
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device).expand_as(factor)
    return torch.linalg.solve_triangular(factor, eye, upper=False)


def inverse_cholesky_factor(k: torch.Tensor, base: int | None = None) -> torch.Tensor:
    r""":math:`M = L^{-1}` of the Cholesky factor L of the SPD matrices ``k`` (..., n, n): :math:`K^{-1} = M^\top M`.

    Lower triangular, batched, differentiable; reads only the lower triangle of ``k``. A matrix that is not
    positive definite gives NaN in its own batch item (never an error). ``base`` (default :data:`BASE`) is the
    size below which LAPACK factorises directly.
    """
    n = k.shape[-1]
    base = BASE if base is None else base
    if n <= base:
        return _leaf(k)
    h = n // 2
    m11 = inverse_cholesky_factor(k[..., :h, :h], base)
    l21 = k[..., h:, :h] @ m11.mT
    m22 = inverse_cholesky_factor(k[..., h:, h:] - l21 @ l21.mT, base)
    m21 = -(m22 @ (l21 @ m11))
    upper = torch.cat([m11, m11.new_zeros((*m11.shape[:-1], n - h))], dim=-1)
    return torch.cat([upper, torch.cat([m21, m22], dim=-1)], dim=-2)


def inverse_diagonal(k: torch.Tensor, base: int | None = None) -> torch.Tensor:
    r""":math:`\mathrm{diag}(K^{-1})` (..., n) of SPD ``k`` (..., n, n) from its lower triangle; NaN where not SPD."""
    m = inverse_cholesky_factor(k, base)
    return (m * m).sum(-2) if m.requires_grad else m.mul_(m).sum(-2)


def cholesky_blocks_(k: torch.Tensor, base: int | None = None) -> torch.Tensor:
    r"""In place, without autograd: a recursive Cholesky factorisation :math:`K = L L^\top` of SPD ``k`` (..., n, n).

    Reads only the lower triangle. Recursion on 2 x 2 blocks down to leaves of at most ``base`` (default
    :data:`SOLVE_BASE`): a leaf's Cholesky factor is inverted (LAPACK, small), the off-diagonal block is the
    right triangular solve :math:`L_{21} = K_{21} L_{11}^{-\top}` (by the same recursion, so by matrix products),
    then :math:`K_{22} - L_{21} L_{21}^\top` is factorised. Afterwards the diagonal leaf blocks of ``k`` hold
    :math:`L_{\text{leaf}}^{-1}`, each off-diagonal block of the recursion holds its block of :math:`L`, and the
    strictly upper part holds garbage: the form :func:`forward_substitute_` reads. Half the products of
    :func:`inverse_cholesky_factor` (no off-diagonal block of :math:`L^{-1}` is formed), for callers that only
    apply :math:`L^{-1}`. A matrix that is not positive definite gets NaN in its own batch item.

    Returns:
        ``k``.
    """
    base = SOLVE_BASE if base is None else base
    n = k.shape[-1]
    if n <= base:
        k.copy_(_leaf(k))
        return k
    h = n // 2
    cholesky_blocks_(k[..., :h, :h], base)
    l21 = k[..., h:, :h]
    _right_solve_(k[..., :h, :h], l21, base)
    k[..., h:, h:].sub_(l21 @ l21.mT)
    cholesky_blocks_(k[..., h:, h:], base)
    return k


def _right_solve_(f: torch.Tensor, x: torch.Tensor, base: int) -> None:
    r""":math:`X \leftarrow X L^{-\top}` in place, ``f`` from :func:`cholesky_blocks_` (m x m), ``x`` (..., r, m)."""
    m = f.shape[-1]
    if m <= base:
        x.copy_(x @ f.mT)
        return
    h = m // 2
    x1, x2 = x[..., :h], x[..., h:]
    _right_solve_(f[..., :h, :h], x1, base)
    x2.sub_(x1 @ f[..., h:, :h].mT)
    _right_solve_(f[..., h:, h:], x2, base)


def forward_substitute_(f: torch.Tensor, z: torch.Tensor, base: int | None = None) -> torch.Tensor:
    r""":math:`Z \leftarrow L^{-1} Z` in place, without autograd: block forward substitution, all matrix products.

    ``f`` comes from :func:`cholesky_blocks_` (..., m, m) with the same ``base``; ``z`` is (..., m, r).

    Returns:
        ``z``.
    """
    base = SOLVE_BASE if base is None else base
    m = f.shape[-1]
    if m <= base:
        z.copy_(f @ z)
        return z
    h = m // 2
    z1, z2 = z[..., :h, :], z[..., h:, :]
    forward_substitute_(f[..., :h, :h], z1, base)
    z2.sub_(f[..., h:, :h] @ z1)
    forward_substitute_(f[..., h:, h:], z2, base)
    return z
