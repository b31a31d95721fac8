"""Tests of pca_whitening / learned_whitening / whiten and the Whiten module."""

from __future__ import annotations

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
        # Rank-deficient covariance (N - 1 < D): the eigenvalue floor keeps everything finite.
        x = make_data(n, 6)
        mean, proj = F.pca_whitening(x)
        assert torch.isfinite(proj).all()
        top = np.linalg.eigvalsh(np.cov(x.numpy(), rowvar=False)).max()
        assert proj.norm(dim=1).max() <= (1e-10 * top) ** -0.5 * (1 + 1e-9)
        y = F.whiten(x, mean, proj)
        assert torch.isfinite(y).all()
        _, pairs_proj = F.learned_whitening(x, torch.tensor([[0, 1]]))
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
        assert not w._fitted
