r"""Diffusion on a mutual k-NN graph, solved by batched conjugate gradient.

Iscen, Tolias, Avrithis, Furon and Chum, "Efficient diffusion on region manifolds: recovering small objects
with compact CNN representations", CVPR 2017 (``regional-diffusion-cg.txt``).

**Graph** (eqs. 1, 5, 6): nodes are descriptors (one per image, or one per region), the affinity is the
monomial kernel :math:`s(x, z) = \max(x^\top z, 0)^\gamma`, kept only between *mutual* k-nearest neighbours
(:math:`\mathrm{NN}_k(i)` is the k most similar :math:`j \ne i`, ties to the lower index; eq. 6 takes the
smaller of the two directed similarities, which makes ``A`` exactly symmetric), with a zero diagonal.
:func:`mutual_knn_affinity` builds it in row chunks (memory :math:`O(Nk)` plus one chunk of similarities),
exactly in torch or through faiss (flat: exact; IVF / HNSW: approximate, for large N).

**Diffusion** (eqs. 2-4, 17): :math:`S = D^{-1/2} A D^{-1/2}` and :math:`(I - \alpha S) f = y`, one column of
``y`` per query, solved by :func:`deepagg.functional.solvers.conjugate_gradient` for all queries at once. A node
with no edge (degree 0) has the equation :math:`f_i = y_i` (its row of ``S`` is empty; no division by zero), which
CG meets as it converges (at 20 iterations to about 1e-7 relative on a typical graph).
:func:`diffusion_scores` omits the paper's constant factor :math:`1 - \alpha`, which does not change rankings.

**Unseen queries** (eqs. 7, 8): :func:`query_seeds` builds ``y`` from the query's kq nearest database nodes,
:math:`y_i = \sum_{q \in Q} s_{k_q}(x_i | q)` over the query's vectors (one for global diffusion, its regions for
regional diffusion), and keeps only the kq largest entries (section 5.1).

**Regional pooling** (eqs. 13, 14): :func:`gmp_weights` are the generalised-max-pooling weights of an image's
region vectors, :math:`(V V^\top + \lambda I)^{-1}\mathbf{1}`, by Cholesky.

**Truncation** (section 4.4): ``diffusion_scores(A, y, nodes=...)`` solves each query on its own sub-graph (the
nodes of its shortlist), with the normalisation :math:`D^{-1/2} A D^{-1/2}` rebuilt on the sub-graph, as the
authors' ``trunclap``; all sub-graphs are solved in one batched CG over their block-diagonal union.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from deepagg._checks import ShapeError, check_dtype, check_floating, check_int, check_same_device, check_shape
from deepagg.functional._blocking import cache_bytes
from deepagg.functional.qe import _topk_lower_index
from deepagg.functional.solvers import conjugate_gradient

__all__ = [
    "DiffusionOperator",
    "diffusion_scores",
    "gmp_weights",
    "knn_lists",
    "mutual_knn_affinity",
    "normalized_affinity",
    "query_seeds",
]

BACKENDS = ("torch", "faiss")
FAISS_INDEXES = ("flat", "ivf", "hnsw")
SEED_VARIANTS = ("paper", "iscen")
#: Similarity entries per chunk of the exact k-NN search (float32: 128 MB).
CHUNK_ENTRIES = 1 << 25


def _check_float(value: Any, name: str, fn: str, *, low: float, high: float = math.inf, open_low: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (low < value if open_low else low <= value) and value < high
    if not ok:
        bound = f"in ({low}, {high})" if high < math.inf else (f"> {low}" if open_low else f">= {low}")
        raise ValueError(f"{fn}(): {name} must be a float {bound}; got {value!r}.")
    return float(value)


def _check_alpha(alpha: Any, fn: str) -> float:
    return _check_float(alpha, "alpha", fn, low=0.0, high=1.0)


def _check_rows(x: Any, name: str, fn: str) -> None:
    check_shape(x, "N,D", name=name, fn=fn)
    check_floating(x, name=name, fn=fn)


# --------------------------------------------------------------------------------------------------- k-NN lists


def _exact_knn(
    q: torch.Tensor, x: torch.Tensor, k: int, *, exclude_self: bool, row_offset: int, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``q @ x.T`` per row, ties to the lower index; self (row ``i + row_offset``) excluded."""
    n_q, n = q.shape[0], x.shape[0]
    rows = chunk_size or max(1, min(n_q, CHUNK_ENTRIES // max(n, 1)))
    sims, idx = [], []
    # One similarity buffer for every chunk: a fresh (rows, N) output per chunk costs its page faults each time.
    buf = torch.empty(min(rows, n_q), n, dtype=q.dtype, device=q.device)
    xt = x.mT
    for s in range(0, n_q, rows):
        block = q[s : s + rows]
        sim = torch.mm(block, xt, out=buf[: block.shape[0]])
        if exclude_self:
            r = torch.arange(sim.shape[0], device=sim.device)
            cols = r + s + row_offset
            inside = cols < n
            sim[r[inside], cols[inside]] = -math.inf
        i = _topk_ties_lower(sim, k)
        v = sim.gather(1, i)
        # Best first, equal similarities by index (design.md: sorts are stable everywhere).
        by_index = torch.sort(i, dim=1, stable=True)
        order = torch.sort(v.gather(1, by_index.indices), dim=1, descending=True, stable=True).indices
        i = by_index.values.gather(1, order)
        sims.append(sim.gather(1, i))
        idx.append(i)
    if not sims:
        return q.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=q.device)
    return torch.cat(sims), torch.cat(idx)


def _topk_ties_lower(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row, ties at the k-th value to the lower index.

    ``torch.topk`` alone, except on the rows where values equal to the k-th one lie outside the top k (then the
    choice among them matters and :func:`deepagg.functional.qe._topk_lower_index` decides it): one host sync per
    chunk, and the exact tie rule without paying its second full-row ``topk`` on every row.
    """
    extra = k < sim.shape[1]  # the (k+1)-th value equals the k-th: ties reach beyond the top k
    top = torch.topk(sim, k + 1 if extra else k, dim=1)
    idx = top.indices[:, :k]
    no_tie = torch.zeros(sim.shape[0], dtype=torch.bool, device=sim.device)
    tied = top.values[:, k] == top.values[:, k - 1] if extra else no_tie
    if bool(tied.any()):
        rows = torch.nonzero(tied).flatten()
        idx[rows] = _topk_lower_index(sim[rows], k)
    return idx


def _faiss_knn(
    q: torch.Tensor,
    x: torch.Tensor,
    k: int,
    *,
    exclude_self: bool,
    row_offset: int,
    index: str,
    nlist: int | None,
    nprobe: int,
    hnsw_m: int,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - exercised only without faiss
        raise ImportError(
            "knn_lists(): backend='faiss' needs the faiss package; pip install 'deepagg[faiss]' (faiss-cpu) or use "
            "backend='torch'."
        ) from None
    import numpy as np

    n, d = x.shape
    xb = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    ix: Any
    if index == "flat":
        ix = faiss.IndexFlatIP(d)
    elif index == "hnsw":
        ix = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        ix.hnsw.efSearch = max(ix.hnsw.efSearch, 2 * (k + 1))
    else:
        lists = nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))
        quantizer = faiss.IndexFlatIP(d)
        ix = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
        ix.train(xb)
        ix.nprobe = min(nprobe, lists)
    ix.add(xb)
    extra = 1 if exclude_self else 0
    kk = min(k + extra, n)
    rows = chunk_size or 16384
    sims, idx = [], []
    qn = q.detach().to("cpu", torch.float32)
    for s in range(0, q.shape[0], rows):
        block = np.ascontiguousarray(qn[s : s + rows].numpy())
        dist, ids = ix.search(block, kk)
        dist_t, ids_t = torch.from_numpy(dist), torch.from_numpy(ids).long()
        if exclude_self:
            self_id = torch.arange(s, s + block.shape[0])[:, None] + row_offset
            is_self = ids_t == self_id
            drop = is_self.clone()
            drop[:, -1] |= ~is_self.any(dim=1)  # no self found: drop the last (the k+1-th) instead
            keep = ~drop
            dist_t = dist_t[keep].view(-1, kk - 1)
            ids_t = ids_t[keep].view(-1, kk - 1)
        missing = ids_t < 0  # an approximate index may find fewer than k
        dist_t = dist_t.masked_fill(missing, -math.inf)
        ids_t = ids_t.masked_fill(missing, 0)
        sims.append(dist_t)
        idx.append(ids_t)
    if not sims:
        return q.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=q.device)
    return torch.cat(sims).to(q.device, q.dtype), torch.cat(idx).to(q.device)


def knn_lists(
    x: torch.Tensor,
    k: int,
    *,
    queries: torch.Tensor | None = None,
    rows: tuple[int, int] | None = None,
    backend: str = "torch",
    index: str = "flat",
    nlist: int | None = None,
    nprobe: int = 64,
    hnsw_m: int = 32,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The k nearest neighbours by inner product: ``(similarities (R, k), indices (R, k) int64)``, best first.

    Without ``queries`` these are the graph's lists :math:`\mathrm{NN}_k(i)` over :math:`j \ne i` for the rows
    ``rows = (start, stop)`` of ``x`` (all rows by default; a row range is what one process computes when graph
    construction is sharded, see :mod:`deepagg.distributed`, which cuts ranges on this function's own chunk
    grid so that the gathered lists are bit-identical to one process's: BLAS rounds blocks of other heights
    differently). With ``queries`` they are the neighbours of each query row among all of ``x``.
    ``backend="torch"`` is exact, with ties to the lower index, in chunks of rows so that memory stays
    :math:`O(Rk)` plus one chunk of similarities. ``backend="faiss"`` searches a faiss index of ``x``
    (``index="flat"``: exact, ties in faiss' order; ``"ivf"`` with ``nlist``/``nprobe`` and ``"hnsw"`` with
    ``hnsw_m``: approximate); an approximate index that finds fewer than k neighbours pads the list with
    similarity ``-inf`` (no edge).

    Args:
        x: Database rows :math:`(N, D)` (unit rows for cosine similarity).
        k: Neighbours per row, ``1 <= k``; ``k < N`` for the graph's own lists, ``k <= N`` with ``queries``.
        queries: Optional query rows :math:`(R, D)`.
        rows: Optional ``(start, stop)`` row range of ``x`` (graph lists only).
        backend: ``"torch"`` (exact) or ``"faiss"``.
        index: faiss index type, ``"flat"``, ``"ivf"`` or ``"hnsw"``.
        nlist: IVF lists (default about :math:`4\sqrt{N}`).
        nprobe: IVF lists visited per search.
        hnsw_m: HNSW links per node.
        chunk_size: Rows per chunk (default: about 128 MB of similarities for torch, 16384 for faiss).

    Returns:
        ``(sims, idx)``, each of shape :math:`(R, k)`.

    Raises:
        ValueError: If ``k`` is out of range, or an option is unknown.
        ShapeError: If ``x`` or ``queries`` is not 2-D or their widths differ.

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
        >>> sims, idx = knn_lists(x, 3)
        >>> idx.shape, bool((idx != torch.arange(20)[:, None]).all())
        (torch.Size([20, 3]), True)
    """
    fn = "knn_lists"
    _check_rows(x, "x", fn)
    n = x.shape[0]
    k = check_int(k, name="k", fn=fn, minimum=1)
    if backend not in BACKENDS:
        raise ValueError(f"{fn}(): backend must be one of {BACKENDS}; got {backend!r}.")
    if index not in FAISS_INDEXES:
        raise ValueError(f"{fn}(): index must be one of {FAISS_INDEXES}; got {index!r}.")
    if backend == "torch" and index != "flat":
        raise ValueError(f"{fn}(): index={index!r} needs backend='faiss' (the torch backend is exact); got 'torch'.")
    if queries is None:
        if k >= n:
            raise ValueError(f"{fn}(): k must be < N = {n} (the neighbours of a row exclude itself); got k = {k}.")
        start, stop = (0, n) if rows is None else (int(rows[0]), int(rows[1]))
        if not 0 <= start <= stop <= n:
            raise ValueError(f"{fn}(): rows must be a range (start, stop) with 0 <= start <= stop <= {n}; got {rows}.")
        q, exclude, offset = x[start:stop], True, start
    else:
        _check_rows(queries, "queries", fn)
        check_shape(queries, "R,D", name="queries", fn=fn, sizes={"D": x.shape[1]})
        check_same_device({"x": x, "queries": queries}, fn=fn)
        if rows is not None:
            raise ValueError(f"{fn}(): rows applies to the graph's own lists; pass either queries or rows.")
        if k > n:
            raise ValueError(f"{fn}(): k must be <= N = {n} (the database size); got k = {k}.")
        q, exclude, offset = queries, False, 0
    with torch.no_grad():
        if backend == "torch":
            dtype = torch.promote_types(x.dtype, torch.float32)
            return _exact_knn(
                q.to(dtype), x.to(dtype), k, exclude_self=exclude, row_offset=offset, chunk_size=chunk_size
            )
        return _faiss_knn(
            q,
            x,
            k,
            exclude_self=exclude,
            row_offset=offset,
            index=index,
            nlist=nlist,
            nprobe=nprobe,
            hnsw_m=hnsw_m,
            chunk_size=chunk_size,
        )


# ------------------------------------------------------------------------------------------------ mutual graph


def mutual_knn_affinity(
    x: torch.Tensor,
    *,
    k: int,
    gamma: float = 3.0,
    knn: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "torch",
    index: str = "flat",
    **search: Any,
) -> torch.Tensor:
    r"""The mutual k-NN affinity matrix of eqs. 1, 5 and 6 as a sparse COO tensor :math:`(N, N)`.

    :math:`A_{ij} = \max(\min(x_i^\top x_j,\, x_j^\top x_i), 0)^\gamma` if :math:`j \in \mathrm{NN}_k(i)` and
    :math:`i \in \mathrm{NN}_k(j)`, else 0; ``A`` is exactly symmetric with a zero diagonal, and only positive
    entries are stored. :math:`\mathrm{NN}_k(i)` is the k most similar :math:`j \ne i`, ties to the lower index
    (:func:`knn_lists`; pass precomputed lists as ``knn=(sims, idx)``, e.g. gathered from processes that each
    built a range of rows). Memory: the k-NN lists and the edges, :math:`O(Nk)`, never :math:`N \times N`.

    Args:
        x: Node descriptors :math:`(N, D)`, unit rows.
        k: Neighbours per node, ``1 <= k < N``.
        gamma: Kernel exponent > 0 (3 in the paper).
        knn: Optional precomputed ``(sims, idx)`` of shape :math:`(N, k)` from :func:`knn_lists`.
        backend: ``"torch"`` (exact) or ``"faiss"``; ``index`` and the other keywords go to :func:`knn_lists`.
        index: faiss index type (``"flat"``, ``"ivf"``, ``"hnsw"``).
        **search: ``nlist``, ``nprobe``, ``hnsw_m``, ``chunk_size`` for :func:`knn_lists`.

    Returns:
        Coalesced sparse COO tensor :math:`(N, N)` of the dtype of ``x`` (at least float32).

    Raises:
        ValueError: If ``k`` is not in ``[1, N)``, ``gamma <= 0``, or ``knn`` does not match ``x`` and ``k``.

    Example:
        >>> x = torch.nn.functional.normalize(torch.rand(30, 4), dim=1)
        >>> a = mutual_knn_affinity(x, k=5)
        >>> dense = a.to_dense()
        >>> bool((dense == dense.T).all()), bool((dense.diagonal() == 0).all()), int((dense > 0).sum(1).max()) <= 5
        (True, True, True)
    """
    fn = "mutual_knn_affinity"
    _check_rows(x, "x", fn)
    n = x.shape[0]
    k = check_int(k, name="k", fn=fn, minimum=1)
    if k >= n:
        raise ValueError(f"{fn}(): k must be < N = {n} (the neighbours of a node exclude itself); got k = {k}.")
    gamma = _check_float(gamma, "gamma", fn, low=0.0)
    dtype = torch.promote_types(x.dtype, torch.float32)
    if knn is None:
        sims, idx = knn_lists(x, k, backend=backend, index=index, **search)
    else:
        sims, idx = knn
        if sims.shape != (n, k) or idx.shape != (n, k):
            raise ValueError(
                f"{fn}(): knn must be (sims, idx) of shape (N, k) = ({n}, {k}); got {tuple(sims.shape)} and "
                f"{tuple(idx.shape)}."
            )
    return _mutual_from_lists(sims.to(dtype), idx.to(x.device), n, gamma)


def _mutual_from_lists(sims: torch.Tensor, idx: torch.Tensor, n: int, gamma: float) -> torch.Tensor:
    """Sparse COO of the mutual edges of k-NN lists, weight ``max(min(s_ij, s_ji), 0)^gamma``."""
    device = sims.device
    with torch.no_grad():
        k = idx.shape[1]
        rows = torch.arange(n, device=device).repeat_interleave(k)
        cols = idx.reshape(-1)
        vals = sims.reshape(-1)
        ok = torch.isfinite(vals) & (cols != rows)
        rows, cols, vals = rows[ok], cols[ok], vals[ok]
        key = rows * n + cols
        order = torch.argsort(key)
        key, rows, cols, vals = key[order], rows[order], cols[order], vals[order]
        rev = cols * n + rows
        pos = torch.searchsorted(key, rev).clamp(max=max(key.numel() - 1, 0))
        mutual_mask = key[pos] == rev if key.numel() else torch.zeros(0, dtype=torch.bool, device=device)
        w = torch.minimum(vals, vals[pos])[mutual_mask]  # eq. 6: the smaller directed similarity
        rows, cols = rows[mutual_mask], cols[mutual_mask]
        w = w.clamp(min=0).pow(gamma)
        keep = w > 0
        a = torch.sparse_coo_tensor(
            torch.stack([rows[keep], cols[keep]]),
            w[keep],
            (n, n),
            device=device,
            is_coalesced=True,
            check_invariants=False,
        )
    return a


# --------------------------------------------------------------------------------------------- normalisation


def _as_csr(a: torch.Tensor, fn: str) -> torch.Tensor:
    if a.layout == torch.sparse_csr:
        return a
    with _silence_csr_beta_ctx():
        return _as_coo(a, fn).to_sparse_csr()


def _as_coo(a: torch.Tensor, fn: str) -> torch.Tensor:
    if not isinstance(a, torch.Tensor) or a.ndim != 2 or a.shape[0] != a.shape[1]:
        got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        raise ShapeError(f"{fn}(): A must be a square (N, N) affinity matrix; got {got}.", "(N, N)", got)
    check_floating(a, name="A", fn=fn)
    if a.layout == torch.sparse_coo:
        return a.coalesce()
    if a.layout == torch.strided:
        return a.to_sparse().coalesce()
    with _silence_csr_beta_ctx():
        return a.to_sparse_coo().coalesce()


class _silence_csr_beta_ctx:
    """``with``-block hiding torch's one-time sparse CSR "beta" warning (only that one)."""

    def __enter__(self) -> None:
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def _locality_order(s: torch.Tensor) -> torch.Tensor | None:
    """A node order that puts graph neighbours close together (reverse Cuthill-McKee), or None.

    The sparse product gathers the rows of the dense block at each stored column: in the k-NN graph's own order
    (images in collection order) these are scattered over memory, after RCM they lie in a narrow band, and the
    product is several times faster (measured: 9.1x for 20 products at 100k nodes,
    ``benchmarks/bench_diffusion.py``). Uses SciPy's ``reverse_cuthill_mckee`` when SciPy is installed (it is not a
    dependency of the library); without it the graph is used in its own order (same results, slower on large
    graphs).
    """
    try:
        import numpy as np
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import reverse_cuthill_mckee
    except ImportError:  # pragma: no cover - scipy is installed with the test extra
        return None
    n = s.shape[0]
    crow = s.crow_indices().cpu().numpy()
    col = s.col_indices().cpu().numpy()
    pattern = csr_matrix((np.ones(col.shape[0], dtype=np.int8), col, crow), shape=(n, n))
    return torch.from_numpy(reverse_cuthill_mckee(pattern, symmetric_mode=True).astype(np.int64)).to(s.device)


#: This machine's last-level (L3) cache in bytes, None where unknown (read once from sysfs): see :func:`cg_columns`.
L3_BYTES = cache_bytes(3)


def cg_columns(n: int, q: int, itemsize: int, l3: int | None) -> int:
    r"""Right-hand sides per CG call on the CPU: ``q`` (all at once), or groups that keep an iteration in cache.

    A CG iteration streams four :math:`N \times g` blocks (x, r, p and A p) through several passes. When the
    blocks of all ``q`` columns overflow the last-level cache ``l3`` but those of a group of at least 8 columns fit
    (4 g N itemsize <= l3), the columns are solved in equal groups of at most that size; the sparse matrix is then
    read once per group and product, which is why narrower groups are not used. The columns are independent, so
    the result is the same bits. Measured on 2 AMD EPYC cores (32 MiB L3) at N = 100000, 70 columns, 20
    iterations (``benchmarks/bench_diffusion.py``'s graph; ad hoc, 3 interleaved runs): all at once 1.57-1.96 s,
    groups of 35 1.47-1.68 s, 24 1.35-1.53 s, 18 (this rule) 1.34-1.44 s, 14 1.49-1.70 s.
    """
    if l3 is None:
        return q
    width = l3 // (4 * max(n, 1) * itemsize)
    if width < 8 or width >= q:
        return q
    groups = -(-q // width)
    return -(-q // groups)


class DiffusionOperator:
    r"""The prepared system :math:`L_\alpha = I - \alpha D^{-1/2} A D^{-1/2}` of one graph, reused across solves.

    Built once per graph (normalisation, a locality-friendly node order, 32-bit CSR indices where they fit);
    :meth:`solve` runs the batched CG on it. :func:`diffusion_scores` builds one per call; :class:`deepagg.Diffusion`
    keeps one with its graph.
    """

    def __init__(self, a: torch.Tensor, *, alpha: float = 0.99, reorder: bool = True) -> None:
        self.alpha = _check_alpha(alpha, "DiffusionOperator")
        s = normalized_affinity(a)
        self.n = s.shape[0]
        self.dtype = s.dtype
        perm = _locality_order(s) if reorder and s.device.type == "cpu" and self.n > 1 else None
        if perm is not None:
            coo = s.to_sparse_coo()  # normalized_affinity returns CSR
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(self.n, device=perm.device)
            i = coo.indices()
            with _silence_csr_beta_ctx():
                s = (
                    torch.sparse_coo_tensor(inv[i], coo.values(), coo.shape, check_invariants=False)
                    .coalesce()
                    .to_sparse_csr()
                )
        self.perm = perm
        index_dtype = torch.int32 if s.values().numel() < 2**31 - 1 and self.n < 2**31 - 1 else torch.int64
        with _silence_csr_beta_ctx():
            self.s = torch.sparse_csr_tensor(
                s.crow_indices().to(index_dtype), s.col_indices().to(index_dtype), s.values(), s.shape
            )

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`L_\alpha v` for a block :math:`(N, Q)` in the operator's node order."""
        return torch.addmm(v, self.s, v, alpha=-self.alpha)

    def solve(self, y: torch.Tensor, *, max_iter: int = 20, tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, residual_norms)`` for seeds ``y`` :math:`(N, Q)` in the graph's own node order."""
        b = y.to(self.dtype)
        if self.perm is not None:
            b = b.index_select(0, self.perm)  # index_select: the fast row gather (b[perm] is several times slower)
        n_cols = b.shape[1] if b.ndim == 2 else 1
        width = n_cols
        if b.ndim == 2 and b.device.type == "cpu":
            width = cg_columns(b.shape[0], n_cols, b.element_size(), L3_BYTES)
        if width < n_cols:  # column groups that keep each CG iteration in cache (same result)
            parts = [
                conjugate_gradient(self.matvec, b[:, c : c + width].contiguous(), max_iter=max_iter, tol=tol)
                for c in range(0, b.shape[1], width)
            ]
            f, res = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts])
        else:
            f, res = conjugate_gradient(self.matvec, b.contiguous(), max_iter=max_iter, tol=tol)
        if self.perm is not None:
            out = torch.empty_like(f)
            out.index_copy_(0, self.perm, f)
            f = out
        return f, res


def normalized_affinity(a: torch.Tensor) -> torch.Tensor:
    r""":math:`S = D^{-1/2} A D^{-1/2}` (eq. 2) as a sparse CSR tensor; a node of degree 0 gets an empty row.

    Args:
        a: Affinity matrix :math:`(N, N)`, sparse (COO or CSR) or dense, symmetric and non-negative.

    Returns:
        Sparse CSR :math:`(N, N)`, the dtype of ``a``.

    Example:
        >>> a = torch.tensor([[0.0, 4.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        >>> normalized_affinity(a).to_dense().tolist()
        [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    coo = _as_coo(a, "normalized_affinity")
    n = coo.shape[0]
    idx, val = coo.indices(), coo.values()
    deg = torch.zeros(n, dtype=val.dtype, device=val.device).index_add_(0, idx[0], val)
    dm = torch.where(deg > 0, deg.clamp(min=torch.finfo(val.dtype).tiny).sqrt().reciprocal(), torch.zeros_like(deg))
    s = torch.sparse_coo_tensor(idx, val * dm[idx[0]] * dm[idx[1]], (n, n), is_coalesced=True, check_invariants=False)
    with _silence_csr_beta_ctx():
        return s.to_sparse_csr()


# -------------------------------------------------------------------------------------------------- diffusion


def _check_y(y: Any, n: int, fn: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.ndim not in (1, 2) or y.shape[0] != n:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ShapeError(f"{fn}(): y must have shape (N,) or (N, Q) with N = {n} (the graph's nodes); got {got}.")
    check_floating(y, name="y", fn=fn)
    return y


def diffusion_scores(
    a: torch.Tensor,
    y: torch.Tensor,
    *,
    alpha: float = 0.99,
    max_iter: int = 20,
    tol: float = 1e-6,
    nodes: torch.Tensor | None = None,
    return_residual: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Diffusion scores :math:`f` solving :math:`(I - \alpha D^{-1/2} A D^{-1/2}) f = y` for every column of ``y``.

    One batched conjugate-gradient solve (:func:`deepagg.functional.solvers.conjugate_gradient`) for all
    queries: ``max_iter`` sparse products with an :math:`(N, Q)` block, a per-column tolerance ``tol``
    relative to :math:`\|y_q\|`, and a column that does not converge returns its smallest-residual iterate
    (MATLAB ``pcg``'s rule, which the authors' scores come from). A node without edges has the equation
    :math:`f_i = y_i` (reached as CG converges; no division by zero).

    With ``nodes`` :math:`(Q, n)` (int64 node indices, ``-1`` = padding), query ``q`` is solved on the
    sub-graph of its nodes only, with :math:`D^{-1/2} A D^{-1/2}` rebuilt from the sub-graph's own degrees (the
    paper's truncation, section 4.4); scores outside a query's nodes are 0. All sub-graphs are solved together
    as one block-diagonal system.

    Args:
        a: Affinity :math:`(N, N)`: sparse COO/CSR (e.g. :func:`mutual_knn_affinity`) or dense, symmetric,
            non-negative. Pass a :func:`normalized_affinity` result through a :class:`deepagg.Diffusion` module
            to reuse it across calls.
        y: Seeds :math:`(N, Q)` (columns are queries) or :math:`(N,)`.
        alpha: In (0, 1).
        max_iter: CG iterations (>= 0).
        tol: Relative residual tolerance (>= 0).
        nodes: Optional per-query sub-graphs :math:`(Q, n)`, int64, -1 padded.
        return_residual: Also return each column's residual norm :math:`\|y - L_\alpha f\|`.

    Returns:
        :math:`f` with the shape of ``y`` (and the residual norms, shape ``y.shape[1:]``).

    Raises:
        ValueError: If ``alpha`` is not in (0, 1), or ``nodes`` holds an index outside ``[-1, N)``.
        ShapeError: If ``a`` is not square, ``y`` does not have N rows, or ``nodes`` is not ``(Q, n)``.

    Example:
        >>> a = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        >>> f = diffusion_scores(a, torch.tensor([1.0, 0.0, 0.0]), alpha=0.5)
        >>> f.argmax().item(), bool(f[1] > f[2] > 0)
        (0, True)
    """
    fn = "diffusion_scores"
    alpha = _check_alpha(alpha, fn)
    if not isinstance(a, torch.Tensor) or a.ndim != 2 or a.shape[0] != a.shape[1]:
        got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        raise ShapeError(f"{fn}(): A must be a square (N, N) affinity matrix; got {got}.", "(N, N)", got)
    n = a.shape[0]
    y = _check_y(y, n, fn)
    single = y.ndim == 1
    cols = y[:, None] if single else y
    dtype = torch.promote_types(torch.promote_types(a.dtype, y.dtype), torch.float32)
    if nodes is None:
        f, res = DiffusionOperator(a.to(dtype), alpha=alpha).solve(cols.to(dtype), max_iter=max_iter, tol=tol)
    else:
        f, res = _truncated(a, cols.to(dtype), nodes, alpha, max_iter, tol, dtype, fn)
    f = f.to(y.dtype)
    if single:
        f, res = f[:, 0], res[0]
    return (f, res) if return_residual else f


def _truncated(
    a: torch.Tensor,
    y: torch.Tensor,
    nodes: torch.Tensor,
    alpha: float,
    max_iter: int,
    tol: float,
    dtype: torch.dtype,
    fn: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, q = y.shape
    check_shape(nodes, "Q,n", name="nodes", fn=fn, sizes={"Q": q}, hint="One row of node indices per query.")
    check_dtype(nodes, (torch.int64, torch.int32), name="nodes", fn=fn)
    m = nodes.shape[1]
    nodes = nodes.long()
    if nodes.numel() and (int(nodes.min()) < -1 or int(nodes.max()) >= n):
        raise ValueError(f"{fn}(): nodes must hold node indices in [0, {n}) or -1 (padding); got values outside.")
    csr = _as_csr(a.to(dtype), fn)
    crow, col, val = csr.crow_indices(), csr.col_indices(), csr.values()
    valid = nodes >= 0
    qi = torch.arange(q, device=y.device)[:, None].expand(q, m)
    pos = torch.arange(m, device=y.device)[None, :].expand(q, m)
    # local[q, i] = position of node i in query q's list (or -1), one (Q, N) map.
    local = torch.full((q, n), -1, dtype=torch.long, device=y.device)
    local[qi[valid], nodes[valid]] = pos[valid]
    # The edges leaving each query's nodes (CSR row slices), kept when the other end is in the list too:
    # O(Q * m * degree) work, independent of the size of the whole graph.
    safe = nodes.clamp(min=0)
    starts = crow[safe]
    counts = torch.where(valid, crow[safe + 1] - starts, 0).reshape(-1)
    total = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(q * m, device=y.device), counts, output_size=total)
    offset = torch.arange(total, device=y.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts, output_size=total
    )
    edge = starts.reshape(-1)[owner] + offset
    qq = owner // m
    other = local[qq, col[edge]]
    keep = other >= 0
    rows, cols_, vals = owner[keep], qq[keep] * m + other[keep], val[edge[keep]]
    big = torch.sparse_coo_tensor(torch.stack([rows, cols_]), vals, (q * m, q * m), check_invariants=False).coalesce()
    s_mat = normalized_affinity(big)
    # Column q of the block system lives in block q: y restricted to query q's nodes.
    b = torch.zeros(q, m, dtype=dtype, device=y.device)
    b[valid] = y.T[qi[valid], nodes[valid]]

    def matvec(v: torch.Tensor) -> torch.Tensor:  # v: (m, Q), column q in block q
        flat = torch.zeros(q * m, 1, dtype=dtype, device=v.device)
        flat[:, 0] = v.T.reshape(-1)
        out = (s_mat @ flat)[:, 0].view(q, m).T
        return v - alpha * out

    f_local, res = conjugate_gradient(matvec, b.T.contiguous(), max_iter=max_iter, tol=tol)
    f = torch.zeros(n, q, dtype=dtype, device=y.device)
    f.T[qi[valid], nodes[valid]] = f_local.T[valid]
    return f, res


# --------------------------------------------------------------------------------------------- query seeds


def query_seeds(
    q: torch.Tensor,
    x: torch.Tensor,
    *,
    k: int,
    gamma: float = 3.0,
    mask: torch.Tensor | None = None,
    variant: str = "paper",
    backend: str = "torch",
    **search: Any,
) -> torch.Tensor:
    r"""The seed vectors ``y`` of unseen queries (eqs. 7, 8): :math:`(N, Q)`, one column per query.

    For a query with vectors :math:`Q` (one global descriptor, or its regions),
    :math:`y_i = \sum_{q \in Q} s_k(x_i | q)` with :math:`s_k(x_i|q) = \max(x_i^\top q, 0)^\gamma` when
    :math:`x_i \in \mathrm{NN}_k(q)` (the k most similar database vectors, ties to the lower index) and 0
    otherwise; then only the k largest entries of ``y`` are kept (section 5.1; ties to the lower index).
    ``variant="iscen"`` is the authors' released ``ymake.m`` instead: the *similarities* are summed over the
    query's vectors first and the kernel is applied to the kept sums, :math:`\max(\sum s, 0)^\gamma` (the same
    for a single query vector).

    Args:
        q: Queries :math:`(Q, D)` (global) or :math:`(Q, R, D)` (regions, with ``mask``).
        x: Database nodes :math:`(N, D)`.
        k: kq, the neighbours per query vector and the entries kept, ``1 <= k <= N`` (10 global, 200 regional).
        gamma: Kernel exponent > 0.
        mask: Optional bool :math:`(Q, R)`, True = a valid region.
        variant: ``"paper"`` or ``"iscen"``.
        backend: k-NN backend (see :func:`knn_lists`).
        **search: ``index``, ``nlist``, ``nprobe``, ``hnsw_m``, ``chunk_size`` for :func:`knn_lists`.

    Returns:
        ``y`` :math:`(N, Q)`, non-negative, at most k non-zeros per column.

    Raises:
        ValueError: If ``k`` is not in ``[1, N]``, ``gamma <= 0`` or ``variant`` is unknown.
        ShapeError: If the shapes do not match.

    Example:
        >>> x = torch.eye(4)
        >>> query_seeds(torch.tensor([[1.0, 0.5, 0.0, 0.0]]), x, k=2, gamma=1.0).flatten()
        tensor([1.0000, 0.5000, 0.0000, 0.0000])
    """
    fn = "query_seeds"
    _check_rows(x, "x", fn)
    n, d = x.shape
    k = check_int(k, name="k", fn=fn, minimum=1)
    if k > n:
        raise ValueError(f"{fn}(): k must be <= N = {n} (the database nodes); got k = {k}.")
    gamma = _check_float(gamma, "gamma", fn, low=0.0)
    if variant not in SEED_VARIANTS:
        raise ValueError(f"{fn}(): variant must be one of {SEED_VARIANTS}; got {variant!r}.")
    if not isinstance(q, torch.Tensor) or q.ndim not in (2, 3):
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ShapeError(f"{fn}(): q must have shape (Q, D) or (Q, R, D); got {got}.", "(Q, D) or (Q, R, D)", got)
    check_floating(q, name="q", fn=fn)
    check_shape(q, "Q,R,D" if q.ndim == 3 else "Q,D", name="q", fn=fn, sizes={"D": d})
    regions = q if q.ndim == 3 else q[:, None, :]
    nq, r = regions.shape[:2]
    if mask is not None:
        check_shape(mask, "Q,R", name="mask", fn=fn, sizes={"Q": nq, "R": r})
        check_dtype(mask, (torch.bool,), name="mask", fn=fn)
    dtype = torch.promote_types(torch.promote_types(x.dtype, q.dtype), torch.float32)
    with torch.no_grad():
        flat = regions.reshape(nq * r, d).to(dtype)
        sims, idx = knn_lists(x.to(dtype), k, queries=flat, backend=backend, **search)
        sims = sims.clamp(min=0).pow(gamma) if variant == "paper" else sims
        if mask is not None:
            sims = sims * mask.reshape(-1, 1).to(dtype)
        sims = torch.nan_to_num(sims, neginf=0.0)
        owner = torch.arange(nq, device=x.device).repeat_interleave(r * k)
        acc = torch.zeros(nq * n, dtype=dtype, device=x.device)
        acc.index_add_(0, owner * n + idx.reshape(-1), sims.reshape(-1))
        acc = acc.view(nq, n)
        touched = torch.zeros(nq * n, dtype=torch.bool, device=x.device)
        valid_rows = mask.reshape(-1) if mask is not None else torch.ones(nq * r, dtype=torch.bool, device=x.device)
        touched[(owner * n + idx.reshape(-1))[valid_rows.repeat_interleave(k)]] = True
        touched = touched.view(nq, n)
        # Keep the k largest accumulated entries among the touched nodes (ties to the lower index).
        key = torch.where(touched, acc, torch.full_like(acc, -math.inf))
        keep = _topk_lower_index(key, k)
        kept = acc.gather(1, keep)
        if variant == "iscen":
            kept = kept.clamp(min=0).pow(gamma)
        kept = torch.where(touched.gather(1, keep), kept, torch.zeros_like(kept))
        y = torch.zeros(nq, n, dtype=dtype, device=x.device).scatter_(1, keep, kept)
    return y.T.to(torch.promote_types(q.dtype, x.dtype))


# ------------------------------------------------------------------------------------------------ GMP weights


def gmp_weights(regions: torch.Tensor, mask: torch.Tensor | None = None, *, lam: float = 1.0) -> torch.Tensor:
    r"""Generalised-max-pooling weights of each image's region vectors (eq. 14): :math:`(B, R)`.

    :math:`w = (V V^\top + \lambda I)^{-1}\mathbf{1}` with :math:`V` the image's :math:`R \times D` region
    matrix (Murray and Perronnin's GMP; Iscen et al. pool regional diffusion scores with these weights,
    :math:`\lambda = 1`). Masked regions take no part and get weight 0. Solved by a batched Cholesky
    factorisation (the matrix is SPD for :math:`\lambda > 0`; no LU, see ``environment.md``), in at least
    float32. Differentiable.

    Args:
        regions: Region vectors :math:`(B, R, D)`.
        mask: Optional bool :math:`(B, R)`, True = valid region.
        lam: Regulariser :math:`\lambda > 0`.

    Returns:
        Weights :math:`(B, R)`.

    Raises:
        ValueError: If ``lam`` is not a finite float > 0.
        ShapeError: If ``regions`` is not 3-D or ``mask`` does not match.

    Example:
        >>> v = torch.eye(3)[None]  # three orthonormal regions
        >>> gmp_weights(v, lam=1.0)
        tensor([[0.5000, 0.5000, 0.5000]])
    """
    fn = "gmp_weights"
    check_shape(regions, "B,R,D", name="regions", fn=fn)
    check_floating(regions, name="regions", fn=fn)
    lam = _check_float(lam, "lam", fn, low=0.0)
    b, r, _ = regions.shape
    dtype = torch.promote_types(regions.dtype, torch.float32)
    v = regions.to(dtype)
    if mask is not None:
        check_shape(mask, "B,R", name="mask", fn=fn, sizes={"B": b, "R": r})
        check_dtype(mask, (torch.bool,), name="mask", fn=fn)
        check_same_device({"regions": regions, "mask": mask}, fn=fn)
        v = torch.where(mask[..., None], v, torch.zeros((), dtype=dtype, device=v.device))  # NaN padding too
    if b == 0 or r == 0:
        return v.new_zeros(b, r).to(regions.dtype)
    gram = v @ v.mT + lam * torch.eye(r, dtype=dtype, device=v.device)
    ones = torch.ones(b, r, 1, dtype=dtype, device=v.device)
    w = torch.cholesky_solve(ones, torch.linalg.cholesky(gram))[..., 0]
    if mask is not None:
        w = w * mask.to(dtype)
    return w.to(regions.dtype)
