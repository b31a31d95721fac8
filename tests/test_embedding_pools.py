"""Tests of TEmbPool / VLADPool / FisherVectorPool: the fitted pipeline against a float64 literal reference."""

from __future__ import annotations

import math

import pytest
import torch

import deepagg
from deepagg._checks import ShapeError
from deepagg.nn.embedding import CLAMPED_EIGENVALUES, FisherVectorPool, TEmbPool, VLADPool

from ._base import BaseTester


def _maps(b: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Sparse non-negative float64 maps (post-ReLU-like: about half the entries are 0)."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(b, c, h, w, generator=g, dtype=torch.float64))


def _fitted(cls: type = TEmbPool, seed: int = 0, **kw: object) -> torch.nn.Module:
    kw.setdefault("mask", "max")
    kw.setdefault("d", 8)
    kw.setdefault("k", 20)
    g = torch.Generator().manual_seed(seed)
    return cls(**kw).fit(_maps(12, 24, 6, 7, seed=100 + seed), generator=g)


# ------------------------------------------------------------------------------------------------------------------
# A literal float64 transcription of the authors' per-image pipeline (tembsink / vlad / fv + learn_rn + power).
# ------------------------------------------------------------------------------------------------------------------


def _l2(v: list[float]) -> list[float]:
    n = math.sqrt(sum(t * t for t in v))
    return [t / n for t in v] if n > 0 else [0.0 for _ in v]


def _matvec_t(v: list[float], m: torch.Tensor) -> list[float]:
    """v @ m for a list v and a (len(v), K) matrix m."""
    rows = m.double().tolist()
    return [sum(v[i] * rows[i][j] for i in range(len(v))) for j in range(len(rows[0]))]


def ref_select_max(img: torch.Tensor) -> list[tuple[int, int]]:
    c, h, w = img.shape
    chosen = set()
    for ch in range(c):
        vals = [float(img[ch, f // w, f % w]) for f in range(h * w)]
        best = max(vals)
        if best != 0:
            chosen.add(vals.index(best))  # first maximum: lower flat index
    return [(f // w, f % w) for f in sorted(chosen) if any(float(img[q, f // w, f % w]) != 0 for q in range(c))]


def ref_pool(pool: torch.nn.Module, img: torch.Tensor, cells: list[tuple[int, int]]) -> torch.Tensor:
    mean = pool.local_mean.double().tolist()
    xes = []
    for i, j in cells:
        f = [float(img[q, i, j]) - mean[q] for q in range(img.shape[0])]
        xes.append(_l2(_matvec_t(f, pool.local_proj)))
    phis = []
    for xe in xes:
        if isinstance(pool, TEmbPool):
            phi: list[float] = []
            for a in pool.anchors.double().tolist():
                phi += _l2([xe[t] - a[t] for t in range(len(xe))])
            m = pool.emb_mean.double().tolist()
            phi = _matvec_t([phi[t] - m[t] for t in range(len(phi))], pool.emb_whiten)
        elif isinstance(pool, VLADPool):
            cents = pool.centroids.double().tolist()
            dists = [sum((xe[t] - c[t]) ** 2 for t in range(len(xe))) for c in cents]
            best = dists.index(min(dists))
            phi = []
            for q, c in enumerate(cents):
                phi += [xe[t] - c[t] for t in range(len(xe))] if q == best else [0.0] * len(xe)
        else:
            mu, var, wts = (
                pool.gmm_means.double().tolist(),
                pool.gmm_variances.double().tolist(),
                pool.gmm_weights.double().tolist(),
            )
            logp = []
            for q in range(len(wts)):
                s = math.log(wts[q])
                for t in range(len(xe)):
                    s += -0.5 * math.log(2 * math.pi * var[q][t]) - 0.5 * (xe[t] - mu[q][t]) ** 2 / var[q][t]
                logp.append(s)
            top = max(logp)
            post = [math.exp(v - top) for v in logp]
            post = [v / sum(post) for v in post]
            u: list[float] = []
            v2: list[float] = []
            for q in range(len(wts)):
                z = [(xe[t] - mu[q][t]) / math.sqrt(var[q][t]) for t in range(len(xe))]
                u += [post[q] / math.sqrt(wts[q]) * zt for zt in z]
                v2 += [post[q] / math.sqrt(2 * wts[q]) * (zt * zt - 1) for zt in z]
            phi = u + v2
        phis.append(phi)
    dim = pool.embed_dim(pool.d, pool.k)
    if pool.aggregation == "democratic":
        phis = [_l2(p) for p in phis]
        n = len(phis)
        g = [[max(sum(a * b for a, b in zip(phis[i], phis[j], strict=True)), 0.0) for j in range(n)] for i in range(n)]
        wts = [1.0] * n
        for _ in range(pool.iters):
            col = [sum(g[i][j] for i in range(n)) for j in range(n)]
            delta = [c**-pool.damping if c > 0 else 0.0 for c in col]
            g = [[g[i][j] * delta[i] * delta[j] for j in range(n)] for i in range(n)]
            wts = [wts[j] * delta[j] for j in range(n)]
        y = [sum(wts[i] * phis[i][t] for i in range(n)) for t in range(dim)]
    else:
        y = [sum(p[t] for p in phis) for t in range(dim)]
    y = _l2(y)
    rm = pool.rot_mean.double().tolist()
    z = _matvec_t([y[t] - rm[t] for t in range(dim)], pool.rotation)[pool.truncate :]
    z = [math.copysign(abs(t) ** pool.power, t) if t != 0 else 0.0 for t in z]
    return torch.tensor(_l2(z), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------------------


class TestTEmbPool(BaseTester):
    @pytest.mark.parametrize("aggregation", ["democratic", "sum"])
    @pytest.mark.parametrize("mask", ["max", None])
    def test_reference(self, aggregation: str, mask: str | None) -> None:
        pool = _fitted(mask=mask, aggregation=aggregation)
        x = _maps(2, 24, 4, 5, seed=7)
        out = pool(x)
        assert out.shape == (2, 8 * 20 - 128)
        assert out.dtype == torch.float64
        for b in range(2):
            cells = (
                ref_select_max(x[b])
                if mask == "max"
                else [(i, j) for i in range(4) for j in range(5) if bool((x[b, :, i, j] != 0).any())]
            )
            self.assert_close(out[b], ref_pool(pool, x[b], cells), rtol=1e-9, atol=1e-9)

    @pytest.mark.parametrize("cls", [VLADPool, FisherVectorPool])
    @pytest.mark.parametrize("aggregation", ["democratic", "sum"])
    def test_reference_vlad_fv(self, cls: type, aggregation: str) -> None:
        pool = _fitted(cls, mask="sum", d=4, k=3, aggregation=aggregation)
        x = _maps(2, 24, 5, 6, seed=8)
        out = pool(x)
        keep = deepagg.functional.masks.sum_mask(x) & (x != 0).any(1)
        for b in range(2):
            cells = [(i, j) for i in range(5) for j in range(6) if bool(keep[b, i, j])]
            self.assert_close(out[b], ref_pool(pool, x[b], cells), rtol=1e-9, atol=1e-9)

    @pytest.mark.parametrize(
        ("cls", "d", "k", "dim"),
        [(TEmbPool, 8, 20, 32), (TEmbPool, 32, 20, 512), (VLADPool, 4, 3, 12), (FisherVectorPool, 4, 3, 24)],
    )
    def test_out_dim(self, cls: type, d: int, k: int, dim: int) -> None:
        pool = cls(d=d, k=k)
        assert pool.out_dim(512) == dim

    def test_paper_dimensions(self) -> None:
        for (d, k), dim in {(32, 20): 512, (64, 18): 1024, (64, 34): 2048, (64, 66): 4096, (128, 64): 8064}.items():
            assert TEmbPool(d=d, k=k).out_dim(512) == dim

    def test_fit_determinism_and_state_dict(self) -> None:
        a, b = _fitted(seed=3), _fitted(seed=3)
        for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            torch.testing.assert_close(ta, tb, rtol=0, atol=0, msg=name)
        x = _maps(2, 24, 5, 6, seed=9)
        fresh = TEmbPool(mask="max", d=8, k=20)
        fresh.load_state_dict(a.state_dict())
        torch.testing.assert_close(fresh(x), a(x), rtol=0, atol=0)
        assert bool(fresh.fitted)

    def test_whitening_clamps_the_smallest_eigenvalues(self) -> None:
        pool = _fitted(mask=None, d=8, k=20)
        train = _maps(12, 24, 6, 7, seed=100)
        feats = train.flatten(2).mT.reshape(-1, 24)
        feats = feats[(feats != 0).any(1)].float()
        xe = deepagg.functional.l2n((feats - pool.local_mean) @ pool.local_proj)
        phi = deepagg.functional.triangulation_embedding(xe[None].double(), pool.anchors.double())[0]
        white = (phi - pool.emb_mean.double()) @ pool.emb_whiten.double()
        var = white.var(0, unbiased=False)
        dim = 160
        torch.testing.assert_close(
            var[: dim - CLAMPED_EIGENVALUES],
            torch.ones(dim - CLAMPED_EIGENVALUES, dtype=torch.float64),
            rtol=1e-3,
            atol=1e-3,
        )
        assert bool((var[dim - CLAMPED_EIGENVALUES :] <= 1 + 1e-3).all())

    def test_rotation_is_orthonormal(self) -> None:
        pool = _fitted()
        r = pool.rotation.double()
        torch.testing.assert_close(r.T @ r, torch.eye(r.shape[0], dtype=torch.float64), rtol=1e-5, atol=1e-5)

    def test_local_pca_is_the_top_components(self) -> None:
        pool = _fitted(mask=None)
        train = _maps(12, 24, 6, 7, seed=100)
        feats = train.flatten(2).mT.reshape(-1, 24)
        feats = feats[(feats != 0).any(1)]
        torch.testing.assert_close(pool.local_mean.double(), feats.mean(0), rtol=1e-6, atol=1e-6)
        _, vecs = torch.linalg.eigh(torch.cov(feats.T, correction=0))
        top = vecs[:, -8:]
        # Same subspace: the projector onto it is the same.
        p = pool.local_proj.double()
        torch.testing.assert_close(p @ p.T, top @ top.T, rtol=1e-4, atol=1e-4)

    def test_padded_batch_equals_single_images(self) -> None:
        pool = _fitted()
        sizes = [(6, 7), (4, 7), (6, 3), (3, 3)]
        singles = [_maps(1, 24, h, w, seed=30 + i) for i, (h, w) in enumerate(sizes)]
        x = torch.full((4, 24, 6, 7), float("nan"), dtype=torch.float64)
        mask = torch.zeros(4, 6, 7, dtype=torch.bool)
        for i, s in enumerate(singles):
            x[i, :, : s.shape[2], : s.shape[3]] = s[0]
            mask[i, : s.shape[2], : s.shape[3]] = True
        x[1, :, 4:, :] = float("inf")
        out = pool(x, mask)
        alone = torch.cat([pool(s) for s in singles])
        assert torch.isfinite(out).all()
        self.assert_close(out, alone, rtol=1e-9, atol=1e-9)

    def test_cardinality_and_unit_rows(self) -> None:
        pool = _fitted()
        assert pool(torch.zeros(0, 24, 5, 6, dtype=torch.float64)).shape == (0, 32)
        out = pool(_maps(2, 24, 9, 4, seed=5).float())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2), rtol=1e-5, atol=1e-5)

    def test_all_zero_map_is_finite(self) -> None:
        pool = _fitted()
        out = pool(torch.zeros(2, 24, 5, 6))
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("cls", [TEmbPool, VLADPool])
    def test_gradcheck(self, cls: type) -> None:
        kw = {"d": 8, "k": 17} if cls is TEmbPool else {"d": 3, "k": 2, "aggregation": "democratic"}
        pool = _fitted(cls, mask="max", **kw)
        x = (_maps(1, 24, 3, 3, seed=11) + 0.1).requires_grad_(True)
        assert self.gradcheck(lambda t: pool(t), (x,))

    def test_sequential_and_repr(self) -> None:
        pool = _fitted()
        net = torch.nn.Sequential(torch.nn.Identity(), pool)
        assert net(_maps(2, 24, 5, 6, seed=1)).shape == (2, 32)
        assert repr(TEmbPool()) == "TEmbPool(mask='max', d=32, k=20, aggregation='democratic', power=0.5)"
        assert deepagg.TEmbPool is TEmbPool
        assert deepagg.nn.VLADPool is VLADPool

    def test_compile(self) -> None:
        pool = _fitted()
        x = _maps(2, 24, 5, 6, seed=12)
        compiled = torch.compile(pool, backend="eager", fullgraph=True)
        self.assert_close(compiled(x), pool(x), rtol=1e-9, atol=1e-9)

    def test_power_extremes(self) -> None:
        x = _maps(2, 24, 5, 6, seed=13)
        linear = _fitted(power=1.0)(x)  # l2n(z): the rotated, truncated vector without power law
        cells = ref_select_max(x[0])
        self.assert_close(linear[0], ref_pool(_fitted(power=1.0), x[0], cells), rtol=1e-9, atol=1e-9)
        self.assert_close(_fitted(power=0.0)(x), deepagg.functional.l2n(torch.sign(linear)), rtol=1e-9, atol=1e-9)
        self.assert_close(_fitted(power=0.5)(x), deepagg.functional.l2n(torch.sign(linear) * linear.abs().sqrt()))

    # -------------------------------------------------------------------------------------------------- errors
    def test_forward_before_fit(self) -> None:
        with pytest.raises(RuntimeError, match=r"TEmbPool.forward\(\): the pool is not fitted; call fit"):
            TEmbPool()(torch.rand(1, 64, 4, 4))

    @pytest.mark.parametrize(
        ("kw", "msg"),
        [
            ({"mask": "min"}, "TEmbPool: mask must be one of 'max', 'sum', 'sift' or None; got 'min'."),
            ({"k": 1}, r"TEmbPool\(\): k must be >= 2; got 1."),
            ({"aggregation": "max"}, "TEmbPool: aggregation must be 'democratic' or 'sum'; got 'max'."),
            ({"d": 4, "k": 20}, "TEmbPool: the embedding dimension 80 .* must exceed the 128 leading dimensions"),
            ({"power": 1.5}, r"TEmbPool: power must be a number in \[0, 1\]"),
        ],
    )
    def test_exception_init(self, kw: dict, msg: str) -> None:
        with pytest.raises(ValueError, match=msg):
            TEmbPool(**kw)

    def test_d_larger_than_c(self) -> None:
        with pytest.raises(ValueError, match=r"TEmbPool.fit\(\): d=32 must be at most the channel count C=16"):
            TEmbPool(d=32).fit(torch.rand(2, 16, 4, 4))

    def test_too_few_features(self) -> None:
        with pytest.raises(ValueError, match=r"hold 0 selected local features; at least k=20 are needed"):
            TEmbPool(d=8).fit(torch.zeros(2, 16, 4, 4))

    def test_sift_needs_images(self) -> None:
        with pytest.raises(
            ValueError, match=r"TEmbPool\(mask=.sift.\): images= \(or a precomputed selection=\) is required"
        ):
            TEmbPool(mask="sift", d=8).fit(torch.rand(2, 16, 4, 4))

    def test_wrong_channels(self) -> None:
        pool = _fitted()
        with pytest.raises(ShapeError, match=r"x must have C = 24 channels \(the pool was fitted on 24\)"):
            pool(torch.rand(1, 16, 4, 4))

    def test_none_string_is_none(self) -> None:
        assert TEmbPool(mask="none").mask is None

    def test_sift_mask_pool(self) -> None:
        g = torch.Generator().manual_seed(0)
        maps = _maps(3, 24, 4, 4, seed=40)
        images = torch.rand(3, 3, 64, 64, generator=g)
        pool = TEmbPool(mask="sift", d=8, k=20).fit(maps, images=images, generator=g)
        keep = pool.select(maps, None, images)
        expected = deepagg.functional.masks.sift_mask(images, (4, 4)) & (maps != 0).any(1)
        assert torch.equal(keep, expected)
        out = pool(maps, images=images)
        assert out.shape == (3, 32)
        torch.testing.assert_close(pool(maps, selection=keep), out, rtol=0, atol=0)
