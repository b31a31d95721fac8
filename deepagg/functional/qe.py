r"""Query expansion (AQE, alpha-QE) and database-side augmentation (DBA), batched over all rows at once.

Inputs are L2-normalised descriptor rows, so the dot products computed here are cosine similarities. Both
functions compute one similarity matrix by a single matmul, select the top k per row with ``torch.topk`` plus an
exact tie rule, and sum the selected rows with their weights; there is no per-query loop.

Neighbour selection (design.md 3.1): the k most similar database rows, ties at the k-th similarity going to
the lower index; for :func:`dba`, row ``i`` itself is excluded (``NN_k(i)`` is over ``j != i``). Only the *set*
of neighbours matters for the sum, so the result is independent of the order ``topk`` returns.

Weights: ``alpha = 0`` is average query expansion (AQE, Chum et al. ICCV 2007): every selected neighbour has
weight 1. ``alpha > 0`` is alpha-QE (Radenović, Tolias and Chum, TPAMI 2018): neighbour ``x_i`` with similarity
``s_i`` has weight :math:`\max(s_i, 0)^\alpha`. The row itself always has weight 1, and the sum is
L2-normalised.

Gradients: the selection is piecewise constant in the inputs; the result is differentiable through the summed
rows and (for ``alpha > 0``) through the weights. The weight of a neighbour with :math:`s_i \le 0` is exactly 0,
with zero gradient; for ``0 < alpha < 1`` the weight's derivative grows without bound as :math:`s_i \to 0^+`.
"""

from __future__ import annotations

import math

import torch

from deepagg._checks import check_floating, check_int, check_same_device, check_shape
from deepagg.functional.normalize import l2n

__all__ = ["dba", "query_expansion"]


def _check_k(k: int, fn: str) -> int:
    return check_int(k, name="k", fn=fn, minimum=0)


