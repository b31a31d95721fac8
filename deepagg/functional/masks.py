r"""SIFT, MAX and SUM masks: which local convolutional features to keep.

Hoang, Do, Le Tan, Cheung, "Selective deep convolutional features for image retrieval", ACM MM 2017
(``selective-masks-temb-democratic.txt``), sec. 3.2. Each function returns a bool mask :math:`(B, H, W)` on the
feature grid, True = keep the local feature at that position:

- :func:`max_mask` (eq. 2): for each channel, the position of its maximum; the union over channels.
- :func:`sum_mask` (eq. 3): the positions whose channel sum is at least the median of the channel sums.
- :func:`sift_mask` (eq. 1): the feature cells that hold a SIFT (DoG) keypoint of the input image, each dilated by
  one cell, as in the authors' reproducibility code.

The masks are hard selections: they carry no gradient. With a validity ``mask`` (padding bottom/right, as
everywhere in ``deepagg``), padded positions are never selected and every statistic (arg-max, median, fallback)
is taken over the valid positions only, so a padded batch gives, per image, the mask of the image alone.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import kornia
import torch
import torch.nn.functional as nnf

from deepagg._checks import (
    ShapeError,
    check_dtype,
    check_feature_mask,
    check_floating,
    check_int,
    check_same_device,
    check_shape,
)

__all__ = ["max_mask", "sift_mask", "sum_mask"]

# Default ``threshold`` of :func:`sift_mask`: the authors' ``vl_sift(I, 'PeakThresh', 4)`` on a 0-255 image,
# i.e. 4/255 on the [0, 1] images :func:`sift_mask` takes (the DoG is linear in the image).
_SIFT_PEAK_THRESHOLD = 4 / 255


def _check_maps(x: torch.Tensor, mask: torch.Tensor | None, fn: str) -> None:
    check_shape(x, "B,C,H,W", name="x", fn=fn, hint="Pass feature maps, not descriptors.")
    check_floating(x, name="x", fn=fn)
    check_feature_mask(mask, x, fn=fn)


def max_mask(x: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""MAX mask: the position of each channel's maximum, union over channels (Hoang et al. 2017, eq. 2).

    Hoang et al., "Selective deep convolutional features for image retrieval", ACM MM 2017, sec. 3.2.2. For each
    channel :math:`k`, the position :math:`\arg\max_{(i, j)} X_k(i, j)` over the (valid) grid is selected.

    - Ties go to the lower row-major flat index :math:`i W + j` (``torch.argmax`` returns the first maximum).
      The authors' MATLAB (hnanhtuan/selectiveConvFeature, ``create_max_mask`` in ``utils/apply_mask.m``) takes
      ``max`` down each column and then across the column maxima, which breaks ties column-major (first column,
      then first row): an image with tied maxima can select a different position there.
    - A channel whose maximum is exactly 0 (an all-zero post-ReLU channel) selects nothing; the check is literally
      ``max != 0``, so the maps are expected non-negative. The authors' ``create_max_mask`` has no such check:
      there every all-zero channel selects position (0, 0).
    - With ``mask``, padded positions are never selected and take no part in the arg-max (their values, even
      inf/nan, are ignored); row-major order is kept by bottom/right padding, so a padded image selects what it
      selects alone. An image without valid positions selects nothing.

    Batched (no per-image loop) and ``torch.compile(fullgraph=True)`` friendly; no gradient.

    Args:
        x: Feature maps of shape :math:`(B, C, H, W)`, non-negative (e.g. post-ReLU), any floating dtype.
        mask: Optional bool validity mask :math:`(B, H, W)`, True = valid.

    Returns:
        Bool mask of shape :math:`(B, H, W)`, True = selected, on ``x.device``.

    Raises:
        ShapeError: If ``x`` is not 4-D or ``mask`` does not match it.
        DTypeError: If ``x`` is not floating point or ``mask`` is not bool.
        DeviceError: If ``mask`` is not on ``x.device``.

    Example:
        >>> x = torch.zeros(1, 3, 2, 3)
        >>> x[0, 0, 1, 2] = 5.0  # channel 0: maximum at (1, 2)
        >>> x[0, 1] = 2.0  # channel 1: all tied, the first position (0, 0) wins
        >>> max_mask(x)  # channel 2 is all zero and selects nothing
        tensor([[[ True, False, False],
                 [False, False,  True]]])
    """
    _check_maps(x, mask, "max_mask")
    b, _, h, w = x.shape
    if h * w == 0:
        return torch.zeros(b, h, w, dtype=torch.bool, device=x.device)
    flat = x.detach().flatten(2)  # (B, C, H*W), row-major
    if mask is not None:
        # Padding (garbage included) can never be the maximum: -inf loses to every valid value.
        flat = flat.masked_fill(~mask.flatten(1)[:, None], float("-inf"))
    index = flat.argmax(dim=2)  # (B, C): the first maximal index
    peak = flat.gather(2, index[..., None])[..., 0]
    chosen = peak != 0
    if mask is not None:
        chosen = chosen & (peak != float("-inf"))  # an image without valid positions
    # Channels that select nothing write to a dummy column H*W, dropped afterwards: every write is True, so the
    # scatter is deterministic whatever the order of colliding channels.
    target = torch.where(chosen, index, torch.full_like(index, h * w))
    out = torch.zeros(b, h * w + 1, dtype=torch.bool, device=x.device)
    out = out.scatter(1, target, True)
    return out[:, : h * w].reshape(b, h, w)


