"""Tests of l2n / L2N and power_norm / PowerNorm."""

from __future__ import annotations

import math

import pytest
import torch

import deepagg
from deepagg import functional as F
from deepagg._checks import DTypeError, ShapeError

from ._base import BaseTester


def ref_l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    rows = []
    for row in x.double().tolist():
        norm = max(math.sqrt(sum(v * v for v in row)), eps)
        rows.append([v / norm for v in row])
    return torch.tensor(rows, dtype=torch.float64).reshape(x.shape)


def ref_power(x: torch.Tensor, alpha: float = 0.5, eps: float = 1e-12) -> torch.Tensor:
    def f(v: float) -> float:
        return math.copysign(max(abs(v), eps) ** alpha, v) if v != 0 else 0.0

    return torch.tensor([[f(v) for v in row] for row in x.double().tolist()], dtype=torch.float64)


class TestL2N(BaseTester):
    @pytest.mark.parametrize("batch", [0, 1, 2])
    def test_cardinality(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        x = torch.randn(batch, 7, device=device, dtype=dtype)
        assert F.l2n(x).shape == (batch, 7)
        assert deepagg.L2N()(x).shape == (batch, 7)

    def test_reference(self) -> None:
        x = torch.randn(5, 9, dtype=torch.float64)
        x[2] = 0.0
        self.assert_close(F.l2n(x), ref_l2n(x))
        assert (F.l2n(x)[2] == 0).all()

    def test_module_matches_functional(self) -> None:
        x = torch.randn(4, 6)
        self.assert_close(deepagg.L2N(eps=1e-3)(x), F.l2n(x, eps=1e-3))
        self.assert_close(deepagg.L2N(dim=0)(x), F.l2n(x, dim=0))
        assert repr(deepagg.L2N()) == "L2N(eps=1e-06, dim=-1)"

    def test_gradcheck(self) -> None:
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        assert self.gradcheck(F.l2n, (x,))

    def test_noncontiguous(self) -> None:
        x = torch.randn(6, 5, dtype=torch.float64)
        self.assert_close(F.l2n(x.t(), dim=0), F.l2n(x.t().contiguous(), dim=0))

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
    def test_dtype_preserved(self, dt: torch.dtype) -> None:
        assert F.l2n(torch.randn(2, 3, dtype=dt)).dtype == dt

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
    def test_half_rows_with_large_norm(self, dt: torch.dtype) -> None:
        # 512 entries of 3000: the norm 67882 overflows float16; the unit row must not become zeros.
        x = torch.full((2, 512), 3000.0, dtype=dt)
        x[1, :256] = 0
        out = F.l2n(x)
        assert out.dtype == dt
        want = torch.nn.functional.normalize(x.double(), dim=-1)
        self.assert_close(out, want)
        assert torch.isfinite(out).all()
        assert (out.float().norm(dim=-1) - 1).abs().max() < 1e-2

    def test_compile(self) -> None:
        x = torch.randn(3, 4)
        self.assert_close(torch.compile(deepagg.L2N(), backend="eager", fullgraph=True)(x), F.l2n(x))

    def test_exception(self) -> None:
        with pytest.raises(DTypeError, match=r"l2n\(\): x must be a floating-point tensor; got dtype torch.int64"):
            F.l2n(torch.ones(2, 3, dtype=torch.long))
        with pytest.raises(ShapeError, match=r"l2n\(\): x must have shape \(B, D\); got \(\) with 0 dims"):
            F.l2n(torch.tensor(1.0))
        with pytest.raises(ValueError, match=r"l2n\(\): eps must be > 0; got 0"):
            F.l2n(torch.ones(2, 3), eps=0)
        with pytest.raises(ValueError, match=r"L2N\(\): eps must be > 0; got -1"):
            deepagg.L2N(eps=-1)


class TestPowerNorm(BaseTester):
    @pytest.mark.parametrize("batch", [0, 1, 2])
    def test_cardinality(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        x = torch.randn(batch, 7, device=device, dtype=dtype)
        assert F.power_norm(x).shape == (batch, 7)
        assert deepagg.PowerNorm()(x).shape == (batch, 7)

    @pytest.mark.parametrize("alpha", [0.5, 0.3, 1.0, 2.0])
    def test_reference(self, alpha: float) -> None:
        x = torch.randn(4, 6, dtype=torch.float64)
        x[0, 0] = 0.0
        self.assert_close(F.power_norm(x, alpha=alpha), ref_power(x, alpha))

    def test_signed(self) -> None:
        x = torch.tensor([[-4.0, 0.0, 9.0]], dtype=torch.float64)
        self.assert_close(F.power_norm(x), torch.tensor([[-2.0, 0.0, 3.0]], dtype=torch.float64))

    def test_module_matches_functional(self) -> None:
        x = torch.randn(3, 5)
        self.assert_close(deepagg.PowerNorm(alpha=0.3)(x), F.power_norm(x, alpha=0.3))
        assert repr(deepagg.PowerNorm()) == "PowerNorm(alpha=0.5)"

    def test_gradcheck(self) -> None:
        x = torch.randn(3, 4, dtype=torch.float64)
        x = (x + 0.2 * x.sign()).requires_grad_()  # away from the clamp at 0
        assert self.gradcheck(lambda t: F.power_norm(t, alpha=0.5), (x,))

    def test_gradient_finite_at_zero(self) -> None:
        x = torch.zeros(2, 3, requires_grad=True)
        F.power_norm(x).sum().backward()
        assert torch.isfinite(x.grad).all()

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
    def test_dtype_preserved(self, dt: torch.dtype) -> None:
        assert F.power_norm(torch.randn(2, 3, dtype=dt)).dtype == dt

    def test_noncontiguous(self) -> None:
        x = torch.randn(6, 5, dtype=torch.float64)
        self.assert_close(F.power_norm(x.t()), F.power_norm(x.t().contiguous()))

    def test_compile(self) -> None:
        x = torch.randn(3, 4)
        self.assert_close(torch.compile(deepagg.PowerNorm(), backend="eager", fullgraph=True)(x), F.power_norm(x))

    def test_exception(self) -> None:
        msg = r"power_norm\(\): x must be a floating-point tensor; got dtype torch.int32"
        with pytest.raises(DTypeError, match=msg):
            F.power_norm(torch.ones(2, 3, dtype=torch.int32))
        with pytest.raises(ValueError, match=r"power_norm\(\): alpha must be > 0; got -0.5"):
            F.power_norm(torch.ones(2, 3), alpha=-0.5)
        with pytest.raises(ValueError, match=r"PowerNorm\(\): alpha must be > 0; got 0"):
            deepagg.PowerNorm(alpha=0)
