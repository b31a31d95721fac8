"""Tests of the batched conjugate-gradient solver ``deepagg.functional.solvers.conjugate_gradient``.

The references are written here in float64: the exact solution by ``torch.linalg.cholesky`` +
``torch.cholesky_solve``, and a plain one-column CG loop (Hestenes-Stiefel) that records every iterate and its
recurrence residual, to which MATLAB ``pcg``'s rule (return the smallest-residual iterate when the tolerance is
never met) is applied.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from deepagg._checks import DTypeError, ShapeError
from deepagg.functional.solvers import conjugate_gradient

from ._base import BaseTester

F64 = torch.float64

# --------------------------------------------------------------------------------------------------------------
# References and data.
# --------------------------------------------------------------------------------------------------------------


def random_spd(n: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """``M M^T / ||M M^T|| + 0.1 I`` (the linear_cg test matrix): SPD, condition number about 10."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=F64)
    a = m @ m.T
    return (a / torch.linalg.matrix_norm(a) + 0.1 * torch.eye(n, dtype=F64)).to(dtype)


def ill_conditioned_spd(n: int, seed: int, cond: float) -> torch.Tensor:
    """``Q diag(logspace(0, log10(cond))) Q^T`` with a random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    ev = torch.logspace(0.0, float(torch.log10(torch.tensor(cond))), n, dtype=F64)
    return (q * ev) @ q.T


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def exact_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cholesky solve of ``a x = b`` for a 1-D or 2-D ``b``."""
    rhs = b[:, None] if b.ndim == 1 else b
    x = torch.cholesky_solve(rhs, torch.linalg.cholesky(a))
    return x[:, 0] if b.ndim == 1 else x


def cg_iterates(a: torch.Tensor, b: torch.Tensor, max_iter: int, tol: float) -> tuple[list[torch.Tensor], list[float]]:
    """Plain textbook CG on one column from x0 = 0; stops when ||r|| <= tol ||b||. All iterates + residuals."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = float(r @ r)
    iterates, residuals = [x.clone()], [rr**0.5]
    threshold = tol * float(b.norm())
    if rr**0.5 <= threshold:
        return iterates, residuals
    for _ in range(max_iter):
        ap = a @ p
        pap = float(p @ ap)
        if pap <= 0:  # a direction of non-positive curvature (A not SPD): the column stops, as pcg's flag 4
            break
        step = rr / pap
        x = x + step * p
        r = r - step * ap
        rr_new = float(r @ r)
        iterates.append(x.clone())
        residuals.append(rr_new**0.5)
        if rr_new**0.5 <= threshold:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return iterates, residuals


def ref_pcg(a: torch.Tensor, b: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, float]:
    """``pcg``'s answer for one column: the converged iterate, or else the first smallest-residual iterate."""
    iterates, residuals = cg_iterates(a, b, max_iter, tol)
    threshold = tol * float(b.norm())
    if residuals[-1] <= threshold:
        return iterates[-1], residuals[-1]
    best = min(range(len(residuals)), key=residuals.__getitem__)
    return iterates[best], residuals[best]


