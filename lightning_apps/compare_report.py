"""Side-by-side comparison of several methods on one benchmark: tables, paired statistics, files and a figure.

Each method (a :class:`Row`: a pooling, or a re-ranking on some pool's descriptors) is evaluated on the same
queries by :func:`deepagg.metrics.evaluate_revisited`. Against one baseline row (GeM) this module reports, per
setup (Medium, Hard):

- the mAP and mP@k of every row and its mAP gain over the baseline;
- a paired, per-query comparison (:func:`paired_stats`): how many queries improve, worsen or tie, an exact
  two-sided sign test over the untied queries, and a percentile-bootstrap interval of the mean per-query gain
  (queries resampled with replacement, so the interval reflects which queries the benchmark happens to hold);
- :func:`write_comparison` writes ``results.json``, ``results.md``, ``per_query_ap.csv``, ``config.yaml`` and
  ``compare.png`` (bars of mAP with their bootstrap intervals), each atomically;
- :func:`format_timings` formats the run's wall time split by stage, for the end-of-run printout.

Queries without positives in a setup (AP NaN) are skipped by every statistic, exactly as by the mAP itself.
Only numpy and matplotlib (Agg canvas, no pyplot state) are used for the statistics and the figure.
"""

from __future__ import annotations

import csv
import io
import json
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deepagg._checks import ShapeError
from deepagg._io import atomic_write
from lightning_apps.report import PROTOCOL_NOTES, _atomic_write, _jsonable, _pct

__all__ = [
    "PairedStats",
    "Row",
    "bootstrap_ci",
    "comparison_table",
    "format_timings",
    "paired_stats",
    "sign_test_p",
    "write_comparison",
]

#: ``prs`` (per-query P@k, ``Q x K`` values) of a row's setup is kept in ``results.json`` up to this many values.
MAX_JSON_PRS = 2000

_SETUP_ORDER = ("easy", "medium", "hard")
_POOL_COLOUR, _RERANK_COLOUR, _BASE_COLOUR = "#4C72B0", "#DD8452", "#8C8C8C"


@dataclass(frozen=True)
class PairedStats:
    """Paired per-query comparison of one method against a reference on one setup (see :func:`paired_stats`).

    Attributes:
        n: Queries where both APs are finite (queries without positives are skipped).
        improved: Queries with ``ap - ref > tie_tol``.
        worsened: Queries with ``ap - ref < -tie_tol``.
        tied: Queries with ``|ap - ref| <= tie_tol``.
        mean_diff: Mean of ``ap - ref`` over the ``n`` queries, i.e. the mAP gain (a fraction; NaN if ``n == 0``).
        ci_low: Lower end of the percentile-bootstrap interval of ``mean_diff`` (NaN if ``n == 0``).
        ci_high: Upper end of that interval (NaN if ``n == 0``).
        sign_p: Exact two-sided sign-test p-value over the ``improved + worsened`` untied queries (1.0 if none).
    """

    n: int
    improved: int
    worsened: int
    tied: int
    mean_diff: float
    ci_low: float
    ci_high: float
    sign_p: float


