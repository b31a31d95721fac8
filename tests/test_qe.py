"""Tests of query_expansion / QueryExpansion (AQE, alpha-QE) and dba / DBA."""

from __future__ import annotations

import math

import pytest
import torch

import deepagg
from deepagg import functional as F
from deepagg._checks import DeviceError, DTypeError, ShapeError
from deepagg.functional.qe import _topk_lower_index

from ._base import BaseTester


def unit_rows(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.l2n(torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)


def _weight(sim: float, alpha: float) -> float:
    if alpha == 0.0:
        return 1.0
    return max(sim, 0.0) ** alpha


def ref_expand(q: torch.Tensor, db: torch.Tensor, k: int, alpha: float, exclude_self: bool = False) -> torch.Tensor:
    """Per-row loop in float64: sort by (-similarity, index), sum the first k with weights, normalise."""
    qs, dbs = q.double().tolist(), db.double().tolist()
    out = []
    for i, row in enumerate(qs):
        cands = [
            (sum(a * b for a, b in zip(row, x, strict=True)), j)
            for j, x in enumerate(dbs)
            if not (exclude_self and j == i)
        ]
        cands.sort(key=lambda t: (-t[0], t[1]))
        acc = list(row)
        for sim, j in cands[:k]:
            w = _weight(sim, alpha)
            acc = [a + w * b for a, b in zip(acc, dbs[j], strict=True)]
        norm = max(math.sqrt(sum(a * a for a in acc)), 1e-6)
        out.append([a / norm for a in acc])
    return torch.tensor(out, dtype=torch.float64).reshape(q.shape)


def separated(q_n: int, db_n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and a database whose similarity gaps are large (no ranking change under gradcheck's eps)."""
    db = unit_rows(db_n, d, seed)
    q = F.l2n(db[:q_n] + 0.3 * unit_rows(q_n, d, seed + 1))
    return q, db


class TestQueryExpansion(BaseTester):
    def test_smoke(self) -> None:
        q, db = unit_rows(3, 16, 1, torch.float32), unit_rows(40, 16, 2, torch.float32)
        out = F.query_expansion(q, db)
        assert out.shape == (3, 16)
        self.assert_close(out.norm(dim=1), torch.ones(3))
        assert repr(deepagg.QueryExpansion()) == "QueryExpansion(k=10, alpha=0.0)"
        assert repr(deepagg.QueryExpansion(k=5, alpha=3)) == "QueryExpansion(k=5, alpha=3.0)"

    @pytest.mark.parametrize("n_q", [0, 1, 2])
    @pytest.mark.parametrize("n_db", [0, 1, 2, 7])
    def test_cardinality(self, n_q: int, n_db: int, device: torch.device, dtype: torch.dtype) -> None:
        q = unit_rows(n_q, 5, 1, dtype).to(device)
        db = unit_rows(n_db, 5, 2, dtype).to(device)
        for alpha in (0.0, 3.0):
            out = F.query_expansion(q, db, k=3, alpha=alpha)
            assert out.shape == (n_q, 5)
            assert out.dtype == dtype
            assert deepagg.QueryExpansion(k=3, alpha=alpha)(q, db).shape == (n_q, 5)

    @pytest.mark.parametrize("k", [0, 1, 3, 10, 25])
    @pytest.mark.parametrize("alpha", [0.0, 0.5, 3.0])
    def test_reference(self, k: int, alpha: float) -> None:
        q, db = unit_rows(6, 8, 3), unit_rows(20, 8, 4)
        self.assert_close(F.query_expansion(q, db, k=k, alpha=alpha), ref_expand(q, db, k, alpha))

    def test_ties_go_to_lower_index(self) -> None:
        # Rows 1, 2, 4 have exactly the same similarity 0.6 to q; k = 2 takes row 0 (0.8) and row 1.
        q = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
        db = torch.tensor(
            [
                [0.8, 0.6, 0.0, 0.0],
                [0.6, 0.8, 0.0, 0.0],
                [0.6, 0.0, 0.8, 0.0],
                [0.0, 0.0, 0.0, 1.0],
                [0.6, 0.0, 0.0, 0.8],
            ],
            dtype=torch.float64,
        )
        for k in (2, 3):
            expected = F.l2n(q + db[[0, 1, 2][:k]].sum(0, keepdim=True))
            self.assert_close(F.query_expansion(q, db, k=k), expected)
            self.assert_close(F.query_expansion(q, db, k=k), ref_expand(q, db, k, 0.0))
        # The same rows in the reverse order: the tie now goes to what was row 4.
        rev = db.flip(0)
        self.assert_close(F.query_expansion(q, rev, k=2), F.l2n(q + db[[0, 4]].sum(0, keepdim=True)))

    def test_tie_rule_many_ties(self) -> None:
        # Integer-valued similarities (exact, many ties, some -inf): the selected set equals the first k of a
        # stable descending sort, i.e. ties at the k-th value go to the lowest indices.
        g = torch.Generator().manual_seed(0)
        sim = torch.randint(0, 4, (40, 25), generator=g).double()
        sim[:, 3] = float("-inf")
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices
        for k in range(1, 25):
            got = _topk_lower_index(sim, k).sort(dim=1).values
            assert torch.equal(got, order[:, :k].sort(dim=1).values), k

    def test_alpha_semantics(self) -> None:
        q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        db = torch.tensor([[0.6, 0.8], [-0.6, 0.8], [-1.0, 0.0]], dtype=torch.float64)
        # alpha-QE: negative similarities get weight 0, positive ones sim^alpha.
        self.assert_close(F.query_expansion(q, db, k=3, alpha=2.0), F.l2n(q + 0.36 * db[:1]))
        # AQE: unit weights for every selected neighbour, whatever its sign.
        self.assert_close(F.query_expansion(q, db, k=3), F.l2n(q + db.sum(0, keepdim=True)))
        # k = 0, or an empty database: normalisation only.
        self.assert_close(F.query_expansion(2 * q, db, k=0), q)
        self.assert_close(F.query_expansion(2 * q, db[:0], k=5), q)
        # k is capped at N.
        self.assert_close(F.query_expansion(q, db, k=100, alpha=1.0), F.query_expansion(q, db, k=3, alpha=1.0))

    def test_module_matches_functional(self) -> None:
        q, db = unit_rows(4, 8, 5, torch.float32), unit_rows(30, 8, 6, torch.float32)
        self.assert_close(deepagg.QueryExpansion(k=4, alpha=3.0)(q, db), F.query_expansion(q, db, k=4, alpha=3.0))
        self.assert_close(deepagg.QueryExpansion()(q, db), F.query_expansion(q, db))

    @pytest.mark.parametrize("alpha", [0.0, 0.5, 3.0])
    def test_gradcheck(self, alpha: float) -> None:
        q, db = separated(2, 6, 4)
        q.requires_grad_()
        db.requires_grad_()
        assert self.gradcheck(lambda a, b: F.query_expansion(a, b, k=3, alpha=alpha), (q, db))

    def test_compile(self) -> None:
        q, db = unit_rows(3, 8, 7, torch.float32), unit_rows(25, 8, 8, torch.float32)
        mod = deepagg.QueryExpansion(k=5, alpha=3.0)
        self.assert_close(torch.compile(mod, backend="eager", fullgraph=True)(q, db), mod(q, db))
        # Dynamic shapes (symbolic N and alpha) trace too.
        dyn = torch.compile(mod, backend="eager", fullgraph=True, dynamic=True)
        for n in (25, 12):
            self.assert_close(dyn(q, db[:n]), mod(q, db[:n]))

    def test_noncontiguous(self) -> None:
        q, db = unit_rows(4, 6, 9), unit_rows(15, 6, 10)
        qn, dbn = self.noncontiguous(q), self.noncontiguous(db)
        assert not qn.is_contiguous()
        assert not dbn.is_contiguous()
        self.assert_close(F.query_expansion(qn, dbn, k=4, alpha=3.0), F.query_expansion(q, db, k=4, alpha=3.0))

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
    def test_dtype_preserved(self, dt: torch.dtype) -> None:
        q, db = unit_rows(3, 8, 11), unit_rows(20, 8, 12)
        out = F.query_expansion(q.to(dt), db.to(dt), k=4, alpha=3.0)
        assert out.dtype == dt
        assert F.query_expansion(q.to(dt), db.to(dt), k=0).dtype == dt
        tol = 1e-2 if dt in (torch.float16, torch.bfloat16) else 1e-5
        self.assert_close(out.double(), F.query_expansion(q, db, k=4, alpha=3.0), rtol=tol, atol=tol)

    def test_exception(self) -> None:
        q, db = unit_rows(2, 4), unit_rows(5, 4)
        with pytest.raises(ShapeError, match=r"query_expansion\(\): q must have shape \(Q, D\); got \(4\) with 1"):
            F.query_expansion(q[0], db)
        with pytest.raises(ShapeError, match=r"expansion\(\): db must have shape \(N, D\) with D=4; got \(5, 3\)"):
            F.query_expansion(q, db[:, :3])
        with pytest.raises(DTypeError, match=r"query_expansion\(\): q must be a floating-point tensor"):
            F.query_expansion(q.long(), db)
        with pytest.raises(DTypeError, match=r"query_expansion\(\): db must be a floating-point tensor"):
            F.query_expansion(q, db.long())
        with pytest.raises(DeviceError, match=r"query_expansion\(\): db must be on the same device as q"):
            F.query_expansion(q, db.to("meta"))
        with pytest.raises(ValueError, match=r"query_expansion\(\): k must be >= 0; got -1"):
            F.query_expansion(q, db, k=-1)
        with pytest.raises(TypeError, match=r"query_expansion\(\): k must be an int >= 0; got float 2.5"):
            F.query_expansion(q, db, k=2.5)
        with pytest.raises(TypeError, match=r"query_expansion\(\): k must be an int >= 0; got True"):
            F.query_expansion(q, db, k=True)
        with pytest.raises(ValueError, match=r"query_expansion\(\): alpha must be a finite float >= 0.*got -1.0"):
            F.query_expansion(q, db, alpha=-1.0)
        with pytest.raises(ValueError, match=r"query_expansion\(\): alpha must be a finite float >= 0.*got inf"):
            F.query_expansion(q, db, alpha=float("inf"))
        with pytest.raises(TypeError, match=r"query_expansion\(\): alpha must be a float >= 0; got str '3'"):
            F.query_expansion(q, db, alpha="3")
        with pytest.raises(ValueError, match=r"QueryExpansion\(\): k must be >= 0; got -2"):
            deepagg.QueryExpansion(k=-2)
        with pytest.raises(ValueError, match=r"QueryExpansion\(\): k must be an int >= 0; got float 1.5"):
            deepagg.QueryExpansion(k=1.5)
        with pytest.raises(ValueError, match=r"QueryExpansion\(\): alpha must be a finite float >= 0.*got nan"):
            deepagg.QueryExpansion(alpha=float("nan"))
        with pytest.raises(ValueError, match=r"QueryExpansion\(\): alpha must be a float >= 0; got NoneType None"):
            deepagg.QueryExpansion(alpha=None)


class TestDBA(BaseTester):
    def test_smoke(self) -> None:
        db = unit_rows(30, 16, 1, torch.float32)
        out = F.dba(db)
        assert out.shape == (30, 16)
        self.assert_close(out.norm(dim=1), torch.ones(30))
        assert repr(deepagg.DBA(k=3, alpha=3.0)) == "DBA(k=3, alpha=3.0)"

    @pytest.mark.parametrize("n", [0, 1, 2, 3])
    def test_cardinality(self, n: int, device: torch.device, dtype: torch.dtype) -> None:
        db = unit_rows(n, 5, 2, dtype).to(device)
        for alpha in (0.0, 3.0):
            out = F.dba(db, k=2, alpha=alpha)
            assert out.shape == (n, 5)
            assert out.dtype == dtype
            assert deepagg.DBA(k=2, alpha=alpha)(db).shape == (n, 5)

    @pytest.mark.parametrize("k", [0, 1, 3, 10, 30])
    @pytest.mark.parametrize("alpha", [0.0, 0.5, 3.0])
    def test_reference(self, k: int, alpha: float) -> None:
        db = unit_rows(12, 6, 3)
        self.assert_close(F.dba(db, k=k, alpha=alpha), ref_expand(db, db, k, alpha, exclude_self=True))

    def test_self_excluded_and_ties(self) -> None:
        # Row 2 duplicates row 0: for row 0 (and row 2) the duplicate, not the row itself, is the top neighbour.
        db = torch.tensor(
            [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [1.0, 0.0, 0.0], [0.6, 0.0, 0.8], [0.0, 0.0, 1.0]],
            dtype=torch.float64,
        )
        out = F.dba(db, k=2)
        # Row 0: neighbours {2 (sim 1), 1 (0.6, tie with 3 goes to the lower index)}.
        self.assert_close(out[0], F.l2n(db[0] + db[2] + db[1], dim=0))
        self.assert_close(out[2], F.l2n(db[2] + db[0] + db[1], dim=0))
        self.assert_close(out, ref_expand(db, db, 2, 0.0, exclude_self=True))
        # k = 1 with a unique row and no duplicate: its nearest other row only.
        self.assert_close(F.dba(db, k=1)[4], F.l2n(db[4] + db[3], dim=0))

    def test_caps(self) -> None:
        db = unit_rows(6, 4, 4)
        self.assert_close(F.dba(db, k=50), F.dba(db, k=5))
        self.assert_close(F.dba(3 * db, k=0), db)
        self.assert_close(F.dba(3 * db[:1], k=4), db[:1])  # N = 1: nobody else

    def test_module_matches_functional(self) -> None:
        db = unit_rows(25, 8, 5, torch.float32)
        self.assert_close(deepagg.DBA(k=4, alpha=3.0)(db), F.dba(db, k=4, alpha=3.0))
        self.assert_close(deepagg.DBA()(db), F.dba(db))

    @pytest.mark.parametrize("alpha", [0.0, 3.0])
    def test_gradcheck(self, alpha: float) -> None:
        # Two tight, well-separated clusters of three: each row's 2 neighbours are its cluster mates.
        centres = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
        noise = torch.tensor(
            [[0.1, 0.2, 0.0, 0.05], [0.0, -0.2, 0.1, 0.1], [-0.1, 0.1, 0.05, -0.2]], dtype=torch.float64
        )
        db = F.l2n(torch.cat([centres[0] + noise, centres[1] + noise.roll(1, dims=1)])).requires_grad_()
        assert self.gradcheck(lambda x: F.dba(x, k=2, alpha=alpha), (db,))

    def test_compile(self) -> None:
        db = unit_rows(20, 8, 8, torch.float32)
        mod = deepagg.DBA(k=4, alpha=3.0)
        self.assert_close(torch.compile(mod, backend="eager", fullgraph=True)(db), mod(db))

    def test_noncontiguous(self) -> None:
        db = unit_rows(15, 6, 10)
        dbn = self.noncontiguous(db)
        assert not dbn.is_contiguous()
        self.assert_close(F.dba(dbn, k=4, alpha=3.0), F.dba(db, k=4, alpha=3.0))

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
    def test_dtype_preserved(self, dt: torch.dtype) -> None:
        db = unit_rows(20, 8, 12)
        out = F.dba(db.to(dt), k=4)
        assert out.dtype == dt
        assert F.dba(db.to(dt), k=0).dtype == dt
        tol = 1e-2 if dt in (torch.float16, torch.bfloat16) else 1e-5
        self.assert_close(out.double(), F.dba(db, k=4), rtol=tol, atol=tol)

    def test_exception(self) -> None:
        db = unit_rows(5, 4)
        with pytest.raises(ShapeError, match=r"dba\(\): db must have shape \(N, D\); got \(5, 4, 1\) with 3 dims"):
            F.dba(db[..., None])
        with pytest.raises(DTypeError, match=r"dba\(\): db must be a floating-point tensor; got dtype torch.int64"):
            F.dba(db.long())
        with pytest.raises(ValueError, match=r"dba\(\): k must be >= 0; got -3"):
            F.dba(db, k=-3)
        with pytest.raises(TypeError, match=r"dba\(\): k must be an int >= 0; got NoneType None"):
            F.dba(db, k=None)
        with pytest.raises(ValueError, match=r"dba\(\): alpha must be a finite float >= 0.*got -0.5"):
            F.dba(db, alpha=-0.5)
        with pytest.raises(ValueError, match=r"DBA\(\): k must be >= 0; got -1"):
            deepagg.DBA(k=-1)
        with pytest.raises(ValueError, match=r"DBA\(\): alpha must be a finite float >= 0.*got -2.0"):
            deepagg.DBA(alpha=-2.0)
