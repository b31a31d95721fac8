"""What every benchmark shares: timing deepagg against its reference and building one result row."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.benchmark import Timer


def median_iqr_ms(fn: Callable[[], Any], quick: bool) -> tuple[float, float]:
    """Median and IQR in ms: ``blocked_autorange`` (1 s) on the process's threads, or 3 plain runs if ``quick``."""
    timer = Timer(stmt="f()", globals={"f": fn}, num_threads=torch.get_num_threads())
    m = timer.timeit(3) if quick else timer.blocked_autorange(min_run_time=1.0)
    return m.median * 1e3, m.iqr * 1e3


def compare(
    bench: str,
    case: str,
    shape: str,
    ours: Callable[[], Any],
    ref: Callable[[], Any],
    diff: float,
    *,
    reference: str,
    quick: bool,
    tol: float,
    **extra: Any,
) -> dict[str, Any]:
    """Refuse a disagreement larger than ``tol``, then time both sides; one row for ``benchmarks.run``."""
    if not diff <= tol:
        raise RuntimeError(f"bench_{bench}: {case}: deepagg and the reference disagree by {diff}")
    ours_ms, ours_iqr = median_iqr_ms(ours, quick)
    ref_ms, ref_iqr = median_iqr_ms(ref, quick)
    return {
        "bench": bench,
        "case": case,
        "shape": shape,
        "ours_ms": ours_ms,
        "ours_iqr_ms": ours_iqr,
        "ref_ms": ref_ms,
        "ref_iqr_ms": ref_iqr,
        "ratio": ref_ms / ours_ms,
        "max_abs_diff": diff,
        "reference": reference,
        **extra,
    }
