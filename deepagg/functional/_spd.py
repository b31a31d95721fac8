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

__all__ = ["BASE", "block_edges", "inverse_cholesky_factor", "inverse_diagonal", "lower_gram"]

#: Largest matrix factorised directly by LAPACK in :func:`inverse_cholesky_factor` (the recursion's leaves).
#: Ad-hoc timings at n = 512 and 3072 (2 cores): leaves of 256-512 alike within 10 %, 128 about 10 % slower.
BASE = 384


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
