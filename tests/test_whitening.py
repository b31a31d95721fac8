"""Tests of pca_whitening / learned_whitening / whiten and the Whiten module."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import deepagg
from deepagg import functional as F
from deepagg._checks import DeviceError, DTypeError, ShapeError

from ._base import BaseTester


def make_data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Correlated Gaussian rows (float64, CPU) with a non-zero mean and well-spread eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    scales = torch.linspace(0.2, 3.0, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ (scales[:, None] * mix) + 0.5


def make_pairs(n_classes: int, per_class: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered rows (class centres plus anisotropic noise) and all within-class pairs (i < j)."""
    g = torch.Generator().manual_seed(seed)
    centres = make_data(n_classes, d, seed + 1) * 3.0
    noise_mix = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3
    x = (
        centres.repeat_interleave(per_class, 0)
        + torch.randn(n_classes * per_class, d, generator=g, dtype=torch.float64) @ noise_mix
    )
    pairs = [
        (c * per_class + i, c * per_class + j)
        for c in range(n_classes)
        for i in range(per_class)
        for j in range(i + 1, per_class)
    ]
    return x, torch.tensor(pairs, dtype=torch.int64)


def fix_signs_rows(p: np.ndarray) -> np.ndarray:
    """The library's sign rule on rows: the first largest-magnitude entry of each row is positive."""
    idx = np.abs(p).argmax(axis=1)
    return p * np.sign(p[np.arange(p.shape[0]), idx])[:, None]


