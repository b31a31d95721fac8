"""Normalisation modules: :class:`L2N` and :class:`PowerNorm`."""

from __future__ import annotations

import torch
from torch import nn

from deepagg.functional.normalize import l2n, power_norm

__all__ = ["L2N", "PowerNorm"]


class L2N(nn.Module):
    r"""L2-normalise along a dimension. See :func:`deepagg.functional.l2n`.

    Args:
        eps: Floor of the norm, > 0.
        dim: The dimension to normalise.

    Shape:
        - x: :math:`(B, D)` (any rank >= 1). Output: same shape.

    Example:
        >>> L2N()(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
    """

    def __init__(self, eps: float = 1e-6, dim: int = -1) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"L2N(): eps must be > 0; got {eps}.")
        self.eps = float(eps)
        self.dim = int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x``."""
        return l2n(x, eps=self.eps, dim=self.dim)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, dim={self.dim}"


class PowerNorm(nn.Module):
    r"""Signed power normalisation :math:`\mathrm{sign}(x)|x|^\alpha`. See :func:`deepagg.functional.power_norm`.

    Not followed by L2 normalisation: stack :class:`L2N` after it (``nn.Sequential(PowerNorm(), L2N())``).

    Args:
        alpha: The exponent, > 0.
        eps: Clamp floor of :math:`|x|`.

    Shape:
        - x: any. Output: same shape.

    Example:
        >>> PowerNorm(alpha=0.5)(torch.tensor([[-4.0, 9.0]]))
        tensor([[-2.,  3.]])
    """

    def __init__(self, alpha: float = 0.5, eps: float = 1e-12) -> None:
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"PowerNorm(): alpha must be > 0; got {alpha}.")
        self.alpha = float(alpha)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the signed power."""
        return power_norm(x, alpha=self.alpha, eps=self.eps)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
