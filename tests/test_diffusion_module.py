"""The Diffusion re-ranker: global and regional, pooling, truncation, seeds, graph cache and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepagg import Diffusion, QueryExpansion, RerankChain, RerankState
from deepagg.functional import l2n
from deepagg.functional.diffusion import diffusion_scores, gmp_weights, mutual_knn_affinity, query_seeds


def _data(n: int = 120, q: int = 4, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return l2n(torch.randn(q, d, generator=g, dtype=torch.float64)), l2n(
        torch.randn(n, d, generator=g, dtype=torch.float64)
    )


def _regions(n: int, q: int, r: int = 5, d: int = 12, seed: int = 1):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    reg = l2n(torch.randn(n, r, d, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.rand(n, r, generator=g) > 0.3
    mask[:, 0] = True
    mask[3] = False  # an image without any region: score 0
    qreg = l2n(torch.randn(q, r, d, generator=g, dtype=torch.float64), dim=-1)
    qmask = torch.rand(q, r, generator=g) > 0.2
    qmask[:, 0] = True
    return reg, mask, qreg, qmask


def _reference_global(q: torch.Tensor, db: torch.Tensor, k: int, kq: int, **kw) -> torch.Tensor:  # type: ignore[no-untyped-def]
    a = mutual_knn_affinity(db, k=k)
    y = query_seeds(q, db, k=kq)
    return diffusion_scores(a, y, **kw).T  # type: ignore[union-attr]


def test_global_scores_are_the_functional_pipeline() -> None:
    q, db = _data()
    d = Diffusion(k=8, kq=5)
    got = d(q, db)
    torch.testing.assert_close(got, _reference_global(q, db, 8, 5), rtol=1e-10, atol=1e-12)
    assert d.graph is not None
    assert d.graph.shape == (120, 120)


def test_rerank_sorts_by_score_and_keeps_incoming_order_on_ties() -> None:
    q, db = _data()
    state = RerankState.initial(q, db)
    d = Diffusion(k=8, kq=5, max_iter=1)  # one CG step reaches the seeds' neighbours only: many zero scores
    out = d.rerank(state)
    s = d.scores(q)
    for i in range(q.shape[0]):
        r = out.ranks[i]
        assert sorted(r.tolist()) == list(range(120))
        vals = s[i, r]
        assert bool((vals[:-1] >= vals[1:]).all())
        zero = r[vals == 0]  # not reached: in the incoming (cosine) order
        pos = {int(j): p for p, j in enumerate(state.ranks[i].tolist())}
        assert [pos[int(j)] for j in zero] == sorted(pos[int(j)] for j in zero)
        assert zero.numel() > 0


def test_rerank_completes_a_truncated_incoming_ranking() -> None:
    q, db = _data()
    state = RerankState.initial(q, db)
    short = state.replace(ranks=state.ranks[:, :30])
    full = Diffusion(k=8, kq=5).rerank(state).ranks
    got = Diffusion(k=8, kq=5).rerank(short).ranks
    assert got.shape == (4, 120)
    s = Diffusion(k=8, kq=5)(q, db)
    torch.testing.assert_close(s.gather(1, got), s.gather(1, full))


def test_zero_queries() -> None:
    q, db = _data()
    out = Diffusion(k=8, kq=5).rerank(RerankState.initial(q[:0], db))
    assert out.ranks.shape == (0, 120)


def test_truncation_to_everything_equals_the_full_solve() -> None:
    q, db = _data()
    full = Diffusion(k=8, kq=5)(q, db)
    trunc = Diffusion(k=8, kq=5, truncate=500)(q, db)  # capped at N: the whole graph
    torch.testing.assert_close(trunc, full, rtol=1e-9, atol=1e-12)


def test_truncation_solves_each_query_on_its_shortlist() -> None:
    q, db = _data()
    t = 40
    got = Diffusion(k=8, kq=5, truncate=t)(q, db)
    a = mutual_knn_affinity(db, k=8)
    y = query_seeds(q, db, k=5)
    dense = a.to_dense()
    for i in range(q.shape[0]):
        sub = torch.topk(q[i] @ db.T, t).indices
        ds = dense[sub][:, sub]  # the sub-graph on its own: diffusion_scores rebuilds its degrees
        ref = diffusion_scores(ds, y[sub, i])  # same CG iterates as the full-graph solve restricted to sub
        torch.testing.assert_close(got[i, sub], ref, rtol=1e-9, atol=1e-12)
        outside = torch.ones(120, dtype=torch.bool)
        outside[sub] = False
        assert bool((got[i, outside] == 0).all())


def test_explicit_seeds() -> None:
    q, db = _data()
    d = Diffusion(k=8, kq=5).fit(db)
    y = torch.zeros(120, 4, dtype=torch.float64)
    y[7, 0] = y[9, 1] = y[11, 2] = y[13, 3] = 1.0
    got = d.scores(q, seeds=y)
    ref = diffusion_scores(mutual_knn_affinity(db, k=8), y).T  # type: ignore[union-attr]
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match=r"seeds must have shape \(M, Q\) = \(120, 4\) .* got \(120, 3\)"):
        d.scores(q, seeds=y[:, :3])


@pytest.mark.parametrize("pooling", ["gmp", "sum"])
def test_regional_scores_pool_region_solutions_per_image(pooling: str) -> None:
    q, db = _data(n=60)
    reg, mask, qreg, qmask = _regions(60, 4)
    d = Diffusion(regional=True, k=15, kq=20, pooling=pooling)
    got = d(q, db, q_regions=qreg, q_region_mask=qmask, db_regions=reg, db_region_mask=mask)
    # Reference: nodes are the valid regions in image order; seeds eq. 8; pooled with GMP (or 1) weights.
    nodes = reg[mask]
    owner = torch.arange(60)[:, None].expand(60, 5)[mask]
    w = gmp_weights(reg, mask)[mask] if pooling == "gmp" else torch.ones(nodes.shape[0], dtype=torch.float64)
    f = diffusion_scores(mutual_knn_affinity(nodes, k=15), query_seeds(qreg, nodes, k=20, mask=qmask))
    ref = torch.zeros(60, 4, dtype=torch.float64).index_add_(0, owner, f * w[:, None]).T  # type: ignore[operator]
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    assert bool((got[:, 3] == 0).all())  # the image without regions


def test_regional_needs_its_extras() -> None:
    q, db = _data(n=60)
    with pytest.raises(ValueError, match=r"regional diffusion needs the database regions \(N, R, D\)"):
        Diffusion(regional=True, k=10, kq=10).rerank(RerankState.initial(q, db))
    assert Diffusion(regional=True).requires == ("db_regions", "db_region_mask", "q_regions", "q_region_mask")
    assert Diffusion().requires == ()


def test_regional_reduction_keeps_at_most_n_unit_means_per_image() -> None:
    _q, db = _data(n=40)
    reg, mask, _qreg, _qmask = _regions(40, 2, r=8)
    d = Diffusion(regional=True, reduce_regions=3)
    assert (d.k, d.kq) == (50, 200)  # the paper's k with GMM reduction
    assert (Diffusion(regional=True).k, Diffusion().k, Diffusion().kq) == (200, 50, 10)
    d = Diffusion(regional=True, reduce_regions=3, k=10, kq=10)
    d.fit(db, reg, mask)
    nodes = d._fitted["nodes"]  # type: ignore[index]
    owner = d._fitted["node_image"]  # type: ignore[index]
    counts = torch.bincount(owner, minlength=40)
    assert int(counts.max()) <= 3
    assert bool((counts == torch.clamp(mask.sum(1), max=3)).all())
    torch.testing.assert_close(nodes.norm(dim=1), torch.ones(nodes.shape[0], dtype=torch.float64))


def test_transductive_is_another_method_and_named() -> None:
    q, db = _data()
    ind = Diffusion(k=8, kq=5)(q, db)
    tr_mod = Diffusion(k=8, kq=5, mode="transductive")
    tr = tr_mod(q, db)
    assert tr.shape == ind.shape
    assert not torch.allclose(tr, ind)
    assert "mode='transductive'" in repr(tr_mod)
    assert tr_mod.graph is None
    # Reference: the graph of database + queries, seeded with 1 on each query's node.
    allx = torch.cat([db, q])
    y = torch.zeros(124, 4, dtype=torch.float64)
    y[120 + torch.arange(4), torch.arange(4)] = 1.0
    ref = diffusion_scores(mutual_knn_affinity(allx, k=8), y)[:120].T  # type: ignore[index]
    torch.testing.assert_close(tr, ref)


def test_iscen_variant_counts_self_in_k() -> None:
    _q, db = _data()
    d = Diffusion(k=8, kq=5, variant="iscen").fit(db)
    assert d.graph_k == 7
    assert int((d.graph.to_dense() > 0).sum(1).max()) <= 7  # type: ignore[union-attr]
    torch.testing.assert_close(d.graph.to_dense(), mutual_knn_affinity(db, k=7).to_dense())  # type: ignore[union-attr]


def test_graph_for_other_descriptors_is_refused() -> None:
    q, db = _data()
    d = Diffusion(k=8, kq=5)
    d.rerank(RerankState.initial(q, db))
    d.rerank(RerankState.initial(q, db.clone()))  # same content: fine
    other = db.clone()
    other[0] = l2n(torch.ones(1, 12, dtype=torch.float64))[0]
    with pytest.raises(ValueError, match=r"the graph was built for other descriptors \(120 database rows, sha256 "):
        d.rerank(RerankState.initial(q, other))
    with pytest.raises(ValueError, match=r"graph was built for other descriptors .* got 60 rows"):
        d.rerank(RerankState.initial(q, db[:60]))


def test_scores_before_fit_is_an_error() -> None:
    q, _ = _data()
    with pytest.raises(RuntimeError, match=r"Diffusion.scores\(\): call fit\(db, ...\) first"):
        Diffusion().scores(q)


def test_k_must_be_below_the_number_of_nodes() -> None:
    _q, db = _data(n=20)
    with pytest.raises(ValueError, match=r"k must be < the number of graph nodes 20 .* got k = 20"):
        Diffusion(k=20, kq=5).fit(db)
    with pytest.raises(ValueError, match=r"got k = 21 \(k - 1 neighbours in variant iscen\)"):
        Diffusion(k=21, kq=5, variant="iscen").fit(db)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.0}, r"alpha must be a float in \(0.0, 1.0\); got 1.0"),
        ({"alpha": 0}, r"alpha must be a float in \(0.0, 1.0\); got 0"),
        ({"kq": 0}, r"kq must be an int >= 1 or None; got 0"),
        ({"k": True}, r"k must be an int >= 1 or None; got True"),
        ({"gamma": -1.0}, r"gamma must be a float > 0.0; got -1.0"),
        ({"pooling": "max"}, r"pooling must be one of \('gmp', 'sum'\); got 'max'"),
        ({"mode": "online"}, r"mode must be one of \('inductive', 'transductive'\); got 'online'"),
        ({"variant": "fyang"}, r"variant must be one of \('paper', 'iscen'\); got 'fyang'"),
        ({"index": "hnsw"}, r"index='hnsw' needs backend='faiss'"),
        ({"reduce_regions": 5}, r"reduce_regions applies to regional diffusion; set regional=True"),
        ({"tol": -1.0}, r"tol must be a finite float >= 0; got -1.0"),
        ({"truncate": 0}, r"truncate must be an int >= 1 or None; got 0"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Diffusion(**kwargs)


def test_graph_cache_is_written_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q, db = _data()
    first = Diffusion(k=8, kq=5, cache_dir=tmp_path)(q, db)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    assert "-k8-g3-torch-flat" in files[0].name
    import deepagg.nn.diffusion as mod

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the cached graph must be reused")

    monkeypatch.setattr(mod, "mutual_knn_affinity", boom)
    second = Diffusion(k=8, kq=5, cache_dir=tmp_path)(q, db)
    torch.testing.assert_close(second, first)
    monkeypatch.undo()
    files[0].write_bytes(b"not a torch file")  # a corrupt cache is rebuilt (and rewritten)
    third = Diffusion(k=8, kq=5, cache_dir=tmp_path)(q, db)
    torch.testing.assert_close(third, first)
    assert files[0].stat().st_size > 100
    Diffusion(k=9, kq=5, cache_dir=tmp_path)(q, db)  # other options: another file
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_chain_with_query_expansion() -> None:
    q, db = _data()
    chain = RerankChain([QueryExpansion(k=3), Diffusion(k=8, kq=5)])
    out = chain.rerank(RerankState.initial(q, db))
    expanded = QueryExpansion(k=3)(q, db)
    s = Diffusion(k=8, kq=5)(expanded, db)
    torch.testing.assert_close(s.gather(1, out.ranks), s.sort(dim=1, descending=True).values)


def test_float32_matches_float64() -> None:
    q, db = _data()
    s64 = Diffusion(k=8, kq=5)(q, db)
    s32 = Diffusion(k=8, kq=5)(q.float(), db.float())
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32.double(), s64, rtol=1e-3, atol=1e-5)


def test_without_scipy_the_graph_keeps_its_order_and_the_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    q, db = _data()
    with_rcm = Diffusion(k=8, kq=5)(q, db)
    import deepagg.functional.diffusion as fd

    monkeypatch.setattr(fd, "_locality_order", lambda s: None)  # what happens where SciPy is not installed
    d = Diffusion(k=8, kq=5)
    plain = d(q, db)
    assert d.operator is not None
    assert d.operator.perm is None
    torch.testing.assert_close(plain, with_rcm, rtol=1e-10, atol=1e-12)


def test_rerank_takes_explicit_seeds_from_the_state() -> None:
    q, db = _data()
    y = torch.zeros(120, 4, dtype=torch.float64)
    y[[5, 6, 7, 8], torch.arange(4)] = 1.0
    d = Diffusion(k=8, kq=5)
    ranks = d.rerank(RerankState.initial(q, db, diffusion_seeds=y)).ranks
    s = d.scores(q, seeds=y)
    torch.testing.assert_close(s.gather(1, ranks), s.sort(dim=1, descending=True).values)
    assert ranks[:, 0].tolist() == [5, 6, 7, 8]
