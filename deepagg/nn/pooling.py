"""Pooling modules: MAC, SPoC, GeM, R-MAC, CroW. Each returns L2-normalised :math:`(B, C)` descriptors.

Half-precision maps (float16, bfloat16) are pooled and L2-normalised in float32 and the unit descriptors cast
back to the input dtype: the raw pooled vector or its norm can exceed the float16 range (a norm above 65504
made ``l2n`` return zeros), while unit rows always fit.
"""

from __future__ import annotations

import torch
from torch import nn

from deepagg.functional.normalize import l2n
from deepagg.functional.pooling import crow, gem, mac, rmac, spoc

__all__ = ["MAC", "RMAC", "CroW", "GeM", "SPoC"]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 maps as float32 (pooling and normalising in half can overflow); others unchanged."""
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x


class _Pool(nn.Module):
    """Shared base: aggregation modules output ``in_channels`` dims, L2-normalised."""

    def out_dim(self, in_channels: int) -> int:
        """Descriptor dimension for feature maps with ``in_channels`` channels (no dry run needed)."""
        return in_channels


class MAC(_Pool):
    r"""Maximum activations of convolutions, L2-normalised. See :func:`deepagg.functional.mac`.

    Shape:
        - x: :math:`(B, C, H, W)`; mask (optional): :math:`(B, H, W)` bool.
        - Output: :math:`(B, C)`, unit rows.

    Example:
        >>> MAC()(torch.rand(2, 512, 24, 32)).shape
        torch.Size([2, 512])
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool and L2-normalise (in at least float32); the output has the dtype of ``x``."""
        return l2n(mac(_upcast(x), mask=mask)).to(x.dtype)


class SPoC(_Pool):
    r"""Sum (mean) pooling, L2-normalised. See :func:`deepagg.functional.spoc`.

    Shape:
        - x: :math:`(B, C, H, W)`; mask (optional): :math:`(B, H, W)` bool.
        - Output: :math:`(B, C)`, unit rows.

    Example:
        >>> SPoC()(torch.rand(2, 512, 24, 32)).shape
        torch.Size([2, 512])
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool and L2-normalise (in at least float32); the output has the dtype of ``x``."""
        return l2n(spoc(_upcast(x), mask=mask)).to(x.dtype)


class GeM(_Pool):
    r"""Generalized-mean pooling with a learnable (or fixed) power p. See :func:`deepagg.functional.gem`.

    Args:
        p: Initial power, > 0.
        eps: Clamp floor applied to the input before the power, > 0.
        learnable: ``p`` is an ``nn.Parameter`` when True, a buffer (saved in the state_dict, not trained)
            when False.
        device: Device of ``p``.
        dtype: Dtype of ``p``.

    Shape:
        - x: :math:`(B, C, H, W)`; mask (optional): :math:`(B, H, W)` bool.
        - Output: :math:`(B, C)`, unit rows.

    Example:
        >>> GeM(p=3.0)(torch.rand(2, 512, 24, 32)).shape
        torch.Size([2, 512])
    """

    p: torch.Tensor

    def __init__(
        self,
        p: float = 3.0,
        eps: float = 1e-6,
        learnable: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not p > 0:
            raise ValueError(f"GeM(): p must be > 0; got {p}.")
        if not eps > 0:
            raise ValueError(f"GeM(): eps must be > 0; got {eps}.")
        self.eps = float(eps)
        self.learnable = bool(learnable)
        value = torch.full((), float(p), device=device, dtype=dtype or torch.get_default_dtype())
        if self.learnable:
            self.p = nn.Parameter(value)
        else:
            self.register_buffer("p", value)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool and L2-normalise (in at least float32); the output has the dtype of ``x``."""
        return l2n(gem(_upcast(x), self.p, self.eps, mask=mask)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()):.4g}, eps={self.eps}, learnable={self.learnable}"


class RMAC(_Pool):
    r"""Regional MAC (Tolias grid, overlap 0.4, plus the global region), L2-normalised.

    See :func:`deepagg.functional.rmac` and :func:`deepagg.functional.rmac_grid`.

    Args:
        levels: Number of scale levels L, >= 1.
        eps: Added to each region vector's norm.

    Shape:
        - x: :math:`(B, C, H, W)`; mask (optional): :math:`(B, H, W)` bool, a top-left rectangle per image.
        - Output: :math:`(B, C)`, unit rows.

    Example:
        >>> RMAC(levels=3)(torch.rand(2, 512, 24, 32)).shape
        torch.Size([2, 512])
    """

    def __init__(self, levels: int = 3, eps: float = 1e-6) -> None:
        super().__init__()
        if int(levels) != levels or levels < 1:
            raise ValueError(f"RMAC(): levels must be an int >= 1; got {levels}.")
        self.levels = int(levels)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool and L2-normalise (in at least float32); the output has the dtype of ``x``."""
        return l2n(rmac(_upcast(x), levels=self.levels, eps=self.eps, mask=mask)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


class CroW(_Pool):
    r"""Cross-dimensional weighting, L2-normalised. See :func:`deepagg.functional.crow`.

    Args:
        a: Spatial normalisation norm, > 0.
        b: Spatial power root, > 0.

    Shape:
        - x: :math:`(B, C, H, W)` non-negative; mask (optional): :math:`(B, H, W)` bool.
        - Output: :math:`(B, C)`, unit rows.

    Example:
        >>> CroW()(torch.rand(2, 512, 24, 32)).shape
        torch.Size([2, 512])
    """

    def __init__(self, a: float = 2.0, b: float = 2.0) -> None:
        super().__init__()
        for name, value in (("a", a), ("b", b)):
            if not value > 0:
                raise ValueError(f"CroW(): {name} must be > 0; got {value}.")
        self.a = float(a)
        self.b = float(b)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool and L2-normalise (in at least float32); the output has the dtype of ``x``."""
        return l2n(crow(_upcast(x), a=self.a, b=self.b, mask=mask)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}"
