"""Retrieval evaluation: the revisited Oxford/Paris protocol (mAP and mP@k), vectorised over queries.

Radenović, Iscen, Tolias, Avrithis and Chum, "Revisiting Oxford and Paris: large-scale image retrieval
benchmarking", CVPR 2018. :func:`compute_map` follows the protocol of that paper's evaluation code
(``revisitop``) for any ground truth given as ``ok``/``junk`` index sets (the old Oxford5k/Paris6k protocol
too); :func:`evaluate_revisited` builds the Easy, Medium and Hard setups of ROxford/RParis from the
``easy``/``hard``/``junk`` sets and evaluates all three from one ranking.

Protocol, per query (``ok`` = positives, ``junk`` = ignored items):

1. Junk removal: junk items are deleted from the ranked list (they are *not* negatives), so each positive's
   0-based position drops by the number of junk items ranked above it.
2. Trapezoidal AP over all ``n = |ok|`` positives: for the j-th retrieved positive (``j = 0, 1, ...``) at
   junk-adjusted 0-based position ``r_j``, ``p0 = 1`` if ``r_j == 0`` else ``j / r_j``,
   ``p1 = (j + 1) / (r_j + 1)`` and ``AP += (p0 + p1) / 2 / n``. Positives missing from a truncated ranking
   contribute 0.
3. mP@k: with the junk-adjusted positions made 1-based, ``kq = min(max(pos), k)`` and
   ``P@k = |{pos <= kq}| / kq``. The denominator shrinks when the last retrieved positive lies above rank
   ``k``: a query with two positives, both at the top, scores ``P@5 = P@10 = 1``.
4. A query whose ``ok`` is empty gets AP and P@k NaN and is left out of both means (numerator and
   denominator). If every query is empty, mAP and mP@k are NaN.

Differences from ``revisitop``'s own code, all on inputs it does not define:

- A query with positives none of which is inside a truncated ranking gets AP 0 and P@k 0 (``revisitop``
  raises ``ValueError`` from ``max`` of an empty array when precision at k is requested).
- ``ok`` and ``junk`` are treated as sets: duplicated indices count once (``revisitop`` counts ``len(ok)``
  with repeats in ``n``), and an index in both ``ok`` and ``junk`` is a positive.
- A ranking row that repeats a database index raises ``ValueError`` (``revisitop`` would count a repeated
  positive twice and could return AP > 1).
- ``ranks`` is ``(Q, N)``, one row per query, i.e. ``revisitop``'s ``(N, Q)`` layout transposed.

Differences from torchmetrics' ``RetrievalMAP`` / ``RetrievalPrecision``:

- torchmetrics computes the *step* (non-interpolated) AP, the mean of the precision at each positive; this is
  the *trapezoidal* AP. On torchmetrics' own example (scores ``[0.2, 0.3, 0.5]``, targets ``[T, F, T]``) the
  step AP is 0.8333 and the trapezoidal AP is 0.7917.
- torchmetrics' default ``empty_target_action="neg"`` scores a query without positives 0; here it is skipped
  (torchmetrics' ``"skip"``).
- torchmetrics has no junk (emulate it there with ``ignore_index``) and no Easy/Medium/Hard construction, and
  ``RetrievalPrecision(adaptive_k=True)`` is not the ``min(max(pos), k)`` rule above.

Ties are not resolved here: ``ranks`` is taken as given. Rank with a stable sort, e.g.
``torch.argsort(-sim, dim=1, stable=True)``, so ties go to the lower database index.

Everything runs in NumPy on the host in float64; the metrics are exempt from the ``torch.compile`` rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from deepagg._checks import DTypeError, ShapeError

__all__ = ["compute_map", "evaluate_revisited"]

# The positive/junk lookup uses a dense int8 table of Q * M cells (M = largest index + 1) when it is at most
# _DENSE_TABLE_MAX cells and at most _DENSE_TABLE_RATIO times the ranking's size (fast for full rankings);
# otherwise an argsort of the ranking's keys and binary search (memory proportional to the ranking, for short
# lists into a huge database, e.g. +1M distractors).
_DENSE_TABLE_MAX = 1 << 27
_DENSE_TABLE_RATIO = 16

_SETUPS = ("easy", "medium", "hard")


def _as_ranks(ranks: Any, fn: str) -> np.ndarray:
    """Validate the type, dtype, rank and sign of ``ranks`` and return it as a ``(Q, N)`` int64 NumPy array.

    Repeated indices within a row are checked later, in :func:`_evaluate`, where the lookup keys exist.
    """
    if isinstance(ranks, torch.Tensor):
        if ranks.is_floating_point() or ranks.is_complex() or ranks.dtype == torch.bool:
            raise DTypeError(
                f"{fn}(): ranks must be an integer tensor of database indices; got dtype {ranks.dtype}. "
                "Pass argsort indices, not scores.",
                expected="integer",
                actual=ranks.dtype,
            )
        ranks = ranks.detach().cpu().numpy()
    arr = np.asarray(ranks)
    if arr.dtype.kind not in "iu":
        raise DTypeError(
            f"{fn}(): ranks must be an integer array of database indices; got dtype {arr.dtype}. "
            "Pass argsort indices, not scores.",
            expected="integer",
            actual=arr.dtype,
        )
    if arr.ndim != 2:
        raise ShapeError(
            f"{fn}(): ranks must have shape (Q, N), one row per query (revisitop's (N, Q) transposed); "
            f"got {tuple(arr.shape)} with {arr.ndim} dims.",
            expected="(Q, N)",
            actual=tuple(arr.shape),
        )
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size:
        low = int(arr.min())
        if low < 0:
            raise ValueError(f"{fn}(): ranks must hold non-negative database indices; got minimum {low}.")
    return arr


def _as_kappas(kappas: Any, fn: str) -> tuple[int, ...]:
    """Validate ``kappas`` (a sequence of positive ints) and return it as a tuple of Python ints."""
    if isinstance(kappas, (str, bytes)) or not isinstance(kappas, Iterable):
        raise ValueError(f"{fn}(): kappas must be a sequence of positive integers; got {kappas!r}.")
    out = tuple(kappas)
    for k in out:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{fn}(): kappas must be a sequence of positive integers; got {out!r}.")
    return tuple(int(k) for k in out)


def _as_index_set(value: Any, fn: str, where: str) -> np.ndarray:
    """Return one ``ok``/``junk`` entry as a 1-D int64 array (repeats kept; the sign is checked in bulk later)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            if value.numel():
                raise DTypeError(
                    f"{fn}(): {where} must hold integer database indices; got dtype {value.dtype}.",
                    expected="integer",
                    actual=value.dtype,
                )
            value = value.long()
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ShapeError(
            f"{fn}(): {where} must be a 1-D array of database indices; got shape {tuple(arr.shape)}.",
            expected="(K,)",
            actual=tuple(arr.shape),
        )
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise DTypeError(
            f"{fn}(): {where} must hold integer database indices; got dtype {arr.dtype}.",
            expected="integer",
            actual=arr.dtype,
        )
    return arr.astype(np.int64, copy=False)


