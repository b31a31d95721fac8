"""The comparison report: paired statistics against hand-worked numbers and oracles, the tables and the files."""

from __future__ import annotations

import csv
import doctest
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest

from deepagg._checks import ShapeError
from lightning_apps import compare_report as cr
from lightning_apps.compare_report import (
    PairedStats,
    Row,
    bootstrap_ci,
    comparison_table,
    format_timings,
    paired_stats,
    sign_test_p,
    write_comparison,
)

NAN = math.nan

# Hand-worked example: 8 queries, d = ap - ref.
#   q0 0.50 - 0.40 = +0.10  improved
#   q1 0.80 - 0.70 = +0.10  improved
#   q2 0.30 - 0.30 =  0     tied
#   q3 NaN  - NaN           skipped (no positives)
#   q4 0.60 - 0.70 = -0.10  worsened
#   q5 0.90 - 0.85 = +0.05  improved
#   q6 0.40 - 0.20 = +0.20  improved
#   q7 0.50 - NaN           skipped (not finite in both)
# n = 6, improved 4, worsened 1, tied 1; mean_diff = (0.1 + 0.1 + 0 - 0.1 + 0.05 + 0.2) / 6 = 0.35 / 6.
# Sign test over the 5 untied queries, k = 4: p = 2 * (C(5,0) + C(5,1)) / 2**5 = 2 * 6 / 32 = 0.375.
AP = [0.50, 0.80, 0.30, NAN, 0.60, 0.90, 0.40, 0.50]
REF = [0.40, 0.70, 0.30, NAN, 0.70, 0.85, 0.20, NAN]
DIFFS = [0.10, 0.10, 0.0, -0.10, 0.05, 0.20]