def sum_mask(x: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""SUM mask: positions whose channel sum is at least the median channel sum (Hoang et al. 2017, eq. 3).

    Hoang et al., "Selective deep convolutional features for image retrieval", ACM MM 2017, sec. 3.2.3. With
    :math:`S(i, j) = \sum_k X_k(i, j)`, the mask is :math:`S(i, j) \ge \alpha`, :math:`\alpha` the median of
    :math:`S` over the image's (valid) positions.

    - The median is the lower median of design.md 3.1, as ``torch.median`` takes it: the sorted sums'
      element :math:`\lfloor (n - 1) / 2 \rfloor` for :math:`n` positions. Every position tied with it is kept,
      so at least half of the positions are selected (all of them when more than half of the sums are 0).
    - The authors' MATLAB (``create_sum_mask``: ``S >= prctile(S, 50)``) uses ``prctile``, which averages the two
      middle values when :math:`n` is even: it keeps one position fewer there whenever the two middle values differ
      (for the sums 1, 2, 3, 4 it keeps 3 and 4, this function 2, 3 and 4).
    - Sums are computed in at least float32 (float16/bfloat16 maps are promoted).
    - With ``mask``, the median is taken over each image's valid positions only (padding, even inf/nan, is
      ignored) and padded positions are never selected, so a padded image selects what it selects alone. An image
      without valid positions selects nothing.

    Batched (no per-image loop) and ``torch.compile(fullgraph=True)`` friendly; no gradient.

    Args:
        x: Feature maps of shape :math:`(B, C, H, W)`, non-negative (e.g. post-ReLU), any floating dtype.
        mask: Optional bool validity mask :math:`(B, H, W)`, True = valid.

    Returns:
        Bool mask of shape :math:`(B, H, W)`, True = selected, on ``x.device``.

    Raises:
        ShapeError: If ``x`` is not 4-D or ``mask`` does not match it.
        DTypeError: If ``x`` is not floating point or ``mask`` is not bool.
        DeviceError: If ``mask`` is not on ``x.device``.

    Example:
        >>> x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2): lower median 2
        >>> sum_mask(x)
        tensor([[[False,  True],
                 [ True,  True]]])
    """
    _check_maps(x, mask, "sum_mask")
    b, _, h, w = x.shape
    if h * w == 0:
        return torch.zeros(b, h, w, dtype=torch.bool, device=x.device)
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    sums = x.detach().to(dtype).sum(dim=1).flatten(1)  # (B, H*W)
    if mask is None:
        median = sums.median(dim=1).values  # the lower median
        return (sums >= median[:, None]).reshape(b, h, w)
    valid = mask.flatten(1)
    # Padding sorts last (+inf), so the valid sums come first in order; the lower median of n valid sums is the
    # sorted element (n - 1) // 2 (index 0 when n = 0: +inf or a valid value, and nothing is selected anyway).
    ordered = sums.masked_fill(~valid, float("inf")).sort(dim=1).values
    rank = torch.div(valid.sum(dim=1) - 1, 2, rounding_mode="floor").clamp(min=0)
    median = ordered.gather(1, rank[:, None])
    return ((sums >= median) & valid).reshape(b, h, w)


def _check_feature_hw(feature_hw: Sequence[int], fn: str) -> tuple[int, int]:
    message = f"{fn}(): feature_hw must be two positive ints (h, w), the feature grid; got {feature_hw!r}."
    if not isinstance(feature_hw, Sequence) or isinstance(feature_hw, str) or len(feature_hw) != 2:
        raise TypeError(message)
    sizes = []
    for size in feature_hw:
        if isinstance(size, bool):
            raise TypeError(message)
        try:
            sizes.append(operator.index(size))
        except TypeError:
            raise TypeError(message) from None
    if min(sizes) < 1:
        raise ValueError(message)
    return sizes[0], sizes[1]


def _check_images(images: torch.Tensor, fn: str) -> None:
    check_shape(images, "B,C,H,W", name="images", fn=fn, hint="Pass images (B, 1 or 3, H, W) in [0, 1].")
    if images.shape[1] not in (1, 3):
        raise ShapeError(
            f"{fn}(): images must have 1 (gray) or 3 (RGB) channels, shape (B, 1 or 3, H, W); "
            f"got {tuple(images.shape)}.",
            expected="(B, 1 or 3, H, W)",
            actual=tuple(images.shape),
        )
    check_floating(images, name="images", fn=fn)


def _sift_detector(num_features: int) -> kornia.feature.ScaleSpaceDetector:
    """Kornia's scale-space DoG detector, as in ``SIFTFeatureScaleSpace`` without its 2x image doubling."""
    return kornia.feature.ScaleSpaceDetector(
        num_features,
        mr_size=6.0,
        scale_pyr_module=kornia.geometry.ScalePyramid(3, 1.6, 32, double_image=False),
        resp_module=kornia.feature.BlobDoG(),
        subpix_module=kornia.geometry.subpix.AdaptiveQuadInterp3d(mode="patch", allow_scale_steps=True),
        scale_space_response=True,
        minima_are_also_good=True,
    )


