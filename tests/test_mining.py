"""Tests of hard_negatives and HardNegativeMiner against a loop reference."""

from __future__ import annotations

import pytest
import torch

import deepagg
from deepagg import functional as F
from deepagg._checks import DeviceError, DTypeError, ShapeError

from ._base import BaseTester

# --------------------------------------------------------------------------------------------------------------
# Slow, obviously-correct reference: one query at a time, Python lists.
# --------------------------------------------------------------------------------------------------------------


def ref_hard_negatives(scores, q_labels, c_labels, k, exclude=None, distinct=True) -> torch.Tensor:
    """scores (Q, N) float64 (higher = harder); labels as lists of ints (-1 = no object)."""
    rows = []
    for i in range(len(q_labels)):
        eligible = [
            j
            for j in range(len(c_labels))
            if (c_labels[j] != q_labels[i] or c_labels[j] == -1 or q_labels[i] == -1)
            and not (exclude is not None and bool(exclude[i, j]))
        ]
        eligible.sort(key=lambda j: (-float(scores[i, j]), j))  # hardest first, ties to the lower index
        chosen, seen = [], set()
        for j in eligible:
            label = c_labels[j]
            if distinct and label != -1:
                if label in seen:
                    continue
                seen.add(label)
            chosen.append(j)
        chosen = chosen[:k]
        rows.append(chosen + [-1] * (k - len(chosen)))
    return torch.tensor(rows, dtype=torch.int64).reshape(len(q_labels), k)


