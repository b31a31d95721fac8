"""Tests of the T-emb / VLAD / Fisher embeddings, democratic weights and the k-means / GMM fits.

Every function is checked against a float64 literal-loop reference written here (per image, per feature, per
anchor; for the democratic weights a transcription of the authors' ``sinkhornm.m`` iteration on Python lists).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from deepagg._checks import DeviceError, DTypeError, ShapeError
from deepagg.functional import embedding
from deepagg.functional.embedding import (
    _reseed_empty,
    democratic_weights,
    fisher_embedding,
    fit_gmm,
    kmeans,
    triangulation_embedding,
    vlad_embedding,
)

from ._base import BaseTester

HALF = [torch.float16, torch.bfloat16]
DTYPES = [*HALF, torch.float32, torch.float64]
HALF_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in t]


# --------------------------------------------------------------------------------------------------------------
# The references: Python loops over images, features and anchors, float64.
# --------------------------------------------------------------------------------------------------------------


def ref_triangulation(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Eq. 6: per feature, per anchor, the residual divided by its norm (a zero residual stays zero)."""
    out = []
    for img in x:
        feats = []
        for f in _rows(img):
            emb: list[float] = []
            for c in _rows(anchors):
                r = [a - b for a, b in zip(f, c, strict=True)]
                norm = math.sqrt(sum(v * v for v in r))
                emb += [v / norm if norm > 0 else 0.0 for v in r]
            feats.append(emb)
        out.append(feats)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape[0], x.shape[1], -1)


def ref_vlad(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Eq. 5: the residual to the nearest centroid (first one on ties) in its block, zeros elsewhere."""
    cs = _rows(centroids)
    k, d = len(cs), centroids.shape[1]
    out = []
    for img in x:
        feats = []
        for f in _rows(img):
            best, best_dist = 0, math.inf
            for j, c in enumerate(cs):
                dist = sum((a - b) ** 2 for a, b in zip(f, c, strict=True))
                if dist < best_dist:  # strict: a tie keeps the lower index
                    best, best_dist = j, dist
            emb = [0.0] * (k * d)
            emb[best * d : (best + 1) * d] = [a - b for a, b in zip(f, cs[best], strict=True)]
            feats.append(emb)
        out.append(feats)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape[0], x.shape[1], k * d)


def ref_fisher(x: torch.Tensor, means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 4 with the Gaussian densities written out (2 pi constant included, no log domain): moderate inputs."""
    mu, var, w = _rows(means), _rows(variances), [float(v) for v in weights]
    k, d = len(mu), means.shape[1]
    out = []
    for img in x:
        feats = []
        for f in _rows(img):
            dens = []
            for i in range(k):
                p = w[i]
                for t in range(d):
                    p *= math.exp(-((f[t] - mu[i][t]) ** 2) / (2 * var[i][t])) / math.sqrt(2 * math.pi * var[i][t])
                dens.append(p)
            post = [p / sum(dens) for p in dens]
            u: list[float] = []
            v: list[float] = []
            for i in range(k):
                z = [(f[t] - mu[i][t]) / math.sqrt(var[i][t]) for t in range(d)]
                u += [post[i] / math.sqrt(w[i]) * zt for zt in z]
                v += [post[i] / math.sqrt(2 * w[i]) * (zt * zt - 1) for zt in z]
            feats.append(u + v)  # all u_i, then all v_i
        out.append(feats)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape[0], x.shape[1], 2 * k * d)


def ref_democratic(phi: torch.Tensor, valid: list[bool], iters: int = 10, damping: float = 0.5) -> list[float]:
    """The authors' sinkhornm.m on one image's valid features, Python lists.

    G = max(phi phi^T, 0); lambda = 1; repeat: delta = 1 / colsum(G)^reg; G = G .* delta (columns);
    G = G .* delta' (rows); lambda = delta .* lambda. Documented deviation: a zero column sum gives delta = 0 (the
    MATLAB divides by zero), and a zero feature starts at weight 0 (so iters = 0 gives it 0 as well).
    """
    rows = _rows(phi)
    idx = [i for i in range(len(rows)) if valid[i]]
    vecs = [rows[i] for i in idx]
    n = len(vecs)
    g = [[max(sum(a * b for a, b in zip(vecs[i], vecs[j], strict=True)), 0.0) for j in range(n)] for i in range(n)]
    lam = [1.0 if g[i][i] > 0 else 0.0 for i in range(n)]
    for _ in range(iters):
        colsum = [sum(g[i][j] for i in range(n)) for j in range(n)]
        delta = [1.0 / s**damping if s > 0 else 0.0 for s in colsum]
        g = [[g[i][j] * delta[j] for j in range(n)] for i in range(n)]
        g = [[g[i][j] * delta[i] for j in range(n)] for i in range(n)]
        lam = [delta[j] * lam[j] for j in range(n)]
    out = [0.0] * len(rows)
    for pos, i in enumerate(idx):
        out[i] = lam[pos]
    return out


