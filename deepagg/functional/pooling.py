"""Global pooling of CNN feature maps: MAC, SPoC, GeM, R-MAC and CroW.

All functions take feature maps ``x`` of shape :math:`(B, C, H, W)` and an optional boolean validity mask
``mask`` of shape :math:`(B, H, W)` on the feature grid (True = valid; padding goes bottom/right), so that a
padded batch of variable-size images gives, per image, the same vector as that image alone. They return the
raw pooled vectors :math:`(B, C)`; the :mod:`deepagg.nn` modules L2-normalise them.

An image whose mask is all False has no valid position: that is an error (``RuntimeError`` raised through
``torch._assert_async``, which stays inside a compiled graph), never a silent ``-inf`` or ``nan`` descriptor.

Precision: every sum, mean, norm, power and log runs in at least float32 (float16 and bfloat16 maps are upcast)
and the result is cast back to the input dtype, so a half-precision map gives the float32 result rounded once,
and a padded half batch still equals its images alone. Maxima (MAC, the R-MAC regions) are exact in any dtype.
Masked positions are excluded by selection, never by multiplying with the mask, so ``inf`` or ``nan`` garbage
in the padding cannot leak into a descriptor: ``torch.where``/``masked_fill``, or on CPU a crop to each image's
valid rectangle or a ``clamp`` whose bounds pin the padding to a constant (a NaN it leaves there sends the block
through ``torch.where``; :func:`deepagg.functional._blocking.fill_padding`).

CPU speed: the ops run over blocks of a few images (:mod:`deepagg.functional._blocking`), with one workspace
per call for their map-sized temporary, and a padded batch image by image on its valid rectangle where that
measured faster; on a GPU and under ``torch.compile`` each op is one batched computation. Either way the result
does not depend on the batch (``benchmarks/bench_pooling.py``).
"""

from __future__ import annotations

import functools
import math

import torch

from deepagg._checks import (
    ShapeError,
    check_feature_mask,
    check_floating,
    check_positive,
    check_same_device,
    check_shape,
)
from deepagg.functional import _blocking
from deepagg.functional._blocking import (
    blocked,
    channel_chunked,
    fast_path,
    fill_padding,
    rectangles,
    valid_counts,
    weighted_sums,
)

__all__ = ["crow", "gem", "mac", "rmac", "rmac_grid", "rmac_regions", "spoc"]