def _reference_ci(d: list[float], n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Slow percentile bootstrap: the same generator draws, then a loop over resamples and a hand percentile."""
    n = len(d)
    idx = np.random.Generator(np.random.PCG64(seed)).integers(0, n, size=(n_boot, n))
    means = sorted(sum(d[j] for j in row.tolist()) / n for row in idx)

    def pct(q: float) -> float:  # linear interpolation between order statistics (numpy's default "linear")
        pos = q * (n_boot - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n_boot - 1)
        return means[lo] + (pos - lo) * (means[hi] - means[lo])

    return pct((1 - level) / 2), pct((1 + level) / 2)


class TestPairedStats:
    def test_hand_worked(self) -> None:
        s = paired_stats(AP, REF, n_boot=2000, seed=3)
        assert (s.n, s.improved, s.worsened, s.tied) == (6, 4, 1, 1)
        assert s.mean_diff == pytest.approx(0.35 / 6, abs=1e-12)
        assert s.sign_p == pytest.approx(0.375, abs=1e-15)
        assert s.ci_low <= s.mean_diff <= s.ci_high
        assert (s.ci_low, s.ci_high) == pytest.approx(_reference_ci(DIFFS, 2000, 3, 0.95), abs=1e-12)

    def test_tie_tolerance(self) -> None:
        # tie_tol = 0.06 also ties q5 (+0.05): improved 3, worsened 1, tied 2; p = 2 * (1 + 4) / 16 = 0.625.
        s = paired_stats(AP, REF, n_boot=10, tie_tol=0.06)
        assert (s.n, s.improved, s.worsened, s.tied) == (6, 3, 1, 2)
        assert s.sign_p == pytest.approx(0.625)
        assert s.mean_diff == pytest.approx(0.35 / 6)  # ties still count in the mean

    def test_accepts_arrays_and_is_frozen(self) -> None:
        s = paired_stats(np.array(AP), np.array(REF, dtype=np.float32), n_boot=10)
        assert isinstance(s, PairedStats)
        with pytest.raises(AttributeError):
            s.n = 3  # type: ignore[misc]

    @pytest.mark.parametrize(("seed", "level", "n_boot"), [(0, 0.95, 1000), (7, 0.9, 333), (123, 0.5, 1)])
    def test_bootstrap_matches_loop_reference(self, seed: int, level: float, n_boot: int) -> None:
        rng = np.random.default_rng(seed)
        ref = rng.random(23)
        ap = np.clip(ref + rng.normal(0.02, 0.1, 23), 0, 1)
        s = paired_stats(ap, ref, n_boot=n_boot, seed=seed, level=level)
        want = _reference_ci((ap - ref).tolist(), n_boot, seed, level)
        assert (s.ci_low, s.ci_high) == pytest.approx(want, abs=1e-12)

    def test_bootstrap_properties(self) -> None:
        ref = np.linspace(0.1, 0.8, 30)
        s = paired_stats(ref + 0.05, ref, n_boot=500)  # every difference equal: the interval is a point
        assert s.ci_low == pytest.approx(0.05)
        assert s.ci_high == pytest.approx(0.05)
        assert s.mean_diff == pytest.approx(0.05)
        rng = np.random.default_rng(1)
        ap = np.clip(ref + rng.normal(0, 0.1, 30), 0, 1)
        a, b = paired_stats(ap, ref, seed=5), paired_stats(ap, ref, seed=5)
        assert a == b  # deterministic by seed
        assert paired_stats(ap, ref, seed=6) != a
        assert a.ci_low < a.mean_diff < a.ci_high
        narrow = paired_stats(ap, ref, seed=5, level=0.5)
        assert a.ci_low < narrow.ci_low < narrow.ci_high < a.ci_high

    def test_zero_usable_queries(self) -> None:
        s = paired_stats([NAN, 0.5, NAN], [NAN, NAN, 0.2])
        assert (s.n, s.improved, s.worsened, s.tied, s.sign_p) == (0, 0, 0, 0, 1.0)
        assert math.isnan(s.mean_diff)
        assert math.isnan(s.ci_low)
        assert math.isnan(s.ci_high)
        assert all(math.isnan(v) for v in bootstrap_ci([NAN, NAN]))

    def test_all_tied(self) -> None:
        s = paired_stats([0.3, 0.4], [0.3, 0.4])
        assert (s.improved, s.worsened, s.tied, s.sign_p, s.mean_diff) == (0, 0, 2, 1.0, 0.0)

    def test_exception(self) -> None:
        with pytest.raises(
            ShapeError, match=r"paired_stats\(\): ap and ref must have the same shape.*ap \(3,\) and ref \(2,\)"
        ):
            paired_stats([0.1, 0.2, 0.3], [0.1, 0.2])
        with pytest.raises(ShapeError, match=r"paired_stats\(\): ref must be a 1-D array.*got shape \(2, 2\)"):
            paired_stats([0.1, 0.2], [[0.1, 0.2], [0.3, 0.4]])
        with pytest.raises(ValueError, match=r"paired_stats\(\): ap must hold at least one query; got an empty"):
            paired_stats([], [])
        with pytest.raises(ValueError, match=r"n_boot must be an integer >= 1; got 0"):
            paired_stats(AP, REF, n_boot=0)
        with pytest.raises(ValueError, match=r"n_boot must be an integer >= 1; got True"):
            paired_stats(AP, REF, n_boot=True)
        with pytest.raises(ValueError, match=r"n_boot must be an integer >= 1; got 10.5"):
            paired_stats(AP, REF, n_boot=10.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"seed must be an integer >= 0; got -1"):
            paired_stats(AP, REF, seed=-1)
        for level in (0.0, 1.0, 1.5):
            with pytest.raises(ValueError, match=rf"level must lie strictly between 0 and 1.*got {level}"):
                paired_stats(AP, REF, level=level)
        with pytest.raises(ValueError, match=r"tie_tol must be finite and >= 0; got -0.1"):
            paired_stats(AP, REF, tie_tol=-0.1)


class TestBootstrapCI:
    def test_matches_loop_reference_and_paired(self) -> None:
        aps = [0.2, NAN, 0.9, 0.4, 0.7, 0.1, NAN, 0.55]
        finite = [a for a in aps if not math.isnan(a)]
        got = bootstrap_ci(aps, n_boot=777, seed=11)
        assert got == pytest.approx(_reference_ci(finite, 777, 11, 0.95), abs=1e-12)
        # The same draws as paired_stats: against an all-zero reference the two intervals coincide.
        s = paired_stats(aps, [0.0 if not math.isnan(a) else NAN for a in aps], n_boot=777, seed=11)
        assert (s.ci_low, s.ci_high) == pytest.approx(got, abs=1e-15)

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match=r"bootstrap_ci\(\): ap must hold at least one query"):
            bootstrap_ci(np.zeros(0))
        with pytest.raises(ShapeError, match=r"bootstrap_ci\(\): ap must be a 1-D array.*got shape \(\)"):
            bootstrap_ci(0.5)
        with pytest.raises(ValueError, match=r"bootstrap_ci\(\): level must lie strictly between 0 and 1"):
            bootstrap_ci([0.5], level=95)


class TestSignTest:
    @pytest.mark.parametrize(
        ("k", "n"),
        [(0, 1), (1, 1), (0, 5), (4, 5), (5, 5), (3, 6), (10, 20), (0, 30), (7, 40), (50, 100), (61, 100), (1, 200)],
    )
    def test_matches_scipy(self, k: int, n: int) -> None:
        assert sign_test_p(k, n) == pytest.approx(binomtest(k, n, 0.5).pvalue, rel=1e-12, abs=1e-300)

    def test_hand_worked(self) -> None:
        assert sign_test_p(4, 5) == 0.375  # 2 * (1 + 5) / 32
        assert sign_test_p(1, 5) == 0.375  # symmetric
        assert sign_test_p(5, 5) == 0.0625  # 2 / 32
        assert sign_test_p(3, 6) == 1.0  # capped at 1
        assert sign_test_p(0, 0) == 1.0
        assert sign_test_p(0, 1000) == 2.0**-999  # exact: 2 * 1 / 2**1000, rounded once

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match=r"sign_test_p\(\): expected 0 <= k <= n; got k=6, n=5"):
            sign_test_p(6, 5)
        with pytest.raises(ValueError, match=r"sign_test_p\(\): k must be an integer; got 1.5"):
            sign_test_p(1.5, 5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Tables and files on a small synthetic comparison: 5 queries, 3 rows.

QUERIES = ["all_souls_1", "ashmolean_3", "balliol, 2", "bodleian_1", "radcliffe_4"]  # one name needs CSV quoting


def _setup(aps: list[float], kappas: int = 3) -> dict[str, Any]:
    arr = np.array(aps)
    m = float(np.nanmean(arr)) if np.isfinite(arr).any() else NAN
    return {"map": m, "aps": arr, "mpr": np.linspace(m, m / 2, kappas), "prs": np.full((arr.size, kappas), 0.5)}


def _results(easy: list[float], medium: list[float], hard: list[float]) -> dict[str, Any]:
    return {"easy": _setup(easy), "medium": _setup(medium), "hard": _setup(hard)}


def _rows() -> list[Row]:
    gem = _results([0.9, 0.8, 0.7, 0.6, 0.5], [0.6, 0.5, 0.4, 0.3, 0.2], [0.3, 0.2, NAN, 0.1, 0.05])
    hew = _results([0.9, 0.85, 0.7, 0.65, 0.5], [0.7, 0.5, 0.45, 0.35, 0.1], [0.35, 0.2, NAN, 0.15, 0.1])
    aqe = _results([1.0, 0.9, 0.8, 0.7, 0.6], [0.8, 0.6, 0.5, 0.4, 0.3], [0.5, 0.3, NAN, 0.2, 0.1])
    return [
        Row("GeM", "pool", "python -m lightning_apps.eval pool=gem", gem, 0.25),
        Row("HeW", "pool", "python -m lightning_apps.eval pool=hew", hew, 1.5),
        Row("GeM + AQE", "rerank", "python -m lightning_apps.eval pool=gem rerank=aqe", aqe, 0.05, "on GeM"),
    ]


def _tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of ``text``: per table its rows (header first, separator dropped) as stripped cells."""
    tables: list[list[list[str]]] = []
    prev = False
    for line in text.splitlines():
        is_row = line.startswith("|")
        if is_row and not set(line) <= set("|-: "):
            if not prev:
                tables.append([])
            tables[-1].append([c.strip() for c in line.strip().strip("|").split("|")])
        prev = is_row
    return tables


class TestComparisonTable:
    def test_values(self) -> None:
        text = comparison_table(_rows(), "GeM", n_boot=200)
        scores, paired = _tables(text)
        assert scores[0] == ["method", "kind", "Medium mAP", "Δ", "mP@10", "Hard mAP", "Δ", "mP@10", "seconds"]
        # Medium mAP: GeM 40.00, HeW 42.00 (+2.00), GeM + AQE 52.00 (+12.00). Hard (q2 skipped): GeM 16.25,
        # HeW 20.00 (+3.75), AQE 27.50 (+11.25). mP@10 is the third mpr entry, m / 2 here.
        assert scores[1] == ["GeM", "pool", "40.00", "—", "20.00", "16.25", "—", "8.12", "0.25"]
        assert scores[2] == ["HeW", "pool", "42.00", "+2.00", "21.00", "20.00", "+3.75", "10.00", "1.50"]
        assert scores[3] == ["GeM + AQE", "rerank", "52.00", "+12.00", "26.00", "27.50", "+11.25", "13.75", "0.05"]
        assert paired[0] == [
            "method", "Medium +/−/=", "Medium Δ 95% interval", "Medium p", "Hard +/−/=", "Hard Δ 95% interval", "Hard p"
        ]  # fmt: skip
        assert paired[1] == ["GeM"] + ["—"] * 6
        # HeW against GeM. Medium: +0.1, 0, +0.05, +0.05, -0.1 -> 3/1/1, p = 2 * (1 + 4) / 16 = 0.625.
        # Hard: +0.05, 0, (skipped), +0.05, +0.05 -> 3/0/1, p = 2 * 1 / 8 = 0.25.
        assert paired[2][1::3] == ["3/1/1", "3/0/1"]
        assert paired[2][3::3] == ["0.625", "0.250"]
        # GeM + AQE improves every Medium query: 5/0/0, p = 2 / 32 = 0.0625; interval from a 300-draw bootstrap.
        assert paired[3][1] == "5/0/0"
        assert paired[3][3] == "0.062"
        lo, hi = (float(v) for v in paired[3][2].strip("[]").split(","))
        assert 10.0 <= lo <= 12.0 <= hi <= 20.0
        assert max(len(line) for line in text.splitlines()) <= 120  # readable in a terminal

    def test_exception(self) -> None:
        rows = _rows()
        with pytest.raises(
            ValueError, match=r"comparison_table\(\): baseline 'MAC' must be the name of a row; got rows"
        ):
            comparison_table(rows, "MAC")
        with pytest.raises(ValueError, match=r"row names must be unique; got \['GeM'\] more than once"):
            comparison_table([*rows, rows[0]], "GeM")
        with pytest.raises(ValueError, match=r"rows must hold at least one Row"):
            comparison_table([], "GeM")
        with pytest.raises(ValueError, match=r"kappa must be one of kappas \[1, 5, 10\]; got 100"):
            comparison_table(rows, "GeM", kappa=100)
        with pytest.raises(ShapeError, match=r"\['mpr'\] must have one value per kappa \(2, for kappas \[1, 10\]\)"):
            comparison_table(rows, "GeM", kappas=(1, 10))
        with pytest.raises(ValueError, match=r"row 'GeM' must have results\['ultra'\].*got setups"):
            comparison_table(rows, "GeM", setups=("ultra",))
        bad = _rows()
        bad[1].results["hard"]["aps"] = np.array([0.1, 0.2, 0.3, 0.1, 0.1])  # a positive where GeM has none
        with pytest.raises(ValueError, match=r"row 'HeW' has no positives for other queries.*first query 2"):
            comparison_table(bad, "GeM")
        bad[1].results["hard"]["aps"] = np.array([0.1, 0.2])
        with pytest.raises(ShapeError, match=r"row 'HeW' results\['hard'\]\['aps'\] must have the baseline's shape"):
            comparison_table(bad, "GeM")
        with pytest.raises(ValueError, match=r"Row\(\): kind must be 'pool' or 'rerank'; got 'pooling'"):
            Row("X", "pooling", "cmd", {}, 1.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"Row\(\): seconds must be finite and >= 0; got -1"):
            Row("X", "pool", "cmd", {}, -1)
        with pytest.raises(ValueError, match=r"Row\(\): name must be a non-empty string"):
            Row(" ", "pool", "cmd", {}, 1.0)


def test_format_timings() -> None:
    text = format_timings({"build": 1.5, "extraction": 6.0, "pool: GeM": 0.5, "rerank: GeM + AQE": 2.0})
    (table,) = _tables(text)
    assert table == [
        ["stage", "seconds", "share"],
        ["build", "1.50", "15.0%"],
        ["extraction", "6.00", "60.0%"],
        ["pool: GeM", "0.50", "5.0%"],
        ["rerank: GeM + AQE", "2.00", "20.0%"],
        ["total", "10.00", "100.0%"],
    ]
    assert _tables(format_timings({"build": 0.0}))[0][1] == ["build", "0.00", "—"]
    assert _tables(format_timings({}))[0][1] == ["total", "0.00", "—"]
    with pytest.raises(ValueError, match=r"format_timings\(\): timings\['build'\] must be finite seconds >= 0; got -1"):
        format_timings({"build": -1})
    with pytest.raises(ValueError, match=r"timings\['x'\] must be finite seconds >= 0; got nan"):
        format_timings({"x": NAN})


def test_write_comparison(tmp_path: Path) -> None:
    rows = _rows()
    files = write_comparison(
        tmp_path / "out", rows, baseline="GeM", kappas=(1, 5, 10), meta={"dataset": "roxford5k", "backbone": "vgg16"},
        query_names=QUERIES, timings={"build": 1.0, "extraction": 3.0}, config_yaml="pool: gem\n", n_boot=300,
    )  # fmt: skip
    assert set(files) == {"json", "markdown", "per_query", "config", "figure"}
    assert all(p.is_file() for p in files.values())
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left

    with files["per_query"].open(newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["query"] + [f"{r}/{s}" for r in ("GeM", "HeW", "GeM + AQE") for s in ("easy", "medium", "hard")]
    assert [line[0] for line in table[1:]] == QUERIES
    for j, (row, s) in enumerate((r, s) for r in rows for s in ("easy", "medium", "hard")):
        col = [line[j + 1] for line in table[1:]]
        want = row.results[s]["aps"]
        assert [c == "" for c in col] == np.isnan(want).tolist()
        assert [float(c) for c in col if c] == pytest.approx(want[np.isfinite(want)].tolist(), abs=1e-6)

    md = files["markdown"].read_text()
    for row in rows:
        assert row.name in md
        assert row.command in md
    assert "+2.00" in md
    assert "+12.00" in md
    assert "+3.75" in md
    assert "![mAP per method](compare.png)" in md
    assert "| extraction |" in md
    assert "75.0%" in md
    assert "chosen on this same test set" in md

    payload = json.loads(files["json"].read_text())
    assert payload["kind"] == "comparison"
    assert payload["baseline"] == "GeM"
    assert [r["name"] for r in payload["rows"]] == ["GeM", "HeW", "GeM + AQE"]
    assert payload["rows"][0]["paired"] is None
    hew_medium = payload["rows"][1]["paired"]["medium"]
    assert (hew_medium["improved"], hew_medium["worsened"], hew_medium["tied"]) == (3, 1, 1)
    assert payload["rows"][1]["results"]["hard"]["aps"][2] is None  # NaN as null
    assert len(payload["rows"][1]["results"]["medium"]["prs"]) == 5  # small: kept
    assert payload["timings"] == {"build": 1.0, "extraction": 3.0}

    with Image.open(files["figure"]) as im:
        im.load()
        assert im.format == "PNG"
        assert 600 <= im.width <= 1600
        assert 200 <= im.height <= 1000


def test_write_comparison_without_positives_in_a_setup(tmp_path: Path) -> None:
    rows = _rows()
    for row in rows:
        row.results["hard"] = _setup([NAN] * 5)  # zero usable queries in Hard
    files = write_comparison(
        tmp_path, rows[:2], baseline="GeM", kappas=(1, 5, 10), meta={}, query_names=QUERIES, timings={},
        config_yaml="", n_boot=50,
    )  # fmt: skip
    md = files["markdown"].read_text()
    assert "0/0/0" in md
    assert "n/a" in md
    payload = json.loads(files["json"].read_text())
    assert payload["rows"][1]["paired"]["hard"]["mean_diff"] is None
    assert payload["rows"][1]["paired"]["hard"]["sign_p"] == 1.0
    with Image.open(files["figure"]) as im:
        assert im.width > 0


def test_write_comparison_exception(tmp_path: Path) -> None:
    with pytest.raises(
        ShapeError, match=r"write_comparison\(\): query_names must have one name per query \(Q=5\); got 4"
    ):
        write_comparison(
            tmp_path, _rows(), baseline="GeM", kappas=(1, 5, 10), meta={}, query_names=QUERIES[:4], timings={},
            config_yaml="",
        )  # fmt: skip
    assert not list(tmp_path.iterdir())  # nothing written on bad input


def test_doctests() -> None:
    failed, attempted = doctest.testmod(cr, optionflags=doctest.ELLIPSIS)
    assert attempted > 0
    assert failed == 0