def _check_alpha(alpha: float, fn: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{fn}(): alpha must be a float >= 0; got {type(alpha).__name__} {alpha!r}.")
    if not 0 <= alpha < math.inf:  # also False for NaN; plain comparisons keep symbolic floats traceable
        raise ValueError(f"{fn}(): alpha must be a finite float >= 0 (0 = AQE, > 0 = alpha-QE); got {alpha}.")
    return alpha


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _topk_lower_index(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices ``(R, k)`` of the k largest entries of each row of ``sim``, ties to the lower index.

    ``torch.topk`` returns the exact k largest *values* but an arbitrary choice among equal ones. Its sorted
    output starts with the entries strictly above the k-th value ``t``; the remaining ``need`` slots are filled
    here with the ``need`` lowest-index entries equal to ``t`` (found by a second ``topk`` on the key
    ``N - j`` over the tied columns ``j``). Two ``topk`` calls and one comparison pass, no sort, no host sync.
    """
    with torch.no_grad():
        n = sim.shape[1]
        top = torch.topk(sim, k, dim=1)
        kth = top.values[:, k - 1 : k]
        n_above = k - (top.values == kth).sum(dim=1, keepdim=True)  # entries strictly above t come first
        key_dtype = torch.int32 if n < 2**31 - 1 else torch.int64
        rev = torch.arange(n, 0, -1, dtype=key_dtype, device=sim.device)
        lowest_tied = torch.topk(torch.where(sim == kth, rev, 0), k, dim=1).indices  # ascending column index
        pos = torch.arange(k, device=sim.device)
        fill = lowest_tied.gather(1, (pos - n_above).clamp(min=0))
        return torch.where(pos < n_above, top.indices, fill)


def _expand(x: torch.Tensor, sim: torch.Tensor, db: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """``x + sum_{j in topk(sim)} w_j db_j`` for every row, all in the compute dtype."""
    idx = _topk_lower_index(sim, k)  # (R, k)
    neighbours = db[idx]  # (R, k, D)
    if alpha == 0.0:
        return x + neighbours.sum(dim=1)
    s = sim.gather(1, idx)
    positive = s > 0
    weights = torch.where(positive, torch.where(positive, s, torch.ones_like(s)).pow(alpha), torch.zeros_like(s))
    return x + (weights[..., None] * neighbours).sum(dim=1)


def query_expansion(q: torch.Tensor, db: torch.Tensor, *, k: int = 10, alpha: float = 0.0) -> torch.Tensor:
    r"""Expand queries with their top-k database neighbours: AQE (``alpha = 0``) or alpha-QE (``alpha > 0``).

    AQE (Chum et al., "Total recall", ICCV 2007): :math:`q' = \mathrm{l2n}(q + \sum_{i \in N_k(q)} x_i)`.
    alpha-QE (Radenović, Tolias and Chum, TPAMI 2018):
    :math:`q' = \mathrm{l2n}(q + \sum_{i \in N_k(q)} \max(q^\top x_i, 0)^\alpha x_i)`. :math:`N_k(q)` is the k
    database rows with the largest :math:`q^\top x_i`, ties to the lower index. ``k`` is capped at the database
    size N; ``k = 0`` (or N = 0) returns ``l2n(q)``. The database is not expected to contain the queries (no
    self-match is removed). One matmul and one ``topk`` for all queries; computed in at least float32, returned
    in the dtype of ``q``. Differentiable in ``q`` and ``db`` (the selection is piecewise constant).

    Args:
        q: L2-normalised query descriptors of shape :math:`(Q, D)`; Q = 0 works.
        db: L2-normalised database descriptors of shape :math:`(N, D)`, on the device of ``q``.
        k: Number of neighbours, an int >= 0 (AQE default 10).
        alpha: Weight exponent >= 0; 0 gives AQE (unit weights), alpha-QE commonly uses 3.

    Returns:
        Expanded, L2-normalised queries of shape :math:`(Q, D)`, in the dtype of ``q``.

    Raises:
        ShapeError: If ``q`` or ``db`` is not 2-D, or their D differ.
        DTypeError: If ``q`` or ``db`` is not floating point.
        DeviceError: If ``db`` is not on the device of ``q``.
        TypeError: If ``k`` is not an int or ``alpha`` not a number.
        ValueError: If ``k < 0`` or ``alpha`` is negative or not finite.

    Example:
        >>> db = l2n(torch.randn(100, 32))
        >>> query_expansion(l2n(torch.randn(5, 32)), db, k=10, alpha=3.0).shape
        torch.Size([5, 32])
    """
    fn = "query_expansion"
    bound = check_shape(q, "Q,D", name="q", fn=fn, hint="Pass descriptors as rows.")
    check_shape(db, "N,D", name="db", fn=fn, sizes={"D": bound["D"]}, hint="q and db must have the same D.")
    check_floating(q, name="q", fn=fn)
    check_floating(db, name="db", fn=fn)
    check_same_device({"q": q, "db": db}, fn=fn)
    k = min(_check_k(k, fn), db.shape[0])
    alpha = _check_alpha(alpha, fn)
    dtype = _compute_dtype(q, db)
    qc = q.to(dtype)
    if k == 0:
        return l2n(qc).to(q.dtype)
    dbc = db.to(dtype)
    out = _expand(qc, qc @ dbc.T, dbc, k, alpha)
    return l2n(out).to(q.dtype)


def dba(db: torch.Tensor, *, k: int = 10, alpha: float = 0.0) -> torch.Tensor:
    r"""Database-side augmentation: replace each database row by the weighted sum of itself and its k neighbours.

    Arandjelović and Zisserman, "Three things everyone should know", CVPR 2012 (unit weights, ``alpha = 0``), and
    Radenović, Tolias and Chum, TPAMI 2018 (alpha-weights):
    :math:`x_i' = \mathrm{l2n}(x_i + \sum_{j \in NN_k(i)} w_{ij} x_j)` with :math:`w_{ij} = 1` for ``alpha = 0``
    and :math:`\max(x_i^\top x_j, 0)^\alpha` otherwise. :math:`NN_k(i)` is the k rows ``j != i`` with the largest
    :math:`x_i^\top x_j`, ties to the lower index (the row itself is always excluded, even when a duplicate has the
    same similarity). ``k`` is capped at N - 1; ``k = 0`` (or N <= 1) returns ``l2n(db)``. The similarity matrix
    is dense :math:`(N, N)` (one matmul). Computed in at least float32, returned in the dtype of ``db``;
    differentiable in ``db``.

    Args:
        db: L2-normalised database descriptors of shape :math:`(N, D)`; N = 0 works.
        k: Number of neighbours, an int >= 0 (default 10, as PyRetri).
        alpha: Weight exponent >= 0; 0 gives unit weights.

    Returns:
        Augmented, L2-normalised database descriptors of shape :math:`(N, D)`, in the dtype of ``db``.

    Raises:
        ShapeError: If ``db`` is not 2-D.
        DTypeError: If ``db`` is not floating point.
        TypeError: If ``k`` is not an int or ``alpha`` not a number.
        ValueError: If ``k < 0`` or ``alpha`` is negative or not finite.

    Example:
        >>> dba(l2n(torch.randn(100, 32)), k=10).shape
        torch.Size([100, 32])
    """
    fn = "dba"
    check_shape(db, "N,D", name="db", fn=fn, hint="Pass descriptors as rows.")
    check_floating(db, name="db", fn=fn)
    n = db.shape[0]
    k = min(_check_k(k, fn), max(n - 1, 0))
    alpha = _check_alpha(alpha, fn)
    dbc = db.to(_compute_dtype(db))
    if k == 0:
        return l2n(dbc).to(db.dtype)
    self_mask = torch.eye(n, dtype=torch.bool, device=db.device)
    sim = (dbc @ dbc.T).masked_fill(self_mask, float("-inf"))
    out = _expand(dbc, sim, dbc, k, alpha)
    return l2n(out).to(db.dtype)
