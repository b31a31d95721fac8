r"""aGaussian spatial and eChannel channel co-weighting of deep convolutional features.

Wang, Zhu, Pang, Li, Li and Qian, "Adaptive co-weighting deep convolutional features for object retrieval",
ICME 2018 (arXiv 1803.07360), Algorithm 1 and eqs. 1-5.
With :math:`X` the :math:`(C, H, W)` map of one image (non-negative, post-ReLU):

1. :math:`S'(i, j) = \sum_k X_k(i, j)` (eq. 3), the channel-sum map.
2. The Gaussian centre :math:`(i_0, j_0)` is the mean row and the mean column of the
   :math:`n = \max(1, \mathrm{round}(\alpha H W))` largest entries of :math:`S'` (ties go to the lower row-major
   flat index; ``round`` is half-up as design.md 3.1 fixes it: ``alpha * H * W = 2.5`` selects 3 cells).
3. :math:`S(i, j) = \exp(-((i - i_0)^2 + (j - j_0)^2) / (2\sigma^2)) / (2\pi\sigma^2)` (eq. 2) with
   :math:`\sigma = \max(H, W) / 4`, half the distance from the map centre to its farthest border.
4. :math:`\Omega_k = \sum_{i,j} S(i, j) X_k(i, j)` (eq. 1).
5. :math:`b_k = (\Omega_k / (W H))^2` (eq. 4) and :math:`B_k = \log((K\epsilon + \sum_c b_c) / (\epsilon + b_k))`
   (eq. 5), :math:`K` the number of channels.
6. The output is :math:`B \odot \Omega` (the module L2-normalises it; Algorithm 1's whitening is
   :class:`deepagg.nn.Whiten`).

Rows and columns are counted from 0 on the feature grid, so the centred Gaussian of ``spatial="centred"`` sits
at :math:`((H - 1)/2, (W - 1)/2)`, which is also what ``alpha = 1`` gives (the mean of all positions, the
paper's nGaussian).
"""

from __future__ import annotations

import math

import torch

from deepagg._checks import check_feature_mask, check_floating, check_shape
from deepagg.functional._blocking import blocked, fast_path, weighted_sums

__all__ = ["CHANNEL_OPTIONS", "SPATIAL_OPTIONS", "agaussian_center", "agaussian_echannel"]

#: ``spatial=`` options: the adaptive Gaussian (the paper's aGaussian), a Gaussian at the map centre
#: (SPoC's prior, the paper's nGaussian), or uniform weights (plain sum pooling).
SPATIAL_OPTIONS = ("adaptive", "centred", "none")
#: ``channel=`` options: the paper's eChannel, CroW's sparsity IDF (the paper's sChannel), or none.
CHANNEL_OPTIONS = ("echannel", "sparsity", "none")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _check_options(alpha: float, eps: float, spatial: str, channel: str, fn: str) -> tuple[float, float]:
    """The hyperparameter checks shared by :func:`agaussian_echannel` and the module; returns ``alpha, eps``."""
    _check_alpha(alpha, fn)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"{fn}(): eps must be a finite float > 0; got {eps!r}.")
    if spatial not in SPATIAL_OPTIONS:
        raise ValueError(f"{fn}(): spatial must be one of {SPATIAL_OPTIONS}; got {spatial!r}.")
    if channel not in CHANNEL_OPTIONS:
        raise ValueError(f"{fn}(): channel must be one of {CHANNEL_OPTIONS}; got {channel!r}.")
    return float(alpha), float(eps)


