"""deepagg.DSM: extraction, inliers, re-ranking by inliers, spatially verified diffusion seeds, errors."""

from __future__ import annotations

import pytest
import torch

from deepagg import DSM, Diffusion, RerankChain, RerankState
from deepagg.functional import LocalFeatures, l2n, spatial_match
from deepagg.nn.spatial import LOCAL_FEATURE_EXTRAS


def _blob_maps(n_img: int, *, c: int = 24, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    """Sparse activations: a few Gaussian blobs per image in random channels (MSER finds them)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    maps = torch.zeros(n_img, c, h, w)
    for b in range(n_img):
        for _ in range(12):
            ch = int(torch.randint(0, c, (1,), generator=g))
            cx = float(torch.rand(1, generator=g)) * (w - 8) + 4
            cy = float(torch.rand(1, generator=g)) * (h - 8) + 4
            sx, sy = 1.0 + 2 * float(torch.rand(1, generator=g)), 1.0 + 2 * float(torch.rand(1, generator=g))
            maps[b, ch] += 5 * torch.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
    return maps


def _random_features(n_img: int, n: int, *, channels: int = 6, scales: int = 1, seed: int = 0) -> LocalFeatures:
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(n_img, n, 2, generator=g) * 20
    m = torch.randn(n_img, n, 2, 2, generator=g)
    cov = m @ m.mT + 0.5 * torch.eye(2)
    return LocalFeatures(
        centers,
        cov,
        torch.rand(n_img, n, generator=g),
        torch.randint(0, channels, (n_img, n), generator=g),
        torch.randint(0, scales, (n_img, n), generator=g),
        torch.ones(n_img, n, dtype=torch.bool),
        torch.full((n_img, scales, 2), 24, dtype=torch.int64),
    )


def _warped(f: LocalFeatures, a: float = 1.1, b: float = 0.1, c: float = 0.9, t: tuple[float, float] = (2.0, -1.0)):
    lin = torch.tensor([[a, 0.0], [b, c]])
    return LocalFeatures(
        f.centers @ lin.T + torch.tensor(t),
        lin @ f.covariances @ lin.T,
        f.strengths,
        f.channels,
        f.scales,
        f.mask,
        f.map_sizes,
    )


class TestExtractAndInliers:
    def test_extract_is_activation_features_with_the_module_settings(self) -> None:
        maps = _blob_maps(2)
        dsm = DSM(scales=(1.0,), max_features=7, detector={"delta": 12})
        f = dsm.extract(maps)
        assert len(f) == 2
        assert int(f.counts().max()) <= 7
        q = dsm.extract(maps[0], query=True)
        assert len(q) == 1

    def test_inliers_equal_spatial_match_and_accept_a_list(self) -> None:
        q = _random_features(1, 30, seed=1)
        db = LocalFeatures.cat([_warped(q), _random_features(1, 30, seed=2), _random_features(1, 20, seed=3)])
        dsm = DSM(scales=(1.0,))
        got = dsm.inliers(q, db)
        want = spatial_match(q, db, error=2.0, max_scale_change=3.0, lo_iters=3).inliers
        assert got.dtype == torch.int64
        assert torch.equal(got, want)
        assert torch.equal(dsm.inliers(q, [db[0], db[1], db[2]]), want)
        assert torch.equal(dsm(q, db), want)
        assert int(got[0]) > int(got[1:].max())  # the warped copy verifies

    def test_inliers_refuse_several_query_images(self) -> None:
        q = _random_features(2, 5)
        with pytest.raises(ValueError, match=r"DSM.match\(\): query must hold one image's features; got 2 images"):
            DSM().inliers(q, q)

    def test_database_must_be_features(self) -> None:
        q = _random_features(1, 5)
        with pytest.raises(TypeError, match=r"DSM: database must be LocalFeatures \(DSM.extract\) or a list of them"):
            DSM().inliers(q, torch.zeros(3))
        with pytest.raises(ValueError, match=r"DSM: database must hold at least one image's features"):
            DSM().inliers(q, [])


def _state(n_db: int = 8, n_q: int = 3, seed: int = 0) -> RerankState:
    g = torch.Generator().manual_seed(seed)
    q = l2n(torch.randn(n_q, 16, generator=g))
    db = l2n(torch.randn(n_db, 16, generator=g))
    qf = _random_features(n_q, 25, seed=seed + 10)
    # database image 2k+1 is a warp of query k (k < n_q): it must move up
    parts = [_random_features(1, 25, seed=seed + 100 + i) for i in range(n_db)]
    for k in range(n_q):
        parts[2 * k + 1] = _warped(qf[k])
    return RerankState.initial(q, db, q_local_features=qf, db_local_features=LocalFeatures.cat(parts))


class TestRerank:
    def test_top_is_sorted_by_inliers_ties_in_incoming_order_rest_unchanged(self) -> None:
        state = _state()
        top = 5
        dsm = DSM(top=top, scales=(1.0,))
        out = dsm.rerank(state)
        qf, dbf = state.extras["q_local_features"], state.extras["db_local_features"]
        for i in range(state.q.shape[0]):
            short = state.ranks[i, :top]
            inl = [int(dsm.inliers(qf[i], dbf[int(j)])[0]) for j in short]
            # reference: stable sort by decreasing inliers
            order = sorted(range(top), key=lambda k: -inl[k])
            assert out.ranks[i, :top].tolist() == [int(short[k]) for k in order]
            assert out.extras["dsm_inliers"][i].tolist() == [inl[k] for k in order]
            assert torch.equal(out.ranks[i, top:], state.ranks[i, top:])
        assert torch.equal(out.extras["dsm_ranks"], out.ranks[:, :top])
        assert dsm.last_verification is not None
        assert torch.equal(dsm.last_verification["inliers"], out.extras["dsm_inliers"])

    def test_warped_copy_moves_first(self) -> None:
        state = _state()
        out = DSM(top=8, scales=(1.0,)).rerank(state)
        for k in range(state.q.shape[0]):
            assert int(out.ranks[k, 0]) == 2 * k + 1

    def test_pairs_per_call_does_not_change_the_result(self) -> None:
        state = _state()
        a = DSM(top=8, scales=(1.0,), pairs_per_call=1).rerank(state)
        b = DSM(top=8, scales=(1.0,)).rerank(state)
        assert torch.equal(a.ranks, b.ranks)
        assert torch.equal(a.extras["dsm_inliers"], b.extras["dsm_inliers"])

    def test_top_larger_than_the_ranking_and_zero_queries(self) -> None:
        state = _state(n_db=4, n_q=2)
        out = DSM(top=100, scales=(1.0,)).rerank(state)
        assert out.ranks.shape == (2, 4)
        assert sorted(out.ranks[0].tolist()) == [0, 1, 2, 3]
        empty = RerankState.initial(
            torch.zeros(0, 16),
            state.db,
            q_local_features=LocalFeatures.empty(0),
            db_local_features=state.extras["db_local_features"],
        )
        assert DSM(scales=(1.0,)).rerank(empty).ranks.shape == (0, 4)

    def test_missing_or_mismatched_extras(self) -> None:
        state = _state()
        with pytest.raises(ValueError, match=r"DSM.rerank\(\): the state lacks the extras \['q_local_features'"):
            DSM().rerank(RerankState.initial(state.q, state.db))
        bad = state.replace(extras={**state.extras, "q_local_features": state.extras["q_local_features"][0]})
        with pytest.raises(ValueError, match=r"local features for 1 queries and 8 database images; the state has 3"):
            DSM().rerank(bad)

    def test_requires_names_the_local_features(self) -> None:
        assert DSM.requires == LOCAL_FEATURE_EXTRAS == ("q_local_features", "db_local_features")
        assert set(RerankChain([DSM()]).requires) == set(LOCAL_FEATURE_EXTRAS)


class TestVerifiedDiffusion:
    def _reference_seeds(self, q, db, ranks, inliers, verified, seeds):  # type: ignore[no-untyped-def]
        """Section 3.6 with explicit loops (float64)."""
        out = torch.zeros(db.shape[0], q.shape[0], dtype=torch.float64)
        for i in range(q.shape[0]):
            v = min(verified, ranks.shape[1])
            inl = [float(x) for x in inliers[i, :v]]
            top = max(inl)
            w = [x / top if top > 0 else 0.0 for x in inl]
            y = [max(w[k] * float(q[i].double() @ db[int(ranks[i, k])].double()), 0.0) for k in range(v)]
            if not any(val > 0 for val in y):
                y = w
            order = sorted(range(v), key=lambda k: -y[k])[:seeds]
            for k in order:
                out[int(ranks[i, k]), i] = y[k]
        return out

    def test_seeds_match_a_loop_reference(self) -> None:
        state = _state(n_db=12, n_q=3)
        diff = Diffusion(k=3, kq=2)
        dsm = DSM(top=12, scales=(1.0,), diffusion=diff, verified=6, seeds=3)
        diff.fit(state.db)
        g = torch.Generator().manual_seed(5)
        inliers = torch.randint(0, 9, (3, 12), generator=g)
        inliers[1] = torch.tensor([7, 7, 3, 0, 0, 5, 1, 1, 1, 1, 1, 1])  # ties: the better rank first
        got = dsm.verified_seeds(state.q, state.db, state.ranks, inliers)
        want = self._reference_seeds(state.q, state.db, state.ranks, inliers, 6, 3)
        assert torch.allclose(got.double(), want, atol=1e-6)
        assert ((got > 0).sum(0) <= 3).all()

    def test_query_without_inliers_falls_back_to_eq7_seeds(self) -> None:
        state = _state(n_db=12, n_q=2)
        diff = Diffusion(k=3, kq=2)
        diff.fit(state.db)
        dsm = DSM(top=12, scales=(1.0,), diffusion=diff)
        inliers = torch.zeros(2, 12, dtype=torch.int64)
        inliers[1, 0] = 4
        got = dsm.verified_seeds(state.q, state.db, state.ranks, inliers)
        assert torch.allclose(got[:, 0], diff.seeds(state.q[:1])[:, 0])
        assert int((got[:, 1] != 0).sum()) >= 1

    def test_dsm_diffusion_equals_diffusion_with_the_verified_seeds(self) -> None:
        state = _state(n_db=12, n_q=3)
        dsm = DSM(top=12, scales=(1.0,), diffusion=Diffusion(k=3, kq=2), verified=10, seeds=5)
        out = dsm.rerank(state)
        plain = DSM(top=12, scales=(1.0,)).rerank(state)
        diff = Diffusion(k=3, kq=2)
        diff.fit(state.db)
        seeds = dsm.verified_seeds(state.q, state.db, plain.extras["dsm_ranks"], plain.extras["dsm_inliers"])
        want = diff.rerank(plain.replace(extras={**plain.extras, "diffusion_seeds": seeds}))
        assert torch.equal(out.ranks, want.ranks)
        assert "diffusion_seeds" not in out.extras
        assert torch.equal(out.extras["dsm_inliers"], plain.extras["dsm_inliers"])


class TestArguments:
    @pytest.mark.parametrize(
        ("kwargs", "err", "msg"),
        [
            ({"top": 0}, ValueError, r"DSM\(\): top must be >= 1; got 0"),
            ({"scales": ()}, ValueError, r"DSM\(\): scales must be a non-empty list of positive numbers; got \[\]"),
            ({"scales": (1.0, -0.5)}, ValueError, r"scales must be a non-empty list of positive numbers; got \[1.0"),
            ({"max_features": 0}, ValueError, r"DSM\(\): max_features must be >= 1; got 0"),
            ({"error": 0.0}, ValueError, r"DSM\(\): error must be > 0; got 0.0"),
            ({"max_scale_change": 0.5}, ValueError, r"DSM\(\): max_scale_change must be >= 1; got 0.5"),
            ({"lo_iters": -1}, ValueError, r"DSM\(\): lo_iters must be >= 0; got -1"),
            ({"detector": {"query": True}}, ValueError, r"DSM\(\): detector must not set \['query'\]"),
            ({"diffusion": "d"}, TypeError, r"DSM\(\): diffusion must be a deepagg.Diffusion or None; got str"),
            ({"diffusion": Diffusion(regional=True)}, ValueError, r"DSM\(\): diffusion must be global"),
            ({"verified": 0}, ValueError, r"DSM\(\): verified must be >= 1; got 0"),
            ({"seeds": 0}, ValueError, r"DSM\(\): seeds must be >= 1; got 0"),
            ({"pairs_per_call": 0}, ValueError, r"DSM\(\): pairs_per_call must be >= 1; got 0"),
        ],
    )
    def test_bad_arguments(self, kwargs: dict, err: type[Exception], msg: str) -> None:
        with pytest.raises(err, match=msg):
            DSM(**kwargs)

    def test_repr_names_the_settings(self) -> None:
        r = repr(DSM(top=50, diffusion=Diffusion()))
        assert "top=50" in r
        assert "verified=10, seeds=5" in r
        assert "max_scale_change=3" in r