def make_problem(q: int, n: int, d: int = 6, n_labels: int = 5, seed: int = 0, quantize: bool = True):
    """Unit descriptors, labels in [-1, n_labels), a random exclude mask; quantised similarities give ties."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(q, d, generator=g, dtype=torch.float64), dim=-1)
    cands = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    if quantize:  # duplicated candidates: exact ties in the similarity
        cands[n // 2 :] = cands[: n - n // 2].clone()
    q_labels = torch.randint(-1, n_labels, (q,), generator=g)
    c_labels = torch.randint(-1, n_labels, (n,), generator=g)
    exclude = torch.rand(q, n, generator=g) < 0.15
    return queries, cands, q_labels, c_labels, exclude


def call(queries, cands, q_labels, c_labels, **kwargs) -> torch.Tensor:
    return F.hard_negatives(queries, cands, query_labels=q_labels, candidate_labels=c_labels, **kwargs)


class TestHardNegatives(BaseTester):
    def test_smoke(self, device: torch.device, dtype: torch.dtype) -> None:
        queries, cands, ql, cl, ex = make_problem(4, 20)
        out = call(
            queries.to(device, dtype), cands.to(device, dtype), ql.to(device), cl.to(device), exclude=ex.to(device)
        )
        assert out.shape == (4, 5)
        assert out.dtype == torch.int64
        assert out.device == queries.to(device).device

    @pytest.mark.parametrize("distinct", [True, False])
    @pytest.mark.parametrize("k", [1, 3, 7, 40])
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_reference(self, distinct: bool, k: int, seed: int) -> None:
        queries, cands, ql, cl, ex = make_problem(7, 30, seed=seed)
        sims = queries @ cands.T
        for exclude in (None, ex):
            out = call(queries, cands, ql, cl, num_negatives=k, exclude=exclude, distinct_labels=distinct)
            expected = ref_hard_negatives(sims, ql.tolist(), cl.tolist(), k, exclude, distinct)
            assert torch.equal(out, expected)

    def test_reference_scores(self) -> None:
        queries, cands, ql, cl, ex = make_problem(5, 25, seed=3)
        g = torch.Generator().manual_seed(4)
        scores = torch.randint(0, 4, (5, 25), generator=g).float()  # many ties
        out = call(queries, cands, ql, cl, num_negatives=6, exclude=ex, scores=scores)
        assert torch.equal(out, ref_hard_negatives(scores, ql.tolist(), cl.tolist(), 6, ex))
        assert not torch.equal(out, call(queries, cands, ql, cl, num_negatives=6, exclude=ex))

    def test_properties(self) -> None:
        queries, cands, ql, cl, ex = make_problem(12, 60, n_labels=8, seed=5, quantize=False)
        out = call(queries.float(), cands.float(), ql, cl, num_negatives=6, exclude=ex)
        sims = queries @ cands.T
        for i in range(12):
            row = [j for j in out[i].tolist() if j >= 0]
            assert out[i].tolist() == row + [-1] * (6 - len(row))  # padding only at the end
            values = [float(sims[i, j]) for j in row]
            assert values == sorted(values, reverse=True)  # hardest first
            for j in row:
                assert not ex[i, j]  # never an excluded (positive / junk) candidate
                assert cl[j] == -1 or ql[i] == -1 or cl[j] != ql[i]  # another object
            labels = [int(cl[j]) for j in row if cl[j] != -1]
            assert len(labels) == len(set(labels))  # one per label
            # Nothing eligible was skipped that is harder than the last one picked of a new label.
            if len(row) == 6:
                others = [
                    j
                    for j in range(60)
                    if j not in row and not ex[i, j] and (cl[j] == -1 or ql[i] == -1 or cl[j] != ql[i])
                ]
                new_label = [j for j in others if cl[j] == -1 or int(cl[j]) not in labels]
                assert all(float(sims[i, j]) <= values[-1] for j in new_label)

    def test_distinct_labels_and_distractors(self) -> None:
        queries = torch.tensor([[1.0, 0.0]])
        # Similarities 0.9, 0.8, 0.7, 0.6, 0.5 to the query.
        cands = torch.tensor([[0.9, 0.0], [0.8, 0.0], [0.7, 0.0], [0.6, 0.0], [0.5, 0.0]])
        ql = torch.tensor([0])
        cl = torch.tensor([3, 3, -1, -1, 4])
        assert call(queries, cands, ql, cl, num_negatives=5).tolist() == [[0, 2, 3, 4, -1]]
        assert call(queries, cands, ql, cl, num_negatives=5, distinct_labels=False).tolist() == [[0, 1, 2, 3, 4]]
        # An excluded hardest candidate of label 3 lets the next one of label 3 in.
        ex = torch.tensor([[True, False, False, False, False]])
        assert call(queries, cands, ql, cl, num_negatives=5, exclude=ex).tolist() == [[1, 2, 3, 4, -1]]
        # Candidates of the query's own object are never negatives; a -1 query has no object to avoid.
        assert call(queries, cands, torch.tensor([3]), cl, num_negatives=5).tolist() == [[2, 3, 4, -1, -1]]
        assert call(queries, cands, torch.tensor([-1]), cl, num_negatives=5).tolist() == [[0, 2, 3, 4, -1]]
        assert call(queries, cands, torch.tensor([-1]), cl, num_negatives=2).tolist() == [[0, 2]]

    def test_large_label_ids(self) -> None:
        queries, cands, _, _, ex = make_problem(6, 40, seed=6)
        g = torch.Generator().manual_seed(7)
        ql = torch.randint(0, 4, (6,), generator=g)
        cl = torch.randint(0, 4, (40,), generator=g)
        cl[::7] = -1
        big = torch.tensor([10**12, 7, 123456789, 3])
        out = call(
            queries,
            cands,
            torch.where(ql >= 0, big[ql], ql),
            torch.where(cl >= 0, big[cl.clamp(min=0)], cl),
            exclude=ex,
        )
        assert torch.equal(out, call(queries, cands, ql, cl, exclude=ex))
        assert torch.equal(out, call(queries, cands, ql.int(), cl.to(torch.int16), exclude=ex))

    def test_ties_to_lower_index(self) -> None:
        queries = torch.tensor([[1.0, 0.0]])
        cands = torch.tensor([[0.5, 0.1], [0.7, 0.0], [0.5, 0.2], [0.7, 0.3], [0.5, 0.0]])  # sims .5 .7 .5 .7 .5
        cl = torch.arange(5)
        assert call(queries, cands, torch.tensor([9]), cl, num_negatives=5).tolist() == [[1, 3, 0, 2, 4]]
        # With distinct labels the tie-break picks which one of a label is kept: the lower index.
        cl2 = torch.tensor([0, 1, 0, 1, 0])
        assert call(queries, cands, torch.tensor([9]), cl2, num_negatives=5).tolist() == [[1, 0, -1, -1, -1]]

    def test_nan_and_inf_scores(self) -> None:
        queries = torch.tensor([[1.0, 0.0]])
        cands = torch.tensor([[0.5, 0.0], [float("nan"), 0.0], [-1.0, 0.0], [0.2, 0.0]])
        # NaN counts as -inf: after every finite similarity, tied with -inf by index.
        assert call(queries, cands, torch.tensor([9]), torch.arange(4), num_negatives=4).tolist() == [[0, 3, 2, 1]]
        scores = torch.tensor([[float("-inf"), float("nan"), float("inf"), 0.0]])
        out = call(queries, cands, torch.tensor([9]), torch.arange(4), num_negatives=4, scores=scores)
        assert out.tolist() == [[2, 3, 0, 1]]

    def test_padding_when_too_few(self) -> None:
        queries, cands, _, _, _ = make_problem(3, 6, seed=8)
        cl = torch.tensor([0, 0, 1, 1, 2, -1])
        ql = torch.tensor([0, 1, 5])
        out = call(queries, cands, ql, cl, num_negatives=4)
        assert (out[0] >= 0).sum() == 3  # labels 1, 2 and the distractor
        assert (out[1] >= 0).sum() == 3
        assert (out[2] >= 0).sum() == 4
        everything = torch.ones(3, 6, dtype=torch.bool)
        assert torch.equal(call(queries, cands, ql, cl, num_negatives=4, exclude=everything), torch.full((3, 4), -1))
        same = torch.zeros(6, dtype=torch.int64)
        assert torch.equal(
            call(queries, cands, torch.zeros(3, dtype=torch.int64), same, num_negatives=2), torch.full((3, 2), -1)
        )

    @pytest.mark.parametrize(("q", "n"), [(0, 5), (3, 0), (0, 0)])
    def test_cardinality(self, q: int, n: int) -> None:
        queries, cands, ql, cl, _ = make_problem(max(q, 1), max(n, 1), seed=9)
        out = call(queries[:q], cands[:n], ql[:q], cl[:n], num_negatives=3)
        assert torch.equal(out, torch.full((q, 3), -1, dtype=torch.int64))
        miner = deepagg.HardNegativeMiner(num_negatives=3, pool_size=2, strategy="random")
        assert torch.equal(miner(queries[:q], cands[:n], ql[:q], cl[:n]), torch.full((q, 3), -1, dtype=torch.int64))

    def test_no_grad(self) -> None:
        queries, cands, ql, cl, _ = make_problem(4, 10, seed=10)
        queries.requires_grad_()
        out = call(queries, cands, ql, cl)
        assert not out.requires_grad
        assert out.grad_fn is None

    def test_noncontiguous(self) -> None:
        # No duplicated candidates: a matmul on another memory layout may round equal rows differently.
        queries, cands, ql, cl, ex = make_problem(5, 20, seed=11, quantize=False)
        qt, ct = self.noncontiguous(queries), self.noncontiguous(cands)
        ext = ex.T.contiguous().T
        assert not qt.is_contiguous()
        assert not ext.is_contiguous()
        assert torch.equal(call(qt, ct, ql, cl, exclude=ext), call(queries, cands, ql, cl, exclude=ex))

    def test_compile(self) -> None:
        queries, cands, ql, cl, ex = make_problem(5, 20, seed=12)

        def mine(a, b, x, y, e):
            return F.hard_negatives(a, b, query_labels=x, candidate_labels=y, num_negatives=4, exclude=e)

        compiled = torch.compile(mine, backend="eager", fullgraph=True)
        assert torch.equal(compiled(queries, cands, ql, cl, ex), mine(queries, cands, ql, cl, ex))

    def test_exception(self) -> None:
        queries, cands, ql, cl, ex = make_problem(3, 8, seed=13)
        for bad in (0, -2):
            with pytest.raises(ValueError, match=rf"hard_negatives\(\): num_negatives must be >= 1; got {bad}\."):
                call(queries, cands, ql, cl, num_negatives=bad)
        for bad, shown in ((2.0, "float 2.0"), (True, "True")):
            with pytest.raises(
                TypeError, match=rf"hard_negatives\(\): num_negatives must be an int >= 1; got {shown}\."
            ):
                call(queries, cands, ql, cl, num_negatives=bad)
        with pytest.raises(
            TypeError, match=r"hard_negatives\(\): queries must be a torch.Tensor of shape \(Q, D\); got"
        ):
            call(queries.tolist(), cands, ql, cl)
        with pytest.raises(
            ShapeError, match=r"hard_negatives\(\): queries must have shape \(Q, D\); got \(6\) with 1 dims"
        ):
            call(queries[0], cands, ql, cl)
        with pytest.raises(
            ShapeError, match=r"hard_negatives\(\): candidates must have shape \(N, D\) with D=6; got \(8, 5\)\. Pass"
        ):
            call(queries, cands[:, :5], ql, cl)
        with pytest.raises(
            ShapeError, match=r"hard_negatives\(\): query_labels must have shape \(Q\) with Q=3; got \(2\)"
        ):
            call(queries, cands, ql[:2], cl)
        with pytest.raises(
            ShapeError, match=r"hard_negatives\(\): candidate_labels must have shape \(N\) with N=8; got \(7\)\. One id"
        ):
            call(queries, cands, ql, cl[:7])
        with pytest.raises(
            ShapeError, match=r"hard_negatives\(\): candidate_labels must have shape \(N\); got \(8, 1\)"
        ):
            call(queries, cands, ql, cl[:, None])
        with pytest.raises(
            DTypeError,
            match=r"hard_negatives\(\): query_labels must have dtype in \[torch.int64, .*\]; got torch.float32",
        ):
            call(queries, cands, ql.float(), cl)
        with pytest.raises(
            DTypeError, match=r"hard_negatives\(\): candidate_labels must have dtype in .*; got torch.bool"
        ):
            call(queries, cands, ql, cl.bool())
        with pytest.raises(
            DTypeError, match=r"hard_negatives\(\): queries must be a floating-point tensor; got dtype torch.int64"
        ):
            call(queries.long(), cands, ql, cl)
        with pytest.raises(DTypeError, match=r"hard_negatives\(\): candidates must be a floating-point tensor"):
            call(queries, cands.long(), ql, cl)
        with pytest.raises(
            ShapeError, match=r"hard_negatives\(\): exclude must have shape \(Q, N\) with N=8; got \(3, 7\)"
        ):
            call(queries, cands, ql, cl, exclude=ex[:, :7])
        with pytest.raises(
            DTypeError, match=r"hard_negatives\(\): exclude must have dtype in \[torch.bool\]; got torch.int64"
        ):
            call(queries, cands, ql, cl, exclude=ex.long())
        with pytest.raises(
            ShapeError, match=r"hard_negatives\(\): scores must have shape \(Q, N\) with Q=3; got \(8, 3\)"
        ):
            call(queries, cands, ql, cl, scores=torch.zeros(8, 3))
        with pytest.raises(
            DTypeError, match=r"hard_negatives\(\): scores must be a floating-point tensor; got dtype torch.int64"
        ):
            call(queries, cands, ql, cl, scores=torch.zeros(3, 8, dtype=torch.int64))
        with pytest.raises(
            DeviceError, match=r"hard_negatives\(\): candidates must be on the same device as queries \(cpu\)"
        ):
            call(queries, cands.to("meta"), ql, cl)
        with pytest.raises(DeviceError, match=r"hard_negatives\(\): exclude must be on the same device as queries"):
            call(queries, cands, ql, cl, exclude=ex.to("meta"))


def replay_pool(n: int, pool_size: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:pool_size].sort().values


class TestHardNegativeMiner(BaseTester):
    def test_module_matches_functional(self) -> None:
        queries, cands, ql, cl, ex = make_problem(6, 30, seed=20)
        for distinct in (True, False):
            miner = deepagg.HardNegativeMiner(num_negatives=4, distinct_labels=distinct)
            expected = call(queries, cands, ql, cl, num_negatives=4, exclude=ex, distinct_labels=distinct)
            assert torch.equal(miner(queries, cands, ql, cl, ex), expected)
        assert list(deepagg.HardNegativeMiner().parameters()) == []
        assert list(deepagg.HardNegativeMiner().buffers()) == []

    def test_pool(self) -> None:
        queries, cands, ql, cl, ex = make_problem(6, 40, seed=21, quantize=False)
        miner = deepagg.HardNegativeMiner(num_negatives=5, pool_size=12)
        out = miner(queries, cands, ql, cl, ex, generator=torch.Generator().manual_seed(3))
        pool = replay_pool(40, 12, 3)
        # Only pool members, indexed in the full candidate set.
        assert set(out[out >= 0].tolist()) <= set(pool.tolist())
        # Equal to mining the pool alone, mapped back.
        sub = call(queries, cands[pool], ql, cl[pool], num_negatives=5, exclude=ex[:, pool])
        assert torch.equal(out, torch.where(sub >= 0, pool[sub.clamp(min=0)], sub))
        # And to the reference with everything outside the pool excluded.
        outside = torch.ones(40, dtype=torch.bool)
        outside[pool] = False
        expected = ref_hard_negatives(queries @ cands.T, ql.tolist(), cl.tolist(), 5, ex | outside[None])
        assert torch.equal(out, expected)
        # Reproducible with a seeded generator; another seed draws another pool.
        again = miner(queries, cands, ql, cl, ex, generator=torch.Generator().manual_seed(3))
        assert torch.equal(out, again)
        other = miner(queries, cands, ql, cl, ex, generator=torch.Generator().manual_seed(4))
        assert not torch.equal(out, other)
        # A pool at least as large as the candidate set is the whole set (no draw).
        full = call(queries, cands, ql, cl, num_negatives=5, exclude=ex)
        for size in (40, 100):
            m = deepagg.HardNegativeMiner(num_negatives=5, pool_size=size)
            assert torch.equal(m(queries, cands, ql, cl, ex), full)

    def test_random_strategy(self) -> None:
        queries, cands, ql, cl, ex = make_problem(8, 40, n_labels=6, seed=22)
        miner = deepagg.HardNegativeMiner(num_negatives=4, strategy="random")
        out = miner(queries, cands, ql, cl, ex, generator=torch.Generator().manual_seed(5))
        # The same draws, replayed: torch.rand (Q, N) in float64 with the generator.
        scores = torch.rand(8, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        assert torch.equal(out, ref_hard_negatives(scores, ql.tolist(), cl.tolist(), 4, ex))
        assert torch.equal(out, miner(queries, cands, ql, cl, ex, generator=torch.Generator().manual_seed(5)))
        assert not torch.equal(out, deepagg.HardNegativeMiner(num_negatives=4)(queries, cands, ql, cl, ex))
        for i in range(8):
            row = [j for j in out[i].tolist() if j >= 0]
            assert all(not ex[i, j] and (cl[j] == -1 or ql[i] == -1 or cl[j] != ql[i]) for j in row)
            labels = [int(cl[j]) for j in row if cl[j] != -1]
            assert len(labels) == len(set(labels))
        # Pool and random scores together: the pool is drawn first, then the scores over the pool.
        both = deepagg.HardNegativeMiner(num_negatives=4, pool_size=15, strategy="random", distinct_labels=False)
        g = torch.Generator().manual_seed(6)
        out = both(queries, cands, ql, cl, ex, generator=g)
        g = torch.Generator().manual_seed(6)
        pool = torch.randperm(40, generator=g)[:15].sort().values
        scores = torch.rand(8, 15, generator=g, dtype=torch.float64)
        sub = ref_hard_negatives(scores, ql.tolist(), cl[pool].tolist(), 4, ex[:, pool], distinct=False)
        assert torch.equal(out, torch.where(sub >= 0, pool[sub.clamp(min=0)], sub))

    def test_repr(self) -> None:
        assert repr(deepagg.HardNegativeMiner()) == (
            "HardNegativeMiner(num_negatives=5, pool_size=None, distinct_labels=True, strategy='hardest')"
        )
        m = deepagg.HardNegativeMiner(num_negatives=2, pool_size=100, distinct_labels=False, strategy="random")
        assert repr(m) == "HardNegativeMiner(num_negatives=2, pool_size=100, distinct_labels=False, strategy='random')"

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match=r"HardNegativeMiner\(\): num_negatives must be >= 1; got 0\."):
            deepagg.HardNegativeMiner(num_negatives=0)
        with pytest.raises(
            TypeError, match=r"HardNegativeMiner\(\): num_negatives must be an int >= 1; got float 5\.0\."
        ):
            deepagg.HardNegativeMiner(num_negatives=5.0)
        with pytest.raises(ValueError, match=r"HardNegativeMiner\(\): pool_size must be >= 1; got 0\."):
            deepagg.HardNegativeMiner(pool_size=0)
        with pytest.raises(TypeError, match=r"HardNegativeMiner\(\): pool_size must be an int >= 1; got str '10'\."):
            deepagg.HardNegativeMiner(pool_size="10")
        with pytest.raises(TypeError, match=r"HardNegativeMiner\(\): distinct_labels must be a bool; got int\."):
            deepagg.HardNegativeMiner(distinct_labels=1)
        with pytest.raises(
            ValueError, match=r"HardNegativeMiner\(\): strategy must be 'hardest' or 'random'; got 'semi'\."
        ):
            deepagg.HardNegativeMiner(strategy="semi")
        queries, cands, ql, cl, ex = make_problem(3, 8, seed=23)
        miner = deepagg.HardNegativeMiner(pool_size=4)
        with pytest.raises(
            ValueError,
            match=r"HardNegativeMiner.forward\(\): generator must be a CPU torch.Generator or None; got int\.",
        ):
            miner(queries, cands, ql, cl, generator=0)
        with pytest.raises(
            ShapeError,
            match=r"HardNegativeMiner.forward\(\): candidate_labels must have shape \(N\) with N=8; got \(5\)",
        ):
            miner(queries, cands, ql, cl[:5])
        with pytest.raises(
            ShapeError, match=r"HardNegativeMiner.forward\(\): exclude must have shape \(Q, N\) with Q=3"
        ):
            miner(queries, cands, ql, cl, ex[:2])
