"""Query expansion and DBA vs plain per-query loops (the way PyRetri/fast-reid-style code does it).

``python -m benchmarks.bench_qe``. Each row: deepagg's batched call (one matmul + top-k for all queries) and a
per-query loop (sort the similarities, sum the top k, normalise) in the same process, their ratio, and the
largest difference between the two outputs.
"""

from __future__ import annotations

import torch

from benchmarks.common import compare
from deepagg.functional import dba, l2n, query_expansion


def ref_qe_loop(q: torch.Tensor, db: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """One query at a time: similarities, stable sort, weighted sum of the top k, normalise."""
    out = []
    for row in q:
        sim = db @ row
        idx = torch.argsort(sim, descending=True, stable=True)[:k]
        w = torch.ones(k) if alpha == 0 else sim[idx].clamp(min=0).pow(alpha)
        out.append(l2n(row + (w[:, None] * db[idx]).sum(0), dim=0))
    return torch.stack(out)


def ref_dba_loop(db: torch.Tensor, k: int) -> torch.Tensor:
    """One database vector at a time, itself excluded from its neighbours."""
    out = []
    for i, row in enumerate(db):
        sim = db @ row
        sim[i] = float("-inf")
        idx = torch.argsort(sim, descending=True, stable=True)[:k]
        out.append(l2n(row + db[idx].sum(0), dim=0))
    return torch.stack(out)


def run(quick: bool = False) -> list[dict]:
    """Time AQE, alpha-QE and DBA against per-query loops; one row per case."""
    g = torch.Generator().manual_seed(0)
    nq, n, d = (10, 300, 64) if quick else (70, 5000, 512)
    q = l2n(torch.randn(nq, d, generator=g))
    db = l2n(torch.randn(n, d, generator=g))
    n_dba = 200 if quick else 1000
    cases = [
        (
            "AQE k=10",
            f"{nq} q x {n} db x {d}",
            lambda: query_expansion(q, db, k=10),
            lambda: ref_qe_loop(q, db, 10, 0.0),
        ),
        (
            "alpha-QE k=10 alpha=3",
            f"{nq} q x {n} db x {d}",
            lambda: query_expansion(q, db, k=10, alpha=3.0),
            lambda: ref_qe_loop(q, db, 10, 3.0),
        ),
        ("DBA k=10", f"{n_dba} db x {d}", lambda: dba(db[:n_dba], k=10), lambda: ref_dba_loop(db[:n_dba], 10)),
    ]
    rows = []
    for name, shape, ours, ref in cases:
        diff = float((ours() - ref()).abs().max())
        rows.append(
            compare(
                "qe", name, shape, ours, ref, diff, tol=1e-5, quick=quick, reference="per-query loop (argsort + sum)"
            )
        )
    return rows


if __name__ == "__main__":
    from benchmarks.run import main

    main(["--only", "bench_qe"])
