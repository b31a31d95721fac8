"""aGaussian/eChannel co-weighting module (:class:`AGaussianEChannelPool`)."""

from __future__ import annotations

import torch

from deepagg.functional.coweight import _check_options, agaussian_echannel
from deepagg.functional.normalize import l2n
from deepagg.nn.pooling import _Pool, _upcast

__all__ = ["AGaussianEChannelPool"]


class AGaussianEChannelPool(_Pool):
    r"""aGaussian + eChannel co-weighted sum pooling, L2-normalised. See :func:`deepagg.functional.agaussian_echannel`.

    Wang et al., ICME 2018 (arXiv 1803.07360), Algorithm 1 up to its first normalisation; add
    :class:`deepagg.nn.Whiten` and :class:`deepagg.nn.L2N` for the rest. ``nn.Sequential(backbone,
    AGaussianEChannelPool())`` gives unit descriptors. The Gaussian centre is a hard top-alpha choice and
    carries no gradient; gradients reach the features through the weighted sum and the eChannel weights.

    Args:
        alpha: Fraction of the largest channel sums that set the Gaussian centre, in (0, 1] (0.1 in the paper).
        eps: The eChannel stabiliser, > 0.
        spatial: ``"adaptive"`` (aGaussian), ``"centred"`` (Gaussian at the map centre) or ``"none"``.
        channel: ``"echannel"``, ``"sparsity"`` (CroW's) or ``"none"``.

    Raises:
        ValueError: If ``alpha`` is not in (0, 1], ``eps`` is not > 0, or ``spatial``/``channel`` is unknown.

    Shape:
        - x: :math:`(B, C, H, W)` non-negative; mask (optional): :math:`(B, H, W)` bool.
        - Output: :math:`(B, C)`, unit rows, in the dtype of ``x``.

    Example:
        >>> AGaussianEChannelPool()(torch.rand(2, 512, 24, 32)).shape
        torch.Size([2, 512])
    """

    def __init__(
        self, alpha: float = 0.1, eps: float = 1e-12, spatial: str = "adaptive", channel: str = "echannel"
    ) -> None:
        super().__init__()
        self.alpha, self.eps = _check_options(alpha, eps, spatial, channel, type(self).__name__)
        self.spatial = spatial
        self.channel = channel

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool and L2-normalise (in at least float32); the output has the dtype of ``x``."""
        pooled = agaussian_echannel(
            _upcast(x), alpha=self.alpha, eps=self.eps, mask=mask, spatial=self.spatial, channel=self.channel
        )
        return l2n(pooled).to(x.dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, eps={self.eps}, spatial={self.spatial!r}, channel={self.channel!r}"
