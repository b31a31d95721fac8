"""BaseTester: tolerances by dtype and shared assertions (kornia ``BaseTester`` pattern)."""

from __future__ import annotations

from typing import Any

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-10, 1e-12),
}


class BaseTester:
    """Base class of the per-op test classes; the standard method names are listed in house-style.md 8."""

    @staticmethod
    def assert_close(
        actual: torch.Tensor,
        expected: torch.Tensor,
        *,
        rtol: float | None = None,
        atol: float | None = None,
        **kwargs: Any,
    ) -> None:
        dtype = actual.dtype if actual.is_floating_point() else torch.float64
        r, a = TOLERANCES.get(dtype, (1e-5, 1e-8))
        torch.testing.assert_close(
            actual,
            expected.to(actual.dtype),
            rtol=r if rtol is None else rtol,
            atol=a if atol is None else atol,
            **kwargs,
        )

    @staticmethod
    def gradcheck(fn: Any, inputs: tuple[Any, ...], **kwargs: Any) -> bool:
        return torch.autograd.gradcheck(fn, inputs, fast_mode=False, **kwargs)

    @staticmethod
    def noncontiguous(x: torch.Tensor) -> torch.Tensor:
        """The same values as ``x`` in a non-contiguous layout (channels-last-like strides)."""
        y = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not y.is_contiguous() or x.shape[-1] == 1 or x.shape[-2] == 1
        return y
