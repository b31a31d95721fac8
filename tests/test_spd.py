"""Tests of the SPD building blocks behind HeW (``deepagg/functional/_spd.py``).

References are float64 dense ``torch.linalg.inv`` of one (unbatched) matrix at a time.
"""

from __future__ import annotations

import pytest
import torch

from deepagg.functional import _spd
from deepagg.functional._spd import (
    block_edges,
    cholesky_blocks_,
    forward_substitute_,
    inverse_cholesky_factor,
    inverse_diagonal,
    lower_gram,
)

from ._base import BaseTester


def spd(*batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """Random SPD matrices (..., n, n), float64, condition number in the tens to hundreds."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    return a @ a.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)


def ref_inverse(k: torch.Tensor) -> torch.Tensor:
    flat = k.reshape(-1, *k.shape[-2:])
    return torch.stack([torch.linalg.inv(m) for m in flat]).reshape(k.shape) if flat.shape[0] else k.clone()


class TestBlockEdges:
    def test_edges(self) -> None:
        assert block_edges(801, 4) == [0, 200, 400, 600, 801]
        assert block_edges(3, 4) == [0, 1, 2, 3]  # empty parts dropped
        assert block_edges(0, 4) == [0]
        assert block_edges(7, 1) == [0, 7]


class TestLowerGram(BaseTester):
    @pytest.mark.parametrize("blocks", [1, 2, 3, 4, 8])
    @pytest.mark.parametrize("n", [1, 5, 13])
    def test_reference(self, blocks: int, n: int) -> None:
        z = torch.randn(2, n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        got = lower_gram(z, blocks)
        full = z @ z.mT
        lower = torch.ones(n, n, dtype=torch.bool).tril()
        self.assert_close(got[:, lower], full[:, lower])
        edges = block_edges(n, blocks)
        owner = torch.bucketize(torch.arange(n), torch.tensor(edges[1:]), right=True)  # block of each row
        above = owner[None, :] > owner[:, None]  # strictly upper blocks: never computed
        assert (got[:, above] == 0).all()
        within = (owner[None, :] == owner[:, None]) & ~lower  # the upper halves of the diagonal blocks: in full
        self.assert_close(got[:, within], full[:, within])

    def test_gradient_reaches_z(self) -> None:
        z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        assert self.gradcheck(lambda t: lower_gram(t, 2), (z,))


class TestInverseCholeskyFactor(BaseTester):
    @pytest.mark.parametrize("base", [1, 2, 3, 8, None])
    @pytest.mark.parametrize("n", [1, 2, 7, 16, 23])
    def test_reference(self, n: int, base: int | None) -> None:
        k = spd(2, 3, n=n, seed=n)
        m = inverse_cholesky_factor(k, base)
        assert m.shape == (2, 3, n, n)
        assert (m.triu(1) == 0).all()  # exactly lower triangular
        assert (m.diagonal(dim1=-2, dim2=-1) > 0).all()
        self.assert_close(m.mT @ m, ref_inverse(k), rtol=1e-9, atol=1e-11)
        self.assert_close(inverse_diagonal(k, base), ref_inverse(k).diagonal(dim1=-2, dim2=-1), rtol=1e-9)

    def test_default_base_is_module_constant(self, monkeypatch: pytest.MonkeyPatch) -> None:
        k = spd(n=9, seed=1)
        calls: list[int] = []
        leaf = _spd._leaf
        monkeypatch.setattr(_spd, "_leaf", lambda t: calls.append(t.shape[-1]) or leaf(t))
        monkeypatch.setattr(_spd, "BASE", 3)
        inverse_cholesky_factor(k)
        assert calls == [2, 2, 2, 3]  # 9 -> 4 + 5 -> (2 + 2) + (2 + 3)

    def test_reads_lower_triangle_only(self) -> None:
        k = spd(2, n=11, seed=3)
        garbage = k.clone()
        upper = torch.ones(11, 11, dtype=torch.bool).triu(1)
        garbage[:, upper] = float("nan")
        for base in (2, 4, None):
            self.assert_close(inverse_cholesky_factor(garbage, base), inverse_cholesky_factor(k, base), rtol=0, atol=0)

    def test_not_positive_definite_is_nan_in_its_item(self) -> None:
        k = spd(3, n=10, seed=4)
        k[1, 6, 6] = -5.0  # indefinite, found in the second half of the recursion
        for base in (3, None):
            d = inverse_diagonal(k, base)
            assert torch.isnan(d[1]).any()
            assert torch.isfinite(d[[0, 2]]).all()
            self.assert_close(d[[0, 2]], ref_inverse(k[[0, 2]]).diagonal(dim1=-2, dim2=-1), rtol=1e-9)

    def test_batch_zero_and_float32(self) -> None:
        assert inverse_diagonal(torch.zeros(0, 5, 5)).shape == (0, 5)
        k = spd(2, n=12, seed=5)
        got = inverse_diagonal(k.float(), 4)
        assert got.dtype == torch.float32
        self.assert_close(got, ref_inverse(k).diagonal(dim1=-2, dim2=-1).float(), rtol=1e-4, atol=1e-6)

    @pytest.mark.parametrize("base", [2, None])
    def test_gradcheck(self, base: int | None) -> None:
        # K = A A^T / n + 0.5 I from a parameter, so both triangles move together as in every caller.
        g = torch.Generator().manual_seed(6)
        a = torch.randn(2, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)

        def fn(t: torch.Tensor) -> torch.Tensor:
            k = t @ t.mT / 6 + 0.5 * torch.eye(6, dtype=torch.float64)
            return inverse_diagonal(k, base)

        assert self.gradcheck(fn, (a,))

    def test_gradient_of_lower_only_input(self) -> None:
        # Given only the lower triangle (the strictly upper part 0, as lower_gram leaves it), the gradient is
        # that of the function of the symmetric matrix: the same as through the full symmetric input.
        g = torch.Generator().manual_seed(7)
        z = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
        eye = 3.5 * torch.eye(7, dtype=torch.float64)

        def via_lower(t: torch.Tensor) -> torch.Tensor:
            return inverse_diagonal(eye - 0.1 * lower_gram(t, 3), 2)

        def via_full(t: torch.Tensor) -> torch.Tensor:
            return torch.linalg.inv(eye - 0.1 * t @ t.mT).diagonal()

        w = torch.randn(7, generator=g, dtype=torch.float64)
        (g_lower,) = torch.autograd.grad((via_lower(z) * w).sum(), z)
        (g_full,) = torch.autograd.grad((via_full(z) * w).sum(), z)
        self.assert_close(g_lower, g_full)
        assert self.gradcheck(via_lower, (z,))


def rhs(*batch: int, n: int, r: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(*batch, n, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_forward(k: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``L^-1 Z`` with ``L`` torch's Cholesky factor of each matrix, one (unbatched) matrix at a time."""
    fk, fz = k.reshape(-1, *k.shape[-2:]), z.reshape(-1, *z.shape[-2:])
    out = [torch.linalg.solve_triangular(torch.linalg.cholesky(a), b, upper=False) for a, b in zip(fk, fz, strict=True)]
    return torch.stack(out).reshape(z.shape) if out else z.clone()


class TestCholeskyBlocks(BaseTester):
    @pytest.mark.parametrize("base", [1, 2, 3, 8, None])
    @pytest.mark.parametrize("n", [1, 2, 7, 16, 23])
    def test_reference(self, n: int, base: int | None) -> None:
        k, z = spd(2, 3, n=n, seed=n), rhs(2, 3, n=n, seed=n + 1)
        f = k.clone()
        assert cholesky_blocks_(f, base) is f  # in place
        y = z.clone()
        assert forward_substitute_(f, y, base) is y
        self.assert_close(y, ref_forward(k, z), rtol=1e-9, atol=1e-11)
        # what HeW uses: z^T K^-1 z = ||L^-1 z||^2, column by column
        quad = torch.einsum("...ir,...ij,...jr->...r", z, ref_inverse(k), z)
        self.assert_close((y * y).sum(-2), quad, rtol=1e-9, atol=1e-11)

    def test_default_base_is_module_constant(self, monkeypatch: pytest.MonkeyPatch) -> None:
        k, z = spd(n=9, seed=1), rhs(n=9, seed=2)
        calls: list[int] = []
        leaf = _spd._leaf
        monkeypatch.setattr(_spd, "_leaf", lambda t: calls.append(t.shape[-1]) or leaf(t))
        monkeypatch.setattr(_spd, "SOLVE_BASE", 3)
        y = forward_substitute_(cholesky_blocks_(k.clone()), z.clone())
        assert calls == [2, 2, 2, 3]  # 9 -> 4 + 5 -> (2 + 2) + (2 + 3)
        self.assert_close(y, ref_forward(k, z), rtol=1e-9, atol=1e-11)

    def test_reads_lower_triangle_only(self) -> None:
        k, z = spd(2, n=11, seed=3), rhs(2, n=11, seed=4)
        garbage = k.clone()
        garbage[:, torch.ones(11, 11, dtype=torch.bool).triu(1)] = float("nan")
        for base in (2, 4, None):
            y = forward_substitute_(cholesky_blocks_(garbage.clone(), base), z.clone(), base)
            self.assert_close(y, ref_forward(k, z), rtol=1e-9, atol=1e-11)

    def test_not_positive_definite_is_nan_in_its_item(self) -> None:
        k, z = spd(3, n=10, seed=5), rhs(3, n=10, seed=6)
        k[1, 6, 6] = -5.0  # indefinite, found in the second half of the recursion
        for base in (3, None):
            y = forward_substitute_(cholesky_blocks_(k.clone(), base), z.clone(), base)
            assert torch.isnan(y[1]).any()
            self.assert_close(y[[0, 2]], ref_forward(k[[0, 2]], z[[0, 2]]), rtol=1e-9, atol=1e-11)

    def test_batch_zero_and_float32(self) -> None:
        assert forward_substitute_(cholesky_blocks_(torch.zeros(0, 5, 5), 2), torch.zeros(0, 5, 3), 2).shape == (
            0,
            5,
            3,
        )
        k, z = spd(2, n=12, seed=7), rhs(2, n=12, seed=8)
        y = forward_substitute_(cholesky_blocks_(k.float(), 4), z.float(), 4)
        assert y.dtype == torch.float32
        self.assert_close(y, ref_forward(k, z).float(), rtol=1e-4, atol=1e-5)