def _sift_keypoints(
    images: torch.Tensor, *, num_features: int = 8000, threshold: float = _SIFT_PEAK_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DoG keypoint centres :func:`sift_mask` uses: ``(xy (B, N, 2), keep (B, N) bool)``.

    ``xy`` are kornia LAF centres (:func:`kornia.feature.get_laf_center`) in input pixels, 0-based pixel centres;
    ``keep`` marks the slots holding a detection whose response (the absolute DoG) exceeds ``threshold``.
    Arguments as in :func:`sift_mask` (already validated by the caller). Runs without gradient.
    """
    with torch.no_grad():
        gray = images.detach().to(torch.float32)
        if gray.shape[1] == 3:
            gray = kornia.color.rgb_to_grayscale(gray)
        detector = _sift_detector(num_features).to(images.device)
        lafs, responses = detector(gray.contiguous())
        return kornia.feature.get_laf_center(lafs), responses > threshold


def sift_mask(
    images: torch.Tensor,
    feature_hw: Sequence[int],
    *,
    mask: torch.Tensor | None = None,
    num_features: int = 8000,
    threshold: float = _SIFT_PEAK_THRESHOLD,
) -> torch.Tensor:
    r"""SIFT mask: the feature cells covering the image's DoG keypoints, dilated by one cell (Hoang et al. 2017).

    Hoang et al., "Selective deep convolutional features for image retrieval", ACM MM 2017, sec. 3.2.1, eq. 1,
    with the 3 x 3 dilation of the authors' reproducibility code (hnanhtuan/selectiveConvFeatures_ACMMM_reproducibility,
    ``create_sift_mask`` in ``utils/apply_mask.m``, radius ``r = 1``).

    **Detector.** Kornia's batched :class:`kornia.feature.ScaleSpaceDetector` with the DoG response of
    :class:`kornia.feature.SIFTFeatureScaleSpace` (``BlobDoG``, minima and maxima, sub-pixel and sub-scale
    refinement, ``ScalePyramid(3 levels, sigma 1.6, min size 32)``) but without the 2x image doubling, as in
    VLFeat's ``vl_sift`` default (first octave 0) that the authors ran. Keypoints are the detections whose
    response, the absolute refined DoG, exceeds ``threshold``: the default 4/255 is the authors'
    ``vl_sift(I, 'PeakThresh', 4, 'EdgeThresh', 10)`` on a 0-255 gray image, for images in [0, 1]. Kornia has no
    edge (Hessian ratio) rejection, so keypoints along straight edges are kept that VLFeat drops. The detector
    returns at most ``num_features`` detections per image, the strongest first. RGB images are converted to
    gray with :func:`kornia.color.rgb_to_grayscale` (the weights of MATLAB's ``rgb2gray``); detection runs in
    float32. The sub-pixel refinement is pinned to kornia's iterative ("patch") backend, so the keypoints do not
    depend on the device.

    **Mapping.** A keypoint centre :math:`(x, y)` (kornia LAF centre, :func:`kornia.feature.get_laf_center`, in
    input pixels with 0-based pixel centres) falls in the feature cell that covers it,
    :math:`(\lfloor (y + 0.5) h / H_I \rfloor, \lfloor (x + 0.5) w / W_I \rfloor)` clamped to the grid (cell
    :math:`j` covers the input span :math:`[j W_I / w, (j + 1) W_I / w)` measured from the image's left edge).
    The 3 x 3 block of cells around it, clipped at the grid's borders, is selected; the mask is the union of the
    blocks. The authors' code instead takes the 1-based cell :math:`c = \mathrm{round}(x_v w / W_I)` of the
    1-based VLFeat coordinate :math:`x_v = x + 1` and selects :math:`[\max(1, c - 1), \min(w, c + 1)]`: it
    rounds to the nearest cell *boundary* rather than taking the covering cell, so its blocks sit about half a
    cell up and left of ours, and a keypoint within half a cell of the left or top edge (:math:`c = 0`) selects a
    single row or column of cells there, where ours selects two.

    **Fallback.** An image without keypoints (e.g. a blank image) keeps every position (with ``mask``, every valid
    position), so it still has local features to aggregate; the authors' ``create_sift_mask`` selects nothing
    there.

    **Padding.** With ``mask`` (feature grid, True = valid; padding bottom/right), keypoints whose cell is padding
    are dropped and padded cells are never selected. The detector itself sees the whole padded image, so pad
    images with finite values (keypoints near the padding border can differ from the image alone).

    Exempt from the no-loop and ``torch.compile`` rules (like MSER detection): the keypoint detection is kornia's
    data-dependent pipeline. It is batched (one detector call per batch, no per-image loop here) and costs about
    0.1-0.2 s of CPU time per 512 x 384 image. Runs under ``torch.no_grad()``.

    Args:
        images: Input images of shape :math:`(B, 1, H_I, W_I)` (gray) or :math:`(B, 3, H_I, W_I)` (RGB), floating
            point in [0, 1], finite.
        feature_hw: The feature grid ``(h, w)`` the mask is for (e.g. ``x.shape[-2:]`` of the backbone's maps).
        mask: Optional bool validity mask :math:`(B, h, w)` on the feature grid, on ``images.device``.
        num_features: At most this many keypoints per image (the strongest), an int >= 1.
        threshold: Keep detections whose absolute DoG response exceeds this, a finite float >= 0 (image units).

    Returns:
        Bool mask of shape :math:`(B, h, w)`, True = selected, on ``images.device``.

    Raises:
        ShapeError: If ``images`` is not :math:`(B, 1 \text{ or } 3, H_I, W_I)` or ``mask`` is not :math:`(B, h, w)`.
        DTypeError: If ``images`` is not floating point or ``mask`` is not bool.
        DeviceError: If ``mask`` is not on ``images.device``.
        TypeError: If ``feature_hw`` is not two ints or ``num_features`` is not an int.
        ValueError: If a size in ``feature_hw`` or ``num_features`` is < 1, or ``threshold`` is not a finite float
            >= 0.

    Example:
        >>> blank = torch.full((2, 3, 64, 96), 0.5)  # no keypoints: every position is kept
        >>> sift_mask(blank, (4, 6)).shape
        torch.Size([2, 4, 6])
        >>> bool(sift_mask(blank, (4, 6)).all())
        True
    """
    fn = "sift_mask"
    _check_images(images, fn)
    h, w = _check_feature_hw(feature_hw, fn)
    b, _, height, width = images.shape
    if mask is not None:
        check_shape(
            mask,
            "B,h,w",
            name="mask",
            fn=fn,
            sizes={"B": b, "h": h, "w": w},
            hint="The mask is on the feature grid feature_hw, True = valid.",
        )
        check_dtype(mask, (torch.bool,), name="mask", fn=fn)
        check_same_device({"images": images, "mask": mask}, fn=fn)
    num_features = check_int(num_features, name="num_features", fn=fn, minimum=1)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < math.inf:
        raise ValueError(f"{fn}(): threshold must be a finite float >= 0; got {threshold!r}.")
    if b == 0 or height * width == 0:
        full = torch.ones(b, h, w, dtype=torch.bool, device=images.device)
        return full if mask is None else full & mask
    xy, keep = _sift_keypoints(images, num_features=num_features, threshold=float(threshold))
    with torch.no_grad():
        # floor((x + 0.5) * w / W_I) as a floor division (exact where the quotient is an integer).
        col = torch.div((xy[..., 0] + 0.5) * w, width, rounding_mode="floor").long().clamp(0, w - 1)
        row = torch.div((xy[..., 1] + 0.5) * h, height, rounding_mode="floor").long().clamp(0, h - 1)
        cell = row * w + col  # (B, N)
        if mask is not None:
            keep = keep & mask.flatten(1).gather(1, cell)  # keypoints on padding are dropped
        # Dropped slots write to a dummy column h*w (every write is True: a deterministic scatter).
        target = torch.where(keep, cell, torch.full_like(cell, h * w))
        hits = torch.zeros(b, h * w + 1, dtype=torch.bool, device=images.device).scatter(1, target, True)
        hits = hits[:, : h * w].reshape(b, 1, h, w)
        # 3 x 3 dilation, clipped at the borders (max pooling pads with -inf).
        out = nnf.max_pool2d(hits.to(torch.float32), kernel_size=3, stride=1, padding=1)[:, 0] > 0
        fallback = torch.ones_like(out) if mask is None else mask
        if mask is not None:
            out = out & mask
        return torch.where(keep.any(dim=1)[:, None, None], out, fallback)
