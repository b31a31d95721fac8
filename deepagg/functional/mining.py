r"""Hard-negative mining for tuple losses: for each query, the most similar descriptors of *other* objects.

Radenović, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018: every epoch
cirtorch re-extracts a random pool of images and picks, per query, the hardest negatives (highest similarity)
among images of other clusters, at most one per cluster. :func:`hard_negatives` does that selection for all
queries at once.

Labels: each descriptor carries an integer object id >= 0, or -1 for "no object" (a distractor). A -1 never
equals any label, not even another -1: two distractors are two different objects. (Every negative label is
treated as -1.)

Selection rules, in order:

1. Candidate j is *eligible* for query i iff its label differs from the query's (or either is -1) and
   ``exclude[i, j]`` is False (``exclude`` marks candidates that must never be negatives: the query's positives
   and its junk images in the ground truth, or the query image itself).
2. Eligible candidates are ordered by *hardness* (the similarity ``queries @ candidates.T``, or the given
   ``scores``), highest first; ties go to the lower candidate index (a stable sort). NaN hardness counts as
   ``-inf``. Ties are ties of the computed values: equal candidate rows can get similarities one rounding apart
   (a matmul on another memory layout or device), so pass ``scores`` when exact ties matter.
3. With ``distinct_labels=True`` only the hardest eligible candidate of each label is kept (every -1 candidate is
   its own label).
4. The first ``num_negatives`` kept candidates are returned; rows with fewer are padded with -1.

Everything is batched (stable sorts, a scatter-min and gathers; no Python loop over queries or candidates, no
host sync) and runs under ``torch.no_grad()`` on the device of the inputs, in :math:`O(QN)` memory and
:math:`O(QN \log N)` time; it compiles with ``torch.compile(fullgraph=True)``. For a candidate pool too large for
a few :math:`(Q, N)` int64 tensors, mine the queries in blocks: rows are independent.
"""

from __future__ import annotations

import torch

from deepagg._checks import check_dtype, check_floating, check_int, check_same_device, check_shape

__all__ = ["hard_negatives"]

_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_mining_inputs(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    exclude: torch.Tensor | None,
    scores: torch.Tensor | None,
    fn: str,
) -> None:
    """Validate the metadata (types, shapes, dtypes, devices) of a mining call; no host sync."""
    bound = check_shape(queries, "Q,D", name="queries", fn=fn, hint="Pass query descriptors as rows.")
    bound = check_shape(
        candidates, "N,D", name="candidates", fn=fn, sizes=bound, hint="Pass candidate descriptors as rows."
    )
    check_floating(queries, name="queries", fn=fn)
    check_floating(candidates, name="candidates", fn=fn)
    check_shape(query_labels, "Q", name="query_labels", fn=fn, sizes=bound, hint="One object id per query.")
    check_shape(candidate_labels, "N", name="candidate_labels", fn=fn, sizes=bound, hint="One id per candidate.")
    check_dtype(query_labels, _LABEL_DTYPES, name="query_labels", fn=fn)
    check_dtype(candidate_labels, _LABEL_DTYPES, name="candidate_labels", fn=fn)
    if exclude is not None:
        check_shape(exclude, "Q,N", name="exclude", fn=fn, sizes=bound, hint="True = never a negative.")
        check_dtype(exclude, (torch.bool,), name="exclude", fn=fn)
    if scores is not None:
        check_shape(scores, "Q,N", name="scores", fn=fn, sizes=bound, hint="Higher = harder.")
        check_floating(scores, name="scores", fn=fn)
    check_same_device(
        {
            "queries": queries,
            "candidates": candidates,
            "query_labels": query_labels,
            "candidate_labels": candidate_labels,
            "exclude": exclude,
            "scores": scores,
        },
        fn=fn,
    )


