"""Deep spatial matching (DSM, Siméoni, Avrithis and Chum, CVPR 2019): local features and fast spatial matching.

Local features are detected on activation maps and matched spatially, batched over many (query, database) pairs.

* :func:`activation_features` detects maximally stable extremal regions (MSER) independently in every channel of
  an activation tensor (regions of *high* activation only) and keeps each one as its fitted ellipse (mean and
  covariance of its pixel coordinates), its strength (the largest activation inside it), its channel and its scale.
  The regions come from OpenCV's MSER on 8-bit maps (an optional dependency: ``pip install
  'deepagg[opencv]'``); everything after the detection is torch.
* :func:`spatial_match` is fast spatial matching (Philbin et al., 2007) as the paper uses it: tentative
  correspondences only between features of the same channel (channels are visual words, there are no
  descriptors), one 5-dof upright-affine hypothesis per correspondence (the two ellipses mapped onto each
  other, the vertical direction kept), **all** hypotheses enumerated, inliers at ``error`` pixels in the database
  activation map, local optimisation by least squares on the inliers, and the maximum over the scale pairs.
  Every (pair, query scale, database scale) is a "unit"; units are padded into tensors in buckets of similar
  size, and the inlier counts of all hypotheses of a bucket come from one batched matrix product (the squared
  transfer error is a bilinear form in 12 monomials of the coordinates).

Coordinates are ``(x, y)`` = (column, row) of the activation map of the feature's own scale, pixel centres at
integers.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from deepagg._checks import ShapeError, check_int, check_positive
from deepagg.functional import _blocking
from deepagg.functional.diffusion import _silence_csr_beta_ctx
from deepagg.functional.mser import check_mser_settings

__all__ = ["LocalFeatures", "SpatialMatch", "activation_features", "mser_regions", "spatial_match"]

_DENSE_KEYS = 1 << 22  # _correspondences: (query image, channel) tables up to this size are dense
_TORCH_MSER_PIXELS = 1 << 22  # backend="torch" on a CPU: map pixels per bright_msers call (see _pixels_per_call)
_OPENCV_HINT = "pip install 'deepagg[opencv]' (opencv-python-headless)"


def _cv2(fn: str = "activation_features") -> Any:
    try:
        import cv2
    except ImportError:  # pragma: no cover - exercised through a monkeypatched import in the tests
        raise ImportError(f"{fn}(): the MSER detector needs OpenCV; {_OPENCV_HINT}.") from None
    return cv2


# ------------------------------------------------------------------------------------------------- features


@dataclasses.dataclass(frozen=True)
class LocalFeatures:
    """Padded local features of ``B`` images (``N`` slots each, ``mask`` says which are real).

    Attributes:
        centers: :math:`(B, N, 2)` float, ellipse centres ``(x, y)`` in the activation map of the feature's scale.
        covariances: :math:`(B, N, 2, 2)` float, ellipse shapes (covariance of the region's pixel coordinates).
        strengths: :math:`(B, N)` float, the largest activation inside the region.
        channels: :math:`(B, N)` int64 channel ids (-1 in padding).
        scales: :math:`(B, N)` int64 scale indices into the list of maps the features came from (-1 in padding).
        mask: :math:`(B, N)` bool, True = a real feature.
        map_sizes: :math:`(B, S, 2)` int64 ``(H, W)`` of each image's activation map at each scale (for drawing).
    """

    centers: torch.Tensor
    covariances: torch.Tensor
    strengths: torch.Tensor
    channels: torch.Tensor
    scales: torch.Tensor
    mask: torch.Tensor
    map_sizes: torch.Tensor

    def __len__(self) -> int:
        return int(self.centers.shape[0])

    @property
    def num_scales(self) -> int:
        return int(self.map_sizes.shape[1])

    def __getitem__(self, idx: Any) -> LocalFeatures:
        """Images ``idx`` (an int keeps a batch of one; an index tensor or slice selects several)."""
        if isinstance(idx, torch.Tensor) and idx.ndim == 0 and not idx.is_floating_point() and idx.dtype != torch.bool:
            idx = int(idx)
        elif not isinstance(idx, (slice, torch.Tensor, list, tuple)) and hasattr(idx, "__index__"):
            idx = operator.index(idx)
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return LocalFeatures(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})

    def to(self, *args: Any, **kwargs: Any) -> LocalFeatures:
        """Every tensor moved (``.to(device)``); dtype arguments apply to the float tensors only."""
        out = {}
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            out[f.name] = (
                t.to(*args, **kwargs)
                if t.is_floating_point()
                else t.to(
                    *[a for a in args if not isinstance(a, torch.dtype)],
                    **{k: v for k, v in kwargs.items() if k != "dtype"},
                )
            )
        return LocalFeatures(**out)

    def counts(self) -> torch.Tensor:
        """Number of features per image, :math:`(B,)` int64."""
        return self.mask.sum(1)

    def trimmed(self) -> LocalFeatures:
        """The same features with the padding width cut to the largest count."""
        n = int(self.counts().max()) if len(self) else 0
        return LocalFeatures(
            self.centers[:, :n],
            self.covariances[:, :n],
            self.strengths[:, :n],
            self.channels[:, :n],
            self.scales[:, :n],
            self.mask[:, :n],
            self.map_sizes,
        )

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (for ``torch.save``); :meth:`from_dict` reads them back."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> LocalFeatures:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    @classmethod
    def empty(cls, batch: int = 0, num_scales: int = 1, *, device: Any = None) -> LocalFeatures:
        """``batch`` images without features."""
        return cls(
            torch.zeros(batch, 0, 2, device=device),
            torch.zeros(batch, 0, 2, 2, device=device),
            torch.zeros(batch, 0, device=device),
            torch.zeros(batch, 0, dtype=torch.int64, device=device),
            torch.zeros(batch, 0, dtype=torch.int64, device=device),
            torch.zeros(batch, 0, dtype=torch.bool, device=device),
            torch.zeros(batch, num_scales, 2, dtype=torch.int64, device=device),
        )

    @classmethod
    def cat(cls, items: Sequence[LocalFeatures]) -> LocalFeatures:
        """Images of several feature sets in one batch (padding widened to the largest; same number of scales)."""
        items = list(items)
        if not items:
            raise ValueError("LocalFeatures.cat(): items must hold at least one LocalFeatures; got none.")
        s = {it.num_scales for it in items}
        if len(s) != 1:
            raise ValueError(f"LocalFeatures.cat(): every item must have the same number of scales; got {sorted(s)}.")
        n = max(int(it.centers.shape[1]) for it in items)

        def pad(t: torch.Tensor, value: float | int | bool) -> torch.Tensor:
            if t.shape[1] == n:
                return t
            shape = (t.shape[0], n - t.shape[1], *t.shape[2:])
            return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], 1)

        return cls(
            torch.cat([pad(it.centers, 0.0) for it in items]),
            torch.cat([pad(it.covariances, 0.0) for it in items]),
            torch.cat([pad(it.strengths, 0.0) for it in items]),
            torch.cat([pad(it.channels, -1) for it in items]),
            torch.cat([pad(it.scales, -1) for it in items]),
            torch.cat([pad(it.mask, False) for it in items]),
            torch.cat([it.map_sizes for it in items]),
        )


def _as_scale_list(a: Any, fn: str) -> tuple[list[torch.Tensor], bool]:
    """``a`` as a list of ``(B, C, H, W)`` maps (one per scale) and whether the input was one unbatched map."""
    maps = list(a) if isinstance(a, (list, tuple)) else [a]
    if not maps:
        raise ValueError(
            f"{fn}(): A must be a tensor or a non-empty list of tensors (one per scale); got an empty list."
        )
    single = None
    out = []
    for i, m in enumerate(maps):
        name = "A" if len(maps) == 1 else f"A[{i}]"
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{fn}(): {name} must be a torch.Tensor; got {type(m).__name__}.")
        if m.ndim not in (3, 4):
            raise ShapeError(
                f"{fn}(): {name} must have shape (C, H, W) or (B, C, H, W); got {tuple(m.shape)} with {m.ndim} dims.",
                "(C, H, W) | (B, C, H, W)",
                tuple(m.shape),
            )
        if not m.is_floating_point():
            raise TypeError(f"{fn}(): {name} must be a floating tensor (activations); got {m.dtype}.")
        one = m.ndim == 3
        if single is not None and one != single:
            raise ShapeError(
                f"{fn}(): every scale must be batched alike; {name} has {m.ndim} dims, A[0] {maps[0].ndim}."
            )
        single = one
        out.append(m[None] if one else m)
    b, c = out[0].shape[:2]
    for i, m in enumerate(out[1:], 1):
        if m.shape[:2] != (b, c):
            raise ShapeError(
                f"{fn}(): every scale must have the same (B, C) = {(b, c)}; A[{i}] has {tuple(m.shape[:2])}.",
                (b, c),
                tuple(m.shape[:2]),
            )
    return out, bool(single)


def _concat_regions(regions: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All pixels of ``regions`` (each ``(n, 2)`` ``(x, y)``, non-empty) in one array, with each pixel's region.

    Returns ``(x, y, region id, start offset of each region)``, the pixels grouped by region in order (for
    ``np.ufunc.reduceat``).
    """
    counts = np.fromiter((len(r) for r in regions), dtype=np.int64, count=len(regions))
    pix = np.concatenate(regions).astype(np.int64)
    starts = np.zeros(len(regions), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return pix[:, 0], pix[:, 1], np.repeat(np.arange(len(regions)), counts), starts


def _upper_level_sets(
    maps: np.ndarray, pixels: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], owner: np.ndarray
) -> np.ndarray:
    """Which regions are components of upper level sets of their maps (region ``k`` lies in ``maps[owner[k]]``).

    ``maps`` :math:`(M, H, W)` uint8; ``pixels`` the regions' pixels as :func:`_concat_regions` gives them (at least
    one region). A component of an upper level set: every pixel inside is strictly higher than every 4-neighbour
    outside (a high-activation region). All regions at once: a neighbour is outside when its (region, pixel) key is
    not among the region's own keys.
    """
    _, h, w = maps.shape
    x, y, rid, starts = pixels
    flat = maps.reshape(len(maps), h * w).astype(np.int16)
    row = owner[rid]  # each pixel's map
    lin = y * w + x
    inside_min = np.minimum.reduceat(flat[row, lin], starts)
    keys = rid * (h * w) + lin
    dense = len(starts) * h * w <= _DENSE_KEYS * 16  # a bool per (region, pixel) of the map: up to 64 MB
    if dense:
        member = np.zeros(len(starts) * h * w, dtype=bool)
        member[keys] = True
    else:
        sorted_keys = np.sort(keys)
    ring_max = np.full(len(starts), -1, dtype=np.int16)  # -1: no pixel outside (a region filling the map)
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        nx, ny = x + dx, y + dy
        ok = (nx >= 0) & (nx < w) & (ny >= 0) & (ny < h)
        nlin = np.where(ok, ny * w + nx, 0)
        nkey = rid * (h * w) + nlin
        if dense:
            outside = ok & ~member[nkey]
        else:
            pos = np.minimum(np.searchsorted(sorted_keys, nkey), len(sorted_keys) - 1)
            outside = ok & (sorted_keys[pos] != nkey)
        ring_max = np.maximum(ring_max, np.maximum.reduceat(np.where(outside, flat[row, nlin], -1), starts))
    return inside_min > ring_max


def mser_regions(
    channel_map: np.ndarray,
    *,
    delta: int = 12,
    min_area: int = 2,
    max_area: float = 0.5,
    max_variation: float = 0.5,
    min_diversity: float = 0.7,
    backend: str = "opencv",
) -> list[np.ndarray]:
    """High-activation MSERs of one 8-bit map: OpenCV's MSER, only upper-level-set regions, VLFeat's diversity.

    1. OpenCV's ``MSER_create(delta, min_area, max_area, max_variation)`` proposes regions. Its ``min_diversity``
       is passed as 0: OpenCV documents it for colour images only, and its grayscale MSER ignores it (4.x, 5.1),
       except OpenCV 5.0, which rejects a region when its *variation* is below it (opencv/opencv#29652, fixed in
       5.1): with 0 every release from 4.10 to 5.1 finds the same regions (``docs/dsm.md``).
    2. OpenCV returns regions of both polarities; DSM wants high activation only (MSER+): a region is kept only if
       every pixel inside is strictly higher than every 4-neighbour outside it.
    3. VLFeat's diversity rule: regions are visited from the largest; one is dropped when the smallest kept region
       containing it is less than ``1 / (1 - min_diversity)`` times larger (relative area change below
       ``min_diversity``), so nested near-duplicates of one blob collapse to one.

    Args:
        channel_map: :math:`(H, W)` uint8 map.
        delta: OpenCV's MSER step (12).
        min_area: Smallest region, pixels (2).
        max_area: Largest region, a fraction of the map (0.5).
        max_variation: OpenCV's largest area variation (0.5).
        min_diversity: VLFeat-style diversity (0.7, the paper's; 0 keeps every nested region).
        backend: ``"opencv"``, or ``"torch"`` for :func:`~deepagg.functional.mser.bright_msers` (the same three
            steps in tensor ops, without OpenCV; regions of equal size in another order, and a few regions differ
            where OpenCV breaks a tie by its scan order: see :mod:`deepagg.functional.mser`).

    Returns:
        The regions, each an ``(n, 2)`` int array of ``(x, y)`` pixels, largest first (ties in OpenCV's order).
    """
    if backend not in ("opencv", "torch"):
        raise ValueError(f"mser_regions(): backend must be 'opencv' or 'torch'; got {backend!r}.")
    if backend == "torch":
        from deepagg.functional.mser import bright_msers

        found = bright_msers(
            torch.from_numpy(np.ascontiguousarray(channel_map, dtype=np.uint8))[None],
            delta=delta,
            min_area=min_area,
            max_area=max_area,
            max_variation=max_variation,
            min_diversity=min_diversity,
        )
        return [r.numpy() for r in found.as_lists(1)[0]]
    return _mser_many(
        channel_map[None],
        delta=delta,
        min_area=min_area,
        max_area=max_area,
        max_variation=max_variation,
        min_diversity=min_diversity,
        fn="mser_regions",
    )[0]


def _mser_many(
    maps: np.ndarray,
    *,
    delta: int,
    min_area: int,
    max_area: float,
    max_variation: float,
    min_diversity: float,
    fn: str = "activation_features",
) -> list[list[np.ndarray]]:
    """:func:`mser_regions` of every map of ``maps`` :math:`(M, H, W)` uint8 (the high-activation test batched)."""
    out: list[list[np.ndarray]] = [[] for _ in maps]
    found = _mser_kept(
        maps,
        delta=delta,
        min_area=min_area,
        max_area=max_area,
        max_variation=max_variation,
        min_diversity=min_diversity,
        fn=fn,
    )
    if found is not None:
        regions, owner, _, kept = found
        for k in kept.tolist():
            out[owner[k]].append(regions[k])
    return out


def _mser_kept(
    maps: np.ndarray,
    *,
    delta: int,
    min_area: int,
    max_area: float,
    max_variation: float,
    min_diversity: float,
    fn: str,
) -> tuple[list[np.ndarray], np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None:
    """OpenCV's regions of every map, each region's map, their pixels (:func:`_concat_regions`) and the kept ones.

    The kept regions are the high-activation ones that pass VLFeat's diversity rule, as indices into the regions,
    in :func:`mser_regions`' order (map by map, largest first). None when no map has a region.
    """
    cv2 = _cv2(fn)
    _, h, w = maps.shape
    if h < 3 or w < 3:  # OpenCV refuses maps under 3 x 3; no stable region fits in one anyway
        return None
    mser = cv2.MSER_create(
        delta=int(delta),
        min_area=int(min_area),
        max_area=max(int(min_area) + 1, int(max_area * h * w)),
        max_variation=float(max_variation),
        min_diversity=0.0,  # unused by grayscale MSER, but OpenCV 5.0 compares it with the variation (#29652)
    )
    found = [mser.detectRegions(np.ascontiguousarray(m))[0] for m in maps]
    regions = [r for rs in found for r in rs]
    if not regions:
        return None
    owner = np.repeat(np.arange(len(maps)), [len(rs) for rs in found])
    pixels = _concat_regions(regions)
    kept = _diversity_kept(pixels, owner, _upper_level_sets(maps, pixels, owner), (h, w), min_diversity)
    return regions, owner, pixels, kept


def _select_regions(
    pixels: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pixels of regions ``ids`` (in that order) in :func:`_concat_regions`' form, taken from ``pixels``."""
    x, y, _, starts = pixels
    size = np.diff(np.append(starts, len(x)))[ids]
    new_starts = np.cumsum(size) - size
    idx = np.repeat(starts[ids] - new_starts, size) + np.arange(int(size.sum()))
    return x[idx], y[idx], np.repeat(np.arange(len(ids)), size), new_starts


def _diversity_kept(
    pixels: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    owner: np.ndarray,
    bright: np.ndarray,
    shape: tuple[int, int],
    min_diversity: float,
) -> np.ndarray:
    """VLFeat's diversity rule over the ``bright`` regions of all maps at once: the kept ones, in visiting order.

    Per map the regions are visited from the largest (ties in OpenCV's order); one is dropped when the smallest
    kept region containing it, ``K`` pixels, has ``(K - R) / K < min_diversity`` for its own ``R`` pixels. Regions
    of one map are nested or disjoint, so the regions containing a region's first pixel and visited before it are
    its ancestors, a chain: its parent is the previous one in that pixel's chain, and the decisions run one
    nesting level at a time (a handful of levels), each over every region of that level of every map.
    """
    x, y, rid, starts = pixels
    size = np.diff(np.append(starts, len(x)))
    ids = np.flatnonzero(bright)
    order = ids[np.lexsort((ids, -size[ids], owner[ids]))]  # visiting order: map, largest first, OpenCV's order
    rank = np.full(len(size), -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    # Every pixel of every bright region, sorted by (map pixel, visiting rank): each pixel's chain of regions.
    member = np.flatnonzero(bright[rid])
    h, w = shape
    key = (owner[rid[member]] * h + y[member]) * w + x[member]
    chain = np.lexsort((rank[rid[member]], key))
    where_in_chain = np.empty(len(member), dtype=np.int64)
    where_in_chain[chain] = np.arange(len(member))
    first = where_in_chain[np.searchsorted(member, starts[order])]  # each region's first pixel, in the chains
    prev = np.maximum(first - 1, 0)
    has_parent = (first > 0) & (key[chain[prev]] == key[chain[first]])
    parent = np.where(has_parent, rank[rid[member[chain[prev]]]], -1)  # by rank
    # Nesting levels (a parent's rank is below its child's), then the decisions one level at a time.
    depth = np.zeros(len(order), dtype=np.int64)
    nested = np.flatnonzero(parent >= 0)
    while True:
        new = depth[parent[nested]] + 1
        if np.array_equal(new, depth[nested]):
            break
        depth[nested] = new
    keep = np.zeros(len(order), dtype=bool)
    nearest = np.zeros(len(order), dtype=np.float64)  # pixels of the smallest kept region containing it (0: none)
    sz = size[order].astype(np.float64)
    for level in range(int(depth.max()) + 1 if len(order) else 0):
        at = np.flatnonzero(depth == level)
        k = np.where(parent[at] >= 0, nearest[np.maximum(parent[at], 0)], 0.0)
        keep[at] = (k == 0) | ((k - sz[at]) / np.where(k > 0, k, 1.0) >= min_diversity)
        nearest[at] = np.where(keep[at], sz[at], k)
    return order[keep]


def _to_uint8(a: torch.Tensor, scaling: str, image_max: torch.Tensor) -> torch.Tensor:
    """8-bit maps :math:`(C, H, W)`: each channel scaled by its own maximum, by the image's, or cast as is."""
    a = a.clamp(min=0)
    if scaling == "channel":
        top = a.amax(dim=(1, 2), keepdim=True)
    elif scaling == "image":
        top = image_max.reshape(1, 1, 1)
    else:  # "raw": the authors' cast (saturates above 255)
        return a.round().clamp(max=255).to(torch.uint8)
    scaled = torch.where(top > 0, a / top.clamp(min=torch.finfo(a.dtype).tiny) * 255.0, torch.zeros_like(a))
    return scaled.round().clamp(0, 255).to(torch.uint8)


def _detect_one(
    a: torch.Tensor, *, scaling: str, mser: dict[str, Any], max_regions: int, min_det: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Regions of one image at one scale: (centres (n,2), covariances (n,2,2), strengths, channels, boxes (n,4))."""
    a = a.detach().float().cpu()
    u8 = _to_uint8(a, scaling, a.max() if a.numel() else torch.tensor(0.0)).numpy()
    raw = a.numpy()
    lit = np.flatnonzero(u8.reshape(u8.shape[0], -1).max(1) > 0)  # channels with any activation
    found = _mser_kept(u8[lit], fn="activation_features", **mser)
    if found is None or not len(found[3]):
        z = np.zeros
        return z((0, 2)), z((0, 2, 2)), z(0), z(0, dtype=np.int64), z((0, 4))
    _, owner, pixels, kept = found
    # Every kept region's ellipse at once: mean and covariance of its pixel coordinates, largest raw activation.
    x, y, rid, starts = _select_regions(pixels, kept)
    n = np.diff(np.append(starts, len(x))).astype(np.float64)
    chan = lit[owner[kept]]
    mu = np.stack([np.add.reduceat(x.astype(np.float64), starts), np.add.reduceat(y.astype(np.float64), starts)], 1)
    mu /= n[:, None]
    dx, dy = x - mu[rid, 0], y - mu[rid, 1]
    sxx, sxy, syy = (np.add.reduceat(v, starts) / n for v in (dx * dx, dx * dy, dy * dy))
    strength = np.maximum.reduceat(raw[chan[rid], y, x], starts).astype(np.float64)
    fit = sxx * syy - sxy**2 > min_det  # a line or a point has no ellipse (as the authors)
    per_channel = np.bincount(chan[fit], minlength=raw.shape[0])
    keep = fit & (per_channel[chan] <= max_regions)  # a cluttered channel is skipped as a whole
    cen_a = mu[keep]
    cov_a = np.stack([np.stack([sxx, sxy], 1), np.stack([sxy, syy], 1)], 1)[keep]
    strength, chan = strength[keep], chan[keep]
    if not len(chan):
        z = np.zeros
        return z((0, 2)), z((0, 2, 2)), z(0), z(0, dtype=np.int64), z((0, 4))
    half = np.sqrt(np.stack([cov_a[:, 0, 0], cov_a[:, 1, 1]], 1))
    boxes = np.concatenate([cen_a - half, cen_a + half], 1)  # the 1-sigma ellipse's bounding box
    return cen_a, cov_a, strength, chan, boxes


def _uint8_batch(a: torch.Tensor, scaling: str) -> torch.Tensor:
    """:func:`_to_uint8` of every image of ``a`` :math:`(B, C, H, W)` at once (the same float ops, the same levels)."""
    if scaling == "raw":
        return a.clamp(min=0).round().clamp(max=255).to(torch.uint8)
    pos = a.clamp(min=0)
    # "image": the image's maximum over all channels (of the unclamped map, as _detect_one passes it)
    top = pos.amax(dim=(2, 3), keepdim=True) if scaling == "channel" else a.flatten(1).amax(1).reshape(-1, 1, 1, 1)
    scaled = torch.where(top > 0, pos / top.clamp(min=torch.finfo(a.dtype).tiny) * 255.0, torch.zeros_like(pos))
    return scaled.round().clamp(0, 255).to(torch.uint8)


def _segment_rank(keys: torch.Tensor) -> torch.Tensor:
    """Position of each element within its run of equal ``keys`` (``keys`` sorted)."""
    return torch.arange(len(keys), device=keys.device) - torch.searchsorted(keys, keys, right=False)


def _pixels_per_call(device: torch.device) -> int:
    """Map pixels per :func:`bright_msers` call on ``device``.

    4M on a CPU (about 1 GB at the peak); on a GPU as many as an eighth of its free memory holds at 400 bytes a pixel
    (250-260 measured on the CPU): the 256 level steps are paid once per call, so a GPU wants many images per call.
    """
    if device.type != "cuda":
        return _TORCH_MSER_PIXELS
    free, _ = torch.cuda.mem_get_info(device)
    return max(_TORCH_MSER_PIXELS, int(free) // (8 * 400))


def _regions_torch(
    a: torch.Tensor, *, scaling: str, mser: dict[str, Any], max_regions: int, min_det: float
) -> dict[str, torch.Tensor]:
    """:func:`_detect_one` for every image of one scale :math:`(B, C, H, W)` at once, with :func:`bright_msers`.

    Returns the regions of all images, image by image in :func:`_detect_one`'s order (channel, then largest
    first): ``image``, ``channel`` (int64), ``centers`` (R, 2) and ``covariances`` (R, 2, 2) float64,
    ``strengths`` float32, ``boxes`` (R, 4) float64.
    """
    from deepagg.functional.mser import bright_msers

    a = a.detach().float()
    b, c, h, w = a.shape
    dev = a.device
    u8 = _uint8_batch(a, scaling).reshape(b * c, h, w)
    raw = a.reshape(b * c, h * w)
    lit = (u8.reshape(b * c, -1).amax(1) > 0).nonzero().flatten() if u8.numel() else u8.new_zeros(0).long()
    per_call = max(1, _pixels_per_call(dev) // max(1, h * w))
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(lit), per_call):
        ids = lit[start : start + per_call]
        reg = bright_msers(u8[ids], **mser)
        if not len(reg):
            continue
        owner = ids[reg.map_index]  # image * C + channel of each region
        rid, pix = reg.region, reg.pixels
        n = reg.size.double()
        x, y = (pix % w).double(), (pix // w).double()
        zeros = torch.zeros(len(n), dtype=torch.float64, device=dev)
        mu = torch.stack([zeros.index_add(0, rid, x), zeros.index_add(0, rid, y)], 1) / n[:, None]
        dx, dy = x - mu[rid, 0], y - mu[rid, 1]
        sxx, sxy, syy = (zeros.index_add(0, rid, v) / n for v in (dx * dx, dx * dy, dy * dy))
        strength = torch.full((len(n),), -torch.inf, device=dev).scatter_reduce_(0, rid, raw[owner[rid], pix], "amax")
        fit = sxx * syy - sxy**2 > min_det  # a line or a point has no ellipse (as the authors)
        per_channel = torch.bincount(owner[fit], minlength=b * c)
        keep = fit & (per_channel[owner] <= max_regions)  # a cluttered channel is skipped as a whole
        cov = torch.stack([torch.stack([sxx, sxy], 1), torch.stack([sxy, syy], 1)], 1)
        cen = mu[keep]
        half = torch.stack([sxx, syy], 1)[keep].sqrt()
        parts.append(
            {
                "image": owner[keep] // c,
                "channel": owner[keep] % c,
                "centers": cen,
                "covariances": cov[keep],
                "strengths": strength[keep],
                "boxes": torch.cat([cen - half, cen + half], 1),  # the 1-sigma ellipse's bounding box
            }
        )
    if not parts:
        z = torch.zeros
        return {
            "image": z(0, dtype=torch.long, device=dev),
            "channel": z(0, dtype=torch.long, device=dev),
            "centers": z(0, 2, dtype=torch.float64, device=dev),
            "covariances": z(0, 2, 2, dtype=torch.float64, device=dev),
            "strengths": z(0, device=dev),
            "boxes": z(0, 4, dtype=torch.float64, device=dev),
        }
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _detect_torch(
    maps: list[torch.Tensor],
    *,
    query: bool,
    scaling: str,
    mser: dict[str, Any],
    max_regions: int,
    per_channel: int,
    max_features: int,
    nms_iou: float,
) -> LocalFeatures:
    """:func:`activation_features` with ``backend="torch"``: every image and channel of a scale in one pass."""
    from torchvision.ops import nms

    dev = maps[0].device
    b, c = maps[0].shape[:2]
    chosen: list[dict[str, torch.Tensor]] = []
    for s, m in enumerate(maps):
        r = _regions_torch(m, scaling=scaling, mser=mser, max_regions=max_regions, min_det=1e-9)
        st = r["strengths"]
        keep = torch.ones(len(st), dtype=torch.bool, device=dev)
        if not query and len(st):  # NMS image by image, on the boxes in the order _detect_one gives them
            keep = torch.zeros_like(keep)
            first = 0
            for cnt in torch.bincount(r["image"], minlength=b).tolist():
                if cnt:
                    kept = nms(r["boxes"][first : first + cnt].float(), st[first : first + cnt], float(nms_iou))
                    keep[first + kept] = True
                first += cnt
        # Strongest first within each image (stable: ties keep the region order), then the per-channel cap and
        # max_features per image at this scale.
        order = torch.argsort(st, descending=True, stable=True)
        order = order[torch.argsort(r["image"][order], stable=True)]
        order = order[keep[order]]
        img, ch = r["image"][order], r["channel"][order]
        by_ch = torch.argsort(img * c + ch, stable=True)
        rank_in = torch.empty_like(by_ch)
        rank_in[by_ch] = _segment_rank((img * c + ch)[by_ch])
        order = order[rank_in < per_channel]
        order = order[_segment_rank(r["image"][order]) < max_features]
        chosen.append({k: v[order] for k, v in r.items()} | {"scale": torch.full((len(order),), s, device=dev)})
    allr = {k: torch.cat([p[k] for p in chosen]) for k in chosen[0]}
    st = allr["strengths"].float()
    order = torch.argsort(st, descending=True, stable=True)
    order = order[torch.argsort(allr["image"][order], stable=True)]
    img = allr["image"][order]
    pos = _segment_rank(img)
    order, img, pos = order[pos < max_features], img[pos < max_features], pos[pos < max_features]
    n = int(pos.max()) + 1 if len(pos) else 0
    out_dtype = torch.float64 if maps[0].dtype == torch.float64 else torch.float32

    def packed(v: torch.Tensor, fill: float | int | bool, dtype: torch.dtype) -> torch.Tensor:
        out = torch.full((b, n, *v.shape[1:]), fill, dtype=dtype, device=dev)
        out[img, pos] = v[order].to(dtype)
        return out

    sizes = torch.tensor([[list(m.shape[-2:]) for m in maps]], dtype=torch.int64, device=dev).expand(b, -1, -1)
    return LocalFeatures(
        packed(allr["centers"].float(), 0.0, out_dtype),  # float32 first, as the OpenCV path's features
        packed(allr["covariances"].float(), 0.0, out_dtype),
        packed(st, 0.0, out_dtype),
        packed(allr["channel"], -1, torch.int64),
        packed(allr["scale"], -1, torch.int64),
        torch.arange(n, device=dev)[None].expand(b, n) < torch.bincount(img, minlength=b)[:, None],
        sizes.contiguous(),
    )


def _top_by_strength(strength: torch.Tensor, keep: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` strongest among ``keep`` (stable: ties keep the earlier index)."""
    idx = keep.nonzero().flatten()
    order = torch.argsort(strength[idx], descending=True, stable=True)
    return idx[order[:k]]


def activation_features(
    A: torch.Tensor | Sequence[torch.Tensor],
    *,
    query: bool = False,
    max_features: int = 512,
    per_channel: int | None = None,
    max_regions: int = 36,
    nms_iou: float | None = None,
    delta: int = 12,
    min_area: int = 2,
    max_area: float = 0.5,
    max_variation: float = 0.5,
    min_diversity: float = 0.7,
    scaling: str = "channel",
    backend: str = "opencv",
) -> LocalFeatures:
    """Local features of activation maps: per-channel MSER ellipses (DSM's detector, section 3.3-3.4).

    For every image, scale and channel: the map is clamped at 0 and cast to 8 bits (``scaling="channel"``, the
    default: divided by the channel's own maximum and multiplied by 255, so that every channel's structure is
    found, weak channels too; ``"image"``: by the image's maximum over all channels (at that scale), so channels
    keep their relative strength, as in the authors' plain cast, and weak channels give few regions: the
    :class:`deepagg.DSM` re-ranker's default, as good and with fewer features; ``"raw"``: the
    authors' plain cast, which saturates above 255 and leaves maps of small activations flat: no region at all on
    the app's VGG16 maps, whose activations are mostly below the default delta); OpenCV's
    MSER finds regions, of which only high-activation ones are kept (:func:`mser_regions`). Each region becomes
    an ellipse with the mean and covariance of its pixel coordinates (regions with a singular covariance, a line
    or a point, are dropped, as the authors do), its strength is the largest raw activation inside it. Then, as
    the authors' code does, per image:

    1. a channel with more than ``max_regions`` regions at a scale is skipped as cluttered;
    2. database images (``query=False``): non-maximum suppression over all channels of a scale on the ellipses'
       bounding boxes (IoU ``nms_iou``, default 0.2; queries get none, so that any channel may match);
    3. at most ``per_channel`` regions per channel and scale (default 20 for queries, 10 for database images),
       the strongest;
    4. at most ``max_features`` per scale, then ``max_features`` over all scales, by strength.

    With the defaults (``delta=12``, the authors' cap; VLFeat-style ``min_diversity=0.7``, the paper's), the
    `clutter` VGG16 maps (512 px, 3 scales) give about 400 features per database image; with ``scaling="image"``
    about 120, for the same DSM ranking at a third of the matching work (``docs/dsm.md``). With the default
    ``backend="opencv"`` it runs on the CPU (OpenCV's MSER is sequential) and the features come back on ``A``'s
    device; ``backend="torch"`` runs on ``A``'s device, batched over images and channels. Exempt from
    ``torch.compile`` (detection).

    Args:
        A: Activations :math:`(C, H, W)` or :math:`(B, C, H, W)`, or a list of them, one per scale (the same images
            at decreasing resolutions, e.g. scales 1, 1/sqrt(2), 1/2).
        query: Query images (no NMS, ``per_channel`` 20) or database images (NMS, 10).
        max_features: Features kept per image over all scales (512 for VGG16 in the paper).
        per_channel: Features per channel and scale (default 20 for queries, 10 for the database).
        max_regions: Channels with more regions than this at a scale are skipped (36).
        nms_iou: NMS threshold for database images (default 0.2); ignored for queries.
        delta: MSER step (12; see :func:`mser_regions` for this and the next four).
        min_area: Smallest region in pixels (2).
        max_area: Largest region, a fraction of the map (0.5).
        max_variation: Largest area variation (0.5).
        min_diversity: VLFeat-style diversity (0.7).
        scaling: ``"channel"``, ``"image"`` or ``"raw"`` (how activations become 8-bit levels).
        backend: ``"opencv"`` (OpenCV's MSER, one channel at a time on the CPU) or ``"torch"``
            (:func:`~deepagg.functional.mser.bright_msers`: all images and channels of a scale in one pass of tensor
            ops on ``A``'s device, a GPU included, without OpenCV; the same features except where OpenCV breaks a
            tie between two children of equal size by its scan order, about 1-2 % of the regions, see
            :mod:`deepagg.functional.mser`).

    Returns:
        :class:`LocalFeatures` with ``B`` images (1 for an unbatched input), strongest first; float tensors in
        float64 for float64 maps, else float32.

    Raises:
        ShapeError: If a map is not 3-d or 4-d, or the scales differ in (B, C).
        ValueError: On a bad setting (names the argument and the value).
        ImportError: If OpenCV is not installed (says which ``pip install`` fixes it).
    """
    fn = "activation_features"
    maps, _ = _as_scale_list(A, fn)
    max_features = check_int(max_features, name="max_features", fn=fn, minimum=1)
    max_regions = check_int(max_regions, name="max_regions", fn=fn, minimum=1)
    per_channel = (
        check_int(20 if query else 10, name="per_channel", fn=fn, minimum=1)
        if per_channel is None
        else (check_int(per_channel, name="per_channel", fn=fn, minimum=1))
    )
    delta, min_area = check_mser_settings(fn, delta, min_area, max_area, max_variation, min_diversity)
    if scaling not in ("channel", "image", "raw"):
        raise ValueError(f"{fn}(): scaling must be 'channel', 'image' or 'raw'; got {scaling!r}.")
    if nms_iou is None:
        nms_iou = 0.2
    if not 0 < nms_iou <= 1:
        raise ValueError(f"{fn}(): nms_iou must be in (0, 1]; got {nms_iou}.")
    if backend not in ("opencv", "torch"):
        raise ValueError(f"{fn}(): backend must be 'opencv' or 'torch'; got {backend!r}.")
    if backend == "opencv":
        _cv2()
    from torchvision.ops import nms  # torchvision is a dependency; imported here to keep import time low

    _blocking.raise_trim_threshold()  # NumPy's region temporaries grow glibc's heap by MiBs: keep it (see there)

    mser = {
        "delta": delta,
        "min_area": min_area,
        "max_area": max_area,
        "max_variation": max_variation,
        "min_diversity": min_diversity,
    }
    if backend == "torch":
        return _detect_torch(
            maps,
            query=query,
            scaling=scaling,
            mser=mser,
            max_regions=max_regions,
            per_channel=per_channel,
            max_features=max_features,
            nms_iou=nms_iou,
        )
    device = maps[0].device
    b = maps[0].shape[0]
    sizes = torch.tensor([[list(m.shape[-2:]) for m in maps]], dtype=torch.int64)  # (1, S, 2)
    per_image: list[LocalFeatures] = []
    for i in range(b):
        parts = []
        for s, m in enumerate(maps):
            cen, cov, strength, chan, boxes = _detect_one(
                m[i], scaling=scaling, mser=mser, max_regions=max_regions, min_det=1e-9
            )
            st = torch.from_numpy(strength).float()
            ch = torch.from_numpy(chan)
            keep = torch.ones(len(st), dtype=torch.bool)
            if not query and len(st):
                kept = nms(torch.from_numpy(boxes).float(), st, float(nms_iou))
                keep = torch.zeros_like(keep).index_fill_(0, kept, True)
            # per channel: the strongest per_channel (rank within the channel by strength, stable)
            order = torch.argsort(st, descending=True, stable=True)
            order = order[keep[order]]
            ch_o = ch[order]
            by_ch = torch.argsort(ch_o, stable=True)
            rank_in = torch.empty_like(by_ch)
            sorted_ch = ch_o[by_ch]
            if len(sorted_ch):
                starts = torch.searchsorted(sorted_ch, sorted_ch, right=False)
                rank_in[by_ch] = torch.arange(len(by_ch)) - starts
            sel = order[rank_in < per_channel][:max_features]  # already strongest first
            parts.append(
                (
                    torch.from_numpy(cen).float()[sel],
                    torch.from_numpy(cov).float()[sel],
                    st[sel],
                    ch[sel],
                    torch.full((len(sel),), s, dtype=torch.int64),
                )
            )
        cen_t = torch.cat([p[0] for p in parts])
        cov_t = torch.cat([p[1] for p in parts])
        st_t = torch.cat([p[2] for p in parts])
        ch_t = torch.cat([p[3] for p in parts])
        sc_t = torch.cat([p[4] for p in parts])
        top = torch.argsort(st_t, descending=True, stable=True)[:max_features]
        k = len(top)
        per_image.append(
            LocalFeatures(
                cen_t[top][None],
                cov_t[top][None],
                st_t[top][None],
                ch_t[top][None],
                sc_t[top][None],
                torch.ones(1, k, dtype=torch.bool),
                sizes,
            )
        )
    out = LocalFeatures.cat(per_image) if per_image else LocalFeatures.empty(0, len(maps))
    out_dtype = torch.float64 if maps[0].dtype == torch.float64 else torch.float32
    return out.to(device, dtype=out_dtype)


# ------------------------------------------------------------------------------------------------- matching


@dataclasses.dataclass(frozen=True)
class SpatialMatch:
    """What :func:`spatial_match` returns for ``P`` (query, database) pairs.

    Attributes:
        inliers: :math:`(P,)` int64, inlier correspondences of the best transform (max over the scale pairs).
        transforms: :math:`(P, 2, 3)` the best upright affine ``[[a, 0, tx], [b, c, ty]]`` from query map
            coordinates to database map coordinates (NaN for a pair without any correspondence).
        scale_pairs: :math:`(P, 2)` int64 (query scale, database scale) of the best transform (-1 without one).
        matches: With ``return_matches=True``: :math:`(P, T, 2)` int64 (query feature, database feature) of the
            tentative correspondences of the best scale pair (-1 padded), else None.
        inlier_mask: With ``return_matches=True``: :math:`(P, T)` bool, which of ``matches`` are inliers.
    """

    inliers: torch.Tensor
    transforms: torch.Tensor
    scale_pairs: torch.Tensor
    matches: torch.Tensor | None = None
    inlier_mask: torch.Tensor | None = None


def _cholesky_2x2(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor ``[[l11, 0], [l21, l22]]`` of SPD 2x2 matrices (x first, so ``y`` stays vertical)."""
    l11 = cov[..., 0, 0].clamp(min=1e-12).sqrt()
    l21 = cov[..., 1, 0] / l11
    l22 = (cov[..., 1, 1] - l21 * l21).clamp(min=1e-12).sqrt()
    return l11, l21, l22


def _expand_runs(first: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``first[k], first[k] + 1, ..., first[k] + counts[k] - 1`` concatenated: ``(run of each, position)``."""
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    shift = first - (torch.cumsum(counts, 0) - counts)  # a run's first position minus where it starts in the output
    return owner, shift.index_select(0, owner) + torch.arange(len(owner), device=counts.device)


def _correspondences(q: LocalFeatures, db: LocalFeatures, pairs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tentative correspondences (same channel) of every pair: (unit, pair, query feature, database feature).

    Sorted by (pair, query scale, database scale, query feature, database feature).
    """
    dev = q.centers.device
    s = q.num_scales
    nqf = q.centers.shape[1]
    # Query features grouped by (image, channel): CSR over sorted keys.
    top_q = int(q.channels.max()) if q.channels.numel() else 0
    top_db = int(db.channels.max()) if db.channels.numel() else 0
    n_ch = max(top_q, top_db) + 1
    qkey = torch.where(q.mask, torch.arange(len(q), device=dev)[:, None] * n_ch + q.channels, -1).flatten()
    qorder = torch.argsort(qkey, stable=True)
    qkey_sorted = qkey[qorder]
    # Database features of every pair.
    # (index_select on flat indices: the fast gather, several times faster than advanced indexing on CPU)
    p_idx, j_idx = db.mask.index_select(0, pairs[:, 1]).nonzero(as_tuple=True)
    flat_db = pairs[:, 1].index_select(0, p_idx) * db.centers.shape[1] + j_idx  # into db's (B*N)
    key = pairs[:, 0].index_select(0, p_idx) * n_ch + db.channels.flatten().index_select(0, flat_db)
    if len(q) * n_ch <= _DENSE_KEYS:  # channel ids of activation maps: a dense (image, channel) table, 2 gathers
        n_keys = len(q) * n_ch
        qcount = torch.bincount(qkey_sorted + 1, minlength=n_keys + 1)[1:]  # the padding (-1) counts apart
        qstart = torch.cumsum(qcount, 0) - qcount + (qkey_sorted < 0).sum()
        lo, cnt = qstart.index_select(0, key), qcount.index_select(0, key)
    else:  # sparse ids (e.g. visual words of a large vocabulary): binary search in the sorted keys
        lo = torch.searchsorted(qkey_sorted, key, right=False)
        cnt = torch.searchsorted(qkey_sorted, key, right=True) - lo
    # Expand: database feature k of the list meets its cnt[k] query features qorder[lo[k]], qorder[lo[k] + 1], ...
    rep, pos = _expand_runs(lo, cnt)
    flat_q = qorder.index_select(0, pos)  # into q's (B*N)
    i_idx = flat_q % max(nqf, 1)
    p = p_idx.index_select(0, rep)
    j = j_idx.index_select(0, rep)
    d_scale = db.scales.flatten().index_select(0, flat_db).index_select(0, rep)
    unit = (p * s + q.scales.flatten().index_select(0, flat_q)) * s + d_scale
    # sort by unit, then query feature, then database feature (deterministic, independent of batching)
    nd = max(db.centers.shape[1], 1)
    sort_key = (unit * max(nqf, 1) + i_idx) * nd + j
    if len(pairs) * s * s * max(nqf, 1) * nd < 2**31:  # int32 keys sort about twice as fast
        sort_key = sort_key.int()
    order = torch.argsort(sort_key)  # the keys are distinct: no tie to break
    return unit.index_select(0, order), p.index_select(0, order), i_idx.index_select(0, order), j.index_select(0, order)


def spatial_match(
    q: LocalFeatures,
    db: LocalFeatures,
    pairs: torch.Tensor | None = None,
    *,
    error: float = 2.0,
    max_scale_change: float = 3.0,
    lo_iters: int = 3,
    return_matches: bool = False,
    chunk_elements: int = 1 << 20,
) -> SpatialMatch:
    r"""Fast spatial matching of ``P`` (query, database) pairs, batched (DSM section 3.5).

    For each pair and each (query scale, database scale): tentative correspondences are all pairs of features of
    the same channel. Each correspondence of ellipses :math:`(\mu_1, \Sigma_1) \to (\mu_2, \Sigma_2)` gives the
    hypothesis :math:`T = L_2 L_1^{-1}` (lower Cholesky factors, so the vertical direction is kept: 5 dof,
    ``x' = a x + t_x``, ``y' = b x + c y + t_y``) with translation :math:`\mu_2 - T \mu_1`; hypotheses whose scale
    change :math:`\sqrt{ac}` is outside ``[1/max_scale_change, max_scale_change]`` are dropped. **Every** hypothesis
    is scored (no sampling): the inliers are the correspondences with :math:`\|T \mu_q + t - \mu_{db}\| \le`
    ``error`` (pixels of the database map). The best hypothesis (most inliers, ties to the first correspondence in
    the sort order) is refined ``lo_iters`` times by least squares of the same 5-dof model on its inliers (kept only
    when it gains inliers; a fit that reflects or breaks the scale limit is refused). A pair's result is the scale
    pair with most inliers (ties to the lower (query scale, database scale)). The count is of correspondences (a
    feature may take part in several, as in many-to-many RANSAC).

    Args:
        q: Query features (one or more images).
        db: Database features.
        pairs: :math:`(P, 2)` int64 (query image, database image) indices. Default: every database image against
            the single query image (``len(q) == 1``), or image ``i`` against image ``i`` when the sizes match.
        error: Inlier threshold in pixels of the database activation map (2).
        max_scale_change: Largest scale change of a hypothesis (3).
        lo_iters: Local-optimisation rounds on the best hypothesis of every scale pair (0 turns it off).
        return_matches: Also return the correspondences of the best scale pair and their inlier mask.
        chunk_elements: Memory bound: hypotheses x correspondences scored at once.

    Returns:
        :class:`SpatialMatch`.

    Raises:
        ValueError: On bad ``pairs`` or parameters (names them).
    """
    fn = "spatial_match"
    if not isinstance(q, LocalFeatures) or not isinstance(db, LocalFeatures):
        raise TypeError(
            f"{fn}(): q and db must be LocalFeatures (from activation_features); got {type(q).__name__} and "
            f"{type(db).__name__}."
        )
    if q.num_scales != db.num_scales:
        raise ValueError(
            f"{fn}(): q and db must have the same number of scales; got {q.num_scales} and {db.num_scales}."
        )
    check_positive(error, name="error", fn=fn)
    if not max_scale_change >= 1:
        raise ValueError(f"{fn}(): max_scale_change must be >= 1; got {max_scale_change}.")
    lo_iters = check_int(lo_iters, name="lo_iters", fn=fn, minimum=0)
    dev = q.centers.device
    if pairs is None:
        if len(q) == 1:
            pairs = torch.stack(
                [torch.zeros(len(db), dtype=torch.int64, device=dev), torch.arange(len(db), device=dev)], 1
            )
        elif len(q) == len(db):
            pairs = torch.arange(len(q), device=dev)[:, None].expand(-1, 2).contiguous()
        else:
            raise ValueError(
                f"{fn}(): without pairs, q must hold one image or as many as db; got {len(q)} and {len(db)}."
            )
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype != torch.int64:
        raise ShapeError(f"{fn}(): pairs must be a (P, 2) int64 tensor; got {tuple(pairs.shape)} {pairs.dtype}.")
    if len(pairs) and (
        int(pairs[:, 0].min()) < 0
        or int(pairs[:, 0].max()) >= len(q)
        or int(pairs[:, 1].min()) < 0
        or int(pairs[:, 1].max()) >= len(db)
    ):
        raise ValueError(
            f"{fn}(): pairs must index q (0..{len(q) - 1}) and db (0..{len(db) - 1}); got query indices "
            f"{int(pairs[:, 0].min())}..{int(pairs[:, 0].max())} and database indices "
            f"{int(pairs[:, 1].min())}..{int(pairs[:, 1].max())}."
        )
    pairs = pairs.to(dev)
    db = db.to(dev)
    if dev.type == "cpu":
        _blocking.raise_trim_threshold()  # the temporaries below are a few MiB each: keep glibc's heap (see there)
    n_pairs, s = len(pairs), q.num_scales
    dtype = q.centers.dtype
    n_units = n_pairs * s * s
    best = torch.zeros(n_units, dtype=torch.int64, device=dev)
    trans = torch.full((n_units, 5), float("nan"), dtype=dtype, device=dev)  # a, b, c, tx, ty
    unit, p, i, j = _correspondences(q, db, pairs)
    # Per correspondence: coordinates and the hypothesis (flat feature indices: index_select is the fast gather).
    fq = pairs[:, 0].index_select(0, p) * q.centers.shape[1] + i
    fd = pairs[:, 1].index_select(0, p) * db.centers.shape[1] + j
    qc, dc = q.centers.reshape(-1, 2).index_select(0, fq), db.centers.reshape(-1, 2).index_select(0, fd)
    q11, q21, q22 = _cholesky_2x2(q.covariances.reshape(-1, 2, 2).index_select(0, fq))
    d11, d21, d22 = _cholesky_2x2(db.covariances.reshape(-1, 2, 2).index_select(0, fd))
    ha = d11 / q11
    hc = d22 / q22
    hb = d21 / q11 - d22 * q21 / (q11 * q22)
    scale = (ha * hc).sqrt()
    ok = (scale <= max_scale_change) & (scale >= 1.0 / max_scale_change)
    cnt = torch.bincount(unit, minlength=n_units)
    start = torch.cumsum(cnt, 0) - cnt
    present = (cnt > 0).nonzero().flatten()
    err2 = float(error) ** 2
    n_corr = len(unit)
    flat_mask = torch.zeros(n_corr, dtype=torch.bool, device=dev)
    # 1. Score every hypothesis of every unit: the squared transfer error of hypothesis h on correspondence t is
    #    <w_h, m_t> over 12 monomials of the unit-centred coordinates (centring keeps the expanded squares small in
    #    float32), so one bmm per chunk of units scores them all.
    cf = cnt.clamp(min=1).to(dtype)

    def centred(v: torch.Tensor) -> torch.Tensor:  # minus the unit's mean (correspondences are sorted by unit)
        if not n_corr:
            return v
        return v - (torch.segment_reduce(v, "sum", lengths=cnt) / cf).index_select(0, unit)

    qx, qy, dx, dy = centred(qc[:, 0]), centred(qc[:, 1]), centred(dc[:, 0]), centred(dc[:, 1])
    tx = dx - ha * qx
    ty = dy - hb * qx - hc * qy
    one = torch.ones_like(qx)
    # Row n_corr is the padding sentinel of both factors. A hypothesis outside the scale limit has a huge constant
    # term, as has the sentinel's w row, so nothing is close to them; a padded correspondence has the sentinel's
    # monomials (a huge |d|^2 term), so it is close to no hypothesis. No mask pass in the score loop.
    mono = torch.empty(n_corr + 1, 12, dtype=dtype, device=dev)
    w = torch.empty(n_corr + 1, 12, dtype=dtype, device=dev)
    mono[n_corr], w[n_corr] = 0.0, 0.0
    mono[n_corr, 0], mono[n_corr, 7], w[n_corr, 0] = 1.0, 1e30, 1e30
    torch.stack(
        [one, qx, qy, dx, dy, qx * qx, qy * qy, dx * dx + dy * dy, qx * qy, qx * dx, qx * dy, qy * dy],
        1,
        out=mono[:n_corr],
    )
    torch.stack(
        [
            torch.where(ok, tx * tx + ty * ty, 1e30),  # outside the scale limit: close to nothing
            2 * (ha * tx + hb * ty),
            2 * hc * ty,
            -2 * tx,
            -2 * ty,
            ha * ha + hb * hb,
            hc * hc,
            one,
            2 * hb * hc,
            -2 * ha,
            -2 * hb,
            -2 * hc,
        ],
        1,
        out=w[:n_corr],
    )
    chosen_h = torch.full((n_units,), n_corr, dtype=torch.int64, device=dev)  # the best hypothesis (a corr index)
    # The expanded form rounds (about 1e-3 of err2 in float32): it only ranks the hypotheses, with a margin; the
    # chosen transform's inliers are counted directly below, in float64 and raw coordinates.
    thr = err2 * (1 + 1e-3) + 1e-6
    if len(present):
        # Units padded to a few sizes (multiples of 8, then steps of 1/4), sorted by padded size, and every unit's
        # padded rows of w and mono gathered at once; then one bmm per chunk of <= chunk_elements scores of a size.
        sizes = cnt[present]
        padded = torch.where(sizes <= 32, (sizes + 7) // 8 * 8, _geometric_ceil(sizes))
        by_size = torch.argsort(padded, stable=True)
        units_sorted, t_sorted = present.index_select(0, by_size), padded.index_select(0, by_size)
        owner, pos = _expand_runs(torch.zeros_like(t_sorted), t_sorted)  # padded row -> its sorted unit, position
        row_start = torch.cumsum(t_sorted, 0) - t_sorted
        row_unit = units_sorted.index_select(0, owner)
        idx = torch.where(pos < cnt.index_select(0, row_unit), start.index_select(0, row_unit) + pos, n_corr)
        w_rows, m_rows = w.index_select(0, idx), mono.index_select(0, idx)
        size_list, n_of_size = (v.tolist() for v in torch.unique_consecutive(t_sorted, return_counts=True))
        tops, hs = [], []
        r0 = 0  # the chunk's first padded row
        for t, n_units_t in zip(size_list, n_of_size, strict=True):
            per_chunk = max(1, chunk_elements // (t * t))
            for c0 in range(0, n_units_t, per_chunk):
                k = min(per_chunk, n_units_t - c0)
                wi = w_rows[r0 : r0 + k * t].view(k, t, 12)
                mi = m_rows[r0 : r0 + k * t].view(k, t, 12)
                # (U, T hypotheses, T correspondences) scores, compared in place (1.0 = close) and summed: cheaper than
                # a new bool tensor and its sum
                top, h = torch.bmm(wi, mi.mT).le_(thr).sum(-1).max(1)  # first max
                tops.append(top)
                hs.append(h)
                r0 += k * t
        top_all, h_all = torch.cat(tops), torch.cat(hs)
        chosen_h[units_sorted] = torch.where(top_all > 0, idx.index_select(0, row_start + h_all), n_corr)
        # 2. Count the chosen transforms' inliers exactly and refine them (LO): every unit at once, on the flat list
        #    of correspondences (per-unit sums by CSR products; no padding).
        res = _refine(unit, cnt, chosen_h, qc, dc, ha, hb, hc, err2, lo_iters, max_scale_change)
        best, trans, flat_mask = res[0], res[1].to(dtype), res[2]
    per_pair = best.reshape(n_pairs, s * s)
    inl, arg = per_pair.max(1)  # first max: the lower (query scale, database scale)
    chosen = torch.arange(n_pairs, device=dev) * s * s + arg
    t5 = trans[chosen]
    none = inl == 0
    transforms = torch.stack(
        [
            torch.stack([t5[:, 0], torch.zeros_like(t5[:, 0]), t5[:, 3]], 1),
            torch.stack([t5[:, 1], t5[:, 2], t5[:, 4]], 1),
        ],
        1,
    )
    transforms = torch.where(none[:, None, None], torch.full_like(transforms, float("nan")), transforms)
    sp = torch.stack([arg // s, arg % s], 1)
    sp = torch.where(none[:, None], torch.full_like(sp, -1), sp)
    matches: torch.Tensor | None = None
    mask_out: torch.Tensor | None = None
    if return_matches:
        # The correspondences of each pair's chosen unit (none without inliers), gathered padded in one go.
        n_chosen = torch.where(none, torch.zeros_like(inl), cnt[chosen])
        width = int(n_chosen.max()) if n_pairs else 0
        r = torch.arange(width, device=dev)
        ok_m = r[None] < n_chosen[:, None]
        k_idx = torch.where(ok_m, start[chosen][:, None] + r[None], 0).clamp(max=max(n_corr - 1, 0))
        if n_corr:
            matches = torch.where(ok_m[..., None], torch.stack([i[k_idx], j[k_idx]], -1), -1)
            mask_out = flat_mask[k_idx] & ok_m
        else:
            matches = torch.full((n_pairs, width, 2), -1, dtype=torch.int64, device=dev)
            mask_out = torch.zeros(n_pairs, width, dtype=torch.bool, device=dev)
    return SpatialMatch(inl, transforms, sp, matches, mask_out)


def _geometric_ceil(n: torch.Tensor) -> torch.Tensor:
    """The smallest padded unit size >= ``n``: 32 * 1.25^k rounded up (steps of a quarter)."""
    top = int(n.max()) if n.numel() else 32
    sizes = [32]
    while sizes[-1] < top:
        sizes.append(math.ceil(sizes[-1] * 1.25))
    table = torch.tensor(sizes, dtype=n.dtype, device=n.device)
    return table[torch.searchsorted(table, n)]


def _refine(
    unit: torch.Tensor,
    cnt: torch.Tensor,
    h: torch.Tensor,
    qc: torch.Tensor,
    dc: torch.Tensor,
    ha: torch.Tensor,
    hb: torch.Tensor,
    hc: torch.Tensor,
    err2: float,
    lo_iters: int,
    max_scale_change: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact inlier counts, LO-refined transforms and inlier masks of each unit's chosen hypothesis.

    ``h``: :math:`(U,)` the chosen hypothesis as a correspondence index (``len(qc)`` = none). Returns counts
    :math:`(U,)`, transforms :math:`(U, 5)` (a, b, c, tx, ty; NaN without one) and the mask :math:`(K,)` over the
    correspondences. Float64, raw coordinates. The sums over each unit's inliers are one CSR product: row ``u`` of a
    ``(U, K)`` matrix holds unit ``u``'s correspondences (they are sorted by unit) with the inlier mask as values,
    so every sum of a unit is taken in the same order whatever else is in the batch.
    """
    n, n_units = len(qc), len(cnt)
    start = torch.cumsum(cnt, 0) - cnt  # each unit's first correspondence (they are sorted by unit)
    has = h < n
    hs = h.clamp(max=max(n - 1, 0))
    rqx, rqy, rdx, rdy = (v.double().contiguous() for v in (qc[:, 0], qc[:, 1], dc[:, 0], dc[:, 1]))
    a, b, c = (v.index_select(0, hs).double() for v in (ha, hb, hc))
    tx = rdx.index_select(0, hs) - a * rqx.index_select(0, hs)
    ty = rdy.index_select(0, hs) - b * rqx.index_select(0, hs) - c * rqy.index_select(0, hs)
    nan = torch.full_like(a, float("nan"))
    params = torch.where(has[:, None], torch.stack([a, b, c, tx, ty], 1), nan[:, None])
    coords: tuple[torch.Tensor, ...] = (rqx, rqy, rdx, rdy)

    def unit_sums(weights: torch.Tensor, v: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(U, F): the sum of ``weights * v`` over each unit's correspondences (``counts`` per unit, in order)."""
        crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        col = torch.arange(len(weights), device=weights.device)
        with _silence_csr_beta_ctx():
            m = torch.sparse_csr_tensor(crow, col, weights.double(), (len(counts), len(weights)))
        return m @ v

    def inliers_of(p: torch.Tensor, owner: torch.Tensor, xy: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Which correspondences (coordinates ``xy``, of units ``owner``) transfer within ``error`` under ``p``."""
        pa, pb, pc, ptx, pty = (v.contiguous().index_select(0, owner) for v in p.unbind(1))
        x, y, u, v = xy
        ex = pa * x + ptx - u
        ey = pb * x + pc * y + pty - v
        return ex * ex + ey * ey <= err2  # NaN parameters: False

    # The 11 monomials whose sums over a unit's inliers give its least-squares fit, in coordinates about the unit's
    # centroid (all its correspondences; fixed), so the one-pass second moments below keep float64's precision.
    ones = torch.ones_like(rqx)
    centroid = unit_sums(ones, torch.stack(coords, 1), cnt) / cnt.clamp(min=1)[:, None].double()  # (U, 4)
    x, y, u, v = (t - m.index_select(0, unit) for t, m in zip(coords, centroid.unbind(1), strict=True))
    mono = torch.stack([ones, x, y, u, v, x * x, x * y, y * y, x * u, x * v, y * v], 1)

    mask = inliers_of(params, unit, coords)
    sums = unit_sums(mask, mono, cnt)  # (U, 11); column 0 counts the inliers
    best_cnt = sums[:, 0].round().long()
    # LO rounds. A fit depends only on the unit's inlier set, so a unit that did not gain in a round would fit the
    # same again: after the first round only the units that gained are refitted, on their own correspondences.
    act = torch.arange(n_units, device=qc.device)  # the units refitted this round
    sub: torch.Tensor | None = None  # their correspondences (None: all)
    owner, xy, mono_a, cnt_a = unit, coords, mono, cnt
    for _ in range(lo_iters):
        cand = _fit_moments(sums.index_select(0, act), centroid.index_select(0, act))
        ca, cc = cand[:, 0], cand[:, 2]
        sc = (ca * cc).clamp(min=0).sqrt()
        good = (ca > 0) & (cc > 0) & (sc <= max_scale_change) & (sc >= 1.0 / max_scale_change) & cand.isfinite().all(1)
        cmask = inliers_of(cand, owner, xy)
        csums = unit_sums(cmask, mono_a, cnt_a)
        ccnt = csums[:, 0].round().long()
        better = good & (ccnt > best_cnt.index_select(0, act))
        if not bool(better.any()):
            break
        won = act[better]
        best_cnt = best_cnt.index_copy(0, won, ccnt[better])
        params = params.index_copy(0, won, cand[better])
        sums = sums.index_copy(0, won, csums[better])
        keep = better.index_select(0, owner)  # the correspondences of the units that gained
        mask = torch.where(keep, cmask, mask) if sub is None else mask.index_copy(0, sub[keep], cmask[keep])
        # Next round: the units that gained, and their correspondences (contiguous runs, in order).
        act, cnt_a = won, cnt.index_select(0, won)
        owner, sub = _expand_runs(start.index_select(0, won), cnt_a)
        xy = tuple(t.index_select(0, sub) for t in coords)
        mono_a = mono.index_select(0, sub)
    return best_cnt, params, mask


def _fit_moments(sums: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
    """Least squares of ``x' = a x + tx``, ``y' = b x + c y + ty`` per unit, from the sums of its inliers.

    ``sums`` :math:`(U, 11)`: the sums of 1, x, y, u, v, xx, xy, yy, xu, xv, yv over each unit's inliers, in
    coordinates about ``centroid`` :math:`(U, 4)` (query x, y; database x = u, y = v). Returns :math:`(U, 5)` (a, b,
    c, tx, ty) in raw coordinates. NaN where degenerate: fewer than 3 inliers, or points on a line (no x or y
    spread, or a relative determinant below 1e-9; float64).
    """
    sw, sx, sy, su, sv, sxx, sxy, syy, sxu, sxv, syv = sums.unbind(1)
    w = sw.clamp(min=1e-12)
    mx, my, mu, mv = sx / w, sy / w, su / w, sv / w
    sxx, sxy, syy = sxx - sx * mx, sxy - sx * my, syy - sy * my  # second moments about the inliers' means
    sxu, sxv, syv = sxu - sx * mu, sxv - sx * mv, syv - sy * mv
    nan = torch.full_like(sxx, float("nan"))
    a = torch.where(sxx > 1e-9, sxu / sxx.clamp(min=1e-12), nan)
    det = sxx * syy - sxy * sxy
    okd = (det > 1e-9 * (sxx * syy).clamp(min=1e-12)) & (syy > 1e-9) & (sw >= 3)
    b = torch.where(okd, (sxv * syy - syv * sxy) / det.clamp(min=1e-12), nan)
    c = torch.where(okd, (syv * sxx - sxv * sxy) / det.clamp(min=1e-12), nan)
    cx, cy, cu, cv = centroid.unbind(1)
    tx = mu + cu - a * (mx + cx)
    ty = mv + cv - b * (mx + cx) - c * (my + cy)
    return torch.stack([a, b, c, tx, ty], 1)