def _check_maps(x: torch.Tensor, mask: torch.Tensor | None, fn: str) -> None:
    check_shape(x, "B,C,H,W", name="x", fn=fn, hint="Pass feature maps, not descriptors.")
    check_floating(x, name="x", fn=fn)
    check_feature_mask(mask, x, fn=fn)
    if mask is not None:
        msg = f"{fn}(): mask must have at least one True position per image; got an all-False (empty) mask."
        if fast_path(mask):  # eager CPU: NumPy reads the mask in microseconds, torch's bool kernels take ~50 us
            if not mask.numpy().reshape(mask.shape[0], math.prod(mask.shape[1:])).any(axis=1).all():
                raise RuntimeError(msg)
        else:
            # Value check without a host sync: stays inside torch.compile graphs.
            torch._assert_async(mask.flatten(1).any(1).all(), msg)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Reductions, norms, powers and logs run in at least float32 (half inputs are upcast, then cast back)."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def mac(x: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Maximum activations of convolutions: the spatial max of each channel.

    Tolias et al., "Particular object retrieval with integral max-pooling of CNN activations", ICLR 2016.
    The max is exact in every dtype, so half inputs are not upcast.

    Args:
        x: Feature maps of shape :math:`(B, C, H, W)`.
        mask: Optional bool validity mask :math:`(B, H, W)`; masked positions are ignored.

    Returns:
        Raw MAC vectors of shape :math:`(B, C)` (not normalised).

    Raises:
        ShapeError: If ``x`` is not 4-D or ``mask`` does not match it.
        DTypeError: If ``x`` is not floating point or ``mask`` is not bool.
        RuntimeError: If an image's mask is empty.

    Example:
        >>> mac(torch.rand(2, 512, 24, 32)).shape
        torch.Size([2, 512])
    """
    _check_maps(x, mask, "mac")
    if mask is None:
        return x.amax(dim=(-2, -1))  # one reduction, no temporary: nothing to block
    sizes = rectangles(mask) if fast_path(x) and x.shape[0] > 0 else None
    if sizes is not None:
        # A padded batch on CPU (each image a top-left rectangle): per image the max over its valid rows, each row
        # read whole and contiguously, then over the valid columns of that (C, W) result. The padding columns drop
        # out before the second max, so no garbage (NaN included) reaches the result. An amax over the strided
        # rectangle itself is several times slower, and copying it first about 2x (bench_pooling's padded rows).
        return torch.stack([x[i, :, :h, :].amax(-2)[:, :w].amax(-1) for i, (h, w) in enumerate(sizes)])
    # Other masks on CPU: the padding filled with -inf in the workspace, then one contiguous amax.
    return blocked(_mac_block, x, mask, workspace=x.dtype, crop=True, fast_args=True)


def _mac_block(x: torch.Tensor, mask: torch.Tensor | None, *, fast: bool, buf: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        x = fill_padding(x, mask, float("-inf"), fast=fast, out=buf)
    elif buf is not None and not x.is_contiguous():
        # A cropped image: amax over the strided rectangle was 6x slower than copying it and reducing the copy in an
        # ad-hoc timing (0.31 against 0.05 ms, a 512 x 20 x 25 crop of a 24 x 32 map; sum has no such slow path).
        # bench_pooling's padded MAC rows time the whole op.
        x = buf.copy_(x)
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Sum-pooled convolutional features, as a mean over the valid positions.

    Babenko and Lempitsky, "Aggregating deep convolutional features for image retrieval", ICCV 2015. The mean
    (not the sum) keeps padded and unpadded images equal up to nothing but the mask; after L2 normalisation
    the two are the same descriptor. The sum is accumulated in at least float32 (a float16 sum of a few thousand
    activations of 100 already overflows), then the mean is cast back to the input dtype.

    Args:
        x: Feature maps of shape :math:`(B, C, H, W)`.
        mask: Optional bool validity mask :math:`(B, H, W)`.

    Returns:
        Raw SPoC vectors of shape :math:`(B, C)`.

    Raises:
        ShapeError: If ``x`` is not 4-D or ``mask`` does not match it.
        DTypeError: If ``x`` is not floating point or ``mask`` is not bool.
        RuntimeError: If an image's mask is empty.

    Example:
        >>> spoc(torch.rand(2, 512, 24, 32)).shape
        torch.Size([2, 512])
    """
    _check_maps(x, mask, "spoc")
    dtype = _compute_dtype(x)
    if mask is None and x.dtype == dtype:
        return x.mean(dim=(-2, -1))  # one reduction, no temporary: nothing to block
    if mask is not None and x.dtype == dtype and fast_path(x) and _blocking.MV_FAST:
        # Eager CPU with a fast torch.mv (Intel): the whole padded maps weighted by their 0/1 masks (one
        # matrix-vector product per image, which reads each map once at full speed; cropped reductions ran at
        # about half of it there). Elsewhere (AMD: MKL's mv is slow, _blocking.MV_FAST) the cropping path below is
        # the faster one. Inf or NaN garbage in the padding gives NaN (0 * inf): then the cropping path below.
        total = weighted_sums(x, mask.to(dtype), fast=True)
        if not bool(torch.isnan(total).any()):
            return (total / valid_counts(mask, dtype)[:, None]).to(x.dtype)
    # Padded maps: each image's valid rectangle summed alone (crop=True) measured faster than zeroing the padding
    # into a buffer and summing it; a buffer is needed only to upcast half maps.
    workspace = dtype if x.dtype != dtype else None
    itemsize = torch.finfo(dtype).bits // 8
    total = blocked(
        _spoc_block, x, mask, itemsize=itemsize, workspace=workspace, crop=True, fast_args=True, dtype=dtype
    )
    n_valid = x.shape[-2] * x.shape[-1] if mask is None else valid_counts(mask, dtype)[:, None]
    return (total / n_valid).to(x.dtype)


def _spoc_block(
    x: torch.Tensor, mask: torch.Tensor | None, *, dtype: torch.dtype, fast: bool, buf: torch.Tensor | None
) -> torch.Tensor:
    """Sum over the valid positions, in ``dtype``."""
    if mask is None and x.dtype == dtype:  # an image cropped to its rectangle: nothing to copy
        return x.sum(dim=(-2, -1))
    return _zero_padding(x, mask, dtype=dtype, fast=fast, buf=buf).sum(dim=(-2, -1))