def hard_negatives(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    *,
    query_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    num_negatives: int = 5,
    exclude: torch.Tensor | None = None,
    distinct_labels: bool = True,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The hardest negatives of each query among candidate descriptors of other objects.

    Radenović, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018 (cirtorch's
    tuple mining). The rules (eligibility, hardness order with ties to the lower index, one per label, -1 padding)
    are listed in :mod:`deepagg.functional.mining`. Runs under ``torch.no_grad()``; compiles with ``fullgraph=True``.

    Args:
        queries: Query descriptors of shape :math:`(Q, D)`, typically L2-normalised; Q = 0 works.
        candidates: Candidate descriptors of shape :math:`(N, D)`; N = 0 works.
        query_labels: Object ids of the queries, an integer tensor :math:`(Q,)`; -1 = no object.
        candidate_labels: Object ids of the candidates, an integer tensor :math:`(N,)`; -1 = no object (a
            distractor, a negative for every query).
        num_negatives: Negatives per query, an int >= 1.
        exclude: Optional bool :math:`(Q, N)`, True = never a negative for that query (its positives and junk).
        distinct_labels: Keep at most one negative (the hardest) per label; each -1 candidate is its own label.
        scores: Optional floating hardness :math:`(Q, N)` used instead of the similarity ``queries @
            candidates.T`` (higher = harder; e.g. uniform random scores for a random-negative ablation).

    Returns:
        Indices into ``candidates`` of shape :math:`(Q, \mathrm{num\_negatives})`, int64, on the device of
        ``queries``: hardest first, padded with -1 where fewer candidates are eligible.

    Raises:
        TypeError: If a tensor argument is not a tensor, or ``num_negatives`` is not an int.
        ShapeError: If the shapes disagree (Q, N or D) or an input has the wrong number of dims.
        DTypeError: If descriptors or ``scores`` are not floating point, labels not integer, ``exclude`` not bool.
        DeviceError: If the inputs are on different devices.
        ValueError: If ``num_negatives < 1``.

    Example:
        >>> q = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
        >>> c = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
        >>> idx = hard_negatives(q, c, query_labels=torch.tensor([0, 1, 2]),
        ...                      candidate_labels=torch.arange(20) % 4, num_negatives=3)
        >>> idx.shape, idx.dtype
        (torch.Size([3, 3]), torch.int64)
        >>> hard_negatives(q, c[:0], query_labels=torch.tensor([0, 1, 2]),
        ...                candidate_labels=torch.zeros(0, dtype=torch.int64), num_negatives=2)
        tensor([[-1, -1],
                [-1, -1],
                [-1, -1]])
    """
    fn = "hard_negatives"
    k = check_int(num_negatives, name="num_negatives", fn=fn, minimum=1)
    _check_mining_inputs(queries, candidates, query_labels, candidate_labels, exclude, scores, fn)
    with torch.no_grad():
        return _select(queries, candidates, query_labels, candidate_labels, k, exclude, bool(distinct_labels), scores)


def _select(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None,
    distinct_labels: bool,
    scores: torch.Tensor | None,
) -> torch.Tensor:
    """The selection of :func:`hard_negatives` on validated inputs (see the module docstring for the rules)."""
    device = queries.device
    q, n = queries.shape[0], candidates.shape[0]
    q_lab = query_labels.to(torch.int64)
    c_lab = candidate_labels.to(torch.int64)
    c_none = c_lab < 0  # (N,) a distractor: its own object
    # 1. Eligibility (Q, N). A query of no object (-1) differs from every label >= 0, and equals no -1 candidate.
    eligible = (q_lab[:, None] != c_lab[None, :]) | c_none[None, :]
    if exclude is not None:
        eligible = eligible & ~exclude
    # 2. Hardness, highest first; ineligible and NaN last; ties to the lower index (stable sort).
    if scores is None:
        dtype = torch.promote_types(torch.promote_types(queries.dtype, candidates.dtype), torch.float32)
        scores = queries.to(dtype) @ candidates.to(dtype).T
    key = torch.where(eligible & ~torch.isnan(scores), scores, torch.full_like(scores, float("-inf")))
    _, order = torch.sort(key, dim=1, descending=True, stable=True)  # (Q, N) candidate indices, hardest first
    # Ineligible candidates are never kept, so their place among the -inf keys does not matter.
    keep = eligible.gather(1, order)
    # 3. One per label: keep a candidate iff it is the first kept one of its label in its row's order.
    if distinct_labels:
        sorted_ids = _compact_labels(c_lab)[order]  # (Q, N) label ids in [0, N)
        position = torch.arange(n, device=device).expand(q, n)
        position = torch.where(keep, position, torch.full_like(position, n))
        first = torch.full((q, n), n, dtype=torch.int64, device=device)
        first = first.scatter_reduce(1, sorted_ids, position, reduce="amin", include_self=True)
        keep = keep & ((first.gather(1, sorted_ids) == position) | c_none[order])
    # 4. The first k kept candidates of each row, -1 after them (the extra column k collects the rest).
    rank = keep.to(torch.int64).cumsum(dim=1) - 1
    slot = torch.where(keep & (rank < k), rank, torch.full_like(rank, k))
    out = torch.full((q, k + 1), -1, dtype=torch.int64, device=device)
    # Every value sent to column k is -1, so the duplicate indices there make no race.
    out.scatter_(1, slot, torch.where(slot < k, order, torch.full_like(order, -1)))
    return out[:, :k]


def _compact_labels(labels: torch.Tensor) -> torch.Tensor:
    """Each label as an id in ``[0, N)``: equal labels get equal ids (a sort, no host sync, unlike ``unique``)."""
    n = labels.shape[0]
    sorted_labels, perm = torch.sort(labels, stable=True)
    new = torch.ones(n, dtype=torch.int64, device=labels.device)
    new[1:] = (sorted_labels[1:] != sorted_labels[:-1]).to(torch.int64)
    ids = torch.empty_like(new)
    ids[perm] = new.cumsum(0) - 1
    return ids
