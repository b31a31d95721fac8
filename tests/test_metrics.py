"""Tests for deepagg.metrics: revisitop-protocol mAP / mP@k, hand-worked cases and a per-query loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import deepagg.metrics as metrics_mod
from deepagg._checks import DTypeError, ShapeError
from deepagg.metrics import compute_map, evaluate_revisited

from ._base import BaseTester

# ----------------------------------------------------------------------------------------------------------------
# Plain per-query reference, following the protocol literally (revisitop's structure, np.isin, sets for ok/junk).
# ----------------------------------------------------------------------------------------------------------------


def reference_map(ranks, gnd, kappas=(1, 5, 10)):
    ranks = np.asarray(ranks)
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    ap_total = 0.0
    pr_total = np.zeros(len(kappas))
    nempty = 0
    for i in range(nq):
        ok = np.unique(np.asarray(gnd[i]["ok"], dtype=np.int64))
        junk = np.setdiff1d(np.asarray(gnd[i]["junk"], dtype=np.int64), ok)  # ok wins over junk
        if ok.size == 0:
            aps[i] = math.nan
            prs[i, :] = math.nan
            nempty += 1
            continue
        row = ranks[i]
        pos = np.arange(row.size)[np.isin(row, ok)]
        jpos = np.arange(row.size)[np.isin(row, junk)]
        # Junk removal: walk the sorted junk positions, shifting each positive up by the junk above it.
        shift = 0
        ij = 0
        pos = pos.copy()
        for ip in range(pos.size):
            while ij < jpos.size and pos[ip] > jpos[ij]:
                shift += 1
                ij += 1
            pos[ip] -= shift
        # Trapezoidal AP over all |ok| positives.
        ap = 0.0
        for j, r in enumerate(pos):
            p0 = 1.0 if r == 0 else j / r
            p1 = (j + 1) / (r + 1)
            ap += (p0 + p1) / 2 / ok.size
        aps[i] = ap
        ap_total += ap
        pos1 = pos + 1
        for t, k in enumerate(kappas):
            if pos1.size == 0:
                prs[i, t] = 0.0  # revisitop crashes here; the contract says 0
            else:
                kq = min(pos1.max(), k)
                prs[i, t] = (pos1 <= kq).sum() / kq
        pr_total += prs[i]
    kept = nq - nempty
    mean_ap = ap_total / kept if kept else math.nan
    mpr = pr_total / kept if kept else np.full(len(kappas), math.nan)
    return mean_ap, aps, mpr, prs


def _random_case(rng: np.random.Generator):
    q = int(rng.integers(1, 21))
    db = int(rng.integers(1, 201))
    n = db if rng.random() < 0.4 else int(rng.integers(0, db + 1))  # full or truncated rankings
    ranks = np.stack([rng.permutation(db)[:n] for _ in range(q)]).reshape(q, n)
    gnd = []
    for _ in range(q):
        universe = db + 5  # a few gnd indices never appear in any ranking
        n_ok = 0 if rng.random() < 0.15 else int(rng.integers(1, min(universe, 30) + 1))
        ok = rng.integers(0, universe, n_ok)  # may repeat
        junk = rng.integers(0, universe, int(rng.integers(0, 20)))  # may overlap ok
        if rng.random() < 0.5:
            junk = np.setdiff1d(junk, ok)
        gnd.append({"ok": ok, "junk": junk})
    kappas = tuple(int(k) for k in rng.integers(1, 15, int(rng.integers(1, 4))))
    return ranks, gnd, kappas


def _assert_same(ours, ref, atol=1e-12):
    m, aps, mpr, prs = ours
    rm, raps, rmpr, rprs = ref
    if math.isnan(rm):
        assert math.isnan(m)
    else:
        assert m == pytest.approx(rm, abs=atol)
    np.testing.assert_allclose(aps, raps, atol=atol, rtol=0)
    np.testing.assert_allclose(mpr, rmpr, atol=atol, rtol=0)
    np.testing.assert_allclose(prs, rprs, atol=atol, rtol=0)


class TestComputeMap(BaseTester):
    def test_smoke(self):
        ranks = np.array([[2, 1, 0], [0, 1, 2]])
        gnd = [{"ok": [0, 2], "junk": []}, {"ok": [1], "junk": [0], "bbx": [0.0, 0.0, 1.0, 1.0]}]
        m, aps, mpr, prs = compute_map(ranks, gnd)
        assert isinstance(m, float)
        assert aps.shape == (2,)
        assert aps.dtype == np.float64
        assert mpr.shape == (3,)
        assert prs.shape == (2, 3)
        assert prs.dtype == np.float64

    def test_torchmetrics_doc_example(self):
        # scores [0.2, 0.3, 0.5], targets [T, F, T] -> ranked best first: items 2 (T), 1 (F), 0 (T).
        # Positives at 0-based positions 0 and 2.
        #   j=0, r=0: p0 = 1, p1 = 1/1               -> (1 + 1) / 2 / 2       = 0.5
        #   j=1, r=2: p0 = 1/2, p1 = 2/3             -> (1/2 + 2/3) / 2 / 2   = 7/24
        #   AP = 0.5 + 7/24 = 19/24 = 0.7917 (the step AP is (1 + 2/3) / 2 = 0.8333).
        # mP@k: 1-based positions [1, 3]; k=1: kq=1 -> 1/1; k=5: kq=3 -> 2/3; k=10: kq=3 -> 2/3.
        m, aps, mpr, prs = compute_map(np.array([[2, 1, 0]]), [{"ok": [0, 2], "junk": []}])
        assert m == pytest.approx(19 / 24, abs=1e-15)
        np.testing.assert_allclose(aps, [19 / 24], rtol=0, atol=1e-15)
        assert round(m, 4) == 0.7917
        np.testing.assert_allclose(prs, [[1.0, 2 / 3, 2 / 3]], rtol=0, atol=1e-15)
        np.testing.assert_allclose(mpr, [1.0, 2 / 3, 2 / 3], rtol=0, atol=1e-15)

    def test_step_ap_relation(self):
        # The step AP (sklearn, torchmetrics) averages p1 only; the trapezoid averages (p0 + p1) / 2 with
        # p0 <= p1, so trapezoid <= step, with equality exactly when the positives fill the top ranks.
        sklearn = pytest.importorskip("sklearn.metrics")
        assert sklearn.average_precision_score([1, 0, 1], [0.2, 0.3, 0.5]) == pytest.approx(5 / 6)
        rng = np.random.default_rng(3)
        for _ in range(20):
            db = int(rng.integers(2, 40))
            ranks = rng.permutation(db)[None]
            ok = rng.choice(db, int(rng.integers(1, db + 1)), replace=False)
            target = np.isin(np.arange(db), ok).astype(int)
            scores = np.empty(db)
            scores[ranks[0]] = np.arange(db, 0, -1)  # distinct scores reproducing the ranking
            step = sklearn.average_precision_score(target, scores)
            trap = compute_map(ranks, [{"ok": ok, "junk": []}])[0]
            assert trap <= step + 1e-12
            top = set(ranks[0, : ok.size].tolist()) == set(ok.tolist())
            assert (abs(trap - step) < 1e-12) == top

    def test_junk_above_positives(self):
        # ranks 5(junk) 1(pos) 7 2(junk) 3(pos) 0 at raw positions 0..5.
        # Adjusted: item 1 -> 1 - 1 junk = 0; item 3 -> 4 - 2 junk = 2.
        #   AP = (1 + 1) / 2 / 2 + (1/2 + 2/3) / 2 / 2 = 0.5 + 7/24 = 19/24.
        # mP@k on 1-based [1, 3]: k=1 -> 1; k=2 -> kq=2, 1/2; k=5 -> kq=3, 2/3.
        ranks = np.array([[5, 1, 7, 2, 3, 0]])
        m, aps, mpr, prs = compute_map(ranks, [{"ok": [1, 3], "junk": [5, 2]}], kappas=(1, 2, 5))
        assert m == pytest.approx(19 / 24, abs=1e-15)
        assert aps[0] == m
        np.testing.assert_allclose(prs, [[1.0, 0.5, 2 / 3]], rtol=0, atol=1e-15)
        np.testing.assert_array_equal(mpr, prs[0])
        # Junk counted as negatives instead (positions 1 and 4) would give
        #   (0 + 1/2) / 2 / 2 + (1/4 + 2/5) / 2 / 2 = 0.125 + 0.1625 = 0.2875.
        m_neg = compute_map(ranks, [{"ok": [1, 3], "junk": []}])[0]
        assert m_neg == pytest.approx(0.2875, abs=1e-15)

    def test_junk_below_last_positive_ignored(self):
        # Junk ranked after every positive changes nothing.
        ranks = np.array([[1, 0, 2, 3]])
        a = compute_map(ranks, [{"ok": [1, 2], "junk": [3]}])
        b = compute_map(ranks, [{"ok": [1, 2], "junk": []}])
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[3], b[3])

    def test_two_positives_at_top(self):
        # anchors.md 4.5: only two positives, both at the top -> P@5 = P@10 = 1 (not 0.4 / 0.2).
        m, _, mpr, _ = compute_map(np.array([[3, 8, 0, 1, 2, 4, 5, 6, 7, 9]]), [{"ok": [3, 8], "junk": []}])
        assert m == 1.0
        np.testing.assert_array_equal(mpr, [1.0, 1.0, 1.0])

    def test_truncated_missing_positives(self):
        # Database of 10, ranking truncated to [4, 0, 6]; ok = {0, 8, 9}, so n = 3 and only item 0 (r=1) is found.
        #   j=0, r=1: p0 = 0/1 = 0, p1 = 1/2 -> (0 + 1/2) / 2 / 3 = 1/12.
        # mP@k: 1-based [2]; k=1: kq=1 -> 0/1; k=5: kq=2 -> 1/2.
        m, aps, mpr, prs = compute_map(np.array([[4, 0, 6]]), [{"ok": [0, 9, 8], "junk": []}], kappas=(1, 5))
        assert m == pytest.approx(1 / 12, abs=1e-15)
        assert aps[0] == m
        np.testing.assert_allclose(prs, [[0.0, 0.5]], rtol=0, atol=1e-15)
        np.testing.assert_array_equal(mpr, prs[0])

    def test_truncated_no_positive_retrieved(self):
        # Positives exist but none is in the truncated list: AP 0 and P@k 0 (revisitop raises here).
        ranks = np.array([[4, 6], [0, 1]])
        gnd = [{"ok": [0], "junk": [6]}, {"ok": [0], "junk": []}]
        m, aps, mpr, prs = compute_map(ranks, gnd)
        np.testing.assert_array_equal(aps, [0.0, 1.0])
        np.testing.assert_array_equal(prs, [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
        assert m == 0.5
        np.testing.assert_array_equal(mpr, [0.5, 0.5, 0.5])

    def test_query_without_positives_skipped(self):
        # Query 0 has no positives: NaN, out of both means; query 1 is perfect -> map 1.
        ranks = np.array([[0, 1, 2], [1, 0, 2]])
        gnd = [{"ok": [], "junk": [0]}, {"ok": [1], "junk": []}]
        m, aps, mpr, prs = compute_map(ranks, gnd)
        assert m == 1.0
        assert math.isnan(aps[0])
        assert aps[1] == 1.0
        assert np.isnan(prs[0]).all()
        np.testing.assert_array_equal(mpr, [1.0, 1.0, 1.0])

    def test_all_queries_empty(self):
        m, aps, mpr, prs = compute_map(np.array([[0, 1], [1, 0]]), [{"ok": [], "junk": []}] * 2)
        assert math.isnan(m)
        assert np.isnan(aps).all()
        assert np.isnan(mpr).all()
        assert mpr.shape == (3,)
        assert np.isnan(prs).all()

    def test_duplicates_in_gnd_are_sets(self):
        # ok = [0, 0, 2] is the set {0, 2}: n = 2, same as the doc example (revisitop would use n = 3).
        ranks = np.array([[2, 1, 0]])
        m = compute_map(ranks, [{"ok": [0, 0, 2], "junk": [1, 1]}])[0]
        assert m == 1.0  # junk {1} removed -> positives at 0 and 1
        m = compute_map(ranks, [{"ok": np.array([0, 2, 2, 0]), "junk": []}])[0]
        assert m == pytest.approx(19 / 24, abs=1e-15)

    def test_ok_wins_over_junk(self):
        # Item 2 is in ok and junk: a positive. Item 1 is junk. ranks [2, 1, 0]: 2 -> r=0, 0 -> 2 - 1 = 1.
        #   AP = (1 + 1) / 2 / 2 + (1/1 + 2/2) / 2 / 2 = 1.
        m = compute_map(np.array([[2, 1, 0]]), [{"ok": [0, 2], "junk": [2, 1]}])[0]
        assert m == 1.0

    def test_cardinality(self):
        # Q = 0: no query at all -> NaN means, empty per-query arrays.
        m, aps, mpr, prs = compute_map(np.zeros((0, 4), dtype=np.int64), [])
        assert math.isnan(m)
        assert aps.shape == (0,)
        assert mpr.shape == (3,)
        assert prs.shape == (0, 3)
        # N = 0: an empty ranking retrieves nothing -> AP 0, P@k 0.
        m, aps, mpr, prs = compute_map(np.zeros((2, 0), dtype=np.int64), [{"ok": [1], "junk": []}] * 2)
        assert m == 0.0
        np.testing.assert_array_equal(prs, np.zeros((2, 3)))
        # No kappas.
        m, aps, mpr, prs = compute_map(np.array([[0, 1]]), [{"ok": [1], "junk": []}], kappas=())
        assert mpr.shape == (0,)
        assert prs.shape == (1, 0)
        assert m == pytest.approx(0.25)

    @pytest.mark.parametrize("dense", [True, False], ids=["dense-table", "sorted-keys"])
    def test_reference(self, dense, monkeypatch):
        if not dense:
            monkeypatch.setattr(metrics_mod, "_DENSE_TABLE_MAX", 0)
        rng = np.random.default_rng(1234)
        for _ in range(50):
            ranks, gnd, kappas = _random_case(rng)
            _assert_same(compute_map(ranks, gnd, kappas), reference_map(ranks, gnd, kappas))

    @pytest.mark.parametrize("dense", [True, False], ids=["dense-table", "sorted-keys"])
    def test_repeated_index_in_ranks(self, dense, monkeypatch):
        # A repeated positive would otherwise count twice (revisitop can then return AP > 1): both lookup paths
        # reject any repeat, and name the first offending row.
        if not dense:
            monkeypatch.setattr(metrics_mod, "_DENSE_TABLE_MAX", 0)
        gnd = [{"ok": [0], "junk": []}] * 3
        ok_ranks = np.array([[0, 1, 2], [2, 1, 0], [1, 0, 2]])
        # Item 0 at positions 0, 2, 1: AP 1, (0 + 1/3) / 2 = 1/6, (0 + 1/2) / 2 = 1/4.
        assert compute_map(ok_ranks, gnd)[0] == pytest.approx((1 + 1 / 6 + 1 / 4) / 3, abs=1e-15)
        for bad, first in [
            (np.array([[0, 1, 2], [2, 2, 0], [1, 0, 1]]), 1),
            (np.array([[0, 0, 0], [2, 1, 0], [1, 0, 2]]), 0),
        ]:
            with pytest.raises(ValueError, match=rf"repeated indices in \d row\(s\), first row {first}\."):
                compute_map(bad, gnd)

    def test_reference_large_indices(self):
        # Sparse, large database indices (e.g. +1M distractors appended after the dataset).
        rng = np.random.default_rng(7)
        db = rng.choice(2_000_000, 300, replace=False)
        ranks = np.stack([rng.permutation(db)[:100] for _ in range(5)])
        gnd = [{"ok": rng.choice(db, 20, replace=False), "junk": rng.choice(db, 10, replace=False)} for _ in range(5)]
        _assert_same(compute_map(ranks, gnd), reference_map(ranks, gnd))

    @pytest.mark.parametrize(
        "convert",
        [
            lambda r: torch.from_numpy(r),
            lambda r: torch.from_numpy(r).int(),
            lambda r: r.astype(np.int32),
            lambda r: r.astype(np.uint16),
            lambda r: r.T.copy().T,  # non-contiguous (Fortran order)
            lambda r: r.tolist(),
        ],
        ids=["torch-int64", "torch-int32", "np-int32", "np-uint16", "np-fortran", "list"],
    )
    def test_input_types(self, convert):
        rng = np.random.default_rng(5)
        ranks = np.stack([rng.permutation(30) for _ in range(4)])
        gnd = [{"ok": rng.choice(30, 5, replace=False), "junk": rng.choice(30, 3, replace=False)} for _ in range(4)]
        expected = compute_map(ranks, gnd)
        _assert_same(compute_map(convert(ranks), gnd), expected, atol=0)

    def test_gnd_types(self):
        # gnd sets may be lists, numpy arrays of any int dtype or torch tensors; empty ones of any dtype.
        ranks = np.array([[2, 1, 0]])
        for ok, junk in [
            ([0, 2], []),
            (np.array([0, 2], dtype=np.int32), np.array([], dtype=np.float64)),
            (torch.tensor([0, 2]), torch.zeros(0)),
            (np.array([2, 0], dtype=np.uint8), torch.tensor([], dtype=torch.int64)),
        ]:
            assert compute_map(ranks, [{"ok": ok, "junk": junk}])[0] == pytest.approx(19 / 24, abs=1e-15)

    @pytest.mark.gpu
    def test_cuda_input(self):
        ranks = torch.tensor([[2, 1, 0]], device="cuda")
        assert compute_map(ranks, [{"ok": torch.tensor([0, 2], device="cuda"), "junk": []}])[0] == pytest.approx(
            19 / 24
        )

    def test_exception(self):
        ranks = np.array([[2, 1, 0]])
        gnd = [{"ok": [0], "junk": []}]
        with pytest.raises(DTypeError, match=r"compute_map\(\): ranks must be an integer tensor.*torch.float32"):
            compute_map(torch.rand(1, 3), gnd)
        with pytest.raises(DTypeError, match=r"compute_map\(\): ranks must be an integer tensor.*torch.bool"):
            compute_map(torch.ones(1, 3, dtype=torch.bool), gnd)
        with pytest.raises(DTypeError, match=r"compute_map\(\): ranks must be an integer array.*float64"):
            compute_map(np.zeros((1, 3)), gnd)
        with pytest.raises(ShapeError, match=r"compute_map\(\): ranks must have shape \(Q, N\).*got \(3,\) with 1"):
            compute_map(np.array([2, 1, 0]), gnd)
        with pytest.raises(ValueError, match=r"compute_map\(\): ranks must hold non-negative.*minimum -1"):
            compute_map(np.array([[2, -1, 0]]), gnd)
        with pytest.raises(ValueError, match=r"compute_map\(\): each row of ranks.*1 row\(s\), first row 1"):
            compute_map(np.array([[2, 1, 0], [1, 1, 0]]), gnd * 2)
        with pytest.raises(ShapeError, match=r"compute_map\(\): gnd must have one entry per row.*Q=1.*got 2"):
            compute_map(ranks, gnd * 2)
        with pytest.raises(ValueError, match=r"compute_map\(\): gnd must be a list of per-query dicts.*got dict"):
            compute_map(ranks, {"ok": [0], "junk": []})
        with pytest.raises(ValueError, match=r"compute_map\(\): gnd\[0\] must be a dict; got list"):
            compute_map(ranks, [[0]])
        with pytest.raises(ValueError, match=r"compute_map\(\): gnd\[0\] must have the key 'junk'; got keys \['ok'\]"):
            compute_map(ranks, [{"ok": [0]}])
        with pytest.raises(ShapeError, match=r"compute_map\(\): gnd\[0\]\['ok'\] must be a 1-D array.*\(1, 2\)"):
            compute_map(ranks, [{"ok": [[0, 1]], "junk": []}])
        with pytest.raises(DTypeError, match=r"compute_map\(\): gnd\[0\]\['ok'\] must hold integer.*float64"):
            compute_map(ranks, [{"ok": [0.0, 1.0], "junk": []}])
        with pytest.raises(DTypeError, match=r"compute_map\(\): gnd\[0\]\['junk'\] must hold integer.*torch.float32"):
            compute_map(ranks, [{"ok": [0], "junk": torch.tensor([1.0])}])
        with pytest.raises(ValueError, match=r"compute_map\(\): gnd\[0\]\['junk'\] must hold non-negative.*-3"):
            compute_map(ranks, [{"ok": [0], "junk": [-3]}])
        for bad in [(0, 5), (1, 2.5), (True,), "15"]:
            with pytest.raises(ValueError, match=r"compute_map\(\): kappas must be a sequence of positive integers"):
                compute_map(ranks, gnd, kappas=bad)
        with pytest.raises(ValueError, match=r"compute_map\(\): kappas must be a sequence of positive integers; got 5"):
            compute_map(ranks, gnd, kappas=5)

    def test_errors_subclass_builtins(self):
        with pytest.raises(ValueError, match="ranks must have shape"):
            compute_map(np.array([0]), [])
        with pytest.raises(TypeError, match="ranks must be an integer array"):
            compute_map(np.zeros((1, 1)), [])


# Query 0: ranks [3, 0, 1, 2, 4], easy {0}, hard {2}, junk {3}.
#   Easy   ok {0},    junk {3, 2}: item 0 at 1 - 1 = 0                -> AP 1;    P@1 = 1, P@5 = 1 (kq = 1).
#   Medium ok {0, 2}, junk {3}:    item 0 -> 0, item 2 -> 3 - 1 = 2    -> AP 0.5 + (1/2 + 2/3) / 4 = 19/24;
#                                  P@1 = 1, P@5 = 2/3 (kq = 3).
#   Hard   ok {2},    junk {3, 0}: item 2 -> 3 - 2 = 1                -> AP (0 + 1/2) / 2 = 1/4;
#                                  1-based [2]: P@1 = 0 (kq = 1), P@5 = 1/2 (kq = 2).
# Query 1: ranks [1, 4, 0, 2, 3], easy {1, 4}, hard {}, junk {0}.
#   Easy / Medium: positives at 0 and 1 -> AP 1, P@1 = P@5 = 1.  Hard: no positive -> NaN, skipped.
EMH_RANKS = np.array([[3, 0, 1, 2, 4], [1, 4, 0, 2, 3]])
EMH_GND = [
    {"easy": [0], "hard": [2], "junk": [3], "bbx": [10.0, 20.0, 30.0, 40.0]},
    {"easy": np.array([1, 4]), "hard": np.array([], dtype=np.int64), "junk": np.array([0])},
]


class TestEvaluateRevisited(BaseTester):
    def test_smoke(self):
        res = evaluate_revisited(EMH_RANKS, EMH_GND)
        assert set(res) == {"easy", "medium", "hard"}
        for r in res.values():
            assert set(r) == {"map", "aps", "mpr", "prs"}
            assert r["aps"].shape == (2,)
            assert r["prs"].shape == (2, 3)

    def test_hand_worked(self):
        res = evaluate_revisited(EMH_RANKS, EMH_GND, kappas=(1, 5))
        assert res["easy"]["map"] == 1.0
        np.testing.assert_array_equal(res["easy"]["mpr"], [1.0, 1.0])
        np.testing.assert_allclose(res["medium"]["aps"], [19 / 24, 1.0], rtol=0, atol=1e-15)
        assert res["medium"]["map"] == pytest.approx((19 / 24 + 1) / 2, abs=1e-15)
        np.testing.assert_allclose(res["medium"]["mpr"], [1.0, (2 / 3 + 1) / 2], rtol=0, atol=1e-15)
        assert res["hard"]["aps"][0] == 0.25
        assert math.isnan(res["hard"]["aps"][1])
        assert res["hard"]["map"] == 0.25
        np.testing.assert_array_equal(res["hard"]["mpr"], [0.0, 0.5])
        assert np.isnan(res["hard"]["prs"][1]).all()

    def test_reference(self):
        # Each setup equals compute_map on the explicitly built ok/junk sets (anchors.md 4.3), and the reference.
        rng = np.random.default_rng(99)
        for _ in range(10):
            q, db = int(rng.integers(1, 15)), int(rng.integers(5, 150))
            n = int(rng.integers(1, db + 1))
            ranks = np.stack([rng.permutation(db)[:n] for _ in range(q)])
            gnd_full = []
            for _ in range(q):
                parts = np.split(rng.permutation(db), np.sort(rng.integers(0, db // 3, 3)))
                gnd_full.append({"easy": parts[0], "hard": parts[1], "junk": parts[2]})
            res = evaluate_revisited(ranks, gnd_full)
            built = {
                "easy": [{"ok": g["easy"], "junk": np.concatenate([g["junk"], g["hard"]])} for g in gnd_full],
                "medium": [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]} for g in gnd_full],
                "hard": [{"ok": g["hard"], "junk": np.concatenate([g["junk"], g["easy"]])} for g in gnd_full],
            }
            for setup, gnd in built.items():
                r = res[setup]
                _assert_same((r["map"], r["aps"], r["mpr"], r["prs"]), reference_map(ranks, gnd))

    def test_torch_input(self):
        a = evaluate_revisited(torch.from_numpy(EMH_RANKS).int(), EMH_GND)
        b = evaluate_revisited(EMH_RANKS, EMH_GND)
        for s in b:
            np.testing.assert_array_equal(a[s]["prs"], b[s]["prs"])
            np.testing.assert_array_equal(a[s]["aps"], b[s]["aps"])

    def test_exception(self):
        with pytest.raises(ValueError, match=r"evaluate_revisited\(\): gnd_full\[1\] must have the key 'hard'"):
            evaluate_revisited(EMH_RANKS, [EMH_GND[0], {"easy": [1], "junk": []}])
        with pytest.raises(ShapeError, match=r"evaluate_revisited\(\): gnd_full must have one entry.*Q=2.*got 1"):
            evaluate_revisited(EMH_RANKS, EMH_GND[:1])
        with pytest.raises(ShapeError, match=r"evaluate_revisited\(\): ranks must have shape \(Q, N\)"):
            evaluate_revisited(EMH_RANKS[None], EMH_GND)
        with pytest.raises(DTypeError, match=r"evaluate_revisited\(\): ranks must be an integer tensor"):
            evaluate_revisited(torch.rand(2, 5), EMH_GND)
        with pytest.raises(ValueError, match=r"evaluate_revisited\(\): kappas must be a sequence"):
            evaluate_revisited(EMH_RANKS, EMH_GND, kappas=(0,))
        with pytest.raises(DTypeError, match=r"evaluate_revisited\(\): gnd_full\[0\]\['easy'\] must hold integer"):
            evaluate_revisited(EMH_RANKS, [{"easy": [0.5], "hard": [], "junk": []}, EMH_GND[1]])