def _read_gnd(gnd: Any, keys: tuple[str, ...], num_queries: int, fn: str, arg: str) -> dict[str, list[np.ndarray]]:
    """Validate the per-query dicts and return ``{key: [Q index arrays]}``, all indices checked non-negative."""
    if isinstance(gnd, Mapping) or not isinstance(gnd, Sequence):
        raise ValueError(
            f"{fn}(): {arg} must be a list of per-query dicts (e.g. the 'gnd' entry of a revisitop pkl); "
            f"got {type(gnd).__name__}."
        )
    if len(gnd) != num_queries:
        raise ShapeError(
            f"{fn}(): {arg} must have one entry per row of ranks (Q={num_queries}); got {len(gnd)} entries.",
            expected=num_queries,
            actual=len(gnd),
        )
    out: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for q, entry in enumerate(gnd):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{fn}(): {arg}[{q}] must be a dict; got {type(entry).__name__}.")
        for key in keys:
            if key not in entry:
                raise ValueError(f"{fn}(): {arg}[{q}] must have the key {key!r}; got keys {sorted(map(str, entry))}.")
            out[key].append(_as_index_set(entry[key], fn, f"{arg}[{q}][{key!r}]"))
    for key in keys:
        sets = out[key]
        if sets and int(np.concatenate(sets).min(initial=0)) < 0:
            q = next(i for i, v in enumerate(sets) if v.size and v.min() < 0)
            raise ValueError(
                f"{fn}(): {arg}[{q}][{key!r}] must hold non-negative database indices; "
                f"got minimum {int(sets[q].min())}."
            )
    return out