def ref_pca(x: torch.Tensor, dim: int | None, s: float, floor: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    a = x.double().numpy()
    mean = a.mean(axis=0)
    cov = np.cov(a, rowvar=False)
    w, v = scipy.linalg.eigh(cov)
    order = np.argsort(-w, kind="stable")
    w, v = w[order], v[:, order]
    w = np.maximum(w, floor * w[0])
    dim = a.shape[1] if dim is None else dim
    rot = fix_signs_rows(v[:, :dim].T)  # the sign is fixed on the eigenvector (scaling is positive)
    return mean, (w[:dim] ** (-s / 2))[:, None] * rot


def ref_learned(x: torch.Tensor, pairs: torch.Tensor, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    a = x.double().numpy()
    pr = pairs.numpy()
    diff = a[pr[:, 0]] - a[pr[:, 1]]
    cs = diff.T @ diff / len(diff)
    p1 = np.real(scipy.linalg.inv(scipy.linalg.sqrtm(cs)))  # C_S^{-1/2}, independent of eigh
    mean = a.mean(axis=0)
    y = (a - mean) @ p1.T
    w, v = scipy.linalg.eigh(np.cov(y, rowvar=False))
    v = v[:, np.argsort(-w, kind="stable")]
    dim = a.shape[1] if dim is None else dim
    return mean, fix_signs_rows(v[:, :dim].T) @ p1


def old_sorted_eigh(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's eigh step before the rank cap (descending, first largest-magnitude entry positive)."""
    cov = 0.5 * (cov + cov.T)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    signs = torch.sign(evecs.gather(0, evecs.abs().argmax(dim=0)[None]))
    return evals, evecs * signs


def old_pca(x: torch.Tensor, dim: int | None, s: float, floor: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """pca_whitening before the rank cap, op for op (so full-rank fits must agree bit for bit)."""
    mean = x.mean(dim=0)
    xc = x - mean
    evals, evecs = old_sorted_eigh(xc.T @ xc / (xc.shape[0] - 1))
    scale = evals.clamp(min=floor * float(evals.max())).pow(-0.5 * s)
    dim = x.shape[1] if dim is None else dim
    return mean, scale[:dim, None] * evecs[:, :dim].T


def old_learned(
    x: torch.Tensor, pairs: torch.Tensor, dim: int | None, floor: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor]:
    """learned_whitening before the rank cap, op for op: every eigenvalue of C_S floored, none dropped."""
    diff = x[pairs[:, 0]] - x[pairs[:, 1]]
    evals_s, evecs_s = old_sorted_eigh(diff.T @ diff / diff.shape[0])
    p1 = (evecs_s * evals_s.clamp(min=floor * float(evals_s.max())).rsqrt()) @ evecs_s.T
    mean = x.mean(dim=0)
    y = (x - mean) @ p1
    _, evecs = old_sorted_eigh(y.T @ y / (y.shape[0] - 1))
    dim = x.shape[1] if dim is None else dim
    return mean, evecs[:, :dim].T @ p1


def ref_cirtorch_learned(x: torch.Tensor, pairs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """cirtorch ``whitenlearn`` literally (descriptors as columns, as there), in float64 NumPy.

    ``m`` is the mean of the queries ``X[:, qidxs]`` (repeats counted), ``P1 = inv(cholesky(S))`` (lower factor),
    and the rotation diagonalises ``df df^T`` with ``df = P1 (X - m)``: the second moment about ``m``.
    """
    X = x.double().numpy().T
    qidxs, pidxs = pairs[:, 0].numpy(), pairs[:, 1].numpy()
    m = X[:, qidxs].mean(axis=1, keepdims=True)
    df = X[:, qidxs] - X[:, pidxs]
    S = df @ df.T / df.shape[1]
    P = np.linalg.inv(np.linalg.cholesky(S))
    df = P @ (X - m)
    eigval, eigvec = np.linalg.eig(df @ df.T)
    order = np.real(eigval).argsort()[::-1]
    eigvec = np.real(eigvec[:, order])
    return m[:, 0], eigvec.T @ P


def ref_cirtorch_apply(x: torch.Tensor, m: np.ndarray, P: np.ndarray, dim: int) -> np.ndarray:
    """cirtorch ``whitenapply`` (without its 1e-6 in the norm), returned as rows."""
    X = P[:dim, :] @ (x.double().numpy().T - m[:, None])
    return (X / np.linalg.norm(X, axis=0, keepdims=True)).T


def rank_deficient_pairs(d: int = 32, n: int = 40, n_pairs: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic rows and ``n_pairs`` disjoint pairs (2i, 2i + 1): C_S has rank n_pairs < d."""
    pairs = torch.stack([torch.arange(0, 2 * n_pairs, 2), torch.arange(1, 2 * n_pairs, 2)], dim=1)
    return make_data(n, d, seed=5), pairs


def null_basis(a: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal basis (as rows) of the null space of the rows of ``a``, by NumPy's SVD."""
    _, _, vt = np.linalg.svd(a.numpy())
    return torch.from_numpy(vt[rank:])


class TestWhiten(BaseTester):
    def test_smoke(self) -> None:
        x = make_data(100, 16).float()
        w = deepagg.Whiten(16, 8)
        assert w.fit_pca(x) is w
        out = w(x[:5])
        assert out.shape == (5, 8)
        self.assert_close(out.norm(dim=1), torch.ones(5))
        assert repr(w) == "Whiten(in_dim=16, out_dim=8, fitted=True)"
        assert repr(deepagg.Whiten(4)) == "Whiten(in_dim=4, out_dim=4, fitted=False)"
        x2, pairs = make_pairs(10, 4, 16)
        assert deepagg.Whiten(16, 8).fit_learned(x2.float(), pairs)(x2[:3].float()).shape == (3, 8)
        assert set(w.state_dict()) == {"mean", "projection", "fitted"}

    @pytest.mark.parametrize("batch", [0, 1, 2])
    def test_cardinality(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        x = make_data(50, 12)
        w = deepagg.Whiten(12, 5).fit_pca(x.float()).to(device=device, dtype=dtype)
        out = w(x[:batch].to(device=device, dtype=dtype))
        assert out.shape == (batch, 5)
        assert out.dtype == dtype
        assert F.whiten(x[:batch], *F.pca_whitening(x)).shape == (batch, 12)

    @pytest.mark.parametrize("n", [2, 3])
    def test_few_rows(self, n: int) -> None:
        # Rank-deficient covariance (N - 1 < D): the fit keeps the N - 1 supported directions, finite and bounded.
        x = make_data(n, 6)
        with pytest.warns(UserWarning, match=rf"determine only {n - 1} of the 6 requested dimensions"):
            mean, proj = F.pca_whitening(x)
        assert proj.shape == (n - 1, 6)
        assert torch.isfinite(proj).all()
        top = np.linalg.eigvalsh(np.cov(x.numpy(), rowvar=False)).max()
        assert proj.norm(dim=1).max() <= (1e-10 * top) ** -0.5 * (1 + 1e-9)
        y = F.whiten(x, mean, proj)
        assert torch.isfinite(y).all()
        with pytest.warns(UserWarning, match=r"the 1 matching pair determines only 1 of the 6 requested"):
            _, pairs_proj = F.learned_whitening(x, torch.tensor([[0, 1]]))
        assert pairs_proj.shape == (1, 6)
        assert torch.isfinite(pairs_proj).all()

    @pytest.mark.parametrize(("dim", "shrinkage"), [(None, 1.0), (5, 1.0), (None, 0.5), (7, 0.0)])
    def test_reference(self, dim: int | None, shrinkage: float) -> None:
        x = make_data(200, 10)
        mean, proj = F.pca_whitening(x, dim=dim, shrinkage=shrinkage)
        ref_mean, ref_proj = ref_pca(x, dim, shrinkage)
        self.assert_close(mean, torch.from_numpy(ref_mean))
        self.assert_close(proj, torch.from_numpy(ref_proj), rtol=1e-8, atol=1e-10)

    @pytest.mark.parametrize("dim", [None, 4])
    def test_reference_learned(self, dim: int | None) -> None:
        x, pairs = make_pairs(20, 4, 10)
        mean, proj = F.learned_whitening(x, pairs, dim=dim)
        ref_mean, ref_proj = ref_learned(x, pairs, dim)
        self.assert_close(mean, torch.from_numpy(ref_mean))
        self.assert_close(proj, torch.from_numpy(ref_proj), rtol=1e-7, atol=1e-9)

    def test_pca_properties(self) -> None:
        x = make_data(300, 12)
        # s = 1: the whitened training rows have identity (unbiased) covariance and zero mean.
        y = F.whiten(x, *F.pca_whitening(x))
        self.assert_close(torch.cov(y.T), torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-9)
        self.assert_close(y.mean(0), torch.zeros(12, dtype=torch.float64), rtol=0, atol=1e-9)
        # s = 0: a pure rotation onto the principal axes, variances descending.
        _, rot = F.pca_whitening(x, shrinkage=0.0)
        self.assert_close(rot @ rot.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-10)
        cov = torch.cov(F.whiten(x, *F.pca_whitening(x, shrinkage=0.0)).T)
        var = cov.diagonal()
        self.assert_close(cov, torch.diag(var), rtol=0, atol=1e-9)
        assert (var[:-1] >= var[1:]).all()
        # s = 0.5: the variances are the square roots of the eigenvalues.
        y_half = F.whiten(x, *F.pca_whitening(x, shrinkage=0.5))
        self.assert_close(torch.cov(y_half.T).diagonal(), var.sqrt(), rtol=1e-8, atol=1e-10)
        # Reducing the dimension keeps the leading rows.
        _, full = F.pca_whitening(x)
        _, part = F.pca_whitening(x, dim=4)
        self.assert_close(part, full[:4])
        # Sign rule: the largest-magnitude entry of each (rotation) row is positive.
        assert (rot.gather(1, rot.abs().argmax(1, keepdim=True)) > 0).all()

    def test_learned_properties(self) -> None:
        x, pairs = make_pairs(25, 4, 12)
        mean, proj = F.learned_whitening(x, pairs)
        diff = x[pairs[:, 0]] - x[pairs[:, 1]]
        cov_s = diff.T @ diff / len(diff)
        # The positive-pair differences have identity covariance after the projection...
        eye = torch.eye(12, dtype=torch.float64)
        self.assert_close(proj @ cov_s @ proj.T, eye, rtol=0, atol=1e-9)
        # ...so un-whitening (by C_S^{1/2}) leaves orthonormal rows: the second step is a rotation.
        evals, evecs = torch.linalg.eigh(cov_s)
        sqrt_s = (evecs * evals.sqrt()) @ evecs.T
        rot = proj @ sqrt_s
        self.assert_close(rot @ rot.T, eye, rtol=0, atol=1e-9)
        # The whitened training rows are decorrelated, variances descending.
        cov = torch.cov(F.whiten(x, mean, proj).T)
        self.assert_close(cov, torch.diag(cov.diagonal()), rtol=0, atol=1e-8)
        assert (cov.diagonal()[:-1] >= cov.diagonal()[1:]).all()
        _, part = F.learned_whitening(x, pairs, dim=5)
        self.assert_close(part, proj[:5])

    def test_full_rank_unchanged(self) -> None:
        # With r = D the rank cap changes nothing: bit for bit the pre-cap formulas, signs included, no warning.
        x = make_data(200, 10)
        x2, pairs = make_pairs(20, 4, 10)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for dim, s in [(None, 1.0), (5, 1.0), (None, 0.5), (7, 0.0)]:
                mean, proj = F.pca_whitening(x, dim=dim, shrinkage=s)
                ref_mean, ref_proj = old_pca(x, dim, s)
                assert torch.equal(mean, ref_mean)
                assert torch.equal(proj, ref_proj)
            for dim in (None, 4):
                mean, proj = F.learned_whitening(x2, pairs, dim=dim)
                ref_mean, ref_proj = old_learned(x2, pairs, dim)
                assert torch.equal(mean, ref_mean)
                assert torch.equal(proj, ref_proj)
                assert torch.equal(F.learned_whitening(x2, pairs, dim=dim, center="all")[1], proj)
            assert torch.equal(deepagg.Whiten(10, 4, dtype=torch.float64).fit_learned(x2, pairs).projection, proj)

    def test_learned_rank_cap(self) -> None:
        x, pairs = rank_deficient_pairs()  # D = 32, 10 disjoint pairs: rank(C_S) = 10
        msg = (
            "learned_whitening(): the 10 matching pairs determine only 10 of the 32 requested dimensions (rank of "
            "the pair-difference covariance); the projection keeps 10. Add matching pairs (at least 32 linearly "
            "independent differences) or pass dim <= 10."
        )
        with pytest.warns(UserWarning, match=re.escape(msg)) as record:
            mean, proj = F.learned_whitening(x, pairs)
        assert len(record) == 1
        assert record[0].filename == __file__  # stacklevel points at the caller
        # (b) r output directions.
        assert proj.shape == (10, 32)
        assert F.whiten(x, mean, proj).shape == (40, 10)
        # (c) Whitened pair differences have identity covariance on the kept directions.
        diff = x[pairs[:, 0]] - x[pairs[:, 1]]
        cov_s = diff.T @ diff / len(diff)
        self.assert_close(proj @ cov_s @ proj.T, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-9)
        # (d) The kept directions lie in the span of the differences: orthogonal to the null space of C_S.
        null = null_basis(diff, 10)
        assert null.shape == (22, 32)
        assert (proj @ null.T).abs().max() <= 1e-12 * proj.abs().max()
        # The floored pre-cap formula put its rows almost entirely in that null space.
        _, old = old_learned(x, pairs, None)
        assert (old @ null.T).norm() >= 0.999 * old.norm()
        # The whitened training rows are still decorrelated, variances descending.
        cov = torch.cov(F.whiten(x, mean, proj).T)
        self.assert_close(cov, torch.diag(cov.diagonal()), rtol=0, atol=1e-8)
        assert (cov.diagonal()[:-1] >= cov.diagonal()[1:]).all()
        # A requested dim between r and D is capped too; dim <= r is not and says nothing.
        with pytest.warns(UserWarning, match=r"determine only 10 of the 16 requested dimensions.*dim <= 10\.$"):
            assert F.learned_whitening(x, pairs, dim=16)[1].shape == (10, 32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, part = F.learned_whitening(x, pairs, dim=8)
            _, exact = F.learned_whitening(x, pairs, dim=10)
        self.assert_close(part, proj[:8], rtol=1e-9, atol=1e-12)
        assert torch.equal(exact, proj)
        # The rank, not the number of pairs: a repeated and a reversed pair add no direction.
        more = torch.cat([pairs, torch.tensor([[0, 1], [3, 2]])])
        with pytest.warns(UserWarning, match=r"the 12 matching pairs determine only 10 of the 32 requested"):
            assert F.learned_whitening(x, more)[1].shape == (10, 32)
        # float32 input: the same cap, in float32.
        with pytest.warns(UserWarning, match=r"determine only 10 of the 32"):
            mean32, proj32 = F.learned_whitening(x.float(), pairs)
        assert proj32.shape == (10, 32)
        assert proj32.dtype == mean32.dtype == torch.float32
        with pytest.warns(UserWarning, match=r"determine only 10 of the 32"):
            mean64, proj64 = F.learned_whitening(x.float().double(), pairs)  # computed in float64 either way
        assert torch.equal(proj32, proj64.float())
        assert torch.equal(mean32, mean64.float())

    def test_learned_rank_cap_retrieval(self) -> None:
        # Signal (class centres, small within-class variation) lives in a 10-D subspace A; a large nuisance lives in
        # the 22-D complement B. The 12 training pairs share their nuisance, so their differences span A only
        # (rank(C_S) = 10) and Lw learns nothing about B. At test time the nuisance varies per image.
        g = torch.Generator().manual_seed(0)
        basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
        a, b = basis[:, :10], basis[:, 10:]

        def images(n_classes: int, shared_nuisance: bool) -> torch.Tensor:
            centres = torch.randn(n_classes, 10, generator=g, dtype=torch.float64).repeat_interleave(2, 0)
            signal = centres + 0.1 * torch.randn(2 * n_classes, 10, generator=g, dtype=torch.float64)
            rows = n_classes if shared_nuisance else 2 * n_classes
            nuisance = 5 * torch.randn(rows, 22, generator=g, dtype=torch.float64)
            if shared_nuisance:
                nuisance = nuisance.repeat_interleave(2, 0)
            return signal @ a.T + nuisance @ b.T

        train = images(12, shared_nuisance=True)
        pairs = torch.stack([torch.arange(0, 24, 2), torch.arange(1, 24, 2)], dim=1)
        test = images(40, shared_nuisance=False)
        queries, database = test[0::2], test[1::2]  # the positive of query i is database item i

        def top1(mean: torch.Tensor, proj: torch.Tensor) -> float:
            q = F.l2n(F.whiten(queries, mean, proj))
            db = F.l2n(F.whiten(database, mean, proj))
            return float(((q @ db.T).argmax(dim=1) == torch.arange(40)).double().mean())

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # dim = 8 <= r = 10: no warning
            new = F.learned_whitening(train, pairs, dim=8)
        old = old_learned(train, pairs, 8)
        # The floored P1 amplified B by ~1e5, and the rotation kept B directions only; the capped fit keeps none.
        assert (old[1] @ b).norm() >= 0.999 * old[1].norm()
        assert (new[1] @ b).norm() <= 1e-12 * new[1].norm()
        # So old retrieval is at chance level (1/40) on nuisance, while the capped Lw retrieves every positive.
        assert top1(*new) == 1.0
        assert top1(*old) <= 0.1

    def test_pca_rank_cap(self) -> None:
        x = make_data(5, 16)  # centred rows span N - 1 = 4 dimensions
        msg = (
            "pca_whitening(): the 5 training rows determine only 4 of the 16 requested dimensions (rank of the "
            "covariance, at most N - 1 = 4); the projection keeps 4. Add training rows (at least D + 1 = 17 in "
            "general position) or pass dim <= 4."
        )
        with pytest.warns(UserWarning, match=re.escape(msg)) as record:
            mean, proj = F.pca_whitening(x)
        assert len(record) == 1
        assert proj.shape == (4, 16)
        y = F.whiten(x, mean, proj)
        self.assert_close(torch.cov(y.T), torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-9)
        null = null_basis(x - mean, 4)
        assert (proj @ null.T).abs().max() <= 1e-12 * proj.abs().max()
        # The pre-cap formula's extra rows were null directions scaled by the floor: ~1e5 times the largest scale.
        _, old = old_pca(x, None, 1.0)
        assert torch.equal(old[:4], proj)
        assert old[4:].norm(dim=1).min() >= 1e4 * old[:4].norm(dim=1).max()
        with pytest.warns(UserWarning, match=r"only 4 of the 6 requested dimensions.*or pass dim <= 4\.$"):
            assert F.pca_whitening(x, dim=6, shrinkage=0.0)[1].shape == (4, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(F.pca_whitening(x, dim=3)[1], proj[:3])
        # Collinear rows: the rank is below N - 1 too.
        line = torch.linspace(-1, 1, 6, dtype=torch.float64)[:, None] * torch.ones(1, 3, dtype=torch.float64)
        with pytest.warns(UserWarning, match=r"the 6 training rows determine only 1 of the 3.*at most N - 1 = 5"):
            assert F.pca_whitening(line)[1].shape == (1, 3)

    def test_learned_center_queries(self) -> None:
        # cirtorch's whitenlearn centres on the mean of the pair queries (repeats counted); full rank, P, N >> D.
        x, pairs = make_pairs(30, 5, 12, seed=2)  # 150 rows, 300 pairs; query i of a class appears 4 - i times
        mean, proj = F.learned_whitening(x, pairs, center="queries")
        self.assert_close(mean, x[pairs[:, 0]].mean(dim=0), rtol=0, atol=1e-14)
        assert not torch.allclose(mean, x[pairs[:, 0].unique()].mean(dim=0))
        assert not torch.allclose(mean, x.mean(dim=0))
        ref_m, ref_p = ref_cirtorch_learned(x, pairs)
        self.assert_close(mean, torch.from_numpy(ref_m), rtol=0, atol=1e-12)
        test = torch.cat([x, make_data(40, 12, seed=7) * 3.0])
        for dim in (12, 5):
            ours = F.l2n(F.whiten(test, *F.learned_whitening(x, pairs, dim=dim, center="queries")))
            ref = torch.from_numpy(ref_cirtorch_apply(test, ref_m, ref_p, dim))
            signs = torch.sign((ours * ref).sum(dim=0))  # eigenvectors are defined up to sign
            self.assert_close(ours, ref * signs, rtol=0, atol=1e-8)
        # "all" (the default) differs from "queries" only through the centre; the module takes the keyword too.
        assert not torch.allclose(F.learned_whitening(x, pairs)[1], proj)
        w = deepagg.Whiten(12, 5, dtype=torch.float64).fit_learned(x, pairs, center="queries")
        self.assert_close(w.mean, mean)
        self.assert_close(w.projection, proj[:5], rtol=1e-9, atol=1e-12)

    def test_learned_shrinkage(self) -> None:
        x, pairs = make_pairs(30, 5, 12, seed=3)
        # a = 0 is Lw as published, bit for bit
        assert torch.equal(F.learned_whitening(x, pairs, shrinkage=0.0)[1], F.learned_whitening(x, pairs)[1])
        # a > 0 against a float64 NumPy reference: C_S <- (1 - a) C_S + a mean(eig) I, then Lw as usual
        for a in (0.25, 0.5):
            xn, pn = x.numpy(), pairs.numpy()
            diff = xn[pn[:, 0]] - xn[pn[:, 1]]
            cs = diff.T @ diff / len(diff)
            cs = (1 - a) * cs + a * np.trace(cs) / cs.shape[0] * np.eye(cs.shape[0])
            ev, u = np.linalg.eigh(cs)
            p1 = u @ np.diag(ev**-0.5) @ u.T
            m = xn.mean(0)
            z = (xn - m) @ p1
            _ev2, v = np.linalg.eigh(np.cov(z.T))
            ref = torch.from_numpy(F.l2n(torch.from_numpy((xn - m) @ p1 @ v[:, ::-1][:, :6].copy())).numpy())
            ours = F.l2n(F.whiten(x, *F.learned_whitening(x, pairs, dim=6, shrinkage=a)))
            signs = torch.sign((ours * ref).sum(dim=0))
            self.assert_close(ours, ref * signs, rtol=0, atol=1e-8)
        # a = 1 ignores the pairs: the PCA rotation of the training rows (PCA-whitening with shrinkage 0)
        rot = F.l2n(F.whiten(x, *F.learned_whitening(x, pairs, shrinkage=1.0)))
        pca = F.l2n(F.whiten(x, *F.pca_whitening(x, shrinkage=0.0)))
        self.assert_close(rot, pca * torch.sign((rot * pca).sum(dim=0)), rtol=0, atol=1e-8)

    def test_learned_shrinkage_determines_every_direction(self) -> None:
        x, pairs = rank_deficient_pairs()  # 10 pairs in 32 dimensions: rank 10
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no rank warning: the shrunk covariance is full rank
            _mean, proj = F.learned_whitening(x, pairs, shrinkage=0.25)
            w = deepagg.Whiten(32, 16, dtype=torch.float64).fit_learned(x, pairs, shrinkage=0.25)
        assert proj.shape == (32, 32)
        assert (w.out_dim, w.projection.shape) == (16, (16, 32))
        self.assert_close(w.projection, proj[:16], rtol=1e-9, atol=1e-12)
        # no direction is amplified beyond 1 / sqrt(a * mean eigenvalue) of the pair covariance
        diff = x[pairs[:, 0]] - x[pairs[:, 1]]
        bound = (0.25 * torch.trace(diff.T @ diff / len(diff)) / 32) ** -0.5
        assert torch.linalg.matrix_norm(proj, ord=2) <= bound * (1 + 1e-9)

    def test_module_rank_cap(self) -> None:
        x, pairs = rank_deficient_pairs()
        w = deepagg.Whiten(32, 16)
        msg = (
            "Whiten.fit_learned(): the 10 matching pairs determine only 10 of the 16 requested dimensions (rank of "
            "the pair-difference covariance); the projection keeps 10. Add matching pairs (at least 32 linearly "
            "independent differences) or build Whiten(32, out_dim=10)."
        )
        with pytest.warns(UserWarning, match=re.escape(msg)) as record:
            assert w.fit_learned(x.float(), pairs) is w
        assert len(record) == 1
        assert record[0].filename == __file__
        assert (w.out_dim, w.requested_out_dim) == (10, 16)
        assert w.projection.shape == (10, 32)
        assert w.projection.dtype == torch.float32
        assert repr(w) == "Whiten(in_dim=32, out_dim=10, requested_out_dim=16, fitted=True)"
        out = w(x.float())
        assert out.shape == (40, 10)
        self.assert_close(out.norm(dim=1), torch.ones(40))
        with pytest.warns(UserWarning, match=r"determine only 10 of the 16"):
            mean, proj = F.learned_whitening(x.float(), pairs, dim=16)
        self.assert_close(w.projection, proj)
        self.assert_close(out, F.l2n(F.whiten(x.float(), mean, proj)))
        assert w.weight.shape == (10, 32)
        assert w.bias.shape == (10,)
        lin = w.as_linear()
        assert (lin.in_features, lin.out_features) == (32, 10)
        self.assert_close(F.l2n(lin(x.float())), out, rtol=1e-4, atol=1e-4)
        self.assert_close(torch.compile(w, backend="eager", fullgraph=True)(x[:5].float()), out[:5])
        # state_dict -> a fresh Whiten(in_dim, out_dim as requested): the buffer takes the stored shape.
        fresh = deepagg.Whiten(32, 16)
        fresh.load_state_dict(w.state_dict())
        assert (fresh.out_dim, fresh.requested_out_dim) == (10, 16)
        assert repr(fresh) == repr(w)
        assert torch.equal(fresh(x.float()), out)
        assert fresh.as_linear().out_features == 10
        capped_state = {k: v.clone() for k, v in w.state_dict().items()}
        outer = torch.nn.Sequential(deepagg.Whiten(32, 16, dtype=torch.float64))
        outer.load_state_dict(torch.nn.Sequential(w).state_dict())  # prefixed keys, cast to the buffer dtype
        assert outer[0].projection.shape == (10, 32)
        assert outer[0].projection.dtype == torch.float64
        # Loading an unfitted (full-size) state, or refitting on full-rank data, restores the requested size.
        fresh.load_state_dict(deepagg.Whiten(32, 16).state_dict())
        assert fresh.out_dim == 16
        assert not fresh._fitted
        x2, pairs2 = make_pairs(20, 4, 32)  # rank 60 >= 32
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            w.fit_learned(x2.float(), pairs2)
        assert (w.out_dim, w.projection.shape) == (16, (16, 32))
        assert repr(w) == "Whiten(in_dim=32, out_dim=16, fitted=True)"
        # PCA: 5 rows in 16-D give rank 4.
        msg = (
            "Whiten.fit_pca(): the 5 training rows determine only 4 of the 8 requested dimensions (rank of the "
            "covariance, at most N - 1 = 4); the projection keeps 4. Add training rows (at least D + 1 = 17 in "
            "general position) or build Whiten(16, out_dim=4)."
        )
        with pytest.warns(UserWarning, match=re.escape(msg)):
            wp = deepagg.Whiten(16, 8, dtype=torch.float64).fit_pca(make_data(5, 16))
        assert wp.out_dim == 4
        assert wp(make_data(3, 16)).shape == (3, 4)
        assert wp.projection.dtype == torch.float64
        # Wrong in_dim or too many stored rows: a clear error, and the target is left as it was.
        target = deepagg.Whiten(30, 16)
        with pytest.raises(
            RuntimeError,
            match=r"Whiten.load_state_dict\(\): the saved projection has shape \(10, 32\), but this Whiten has "
            r"in_dim = 30 \(expected shape \(r, 30\)\)\. Build the Whiten with the in_dim of the saved one\.",
        ):
            target.load_state_dict(capped_state)
        assert not target._fitted
        assert target.projection.shape == (16, 30)
        nested = torch.nn.Sequential(deepagg.Whiten(32, 16))
        with pytest.raises(RuntimeError, match=r"the saved 0\.projection has shape \(16,\), but this Whiten has in_d"):
            nested.load_state_dict({"0." + k: v for k, v in capped_state.items()} | {"0.projection": torch.ones(16)})
        small = deepagg.Whiten(32, 8)
        with pytest.raises(
            RuntimeError,
            match=r"the saved projection has shape \(16, 32\), but this Whiten was built with out_dim = 8 "
            r"\(expected 1 to 8 rows\)\. Build Whiten\(32, out_dim=16\) to load it\.",
        ):
            small.load_state_dict(w.state_dict())
        assert small.projection.shape == (8, 32)
        assert not small._fitted

    def test_deterministic(self) -> None:
        x = make_data(120, 9)
        perm = torch.randperm(120, generator=torch.Generator().manual_seed(3))
        a = F.pca_whitening(x)[1]
        b = F.pca_whitening(x[perm])[1]  # same data, another order: same signs
        self.assert_close(a, b, rtol=1e-8, atol=1e-10)
        assert torch.equal(a, F.pca_whitening(x)[1])

    def test_module_matches_functional(self) -> None:
        x = make_data(80, 10).float()
        mean, proj = F.pca_whitening(x, dim=6, shrinkage=0.7)
        w = deepagg.Whiten(10, 6).fit_pca(x, shrinkage=0.7)
        self.assert_close(w.mean, mean)
        self.assert_close(w.projection, proj)
        self.assert_close(w(x), F.l2n(F.whiten(x, mean, proj)))
        x2, pairs = make_pairs(12, 4, 10)
        mean2, proj2 = F.learned_whitening(x2, pairs, dim=6)
        w2 = deepagg.Whiten(10, 6, dtype=torch.float64).fit_learned(x2, pairs, dim=6)
        self.assert_close(w2.projection, proj2)
        self.assert_close(w2(x2), F.l2n(F.whiten(x2, mean2, proj2)))
        # nn.Linear equivalents.
        lin = w.as_linear()
        assert isinstance(lin, torch.nn.Linear)
        assert lin.weight.shape == (6, 10)
        self.assert_close(lin(x), F.whiten(x, mean, proj), rtol=1e-4, atol=1e-4)
        self.assert_close(x @ w.weight.T + w.bias, F.whiten(x, mean, proj), rtol=1e-4, atol=1e-4)

    def test_state_dict_roundtrip(self) -> None:
        x = make_data(60, 8).float()
        fitted = deepagg.Whiten(8, 3).fit_pca(x)
        fresh = deepagg.Whiten(8, 3)
        fresh.load_state_dict(fitted.state_dict())
        assert torch.equal(fresh(x), fitted(x))
        assert "fitted=True" in repr(fresh)
        # Loading an unfitted state makes a fitted module unfitted again.
        fitted.load_state_dict(deepagg.Whiten(8, 3).state_dict())
        with pytest.raises(RuntimeError, match=r"Whiten: the whitening is not fitted; call fit_pca"):
            fitted(x)

    def test_gradcheck(self) -> None:
        x = make_data(30, 5)
        mean, proj = F.pca_whitening(x, dim=3)
        xs = x[:4].clone().requires_grad_()
        assert self.gradcheck(F.whiten, (xs, mean.clone().requires_grad_(), proj.clone().requires_grad_()))
        w = deepagg.Whiten(5, 3, dtype=torch.float64).fit_pca(x)
        assert self.gradcheck(w, (xs,))

    def test_compile(self) -> None:
        x = make_data(40, 8).float()
        w = deepagg.Whiten(8, 4).fit_pca(x)
        self.assert_close(torch.compile(w, backend="eager", fullgraph=True)(x[:5]), w(x[:5]))
        mean, proj = F.pca_whitening(x)
        self.assert_close(
            torch.compile(F.whiten, backend="eager", fullgraph=True)(x, mean, proj), F.whiten(x, mean, proj)
        )

    def test_noncontiguous(self) -> None:
        x = make_data(50, 7)
        xn = self.noncontiguous(x)
        assert not xn.is_contiguous()
        mean, proj = F.pca_whitening(x)
        self.assert_close(F.pca_whitening(xn)[1], proj)
        self.assert_close(F.whiten(xn, mean, self.noncontiguous(proj)), F.whiten(x, mean, proj))
        w = deepagg.Whiten(7, dtype=torch.float64).fit_pca(x)
        self.assert_close(w(xn), w(x))

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
    def test_dtype_preserved(self, dt: torch.dtype) -> None:
        x = make_data(40, 6)
        mean, proj = F.pca_whitening(x.to(dt), dim=4)
        assert mean.dtype == proj.dtype == dt
        assert F.whiten(x[:3].to(dt), mean, proj).dtype == dt
        w = deepagg.Whiten(6, 4).fit_pca(x.float())
        assert w(x[:3].to(dt)).dtype == dt  # float32 buffers, any input dtype
        assert w.to(dt)(x[:3].to(dt)).dtype == dt
        assert w.fitted.dtype == torch.bool

    def test_set_num_threads_regression(self) -> None:
        # environment.md: batched LU breaks after set_num_threads(n >= 2); the fits use eigh only.
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            x, pairs = make_pairs(100, 5, 256, seed=4)
            w = deepagg.Whiten(256, 128).fit_pca(x)
            assert torch.isfinite(w.projection).all()
            y = F.whiten(x, *F.pca_whitening(x))
            self.assert_close(torch.cov(y.T), torch.eye(256, dtype=torch.float64), rtol=0, atol=1e-7)
            _, proj = F.learned_whitening(x, pairs, dim=128)
            assert torch.equal(proj, old_learned(x, pairs, 128)[1])  # full rank: unchanged by the rank cap
            diff = x[pairs[:, 0]] - x[pairs[:, 1]]
            self.assert_close(
                proj @ (diff.T @ diff / len(diff)) @ proj.T, torch.eye(128, dtype=torch.float64), rtol=0, atol=1e-7
            )
        finally:
            torch.set_num_threads(old)

    def test_exception(self) -> None:
        x = make_data(10, 4)
        pairs = torch.tensor([[0, 1], [2, 3]])
        # pca_whitening / learned_whitening: x
        with pytest.raises(TypeError, match=r"pca_whitening\(\): x must be a torch.Tensor of shape \(N, D\)"):
            F.pca_whitening(x.numpy())
        with pytest.raises(ShapeError, match=r"pca_whitening\(\): x must have shape \(N, D\); got \(4\) with 1"):
            F.pca_whitening(x[0])
        with pytest.raises(DTypeError, match=r"pca_whitening\(\): x must be a floating-point tensor"):
            F.pca_whitening(x.long())
        with pytest.raises(ShapeError, match=r"pca_whitening\(\): x must have at least 2 rows.*got shape \(1, 4\)"):
            F.pca_whitening(x[:1])
        with pytest.raises(ShapeError, match=r"learned_whitening\(\): x must have at least 1 column.*\(10, 0\)"):
            F.learned_whitening(x[:, :0], pairs)
        bad = x.clone()
        bad[3, 1] = float("nan")
        with pytest.raises(ValueError, match=r"pca_whitening\(\): x must be finite; got NaN or infinite"):
            F.pca_whitening(bad)
        with pytest.raises(ValueError, match=r"pca_whitening\(\): the covariance of x is zero"):
            F.pca_whitening(torch.ones(5, 3))
        # dim, shrinkage, eig_floor
        with pytest.raises(TypeError, match=r"pca_whitening\(\): dim must be an int or None; got float"):
            F.pca_whitening(x, dim=2.0)
        with pytest.raises(ValueError, match=r"pca_whitening\(\): dim must satisfy 1 <= dim <= D = 4; got 5"):
            F.pca_whitening(x, dim=5)
        with pytest.raises(ValueError, match=r"learned_whitening\(\): dim must satisfy 1 <= dim <= D = 4; got 0"):
            F.learned_whitening(x, pairs, dim=0)
        with pytest.raises(ValueError, match=r"pca_whitening\(\): shrinkage must be a finite number >= 0.*got -0.5"):
            F.pca_whitening(x, shrinkage=-0.5)
        with pytest.raises(ValueError, match=r"pca_whitening\(\): shrinkage must be a finite number >= 0.*got nan"):
            F.pca_whitening(x, shrinkage=float("nan"))
        with pytest.raises(ValueError, match=r"pca_whitening\(\): eig_floor must be in \(0, 1\).*got 0"):
            F.pca_whitening(x, eig_floor=0)
        with pytest.raises(ValueError, match=r"learned_whitening\(\): eig_floor must be in \(0, 1\).*got 1.5"):
            F.learned_whitening(x, pairs, eig_floor=1.5)
        for bad in (-0.1, 1.5, "0.5", True):
            with pytest.raises(
                ValueError, match=r"learned_whitening\(\): shrinkage must be a number in \[0, 1\] \(0: Lw as published"
            ):
                F.learned_whitening(x, pairs, shrinkage=bad)
        with pytest.raises(ValueError, match=r"learned_whitening\(\): center must be 'all' or 'queries'; got 'query'"):
            F.learned_whitening(x, pairs, center="query")
        # pos_pairs
        with pytest.raises(ShapeError, match=r"whitening\(\): pos_pairs must have shape \(P, 2\); got \(2, 3\)"):
            F.learned_whitening(x, torch.zeros(2, 3, dtype=torch.int64))
        with pytest.raises(DTypeError, match=r"learned_whitening\(\): pos_pairs must have dtype in \[torch.int64"):
            F.learned_whitening(x, pairs.float())
        with pytest.raises(DeviceError, match=r"learned_whitening\(\): pos_pairs must be on the same device as x"):
            F.learned_whitening(x, pairs.to("meta"))
        with pytest.raises(ShapeError, match=r"learned_whitening\(\): pos_pairs must hold at least one pair"):
            F.learned_whitening(x, pairs[:0])
        with pytest.raises(ValueError, match=r"pos_pairs must index rows of x in \[0, 9\]; got values in \[0, 10\]"):
            F.learned_whitening(x, torch.tensor([[0, 10]]))
        with pytest.raises(ValueError, match=r"pos_pairs must index rows of x in \[0, 9\]; got values in \[-1, 2\]"):
            F.learned_whitening(x, torch.tensor([[-1, 2]]))
        with pytest.raises(ValueError, match=r"learned_whitening\(\): the covariance of the pair differences is zero"):
            F.learned_whitening(x, torch.tensor([[1, 1], [2, 2]]))
        # whiten
        mean, proj = F.pca_whitening(x, dim=2)
        with pytest.raises(ShapeError, match=r"whiten\(\): x must have shape \(B, D\); got \(4\) with 1 dims"):
            F.whiten(x[0], mean, proj)
        with pytest.raises(ShapeError, match=r"whiten\(\): mean must have shape \(D\) with D=3; got \(4\)"):
            F.whiten(x[:, :3], mean, proj)
        with pytest.raises(ShapeError, match=r"whiten\(\): projection must have shape \(d, D\) with D=4; got \(4, 2\)"):
            F.whiten(x, mean, proj.T)
        with pytest.raises(DTypeError, match=r"whiten\(\): mean must be a floating-point tensor"):
            F.whiten(x, mean.long(), proj)
        with pytest.raises(DeviceError, match=r"whiten\(\): projection must be on the same device as x"):
            F.whiten(x, mean, proj.to("meta"))
        # Whiten
        with pytest.raises(ValueError, match=r"Whiten\(\): in_dim must be an int >= 1; got 0"):
            deepagg.Whiten(0)
        with pytest.raises(ValueError, match=r"Whiten\(\): in_dim must be an int >= 1; got 4.0"):
            deepagg.Whiten(4.0)
        msg = r"Whiten\(\): out_dim must be an int with 1 <= out_dim <= in_dim = 4; got 5"
        with pytest.raises(ValueError, match=msg):
            deepagg.Whiten(4, 5)
        with pytest.raises(ValueError, match=r"Whiten\(\): dtype must be a floating dtype; got torch.int64"):
            deepagg.Whiten(4, dtype=torch.int64)
        w = deepagg.Whiten(4, 2)
        with pytest.raises(RuntimeError, match=r"Whiten: the whitening is not fitted; call fit_pca\(X\) or fit_"):
            w(x)
        with pytest.raises(RuntimeError, match=r"Whiten: the whitening is not fitted"):
            w.as_linear()
        with pytest.raises(ValueError, match=r"Whiten.fit_pca\(\): dim must equal out_dim = 2 \(or be None\); got 3"):
            w.fit_pca(x, dim=3)
        with pytest.raises(ValueError, match=r"fit_learned\(\): dim must equal out_dim = 2.*Whiten\(4, out_dim=1\)"):
            w.fit_learned(x, pairs, dim=1)
        with pytest.raises(ShapeError, match=r"Whiten.fit_pca\(\): X must have shape \(N, D\) with D=4; got \(10, 3\)"):
            w.fit_pca(x[:, :3])
        with pytest.raises(ValueError, match=r"Whiten.fit_learned\(\): pos_pairs must index rows of X in \[0, 9\]"):
            w.fit_learned(x, torch.tensor([[0, 12]]))
        with pytest.raises(ValueError, match=r"Whiten.fit_learned\(\): center must be 'all' or 'queries'; got None"):
            w.fit_learned(x, pairs, center=None)
        assert not w._fitted


class TestLearnableWhiten(BaseTester):
    """``Whiten(learnable=True)``: mean and projection are Parameters, fitted first and then trainable."""

    def test_parameters(self) -> None:
        w = deepagg.Whiten(6, 4, learnable=True)
        assert dict(w.named_parameters()).keys() == {"mean", "projection"}
        assert isinstance(w.mean, torch.nn.Parameter)
        assert isinstance(w.projection, torch.nn.Parameter)
        assert dict(w.named_buffers()).keys() == {"fitted"}
        plain = deepagg.Whiten(6, 4)
        assert list(plain.parameters()) == []
        assert dict(plain.named_buffers()).keys() == {"mean", "projection", "fitted"}
        assert list(w.state_dict()) == list(plain.state_dict()) == ["mean", "projection", "fitted"]
        assert repr(w) == "Whiten(in_dim=6, out_dim=4, learnable=True, fitted=False)"
        assert repr(plain) == "Whiten(in_dim=6, out_dim=4, fitted=False)"
        w64 = deepagg.Whiten(6, learnable=True, dtype=torch.float64)
        assert w64.projection.dtype == torch.float64
        assert w64.projection.shape == (6, 6)

    def test_fit_keeps_parameters(self) -> None:
        x = make_data(80, 10).float()
        w = deepagg.Whiten(10, 6, learnable=True)
        mean_param, proj_param = w.mean, w.projection
        assert w.fit_pca(x, shrinkage=0.7) is w
        assert w.mean is mean_param  # same shape: copied in place, the same Parameter objects
        assert w.projection is proj_param
        plain = deepagg.Whiten(10, 6).fit_pca(x, shrinkage=0.7)
        assert torch.equal(w.projection.detach(), plain.projection)
        assert torch.equal(w.mean.detach(), plain.mean)
        assert torch.equal(w(x).detach(), plain(x))
        assert w(x).requires_grad
        assert not plain(x).requires_grad
        x2, pairs = make_pairs(12, 4, 10)
        w.fit_learned(x2.float(), pairs)
        assert w.projection is proj_param
        assert torch.equal(w.projection.detach(), deepagg.Whiten(10, 6).fit_learned(x2.float(), pairs).projection)

    def test_capped_fit_resizes_parameter(self) -> None:
        x, pairs = rank_deficient_pairs()
        w = deepagg.Whiten(32, 16, learnable=True)
        old = w.projection
        with pytest.warns(UserWarning, match=r"determine only 10 of the 16"):
            w.fit_learned(x.float(), pairs)
        assert isinstance(w.projection, torch.nn.Parameter)
        assert w.projection is not old  # a new Parameter: build the optimizer after fitting
        assert w.projection.shape == (10, 32)
        assert w.projection.requires_grad
        assert {name for name, _ in w.named_parameters()} == {"mean", "projection"}
        assert any(p is w.projection for p in w.parameters())
        with pytest.warns(UserWarning, match=r"determine only 10 of the 16"):
            plain = deepagg.Whiten(32, 16).fit_learned(x.float(), pairs)
        assert torch.equal(w.projection.detach(), plain.projection)
        assert repr(w) == "Whiten(in_dim=32, out_dim=10, requested_out_dim=16, learnable=True, fitted=True)"
        # Refitting on full-rank data restores the requested size, still a Parameter; a frozen one stays frozen.
        w.projection.requires_grad_(False)
        x2, pairs2 = make_pairs(20, 4, 32)
        w.fit_learned(x2.float(), pairs2)
        assert isinstance(w.projection, torch.nn.Parameter)
        assert w.projection.shape == (16, 32)
        assert not w.projection.requires_grad
        # The plain module's resize keeps a buffer.
        plain.fit_learned(x2.float(), pairs2)
        assert not isinstance(plain.projection, torch.nn.Parameter)
        assert "projection" in dict(plain.named_buffers())

    def test_state_dict_between_learnable_and_plain(self) -> None:
        x = make_data(60, 8).float()
        for capped in (False, True):
            if capped:
                with pytest.warns(UserWarning, match=r"the projection keeps 4"):
                    source = deepagg.Whiten(8, 6, learnable=True).fit_pca(x[:5])
            else:
                source = deepagg.Whiten(8, 6, learnable=True).fit_pca(x)
            rows = source.out_dim
            plain = deepagg.Whiten(8, 6)
            plain.load_state_dict(source.state_dict())
            assert plain.projection.shape == (rows, 8)
            assert torch.equal(plain(x), source(x).detach())
            back = deepagg.Whiten(8, 6, learnable=True)
            back.load_state_dict(plain.state_dict())
            assert isinstance(back.projection, torch.nn.Parameter)
            assert back.projection.shape == (rows, 8)
            assert back._fitted
            assert torch.equal(back(x).detach(), plain(x))
            assert dict(back.named_parameters()).keys() == {"mean", "projection"}

    def test_gradients(self) -> None:
        x = make_data(30, 5)
        w = deepagg.Whiten(5, 3, learnable=True, dtype=torch.float64).fit_pca(x)
        xs = x[:4].clone().requires_grad_()
        w(xs).pow(3).sum().backward()
        for t in (xs, w.mean, w.projection):
            assert t.grad is not None
            assert t.grad.abs().sum() > 0
        assert w.fitted.grad is None

    def test_gradcheck(self) -> None:
        x = make_data(30, 5)
        w = deepagg.Whiten(5, 3, learnable=True, dtype=torch.float64).fit_pca(x)
        inputs = (
            x[:4].clone().requires_grad_(),
            w.mean.detach().clone().requires_grad_(),
            w.projection.detach().clone().requires_grad_(),
        )

        def run(xs: torch.Tensor, mean: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(w, {"mean": mean, "projection": proj}, (xs,))

        assert self.gradcheck(run, inputs)
        assert self.gradcheck(w, (inputs[0],))

    def test_trainable(self) -> None:
        # A few SGD steps on the module's own parameters reduce a loss: trainable end to end.
        x, pairs = make_pairs(10, 4, 8)
        w = deepagg.Whiten(8, 4, learnable=True).fit_learned(x.float(), pairs)
        optimizer = torch.optim.SGD(w.parameters(), lr=0.1)  # built after fitting
        q, p = x[pairs[:, 0]].float(), x[pairs[:, 1]].float()
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = (w(q) - w(p)).pow(2).sum(dim=1).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        assert not torch.equal(w.projection.detach(), deepagg.Whiten(8, 4).fit_learned(x.float(), pairs).projection)

    def test_linear_compile_and_dtype(self) -> None:
        x = make_data(40, 8).float()
        w = deepagg.Whiten(8, 4, learnable=True).fit_pca(x)
        lin = w.as_linear()
        self.assert_close(lin(x), F.whiten(x, w.mean.detach(), w.projection.detach()), rtol=1e-4, atol=1e-4)
        assert w.weight is w.projection
        assert w.bias.requires_grad
        self.assert_close(torch.compile(w, backend="eager", fullgraph=True)(x[:5]), w(x[:5]))
        w.to(torch.float64)
        assert isinstance(w.projection, torch.nn.Parameter)
        assert w.projection.dtype == torch.float64
        assert w(x.double()).dtype == torch.float64

    def test_exception(self) -> None:
        with pytest.raises(TypeError, match=r"Whiten\(\): learnable must be a bool; got str\."):
            deepagg.Whiten(4, learnable="yes")
        with pytest.raises(TypeError, match=r"takes from 2 to 3 positional arguments"):
            deepagg.Whiten(4, 2, True)
        w = deepagg.Whiten(4, 2, learnable=True)
        with pytest.raises(RuntimeError, match=r"Whiten: the whitening is not fitted"):
            w(torch.randn(3, 4))
        small = deepagg.Whiten(32, 8, learnable=True)
        with pytest.raises(RuntimeError, match=r"the saved projection has shape \(16, 32\), but this Whiten was built"):
            small.load_state_dict(deepagg.Whiten(32, 16).state_dict())
        assert small.projection.shape == (8, 32)
        assert isinstance(small.projection, torch.nn.Parameter)