def ref_lloyd(x: torch.Tensor, seeds: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Lloyd's iteration from ``seeds``, Python loops (ties to the lower index; no cluster empties here)."""
    pts, cs = _rows(x), _rows(seeds)
    labels: list[int] = []
    for _ in range(iters):
        new = [
            min(range(len(cs)), key=lambda j: (sum((a - b) ** 2 for a, b in zip(p, cs[j], strict=True)), j))
            for p in pts
        ]
        if new == labels:
            break
        labels = new
        members = [[p for p, lab in zip(pts, labels, strict=True) if lab == j] for j in range(len(cs))]
        assert all(members), "the reference does not handle empty clusters"
        cs = [[sum(col) / len(m) for col in zip(*m, strict=True)] for m in members]
    return torch.tensor(cs, dtype=torch.float64)


def _padded(sizes: list[int], d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A padded batch of local features (garbage inf/nan in the padding), its mask and the images alone."""
    n = max(sizes)
    x = torch.full((len(sizes), n, d), float("nan"), dtype=torch.float64)
    x[:, -1, 0] = float("inf")
    mask = torch.zeros(len(sizes), n, dtype=torch.bool)
    singles = []
    for i, size in enumerate(sizes):
        img = _rand(1, size, d, seed=seed + i)
        x[i, :size] = img[0]
        mask[i, :size] = True
        singles.append(img)
    return x, mask, singles


def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return torch.compile(fn, backend="eager", fullgraph=True)


# --------------------------------------------------------------------------------------------------------------
# Embeddings.
# --------------------------------------------------------------------------------------------------------------


class TestTriangulationEmbedding(BaseTester):
    def test_smoke(self, device: torch.device, dtype: torch.dtype) -> None:
        out = triangulation_embedding(
            _rand(2, 7, 4, dtype=dtype).to(device), _rand(3, 4, seed=1, dtype=dtype).to(device)
        )
        assert out.shape == (2, 7, 12)
        assert out.dtype == dtype

    @pytest.mark.parametrize(("b", "n"), [(0, 5), (1, 0), (2, 3), (0, 0)])
    def test_cardinality(self, b: int, n: int) -> None:
        out = triangulation_embedding(_rand(b, n, 4), _rand(5, 4, seed=1))
        assert out.shape == (b, n, 20)  # k * d
        assert triangulation_embedding(_rand(2, 3, 4), _rand(0, 4)).shape == (2, 3, 0)

    def test_reference(self) -> None:
        x, anchors = _rand(2, 6, 3), _rand(4, 3, seed=1)
        self.assert_close(triangulation_embedding(x, anchors), ref_triangulation(x, anchors))

    def test_blocks_unit_norm_in_anchor_order(self) -> None:
        x, anchors = _rand(3, 9, 5), _rand(4, 5, seed=2)
        out = triangulation_embedding(x, anchors).reshape(3, 9, 4, 5)
        self.assert_close(out.norm(dim=-1), torch.ones(3, 9, 4))
        for j in range(4):  # block j is anchor j's direction
            r = x - anchors[j]
            self.assert_close(out[:, :, j], r / r.norm(dim=-1, keepdim=True))

    def test_zero_residual_gives_zero_block(self) -> None:
        anchors = _rand(3, 4, seed=3)
        x = torch.stack([anchors[1], anchors[1] + 1.0])[None].clone().requires_grad_()
        out = triangulation_embedding(x, anchors)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0, 0, 4:8], torch.zeros(4, dtype=torch.float64))
        self.assert_close(out[0, 0, :4].norm(), torch.tensor(1.0).double())
        self.assert_close(out[0, 1, 4:8], torch.full((4,), 0.5).double())
        out.sum().backward()
        assert torch.isfinite(x.grad).all()  # type: ignore[arg-type]

    def test_no_mean_removal(self) -> None:
        # One feature, one anchor: the embedding is the unit residual itself, nothing subtracted or rotated.
        out = triangulation_embedding(torch.tensor([[[3.0, 4.0]]]), torch.zeros(1, 2))
        assert torch.equal(out, torch.tensor([[[0.6, 0.8]]]))

    def test_gradcheck(self) -> None:
        x = _rand(2, 3, 4).requires_grad_()
        anchors = _rand(3, 4, seed=1).requires_grad_()
        assert self.gradcheck(triangulation_embedding, (x, anchors))

    def test_compile(self) -> None:
        x, anchors = _rand(2, 5, 4, dtype=torch.float32), _rand(3, 4, seed=1, dtype=torch.float32)
        self.assert_close(_compiled(triangulation_embedding)(x, anchors), triangulation_embedding(x, anchors))

    def test_noncontiguous(self) -> None:
        x, anchors = _rand(2, 5, 4), _rand(3, 4, seed=1)
        expected = triangulation_embedding(x, anchors)
        self.assert_close(triangulation_embedding(self.noncontiguous(x), self.noncontiguous(anchors)), expected)

    @pytest.mark.parametrize("dt", DTYPES)
    def test_dtype_preserved(self, dt: torch.dtype) -> None:
        x, anchors = _rand(2, 5, 4, dtype=dt), _rand(3, 4, seed=1, dtype=dt)
        out = triangulation_embedding(x, anchors)
        assert out.dtype == dt
        tol = HALF_TOL.get(dt, 1e-6)
        torch.testing.assert_close(out.double(), ref_triangulation(x.double(), anchors.double()), rtol=tol, atol=tol)

    def test_exception(self) -> None:
        fn = r"triangulation_embedding\(\)"
        x = torch.randn(2, 3, 4)
        with pytest.raises(ShapeError, match=rf"{fn}: x must have shape \(B, N, d\); got \(3, 4\) with 2 dims"):
            triangulation_embedding(torch.randn(3, 4), torch.randn(2, 4))
        with pytest.raises(ShapeError, match=rf"{fn}: anchors must have shape \(k, d\) with d=4; got \(2, 5\)"):
            triangulation_embedding(x, torch.randn(2, 5))
        with pytest.raises(ShapeError, match=rf"{fn}: anchors must have shape \(k, d\); got \(4\) with 1 dims"):
            triangulation_embedding(x, torch.randn(4))
        with pytest.raises(DTypeError, match=rf"{fn}: x must be a floating-point tensor; got dtype torch.int64"):
            triangulation_embedding(x.long(), torch.randn(2, 4))
        with pytest.raises(DTypeError, match=rf"{fn}: anchors must be a floating-point tensor; got dtype torch.int32"):
            triangulation_embedding(x, torch.ones(2, 4, dtype=torch.int32))
        with pytest.raises(DeviceError, match=rf"{fn}: anchors must be on the same device as x \(cpu\); got meta"):
            triangulation_embedding(x, torch.randn(2, 4, device="meta"))


class TestVladEmbedding(BaseTester):
    def test_smoke(self, device: torch.device, dtype: torch.dtype) -> None:
        out = vlad_embedding(_rand(2, 7, 4, dtype=dtype).to(device), _rand(3, 4, seed=1, dtype=dtype).to(device))
        assert out.shape == (2, 7, 12)
        assert out.dtype == dtype

    @pytest.mark.parametrize(("b", "n"), [(0, 5), (1, 0), (2, 3)])
    def test_cardinality(self, b: int, n: int) -> None:
        assert vlad_embedding(_rand(b, n, 4), _rand(5, 4, seed=1)).shape == (b, n, 20)

    def test_reference(self) -> None:
        x, centroids = _rand(2, 8, 3), _rand(5, 3, seed=1)
        self.assert_close(vlad_embedding(x, centroids), ref_vlad(x, centroids))

    def test_one_block_per_feature_and_sum_is_vlad(self) -> None:
        x, centroids = _rand(2, 30, 4), _rand(6, 4, seed=4)
        out = vlad_embedding(x, centroids).reshape(2, 30, 6, 4)
        assert torch.equal((out.abs().sum(-1) > 0).sum(-1), torch.ones(2, 30, dtype=torch.long))
        # Summing over N gives Jegou et al.'s VLAD: v_j = sum over the features nearest to c_j of (x - c_j).
        nearest = torch.cdist(x, centroids).argmin(-1)
        for b in range(2):
            for j in range(6):
                expected = (x[b][nearest[b] == j] - centroids[j]).sum(0)
                self.assert_close(out[b, :, j].sum(0), expected)

    def test_tie_goes_to_lower_index(self) -> None:
        centroids = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        x = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])  # feature 0: tied between centroids 1, 2 and 3
        out = vlad_embedding(x, centroids).reshape(2, 4, 2)
        assert torch.equal(out[0, 1], torch.tensor([-1.0, 0.0]))
        assert torch.equal(out[0].abs().sum(-1), torch.tensor([0.0, 1.0, 0.0, 0.0]))
        assert torch.equal(out[1], torch.zeros(4, 2))  # feature 1 sits on centroid 1: a zero residual
        # The same tie with the centroids in the opposite order goes to the (new) lower index.
        flipped = vlad_embedding(x, centroids.flip(0)).reshape(2, 4, 2)
        assert torch.equal(flipped[0, 0], torch.tensor([0.0, 1.0]))  # x - (0, -1)
        assert torch.equal(flipped[0].abs().sum(-1), torch.tensor([1.0, 0.0, 0.0, 0.0]))

    def test_gradcheck(self) -> None:
        x = _rand(2, 4, 3).requires_grad_()
        centroids = _rand(3, 3, seed=1).requires_grad_()
        assert self.gradcheck(vlad_embedding, (x, centroids))

    def test_compile(self) -> None:
        x, centroids = _rand(2, 5, 4, dtype=torch.float32), _rand(3, 4, seed=1, dtype=torch.float32)
        self.assert_close(_compiled(vlad_embedding)(x, centroids), vlad_embedding(x, centroids))

    def test_noncontiguous(self) -> None:
        x, centroids = _rand(2, 5, 4), _rand(3, 4, seed=1)
        expected = vlad_embedding(x, centroids)
        self.assert_close(vlad_embedding(self.noncontiguous(x), self.noncontiguous(centroids)), expected)

    @pytest.mark.parametrize("dt", DTYPES)
    def test_dtype_preserved(self, dt: torch.dtype) -> None:
        x, centroids = _rand(2, 6, 4, dtype=dt), _rand(3, 4, seed=1, dtype=dt)
        out = vlad_embedding(x, centroids)
        assert out.dtype == dt
        tol = HALF_TOL.get(dt, 1e-6)
        torch.testing.assert_close(out.double(), ref_vlad(x.double(), centroids.double()), rtol=tol, atol=tol)

    def test_exception(self) -> None:
        fn = r"vlad_embedding\(\)"
        x = torch.randn(2, 3, 4)
        with pytest.raises(ShapeError, match=rf"{fn}: centroids must have at least one row \(k >= 1\); got shape"):
            vlad_embedding(x, torch.randn(0, 4))
        with pytest.raises(ShapeError, match=rf"{fn}: centroids must have shape \(k, d\) with d=4; got \(2, 3\)"):
            vlad_embedding(x, torch.randn(2, 3))
        with pytest.raises(ShapeError, match=rf"{fn}: x must have shape \(B, N, d\); got \(2, 3, 4, 1\) with 4"):
            vlad_embedding(x[..., None], torch.randn(2, 4))
        with pytest.raises(
            DTypeError, match=rf"{fn}: centroids must be a floating-point tensor; got dtype torch.int64"
        ):
            vlad_embedding(x, torch.ones(2, 4, dtype=torch.long))
        with pytest.raises(DeviceError, match=rf"{fn}: centroids must be on the same device as x \(cpu\); got meta"):
            vlad_embedding(x, torch.randn(2, 4, device="meta"))


def _gmm(k: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = _gen(seed)
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    variances = torch.rand(k, d, generator=g, dtype=torch.float64) + 0.5
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    return means.to(dtype), variances.to(dtype), (weights / weights.sum()).to(dtype)


class TestFisherEmbedding(BaseTester):
    def test_smoke(self, device: torch.device, dtype: torch.dtype) -> None:
        gmm = [t.to(device) for t in _gmm(3, 4, seed=1, dtype=dtype)]
        out = fisher_embedding(_rand(2, 7, 4, dtype=dtype).to(device), *gmm)
        assert out.shape == (2, 7, 24)
        assert out.dtype == dtype

    @pytest.mark.parametrize(("b", "n"), [(0, 5), (1, 0), (2, 3)])
    def test_cardinality(self, b: int, n: int) -> None:
        assert fisher_embedding(_rand(b, n, 4), *_gmm(5, 4, seed=1)).shape == (b, n, 40)  # 2 * k * d

    def test_reference(self) -> None:
        x = _rand(2, 6, 3)
        gmm = _gmm(4, 3, seed=2)
        self.assert_close(fisher_embedding(x, *gmm), ref_fisher(x, *gmm))

    def test_layout_means_then_variances(self) -> None:
        # VLFeat's vl_fisher order: [u_1, ..., u_k, v_1, ..., v_k].
        x = _rand(1, 5, 3)
        means, variances, weights = _gmm(2, 3, seed=3)
        out = fisher_embedding(x, means, variances, weights)
        logits = torch.log(weights) - 0.5 * (
            torch.log(variances).sum(-1) + ((x[0, :, None] - means) ** 2 / variances).sum(-1)
        )
        post = torch.softmax(logits, dim=-1)
        for i in range(2):
            z = (x[0] - means[i]) / variances[i].sqrt()
            self.assert_close(out[0, :, i * 3 : (i + 1) * 3], post[:, i, None] / weights[i].sqrt() * z)
            v = post[:, i, None] / (2 * weights[i]).sqrt() * (z * z - 1)
            self.assert_close(out[0, :, (2 + i) * 3 : (3 + i) * 3], v)

    def test_far_features_are_stable(self) -> None:
        # Densities underflow to 0 for every component (the reference's 0/0); the log domain keeps the posterior.
        means, variances, weights = _gmm(3, 4, seed=4)
        x = torch.full((1, 2, 4), 1e3, dtype=torch.float64)
        x[0, 1] = -1e3
        out = fisher_embedding(x, means, variances, weights)
        assert torch.isfinite(out).all()
        u = out[0, :, :12].reshape(2, 3, 4)
        assert torch.equal((u.abs().sum(-1) > 0).sum(-1), torch.ones(2, dtype=torch.long))  # one posterior of 1
        f32 = fisher_embedding(x.float(), means.float(), variances.float(), weights.float())
        assert torch.isfinite(f32).all()

    def test_gradcheck(self) -> None:
        x = _rand(2, 3, 2).requires_grad_()
        means, variances, weights = (t.clone().requires_grad_() for t in _gmm(3, 2, seed=5))
        assert self.gradcheck(fisher_embedding, (x, means, variances, weights))

    def test_compile(self) -> None:
        x, gmm = _rand(2, 5, 4, dtype=torch.float32), _gmm(3, 4, seed=1, dtype=torch.float32)
        self.assert_close(_compiled(fisher_embedding)(x, *gmm), fisher_embedding(x, *gmm))

    def test_noncontiguous(self) -> None:
        x = _rand(2, 5, 4)
        means, variances, weights = _gmm(3, 4, seed=1)
        expected = fisher_embedding(x, means, variances, weights)
        nc = self.noncontiguous
        self.assert_close(fisher_embedding(nc(x), nc(means), nc(variances), weights[::1]), expected)

    @pytest.mark.parametrize("dt", DTYPES)
    def test_dtype_preserved(self, dt: torch.dtype) -> None:
        x, gmm = _rand(2, 4, 3, dtype=dt), _gmm(2, 3, seed=1, dtype=dt)
        out = fisher_embedding(x, *gmm)
        assert out.dtype == dt
        tol = HALF_TOL.get(dt, 1e-6)
        ref = ref_fisher(x.double(), *(t.double() for t in gmm))
        torch.testing.assert_close(out.double(), ref, rtol=tol * 4, atol=tol * 4)

    def test_exception(self) -> None:
        fn = r"fisher_embedding\(\)"
        x = torch.randn(2, 3, 4)
        means, variances, weights = torch.randn(2, 4), torch.rand(2, 4) + 0.5, torch.full((2,), 0.5)
        with pytest.raises(ShapeError, match=rf"{fn}: means must have shape \(k, d\) with d=4; got \(2, 5\)"):
            fisher_embedding(x, torch.randn(2, 5), variances, weights)
        with pytest.raises(ShapeError, match=rf"{fn}: variances must have shape \(k, d\) with k=2; got \(3, 4\)"):
            fisher_embedding(x, means, torch.rand(3, 4), weights)
        with pytest.raises(ShapeError, match=rf"{fn}: weights must have shape \(k\) with k=2; got \(3\)"):
            fisher_embedding(x, means, variances, torch.rand(3))
        with pytest.raises(DTypeError, match=rf"{fn}: weights must be a floating-point tensor; got dtype torch.int64"):
            fisher_embedding(x, means, variances, torch.ones(2, dtype=torch.long))
        with pytest.raises(DeviceError, match=rf"{fn}: variances must be on the same device as x \(cpu\); got meta"):
            fisher_embedding(x, means, variances.to("meta"), weights)


# --------------------------------------------------------------------------------------------------------------
# Democratic weights.
# --------------------------------------------------------------------------------------------------------------


def _total_similarity(phi: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w_i * sum_j G0_ij w_j per feature, G0 the clipped Gram matrix."""
    gram = (phi @ phi.mT).clamp(min=0)
    return w * (gram @ w[..., None])[..., 0]


def _spread(s: torch.Tensor) -> torch.Tensor:
    return s.max(dim=-1).values / s.min(dim=-1).values


class TestDemocraticWeights(BaseTester):
    def test_smoke(self, device: torch.device, dtype: torch.dtype) -> None:
        w = democratic_weights(_rand(2, 7, 12, dtype=dtype).to(device))
        assert w.shape == (2, 7)
        assert w.dtype == dtype

    @pytest.mark.parametrize(("b", "n"), [(0, 5), (1, 0), (2, 3), (0, 0)])
    def test_cardinality(self, b: int, n: int) -> None:
        assert democratic_weights(_rand(b, n, 6)).shape == (b, n)
        assert democratic_weights(_rand(b, n, 6), torch.ones(b, n, dtype=torch.bool)).shape == (b, n)

    @pytest.mark.parametrize(("iters", "damping"), [(10, 0.5), (0, 0.5), (1, 0.5), (4, 1.0), (3, 0.0), (6, 0.3)])
    def test_reference(self, iters: int, damping: float) -> None:
        phi = _rand(2, 7, 5)
        w = democratic_weights(phi, iters=iters, damping=damping)
        expected = torch.tensor([ref_democratic(p, [True] * 7, iters, damping) for p in phi], dtype=torch.float64)
        self.assert_close(w, expected)

    def test_equalises_total_similarity(self) -> None:
        # The defining property: every feature's weighted total similarity w_i sum_j G0_ij w_j tends to be equal.
        phi = triangulation_embedding(_rand(3, 40, 8), _rand(6, 8, seed=9))
        uniform = _spread(_total_similarity(phi, torch.ones(3, 40, dtype=torch.float64)))
        ten = _spread(_total_similarity(phi, democratic_weights(phi)))
        fifty = _spread(_total_similarity(phi, democratic_weights(phi, iters=50)))
        assert torch.all(uniform > 1.5)
        assert torch.all(ten < 1 + 0.01 * (uniform - 1))
        assert torch.all(fifty - 1 < 1e-9)
        # and the common value is the fixed point colsum = 1 of the iteration
        self.assert_close(_total_similarity(phi, democratic_weights(phi, iters=50)), torch.ones(3, 40).double())

    def test_bursty_feature_downweighted(self) -> None:
        phi = _rand(1, 6, 8, seed=3)
        phi[0, 3:] = phi[0, 2]  # a burst of 4 identical features
        w = democratic_weights(phi, iters=30)
        assert torch.all(w[0, 2:] < w[0, :2].min())
        self.assert_close(w[0, 3:], w[0, 2].expand(3))

    def test_padded_batch_equals_single_images(self) -> None:
        x, mask, singles = _padded([5, 9, 1, 7], 6, seed=20)
        w = democratic_weights(x, mask)
        assert torch.isfinite(w).all()
        assert torch.all(w[~mask] == 0)
        for i, s in enumerate(singles):
            n = s.shape[1]
            self.assert_close(w[i, :n], democratic_weights(s)[0])
            self.assert_close(w[i, :n], torch.tensor(ref_democratic(s[0], [True] * n), dtype=torch.float64))

    def test_interior_mask(self) -> None:
        phi = _rand(1, 8, 5, seed=5)
        mask = torch.tensor([[True, False, True, True, False, True, True, True]])
        garbage = phi.clone()
        garbage[~mask] = float("nan")
        expected = torch.tensor([ref_democratic(phi[0], mask[0].tolist())], dtype=torch.float64)
        self.assert_close(democratic_weights(garbage, mask), expected)
        self.assert_close(democratic_weights(phi[:, mask[0]]), expected[:, mask[0]])

    def test_zero_vector_gets_zero_weight(self) -> None:
        phi = _rand(2, 6, 4, seed=6)
        phi[0, 2] = 0.0
        for iters in (0, 1, 10):
            w = democratic_weights(phi, iters=iters)
            assert torch.isfinite(w).all()
            assert w[0, 2] == 0
            keep = [0, 1, 3, 4, 5]
            self.assert_close(w[0, keep], democratic_weights(phi[:1, keep], iters=iters)[0])
        # and a feature with no positive similarity other than itself keeps a positive weight
        assert torch.all(democratic_weights(-torch.eye(3)[None].double()) > 0)

    def test_all_masked_image_is_zero(self) -> None:
        phi = _rand(2, 4, 3)
        mask = torch.ones(2, 4, dtype=torch.bool)
        mask[1] = False
        w = democratic_weights(phi, mask)
        assert torch.equal(w[1], torch.zeros(4, dtype=torch.float64))
        self.assert_close(w[0], democratic_weights(phi[:1])[0])

    def test_iters_zero_and_damping_zero_are_uniform(self) -> None:
        phi = _rand(2, 5, 3)
        mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
        assert torch.equal(democratic_weights(phi, mask, iters=0), mask.double())
        assert torch.equal(democratic_weights(phi, mask, damping=0.0), mask.double())

    def test_gradcheck(self) -> None:
        phi = (torch.rand(2, 4, 3, dtype=torch.float64, generator=_gen(7)) + 0.1).requires_grad_()
        assert self.gradcheck(democratic_weights, (phi,))
        mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
        assert self.gradcheck(lambda p: democratic_weights(p, mask, iters=5, damping=0.7), (phi,))
        # padding gets no gradient
        democratic_weights(phi, mask).sum().backward()
        assert torch.all(phi.grad[~mask] == 0)  # type: ignore[index]

    def test_compile(self) -> None:
        phi = _rand(3, 6, 5, dtype=torch.float32)
        mask = torch.ones(3, 6, dtype=torch.bool)
        mask[0, 4:] = False
        self.assert_close(_compiled(democratic_weights)(phi), democratic_weights(phi))
        compiled = _compiled(lambda p, m: democratic_weights(p, m, iters=7, damping=0.6))
        self.assert_close(compiled(phi, mask), democratic_weights(phi, mask, iters=7, damping=0.6))

    def test_noncontiguous(self) -> None:
        phi = _rand(2, 6, 5)
        self.assert_close(democratic_weights(self.noncontiguous(phi)), democratic_weights(phi))
        mask = torch.ones(6, 2, dtype=torch.bool).T  # non-contiguous mask
        self.assert_close(democratic_weights(phi, mask), democratic_weights(phi))

    @pytest.mark.parametrize("dt", DTYPES)
    def test_dtype_preserved(self, dt: torch.dtype) -> None:
        phi = _rand(2, 6, 5, dtype=dt)
        w = democratic_weights(phi)
        assert w.dtype == dt
        expected = torch.tensor([ref_democratic(p.double(), [True] * 6) for p in phi], dtype=torch.float64)
        tol = HALF_TOL.get(dt, 1e-5)
        torch.testing.assert_close(w.double(), expected, rtol=tol, atol=0.0)

    def test_exception(self) -> None:
        fn = r"democratic_weights\(\)"
        phi = torch.randn(2, 3, 4)
        with pytest.raises(ShapeError, match=rf"{fn}: phi must have shape \(B, N, D\); got \(3, 4\) with 2 dims"):
            democratic_weights(torch.randn(3, 4))
        with pytest.raises(DTypeError, match=rf"{fn}: phi must be a floating-point tensor; got dtype torch.int64"):
            democratic_weights(phi.long())
        with pytest.raises(ShapeError, match=rf"{fn}: mask must have shape \(B, N\) with N=3; got \(2, 4\)"):
            democratic_weights(phi, torch.ones(2, 4, dtype=torch.bool))
        with pytest.raises(DTypeError, match=rf"{fn}: mask must have dtype in \[torch.bool\]; got torch.float32"):
            democratic_weights(phi, torch.ones(2, 3))
        with pytest.raises(DeviceError, match=rf"{fn}: mask must be on the same device as phi \(cpu\); got meta"):
            democratic_weights(phi, torch.ones(2, 3, dtype=torch.bool, device="meta"))
        with pytest.raises(ValueError, match=rf"{fn}: iters must be >= 0; got -1"):
            democratic_weights(phi, iters=-1)
        for bad in (1.5, True):
            with pytest.raises(TypeError, match=rf"{fn}: iters must be an int >= 0; got"):
                democratic_weights(phi, iters=bad)  # type: ignore[arg-type]
        for damping in (-0.5, float("nan"), float("inf"), True, "0.5"):
            with pytest.raises(ValueError, match=rf"{fn}: damping must be a finite float >= 0; got {damping!r}"):
                democratic_weights(phi, damping=damping)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# Fitting utilities.
# --------------------------------------------------------------------------------------------------------------


def _blobs(centers: torch.Tensor, per: int, scale: float, seed: int) -> torch.Tensor:
    g = _gen(seed)
    x = centers.repeat_interleave(per, dim=0)
    return x + scale * torch.randn(x.shape, generator=g, dtype=centers.dtype)


class TestKMeans(BaseTester):
    def test_smoke(self) -> None:
        x = _rand(50, 3, dtype=torch.float32)
        c = kmeans(x, 4, generator=_gen(0))
        assert c.shape == (4, 3)
        assert c.dtype == torch.float32

    def test_same_generator_state_same_centroids(self) -> None:
        x = _rand(400, 5)
        a = kmeans(x, 6, generator=_gen(1))
        b = kmeans(x, 6, generator=_gen(1))
        assert torch.equal(a, b)
        g = _gen(1)
        first = kmeans(x, 6, generator=g)
        second = kmeans(x, 6, generator=g)  # the generator advanced: other seeds, possibly other centroids
        assert torch.equal(first, a)
        seeds = [kmeans(x, 6, iters=0, generator=_gen(s)) for s in range(4)]
        assert any(not torch.equal(seeds[0], s) for s in seeds[1:])
        assert second.shape == (6, 5)

    def test_seeds_are_distinct_rows(self) -> None:
        x = _rand(60, 3)
        seeds = kmeans(x, 8, iters=0, generator=_gen(2))
        idx = [int(torch.nonzero((x == s).all(1)).flatten()[0]) for s in seeds]
        assert len(set(idx)) == 8

    def test_matches_literal_lloyd(self) -> None:
        x = _blobs(torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=torch.float64), 40, 1.0, seed=3) + 7.0
        for seed in range(3):
            seeds = kmeans(x, 4, iters=0, generator=_gen(seed))
            expected = ref_lloyd(x, seeds)
            self.assert_close(kmeans(x, 4, generator=_gen(seed)), expected, rtol=1e-9, atol=1e-9)
            # iters caps the number of Lloyd iterations
            self.assert_close(kmeans(x, 4, iters=2, generator=_gen(seed)), ref_lloyd(x, seeds, iters=2))

    def test_recovers_separated_clusters(self) -> None:
        centers = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10], [10, 10, 10]], dtype=torch.float64)
        x = _blobs(centers, 200, 0.5, seed=4)
        x = x[torch.randperm(len(x), generator=_gen(5))].float()
        c = kmeans(x, 5, generator=_gen(6))
        order = torch.cdist(centers, c.double()).argmin(1)
        assert sorted(order.tolist()) == list(range(5))
        self.assert_close(c[order].double(), centers, atol=0.1, rtol=0.0)

    def test_duplicates_and_empty_clusters_stay_finite(self) -> None:
        # Two distinct rows, k = 3: a seed is a duplicate, its cluster empties (ties go to the lower index) and
        # is re-seeded; no NaN from a 0/0 mean.
        x = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(5, 1)
        c = kmeans(x, 3, generator=_gen(7))
        assert torch.isfinite(c).all()
        assert all(bool(((x == row).all(1)).any()) for row in c)

    def test_reseed_takes_the_farthest_row(self) -> None:
        x = torch.tensor([[0.0], [1.0], [5.0], [9.0], [10.0]])
        c = torch.tensor([[0.5], [9.5], [100.0]])
        labels = torch.tensor([0, 0, 1, 1, 1])  # cluster 2 is empty; row 2 (5.0) is 4.5 from its centroid
        counts = torch.bincount(labels, minlength=3)
        sums = torch.zeros(3, 1, dtype=torch.float64).index_add_(0, labels, x.double())
        new = _reseed_empty(x, c, labels, counts, sums)
        assert new.tolist() == [0, 0, 2, 1, 1]
        assert counts.tolist() == [2, 2, 1]
        assert sums.flatten().tolist() == [1.0, 19.0, 5.0]

    def test_blocks_do_not_change_the_result(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Large inputs are processed in blocks of rows (N x k distances, indicator products); tiny blocks here.
        x = _blobs(_rand(6, 4, seed=8) * 3, 50, 1.0, seed=9)
        expected = kmeans(x, 6, generator=_gen(10))
        gmm = fit_gmm(x, 3, generator=_gen(10))
        monkeypatch.setattr(embedding, "_BLOCK_ENTRIES", 16)
        self.assert_close(kmeans(x, 6, generator=_gen(10)), expected)
        for got, want in zip(fit_gmm(x, 3, generator=_gen(10)), gmm, strict=True):
            self.assert_close(got, want)

    def test_exception(self) -> None:
        with pytest.raises(ShapeError, match=r"kmeans\(\): x must have at least k = 5 rows; got shape \(3, 2\)"):
            kmeans(torch.randn(3, 2), 5)
        with pytest.raises(ShapeError, match=r"kmeans\(\): x must have shape \(N, d\); got \(3\) with 1 dims"):
            kmeans(torch.randn(3), 2)
        with pytest.raises(DTypeError, match=r"kmeans\(\): x must be a floating-point tensor; got dtype torch.int64"):
            kmeans(torch.ones(3, 2, dtype=torch.long), 2)
        with pytest.raises(ValueError, match=r"kmeans\(\): k must be >= 1; got 0"):
            kmeans(torch.randn(3, 2), 0)
        with pytest.raises(TypeError, match=r"kmeans\(\): k must be an int >= 1; got True"):
            kmeans(torch.randn(3, 2), True)
        with pytest.raises(ValueError, match=r"kmeans\(\): iters must be >= 0; got -1"):
            kmeans(torch.randn(3, 2), 2, iters=-1)
        with pytest.raises(ValueError, match=r"kmeans\(\): x must be finite; got inf or NaN entries"):
            kmeans(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 2)


class TestFitGMM(BaseTester):
    def test_recovers_two_gaussians(self) -> None:
        g = _gen(11)
        a = torch.randn(1200, 2, generator=g, dtype=torch.float64) * torch.tensor([0.5, 1.0]) + torch.tensor(
            [-5.0, 0.0]
        )
        b = torch.randn(2800, 2, generator=g, dtype=torch.float64) * torch.tensor([1.5, 0.3]) + torch.tensor([5.0, 2.0])
        x = torch.cat([a, b])[torch.randperm(4000, generator=g)].float()
        means, variances, weights = fit_gmm(x, 2, generator=_gen(12))
        assert means.dtype == variances.dtype == weights.dtype == torch.float32
        order = means[:, 0].argsort()
        self.assert_close(means[order], torch.tensor([[-5.0, 0.0], [5.0, 2.0]]), atol=0.1, rtol=0.0)
        self.assert_close(variances[order], torch.tensor([[0.25, 1.0], [2.25, 0.09]]), rtol=0.1, atol=0.0)
        self.assert_close(weights[order], torch.tensor([0.3, 0.7]), atol=0.02, rtol=0.0)
        self.assert_close(weights.sum(), torch.tensor(1.0), atol=1e-6, rtol=0.0)
        # deterministic given the generator state, and usable as a Fisher codebook
        again = fit_gmm(x, 2, generator=_gen(12))
        assert all(torch.equal(p, q) for p, q in zip((means, variances, weights), again, strict=True))
        assert torch.isfinite(fisher_embedding(x[None, :10], means, variances, weights)).all()

    def test_variance_floor(self) -> None:
        x = torch.cat([_rand(100, 1, seed=13), torch.full((100, 1), 3.0, dtype=torch.float64)], dim=1)
        _, variances, _ = fit_gmm(x, 3, generator=_gen(14), min_variance=1e-4)
        assert torch.all(variances[:, 1] == 1e-4)
        assert torch.all(variances[:, 0] > 1e-4)

    def test_iters_zero_is_kmeans_statistics(self) -> None:
        x = _blobs(torch.tensor([[0.0, 0.0], [6.0, 6.0]], dtype=torch.float64), 30, 1.0, seed=15)
        means, variances, weights = fit_gmm(x, 2, iters=0, generator=_gen(16))
        seeds = kmeans(x, 2, iters=0, generator=_gen(16))
        labels = torch.cdist(x, seeds).argmin(1)
        for j in range(2):
            members = x[labels == j]
            self.assert_close(means[j], members.mean(0))
            self.assert_close(variances[j], members.var(0, unbiased=False))
            self.assert_close(weights[j], torch.tensor(len(members) / 60, dtype=torch.float64))

    def test_exception(self) -> None:
        for bad in (0.0, -1e-3, float("nan"), float("inf"), True):
            with pytest.raises(ValueError, match=rf"fit_gmm\(\): min_variance must be a finite float > 0; got {bad!r}"):
                fit_gmm(torch.randn(4, 2), 2, min_variance=bad)
        with pytest.raises(ShapeError, match=r"fit_gmm\(\): x must have at least k = 3 rows; got shape \(2, 2\)"):
            fit_gmm(torch.randn(2, 2), 3)
        with pytest.raises(ValueError, match=r"fit_gmm\(\): iters must be >= 0; got -2"):
            fit_gmm(torch.randn(4, 2), 2, iters=-2)