def _zero_padding(
    x: torch.Tensor, mask: torch.Tensor | None, *, dtype: torch.dtype, fast: bool, buf: torch.Tensor | None
) -> torch.Tensor:
    """``x`` as ``dtype`` with its padding zeroed: a copy in ``buf`` if given, and ``x`` itself when it can be."""
    # Half maps are upcast into the workspace, then filled there in place.
    x = buf.copy_(x) if buf is not None and x.dtype != dtype else x.to(dtype)
    return x if mask is None else fill_padding(x, mask, 0.0, fast=fast, out=buf)


def gem(
    x: torch.Tensor,
    p: float | torch.Tensor = 3.0,
    eps: float = 1e-6,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Generalized-mean pooling: :math:`(\frac{1}{|\Omega|}\sum_{\Omega} \max(x, \epsilon)^p)^{1/p}`.

    Radenović, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018.

    Clamp semantics: the input is clamped at ``eps`` *before* the power (as cirtorch does), so negative or zero
    activations (e.g. after whitening, or ViT tokens) give no NaN for fractional ``p``; positions below ``eps``
    contribute ``eps**p``. ``p = 1`` is SPoC on the clamped map and ``p -> inf`` tends to MAC.

    Numerics: GeM is positively homogeneous, :math:`\mathrm{gem}(c x) = c\,\mathrm{gem}(x)` for :math:`c > 0`,
    so each channel is computed as :math:`m\,(\frac{1}{|\Omega|}\sum_{\Omega} (\max(x, \epsilon)/m)^p)^{1/p}`
    with :math:`m` the channel's largest clamped valid value (treated as a constant: by homogeneity its
    gradient contribution is exactly zero). The powered values lie in :math:`(0, 1]` and the mean in
    :math:`[1/|\Omega|, 1]`, so nothing overflows (the naive ``800 ** 14`` does in float32) or underflows to a
    zero mean (``eps ** p`` is 0 in float32 from p of about 7, and an all-zero channel, common in VGG16
    conv5_3, then gave ``0 ** (1/p)`` and a NaN gradient for ``p``). So the output and the gradients with
    respect to ``x`` and ``p`` stay finite at large ``p`` and large activations; an all-zero channel gives
    ``eps`` with a zero gradient for ``p``. The computation runs in at least float32 and the result has the
    input dtype. A NaN in a valid position still propagates to its channel.

    CPU forms without autograd, equal to the above to float rounding: for ``p`` in {0.5, 1, 2, 3} (powers by
    multiplication) with ``eps ** p`` a normal number, the power sums are first taken unscaled, two passes
    fewer, and kept when they are all finite (every term is then in range); otherwise the scaled form runs. A
    general ``p`` is raised as :math:`2^{p \log_2 y}` on CPU (3.5x cheaper than ``pow`` there, with and without
    autograd).

    Args:
        x: Feature maps of shape :math:`(B, C, H, W)`.
        p: The power, a positive float, or a tensor of shape :math:`()` or :math:`(C,)` (per-channel p,
            e.g. a learnable Parameter).
        eps: The clamp floor, > 0.
        mask: Optional bool validity mask :math:`(B, H, W)`.

    Returns:
        Raw GeM vectors of shape :math:`(B, C)`.

    Raises:
        ShapeError: If ``x`` is not 4-D, ``mask`` does not match it, or a tensor ``p`` is not scalar or ``(C,)``.
        DTypeError: If ``x`` is not floating point or ``mask`` is not bool.
        ValueError: If a float ``p`` or ``eps`` is not positive.
        RuntimeError: If an image's mask is empty.

    Example:
        >>> gem(torch.rand(2, 512, 24, 32), p=3.0).shape
        torch.Size([2, 512])
    """
    _check_maps(x, mask, "gem")
    check_positive(eps, name="eps", fn="gem")
    if isinstance(p, torch.Tensor):
        if p.ndim > 1 or (p.ndim == 1 and p.shape[0] != x.shape[1]):
            raise ShapeError(
                f"gem(): p must be a scalar or have shape (C,) = ({x.shape[1]},); got {tuple(p.shape)}.",
                expected=(x.shape[1],),
                actual=tuple(p.shape),
            )
        check_same_device({"x": x, "p": p}, fn="gem")
        p_vec = p.to(_compute_dtype(x)).reshape(-1)  # (1,) or (C,)
        p_map: torch.Tensor | float = p_vec[:, None, None]
        inv: torch.Tensor | float = 1.0 / p_vec
    else:
        check_positive(float(p), name="p", fn="gem")
        p_map = float(p)
        inv = 1.0 / float(p)
    dtype = _compute_dtype(x)
    # Without autograd (feature extraction) each block's one float buffer is reused in place.
    inplace = not (torch.is_grad_enabled() and (x.requires_grad or (isinstance(p, torch.Tensor) and p.requires_grad)))
    itemsize = torch.finfo(dtype).bits // 8
    n_valid = x.shape[-2] * x.shape[-1] if mask is None else valid_counts(mask, dtype)[:, None]
    # Padded maps (crop=True): each image's valid rectangle pooled alone measured faster than filling the padding
    # (no power of the padding: 40% less time at p = 7.6 on the benchmark's padded batch).
    run = functools.partial(
        blocked, itemsize=itemsize, workspace=dtype, crop=True, fast_args=True, p=p_map, eps=eps, dtype=dtype
    )
    if (
        inplace
        and fast_path(x)
        and isinstance(p_map, float)
        and p_map in _CHEAP_POWERS
        and eps**p_map >= torch.finfo(dtype).tiny
    ):
        # CPU, no autograd, a power by multiplications whose smallest term eps ** p is a normal number: the
        # unscaled power sums cannot underflow, and they overflow only to inf. That is two passes fewer than the
        # scaled form below (no max, no division), which is kept for a batch whose sums are not all finite. Same
        # value to float rounding (GeM is homogeneous).
        if _chunkable(x, mask, dtype, True):  # the channel chunks bound the temporary: no blocks of images
            sums = _gem_sum_block(x, None, p=p_map, eps=eps, dtype=dtype, fast=True, buf=None)
        else:
            sums = run(_gem_sum_block, x, mask)
        if math.isfinite(float(sums.sum())):
            return (sums / n_valid).pow(inv).to(x.dtype)
    if inplace and isinstance(p_map, float) and fast_path(x) and _chunkable(x, mask, dtype, True):
        sums, scale = _gem_block(x, None, p=p_map, eps=eps, dtype=dtype, inplace=True, fast=True, buf=None)
    else:
        sums, scale = run(_gem_block, x, mask, inplace=inplace)
    pooled = sums / n_valid
    return (scale * pooled.pow(inv)).to(x.dtype)


#: Exponents that ``torch.pow`` computes with one or two multiplications (or a square root), not a ``pow`` call.
_CHEAP_POWERS = (0.5, 1.0, 2.0, 3.0)


def _gem_sum_block(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    p: float,
    eps: float,
    dtype: torch.dtype,
    fast: bool,
    buf: torch.Tensor | None,
) -> torch.Tensor:
    """Per channel: the unscaled sum of ``max(x, eps) ** p`` over the valid positions (no autograd)."""
    if _chunkable(x, mask, dtype, fast):
        (sums,) = channel_chunked(
            lambda m, work: (torch.clamp(m, min=eps, out=work).pow_(p).sum(dim=(-2, -1)),), x, dtype
        )
        return sums
    return _clamp_fill(x, mask, eps=eps, dtype=dtype, fast=fast, buf=buf).pow_(p).sum(dim=(-2, -1))


def _chunkable(x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype, fast: bool) -> bool:
    """Whether a block's per-channel work can run over cache-sized channel chunks (:func:`channel_chunked`).

    CPU fast path, no mask (a whole map or a cropped image), ``x`` already in the compute dtype, contiguous or a
    single (cropped) image, and larger than two chunks (a smaller map gains nothing from chunks: measured slower
    for the 1.5 MiB cropped images of a padded 32 x 512 x 24 x 32 batch).
    """
    return (
        fast
        and mask is None
        and x.dtype == dtype
        and (x.shape[0] == 1 or x.is_contiguous())
        and x.numel() * x.element_size() > 2 * _blocking.CHUNK_BYTES
    )


def _gem_block(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    p: torch.Tensor | float,
    eps: float,
    dtype: torch.dtype,
    inplace: bool,
    fast: bool,
    buf: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel: the sum of ``(max(x, eps) / m) ** p`` over the valid positions, and the scale ``m``.

    One map-sized buffer per block (``buf``, or a new one), worked on in place without autograd.
    """
    if inplace and isinstance(p, float) and _chunkable(x, mask, dtype, fast):

        def chunk(m: torch.Tensor, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            xc = torch.clamp(m, min=eps, out=work)
            scale = xc.amax(dim=(-2, -1), keepdim=True)
            return _power(xc.div_(scale), p, None, True).sum(dim=(-2, -1)), scale[:, 0, 0]

        sums, scale = channel_chunked(chunk, x, dtype)
        return sums, scale
    xc = _clamp_fill(x, mask, eps=eps, dtype=dtype, fast=fast, buf=buf)
    # Per-channel scale (>= eps): the scaled values lie in (0, 1], so their powers neither overflow nor all
    # underflow (the max contributes exactly 1). Detached: by homogeneity the scale has zero gradient.
    scale = xc.amax(dim=(-2, -1), keepdim=True).detach()
    y = xc.div_(scale) if inplace else xc / scale
    return _power(y, p, mask, inplace).sum(dim=(-2, -1)), scale[..., 0, 0]


def _clamp_fill(
    x: torch.Tensor, mask: torch.Tensor | None, *, eps: float, dtype: torch.dtype, fast: bool, buf: torch.Tensor | None
) -> torch.Tensor:
    """A ``dtype`` buffer (``buf`` or a new one) holding ``max(x, eps)`` at the valid positions, 0 in the padding.

    Padding becomes 0, below every clamped valid value: it cannot win the max and its power is 0.
    """
    if x.dtype != dtype:  # upcast first (eps is a float32 floor), then work in place on the copy
        x = x.to(dtype) if buf is None else buf.copy_(x)
        return x.clamp_(min=eps) if mask is None else fill_padding(x, mask, 0.0, floor=eps, fast=fast, out=x)
    if mask is None:
        return x.clamp(min=eps) if buf is None else torch.clamp(x, min=eps, out=buf)
    return fill_padding(x, mask, 0.0, floor=eps, fast=fast, out=buf)


def _power(y: torch.Tensor, p: torch.Tensor | float, mask: torch.Tensor | None, inplace: bool) -> torch.Tensor:
    r"""``y ** p`` for ``y`` in [0, 1] (0 only at masked positions) and ``p > 0``, in place when ``inplace``.

    On CPU a general ``pow`` costs about 20 cycles per element (a vectorised ``powf`` accurate to 1 ulp), 3.5
    times :math:`2^{p \log_2 y}` as ``log2``, a multiplication and ``exp2``; that form is used there, except for
    the exponents ``pow`` computes by multiplications. Its relative error is at most about
    :math:`p |\log_2 y|` ulps, so a few ulps on the terms that carry the mean (those near the channel maximum,
    where y is near 1) and a few more on terms :math:`2^{-20}` times smaller; the GeM value moves by about one
    float32 rounding (float64: 1e-15). The result is the same with and without autograd; under autograd masked
    positions go through ``log2(1)`` and their power is selected to 0, so that no ``0 * inf`` reaches a gradient
    (``torch.pow`` has the same zero gradients there).
    """
    if y.device.type != "cpu" or (isinstance(p, float) and p in _CHEAP_POWERS):
        return y.pow_(p) if inplace else y.pow(p)
    if inplace:
        return y.log2_().mul_(p).exp2_()  # log2(0) = -inf: padding still gives exactly 0
    if mask is None:
        return torch.exp2(torch.log2(y) * p)
    valid = mask[:, None]
    safe = torch.where(valid, y, torch.ones((), dtype=y.dtype, device=y.device))
    return torch.where(valid, torch.exp2(torch.log2(safe) * p), torch.zeros((), dtype=y.dtype, device=y.device))


def rmac_grid(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """The R-MAC region grid of Tolias et al. on a feature map of size ``height x width``.

    Region 0 is the whole map (the global MAC term, as in cirtorch); then, for each level ``l = 1..levels``,
    square regions of side ``floor(2 * min(H, W) / (l + 1))`` are laid out uniformly, ``l`` along the short
    side and ``l + d`` along the long side, where ``d`` (0 for a square map) is chosen so that consecutive
    level-1 regions overlap closest to ``overlap``. Each region covers exactly ``side`` cells (no off-by-one:
    the last region ends at the map border). Regions are listed row-major within a level.

    Args:
        height: Feature-map height H (a Python int, so the grid is static under ``torch.compile``).
        width: Feature-map width W.
        levels: Number of scale levels L.
        overlap: Target overlap between consecutive regions.

    Returns:
        A list of ``(y0, x0, h, w)`` boxes in feature-grid cells.

    Example:
        >>> len(rmac_grid(24, 32, levels=3))
        21
    """
    if height <= 0 or width <= 0:
        return []
    boxes = [(0, 0, height, width)]
    short = min(height, width)
    extra_w = extra_h = 0
    if height != width:
        # Level-1 regions along the long side: 2..7, the count whose step b gives overlap 1 - b/short
        # closest to ``overlap`` (first minimum wins). Plain Python: the grid is static under torch.compile.
        errors = [abs(1 - (max(height, width) - short) / (n - 1) / short - overlap) for n in range(2, 8)]
        idx = errors.index(min(errors))
        if height < width:
            extra_w = idx + 1
        else:
            extra_h = idx + 1
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side == 0:
            continue
        half = math.floor(side / 2 - 1)

        def starts(n: int, size: int, side: int = side, half: int = half) -> list[int]:
            step = 0.0 if n == 1 else (size - side) / (n - 1)
            return [math.floor(half + i * step) - half for i in range(n)]

        for y0 in starts(level + extra_h, height):
            for x0 in starts(level + extra_w, width):
                boxes.append((y0, x0, side, side))
    return boxes


def _rmac_regions_static(x: torch.Tensor, levels: int, width: int | None = None) -> torch.Tensor:
    """Region maxima :math:`(B, R, C)` of the grid of ``x.shape``, blocked over the batch on CPU.

    With ``width`` < W the grid is that of an ``H x width`` map, the first ``width`` columns of ``x``: the columns
    beyond are read by the row bands but never by a region (whole rows keep the bands' reads contiguous).
    """
    return blocked(_region_maxima, x, None, levels=levels, width=x.shape[-1] if width is None else width)


def _region_maxima(x: torch.Tensor, mask: torch.Tensor | None, *, levels: int, width: int) -> torch.Tensor:
    """Region maxima :math:`(B, R, C)`, separably.

    Each band of rows is reduced over H once (``amax`` over dim -2, vectorised along W), then each box over its
    columns of that band. Exact (a max of maxima); about 14x faster on CPU than reducing every box over both
    dims of a strided slice, and the regions of a level share their bands.
    """
    bands: dict[tuple[int, int], torch.Tensor] = {}
    regions = []
    for y, xx, h, w in rmac_grid(x.shape[-2], width, levels):
        if (y, h) not in bands:
            bands[(y, h)] = x[..., y : y + h, :].amax(dim=-2)  # (B, C, W)
        regions.append(bands[(y, h)][..., xx : xx + w].amax(dim=-1))
    return torch.stack(regions, dim=1)


def _regions_and_mask(
    x: torch.Tensor, levels: int, mask: torch.Tensor | None, fn: str
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_maps(x, mask, fn)
    if levels < 1:
        raise ValueError(f"{fn}(): levels must be >= 1; got {levels}.")
    if mask is None:
        regions = _rmac_regions_static(x, levels)
        region_mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=x.device)
    else:
        heights = mask.any(dim=2).sum(dim=1)
        widths = mask.any(dim=1).sum(dim=1)
        sizes = torch.stack([heights, widths], dim=1)
        rows = torch.arange(x.shape[2], device=x.device)
        cols = torch.arange(x.shape[3], device=x.device)
        rect = (rows[None, :, None] < heights[:, None, None]) & (cols[None, None, :] < widths[:, None, None])
        if not torch.equal(rect, mask):
            raise ValueError(
                f"{fn}(): mask must be a top-left rectangle per image (padding bottom/right); got another pattern."
            )
        uniq, inverse = torch.unique(sizes, dim=0, return_inverse=True)
        fast = fast_path(x)
        groups = []
        for g, (h, w) in enumerate(uniq.tolist()):
            idx = torch.nonzero(inverse == g).flatten()
            first, count = int(idx[0]), idx.numel()
            # A run of consecutive images (often the whole group) is a view: no copy of the maps. Without
            # autograd on CPU, whole rows: the bands then reduce contiguous rows (a strided h x w crop made R-MAC
            # 2x slower), and the padding columns they also reduce are outside every region of the w-wide grid
            # (with autograd, the max's backward would send NaN garbage there a NaN gradient).
            run = bool(idx[-1] - first == count - 1)
            width = x.shape[3] if fast else w
            maps = x[first : first + count, :, :h, :width] if run else x[idx, :, :h, :width]
            groups.append((idx, _rmac_regions_static(maps, levels, width=w)))
        n_regions = max((r.shape[1] for _, r in groups), default=len(rmac_grid(x.shape[2], x.shape[3], levels)))
        regions = x.new_zeros(x.shape[0], n_regions, x.shape[1])
        region_mask = torch.zeros(x.shape[0], n_regions, dtype=torch.bool, device=x.device)
        for idx, r in groups:
            regions[idx, : r.shape[1]] = r
            region_mask[idx, : r.shape[1]] = True
    return regions, region_mask


def rmac_regions(
    x: torch.Tensor,
    *,
    levels: int = 3,
    mask: torch.Tensor | None = None,
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Raw MAC vectors of the R-MAC regions (see :func:`rmac_grid`), one row per region.

    Without ``mask`` every image shares the grid of ``x.shape`` (static, compile-friendly). With ``mask`` each
    image gets the grid of its own valid ``h_i x w_i`` top-left rectangle (padding is bottom/right), so a padded
    image has exactly the regions it would have alone; images with fewer regions are padded with zero rows whose
    region-mask entry is False. That path reads the valid sizes to the host once per call (the grid is a
    function of them) and is therefore exempt from ``fullgraph`` compilation.

    Args:
        x: Feature maps of shape :math:`(B, C, H, W)`.
        levels: Number of R-MAC levels L (>= 1).
        mask: Optional bool validity mask :math:`(B, H, W)`, a top-left rectangle per image.
        return_mask: Also return the bool region mask :math:`(B, R)`.

    Returns:
        Region vectors :math:`(B, R, C)`, region 0 being the whole (valid) map, and, with ``return_mask=True``,
        the region mask :math:`(B, R)`.

    Raises:
        ShapeError: If ``x`` is not 4-D or ``mask`` does not match it.
        DTypeError: If ``x`` is not floating point or ``mask`` is not bool.
        ValueError: If ``levels < 1`` or the mask is not a top-left rectangle.

    Example:
        >>> rmac_regions(torch.rand(2, 512, 24, 32)).shape
        torch.Size([2, 21, 512])
    """
    regions, region_mask = _regions_and_mask(x, levels, mask, "rmac_regions")
    return (regions, region_mask) if return_mask else regions


def rmac(
    x: torch.Tensor,
    *,
    levels: int = 3,
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Regional MAC: the sum of the L2-normalised MAC vectors of the R-MAC regions.

    Tolias, Sicre and Jégou, ICLR 2016 (grid: :func:`rmac_grid`, L = 3, overlap 0.4, plus the global region as
    in cirtorch). Regional PCA-whitening is left to :class:`deepagg.nn.Whiten` applied to
    :func:`rmac_regions`. The region norms and the sum run in at least float32 (a float16 norm of large
    activations overflows to ``inf`` and zeroes the region), and the result has the input dtype.

    Args:
        x: Feature maps of shape :math:`(B, C, H, W)`.
        levels: Number of levels L (>= 1).
        eps: Added to each region vector's norm before dividing.
        mask: Optional bool validity mask :math:`(B, H, W)` (a top-left rectangle per image).

    Returns:
        Raw R-MAC vectors of shape :math:`(B, C)`.

    Raises:
        ShapeError: If ``x`` is not 4-D or ``mask`` does not match it.
        DTypeError: If ``x`` is not floating point or ``mask`` is not bool.
        ValueError: If ``levels < 1`` or the mask is not a top-left rectangle.

    Example:
        >>> rmac(torch.rand(2, 512, 24, 32)).shape
        torch.Size([2, 512])
    """
    regions, region_mask = _regions_and_mask(x, levels, mask, "rmac")
    dtype = _compute_dtype(x)
    regions = regions.to(dtype)  # region maxima are exact; their norms and the sum are not
    regions = regions / (regions.norm(dim=-1, keepdim=True) + eps)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    return torch.where(region_mask[..., None], regions, zero).sum(dim=1).to(x.dtype)


def crow(
    x: torch.Tensor,
    *,
    a: float = 2.0,
    b: float = 2.0,
    eps: float = 1e-12,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Cross-dimensional weighting (CroW): spatial and channel weights, then weighted sum pooling.

    Kalantidis, Mellina and Osindero, "Cross-dimensional weighting for aggregated deep convolutional features",
    ECCVW 2016. With :math:`S = \sum_c X_c` the channel-sum map, the spatial weight is
    :math:`(S / \|S\|_a)^{1/b}` (the base clamped at ``eps`` before the power, and exactly 0 where
    :math:`S = 0` or the mask is False), and the channel weight is the sparsity IDF
    :math:`\log(\sum_k Q_k / Q_c)` with :math:`Q_c` the fraction of valid positions where channel c is
    non-zero (weight 0 for a channel that is zero everywhere). The channel weight is piecewise constant in x, so
    gradients flow through the spatial weight and the pooled features only. Computed in at least float32 and
    cast back to the input dtype; note that the raw weighted *sum* grows with the map size, so on float16 maps
    of large activations it can exceed the float16 range (:class:`deepagg.nn.CroW` normalises before casting).

    Args:
        x: Non-negative feature maps of shape :math:`(B, C, H, W)` (post-ReLU).
        a: The spatial normalisation norm, > 0.
        b: The spatial power root, > 0.
        eps: Clamp floor of the spatial base.
        mask: Optional bool validity mask :math:`(B, H, W)`.

    Returns:
        Raw CroW vectors of shape :math:`(B, C)`.

    Raises:
        ShapeError: If ``x`` is not 4-D or ``mask`` does not match it.
        DTypeError: If ``x`` is not floating point or ``mask`` is not bool.
        ValueError: If ``a`` or ``b`` is not positive.
        RuntimeError: If an image's mask is empty.

    Example:
        >>> crow(torch.rand(2, 512, 24, 32)).shape
        torch.Size([2, 512])
    """
    _check_maps(x, mask, "crow")
    check_positive(a, name="a", fn="crow")
    check_positive(b, name="b", fn="crow")
    dtype = _compute_dtype(x)
    itemsize = torch.finfo(dtype).bits // 8
    out = blocked(
        _crow_block, x, mask, itemsize=itemsize, workspace=dtype, fast_args=True, a=a, b=b, eps=eps, dtype=dtype
    )
    return out.to(x.dtype)


def _crow_block(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    a: float,
    b: float,
    eps: float,
    dtype: torch.dtype,
    fast: bool,
    buf: torch.Tensor | None,
) -> torch.Tensor:
    """CroW vectors of a block, in ``dtype``; its one map-sized temporary is ``buf``.

    Three passes over the map (channel sum, weighted sum, non-zero count). With a mask, the CPU form (``buf``
    given, maps already in ``dtype``) reads the padding and weighs it 0 in both sums; inf or NaN garbage there
    gives NaN (0 * inf), and :func:`blocked` redoes the block exactly. Otherwise one more pass zeroes it first.
    """
    # The CPU form's 0/1 weights of the valid positions when it leaves the padding unzeroed, else None.
    valid = mask.to(dtype) if mask is not None and buf is not None and x.dtype == dtype and x.shape[0] > 0 else None
    xf = x if valid is not None else _zero_padding(x, mask, dtype=dtype, fast=fast, buf=buf)  # buf: padded/upcast
    s = xf.sum(dim=1)  # (B, H, W)
    if valid is not None:
        s = s * valid  # padding garbage out of the norm and the spatial weights (inf there: NaN, redone)
    z = s.abs().pow(a).sum(dim=(-2, -1), keepdim=True).pow(1.0 / a)
    base = (s / z.clamp(min=eps)).clamp(min=eps)
    positive = s > 0 if mask is None else (s > 0) & mask
    spatial = torch.where(positive, base.pow(1.0 / b), torch.zeros_like(s))
    fast = buf is not None and x.shape[0] > 0
    pooled = weighted_sums(xf, spatial, fast=fast)  # the padding has weight 0
    if not fast:  # the batched form (GPU, compile, autograd)
        nonzero = (xf != 0).to(dtype).sum(dim=(-2, -1))  # (B, C)
    else:
        # CPU blocks: the non-zero count as |sign(xf)| summed in buf (the same exact count; `!=` and every other
        # bool kernel measured several times slower on CPU: they are not vectorised), over the valid positions.
        signs = (xf.sign_() if xf is buf else torch.sign(xf, out=buf)).abs_()
        nonzero = signs.sum(dim=(-2, -1)) if valid is None else weighted_sums(signs, valid, fast=True)
    n_valid = x.shape[-2] * x.shape[-1] if mask is None else valid_counts(mask, dtype)[:, None]
    q = nonzero / n_valid
    ratio = q.sum(dim=1, keepdim=True) / q.clamp(min=eps)
    channel = torch.where(q > 0, torch.log(ratio), torch.zeros_like(q))
    return pooled * channel
