r"""Diffusion at scale: batched torch CG vs a per-query SciPy CG loop, and graph construction vs dense N x N.

``python -m benchmarks.bench_diffusion [--quick] [--million [--million-dim 64]] [--parts cg graph large]``.

**Data: descriptors on manifolds.** ``N / 200`` smooth closed curves in ``D = 128`` dimensions,
:math:`c_m(t) = \mu_m + \sum_{j=1}^{3} a_{mj} \cos(j t + \phi_{mj})` with :math:`\mu_m = g + 0.5\,\xi_m` (a shared
direction ``g`` plus a curve's own offset, all entries standard normal, so unrelated descriptors still have
cosine about 0.4 as real CNN descriptors do), amplitudes :math:`a_{mj} \sim N(0, I)` and uniform phases. Each
point picks a curve (curve sizes vary: its probabilities are a Dirichlet(1) draw, so some curves hold a handful
of points and some a thousand), a uniform :math:`t`, adds isotropic noise of std 0.1 per entry and is
L2-normalised. The points are drawn independently, so the collection order is random with respect to the curves
(as in a real collection); the 70 queries are further draws from the same curves, not in the database.
Deterministic from the seed. That this is a manifold and not noise shows in the rows: the fraction of the top
100 on the query's own curve is about 0.82 for plain k-NN and 0.96 after diffusion at N = 5000.

**Rows** (the graph is the paper's: mutual k-NN, k = 50, kernel exponent 3; kq = 10, alpha = 0.99, 20 CG
iterations, tol 1e-6):

- ``CG``, N = 5000 and N = 100000 (quick: N = 2000, 10 queries): deepagg's
  ``DiffusionOperator(A, alpha).solve(y, max_iter=20, tol=1e-6)`` for all queries at once (the operator is built
  once, outside the timing, as a user with an offline graph has it; its build time is reported) against a loop
  of ``scipy.sparse.linalg.cg(L, y[:, q], rtol=1e-6, maxiter=20)`` per query, with
  :math:`L = I - \alpha D^{-1/2} A D^{-1/2}` a SciPy CSR matrix in the graph's own (collection) order, float32
  like ours. Also timed: the same loop in float64 and in float32 on the RCM-reordered matrix (deepagg's operator
  reorders the nodes with reverse Cuthill-McKee for memory locality; SciPy on the same order is the fair
  algorithmic comparison). Per-query time = total / number of queries. torch uses both cores (the sparse
  product is threaded); SciPy's sparse product is single-threaded.
- Agreement: SciPy's ``cg`` returns its *last* iterate when it has not converged; deepagg returns the iterate
  with the smallest residual (MATLAB ``pcg``'s rule, which the authors' scores come from). At alpha = 0.99 no
  query converges in 20 iterations, so the verification run of the SciPy loop (untimed) tracks its
  smallest-residual iterate with a ``callback`` (true residual in float64, the initial zero included), and the
  top-100 *sets* of deepagg and SciPy are compared per query against both the tracked and the last iterate.
  The run refuses (raises) when fewer than 97% of the queries have an identical top-100 set against the tracked
  iterate. ``max abs diff`` is the largest score difference relative to the query's largest score, against the
  tracked iterate.
- ``graph build``, N = 5000 and 20000 (quick: 2000): ``mutual_knn_affinity`` (exact torch backend, chunked:
  O(Nk) memory plus a 128 MB chunk of similarities) against a dense construction (N x N similarities, top-k,
  N x N boolean k-NN and mutual masks, dense A of eq. 6). Max abs diff: the largest difference of A's entries.
  At N = 100000 the dense construction would need 40 GB for the similarities alone and another 40 GB for A
  (not run); the row reports the exact torch build and the faiss flat (``IndexFlatIP``) build and checks that
  both give the same edges.
- ``--million``: N = 1e6 in D = 64 (``--million-dim``), graph through faiss IVF (``nlist`` = 4 sqrt(N) = 4000,
  ``nprobe`` 16: each search scans about 0.4% of the nodes; 64 would take about 45 minutes on 2 cores). The
  recall of its k-NN lists is measured on 1000 rows against the exact lists (0.95 at N = 50000). The memory the
  run needs is estimated and printed first (about 8 GiB at D = 64, peak of the solve phase: graph, operator,
  CG blocks and seeds); the run refuses when ``MemAvailable`` (``/proc/meminfo``) is smaller. SciPy is timed on
  5 of the queries only (the loop would take minutes).
- On CUDA (when ``torch.cuda.is_available()``): the operator's per-query time on the GPU at N = 100000 (and
  1e6 with ``--million``), agreement of its top-100 with the CPU result.

**Memory.** Peak resident memory of one graph construction is measured in a fresh Python process, one per
measurement (not in ``--quick`` mode: the imports of two children would take longer than the run; in-process
numbers are wrong because the allocator reuses freed pages). The child generates the data, resets the kernel's
high-water mark (``echo 5 > /proc/self/clear_refs``), reads ``VmRSS``, builds the graph and reports
``VmHWM - VmRSS``: the build's peak above what was already resident, its result included. ``tracemalloc``
would not see torch's allocations. "graph MB" is the size of the COO affinity (int64 indices, float32 values);
"operator MB" the size of deepagg's prepared CSR (int32 indices) with its node permutation.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepagg.functional import l2n
from deepagg.functional.diffusion import DiffusionOperator, knn_lists, mutual_knn_affinity, query_seeds

K, KQ, GAMMA, ALPHA, MAX_ITER, TOL = 50, 10, 3.0, 0.99, 20, 1e-6
NQ, DIM, TOP, SEED, PER_CURVE = 70, 128, 100, 0, 200
FREQS = (1.0, 2.0, 3.0)
MIN_AGREEMENT = 0.97
MILLION_NPROBE = 16  # IVF lists visited per search at 1M nodes (64 would take about 45 min on 2 cores)
SCORE_TOL = 1e-3
CHILD_TAG = "BENCH_DIFFUSION_CHILD "
MB = 2.0**20


# ------------------------------------------------------------------------------------------------------- data


def manifold_data(
    n: int, nq: int, d: int = DIM, seed: int = SEED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x (n, d), queries (nq, d), curve of each x, curve of each query)``: points on random closed curves."""
    g = torch.Generator().manual_seed(seed)
    m = max(1, n // PER_CURVE)
    freqs = torch.tensor(FREQS)
    centre = torch.randn(d, generator=g) + 0.5 * torch.randn(m, d, generator=g)
    amp = torch.randn(m, len(FREQS), d, generator=g)
    phase = 2 * math.pi * torch.rand(m, len(FREQS), generator=g)
    weight = -torch.log(torch.rand(m, generator=g))  # normalised: a Dirichlet(1) draw of curve probabilities
    total = n + nq
    curve = torch.multinomial(weight / weight.sum(), total, replacement=True, generator=g)
    t = 2 * math.pi * torch.rand(total, generator=g)
    out = torch.empty(total, d)
    step = 1 << 16
    for s in range(0, total, step):
        c = curve[s : s + step]
        waves = torch.cos(t[s : s + step, None] * freqs + phase[c])
        block = centre[c] + torch.einsum("nj,njd->nd", waves, amp[c])
        block += 0.1 * torch.randn(block.shape, generator=g)
        out[s : s + step] = l2n(block)
    return out[:n], out[n:], curve[:n], curve[n:]


# ------------------------------------------------------------------------------------------------ references


def dense_mutual_affinity(x: torch.Tensor, k: int, gamma: float) -> torch.Tensor:
    """The dense construction: N x N similarities, top-k per row, N x N mutual mask, dense A (eq. 6)."""
    sim = x @ x.T
    sim.fill_diagonal_(-math.inf)
    idx = torch.topk(sim, k, dim=1).indices
    knn = torch.zeros(sim.shape, dtype=torch.bool).scatter_(1, idx, True)
    mutual = knn & knn.T
    a = torch.minimum(sim, sim.T).clamp_(min=0).pow_(gamma)
    return a.masked_fill_(~mutual, 0.0)


def scipy_laplacian(a: torch.Tensor, alpha: float, dtype: type) -> Any:
    r""":math:`I - \alpha D^{-1/2} A D^{-1/2}` as a SciPy CSR array, normalised in float64, cast to ``dtype``."""
    import scipy.sparse as sp

    coo = a.coalesce()
    n = coo.shape[0]
    i, j = coo.indices().numpy()
    v = coo.values().double().numpy()
    deg = np.bincount(i, weights=v, minlength=n)
    dm = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, np.finfo(np.float64).tiny)), 0.0)
    s = sp.csr_array((v * dm[i] * dm[j], (i, j)), shape=(n, n))
    lap = (sp.eye_array(n, format="csr") - alpha * s).astype(dtype).tocsr()
    lap.sum_duplicates()
    lap.sort_indices()
    return lap


