"""Tests of diffusion on a mutual k-NN graph (Iscen et al., CVPR 2017, ``regional-diffusion-cg.txt``).

Every expectation comes from the maths (eqs. 1-8, 13-14 and section 4.4 of the paper, design.md 3.1-3.2), written
below as slow float64 references: Python loops over a dense similarity matrix for the graph and the query seeds
(``NN_k(i)`` by a stable sort over ``j != i``, ties to the lower index), a dense ``torch.linalg.solve`` of
``(I - alpha D^-1/2 A D^-1/2) f = y`` for the diffusion, and an unbatched solve per image for the GMP weights.
"""

from __future__ import annotations

import math

import pytest
import torch

from deepagg._checks import DTypeError, ShapeError
from deepagg.functional import diffusion
from deepagg.functional.diffusion import (
    DiffusionOperator,
    cg_columns,
    diffusion_scores,
    gmp_weights,
    knn_lists,
    mutual_knn_affinity,
    normalized_affinity,
    query_seeds,
)

from ._base import BaseTester
from .test_solvers import ref_pcg

F64 = torch.float64

# --------------------------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------------------------


def unit_rows(n: int, d: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


def integer_rows(n: int, d: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """Small integer coordinates: every inner product is exact in any order, with many exact ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 3, (n, d), generator=g).to(dtype)


def random_graph(n: int, density: float, seed: int, isolated: tuple[int, ...] = ()) -> torch.Tensor:
    """A dense symmetric non-negative affinity with a zero diagonal; the nodes in ``isolated`` have no edge."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, n, generator=g, dtype=F64)
    keep = torch.rand(n, n, generator=g) < density
    a = torch.triu(torch.where(keep, w, 0.0), diagonal=1)
    a = a + a.T
    for i in isolated:
        a[i, :] = 0.0
        a[:, i] = 0.0
    return a


def random_seeds(n: int, q: int, per_column: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, q, dtype=F64)
    for j in range(q):
        rows = torch.randperm(n, generator=g)[:per_column]
        y[rows, j] = torch.rand(per_column, generator=g, dtype=F64) + 0.1
    return y


# --------------------------------------------------------------------------------------------------------------
# References (float64, loops).
# --------------------------------------------------------------------------------------------------------------


def assert_same_lists(sims: torch.Tensor, idx: torch.Tensor, s: torch.Tensor, k: int, exclude_self: bool) -> None:
    """Tie-aware comparison of k-NN lists with the reference (faiss ``check_ref_knn_with_draws``).

    The selected *set* must be the reference's (ties at the k-th value to the lower index) and the list must be
    sorted best first; the order among exactly equal similarities inside the list is not part of the contract.
    """
    for i in range(idx.shape[0]):
        ref = ref_neighbours(s, i, k, exclude_self)
        assert sorted(idx[i].tolist()) == sorted(ref), i
        assert s[i, idx[i]].tolist() == s[i, ref].tolist(), i  # same similarities in the same (descending) order
    torch.testing.assert_close(sims.double(), s.gather(1, idx), rtol=1e-5, atol=1e-6)


def ref_neighbours(s: torch.Tensor, i: int, k: int, exclude_self: bool = True) -> list[int]:
    """The k largest entries of row ``i`` of ``s`` (j != i), ties to the lower index (stable order)."""
    row = s[i].tolist()
    cands = [j for j in range(len(row)) if not (exclude_self and j == i)]
    cands.sort(key=lambda j: (-row[j], j))
    return cands[:k]


def ref_affinity(x: torch.Tensor, k: int, gamma: float) -> torch.Tensor:
    """Dense eqs. 1, 5, 6: ``max(min(s_ij, s_ji), 0)^gamma`` for mutual k-NN, zero elsewhere and on the diagonal."""
    rows = x.double().tolist()
    n = len(rows)
    s = torch.tensor([[math.fsum(u * v for u, v in zip(ri, rj, strict=True)) for rj in rows] for ri in rows], dtype=F64)
    nn = [set(ref_neighbours(s, i, k)) for i in range(n)]
    sl = s.tolist()
    a = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in nn[i]:
            if i in nn[j]:
                a[i][j] = max(min(sl[i][j], sl[j][i]), 0.0) ** gamma
    return torch.tensor(a, dtype=F64).reshape(n, n)


def ref_normalized(a: torch.Tensor) -> torch.Tensor:
    """Eq. 2 with an empty row/column for a node of degree 0."""
    al = a.double().tolist()
    n = len(al)
    deg = [math.fsum(row) for row in al]
    s = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if deg[i] > 0 and deg[j] > 0:
                s[i][j] = al[i][j] / math.sqrt(deg[i] * deg[j])
    return torch.tensor(s, dtype=F64).reshape(n, n)


def ref_system(a: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.eye(a.shape[0], dtype=F64) - alpha * ref_normalized(a)


def ref_diffusion(a: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exact dense solution of (I - alpha S) f = y (eq. 4 without the constant 1 - alpha)."""
    return torch.linalg.solve(ref_system(a, alpha), y.double())


def ref_truncated(a: torch.Tensor, y: torch.Tensor, nodes: torch.Tensor, alpha: float) -> torch.Tensor:
    """Section 4.4: per query, the sub-graph A[sub][:, sub] re-normalised by its own degrees; 0 outside."""
    n, q = y.shape
    f = torch.zeros(n, q, dtype=F64)
    for j in range(q):
        sub = [int(v) for v in nodes[j] if int(v) >= 0]
        if not sub:
            continue
        a_sub = a.double()[sub][:, sub]
        f[sub, j] = ref_diffusion(a_sub, y.double()[sub, j], alpha)
    return f


def ref_seeds(
    q: torch.Tensor,
    x: torch.Tensor,
    k: int,
    gamma: float,
    mask: torch.Tensor | None = None,
    variant: str = "paper",
) -> torch.Tensor:
    """Eqs. 7/8 per query: sum over its valid vectors of the kernel on their k-NN, keep the k largest sums."""
    q3 = (q if q.ndim == 3 else q[:, None, :]).double()
    xl = x.double().tolist()
    n = len(xl)
    y = torch.zeros(n, q3.shape[0], dtype=F64)
    for qi in range(q3.shape[0]):
        acc: dict[int, float] = {}
        for r in range(q3.shape[1]):
            if mask is not None and not bool(mask[qi, r]):
                continue
            qv = q3[qi, r].tolist()
            sims = torch.tensor([[math.fsum(u * v for u, v in zip(qv, xj, strict=True)) for xj in xl]], dtype=F64)
            for j in ref_neighbours(sims, 0, k, exclude_self=False):
                s = float(sims[0, j])
                acc[j] = acc.get(j, 0.0) + (max(s, 0.0) ** gamma if variant == "paper" else s)
        kept = sorted(acc.items(), key=lambda t: (-t[1], t[0]))[:k]
        for j, v in kept:
            y[j, qi] = v if variant == "paper" else max(v, 0.0) ** gamma
    return y


def ref_gmp(regions: torch.Tensor, mask: torch.Tensor | None, lam: float) -> torch.Tensor:
    """Eq. 14, one image at a time: solve (V V^T + lam I) w = 1 on the valid regions only."""
    b, r, _ = regions.shape
    w = torch.zeros(b, r, dtype=F64)
    for i in range(b):
        valid = [j for j in range(r) if mask is None or bool(mask[i, j])]
        if not valid:
            continue
        v = regions[i, valid].double()
        w[i, valid] = torch.linalg.solve(
            v @ v.T + lam * torch.eye(len(valid), dtype=F64), torch.ones(len(valid), dtype=F64)
        )
    return w


# --------------------------------------------------------------------------------------------------------------
# k-NN lists and the mutual k-NN graph.
# --------------------------------------------------------------------------------------------------------------


class TestKnnLists(BaseTester):
    @pytest.mark.parametrize("dt", [torch.float32, F64])
    @pytest.mark.parametrize("data", ["random", "integer"])
    def test_reference(self, dt: torch.dtype, data: str) -> None:
        x = unit_rows(40, 6, 1, dt) if data == "random" else integer_rows(40, 4, 2, dt)
        s = x.double() @ x.double().T
        for k in (1, 3, 7, 39):
            sims, idx = knn_lists(x, k)
            assert idx.dtype == torch.int64
            assert sims.dtype == dt
            assert idx.shape == sims.shape == (40, k)
            assert_same_lists(sims, idx, s, k, exclude_self=True)
            if data == "random":  # no ties: the lists are the reference's, in order
                assert idx.tolist() == [ref_neighbours(s, i, k) for i in range(40)]

    def test_ties_go_to_lower_index(self) -> None:
        # a . b = a . c = 0.5 exactly: the first neighbour of a is b (index 1), not c (index 2).
        x = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]], dtype=F64)
        _, idx = knn_lists(x, 1)
        assert idx[:, 0].tolist() == [1, 0, 0]
        # Duplicates: three copies of e1; every copy's first neighbour is the lowest other copy.
        x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
        _, idx = knn_lists(x, 2)
        assert idx.tolist() == [[2, 3], [0, 2], [0, 3], [0, 2]]

    def test_rows_and_chunks(self) -> None:
        x = integer_rows(50, 4, 3, torch.float32)  # many ties: chunking must not change the tie rule
        full_s, full_i = knn_lists(x, 6)
        for start, stop in ((0, 50), (0, 1), (7, 23), (49, 50), (20, 20)):
            s, i = knn_lists(x, 6, rows=(start, stop))
            assert torch.equal(i, full_i[start:stop])
            assert torch.equal(s, full_s[start:stop])
            s, i = knn_lists(x, 6, rows=(start, stop), chunk_size=7)
            assert torch.equal(i, full_i[start:stop])
        s, i = knn_lists(x, 6, chunk_size=1)
        assert torch.equal(i, full_i)
        assert torch.equal(s, full_s)

    def test_queries(self) -> None:
        x, q = integer_rows(30, 4, 4), integer_rows(9, 4, 5)
        sim = q @ x.T
        for k in (1, 5, 30):
            s, i = knn_lists(x, k, queries=q)
            assert i.shape == (9, k)
            assert_same_lists(s, i, sim, k, exclude_self=False)
        s, i = knn_lists(x, 3, queries=q[:0])
        assert s.shape == i.shape == (0, 3)

    def test_faiss_flat_matches_torch(self) -> None:
        pytest.importorskip("faiss")
        x = unit_rows(120, 12, 6, torch.float32)
        s_t, i_t = knn_lists(x, 8)
        s_f, i_f = knn_lists(x, 8, backend="faiss", index="flat")
        assert torch.equal(i_f, i_t)
        self.assert_close(s_f, s_t, rtol=1e-5, atol=1e-6)
        q = unit_rows(5, 12, 7, torch.float32)
        assert torch.equal(knn_lists(x, 8, queries=q, backend="faiss")[1], knn_lists(x, 8, queries=q)[1])
        # Row ranges and chunks (the self id is offset by the range start).
        assert torch.equal(knn_lists(x, 8, rows=(30, 70), backend="faiss", chunk_size=9)[1], i_t[30:70])

    @pytest.mark.parametrize(("index", "search"), [("ivf", {"nlist": 8, "nprobe": 6}), ("ivf", {}), ("hnsw", {})])
    def test_faiss_approximate(self, index: str, search: dict[str, int]) -> None:
        pytest.importorskip("faiss")
        n, k = 300, 10
        x = unit_rows(n, 16, 8, torch.float32)
        _, exact = knn_lists(x, k)
        sims, idx = knn_lists(x, k, backend="faiss", index=index, **search)
        assert sims.shape == idx.shape == (n, k)
        assert idx.dtype == torch.int64
        found = torch.isfinite(sims)
        assert bool(((idx >= 0) & (idx < n)).all())
        assert not bool(((idx == torch.arange(n)[:, None]) & found).any())  # never itself
        assert bool((sims[:, :-1] >= sims[:, 1:]).all())  # best first
        true = (x[:, None, :] * x[idx]).sum(-1)
        self.assert_close(sims[found], true[found], rtol=1e-4, atol=1e-5)
        recall = sum(len(set(a) & set(b)) for a, b in zip(idx.tolist(), exact.tolist(), strict=True)) / (n * k)
        assert recall >= 0.9, recall
        a = mutual_knn_affinity(x, k=k, backend="faiss", index=index, **search)
        dense = a.to_dense()
        assert torch.equal(dense, dense.T)
        assert bool((dense.diagonal() == 0).all())


class TestMutualKnnAffinity(BaseTester):
    def test_smoke(self) -> None:
        x = unit_rows(30, 4, 0, torch.float32)
        a = mutual_knn_affinity(x, k=5)
        assert a.shape == (30, 30)
        assert a.layout == torch.sparse_coo
        assert a.is_coalesced()
        assert a.dtype == torch.float32

    @pytest.mark.parametrize("dt", [torch.float32, F64])
    @pytest.mark.parametrize("gamma", [1.0, 3.0])
    @pytest.mark.parametrize("k", [1, 4, 10, 29])
    def test_reference(self, dt: torch.dtype, gamma: float, k: int) -> None:
        x = unit_rows(30, 5, 10 + k, dt)
        a = mutual_knn_affinity(x, k=k, gamma=gamma)
        assert a.layout == torch.sparse_coo
        assert a.is_coalesced()
        assert a.dtype == dt
        assert bool((a.values() > 0).all())  # only positive entries are stored
        key = a.indices()[0] * 30 + a.indices()[1]
        assert bool((key[1:] > key[:-1]).all())  # really coalesced: sorted, no duplicate
        dense = a.to_dense()
        expected = ref_affinity(x, k, gamma)
        assert torch.equal(dense > 0, expected > 0)
        self.assert_close(dense, expected)
        assert torch.equal(dense, dense.T)  # exactly symmetric
        assert bool((dense.diagonal() == 0).all())
        assert int((dense > 0).sum(1).max()) <= k

    @pytest.mark.parametrize("k", [1, 2, 5, 12])
    def test_exact_ties_lower_index(self, k: int) -> None:
        # Integer vectors: many exactly equal similarities; only the lower-index rule gives the reference.
        for dtype in (torch.float32, F64):
            x = integer_rows(40, 4, 20 + k, dtype)
            dense = mutual_knn_affinity(x, k=k, gamma=1.0).to_dense()
            assert torch.equal(dense, ref_affinity(x, k, 1.0).to(dtype))

    def test_ties_decide_the_edge(self) -> None:
        # a . b = a . c = 0.5: NN_1(a) = b (lower index), NN_1(b) = NN_1(c) = a -> the only edge is a-b.
        x = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]], dtype=F64)
        dense = mutual_knn_affinity(x, k=1, gamma=3.0).to_dense()
        expected = torch.zeros(3, 3, dtype=F64)
        expected[0, 1] = expected[1, 0] = 0.125
        assert torch.equal(dense, expected)
        # Three copies of e1 and two of e2: with k = 1 the pairs are (0, 1) and (3, 4), not (1, 2).
        x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        dense = mutual_knn_affinity(x, k=1).to_dense()
        assert dense.nonzero().tolist() == [[0, 1], [1, 0], [3, 4], [4, 3]]
        assert bool((dense[dense > 0] == 1.0).all())

    def test_negative_similarities_give_no_edge(self) -> None:
        # Three unit vectors at 120 degrees: with k = 2 all pairs are mutual neighbours, all similarities -0.5.
        ang = torch.tensor([0.0, 2.0, 4.0], dtype=F64) * math.pi / 3
        x = torch.stack([ang.cos(), ang.sin()], 1)
        a = mutual_knn_affinity(x, k=2, gamma=1.0)
        assert a._nnz() == 0
        # Mixed signs: with k = N - 1 every pair is mutual; exactly the positive pairs are edges.
        x = unit_rows(12, 3, 30)
        for gamma in (1.0, 3.0):
            dense = mutual_knn_affinity(x, k=11, gamma=gamma).to_dense()
            s = x @ x.T
            s.fill_diagonal_(0.0)
            assert torch.equal(dense > 0, s > 0)
            self.assert_close(dense, s.clamp(min=0) ** gamma)

    def test_precomputed_lists(self) -> None:
        x = unit_rows(35, 6, 40)
        for k in (3, 8):
            lists = knn_lists(x, k)
            a = mutual_knn_affinity(x, k=k, knn=lists)
            b = mutual_knn_affinity(x, k=k)
            assert torch.equal(a.indices(), b.indices())
            assert torch.equal(a.values(), b.values())
            # Lists gathered from two row ranges (as two processes would build them).
            halves = [knn_lists(x, k, rows=(0, 17)), knn_lists(x, k, rows=(17, 35))]
            gathered = (torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves]))
            assert torch.equal(gathered[1], lists[1])
            c = mutual_knn_affinity(x, k=k, knn=gathered)
            assert torch.equal(c.indices(), b.indices())
            self.assert_close(c.values(), b.values())  # a row block's matmul may round differently (1 ulp)

    def test_faiss_flat_matches_torch(self) -> None:
        pytest.importorskip("faiss")
        x = unit_rows(80, 10, 50, torch.float32)
        for gamma in (1.0, 3.0):
            a_t = mutual_knn_affinity(x, k=7, gamma=gamma)
            a_f = mutual_knn_affinity(x, k=7, gamma=gamma, backend="faiss", index="flat")
            assert a_f.layout == torch.sparse_coo
            assert a_f.is_coalesced()
            assert torch.equal(a_f.indices(), a_t.indices())
            self.assert_close(a_f.values(), a_t.values(), rtol=1e-5, atol=1e-6)

    def test_cardinality(self) -> None:
        x = unit_rows(2, 3, 60, torch.float32)
        a = mutual_knn_affinity(x, k=1, gamma=1.0)
        self.assert_close(a.to_dense(), torch.tensor([[0.0, 1.0], [1.0, 0.0]]) * (x[0] @ x[1]).clamp(min=0))

    def test_exception(self) -> None:
        x = unit_rows(10, 3, 70, torch.float32)
        with pytest.raises(
            ValueError,
            match=(
                r"mutual_knn_affinity\(\): k must be < N = 10 \(the neighbours of a node exclude itself\); "
                r"got k = 10\."
            ),
        ):
            mutual_knn_affinity(x, k=10)
        with pytest.raises(ValueError, match=r"mutual_knn_affinity\(\): k must be >= 1; got 0\."):
            mutual_knn_affinity(x, k=0)
        with pytest.raises(TypeError, match=r"mutual_knn_affinity\(\): k must be an int >= 1; got True\."):
            mutual_knn_affinity(x, k=True)
        with pytest.raises(TypeError, match=r"mutual_knn_affinity\(\): k must be an int >= 1; got float 2\.0\."):
            mutual_knn_affinity(x, k=2.0)  # type: ignore[arg-type]
        for gamma in (0.0, -1.0, float("nan"), float("inf"), True):
            with pytest.raises(ValueError, match=r"mutual_knn_affinity\(\): gamma must be a float > 0\.0; got "):
                mutual_knn_affinity(x, k=3, gamma=gamma)
        with pytest.raises(
            ValueError, match=r"knn_lists\(\): backend must be one of \('torch', 'faiss'\); got 'annoy'\."
        ):
            mutual_knn_affinity(x, k=3, backend="annoy")
        with pytest.raises(
            ValueError, match=r"knn_lists\(\): index must be one of \('flat', 'ivf', 'hnsw'\); got 'lsh'\."
        ):
            mutual_knn_affinity(x, k=3, backend="faiss", index="lsh")
        with pytest.raises(
            ValueError,
            match=r"knn_lists\(\): index='ivf' needs backend='faiss' \(the torch backend is exact\); got 'torch'\.",
        ):
            mutual_knn_affinity(x, k=3, index="ivf")
        with pytest.raises(
            ValueError,
            match=(
                r"mutual_knn_affinity\(\): knn must be \(sims, idx\) of shape \(N, k\) = \(10, 3\); "
                r"got \(10, 2\) and \(10, 2\)\."
            ),
        ):
            mutual_knn_affinity(x, k=3, knn=knn_lists(x, 2))
        with pytest.raises(
            ValueError, match=r"knn must be \(sims, idx\) of shape \(N, k\) = \(10, 3\); got \(9, 3\) and \(9, 3\)\."
        ):
            mutual_knn_affinity(x, k=3, knn=knn_lists(x, 3, rows=(0, 9)))
        with pytest.raises(
            ShapeError, match=r"mutual_knn_affinity\(\): x must have shape \(N, D\); got \(1, 10, 3\) with 3 dims\."
        ):
            mutual_knn_affinity(x[None], k=3)
        with pytest.raises(
            ShapeError, match=r"mutual_knn_affinity\(\): x must have shape \(N, D\); got \(10\) with 1 dims\."
        ):
            mutual_knn_affinity(x[:, 0], k=3)
        with pytest.raises(
            DTypeError, match=r"mutual_knn_affinity\(\): x must be a floating-point tensor; got dtype torch\.int64\."
        ):
            mutual_knn_affinity(x.long(), k=3)

    def test_knn_lists_exception(self) -> None:
        x = unit_rows(10, 3, 71, torch.float32)
        with pytest.raises(
            ValueError,
            match=r"knn_lists\(\): k must be < N = 10 \(the neighbours of a row exclude itself\); got k = 10\.",
        ):
            knn_lists(x, 10)
        with pytest.raises(ValueError, match=r"knn_lists\(\): k must be >= 1; got 0\."):
            knn_lists(x, 0)
        with pytest.raises(TypeError, match=r"knn_lists\(\): k must be an int >= 1; got False\."):
            knn_lists(x, False)
        with pytest.raises(ValueError, match=r"knn_lists\(\): k must be <= N = 10 \(the database size\); got k = 11\."):
            knn_lists(x, 11, queries=x)
        for rows in ((3, 11), (-1, 4), (5, 4)):
            with pytest.raises(
                ValueError,
                match=r"knn_lists\(\): rows must be a range \(start, stop\) with 0 <= start <= stop <= 10; got ",
            ):
                knn_lists(x, 3, rows=rows)
        with pytest.raises(
            ValueError, match=r"knn_lists\(\): rows applies to the graph's own lists; pass either queries or rows\."
        ):
            knn_lists(x, 3, queries=x, rows=(0, 1))
        with pytest.raises(
            ShapeError, match=r"knn_lists\(\): queries must have shape \(R, D\) with D=3; got \(10, 2\)\."
        ):
            knn_lists(x, 3, queries=x[:, :2])
        with pytest.raises(ShapeError, match=r"knn_lists\(\): x must have shape \(N, D\); got \(10\) with 1 dims\."):
            knn_lists(x[:, 0], 3)
        with pytest.raises(
            ValueError, match=r"knn_lists\(\): backend must be one of \('torch', 'faiss'\); got 'Torch'\."
        ):
            knn_lists(x, 3, backend="Torch")
        with pytest.raises(ValueError, match=r"knn_lists\(\): index='hnsw' needs backend='faiss'"):
            knn_lists(x, 3, index="hnsw")


# --------------------------------------------------------------------------------------------------------------
# Normalisation, the operator and the diffusion scores.
# --------------------------------------------------------------------------------------------------------------


class TestNormalizedAffinity(BaseTester):
    def test_reference(self) -> None:
        a = random_graph(25, 0.2, 0, isolated=(3, 17))
        expected = ref_normalized(a)
        for layout in ("dense", "coo", "csr"):
            inp = {"dense": a, "coo": a.to_sparse(), "csr": a.to_sparse_csr()}[layout]
            s = normalized_affinity(inp)
            assert s.layout == torch.sparse_csr
            assert s.dtype == F64
            dense = s.to_dense()
            self.assert_close(dense, expected)
            assert not dense.isnan().any()
            assert bool((dense[3] == 0).all())
            assert bool((dense[:, 17] == 0).all())
        assert normalized_affinity(a.float()).dtype == torch.float32

    def test_uncoalesced_coo_sums_duplicates(self) -> None:
        idx = torch.tensor([[0, 1, 0, 1, 1, 2], [1, 0, 1, 0, 2, 1]])
        val = torch.tensor([1.0, 1.0, 2.0, 2.0, 4.0, 4.0], dtype=F64)
        coo = torch.sparse_coo_tensor(idx, val, (3, 3), check_invariants=True)
        self.assert_close(normalized_affinity(coo).to_dense(), ref_normalized(coo.to_dense()))

    def test_exception(self) -> None:
        with pytest.raises(
            ShapeError, match=r"normalized_affinity\(\): A must be a square \(N, N\) affinity matrix; got \(2, 3\)\."
        ):
            normalized_affinity(torch.ones(2, 3))
        with pytest.raises(
            DTypeError, match=r"normalized_affinity\(\): A must be a floating-point tensor; got dtype torch\.int64\."
        ):
            normalized_affinity(torch.ones(2, 2, dtype=torch.int64))


class TestDiffusionOperator(BaseTester):
    def test_matvec_and_reorder(self) -> None:
        a = random_graph(60, 0.08, 1, isolated=(5,))
        y = random_seeds(60, 3, 4, 2)
        op = DiffusionOperator(a.to_sparse(), alpha=0.9)
        plain = DiffusionOperator(a.to_sparse(), alpha=0.9, reorder=False)
        assert plain.perm is None
        if op.perm is not None:  # scipy installed: a permutation of the nodes
            assert torch.equal(op.perm.sort().values, torch.arange(60))
        # In its own node order the operator applies I - alpha S.
        v = random_seeds(60, 2, 60, 3)
        self.assert_close(plain.matvec(v), ref_system(a, 0.9) @ v)
        perm = op.perm if op.perm is not None else torch.arange(60)
        self.assert_close(op.matvec(v[perm]), (ref_system(a, 0.9) @ v)[perm])
        # solve() returns f in the graph's order whatever the internal order.
        f, res = op.solve(y, max_iter=50, tol=1e-14)
        f2, _ = plain.solve(y, max_iter=50, tol=1e-14)
        expected = ref_diffusion(a, y, 0.9)
        self.assert_close(f, expected)
        self.assert_close(f2, expected)
        assert res.shape == (3,)
        f20, _ = op.solve(y)
        self.assert_close(f20, diffusion_scores(a, y, alpha=0.9))

    def test_cg_columns(self) -> None:
        mib = 2**20
        assert cg_columns(100000, 70, 4, 32 * mib) == 18  # 20 fit in 32 MiB: 4 groups, of 18 (the last of 16)
        assert cg_columns(100000, 70, 4, 16 * mib) == 10  # 10 fit: 7 groups of 10
        assert cg_columns(100000, 70, 8, 32 * mib) == 10  # float64
        assert cg_columns(5000, 70, 4, 32 * mib) == 70  # all 70 fit: one call
        assert cg_columns(10**6, 70, 4, 32 * mib) == 70  # fewer than 8 would fit: one call
        assert cg_columns(100000, 70, 4, None) == 70  # unknown cache
        assert cg_columns(100000, 8, 4, 32 * mib) == 8
        assert cg_columns(0, 5, 4, 32 * mib) == 5

    def test_column_groups_give_the_same_bits(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # With a "cache" that holds 9 columns of this graph, 30 right-hand sides go through 4 CG calls of 8, 8, 8, 6
        # columns; each column's result is the same bits as in one call of all 30.
        a = random_graph(200, 0.05, 11, isolated=(7,))
        y = random_seeds(200, 30, 5, 12).float()
        op = DiffusionOperator(a.to_sparse().float(), alpha=0.99)
        monkeypatch.setattr(diffusion, "L3_BYTES", None)
        whole, res_whole = op.solve(y)
        calls: list[int] = []
        real = diffusion.conjugate_gradient
        monkeypatch.setattr(
            diffusion, "conjugate_gradient", lambda mv, b, **k: calls.append(b.shape[1]) or real(mv, b, **k)
        )
        monkeypatch.setattr(diffusion, "L3_BYTES", 4 * 200 * 4 * 9)
        grouped, res_grouped = op.solve(y)
        assert calls == [8, 8, 8, 6]
        assert torch.equal(grouped, whole)
        assert torch.equal(res_grouped, res_whole)
        self.assert_close(grouped.double(), ref_diffusion(a, y.double(), 0.99), rtol=1e-3, atol=1e-4)

    def test_exception(self) -> None:
        for alpha in (0.0, 1.0, 1.5, -0.1, float("nan"), True):
            with pytest.raises(
                ValueError, match=r"DiffusionOperator\(\): alpha must be a float in \(0\.0, 1\.0\); got "
            ):
                DiffusionOperator(torch.eye(3), alpha=alpha)


class TestDiffusionScores(BaseTester):
    def test_smoke(self) -> None:
        a = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        f = diffusion_scores(a, torch.tensor([1.0, 0.0, 0.0]), alpha=0.5)
        assert f.shape == (3,)
        assert f.dtype == torch.float32
        assert bool(f[0] > f[1] > f[2] > 0)

    @pytest.mark.parametrize(("layout", "alpha"), [("coo", 0.5), ("coo", 0.99), ("csr", 0.9), ("dense", 0.99)])
    def test_reference_exact(self, layout: str, alpha: float) -> None:
        a = random_graph(50, 0.1, 4)
        inp = {"dense": a, "coo": a.to_sparse(), "csr": a.to_sparse_csr()}[layout]
        y = random_seeds(50, 4, 3, 5)
        expected = ref_diffusion(a, y, alpha)
        budget = {0.5: 30, 0.9: 50, 0.99: 60}[alpha]  # fixed budgets: enough to reach tol = 1e-14
        f, res = diffusion_scores(inp, y, alpha=alpha, max_iter=budget, tol=1e-14, return_residual=True)
        assert f.dtype == F64
        assert res.shape == (4,)
        self.assert_close(f, expected, rtol=1e-9, atol=1e-11)
        assert bool((res <= 1e-12 * y.norm(dim=0)).all())
        # A single column (1-D y): 1-D scores, 0-d residual.
        f1, r1 = diffusion_scores(inp, y[:, 2], alpha=alpha, max_iter=budget, tol=1e-14, return_residual=True)
        assert f1.shape == (50,)
        assert r1.shape == ()
        self.assert_close(f1, expected[:, 2], rtol=1e-9, atol=1e-11)

    def test_graph_from_mutual_knn(self) -> None:
        x = unit_rows(70, 8, 6)
        a = mutual_knn_affinity(x, k=6, gamma=3.0)
        y = query_seeds(unit_rows(3, 8, 7), x, k=5)
        f = diffusion_scores(a, y, alpha=0.9, max_iter=60, tol=1e-14)
        self.assert_close(f, ref_diffusion(a.to_dense(), y, 0.9), rtol=1e-9, atol=1e-11)

    def test_isolated_nodes(self) -> None:
        a = random_graph(30, 0.15, 8, isolated=(0, 11, 29))
        y = random_seeds(30, 3, 5, 9)
        y[0, 0] = 0.7
        y[11, 1] = 0.3
        iso = [0, 11, 29]
        for inp in (a, a.to_sparse(), a.to_sparse_csr()):
            f = diffusion_scores(inp, y, alpha=0.5, max_iter=30, tol=1e-14)
            assert not f.isnan().any()
            self.assert_close(f[iso], y[iso], rtol=1e-12, atol=1e-14)
            # With the default budget the CG iterate holds f_i = y_i to the solver's tolerance (a node of degree 0
            # is its own 1 x 1 block of the system, but CG's polynomial in L is only approximately 1 there).
            f = diffusion_scores(inp, y, alpha=0.99)
            assert not f.isnan().any()
            self.assert_close(f[iso], y[iso], rtol=1e-5, atol=1e-12)
            assert bool((f[29] == 0).all())
        self.assert_close(
            diffusion_scores(a, y, alpha=0.5, max_iter=30, tol=1e-14), ref_diffusion(a, y, 0.5), rtol=1e-9, atol=1e-11
        )
        # A graph without any edge: f = y.
        z = torch.zeros(5, 5)
        yz = torch.rand(5, 2, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(diffusion_scores(z, yz), yz, rtol=1e-6, atol=0)  # up to the solver's column scaling
        torch.testing.assert_close(diffusion_scores(z.to_sparse(), yz[:, 0]), yz[:, 0], rtol=1e-6, atol=0)

    def test_default_budget_matches_pcg(self) -> None:
        # alpha = 0.99, 20 iterations, tol 1e-6 (the paper's setting): no column converges, the scores are
        # pcg's smallest-residual iterate of a plain CG loop on the dense system.
        a = random_graph(120, 0.03, 10, isolated=(7,))
        y = random_seeds(120, 5, 3, 11)
        y[7, 4] = 1.0
        system = ref_system(a, 0.99)
        f, res = diffusion_scores(a.to_sparse(), y, return_residual=True)
        assert bool((res > 1e-6 * y.norm(dim=0)).all())  # really not converged: pcg's rule decides
        for j in range(5):
            xr, rr = ref_pcg(system, y[:, j], 20, 1e-6)
            self.assert_close(f[:, j], xr, rtol=1e-10, atol=1e-10)
            self.assert_close(res[j], torch.tensor(rr, dtype=F64), rtol=1e-8, atol=1e-12)
        # return_residual: the residual norm of the returned scores.
        self.assert_close(res, (y - system @ f).norm(dim=0), rtol=1e-8, atol=1e-12)
        assert torch.equal(diffusion_scores(a.to_sparse(), y), f)

    def test_dtype_preserved(self) -> None:
        a = random_graph(20, 0.2, 12)
        y = random_seeds(20, 2, 3, 13)
        f32 = diffusion_scores(a.float().to_sparse(), y.float())
        assert f32.dtype == torch.float32
        self.assert_close(f32, diffusion_scores(a.to_sparse(), y).float(), rtol=1e-4, atol=1e-5)
        f, res = diffusion_scores(a.float(), y, return_residual=True)  # computed in the promoted dtype
        assert f.dtype == F64
        assert res.dtype == F64

    def test_cardinality(self) -> None:
        a = random_graph(6, 0.5, 14)
        assert diffusion_scores(a, torch.zeros(6, 0, dtype=F64)).shape == (6, 0)
        y = torch.zeros(6, 2, dtype=F64)
        f, res = diffusion_scores(a, y, return_residual=True)
        assert torch.equal(f, y)
        assert torch.equal(res, torch.zeros(2, dtype=F64))
        assert diffusion_scores(torch.zeros(0, 0), torch.zeros(0, 3)).shape == (0, 3)
        self.assert_close(diffusion_scores(torch.zeros(1, 1), torch.ones(1, 2)), torch.ones(1, 2))

    def test_exception(self) -> None:
        a = random_graph(5, 0.5, 15)
        y = torch.ones(5, 2, dtype=F64)
        for alpha, shown in ((0, "0"), (1, "1"), (-0.5, "-0.5"), (1.5, "1.5"), (float("nan"), "nan"), (True, "True")):
            with pytest.raises(
                ValueError, match=rf"diffusion_scores\(\): alpha must be a float in \(0\.0, 1\.0\); got {shown}\."
            ):
                diffusion_scores(a, y, alpha=alpha)
        with pytest.raises(
            ShapeError,
            match=(
                r"diffusion_scores\(\): y must have shape \(N,\) or \(N, Q\) with N = 5 \(the graph's nodes\); "
                r"got \(4, 2\)\."
            ),
        ):
            diffusion_scores(a, y[:4])
        with pytest.raises(
            ShapeError,
            match=r"y must have shape \(N,\) or \(N, Q\) with N = 5 \(the graph's nodes\); got \(5, 2, 1\)\.",
        ):
            diffusion_scores(a, y[..., None])
        with pytest.raises(
            DTypeError, match=r"diffusion_scores\(\): y must be a floating-point tensor; got dtype torch\.int64\."
        ):
            diffusion_scores(a, y.long())
        with pytest.raises(
            ShapeError, match=r"diffusion_scores\(\): A must be a square \(N, N\) affinity matrix; got \(5, 4\)\."
        ):
            diffusion_scores(a[:, :4], y)
        with pytest.raises(
            ShapeError, match=r"diffusion_scores\(\): A must be a square \(N, N\) affinity matrix; got \(5, 5, 1\)\."
        ):
            diffusion_scores(a[..., None], y)
        with pytest.raises(ValueError, match=r"max_iter must be >= 0; got -1\."):
            diffusion_scores(a, y, max_iter=-1)
        with pytest.raises(ValueError, match=r"tol must be a finite float >= 0"):
            diffusion_scores(a, y, tol=-1.0)


class TestTruncatedDiffusion(BaseTester):
    @staticmethod
    def shortlists(n: int, q: int, m: int, seed: int) -> torch.Tensor:
        """Random (Q, m) shortlists in random order, rows 1 and 3 padded with -1 at various places."""
        g = torch.Generator().manual_seed(seed)
        nodes = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(q)])
        if q > 1:
            nodes[1, -4:] = -1
        if q > 3:
            nodes[3, ::3] = -1
        return nodes

    @pytest.mark.parametrize("layout", ["coo", "csr", "dense"])
    def test_reference_exact(self, layout: str) -> None:
        n, q, m = 60, 5, 25
        a = random_graph(n, 0.12, 20, isolated=(9,))
        inp = {"dense": a, "coo": a.to_sparse(), "csr": a.to_sparse_csr()}[layout]
        y = random_seeds(n, q, 30, 21)
        nodes = self.shortlists(n, q, m, 22)
        nodes[0, 0] = 9  # an isolated node in a shortlist
        f = diffusion_scores(inp, y, alpha=0.95, nodes=nodes, max_iter=50, tol=1e-14)
        expected = ref_truncated(a, y, nodes, 0.95)
        self.assert_close(f, expected, rtol=1e-9, atol=1e-11)
        for j in range(q):  # 0 outside the shortlist
            outside = torch.ones(n, dtype=torch.bool)
            outside[nodes[j][nodes[j] >= 0]] = False
            assert bool((f[outside, j] == 0).all())
        assert float(f[9, 0]) == float(y[9, 0])
        # Not the same as the full solve (the sub-graph is re-normalised by its own degrees).
        assert not torch.allclose(f, ref_diffusion(a, y, 0.95) * (expected != 0))

    def test_default_budget_matches_pcg_per_query(self) -> None:
        # Each query's column has its own recurrence: the block-diagonal solve equals pcg on each sub-system.
        n, q, m = 80, 4, 40
        a = random_graph(n, 0.1, 23)
        y = random_seeds(n, q, 40, 24)
        nodes = self.shortlists(n, q, m, 25)
        f, res = diffusion_scores(a.to_sparse(), y, nodes=nodes, return_residual=True)
        for j in range(q):
            sub = [int(v) for v in nodes[j] if int(v) >= 0]
            xr, rr = ref_pcg(ref_system(a[sub][:, sub], 0.99), y[sub, j], 20, 1e-6)
            self.assert_close(f[sub, j], xr, rtol=1e-10, atol=1e-10)
            self.assert_close(res[j], torch.tensor(rr, dtype=F64), rtol=1e-8, atol=1e-12)

    def test_full_shortlist_equals_full_solve(self) -> None:
        a = random_graph(30, 0.2, 26)
        y = random_seeds(30, 3, 4, 27)
        g = torch.Generator().manual_seed(28)
        nodes = torch.stack([torch.randperm(30, generator=g) for _ in range(3)])
        f = diffusion_scores(a, y, alpha=0.9, nodes=nodes, max_iter=40, tol=1e-14)
        self.assert_close(f, diffusion_scores(a, y, alpha=0.9, max_iter=40, tol=1e-14), rtol=1e-9, atol=1e-11)
        self.assert_close(f, ref_diffusion(a, y, 0.9), rtol=1e-9, atol=1e-11)

    def test_single_column_and_empty(self) -> None:
        a = random_graph(20, 0.3, 29)
        y = random_seeds(20, 1, 5, 30)
        nodes = self.shortlists(20, 1, 10, 31)
        nodes[0, 2] = -1
        f = diffusion_scores(a, y[:, 0], alpha=0.9, nodes=nodes, max_iter=40, tol=1e-14)
        assert f.shape == (20,)
        self.assert_close(f, ref_truncated(a, y, nodes, 0.9)[:, 0], rtol=1e-9, atol=1e-11)
        # All padding: zeros. No shortlist entries at all: zeros. No query: (N, 0).
        assert torch.equal(diffusion_scores(a, y, nodes=torch.full((1, 4), -1)), torch.zeros(20, 1, dtype=F64))
        assert torch.equal(
            diffusion_scores(a, y, nodes=torch.zeros(1, 0, dtype=torch.long)), torch.zeros(20, 1, dtype=F64)
        )
        assert diffusion_scores(a, y[:, :0], nodes=torch.zeros(0, 3, dtype=torch.long)).shape == (20, 0)
        # int32 node indices are accepted.
        self.assert_close(diffusion_scores(a, y, nodes=nodes.int()), diffusion_scores(a, y, nodes=nodes))

    def test_exception(self) -> None:
        a = random_graph(5, 0.5, 32)
        y = torch.ones(5, 2, dtype=F64)
        for bad in (5, -2, 100):
            nodes = torch.tensor([[0, 1], [2, bad]])
            with pytest.raises(
                ValueError,
                match=(
                    r"diffusion_scores\(\): nodes must hold node indices in \[0, 5\) or -1 \(padding\); "
                    r"got values outside\."
                ),
            ):
                diffusion_scores(a, y, nodes=nodes)
        with pytest.raises(
            ShapeError,
            match=(
                r"diffusion_scores\(\): nodes must have shape \(Q, n\) with Q=2; "
                r"got \(3, 2\)\. One row of node indices per query\."
            ),
        ):
            diffusion_scores(a, y, nodes=torch.zeros(3, 2, dtype=torch.long))
        with pytest.raises(
            ShapeError, match=r"diffusion_scores\(\): nodes must have shape \(Q, n\); got \(2\) with 1 dims\."
        ):
            diffusion_scores(a, y, nodes=torch.zeros(2, dtype=torch.long))
        with pytest.raises(
            DTypeError,
            match=(
                r"diffusion_scores\(\): nodes must have dtype in \[torch\.int64, torch\.int32\]; "
                r"got torch\.float32\."
            ),
        ):
            diffusion_scores(a, y, nodes=torch.zeros(2, 2))


# --------------------------------------------------------------------------------------------------------------
# Query seeds (eqs. 7, 8).
# --------------------------------------------------------------------------------------------------------------


class TestQuerySeeds(BaseTester):
    def test_smoke(self) -> None:
        y = query_seeds(torch.tensor([[1.0, 0.5, 0.0, 0.0]]), torch.eye(4), k=2, gamma=1.0)
        assert y.shape == (4, 1)
        self.assert_close(y[:, 0], torch.tensor([1.0, 0.5, 0.0, 0.0]))

    @pytest.mark.parametrize("variant", ["paper", "iscen"])
    @pytest.mark.parametrize("gamma", [1.0, 3.0])
    @pytest.mark.parametrize("k", [1, 3, 10, 40])
    def test_reference_global(self, variant: str, gamma: float, k: int) -> None:
        x, q = unit_rows(40, 6, 40), unit_rows(4, 6, 41)
        y = query_seeds(q, x, k=k, gamma=gamma, variant=variant)
        assert y.shape == (40, 4)
        assert y.dtype == F64
        self.assert_close(y, ref_seeds(q, x, k, gamma, variant=variant))
        assert bool((y >= 0).all())
        assert int((y != 0).sum(0).max()) <= k

    @pytest.mark.parametrize("variant", ["paper", "iscen"])
    @pytest.mark.parametrize("k", [1, 4, 15])
    def test_reference_regional(self, variant: str, k: int) -> None:
        x = unit_rows(50, 5, 42)
        q = unit_rows(3 * 6, 5, 43).reshape(3, 6, 5)
        mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
        for gamma in (1.0, 3.0):
            y = query_seeds(q, x, k=k, gamma=gamma, mask=mask, variant=variant)
            self.assert_close(y, ref_seeds(q, x, k, gamma, mask, variant))
            assert bool((y[:, 2] == 0).all())  # no valid region
            # Masked regions take no part, whatever they hold.
            junk = q.clone()
            junk[~mask] = 7.0
            self.assert_close(query_seeds(junk, x, k=k, gamma=gamma, mask=mask, variant=variant), y)
        # Without a mask every region counts.
        self.assert_close(query_seeds(q, x, k=k, variant=variant), ref_seeds(q, x, k, 3.0, None, variant))

    def test_variants_differ_only_with_several_vectors(self) -> None:
        x, q = unit_rows(30, 4, 44), unit_rows(2, 4, 45)
        assert torch.equal(query_seeds(q, x, k=6, variant="paper"), query_seeds(q, x, k=6, variant="iscen"))
        qr = unit_rows(8, 4, 46).reshape(2, 4, 4)
        assert not torch.allclose(query_seeds(qr, x, k=6, variant="paper"), query_seeds(qr, x, k=6, variant="iscen"))

    @pytest.mark.parametrize("variant", ["paper", "iscen"])
    def test_exact_ties_lower_index(self, variant: str) -> None:
        # Integer vectors: ties in the k-NN of each query vector and in the per-node sums.
        x = integer_rows(30, 3, 47)
        q = integer_rows(4 * 3, 3, 48).reshape(4, 3, 3)
        mask = torch.ones(4, 3, dtype=torch.bool)
        mask[1, 2] = False
        for k in (1, 2, 5, 9):
            for gamma in (1.0, 2.0):
                y = query_seeds(q, x, k=k, gamma=gamma, mask=mask, variant=variant)
                assert torch.equal(y, ref_seeds(q, x, k, gamma, mask, variant)), (k, gamma)

    def test_kept_entries_tie_rule(self) -> None:
        # One query vector e1 against x = [a, b, b, c]: k = 2 neighbours are a (0.9) and the first b (0.5).
        x = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.5, 0.5], [0.25, 0.75]], dtype=F64)
        y = query_seeds(torch.tensor([[1.0, 0.0]], dtype=F64), x, k=2, gamma=1.0)
        self.assert_close(y[:, 0], torch.tensor([0.9, 0.5, 0.0, 0.0], dtype=F64))
        # Two regions, each with k = 1: the per-node sums tie (0.5 each) and only k = 1 is kept: node 1.
        q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64)
        x = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5]], dtype=F64)
        y = query_seeds(q, x, k=1, gamma=1.0)
        self.assert_close(y[:, 0], torch.tensor([0.0, 0.5, 0.0], dtype=F64))

    def test_dtype(self) -> None:
        x, q = unit_rows(20, 4, 49, torch.float32), unit_rows(3, 4, 50, torch.float32)
        y = query_seeds(q, x, k=5)
        assert y.dtype == torch.float32
        self.assert_close(y, ref_seeds(q, x, 5, 3.0).float())
        assert query_seeds(q.double(), x, k=5).dtype == F64

    def test_cardinality(self) -> None:
        x = unit_rows(10, 4, 51)
        assert query_seeds(x[:0], x, k=3).shape == (10, 0)
        q = unit_rows(2, 4, 52).reshape(2, 1, 4)
        assert torch.equal(
            query_seeds(q[:, :0], x, k=3, mask=torch.zeros(2, 0, dtype=torch.bool)), torch.zeros(10, 2, dtype=F64)
        )
        self.assert_close(query_seeds(q, x, k=10), ref_seeds(q, x, 10, 3.0))

    def test_exception(self) -> None:
        x, q = unit_rows(6, 3, 53), unit_rows(2, 3, 54)
        with pytest.raises(
            ValueError, match=r"query_seeds\(\): k must be <= N = 6 \(the database nodes\); got k = 7\."
        ):
            query_seeds(q, x, k=7)
        with pytest.raises(ValueError, match=r"query_seeds\(\): k must be >= 1; got 0\."):
            query_seeds(q, x, k=0)
        with pytest.raises(TypeError, match=r"query_seeds\(\): k must be an int >= 1; got True\."):
            query_seeds(q, x, k=True)
        with pytest.raises(ValueError, match=r"query_seeds\(\): gamma must be a float > 0\.0; got -1\.0\."):
            query_seeds(q, x, k=2, gamma=-1.0)
        with pytest.raises(
            ValueError, match=r"query_seeds\(\): variant must be one of \('paper', 'iscen'\); got 'ymake'\."
        ):
            query_seeds(q, x, k=2, variant="ymake")
        q3 = q.reshape(2, 1, 3).expand(2, 4, 3)
        with pytest.raises(
            ShapeError, match=r"query_seeds\(\): mask must have shape \(Q, R\) with R=4; got \(2, 3\)\."
        ):
            query_seeds(q3, x, k=2, mask=torch.ones(2, 3, dtype=torch.bool))
        with pytest.raises(
            ShapeError, match=r"query_seeds\(\): mask must have shape \(Q, R\) with Q=2; got \(3, 4\)\."
        ):
            query_seeds(q3, x, k=2, mask=torch.ones(3, 4, dtype=torch.bool))
        with pytest.raises(
            ShapeError, match=r"query_seeds\(\): mask must have shape \(Q, R\); got \(2, 4, 1\) with 3 dims\."
        ):
            query_seeds(q3, x, k=2, mask=torch.ones(2, 4, 1, dtype=torch.bool))
        with pytest.raises(
            DTypeError, match=r"query_seeds\(\): mask must have dtype in \[torch\.bool\]; got torch\.float32\."
        ):
            query_seeds(q3, x, k=2, mask=torch.ones(2, 4))
        with pytest.raises(
            ShapeError, match=r"query_seeds\(\): q must have shape \(Q, D\) or \(Q, R, D\); got \(1, 2, 4, 3\)\."
        ):
            query_seeds(q3[None], x, k=2)
        with pytest.raises(
            ShapeError, match=r"query_seeds\(\): q must have shape \(Q, D\) or \(Q, R, D\); got \(3,\)\."
        ):
            query_seeds(q[0], x, k=2)
        with pytest.raises(ShapeError, match=r"query_seeds\(\): q must have shape .*D=3"):
            query_seeds(q[:, :2], x, k=2)
        with pytest.raises(
            DTypeError, match=r"query_seeds\(\): q must be a floating-point tensor; got dtype torch\.int64\."
        ):
            query_seeds(q.long(), x, k=2)
        with pytest.raises(ShapeError, match=r"query_seeds\(\): x must have shape \(N, D\); got \(6\) with 1 dims\."):
            query_seeds(q, x[:, 0], k=2)


# --------------------------------------------------------------------------------------------------------------
# GMP weights (eq. 14).
# --------------------------------------------------------------------------------------------------------------


class TestGmpWeights(BaseTester):
    def test_smoke(self) -> None:
        w = gmp_weights(torch.eye(3)[None], lam=1.0)
        assert w.shape == (1, 3)
        assert w.dtype == torch.float32
        self.assert_close(w, torch.full((1, 3), 0.5))

    @pytest.mark.parametrize("lam", [0.01, 1.0, 10.0])
    def test_reference(self, lam: float) -> None:
        g = torch.Generator().manual_seed(0)
        regions = torch.randn(4, 7, 5, generator=g, dtype=F64)
        self.assert_close(gmp_weights(regions, lam=lam), ref_gmp(regions, None, lam))
        mask = torch.rand(4, 7, generator=g) < 0.6
        mask[0] = True
        mask[3] = False
        w = gmp_weights(regions, mask, lam=lam)
        self.assert_close(w, ref_gmp(regions, mask, lam))
        assert bool((w[~mask] == 0).all())
        # Masked regions take no part whatever they hold (even NaN padding).
        junk = regions.clone()
        junk[~mask] = 1e3
        self.assert_close(gmp_weights(junk, mask, lam=lam), w)

    def test_cardinality(self) -> None:
        assert gmp_weights(torch.zeros(0, 3, 4)).shape == (0, 3)
        assert gmp_weights(torch.zeros(2, 0, 4)).shape == (2, 0)
        assert gmp_weights(torch.zeros(0, 3, 4), torch.zeros(0, 3, dtype=torch.bool)).shape == (0, 3)
        self.assert_close(gmp_weights(torch.zeros(2, 3, 4), lam=2.0), torch.full((2, 3), 0.5))
        r = torch.randn(1, 1, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
        self.assert_close(gmp_weights(r, lam=1.0), 1.0 / (r.pow(2).sum(-1) + 1.0))

    def test_dtype_preserved(self) -> None:
        regions = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2))
        w = gmp_weights(regions)
        assert w.dtype == torch.float32
        self.assert_close(w, ref_gmp(regions, None, 1.0).float())
        assert gmp_weights(regions.double()).dtype == F64

    def test_noncontiguous(self) -> None:
        regions = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
        nc = self.noncontiguous(regions)
        assert not nc.is_contiguous()
        self.assert_close(gmp_weights(nc), gmp_weights(regions))

    def test_gradcheck(self) -> None:
        g = torch.Generator().manual_seed(4)
        regions = torch.randn(2, 3, 3, generator=g, dtype=F64).requires_grad_()
        assert self.gradcheck(lambda r: gmp_weights(r, lam=0.5), (regions,))
        mask = torch.tensor([[True, False, True], [True, True, False]])
        assert self.gradcheck(lambda r: gmp_weights(r, mask, lam=1.0), (regions,))

    def test_exception(self) -> None:
        regions = torch.ones(2, 3, 4)
        for lam, shown in ((0.0, "0.0"), (-1.0, "-1.0"), (float("nan"), "nan"), (float("inf"), "inf"), (True, "True")):
            with pytest.raises(ValueError, match=rf"gmp_weights\(\): lam must be a float > 0\.0; got {shown}\."):
                gmp_weights(regions, lam=lam)
        with pytest.raises(
            ShapeError, match=r"gmp_weights\(\): regions must have shape \(B, R, D\); got \(2, 3\) with 2 dims\."
        ):
            gmp_weights(regions[:, :, 0])
        with pytest.raises(
            ShapeError, match=r"gmp_weights\(\): mask must have shape \(B, R\) with R=3; got \(2, 2\)\."
        ):
            gmp_weights(regions, torch.ones(2, 2, dtype=torch.bool))
        with pytest.raises(
            DTypeError, match=r"gmp_weights\(\): mask must have dtype in \[torch\.bool\]; got torch\.float32\."
        ):
            gmp_weights(regions, torch.ones(2, 3))
        with pytest.raises(
            DTypeError, match=r"gmp_weights\(\): regions must be a floating-point tensor; got dtype torch\.int64\."
        ):
            gmp_weights(regions.long())


# --------------------------------------------------------------------------------------------------------------
# Regression: batched solver paths after torch.set_num_threads(2) (environment.md, the batched-LU bug).
# --------------------------------------------------------------------------------------------------------------


def test_batched_solvers_after_set_num_threads() -> None:
    # Our batched paths use Cholesky (GMP) and CG (diffusion, truncated diffusion): they must keep working after
    # set_num_threads(2), where MKL's batched LU breaks at this size. alpha = 0.5 keeps the CG budget small.
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n, q = 256, 2
        x = unit_rows(n, 16, 60)
        a = mutual_knn_affinity(x, k=10)
        y = query_seeds(unit_rows(q, 16, 61), x, k=10)
        f = diffusion_scores(a, y, alpha=0.5, max_iter=30, tol=1e-13)
        expected = torch.cholesky_solve(y, torch.linalg.cholesky(_dense_system(a, 0.5)))  # SPD: no LU
        torch.testing.assert_close(f, expected, rtol=1e-9, atol=1e-12)
        g = torch.Generator().manual_seed(62)
        nodes = torch.stack([torch.randperm(n, generator=g)[:200] for _ in range(q)])
        ft = diffusion_scores(a, y, alpha=0.5, nodes=nodes, max_iter=30, tol=1e-13)
        for j in range(q):
            sub = nodes[j]
            sys_sub = _dense_system(a.to_dense()[sub][:, sub], 0.5)
            ref = torch.cholesky_solve(y[sub, j : j + 1], torch.linalg.cholesky(sys_sub))[:, 0]
            torch.testing.assert_close(ft[sub, j], ref, rtol=1e-9, atol=1e-12)
        regions = torch.randn(3, 260, 8, generator=g, dtype=F64)
        mask = torch.ones(3, 260, dtype=torch.bool)
        mask[1, 200:] = False
        w = gmp_weights(regions, mask)
        for i in range(3):
            v = regions[i, mask[i]]
            gram = v @ v.T + torch.eye(v.shape[0], dtype=F64)
            ref = torch.cholesky_solve(torch.ones(v.shape[0], 1, dtype=F64), torch.linalg.cholesky(gram))[:, 0]
            torch.testing.assert_close(w[i, mask[i]], ref, rtol=1e-9, atol=1e-12)
        assert bool((w[1, 200:] == 0).all())
    finally:
        torch.set_num_threads(old)


def _dense_system(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """Vectorised I - alpha D^-1/2 A D^-1/2 for larger graphs (same formula as ``ref_normalized``)."""
    d = a.to_dense().double()
    deg = d.sum(1)
    inv = torch.where(deg > 0, deg.rsqrt(), 0.0)
    return torch.eye(d.shape[0], dtype=F64) - alpha * inv[:, None] * d * inv[None, :]


# --------------------------------------------------------------------------------------------------------------
# Toy manifolds: diffusion follows the manifold, plain nearest neighbours do not.
# --------------------------------------------------------------------------------------------------------------


def two_moons(n: int, noise: float, seed: int, height: float) -> torch.Tensor:
    """Two interleaved half-moons (n points each, A first), lifted to 3-D by a constant coordinate, L2-normalised.

    With ``height`` well above the points' radius, the angle between two lifted points is close to their
    Euclidean distance / height, so inner products rank neighbours as the 2-D distances do.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.0, math.pi, n, dtype=F64)
    moon_a = torch.stack([t.cos(), t.sin()], 1)
    moon_b = torch.stack([1.0 - t.cos(), 0.5 - t.sin()], 1)
    p = torch.cat([moon_a, moon_b]) + noise * torch.randn(2 * n, 2, generator=g, dtype=F64)
    lifted = torch.cat([p, torch.full((2 * n, 1), height, dtype=F64)], 1)
    return lifted / lifted.norm(dim=1, keepdim=True)


def test_diffusion_follows_the_manifold() -> None:
    n, height = 100, 3.0
    x = two_moons(n, 0.05, 0, height)
    on_a = torch.arange(2 * n) < n
    query = torch.tensor([[-1.05, 0.0, height]], dtype=F64)  # just off the end of moon A
    query = query / query.norm()
    a = mutual_knn_affinity(x, k=12, gamma=3.0)
    y = query_seeds(query, x, k=5, gamma=3.0)
    assert bool(on_a[y[:, 0] > 0].all())  # the seeds are at the end of A
    f = diffusion_scores(a, y)[:, 0]
    top = n // 2
    ranked = torch.sort(f, descending=True, stable=True).indices[:top]
    assert bool((f[ranked] > 0).all())  # a real ranking, not a tie among zeros
    precision_diffusion = float(on_a[ranked].double().mean())
    plain = torch.sort((x @ query.T)[:, 0], descending=True, stable=True).indices[:top]
    precision_plain = float(on_a[plain].double().mean())
    assert precision_diffusion >= 0.9, precision_diffusion
    assert int((~on_a[plain]).sum()) >= 5  # plain nearest neighbours rank points of B among the top
    assert precision_diffusion - precision_plain >= 0.15, (precision_diffusion, precision_plain)