def ref_pcg_columns(a: torch.Tensor, b: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    cols = [ref_pcg(a, b[:, j], max_iter, tol) for j in range(b.shape[1])]
    x = torch.stack([c[0] for c in cols], dim=1) if cols else torch.zeros_like(b)
    return x, torch.tensor([c[1] for c in cols], dtype=F64)


def matvec_of(a: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda v: a @ v


# --------------------------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------------------------


class TestConjugateGradient(BaseTester):
    def test_smoke(self) -> None:
        a = random_spd(8, 0)
        x, res = conjugate_gradient(matvec_of(a), randn(8, seed=1))
        assert x.shape == (8,)
        assert res.shape == ()
        x, res = conjugate_gradient(matvec_of(a), randn(8, 3, seed=1))
        assert x.shape == (8, 3)
        assert res.shape == (3,)

    @pytest.mark.parametrize("n", [1, 5, 40])
    def test_reference_single(self, n: int) -> None:
        a, b = random_spd(n, n), randn(n, seed=n + 1)
        x, res = conjugate_gradient(matvec_of(a), b, max_iter=45, tol=1e-14)
        self.assert_close(x, exact_solve(a, b))
        assert float(res) <= 1e-12 * float(b.norm())

    @pytest.mark.parametrize(("n", "q"), [(6, 1), (30, 4), (50, 9)])
    def test_reference_batched(self, n: int, q: int) -> None:
        a, b = random_spd(n, 10 + n), randn(n, q, seed=20 + q)
        x, res = conjugate_gradient(matvec_of(a), b, max_iter=45, tol=1e-14)
        self.assert_close(x, exact_solve(a, b))
        assert res.shape == (q,)
        assert bool((res <= 1e-12 * b.norm(dim=0)).all())

    def test_converged_column_stays_fixed(self) -> None:
        # Column 0 is an eigenvector of A: CG solves it exactly in one iteration. Its iterate must not move
        # afterwards, whatever the budget, while the other columns keep iterating.
        n = 30
        a = random_spd(n, 3)
        evals, evecs = torch.linalg.eigh(a)
        lam, v = evals[7], evecs[:, 7]
        b = randn(n, 4, seed=4)
        b[:, 0] = 3.0 * v
        exact = exact_solve(a, b)
        x1, res1 = conjugate_gradient(matvec_of(a), b, max_iter=1, tol=1e-10)
        self.assert_close(x1[:, 0], 3.0 * v / lam, rtol=1e-12, atol=1e-14)
        self.assert_close(x1[:, 0], exact[:, 0], rtol=1e-12, atol=1e-14)
        assert float(res1[0]) <= 1e-10 * 3.0
        for budget in (2, 5, 20):
            x, res = conjugate_gradient(matvec_of(a), b, max_iter=budget, tol=1e-10)
            assert torch.equal(x[:, 0], x1[:, 0]), budget
            assert torch.equal(res[0], res1[0]), budget
        # The other columns are not frozen by column 0: with a large budget they reach the exact solution.
        x, _ = conjugate_gradient(matvec_of(a), b, max_iter=45, tol=1e-14)
        self.assert_close(x, exact)

    @pytest.mark.parametrize(("max_iter", "tol"), [(3, 1e-6), (12, 1e-3), (45, 1e-14)])
    def test_batching_matches_one_column_at_a_time(self, max_iter: int, tol: float) -> None:
        n = 40
        a = random_spd(n, 5)
        b = randn(n, 6, seed=6)
        b[:, 2] *= 1e5  # very different scales: each column has its own steps and its own tolerance
        b[:, 4] *= 1e-5
        b[:, 5] = 2.0 * torch.linalg.eigh(a).eigenvectors[:, 0]  # converges at once
        x, res = conjugate_gradient(matvec_of(a), b, max_iter=max_iter, tol=tol)
        for j in range(b.shape[1]):
            xj, rj = conjugate_gradient(matvec_of(a), b[:, j], max_iter=max_iter, tol=tol)
            scale = float(b[:, j].norm())
            torch.testing.assert_close(x[:, j], xj, rtol=1e-12, atol=1e-12 * scale)
            torch.testing.assert_close(res[j], rj, rtol=1e-9, atol=1e-12 * scale)
            # ... and both equal the plain one-column reference loop.
            xr, rr = ref_pcg(a, b[:, j], max_iter, tol)
            torch.testing.assert_close(xj, xr, rtol=1e-10, atol=1e-12 * scale)
            torch.testing.assert_close(float(rj), rr, rtol=1e-8, atol=1e-12 * scale)

    def test_tol_is_relative_to_each_column(self) -> None:
        # With tol = 1e-3 CG stops well before the exact solution. A column scaled by 1e6 must stop at the same
        # iteration (same relative result): with an absolute tolerance it would run on and differ.
        n = 40
        a = ill_conditioned_spd(n, 7, 30.0)
        b0 = randn(n, seed=8)
        tol = 1e-3
        b = torch.stack([b0, 1e6 * b0, 1e-6 * b0], dim=1)
        x, res = conjugate_gradient(matvec_of(a), b, max_iter=40, tol=tol)
        exact = exact_solve(a, b0)
        assert float((x[:, 0] - exact).norm()) > 1e-6 * float(exact.norm())  # stopped early: the test means something
        iterates, residuals = cg_iterates(a, b0, 40, tol)
        assert residuals[-1] <= tol * float(b0.norm()) < residuals[-2]  # converged at this iterate, not before
        self.assert_close(x[:, 0], iterates[-1], rtol=1e-9, atol=1e-12)
        self.assert_close(x[:, 1], 1e6 * x[:, 0], rtol=1e-10, atol=0.0)
        self.assert_close(x[:, 2], 1e-6 * x[:, 0], rtol=1e-10, atol=0.0)
        self.assert_close(res, torch.tensor([1.0, 1e6, 1e-6], dtype=F64) * res[0], rtol=1e-8, atol=0.0)
        # The single-column calls agree.
        for j, s in enumerate((1.0, 1e6, 1e-6)):
            xj, _ = conjugate_gradient(matvec_of(a), s * b0, max_iter=40, tol=tol)
            self.assert_close(xj, x[:, j], rtol=1e-12, atol=0.0)

    def test_zero_column(self) -> None:
        a = random_spd(10, 9)
        b = randn(10, 3, seed=10)
        b[:, 1] = 0.0
        x, res = conjugate_gradient(matvec_of(a), b, max_iter=15, tol=1e-6)
        assert torch.equal(x[:, 1], torch.zeros(10, dtype=F64))
        assert float(res[1]) == 0.0
        assert not x.isnan().any()
        assert not res.isnan().any()
        self.assert_close(x[:, [0, 2]], ref_pcg_columns(a, b[:, [0, 2]], 15, 1e-6)[0])
        for tol in (0.0, 1e-6):
            x1, r1 = conjugate_gradient(matvec_of(a), torch.zeros(10, dtype=F64), max_iter=5, tol=tol)
            assert torch.equal(x1, torch.zeros(10, dtype=F64))
            assert float(r1) == 0.0

    def test_max_iter_zero(self) -> None:
        a, b = random_spd(7, 11), randn(7, 2, seed=12)
        calls: list[int] = []

        def matvec(v: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return a @ v

        x, res = conjugate_gradient(matvec, b, max_iter=0)
        assert torch.equal(x, torch.zeros_like(b))
        self.assert_close(res, b.norm(dim=0))  # the residual of x0 = 0 is b
        assert calls == []
        x1, r1 = conjugate_gradient(matvec, b[:, 0], max_iter=0)
        assert torch.equal(x1, torch.zeros(7, dtype=F64))
        self.assert_close(r1, b[:, 0].norm())

    def test_matvec_called_max_iter_times(self) -> None:
        # A fixed budget: no data-dependent break, even after every column has converged.
        a, b = random_spd(5, 13), randn(5, 2, seed=14)
        calls: list[tuple[int, ...]] = []

        def matvec(v: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(v.shape))
            return a @ v

        x, _ = conjugate_gradient(matvec, b, max_iter=25, tol=1e-6)
        assert calls == [(5, 2)] * 25
        self.assert_close(x, exact_solve(a, b), rtol=1e-8, atol=1e-8)

    def test_smallest_residual_iterate_when_not_converged(self) -> None:
        # Ill-conditioned SPD systems, few iterations: the CG residual is not monotone. Find right-hand sides
        # whose smallest residual is at an inner iterate (neither x0 = 0 nor the last one), and one where x0 = 0
        # is the best, and check that the solver returns exactly those iterates.
        n, max_iter, tol = 30, 8, 1e-12
        inner: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        zero_best: list[tuple[torch.Tensor, torch.Tensor]] = []
        for seed in range(12):
            a = ill_conditioned_spd(n, seed, 1e4)
            b = randn(n, seed=100 + seed)
            _, residuals = cg_iterates(a, b, max_iter, tol)
            assert len(residuals) == max_iter + 1  # never converges
            order = sorted(range(len(residuals)), key=residuals.__getitem__)
            best, second = order[0], order[1]
            clear = residuals[best] < 0.95 * residuals[second]  # no near-tie between the two best iterates
            if clear and 0 < best < max_iter and residuals[best] < 0.9 * residuals[-1]:
                inner.append((a, b, best))
            elif clear and best == 0:
                zero_best.append((a, b))
        assert len(inner) >= 2  # the non-monotone case is really exercised
        assert zero_best
        for a, b, best in inner:
            iterates, residuals = cg_iterates(a, b, max_iter, tol)
            x, res = conjugate_gradient(matvec_of(a), b, max_iter=max_iter, tol=tol)
            self.assert_close(x, iterates[best], rtol=1e-9, atol=1e-12)
            assert not torch.allclose(x, iterates[-1])
            self.assert_close(res, torch.tensor(residuals[best], dtype=F64), rtol=1e-9, atol=0.0)
            # residual_norms is the true residual of the returned iterate (to rounding).
            self.assert_close(res, (b - a @ x).norm(), rtol=1e-8, atol=1e-12)
        a, b = zero_best[0]
        x, res = conjugate_gradient(matvec_of(a), b, max_iter=max_iter, tol=tol)
        assert torch.equal(x, torch.zeros_like(b))
        self.assert_close(res, b.norm())
        # All of them batched as columns of one system each (block-diagonal operator): same answers.
        systems = [(a, b) for a, b, _ in inner] + zero_best[:2]
        big = torch.block_diag(*[s[0] for s in systems])
        rhs = torch.zeros(n * len(systems), len(systems), dtype=F64)
        for j, (_, b) in enumerate(systems):
            rhs[j * n : (j + 1) * n, j] = b
        xb, rb = conjugate_gradient(matvec_of(big), rhs, max_iter=max_iter, tol=tol)
        for j, (a, b) in enumerate(systems):
            xr, rr = ref_pcg(a, b, max_iter, tol)
            self.assert_close(xb[j * n : (j + 1) * n, j], xr, rtol=1e-9, atol=1e-12)
            self.assert_close(rb[j], torch.tensor(rr, dtype=F64), rtol=1e-9, atol=0.0)

    def test_nonpositive_curvature_freezes_the_column(self) -> None:
        # Symmetric indefinite systems (one eigenvalue -0.3) where p^T A p <= 0 after one or more steps: that
        # column stops for good (it keeps its smallest-residual iterate) while an SPD column batched with it goes on.
        n, max_iter, tol = 6, 6, 1e-12
        cases = []
        for seed in range(40):
            g = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
            ev = torch.linspace(1.0, 3.0, n, dtype=F64)
            ev[0] = -0.3
            a = (q * ev) @ q.T
            b = randn(n, seed=1000 + seed)
            iterates, _ = cg_iterates(a, b, max_iter, tol)
            r = b - a @ iterates[-1]
            # Stepped at least once, then stopped on a non-positive p^T A p where a restart along r would go on.
            if 2 <= len(iterates) <= max_iter and float(r @ a @ r) > 0:
                cases.append((a, b))
        assert len(cases) >= 3
        spd, b_spd = random_spd(n, 3), randn(n, seed=4)
        for a, b in cases:
            big = torch.block_diag(a, spd)
            rhs = torch.zeros(2 * n, 2, dtype=F64)
            rhs[:n, 0], rhs[n:, 1] = b, b_spd
            x, res = conjugate_gradient(matvec_of(big), rhs, max_iter=max_iter, tol=tol)
            xr, rr = ref_pcg(a, b, max_iter, tol)
            self.assert_close(x[:n, 0], xr, rtol=1e-9, atol=1e-12)
            self.assert_close(res[0], torch.tensor(rr, dtype=F64), rtol=1e-9, atol=0.0)
            self.assert_close(x[n:, 1], ref_pcg(spd, b_spd, max_iter, tol)[0], rtol=1e-9, atol=1e-12)
            assert bool((x[:n, 1] == 0).all())
            assert bool((x[n:, 0] == 0).all())

    @pytest.mark.parametrize("max_iter", [1, 4, 10])
    def test_residual_norms_are_true_residuals(self, max_iter: int) -> None:
        a, b = random_spd(25, 15), randn(25, 5, seed=16)
        x, res = conjugate_gradient(matvec_of(a), b, max_iter=max_iter, tol=1e-10)
        self.assert_close(res, (b - a @ x).norm(dim=0), rtol=1e-8, atol=1e-13)
        xr, rr = ref_pcg_columns(a, b, max_iter, 1e-10)
        self.assert_close(x, xr)
        self.assert_close(res, rr, rtol=1e-9, atol=1e-13)

    def test_cardinality(self) -> None:
        a = random_spd(4, 17)
        x, res = conjugate_gradient(matvec_of(a), torch.zeros(4, 0, dtype=F64))
        assert x.shape == (4, 0)
        assert res.shape == (0,)
        x, res = conjugate_gradient(lambda v: v, torch.zeros(0, 3, dtype=F64))
        assert x.shape == (0, 3)
        assert torch.equal(res, torch.zeros(3, dtype=F64))
        x, res = conjugate_gradient(lambda v: 2.0 * v, torch.ones(1, dtype=F64), max_iter=1)
        self.assert_close(x, torch.tensor([0.5], dtype=F64))
        assert float(res) == 0.0

    def test_dtype_preserved(self) -> None:
        a = random_spd(12, 18, torch.float32)
        b = randn(12, 3, seed=19).float()
        x, res = conjugate_gradient(matvec_of(a), b, max_iter=40, tol=1e-6)
        assert x.dtype == torch.float32
        assert res.dtype == torch.float32
        self.assert_close(x, exact_solve(a.double(), b.double()).float(), rtol=1e-4, atol=1e-4)

    def test_noncontiguous(self) -> None:
        a = random_spd(10, 20)
        b = self.noncontiguous(randn(10, 4, seed=21))
        assert not b.is_contiguous()
        x, res = conjugate_gradient(matvec_of(a), b, max_iter=6)
        x2, res2 = conjugate_gradient(matvec_of(a), b.contiguous(), max_iter=6)
        self.assert_close(x, x2)
        self.assert_close(res, res2)

    def test_no_gradient(self) -> None:
        a = random_spd(5, 22)
        b = randn(5, seed=23).requires_grad_()
        x, res = conjugate_gradient(matvec_of(a), b)
        assert not x.requires_grad
        assert not res.requires_grad
        assert b.grad is None

    def test_exception(self) -> None:
        a = random_spd(5, 24)
        b = randn(5, seed=25)
        with pytest.raises(
            ShapeError,
            match=(
                r"conjugate_gradient\(\): matvec must return a tensor of the shape of its input \(5, 1\); "
                r"got \(5,\)\."
            ),
        ):
            conjugate_gradient(lambda v: (a @ v)[:, 0], b)
        with pytest.raises(
            ShapeError,
            match=(
                r"conjugate_gradient\(\): matvec must return a tensor of the shape of its input \(5, 2\); "
                r"got \(5, 1\)\."
            ),
        ):
            conjugate_gradient(lambda v: (a @ v)[:, :1], torch.stack([b, b], 1))
        with pytest.raises(
            ShapeError, match=r"matvec must return a tensor of the shape of its input \(5, 1\); got list\."
        ):
            conjugate_gradient(lambda v: (a @ v).tolist(), b)
        with pytest.raises(
            ShapeError, match=r"conjugate_gradient\(\): b must have shape \(N,\) or \(N, Q\); got shape \(5, 2, 1\)\."
        ):
            conjugate_gradient(matvec_of(a), b.reshape(5, 1, 1).expand(5, 2, 1))
        with pytest.raises(ShapeError, match=r"b must have shape \(N,\) or \(N, Q\); got shape \(\)\."):
            conjugate_gradient(matvec_of(a), b[0])
        with pytest.raises(ShapeError, match=r"b must have shape \(N,\) or \(N, Q\); got list\."):
            conjugate_gradient(matvec_of(a), b.tolist())  # type: ignore[arg-type]
        with pytest.raises(
            DTypeError, match=r"conjugate_gradient\(\): b must be a floating-point tensor; got dtype torch\.int64\."
        ):
            conjugate_gradient(matvec_of(a), torch.ones(5, dtype=torch.int64))
        with pytest.raises(DTypeError, match=r"b must be a floating-point tensor; got dtype torch\.bool\."):
            conjugate_gradient(matvec_of(a), torch.ones(5, 2, dtype=torch.bool))
        for tol in (-1e-6, float("nan"), float("inf"), True, "1e-6", None):
            with pytest.raises(
                ValueError,
                match=(
                    r"conjugate_gradient\(\): tol must be a finite float >= 0 \(relative to each column's \|\|b\|\|\); "
                    r"got "
                ),
            ):
                conjugate_gradient(matvec_of(a), b, tol=tol)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"conjugate_gradient\(\): max_iter must be >= 0; got -1\."):
            conjugate_gradient(matvec_of(a), b, max_iter=-1)
        with pytest.raises(TypeError, match=r"conjugate_gradient\(\): max_iter must be an int >= 0; got float 2\.5\."):
            conjugate_gradient(matvec_of(a), b, max_iter=2.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"conjugate_gradient\(\): max_iter must be an int >= 0; got True\."):
            conjugate_gradient(matvec_of(a), b, max_iter=True)