def scipy_cg_loop(lap: Any, yt: np.ndarray) -> np.ndarray:
    """The reference: one ``scipy.sparse.linalg.cg`` per query (rows of ``yt``), last iterates as rows."""
    from scipy.sparse.linalg import cg

    out = np.empty_like(yt)
    for j in range(yt.shape[0]):
        out[j], _ = cg(lap, yt[j], rtol=TOL, maxiter=MAX_ITER)
    return out


def scipy_cg_tracked(lap: Any, yt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference loop once more, untimed: ``(last iterates, smallest-residual iterates, their iteration)``."""
    from scipy.sparse.linalg import cg

    lap64 = lap.astype(np.float64)
    last, best = np.empty_like(yt), np.empty_like(yt)
    best_it = np.zeros(yt.shape[0], dtype=np.int64)
    for j in range(yt.shape[0]):
        b64 = yt[j].astype(np.float64)
        state: dict[str, Any] = {"x": np.zeros_like(yt[j]), "r": float(np.linalg.norm(b64)), "it": 0, "k": 0}

        def track(xk: np.ndarray, b64: np.ndarray = b64, state: dict[str, Any] = state) -> None:
            state["k"] += 1
            r = float(np.linalg.norm(b64 - lap64 @ xk.astype(np.float64)))
            if r < state["r"]:
                state.update(x=xk.copy(), r=r, it=state["k"])

        last[j], _ = cg(lap, yt[j], rtol=TOL, maxiter=MAX_ITER, callback=track)
        best[j], best_it[j] = state["x"], state["it"]
    return last, best, best_it


def identical_top(f: torch.Tensor, ref: torch.Tensor, top: int) -> torch.Tensor:
    """Per query (row), whether the sets of the ``top`` highest scores are the same."""
    a = torch.sort(torch.topk(f, top, dim=1).indices, dim=1).values
    b = torch.sort(torch.topk(ref, top, dim=1).indices, dim=1).values
    return (a == b).all(dim=1)


def rel_score_diff(f: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest score difference relative to each query's (row's) largest reference score."""
    scale = ref.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    return float(((f.double() - ref.double()).abs() / scale).max())


# ------------------------------------------------------------------------------------------- memory, children


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"bench_diffusion: no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, float, float, bool]:
    """``(result, seconds, peak MB above the resident baseline, whether the high-water mark could be reset)``."""
    gc.collect()
    reset = _reset_peak()
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, seconds, (_status_kb("VmHWM") - base) / 1024, reset


def mem_available_mb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _build(spec: dict[str, Any]) -> dict[str, Any]:
    """One graph construction of ``spec`` with its time and peak memory (the body of a child process)."""
    x = manifold_data(spec["n"], spec["nq"], spec["d"])[0]  # the very descriptors of the parent process
    search = {k: spec[k] for k in ("nlist", "nprobe") if k in spec}
    backend, index = spec.get("backend", "torch"), spec.get("index", "flat")
    keep = int(spec.get("keep_rows", 0))
    lists: list[torch.Tensor] = []

    def build() -> torch.Tensor:
        if spec["what"] == "dense":
            return dense_mutual_affinity(x, K, GAMMA)
        if not keep:
            return mutual_knn_affinity(x, k=K, gamma=GAMMA, backend=backend, index=index, **search)
        knn = knn_lists(x, K, backend=backend, index=index, **search)  # what mutual_knn_affinity does inside
        lists.append(knn[1][:keep].clone())
        return mutual_knn_affinity(x, k=K, gamma=GAMMA, knn=knn)

    a, seconds, peak, reset = measure_peak(build)
    info: dict[str, Any] = {"seconds": seconds, "peak_mb": peak, "peak_reset": reset}
    if spec["what"] != "dense":
        info["nnz"] = int(a._nnz())
    if spec.get("save"):
        blob = {"indices": a.indices(), "values": a.values(), "n": spec["n"]}
        torch.save({**blob, "knn_rows": lists[0]} if lists else blob, spec["save"])
    return info


def measure_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and peak memory of one graph construction in a fresh Python process (``python -m ... --child``)."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "benchmarks.bench_diffusion", "--child", json.dumps(spec)]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench_diffusion: child {spec} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(CHILD_TAG) :])


def load_graph(path: str) -> torch.Tensor:
    blob = torch.load(path)
    n = blob["n"]
    return torch.sparse_coo_tensor(blob["indices"], blob["values"], (n, n), is_coalesced=True, check_invariants=False)


def graph_mb(a: torch.Tensor) -> float:
    return a._nnz() * (2 * 8 + a.values().element_size()) / MB


def operator_mb(op: DiffusionOperator) -> float:
    s = op.s
    size = sum(t.numel() * t.element_size() for t in (s.crow_indices(), s.col_indices(), s.values()))
    if op.perm is not None:
        size += op.perm.numel() * op.perm.element_size()
    return size / MB


# ------------------------------------------------------------------------------------------------------ rows


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def curve_precision(scores: torch.Tensor, curve: torch.Tensor, qcurve: torch.Tensor, top: int) -> float:
    """Fraction of each query's top ``top`` (rows of ``scores``) that lie on the query's curve."""
    return float((curve[torch.topk(scores, top, dim=1).indices] == qcurve[:, None]).float().mean())


def cg_row(
    x: torch.Tensor,
    q: torch.Tensor,
    curve: torch.Tensor,
    qcurve: torch.Tensor,
    a: torch.Tensor,
    quick: bool,
    *,
    scipy_queries: int | None = None,
    note: str = "",
) -> dict[str, Any]:
    """Batched torch CG vs the per-query SciPy loop on graph ``a`` (see the module docstring)."""
    from benchmarks.common import compare, median_iqr_ms

    n, nq = x.shape[0], q.shape[0]
    top = min(TOP, n)
    y, seeds_ms = _timed(lambda: query_seeds(q, x, k=KQ, gamma=GAMMA))
    op, op_ms = _timed(lambda: DiffusionOperator(a, alpha=ALPHA))
    f = op.solve(y, max_iter=MAX_ITER, tol=TOL)[0].T.contiguous()  # (Q, N)
    lap32 = scipy_laplacian(a, ALPHA, np.float32)
    lap64 = lap32.astype(np.float64)
    nref = nq if scipy_queries is None else min(scipy_queries, nq)
    yt = np.ascontiguousarray(y.T.numpy()[:nref])
    yt64 = yt.astype(np.float64)
    last, best, best_it = scipy_cg_tracked(lap32, yt)
    same_best = identical_top(f[:nref], torch.from_numpy(best), top)
    same_last = identical_top(f[:nref], torch.from_numpy(last), top)
    if float(same_best.float().mean()) < MIN_AGREEMENT:
        raise RuntimeError(
            f"bench_diffusion: N={n}: only {int(same_best.sum())}/{nref} queries have the same top-{top} as SciPy"
        )
    diff = rel_score_diff(f[:nref], torch.from_numpy(best))
    perm = op.perm.numpy() if op.perm is not None else np.arange(n)
    lap_rcm = lap32[perm][:, perm]
    yt_rcm = np.ascontiguousarray(yt[:, perm])

    def ours() -> Any:
        return op.solve(y, max_iter=MAX_ITER, tol=TOL)

    if scipy_queries is None:
        row = compare(
            "diffusion",
            "",
            "",
            ours,
            lambda: scipy_cg_loop(lap32, yt),
            diff,
            reference="per-query scipy.sparse.linalg.cg loop, float32, collection order",
            quick=quick,
            tol=SCORE_TOL,
        )
        ref64_ms = median_iqr_ms(lambda: scipy_cg_loop(lap64, yt64), quick)[0]
        rcm_ms = median_iqr_ms(lambda: scipy_cg_loop(lap_rcm, yt_rcm), quick)[0]
    else:  # SciPy on a subset of the queries, one run each, scaled to all queries
        ours_ms, ours_iqr = median_iqr_ms(ours, quick)
        scale = nq / nref
        ref_ms = _timed(lambda: scipy_cg_loop(lap32, yt))[1] * scale
        ref64_ms = _timed(lambda: scipy_cg_loop(lap64, yt64))[1] * scale
        rcm_ms = _timed(lambda: scipy_cg_loop(lap_rcm, yt_rcm))[1] * scale
        row = {
            "bench": "diffusion",
            "ours_ms": ours_ms,
            "ours_iqr_ms": ours_iqr,
            "ref_ms": ref_ms,
            "ref_iqr_ms": float("nan"),
            "ratio": ref_ms / ours_ms,
            "max_abs_diff": diff,
            "reference": f"per-query scipy cg loop, float32, collection order (timed on {nref} queries, x{scale:.0f})",
        }
    # Where the time goes: the max_iter sparse products alone, in our node order and in the collection's order.
    plain = DiffusionOperator(a, alpha=ALPHA, reorder=False)
    yp = y[op.perm].contiguous() if op.perm is not None else y
    spmm_ms = median_iqr_ms(lambda: [op.matvec(yp) for _ in range(MAX_ITER)], quick)[0]
    spmm_plain_ms = median_iqr_ms(lambda: [plain.matvec(y) for _ in range(MAX_ITER)], quick)[0]
    ours_q, ref_q = row["ours_ms"] / nq, row["ref_ms"] / nq
    row["case"] = (
        f"CG {nq} q x {MAX_ITER} it{note}: {ours_q:.2f} vs {ref_q:.2f} ms/query; vs SciPy f64 "
        f"{ref64_ms / row['ours_ms']:.1f}x, vs SciPy on RCM order {rcm_ms / row['ours_ms']:.1f}x; top-{top} "
        f"identical {int(same_best.sum())}/{nref} (SciPy last iterate: {int(same_last.sum())}/{nref}); "
        f"the {MAX_ITER} sparse products alone: {spmm_ms:.1f} ms ({spmm_plain_ms:.1f} ms in collection order)"
    )
    row["shape"] = f"N={n} D={x.shape[1]} nnz={a._nnz()}"
    row.update(
        n=n,
        queries=nq,
        nnz=int(a._nnz()),
        graph_mb=graph_mb(a),
        operator_mb=operator_mb(op),
        operator_build_ms=op_ms,
        seeds_ms=seeds_ms,
        ours_ms_per_query=ours_q,
        ref_ms_per_query=ref_q,
        ref64_ms=ref64_ms,
        ratio_f64=ref64_ms / row["ours_ms"],
        ref_rcm_ms=rcm_ms,
        ratio_rcm=rcm_ms / row["ours_ms"],
        spmm_ms=spmm_ms,
        spmm_collection_order_ms=spmm_plain_ms,
        top_identical=float(same_best.float().mean()),
        top_identical_last=float(same_last.float().mean()),
        scipy_best_not_last=int((best_it < MAX_ITER).sum()),
        precision_knn=curve_precision(q @ x.T, curve, qcurve, top),
        precision_diffusion=curve_precision(f, curve, qcurve, top),
    )
    return row


def graph_row(n: int, quick: bool) -> dict[str, Any]:
    """Chunked mutual k-NN construction vs the dense N x N one: time, peak memory, identical A."""
    from benchmarks.common import compare

    x = manifold_data(n, 0)[0]
    a = mutual_knn_affinity(x, k=K, gamma=GAMMA)
    dense = dense_mutual_affinity(x, K, GAMMA)
    diff_t = (a - dense.to_sparse()).coalesce().values()
    diff = float(diff_t.abs().max()) if diff_t.numel() else 0.0
    del dense
    row = compare(
        "diffusion",
        "",
        f"N={n} D={DIM} k={K}",
        lambda: mutual_knn_affinity(x, k=K, gamma=GAMMA),
        lambda: dense_mutual_affinity(x, K, GAMMA),
        diff,
        reference="dense N x N (similarities, top-k, mutual mask, dense A)",
        quick=quick,
        tol=1e-6,
    )
    nan = {"peak_mb": float("nan"), "peak_reset": False}
    # Peak memory needs a fresh process per measurement (a few seconds each for the imports): not in quick mode.
    ours = nan if quick else measure_build({"what": "graph", "n": n, "nq": 0, "d": DIM, "backend": "torch"})
    ref = nan if quick else measure_build({"what": "dense", "n": n, "nq": 0, "d": DIM})
    row["case"] = (
        f"graph build (mutual_knn_affinity, torch exact, chunked): peak {ours['peak_mb']:.0f} vs "
        f"{ref['peak_mb']:.0f} MB; graph {graph_mb(a):.0f} MB vs dense A {n * n * 4 / MB:.0f} MB"
    )
    row.update(
        n=n,
        nnz=int(a._nnz()),
        graph_mb=graph_mb(a),
        dense_a_mb=n * n * 4 / MB,
        ours_peak_mb=ours["peak_mb"],
        ref_peak_mb=ref["peak_mb"],
        peak_reset=bool(ours["peak_reset"] and ref["peak_reset"]),
    )
    return row


def _edge_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(fraction of the edges of a or b present in both, max |A - B| over the common edges)``."""
    n = a.shape[0]
    ka = (a.indices()[0] * n + a.indices()[1]).numpy()
    kb = (b.indices()[0] * n + b.indices()[1]).numpy()
    common, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    union = ka.size + kb.size - common.size
    diff = float(np.abs(a.values().numpy()[ia] - b.values().numpy()[ib]).max()) if common.size else 0.0
    return common.size / max(union, 1), diff


def no_ref_row(case: str, shape: str, ms: float, reference: str, **extra: Any) -> dict[str, Any]:
    nan = float("nan")
    return {
        "bench": "diffusion",
        "case": case,
        "shape": shape,
        "ours_ms": ms,
        "ours_iqr_ms": nan,
        "ref_ms": nan,
        "ref_iqr_ms": nan,
        "ratio": nan,
        "max_abs_diff": 0.0,
        "reference": reference,
        **extra,
    }


def cuda_row(a: torch.Tensor, y: torch.Tensor, f_cpu: torch.Tensor, note: str) -> dict[str, Any]:
    """The operator on the GPU (no RCM there): per-query time and top-100 agreement with the CPU scores."""
    from benchmarks.common import median_iqr_ms

    n, nq = y.shape
    ag, yg = a.cuda(), y.cuda()

    def build() -> DiffusionOperator:
        op = DiffusionOperator(ag, alpha=ALPHA)
        torch.cuda.synchronize()
        return op

    def solve() -> torch.Tensor:
        f = op.solve(yg, max_iter=MAX_ITER, tol=TOL)[0]
        torch.cuda.synchronize()
        return f

    op, op_ms = _timed(build)
    same = identical_top(solve().T.cpu(), f_cpu, min(TOP, n))
    ms, iqr = median_iqr_ms(solve, False)
    row = no_ref_row(
        f"CG on {torch.cuda.get_device_name()}{note}: {ms / nq:.2f} ms/query; top-100 identical to CPU "
        f"{int(same.sum())}/{nq}; operator build {op_ms:.0f} ms",
        f"N={n} nnz={a._nnz()}",
        ms,
        "none (GPU throughput)",
        n=n,
        ours_ms_per_query=ms / nq,
        operator_build_ms=op_ms,
    )
    row["ours_iqr_ms"] = iqr
    return row


def large_rows(n: int, quick: bool) -> list[dict[str, Any]]:
    """N = 100000: both exact k-NN backends in fresh processes (time, peak memory), then the CG row."""
    rows = []
    x, q, curve, qcurve = manifold_data(n, NQ)
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"what": "graph", "n": n, "nq": NQ, "d": DIM, "backend": "torch", "save": f"{tmp}/torch.pt"}
        built = measure_build(spec)
        flat = measure_build({**spec, "backend": "faiss", "index": "flat", "save": f"{tmp}/faiss.pt"})
        a = load_graph(f"{tmp}/torch.pt")
        same, vdiff = _edge_agreement(a, load_graph(f"{tmp}/faiss.pt"))
    dense_gb = n * n * 4 / 2**30
    rows.append(
        no_ref_row(
            f"graph build, torch exact: {built['seconds']:.0f} s, peak {built['peak_mb']:.0f} MB; faiss flat: "
            f"{flat['seconds']:.0f} s, peak {flat['peak_mb']:.0f} MB, edges identical {same:.4f} (max diff "
            f"{vdiff:.0e}); graph {graph_mb(a):.0f} MB",
            f"N={n} D={DIM} k={K} nnz={a._nnz()}",
            built["seconds"] * 1e3,
            f"dense N x N: not run, needs {dense_gb:.0f} GiB for the similarities + {dense_gb:.0f} GiB for A",
            n=n,
            nnz=int(a._nnz()),
            graph_mb=graph_mb(a),
            ours_peak_mb=built["peak_mb"],
            faiss_flat_ms=flat["seconds"] * 1e3,
            faiss_flat_peak_mb=flat["peak_mb"],
            faiss_edges_identical=same,
        )
    )
    rows.append(cg_row(x, q, curve, qcurve, a, quick))
    if torch.cuda.is_available():
        y = query_seeds(q, x, k=KQ, gamma=GAMMA)
        f_cpu = DiffusionOperator(a, alpha=ALPHA).solve(y, max_iter=MAX_ITER, tol=TOL)[0].T
        rows.append(cuda_row(a, y, f_cpu, ""))
    return rows


def million_estimate_mb(n: int, d: int, nq: int = NQ, k: int = K) -> dict[str, float]:
    """What the 1M run holds at its peak phases, in MB (a rough upper estimate; the run prints the measured peaks)."""
    desc = n * d * 4 / MB
    index = n * (d * 4 + 8) / MB  # IVF-Flat: a copy of the vectors and their ids
    lists = n * k * (4 + 8) / MB * 2  # faiss' (float32, int64) output and torch's copies
    mutual = n * k * 8 * 8 / MB  # the edge arrays of the mutual test (keys, sort order, reverse keys, ...)
    graph = n * k * 20 / MB  # COO: int64 indices + float32 values, at most n k entries
    operator = graph * 3  # normalisation, RCM permutation, CSR copies
    cg = n * nq * 4 * 10 / MB  # seeds, CG blocks, the (Q, N) work arrays of query_seeds
    build = desc + index + lists + mutual
    solve = desc + graph + operator + cg
    return {
        "descriptors": desc,
        "index": index,
        "knn_lists": lists,
        "mutual_test": mutual,
        "graph": graph,
        "operator": operator,
        "cg": cg,
        "build_peak": build,
        "solve_peak": solve,
        "need": max(build, solve) * 1.25,
    }


def million_rows(n: int, d: int, quick: bool) -> list[dict[str, Any]]:
    """N = 1e6 through faiss IVF: build time and memory in a fresh process, then per-query time."""
    est = million_estimate_mb(n, d)
    avail = mem_available_mb()
    print(
        f"bench_diffusion --million: N={n} D={d}: estimated need {est['need'] / 1024:.1f} GiB "
        + ", ".join(f"{k} {v / 1024:.2f}" for k, v in est.items() if k != "need")
        + f" (GiB); MemAvailable {avail / 1024:.1f} GiB",
        flush=True,
    )
    if not avail >= est["need"]:
        raise RuntimeError(f"bench_diffusion: N={n} needs about {est['need'] / 1024:.1f} GiB; {avail / 1024:.1f} free")
    rows = []
    nlist = int(4 * math.sqrt(n))
    x, q, curve, qcurve = manifold_data(n, NQ, d)
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"what": "graph", "n": n, "nq": NQ, "d": d, "backend": "faiss", "index": "ivf", "nlist": nlist}
        spec["nprobe"] = MILLION_NPROBE
        built = measure_build({**spec, "save": f"{tmp}/ivf.pt", "keep_rows": 1000})
        a = load_graph(f"{tmp}/ivf.pt")
        ivf = torch.load(f"{tmp}/ivf.pt")["knn_rows"]
    # Recall of the IVF lists on their first 1000 rows (random nodes) against the exact lists.
    rows_n = ivf.shape[0]
    exact = knn_lists(x, K, rows=(0, rows_n))[1]
    recall = float(np.mean([len(set(e) & set(v)) / K for e, v in zip(exact.tolist(), ivf.tolist(), strict=True)]))
    rows.append(
        no_ref_row(
            f"graph build, faiss IVF nlist={nlist} nprobe={MILLION_NPROBE}: {built['seconds']:.0f} s, peak "
            f"{built['peak_mb'] / 1024:.1f} GiB (estimated {est['build_peak'] / 1024:.1f}); k-NN recall "
            f"{recall:.3f} on {rows_n} rows; graph {graph_mb(a):.0f} MB",
            f"N={n} D={d} k={K} nnz={a._nnz()}",
            built["seconds"] * 1e3,
            f"dense N x N: not run, needs {n * n * 4 / 2**40:.1f} TiB",
            n=n,
            nnz=int(a._nnz()),
            graph_mb=graph_mb(a),
            ours_peak_mb=built["peak_mb"],
            knn_recall=recall,
            estimated_need_mb=est["need"],
        )
    )
    gc.collect()
    _reset_peak()
    base = _status_kb("VmRSS")
    row = cg_row(x, q, curve, qcurve, a, quick, scipy_queries=5, note=", faiss IVF graph")
    row["solve_phase_peak_mb"] = (_status_kb("VmHWM") - base) / 1024
    row["case"] += f"; peak of this phase {row['solve_phase_peak_mb'] / 1024:.1f} GiB above the data"
    rows.append(row)
    if torch.cuda.is_available():
        y = query_seeds(q, x, k=KQ, gamma=GAMMA)
        f_cpu = DiffusionOperator(a, alpha=ALPHA).solve(y, max_iter=MAX_ITER, tol=TOL)[0].T
        rows.append(cuda_row(a, y, f_cpu, ", 1M nodes"))
    return rows


PARTS = ("cg", "graph", "large")


def run(
    quick: bool = False, *, parts: tuple[str, ...] = PARTS, million: bool = False, million_dim: int = 64
) -> list[dict[str, Any]]:
    """The rows of the module docstring (``quick``: N = 2000, 10 queries, no 100k / 1M case, no child process)."""
    torch.manual_seed(SEED)
    rows = []
    if "cg" in parts:
        n, nq = (2000, 10) if quick else (5000, NQ)
        x, q, curve, qcurve = manifold_data(n, nq)
        a, build_ms = _timed(lambda: mutual_knn_affinity(x, k=K, gamma=GAMMA))
        row = cg_row(x, q, curve, qcurve, a, quick)
        row["case"] += f"; graph build {build_ms:.0f} ms, operator build {row['operator_build_ms']:.0f} ms"
        row["graph_build_ms"] = build_ms
        rows.append(row)
    if "graph" in parts:
        for n in (2000,) if quick else (5000, 20000):
            rows.append(graph_row(n, quick))
    if "large" in parts and not quick:
        rows += large_rows(100_000, quick)
    if million and not quick:
        rows += million_rows(1_000_000, million_dim, quick)
    return rows


def print_details(rows: list[dict[str, Any]]) -> None:
    """The CG rows' per-query numbers as a second Markdown table."""
    cg = [r for r in rows if "top_identical" in r]
    if not cg:
        return
    print()
    print(
        "| N | nnz | graph MB | operator MB (build ms) | ours ms/query | SciPy f32 ms/query | ratio | "
        "vs SciPy f64 | vs SciPy RCM | top-100 identical (last it.) | P@100 k-NN / diffusion |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in cg:
        print(
            f"| {r['n']} | {r['nnz']} | {r['graph_mb']:.0f} | {r['operator_mb']:.0f} ({r['operator_build_ms']:.0f}) | "
            f"{r['ours_ms_per_query']:.2f} | {r['ref_ms_per_query']:.2f} | {r['ratio']:.1f}x | "
            f"{r['ratio_f64']:.1f}x | {r['ratio_rcm']:.1f}x | "
            f"{r['top_identical']:.3f} ({r['top_identical_last']:.3f}) | "
            f"{r['precision_knn']:.3f} / {r['precision_diffusion']:.3f} |"
        )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--million", action="store_true", help="also the 1M-node case through faiss IVF")
    parser.add_argument("--million-dim", type=int, default=64, help="descriptor width of the 1M case")
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS), help="which default cases")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(CHILD_TAG + json.dumps(_build(json.loads(args.child))), flush=True)
        return []
    from benchmarks.run import print_rows

    rows = run(args.quick, parts=tuple(args.parts), million=args.million, million_dim=args.million_dim)
    print_rows(rows)
    print_details(rows)
    print(f"\n{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