@dataclass
class Row:
    """One method of the comparison.

    Attributes:
        name: The label in tables, CSV columns and the figure, e.g. ``"GeM"``, ``"HeW"``, ``"GeM + AQE"``.
        kind: ``"pool"`` (a global descriptor) or ``"rerank"`` (a re-ranking of some pool's ranking).
        command: The single-pipeline command line that reproduces this row.
        results: The dict returned by :func:`deepagg.metrics.evaluate_revisited` for this row:
            ``{"easy" | "medium" | "hard": {"map": float, "aps": (Q,), "mpr": (K,), "prs": (Q, K)}}``.
        seconds: Wall time of this row's own pooling or re-ranking (extraction excluded), in seconds.
        note: Free text shown beside the row, e.g. ``"on HeW, the best pool"``.

    Raises:
        ValueError: If ``name`` is empty, ``kind`` is not ``"pool"`` or ``"rerank"``, or ``seconds`` is negative
            or not finite.
    """

    name: str
    kind: Literal["pool", "rerank"]
    command: str
    results: dict[str, Any]
    seconds: float
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"Row(): name must be a non-empty string; got {self.name!r}.")
        if self.kind not in ("pool", "rerank"):
            raise ValueError(f"Row(): kind must be 'pool' or 'rerank'; got {self.kind!r} (row {self.name!r}).")
        if not math.isfinite(self.seconds) or self.seconds < 0:
            raise ValueError(f"Row(): seconds must be finite and >= 0; got {self.seconds!r} (row {self.name!r}).")


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def _as_aps(x: Any, fn: str, arg: str) -> np.ndarray:
    """A 1-D, non-empty float64 array of per-query APs (NaN allowed)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ShapeError(
            f"{fn}(): {arg} must be a 1-D array of per-query APs of shape (Q,); got shape {tuple(arr.shape)}.",
            expected="(Q,)",
            actual=tuple(arr.shape),
        )
    if arr.size == 0:
        raise ValueError(f"{fn}(): {arg} must hold at least one query; got an empty array of shape (0,).")
    return arr


def _check_boot(n_boot: int, seed: int, level: float, fn: str) -> int:
    """Validate the bootstrap settings; return ``n_boot`` as an int."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"{fn}(): n_boot must be an integer >= 1; got {n_boot!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{fn}(): seed must be an integer >= 0; got {seed!r}.")
    if not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ValueError(f"{fn}(): level must lie strictly between 0 and 1 (e.g. 0.95); got {level!r}.")
    return operator.index(n_boot)


def _boot_interval(values: np.ndarray, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (finite, 1-D), all resamples in one draw.

    The resampled indices are ``Generator(PCG64(seed)).integers(0, n, size=(n_boot, n))``, one row per resample;
    the interval ends are ``np.quantile`` (linear interpolation) of the ``n_boot`` means at ``(1 -+ level) / 2``.
    Memory: ``8 * n_boot * n`` bytes for the indices (5 MB for 10000 resamples of 66 queries).
    """
    n = values.size
    if n == 0:
        return math.nan, math.nan
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, n, size=(n_boot, n))
    means = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def sign_test_p(k: int, n: int) -> float:
    """Exact two-sided sign-test p-value: ``min(1, 2 * P(X <= min(k, n - k)))`` with ``X ~ Binomial(n, 1/2)``.

    Computed in exact rational arithmetic (``math.comb``), then rounded once to a float, so it stays exact for
    any ``n`` (no underflow of ``0.5 ** n``). Equals ``scipy.stats.binomtest(k, n, 0.5).pvalue``.

    Args:
        k: Successes (e.g. improved queries), ``0 <= k <= n``.
        n: Untied trials (improved + worsened queries), ``n >= 0``; ``n == 0`` gives 1.0.

    Returns:
        The p-value, in :math:`(0, 1]`.

    Raises:
        ValueError: If ``k`` or ``n`` is not an integer or ``0 <= k <= n`` does not hold.

    Example:
        >>> sign_test_p(4, 5)  # 2 * (C(5, 0) + C(5, 1)) / 2**5
        0.375
        >>> sign_test_p(0, 0)
        1.0
    """
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"sign_test_p(): {name} must be an integer; got {v!r}.")
    k, n = int(k), int(n)
    if not 0 <= k <= n:
        raise ValueError(f"sign_test_p(): expected 0 <= k <= n; got k={k}, n={n}.")
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))


def bootstrap_ci(
    ap: Any,
    *,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of one method's mAP, resampling the queries with replacement.

    Queries with a NaN AP (no positives) are dropped first, as in the mAP. The resampling is the one of
    :func:`paired_stats` (same generator, same draws for the same number of finite queries), vectorised:
    ``Generator(PCG64(seed)).integers(0, n, size=(n_boot, n))``, one row of query indices per resample, then
    ``np.quantile`` of the resampled means at ``(1 - level) / 2`` and ``(1 + level) / 2``.

    Args:
        ap: Per-query AP of shape :math:`(Q,)`, NaN for queries without positives.
        n_boot: Number of resamples, ``>= 1``.
        seed: Seed of the ``PCG64`` generator, ``>= 0``.
        level: Coverage of the interval, in :math:`(0, 1)`.

    Returns:
        ``(low, high)``, fractions like the APs; ``(nan, nan)`` if no AP is finite.

    Raises:
        ShapeError: If ``ap`` is not 1-D.
        ValueError: If ``ap`` is empty or ``n_boot``, ``seed`` or ``level`` is invalid.

    Example:
        >>> bootstrap_ci([0.5, 0.5, float("nan"), 0.5])
        (0.5, 0.5)
    """
    fn = "bootstrap_ci"
    arr = _as_aps(ap, fn, "ap")
    n_boot = _check_boot(n_boot, seed, level, fn)
    return _boot_interval(arr[np.isfinite(arr)], n_boot, int(seed), level)


def paired_stats(
    ap: Any,
    ref: Any,
    *,
    n_boot: int = 10000,
    seed: int = 0,
    tie_tol: float = 1e-9,
    level: float = 0.95,
) -> PairedStats:
    """Paired per-query comparison of a method's APs ``ap`` against a reference's ``ref`` on the same queries.

    Only queries where both APs are finite count (NaN = no positives, skipped by both mAPs). With
    ``d = ap - ref`` on those ``n`` queries: a query is improved if ``d > tie_tol``, worsened if
    ``d < -tie_tol`` and tied otherwise; ``mean_diff = mean(d)`` is the mAP gain; ``(ci_low, ci_high)`` is the
    percentile-bootstrap interval of ``mean(d)`` (queries resampled with replacement, see :func:`bootstrap_ci`
    for the exact draws); ``sign_p`` is the exact two-sided sign test of ``improved`` among the untied
    ``improved + worsened`` queries (:func:`sign_test_p`).

    Args:
        ap: Per-query AP of the method, shape :math:`(Q,)`.
        ref: Per-query AP of the reference (e.g. GeM), shape :math:`(Q,)`, the same queries in the same order.
        n_boot: Number of bootstrap resamples, ``>= 1``.
        seed: Seed of the ``PCG64`` generator, ``>= 0``.
        tie_tol: Absolute AP difference at or below which a query counts as tied, ``>= 0``.
        level: Coverage of the bootstrap interval, in :math:`(0, 1)`.

    Returns:
        A :class:`PairedStats`; with no query finite in both, ``n == 0``, NaN mean and interval, ``sign_p == 1``.

    Raises:
        ShapeError: If ``ap`` or ``ref`` is not 1-D, or their lengths differ.
        ValueError: If they are empty or ``n_boot``, ``seed``, ``tie_tol`` or ``level`` is invalid.

    Example:
        >>> s = paired_stats([0.6, 0.5, 0.9, float("nan")], [0.5, 0.5, 0.7, float("nan")], n_boot=100)
        >>> s.n, s.improved, s.worsened, s.tied, round(s.mean_diff, 4), s.sign_p
        (3, 2, 0, 1, 0.1, 0.5)
    """
    fn = "paired_stats"
    a = _as_aps(ap, fn, "ap")
    r = _as_aps(ref, fn, "ref")
    if a.shape != r.shape:
        raise ShapeError(
            f"{fn}(): ap and ref must have the same shape (Q,), one AP per query of the same queries; "
            f"got ap {tuple(a.shape)} and ref {tuple(r.shape)}.",
            expected=tuple(r.shape),
            actual=tuple(a.shape),
        )
    n_boot = _check_boot(n_boot, seed, level, fn)
    if not isinstance(tie_tol, (int, float)) or not math.isfinite(tie_tol) or tie_tol < 0:
        raise ValueError(f"{fn}(): tie_tol must be finite and >= 0; got {tie_tol!r}.")
    both = np.isfinite(a) & np.isfinite(r)
    d = a[both] - r[both]
    improved = int(np.count_nonzero(d > tie_tol))
    worsened = int(np.count_nonzero(d < -tie_tol))
    lo, hi = _boot_interval(d, n_boot, int(seed), level)
    return PairedStats(
        n=int(d.size),
        improved=improved,
        worsened=worsened,
        tied=int(d.size) - improved - worsened,
        mean_diff=float(d.mean()) if d.size else math.nan,
        ci_low=lo,
        ci_high=hi,
        sign_p=sign_test_p(improved, improved + worsened),
    )


# ----------------------------------------------------------------------------------------------------------------
# Validation and computation shared by the table and the files


def _check_rows(
    rows: Sequence[Row],
    baseline: str,
    setups: Sequence[str],
    kappas: Sequence[int],
    kappa: int,
    fn: str,
) -> tuple[int, int]:
    """Validate the rows against each other; return ``(index of the baseline row, index of kappa in kappas)``."""
    if not rows:
        raise ValueError(f"{fn}(): rows must hold at least one Row (the baseline); got none.")
    for i, row in enumerate(rows):
        if not isinstance(row, Row):
            raise ValueError(f"{fn}(): rows[{i}] must be a Row; got {type(row).__name__}.")
    names = [row.name for row in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{fn}(): row names must be unique; got {dup} more than once.")
    if baseline not in names:
        raise ValueError(f"{fn}(): baseline {baseline!r} must be the name of a row; got rows {names}.")
    if not setups:
        raise ValueError(f"{fn}(): setups must name at least one setup, e.g. ('medium', 'hard'); got none.")
    kappas = list(kappas)
    if kappa not in kappas:
        raise ValueError(f"{fn}(): kappa must be one of kappas {kappas}; got {kappa!r}.")
    base = rows[names.index(baseline)]
    for s in setups:
        for row in rows:
            res = row.results.get(s) if isinstance(row.results, Mapping) else None
            if not isinstance(res, Mapping) or any(k not in res for k in ("map", "aps", "mpr")):
                raise ValueError(
                    f"{fn}(): row {row.name!r} must have results[{s!r}] with 'map', 'aps' and 'mpr' "
                    f"(as returned by evaluate_revisited); got {_keys_of(row.results, s)}."
                )
            mpr = np.asarray(res["mpr"])
            if mpr.shape != (len(kappas),):
                raise ShapeError(
                    f"{fn}(): row {row.name!r} results[{s!r}]['mpr'] must have one value per kappa "
                    f"({len(kappas)}, for kappas {kappas}); got shape {tuple(mpr.shape)}.",
                    expected=(len(kappas),),
                    actual=tuple(mpr.shape),
                )
        ref = np.asarray(base.results[s]["aps"], dtype=np.float64)
        for row in rows:
            aps = np.asarray(row.results[s]["aps"], dtype=np.float64)
            if aps.shape != ref.shape:
                raise ShapeError(
                    f"{fn}(): row {row.name!r} results[{s!r}]['aps'] must have the baseline's shape "
                    f"{tuple(ref.shape)} (the same queries); got {tuple(aps.shape)}.",
                    expected=tuple(ref.shape),
                    actual=tuple(aps.shape),
                )
            diff = np.flatnonzero(np.isnan(aps) != np.isnan(ref))
            if diff.size:
                raise ValueError(
                    f"{fn}(): row {row.name!r} has no positives for other queries than the baseline "
                    f"{baseline!r} in setup {s!r} ({diff.size} queries differ, first query {int(diff[0])}); "
                    "evaluate every row with the same ground truth."
                )
    return names.index(baseline), kappas.index(kappa)


def _keys_of(results: Any, setup: str) -> str:
    if not isinstance(results, Mapping):
        return f"results of type {type(results).__name__}"
    if setup not in results:
        return f"setups {sorted(map(str, results))}"
    inner = results[setup]
    return f"keys {sorted(map(str, inner))}" if isinstance(inner, Mapping) else f"{type(inner).__name__}"


@dataclass(frozen=True)
class _Comparison:
    """Everything the table, the JSON and the figure show, computed once."""

    base: int
    k_idx: int
    setups: tuple[str, ...]
    paired: dict[str, dict[str, PairedStats]]  # row name -> setup -> stats (baseline row absent)
    map_ci: dict[str, dict[str, tuple[float, float]]]  # row name -> setup -> bootstrap interval of its mAP
    n_boot: int
    seed: int
    level: float
    tie_tol: float


def _compare(
    rows: Sequence[Row],
    baseline: str,
    *,
    setups: Sequence[str],
    kappas: Sequence[int],
    kappa: int,
    n_boot: int,
    seed: int,
    level: float,
    tie_tol: float,
    fn: str,
) -> _Comparison:
    base, k_idx = _check_rows(rows, baseline, setups, kappas, kappa, fn)
    n_boot = _check_boot(n_boot, seed, level, fn)
    ref = rows[base].results
    paired = {
        row.name: {
            s: paired_stats(
                row.results[s]["aps"], ref[s]["aps"], n_boot=n_boot, seed=seed, tie_tol=tie_tol, level=level
            )
            for s in setups
        }
        for i, row in enumerate(rows)
        if i != base
    }
    map_ci = {
        row.name: {s: bootstrap_ci(row.results[s]["aps"], n_boot=n_boot, seed=seed, level=level) for s in setups}
        for row in rows
    }
    return _Comparison(base, k_idx, tuple(setups), paired, map_ci, n_boot, int(seed), float(level), float(tie_tol))


# ----------------------------------------------------------------------------------------------------------------
# Text


def _num(v: Any) -> str:
    """A fraction as x100 with 2 decimals (report.py's ``_pct``), ``nan`` without padding."""
    return _pct(float(v)).strip()


def _signed(v: float) -> str:
    return "nan" if math.isnan(v) else f"{100 * v:+.2f}"


def _p(v: float) -> str:
    return f"{v:.3f}" if v >= 0.001 else f"{v:.1e}"


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """A Markdown table whose columns are padded to equal width, so it reads in a terminal as well."""
    widths = [max(3, len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True))
            + " |"
        )

    sep = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right, strict=True)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def _render(rows: Sequence[Row], baseline: str, kappa: int, cmp: _Comparison) -> str:
    """The scores table and the paired table, each with a one-line caption."""
    caps = {s: s.capitalize() for s in cmp.setups}
    base_res = rows[cmp.base].results
    head = ["method", "kind"]
    for s in cmp.setups:
        head += [f"{caps[s]} mAP", "Δ", f"mP@{kappa}"]
    head.append("seconds")
    body = []
    for i, row in enumerate(rows):
        cells = [row.name, row.kind]
        for s in cmp.setups:
            res = row.results[s]
            gain = "—" if i == cmp.base else _signed(float(res["map"]) - float(base_res[s]["map"]))
            cells += [_num(res["map"]), gain, _num(np.asarray(res["mpr"])[cmp.k_idx])]
        cells.append(f"{row.seconds:.2f}")
        body.append(cells)
    scores = _md_table(head, body, [False, False, *([True] * (3 * len(cmp.setups))), True])

    lvl = f"{100 * cmp.level:g}%"
    head = ["method"]
    for s in cmp.setups:
        head += [f"{caps[s]} +/−/=", f"{caps[s]} Δ {lvl} interval", f"{caps[s]} p"]
    body = []
    for i, row in enumerate(rows):
        cells = [row.name]
        for s in cmp.setups:
            if i == cmp.base:
                cells += ["—", "—", "—"]
                continue
            st = cmp.paired[row.name][s]
            ci = "n/a" if st.n == 0 else f"[{_signed(st.ci_low)}, {_signed(st.ci_high)}]"
            cells += [f"{st.improved}/{st.worsened}/{st.tied}", ci, _p(st.sign_p)]
        body.append(cells)
    paired = _md_table(head, body, [False, *([True] * (3 * len(cmp.setups)))])
    return (
        f"mAP and mP@{kappa} (x100); Δ = mAP gain over {baseline}; seconds = the row's own pooling or re-ranking.\n\n"
        f"{scores}\n\n"
        f"Per query against {baseline}: queries improved/worsened/tied, {lvl} bootstrap interval of the gain, "
        f"sign-test p.\n\n"
        f"{paired}"
    )


def comparison_table(
    rows: Sequence[Row],
    baseline: str,
    *,
    kappa: int = 10,
    kappas: Sequence[int] = (1, 5, 10),
    setups: Sequence[str] = ("medium", "hard"),
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    tie_tol: float = 1e-9,
) -> str:
    """Markdown tables comparing every row with the baseline row, readable in a terminal and on GitHub.

    Two tables, each under a one-line caption, one line per row in the given order:

    1. ``method | kind | <Setup> mAP | Δ | mP@kappa`` (per setup) ``| seconds``: scores x100 with 2 decimals,
       Δ the mAP gain over the baseline (``+1.23``); seconds the row's own pooling or re-ranking time.
    2. ``method | <Setup> +/−/= | <Setup> Δ 95% interval | <Setup> p`` (per setup): the :func:`paired_stats`
       against the baseline (queries improved/worsened/tied, the bootstrap interval of the gain x100, the
       sign-test p-value).

    The baseline row shows ``—`` in its Δ and paired columns.

    Args:
        rows: The methods, e.g. pools then re-rankers; names must be unique.
        baseline: The name of the reference row (e.g. ``"GeM"``).
        kappa: The ``k`` of the mP@k column, one of ``kappas``.
        kappas: The ``kappas`` the rows were evaluated with (the order of ``mpr``).
        setups: The setups shown, keys of every row's ``results``.
        n_boot: Bootstrap resamples, ``>= 1``.
        seed: Seed of the bootstrap generator (the same for every row and setup).
        level: Coverage of the bootstrap intervals.
        tie_tol: AP difference at or below which a query counts as tied.

    Returns:
        The two captioned tables as one string (no trailing newline).

    Raises:
        ShapeError: If a row's ``aps`` differs in shape from the baseline's or its ``mpr`` does not match
            ``kappas``.
        ValueError: If ``rows`` is empty, names repeat, ``baseline`` is not a row, a row lacks a setup, rows
            skip different queries (different ground truth), ``kappa`` is not in ``kappas`` or a bootstrap
            setting is invalid.
    """
    cmp = _compare(
        rows, baseline, setups=setups, kappas=kappas, kappa=kappa, n_boot=n_boot, seed=seed, level=level,
        tie_tol=tie_tol, fn="comparison_table",
    )  # fmt: skip
    return _render(rows, baseline, kappa, cmp)


def format_timings(timings: Mapping[str, float]) -> str:
    """A Markdown table of the run's wall time by stage: seconds and share of the total, in run order.

    Args:
        timings: Stage name -> seconds, in the order the stages ran (a dict keeps insertion order), e.g.
            ``{"build": 1.2, "extraction": 40.0, "pool: GeM": 0.3, "rerank: GeM + AQE": 0.1}``.

    Returns:
        The table, with a final ``total`` line (no trailing newline). With a zero total the shares read ``—``.

    Raises:
        ValueError: If a value is negative or not finite.

    Example:
        >>> print(format_timings({"build": 1.0, "extraction": 3.0}))
        | stage      | seconds |  share |
        |------------|--------:|-------:|
        | build      |    1.00 |  25.0% |
        | extraction |    3.00 |  75.0% |
        | total      |    4.00 | 100.0% |
    """
    for stage, sec in timings.items():
        if not isinstance(sec, (int, float)) or not math.isfinite(sec) or sec < 0:
            raise ValueError(f"format_timings(): timings[{stage!r}] must be finite seconds >= 0; got {sec!r}.")
    total = float(sum(timings.values()))

    def share(sec: float) -> str:
        return f"{100 * sec / total:.1f}%" if total > 0 else "—"

    body = [[str(stage), f"{sec:.2f}", share(sec)] for stage, sec in timings.items()]
    body.append(["total", f"{total:.2f}", share(total)])
    return _md_table(["stage", "seconds", "share"], body, [False, True, True])


# ----------------------------------------------------------------------------------------------------------------
# Files


def _row_json(row: Row, setups: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in setups:
        res = row.results[s]
        entry = {k: v for k, v in res.items() if k != "prs"}
        prs = res.get("prs")
        if prs is not None and np.asarray(prs).size <= MAX_JSON_PRS:
            entry["prs"] = [[None if math.isnan(v) else v for v in r] for r in np.asarray(prs, float).tolist()]
        out[s] = _jsonable(entry)
    return out


def _figure(path: Path, rows: Sequence[Row], baseline: str, cmp: _Comparison, title: str) -> None:
    """``compare.png``: per setup, horizontal mAP bars with bootstrap intervals; pools above re-rankers."""
    from matplotlib.artist import Artist
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    # Pools first, then re-rankers (each in the given order), a gap between the two groups; top to bottom.
    order = [i for i, r in enumerate(rows) if r.kind == "pool"] + [i for i, r in enumerate(rows) if r.kind != "pool"]
    ys, y = [], 0.0
    for j, i in enumerate(order):
        if j and rows[i].kind != rows[order[j - 1]].kind:
            y += 0.6
        ys.append(y)
        y += 1.0
    ys_arr = np.asarray(ys)
    n_setups = len(cmp.setups)
    fig = Figure(figsize=(1.0 + 5.0 * n_setups, 1.45 + 0.42 * (ys_arr[-1] + 1)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_setups, sharey=True, squeeze=False)[0]
    for ax, s in zip(axes, cmp.setups, strict=True):
        vals = np.array([100 * float(rows[i].results[s]["map"]) for i in order])
        ci = np.array([cmp.map_ci[rows[i].name][s] for i in order], dtype=float) * 100
        colours = [
            _BASE_COLOUR if i == cmp.base else _POOL_COLOUR if rows[i].kind == "pool" else _RERANK_COLOUR for i in order
        ]
        shown = np.nan_to_num(vals)
        err = np.nan_to_num(np.abs(np.stack([shown - ci[:, 0], ci[:, 1] - shown])))
        ax.barh(ys_arr, shown, height=0.72, color=colours, xerr=err, error_kw={"ecolor": "0.15", "capsize": 3, "lw": 1})
        base_val = 100 * float(rows[cmp.base].results[s]["map"])
        finite = np.concatenate([vals, ci[:, 1]])
        finite = finite[np.isfinite(finite)]
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        if math.isfinite(base_val):
            ax.axvline(base_val, color="0.25", ls="--", lw=1, zorder=3)
        # Labels in one column right of the axes (never over a bar or the dashed line): mAP, gain, counts.
        for yy, i, v in zip(ys_arr, order, vals, strict=True):
            if i == cmp.base:
                text = f"{v:5.2f}  baseline"
            else:
                st = cmp.paired[rows[i].name][s]
                text = f"{v:5.2f} {_signed(st.mean_diff):>6}  {st.improved:>2}↑{st.worsened:>3}↓"
            ax.text(
                1.02, yy, "n/a" if math.isnan(v) else text, transform=ax.get_yaxis_transform(), va="center",
                ha="left", fontsize=8.5, color="0.1", family="DejaVu Sans Mono",
            )  # fmt: skip
        n_q = int(np.isfinite(np.asarray(rows[cmp.base].results[s]["aps"], dtype=np.float64)).sum())
        ax.set_xlim(0, top * 1.04)
        ax.set_title(f"{s.capitalize()}  ({n_q} queries)", fontsize=11)
        ax.set_xlabel("mAP (%)")
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="y", length=0)
    axes[0].set_yticks(ys_arr, [rows[i].name for i in order], fontsize=10)
    axes[0].invert_yaxis()
    handles: list[Artist] = [
        Patch(color=_BASE_COLOUR, label=f"baseline ({baseline})"),
    ]
    if any(r.kind == "pool" and i != cmp.base for i, r in enumerate(rows)):
        handles.append(Patch(color=_POOL_COLOUR, label="pooling"))
    if any(r.kind == "rerank" for r in rows):
        handles.append(Patch(color=_RERANK_COLOUR, label="re-ranking"))
    handles += [
        Line2D([], [], color="0.15", marker="|", ms=8, lw=1, label=f"{100 * cmp.level:g}% bootstrap interval"),
        Line2D([], [], color="0.25", ls="--", lw=1, label=f"{baseline} mAP"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    fig.suptitle(
        f"{title}: mAP per method; labels: mAP (gain over {baseline}), queries improved↑ / worsened↓", fontsize=11
    )
    fig.tight_layout(rect=(0, 0.07 if len(rows) > 3 else 0.1, 0.99, 0.97), w_pad=1.5)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png")


def write_comparison(
    out_dir: Path,
    rows: Sequence[Row],
    *,
    baseline: str,
    kappas: Sequence[int],
    meta: dict[str, Any],
    query_names: Sequence[str],
    timings: Mapping[str, float],
    config_yaml: str,
    n_boot: int = 10000,
    seed: int = 0,
    kappa: int = 10,
    setups: Sequence[str] = ("medium", "hard"),
    level: float = 0.95,
    tie_tol: float = 1e-9,
    config: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the comparison into ``out_dir``, each file atomically (a crash leaves the old file or the new one).

    - ``results.json``: ``{"kind": "comparison", "meta", "kappas", "protocol", "baseline", "setups",
      "bootstrap": {n_boot, seed, level, tie_tol, method}, "timings", "rows": [{name, kind, command, note,
      seconds, "results": {setup: {map, aps, mpr[, prs]}}, "map_ci": {setup: [low, high]}, "paired": {setup:
      PairedStats fields} or null for the baseline}], "config_yaml"[, "config"]}``; fractions, NaN as null;
      ``prs`` only when it holds at most :data:`MAX_JSON_PRS` values. Rows go under ``"rows"``, not
      ``"results"``: this is not a single run's ``results.json`` (``lightning_apps.summarize`` reads those).
    - ``results.md``: the figure, the tables of :func:`comparison_table`, how to read the paired statistics,
      the command of each row, the wall time by stage (:func:`format_timings`), the protocol, meta, config.
    - ``per_query_ap.csv``: one line per query: its name, then the AP of every row and setup of the results
      (columns ``GeM/easy, GeM/medium, ...``, 6 decimals), empty for a query without positives.
    - ``config.yaml``: ``config_yaml``.
    - ``compare.png``: per setup, a horizontal bar of each row's mAP with its bootstrap interval; the baseline
      grey with a dashed line at its mAP, pools blue, re-rankers orange below them; each bar labelled with its
      mAP, its gain over the baseline and the numbers of queries improved and worsened.

    Args:
        out_dir: The folder (created if needed).
        rows: The methods; see :func:`comparison_table`.
        baseline: The name of the reference row.
        kappas: The ``kappas`` the rows were evaluated with.
        meta: Run metadata (``"dataset"`` is the title), written to the JSON and the Markdown.
        query_names: One name per query, in the order of the ``aps`` arrays.
        timings: Wall time by stage in run order (see :func:`format_timings`).
        config_yaml: The resolved config as YAML.
        n_boot: Bootstrap resamples.
        seed: Seed of the bootstrap generator.
        kappa: The ``k`` of the mP@k columns.
        setups: The setups of the tables and the figure (the CSV and JSON hold every setup of the results).
        level: Coverage of the bootstrap intervals.
        tie_tol: AP difference at or below which a query counts as tied.
        config: The resolved config as a plain dict, stored in the JSON under ``"config"``.

    Returns:
        ``{"json", "markdown", "per_query", "config", "figure"}`` -> path.

    Raises:
        ShapeError: If ``query_names`` does not have one name per query, or see :func:`comparison_table`.
        ValueError: See :func:`comparison_table` and :func:`format_timings`.
    """
    fn = "write_comparison"
    out_dir = Path(out_dir)
    cmp = _compare(
        rows, baseline, setups=setups, kappas=kappas, kappa=kappa, n_boot=n_boot, seed=seed, level=level,
        tie_tol=tie_tol, fn=fn,
    )  # fmt: skip
    base_res = rows[cmp.base].results
    all_setups = [s for s in _SETUP_ORDER if s in base_res] + [s for s in setups if s not in _SETUP_ORDER]
    _check_rows(rows, baseline, all_setups, kappas, kappa, fn)
    num_q = len(np.asarray(base_res[setups[0]]["aps"]))
    if len(query_names) != num_q:
        raise ShapeError(
            f"{fn}(): query_names must have one name per query (Q={num_q}); got {len(query_names)} names.",
            expected=num_q,
            actual=len(query_names),
        )
    timing_table = format_timings(timings)
    table = _render(rows, baseline, kappa, cmp)
    title = str(meta.get("dataset", "comparison"))

    files = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "per_query": out_dir / "per_query_ap.csv",
        "config": out_dir / "config.yaml",
        "figure": out_dir / "compare.png",
    }
    payload: dict[str, Any] = {
        "kind": "comparison",
        "meta": meta,
        "kappas": list(kappas),
        "protocol": PROTOCOL_NOTES,
        "baseline": baseline,
        "setups": list(setups),
        "bootstrap": {
            "n_boot": cmp.n_boot,
            "seed": cmp.seed,
            "level": cmp.level,
            "tie_tol": cmp.tie_tol,
            "method": "percentile bootstrap of the mean over queries resampled with replacement (numpy PCG64)",
        },
        "timings": dict(timings),
        "rows": [
            {
                "name": row.name,
                "kind": row.kind,
                "command": row.command,
                "note": row.note,
                "seconds": row.seconds,
                "results": _row_json(row, all_setups),
                "map_ci": _jsonable({s: np.asarray(cmp.map_ci[row.name][s]) for s in setups}),
                "paired": None if i == cmp.base else {s: _jsonable(asdict(cmp.paired[row.name][s])) for s in setups},
            }
            for i, row in enumerate(rows)
        ],
        "config_yaml": config_yaml,
    }
    if config is not None:
        payload["config"] = config
    _atomic_write(files["json"], json.dumps(payload, indent=2, default=str))

    lvl = f"{100 * cmp.level:g}%"
    how = (
        f"How to read this: Δ is the mAP gain over {baseline} in points. +/−/= count the queries whose AP "
        f"improves, worsens or ties (|Δ AP| <= {cmp.tie_tol:g}) against {baseline}; queries without positives are "
        f"skipped, as in the mAP. p is the exact two-sided sign test over the untied queries: a small p says the "
        f"row beats (or loses to) {baseline} on more queries than a coin flip would. The {lvl} interval is a "
        f"percentile bootstrap of the mean per-query gain ({cmp.n_boot} resamples of the queries, seed "
        f"{cmp.seed}): an interval that excludes 0 means the gain does not hinge on a few queries."
    )
    if any(r.kind == "rerank" for r in rows):
        how += (
            " Re-rankers run on the descriptors named in their note; where that is the best pool, it was chosen on "
            "this same test set, so those rows are optimistic rather than held-out numbers."
        )
    md = [f"# {title}: {len(rows)} methods against {baseline}", "", f"![mAP per method]({files['figure'].name})", ""]
    md += [table, "", how, "", "## Commands", ""]
    for row in rows:
        note = f", {row.note}" if row.note else ""
        md.append(f"- **{row.name}** ({row.kind}{note}): `{row.command}`")
    md += ["", "## Wall time by stage", "", timing_table, "", f"Protocol: {PROTOCOL_NOTES}", ""]
    md += [f"- {k}: {v}" for k, v in meta.items()]
    md += ["", "## Config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    _atomic_write(files["markdown"], "\n".join(md))

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["query", *(f"{row.name}/{s}" for row in rows for s in all_setups)])
    columns = [np.asarray(row.results[s]["aps"], dtype=np.float64) for row in rows for s in all_setups]
    for qi, name in enumerate(query_names):
        writer.writerow([name, *("" if math.isnan(c[qi]) else f"{c[qi]:.6f}" for c in columns)])
    _atomic_write(files["per_query"], buf.getvalue())
    _atomic_write(files["config"], config_yaml)
    _figure(files["figure"], rows, baseline, cmp, title)
    return files
