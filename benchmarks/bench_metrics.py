"""Benchmark: vectorised ``deepagg.metrics.compute_map`` vs a plain per-query loop (revisitop-style baseline).

Run ``python benchmarks/bench_metrics.py`` (``--quick`` for a smoke run). ``run(quick)`` returns one dict per
case, for ``benchmarks/run.py``. Timings are medians of ``torch.utils.benchmark.Timer.blocked_autorange``;
``ratio`` is reference / ours (> 1 means ours is faster). Each case also checks that both implementations
agree (``max_abs_diff`` over ``aps`` and ``prs``, NaNs matched) and raises if they do not.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import compare
from deepagg.metrics import compute_map, evaluate_revisited

KAPPAS = (1, 5, 10)


def reference_map(ranks: np.ndarray, gnd: list[dict[str, Any]], kappas: tuple[int, ...] = KAPPAS):
    """Per-query loop following the protocol literally (revisitop's structure with np.isin); ranks is (Q, N)."""
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    total, pr_total, nempty = 0.0, np.zeros(len(kappas)), 0
    for i in range(nq):
        ok = np.unique(np.asarray(gnd[i]["ok"], dtype=np.int64))
        junk = np.setdiff1d(np.asarray(gnd[i]["junk"], dtype=np.int64), ok)
        if ok.size == 0:
            aps[i] = math.nan
            prs[i] = math.nan
            nempty += 1
            continue
        pos = np.flatnonzero(np.isin(ranks[i], ok))
        jpos = np.flatnonzero(np.isin(ranks[i], junk))
        shift = ij = 0
        for ip in range(pos.size):
            while ij < jpos.size and pos[ip] > jpos[ij]:
                shift += 1
                ij += 1
            pos[ip] -= shift
        ap = 0.0
        for j in range(pos.size):
            r = pos[j]
            p0 = 1.0 if r == 0 else j / r
            ap += (p0 + (j + 1) / (r + 1)) / 2 / ok.size
        aps[i] = ap
        total += ap
        pos1 = pos + 1
        for t, k in enumerate(kappas):
            kq = min(pos1.max(), k) if pos1.size else 1
            prs[i, t] = (pos1 <= kq).sum() / kq if pos1.size else 0.0
        pr_total += prs[i]
    kept = nq - nempty
    return (total / kept if kept else math.nan), aps, (pr_total / kept if kept else np.full(len(kappas), np.nan)), prs


def _max_abs_diff(a: tuple, b: tuple) -> float:
    worst = 0.0
    for x, y in ((a[1], b[1]), (a[3], b[3])):
        x, y = np.asarray(x), np.asarray(y)
        if not np.array_equal(np.isnan(x), np.isnan(y)):
            return math.inf
        mask = ~np.isnan(x)
        if mask.any():
            worst = max(worst, float(np.abs(x[mask] - y[mask]).max()))
    return worst


def _make_case(rng: np.random.Generator, q: int, db: int, length: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Rankings where positives tend to rank high, with ROxf-like easy/hard/junk sets (all within the first 5k)."""
    sub = min(db, 4993)
    gnd_full = []
    for _ in range(q):
        perm = rng.permutation(sub)
        n_e, n_h, n_j = (int(v) for v in rng.integers((2, 0, 5), (60, 120, 150)))
        gnd_full.append({"easy": perm[:n_e], "hard": perm[n_e : n_e + n_h], "junk": perm[n_e + n_h : n_e + n_h + n_j]})
    ranks = np.empty((q, length), dtype=np.int64)
    for i, g in enumerate(gnd_full):
        pos = np.concatenate([g["easy"], g["hard"], g["junk"]])
        if length == db:
            score = rng.standard_normal(db)
            score[pos] += 2.0
            ranks[i] = np.argsort(-score, kind="stable")
        else:  # truncated: a shortlist of `length` items drawn from the whole (large) database
            keep = rng.permutation(pos)[: rng.integers(0, min(pos.size, length) + 1)]
            others = rng.choice(db, length * 2, replace=False)
            others = others[~np.isin(others, pos)][: length - keep.size]
            row = np.concatenate([keep, others])
            score = rng.standard_normal(row.size)
            score[: keep.size] += 2.0
            ranks[i] = row[np.argsort(-score, kind="stable")]
    return ranks, gnd_full


def _medium(gnd_full: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]} for g in gnd_full]


def _setups(gnd_full: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {
        "easy": [{"ok": g["easy"], "junk": np.concatenate([g["junk"], g["hard"]])} for g in gnd_full],
        "medium": _medium(gnd_full),
        "hard": [{"ok": g["hard"], "junk": np.concatenate([g["junk"], g["easy"]])} for g in gnd_full],
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Time every case and return one row per case.

    Args:
        quick: Smoke run (20 queries instead of 70, 3 timed runs): a couple of seconds in all.

    Returns:
        One dict per case with ``bench``, ``case``, ``shape``, ``ours_ms``/``ref_ms`` (medians) and their
        ``*_iqr_ms``, ``ratio`` (reference / ours), ``max_abs_diff`` and ``mAP_M``.
    """
    rng = np.random.default_rng(0)
    if quick:  # smoke run: same code paths (dense table, sorted keys), smaller sizes
        cases = [("roxf-full", 20, 4993, 4993), ("r1m-top1000", 20, 1_004_993, 1000)]
    else:
        cases = [("roxf-full", 70, 4993, 4993), ("r1m-top1000", 70, 1_004_993, 1000)]
    rows = []
    for name, q, db, length in cases:
        ranks, gnd_full = _make_case(rng, q, db, length)
        gnd = _medium(gnd_full)
        setups = _setups(gnd_full)
        variants = [
            (
                f"{name} compute_map (M)",
                lambda r=ranks, g=gnd: compute_map(r, g),
                lambda r=ranks, g=gnd: reference_map(r, g),
            ),
            (
                f"{name} evaluate_revisited (E/M/H)",
                lambda r=ranks, g=gnd_full: evaluate_revisited(r, g),
                lambda r=ranks, s=setups: {k: reference_map(r, v) for k, v in s.items()},
            ),
        ]
        for label, ours_fn, ref_fn in variants:
            ours, ref = ours_fn(), ref_fn()
            if isinstance(ours, dict):
                diff = max(_max_abs_diff(tuple(ours[k].values()), ref[k]) for k in ref)
                mean_ap = ours["medium"]["map"]
            else:
                diff = _max_abs_diff(ours, ref)
                mean_ap = ours[0]
            rows.append(
                compare(
                    "metrics",
                    label,
                    f"{q}x{length} (db {db})",
                    ours_fn,
                    ref_fn,
                    diff,
                    tol=1e-10,
                    quick=quick,
                    reference="per-query loop (revisitop-style, np.isin)",
                    mAP_M=mean_ap,
                )
            )
    return rows


if __name__ == "__main__":
    from benchmarks.run import main

    main(["--only", "bench_metrics"])