def _check_alpha(alpha: float, fn: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
        raise ValueError(f"{fn}(): alpha must be a float in (0, 1]; got {alpha!r}.")


def _check_maps(x: torch.Tensor, mask: torch.Tensor | None, fn: str) -> None:
    check_shape(x, "B,C,H,W", name="x", fn=fn, hint="Pass feature maps, not descriptors.")
    check_floating(x, name="x", fn=fn)
    check_feature_mask(mask, x, fn=fn)
    if mask is not None:
        torch._assert_async(
            mask.flatten(1).any(1).all(),
            f"{fn}(): mask must have at least one True position per image; got an all-False (empty) mask.",
        )


def _center(s: torch.Tensor, mask: torch.Tensor | None, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """Mean (row, col) of the top-``max(1, round(alpha * n))`` entries of ``s`` (B, H, W); ties: lower index."""
    h, w = s.shape[-2:]
    flat = s.detach().flatten(1)
    if mask is not None:
        flat = flat.masked_fill(~mask.flatten(1), float("-inf"))
    # A stable descending sort keeps equal values in index order: ties go to the lower flat index. Padding
    # (bottom/right) keeps the row-major order of the valid positions, so a padded image selects what it would
    # alone. The selection is a hard, integer choice: the centre carries no gradient.
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(h * w, device=s.device)
    if mask is None:
        count: torch.Tensor | int = max(1, math.floor(alpha * h * w + 0.5))  # round half-up
        chosen = (ranks < count).to(dtype)[None]
    else:
        n_valid = mask.sum(dim=(1, 2)).to(torch.float64)
        count = torch.floor(alpha * n_valid + 0.5).clamp(min=1).to(dtype)[:, None]  # round half-up
        chosen = (ranks[None] < count).to(dtype)
    rows = torch.div(order, w, rounding_mode="floor").to(dtype)
    cols = (order % w).to(dtype)
    return torch.stack([(rows * chosen).sum(1), (cols * chosen).sum(1)], dim=1) / count


def agaussian_center(x: torch.Tensor, *, alpha: float = 0.1, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""The adaptive Gaussian centre :math:`(i_0, j_0)`: mean row and column of the top-alpha channel-sum positions.

    Wang et al., ICME 2018 (arXiv 1803.07360), sec. 2.2. The centre is a hard selection: it carries no gradient.

    Args:
        x: Feature maps of shape :math:`(B, C, H, W)`, non-negative.
        alpha: Fraction of positions, in (0, 1]; ``max(1, round(alpha * H * W))`` positions are averaged.
        mask: Optional bool validity mask :math:`(B, H, W)`; only valid positions are ranked and counted.

    Returns:
        Centres of shape :math:`(B, 2)` as (row, column) in feature-grid cells counted from 0, in the compute
        dtype (at least float32).

    Raises:
        ShapeError: If ``x`` is not 4-D or ``mask`` does not match it.
        DTypeError: If ``x`` is not floating point or ``mask`` is not bool.
        ValueError: If ``alpha`` is not in (0, 1].

    Example:
        >>> x = torch.zeros(1, 4, 6, 8); x[0, :, 4, 1] = 1.0
        >>> agaussian_center(x, alpha=0.01)
        tensor([[4., 1.]])
    """
    _check_maps(x, mask, "agaussian_center")
    _check_alpha(alpha, "agaussian_center")
    dtype = _compute_dtype(x)
    xf = x.to(dtype)
    if mask is not None:
        xf = torch.where(mask[:, None], xf, torch.zeros((), dtype=dtype, device=x.device))
    return _center(xf.sum(dim=1), mask, alpha, dtype)


def _coweight_block(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    alpha: float,
    eps: float,
    spatial: str,
    channel: str,
    zero_padding: bool = True,
) -> torch.Tensor:
    """Co-weighted vectors of a block of images (see :func:`agaussian_echannel`).

    With ``zero_padding=False`` the padding is not zeroed first: it is left out of the ranking and weighted 0,
    so finite garbage there changes nothing, but inf or NaN garbage makes the image's vector NaN (0 * inf); the
    caller checks for NaN and falls back to the zeroing path.
    """
    dtype = _compute_dtype(x)
    xf = x.to(dtype)
    if mask is not None and zero_padding:
        # Padding becomes exactly 0 (never multiplied away: inf/nan garbage there cannot leak).
        xf = torch.where(mask[:, None], xf, torch.zeros((), dtype=dtype, device=x.device))
    b, k, h, w = xf.shape
    # H, W and H * W of each image's valid region: rows and columns holding a valid position, valid positions.
    height: torch.Tensor | float
    width: torch.Tensor | float
    size: torch.Tensor | float
    if mask is None:
        height, width, size = float(h), float(w), float(h * w)
        sigma2: torch.Tensor | float = max(h, w) ** 2 / 16
    else:
        height = mask.any(dim=2).sum(dim=1).to(dtype)[:, None, None]
        width = mask.any(dim=1).sum(dim=1).to(dtype)[:, None, None]
        size = mask.sum(dim=(1, 2)).to(dtype)[:, None]
        sigma2 = torch.maximum(height, width) ** 2 / 16
    if spatial == "none":
        weights = torch.ones(b, h, w, dtype=dtype, device=x.device)
    else:
        i0: torch.Tensor | float
        j0: torch.Tensor | float
        if spatial == "adaptive":
            center = _center(xf.sum(dim=1), mask, alpha, dtype)
            i0, j0 = center[:, 0, None, None], center[:, 1, None, None]
        else:
            i0, j0 = (height - 1) / 2, (width - 1) / 2
        rows = torch.arange(h, dtype=dtype, device=x.device)[None, :, None]
        cols = torch.arange(w, dtype=dtype, device=x.device)[None, None, :]
        weights = torch.exp(-((rows - i0) ** 2 + (cols - j0) ** 2) / (2 * sigma2)) / (2 * math.pi * sigma2)
        weights = weights.expand(b, h, w)
    if mask is not None:
        weights = torch.where(mask, weights, torch.zeros((), dtype=dtype, device=x.device))
    omega = weighted_sums(xf, weights, fast=fast_path(xf))  # Omega_k = sum_ij S X_k, (B, K)
    if channel == "echannel":
        bk = (omega / size) ** 2
        cw = torch.log((k * eps + bk.sum(dim=1, keepdim=True)) / (eps + bk))
    elif channel == "sparsity":
        # CroW's sparsity IDF, as in deepagg.functional.crow: Q_k = fraction of valid positions where X_k != 0.
        q = torch.count_nonzero(xf, dim=(-2, -1)).to(dtype) / size
        ratio = q.sum(dim=1, keepdim=True) / q.clamp(min=eps)
        cw = torch.where(q > 0, torch.log(ratio), torch.zeros_like(q))
    else:
        return omega.to(x.dtype)
    return (cw * omega).to(x.dtype)


def agaussian_echannel(
    x: torch.Tensor,
    *,
    alpha: float = 0.1,
    eps: float = 1e-12,
    mask: torch.Tensor | None = None,
    spatial: str = "adaptive",
    channel: str = "echannel",
) -> torch.Tensor:
    r"""AGaussian spatial + eChannel channel co-weighted sum pooling (Algorithm 1 up to its first normalisation).

    Wang et al., "Adaptive co-weighting deep convolutional features for object retrieval", ICME 2018
    (arXiv 1803.07360, eqs. 1-5; the steps are listed in :mod:`deepagg.functional.coweight`). The
    centre of the Gaussian is the mean position of the ``max(1, round(alpha * H * W))`` largest channel sums
    (ties to the lower row-major index; ``round`` half-up, so 2.5 gives 3); sigma is ``max(H, W) / 4``; the
    eChannel weight is :math:`\log((K\epsilon + \sum_c b_c) / (\epsilon + b_k))` with
    :math:`b_k = (\Omega_k / (WH))^2`, so the channel with the largest :math:`\Omega_k` gets the smallest weight.

    The paper's ablations are options: ``spatial="centred"`` puts the Gaussian at the map centre
    :math:`((H-1)/2, (W-1)/2)` (rows and columns counted from 0; the paper's nGaussian, which ``alpha=1`` also
    gives), ``spatial="none"`` weighs every position 1 (sum pooling); ``channel="sparsity"`` is CroW's sparsity
    IDF :math:`\log(\sum_c Q_c / Q_k)` (:math:`Q_k` the fraction of non-zero positions of channel k, weight 0
    for an all-zero channel), ``channel="none"`` weighs every channel 1.

    Masks: ``H``, ``W`` (for sigma, the centred Gaussian and :math:`b_k`) and ``H W`` (for the top-alpha count)
    are those of each image's valid region, i.e. the number of rows and columns that hold a valid position and
    the number of valid positions, so a padded batch with its mask gives, per image, the same vector as the
    image alone. Masked positions get weight 0 and take no part in the ranking.

    Gradients flow to ``x`` through :math:`\Omega` and the eChannel weights; the top-alpha selection is a hard
    choice, so the centre carries no gradient (nor do the sparsity weights, piecewise constant in ``x``).
    Computed in at least float32; the result has the input dtype. On the CPU the batch is processed in blocks of
    a few images (:mod:`deepagg.functional._blocking`); results do not depend on it.

    Args:
        x: Non-negative feature maps of shape :math:`(B, C, H, W)` (post-ReLU).
        alpha: Fraction of the largest channel sums that set the centre, in (0, 1] (0.1 in the paper).
        eps: The eChannel (and sparsity) stabiliser :math:`\epsilon`, > 0.
        mask: Optional bool validity mask :math:`(B, H, W)`.
        spatial: ``"adaptive"`` (aGaussian), ``"centred"`` or ``"none"``.
        channel: ``"echannel"``, ``"sparsity"`` or ``"none"``.

    Returns:
        Raw co-weighted vectors :math:`B \odot \Omega` of shape :math:`(B, C)` (not normalised).

    Raises:
        ShapeError: If ``x`` is not 4-D or ``mask`` does not match it.
        DTypeError: If ``x`` is not floating point or ``mask`` is not bool.
        ValueError: If ``alpha`` is not in (0, 1], ``eps`` is not > 0, or ``spatial``/``channel`` is unknown.
        RuntimeError: If an image's mask is empty.

    Example:
        >>> agaussian_echannel(torch.rand(2, 512, 24, 32), alpha=0.1).shape
        torch.Size([2, 512])
    """
    fn = "agaussian_echannel"
    _check_maps(x, mask, fn)
    alpha, eps = _check_options(alpha, eps, spatial, channel, fn)
    dtype = _compute_dtype(x)
    if x.dtype == dtype and channel != "sparsity" and fast_path(x):
        # Eager CPU maps of the compute dtype: no step makes a map-sized temporary (the channel sums and the
        # matrix-vector products only read the map, padding included, whose weight is 0), so the whole batch goes
        # at once and the per-image work (the top-alpha sort, the Gaussian) runs batched instead of once per
        # block or cropped image. Inf or NaN garbage in the padding shows as NaN: then the zeroing path below.
        # The sparsity weights count non-zeros through a map-sized temporary: they stay on blocks (2x faster
        # there, ad hoc).
        out = _coweight_block(x, mask, alpha=alpha, eps=eps, spatial=spatial, channel=channel, zero_padding=False)
        if mask is None or not bool(torch.isnan(out).any()):
            return out
    itemsize = torch.finfo(dtype).bits // 8
    return blocked(
        _coweight_block,
        x,
        mask,
        itemsize=itemsize,
        crop=True,  # padded CPU batches: each image's valid rectangle pooled alone
        alpha=alpha,
        eps=eps,
        spatial=spatial,
        channel=channel,
    )