def _keys(sets: list[np.ndarray], stride: int) -> np.ndarray:
    """Flatten per-query index sets into the sorted, unique keys ``q * stride + index``."""
    lens = np.fromiter((v.size for v in sets), dtype=np.int64, count=len(sets))
    if not lens.sum():
        return np.zeros(0, dtype=np.int64)
    qid = np.repeat(np.arange(len(sets), dtype=np.int64), lens)
    keys = np.sort(qid * stride + np.concatenate(sets))
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))]  # np.unique without its overhead


def _member(sorted_keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Boolean mask of ``values`` found in the sorted array ``sorted_keys``."""
    if not sorted_keys.size:
        return np.zeros(values.shape, dtype=bool)
    idx = np.minimum(np.searchsorted(sorted_keys, values), sorted_keys.size - 1)
    return sorted_keys[idx] == values


def _locate(sorted_keys: np.ndarray, order: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Sorted flat positions (into the unsorted keys, ``sorted_keys = keys[order]``) of the ``wanted`` keys present."""
    if not sorted_keys.size or not wanted.size:
        return np.zeros(0, dtype=np.int64)
    idx = np.minimum(np.searchsorted(sorted_keys, wanted), sorted_keys.size - 1)
    return np.sort(order[idx[sorted_keys[idx] == wanted]])


def _evaluate(
    ranks: np.ndarray,
    setups: list[tuple[list[np.ndarray], list[np.ndarray]]],
    kappas: tuple[int, ...],
    fn: str,
) -> list[tuple[float, np.ndarray, np.ndarray, np.ndarray]]:
    """Vectorised protocol for validated ``ranks`` ``(Q, N)`` and one ``(ok, junk)`` list pair per setup."""
    num_q, length = ranks.shape
    flat_sets = np.concatenate([np.zeros(0, dtype=np.int64)] + [v for ok, junk in setups for v in ok + junk])
    stride = max(int(ranks.max()) if ranks.size else -1, int(flat_sets.max(initial=-1))) + 1
    keys = (ranks + (np.arange(num_q, dtype=np.int64) * stride)[:, None]).ravel()  # unique per (query, index)
    cells = num_q * stride
    dense = cells <= min(_DENSE_TABLE_MAX, _DENSE_TABLE_RATIO * max(keys.size, 1 << 16))

    # A row must not repeat a database index. The dense table marks every ranked cell 1 and is reused below.
    if dense:
        table = np.zeros(cells, dtype=np.int8)
        table[keys] = 1
        repeated = np.count_nonzero(table) != keys.size
    else:
        order = np.argsort(keys)
        srt = keys[order]
        repeated = bool((srt[1:] == srt[:-1]).any())
    if repeated:
        srt = np.sort(ranks, axis=1)
        rows = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
        raise ValueError(
            f"{fn}(): each row of ranks must list a database index at most once; got repeated indices in "
            f"{rows.size} row(s), first row {int(rows[0])}. Keep only the first occurrence of each index."
        )

    results = []
    for ok, junk in setups:
        ok_keys = _keys(ok, stride)
        junk_keys = _keys(junk, stride)
        junk_keys = junk_keys[~_member(ok_keys, junk_keys)]  # an index in both is a positive
        n_pos = np.bincount(ok_keys // stride, minlength=num_q)  # |ok| per query, as a set
        if dense:
            # Label ranked cells 1 = negative, 2 = junk, 3 = positive; unranked cells are never read.
            table[junk_keys] = 2
            table[ok_keys] = 3
            labels = table[keys]
            table[junk_keys] = 1
            table[ok_keys] = 1
            pos_flat = np.flatnonzero(labels == 3)
            junk_flat = np.flatnonzero(labels == 2)
        else:
            pos_flat = _locate(srt, order, ok_keys)
            junk_flat = _locate(srt, order, junk_keys)
        results.append(_scores(pos_flat, junk_flat, n_pos, num_q, length, kappas))
    return results


def _scores(
    pos_flat: np.ndarray,
    junk_flat: np.ndarray,
    n_pos: np.ndarray,
    num_q: int,
    length: int,
    kappas: tuple[int, ...],
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """AP and P@k from the flat (row-major) positions of the retrieved positives and junk items."""
    # Retrieved positives in row-major order: row, raw 0-based position col, index j among the row's positives.
    row = pos_flat // max(length, 1)
    col = pos_flat - row * length
    hits = np.bincount(row, minlength=num_q)
    first = np.cumsum(hits) - hits
    j = np.arange(pos_flat.size, dtype=np.int64) - first[row]
    # Junk removal: subtract the number of junk items ranked above each positive in the same row.
    junk_above = np.searchsorted(junk_flat, pos_flat) - np.searchsorted(junk_flat, row * length)
    adj = (col - junk_above).astype(np.float64)  # junk-adjusted 0-based position r_j (j <= r_j always)

    # Trapezoidal AP: r_j == 0 implies j == 0, so p0 = 1 there.
    p0 = np.where(adj == 0, 1.0, j / np.maximum(adj, 1.0))
    p1 = (j + 1) / (adj + 1.0)
    ap_sum = np.bincount(row, weights=(p0 + p1) * 0.5, minlength=num_q)
    empty = n_pos == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        aps = np.where(empty, np.nan, ap_sum / n_pos)

    # mP@k with kq = min(max(pos), k) on 1-based adjusted positions; no retrieved positive gives 0.
    prs = np.zeros((num_q, len(kappas)), dtype=np.float64)
    if pos_flat.size:
        has = hits > 0
        last = np.zeros(num_q, dtype=np.float64)
        last[has] = adj[(first + hits - 1)[has]] + 1.0
        for i, k in enumerate(kappas):
            kq = np.minimum(last, float(k))
            good = np.bincount(row, weights=(adj + 1.0 <= kq[row]).astype(np.float64), minlength=num_q)
            prs[has, i] = good[has] / kq[has]
    prs[empty] = np.nan

    kept = int((~empty).sum())
    if kept:
        mean_ap = float(aps[~empty].sum() / kept)
        mpr = prs[~empty].sum(axis=0) / kept
    else:
        mean_ap = math.nan
        mpr = np.full(len(kappas), np.nan)
    return mean_ap, aps, mpr, prs


def compute_map(
    ranks: np.ndarray | torch.Tensor,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean trapezoidal average precision and mean precision at k, with junk removal (revisitop protocol).

    Radenović et al., "Revisiting Oxford and Paris", CVPR 2018. The exact rules (junk removal, trapezoidal AP,
    the ``min(max(pos), k)`` precision rule, skipped queries) and how they differ from ``revisitop``'s code and
    from torchmetrics are in the :mod:`deepagg.metrics` module docstring. This is *not* the step AP of
    scikit-learn or torchmetrics: a ranking ``[T, F, T]`` has step AP 0.8333 and trapezoidal AP 0.7917.
    Unlike torchmetrics' ``RetrievalMAP``, a query without positives is skipped (its ``"skip"``, not the
    default ``"neg"``) and junk is removed from the list (torchmetrics has no junk; ``ignore_index`` emulates
    it); unlike ``RetrievalPrecision(adaptive_k=True)``, P@k divides by ``min(max(pos), k)``.

    All queries are evaluated at once (no per-query Python loop beyond reading ``gnd``). A ranking row may be
    truncated (``N`` smaller than the database): positives outside it count as not retrieved.

    Args:
        ranks: Database indices of shape :math:`(Q, N)` (NumPy or torch, any integer dtype), row ``q`` holding
            query ``q``'s ranking, best first, each index at most once. This is ``revisitop``'s
            :math:`(N, Q)` ``ranks`` transposed.
        gnd: ``Q`` dicts with ``"ok"`` (positives) and ``"junk"`` (ignored) 1-D arrays of 0-based database
            indices (other keys, e.g. ``"bbx"``, are ignored). Each is treated as a set; an index in both is a
            positive.
        kappas: The ``k`` of mP@k, positive integers.

    Returns:
        A tuple ``(map, aps, mpr, prs)`` of fractions in :math:`[0, 1]` (multiply by 100 for tables):
        ``map`` a float, the mean of ``aps`` over queries with positives (NaN if there are none);
        ``aps`` float64 :math:`(Q,)`, NaN for a query without positives; ``mpr`` float64 :math:`(K,)` with
        ``K = len(kappas)``, the mean of ``prs`` over the same queries; ``prs`` float64 :math:`(Q, K)`, the
        per-query P@k, a NaN row for a query without positives.

    Raises:
        ShapeError: If ``ranks`` is not 2-D, ``len(gnd) != Q`` or an index set is not 1-D.
        DTypeError: If ``ranks`` or an index set does not hold integers.
        ValueError: If an index is negative, a row of ``ranks`` repeats an index, ``gnd`` is not a list of
            dicts with ``"ok"`` and ``"junk"``, or ``kappas`` holds a non-positive or non-integer value.

    Example:
        >>> # torchmetrics' example: scores [0.2, 0.3, 0.5] and targets [T, F, T], ranked best first.
        >>> ranks = np.array([[2, 1, 0]])
        >>> m, aps, mpr, prs = compute_map(ranks, [{"ok": [0, 2], "junk": []}])
        >>> print(round(m, 4), np.round(prs, 4))
        0.7917 [[1.     0.6667 0.6667]]
        >>> # Junk at rank 1 is removed, so both positives are at the top.
        >>> print(compute_map(ranks, [{"ok": [0, 2], "junk": [1]}])[0])
        1.0
    """
    fn = "compute_map"
    arr = _as_ranks(ranks, fn)
    kap = _as_kappas(kappas, fn)
    sets = _read_gnd(gnd, ("ok", "junk"), arr.shape[0], fn, "gnd")
    return _evaluate(arr, [(sets["ok"], sets["junk"])], kap, fn)[0]


def evaluate_revisited(
    ranks: np.ndarray | torch.Tensor,
    gnd_full: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, Any]]:
    """Evaluate one ranking under the Easy, Medium and Hard setups of ROxford / RParis.

    Radenović et al., "Revisiting Oxford and Paris", CVPR 2018. From each query's ``easy``, ``hard`` and
    ``junk`` sets:

    ======  ===============  ================
    Setup   positives (ok)   ignored (junk)
    ======  ===============  ================
    easy    easy             junk ∪ hard
    medium  easy ∪ hard      junk
    hard    hard             junk ∪ easy
    ======  ===============  ================

    Each setup is then scored by :func:`compute_map` (trapezoidal AP, junk removal, queries without positives
    skipped; e.g. a query with no ``hard`` image is left out of the Hard means). Papers report Medium and Hard.

    Args:
        ranks: Database indices of shape :math:`(Q, N)`, best first (``revisitop``'s :math:`(N, Q)` transposed);
            see :func:`compute_map`.
        gnd_full: ``Q`` dicts with ``"easy"``, ``"hard"`` and ``"junk"`` 1-D arrays of 0-based database indices,
            e.g. the ``"gnd"`` list of ``gnd_roxford5k.pkl``; other keys (``"bbx"``) are ignored.
        kappas: The ``k`` of mP@k, positive integers.

    Returns:
        ``{"easy" | "medium" | "hard": {"map": float, "aps": (Q,), "mpr": (K,), "prs": (Q, K)}}``, fractions in
        :math:`[0, 1]` as returned by :func:`compute_map`.

    Raises:
        ShapeError: If ``ranks`` is not 2-D, ``len(gnd_full) != Q`` or an index set is not 1-D.
        DTypeError: If ``ranks`` or an index set does not hold integers.
        ValueError: If an index is negative, a row of ``ranks`` repeats an index, an entry of ``gnd_full`` lacks
            ``"easy"``, ``"hard"`` or ``"junk"``, or ``kappas`` is invalid.

    Example:
        >>> ranks = np.array([[3, 0, 1, 2]])
        >>> gnd_full = [{"easy": [0], "hard": [2], "junk": [3], "bbx": [0.0, 0.0, 9.0, 9.0]}]
        >>> res = evaluate_revisited(ranks, gnd_full)
        >>> print({s: round(res[s]["map"], 4) for s in res})
        {'easy': 1.0, 'medium': 0.7917, 'hard': 0.25}
    """
    fn = "evaluate_revisited"
    arr = _as_ranks(ranks, fn)
    kap = _as_kappas(kappas, fn)
    sets = _read_gnd(gnd_full, ("easy", "hard", "junk"), arr.shape[0], fn, "gnd_full")
    easy, hard, junk = sets["easy"], sets["hard"], sets["junk"]
    setups = [
        (easy, [np.concatenate([j, h]) for j, h in zip(junk, hard, strict=True)]),
        ([np.concatenate([e, h]) for e, h in zip(easy, hard, strict=True)], junk),
        (hard, [np.concatenate([j, e]) for j, e in zip(junk, easy, strict=True)]),
    ]
    results = _evaluate(arr, setups, kap, fn)
    return {
        name: {"map": m, "aps": aps, "mpr": mpr, "prs": prs}
        for name, (m, aps, mpr, prs) in zip(_SETUPS, results, strict=True)
    }
