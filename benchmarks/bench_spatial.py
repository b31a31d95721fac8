r"""Deep spatial matching (DSM): batched ``spatial_match`` vs a per-pair loop and OpenCV RANSAC; detector time.

``python -m benchmarks.bench_spatial [--pairs 100] [--features 512] [--scales 3] [--repeats 11] [--real]
[--scaling channel|image|raw] [--device cpu|cuda] [--threads N] [--profile] [--json F] [--no-heap-nudge] [--quick]``.

**Inputs: one query and ``--pairs`` database images, ``--features`` local features each** (default 512, the
paper's cap for VGG16), over ``--scales`` scales (factors 1, 1/sqrt(2), 1/2; maps of 24 x 32, VGG16's conv5 map
of a 768 x 1024 image, and 16 x 22, 12 x 16, what ``F.interpolate`` makes of it). Synthetic by default, shaped
like the features ``activation_features`` finds on real VGG16 maps:

- the features of a scale are proportional to its map area (57 / 29 / 14 % at 3 scales; real maps: 56 / 30 / 14);
- each image draws its channels from its own random set of ``channels_per_image`` (300) of the 512 channels, so
  a channel holds 1-3 features at a scale (about 1.7 over all scales) and a (query, database) pair has about 530
  tentative correspondences (same channel, any scale pair) over the 3 x 3 scale pairs (``--real``: about 520);
- centres uniform in the map of the feature's scale; covariances random SPD with eigenvalues in [1, 6] px^2 and a
  uniform orientation (real detections are smaller, median 0.5 px^2; the size only enters the hypotheses);
- a fraction ``--positives`` (0.2) of the database images are true warps of the query: an upright affine map
  (scale in [0.8, 1.25], aspect in [0.9, 1.1], shear in [-0.1, 0.1], a shift of up to 3 px) takes a random
  5-30 % of the query's features (same channel and scale, centre noise 0.25 px, the covariance mapped by the
  transform and perturbed by 10 %) into the database image, the rest of which is drawn as above. So inlier
  counts differ between pairs (the case text gives the mean over positives and negatives).

``--real`` takes the features from real activation maps instead (the app's cached VGG16 maps): the first
``--pairs`` + 1 files (sorted by path) under ``~/.cache/deepagg/data/features`` whose ``torch.load`` is a ``(512,
H, W)`` tensor with ``max(H, W) = 32`` (a full-size image; 24 x 32, 21 x 32, 32 x 24, ...), the first as the query;
3 scales by ``F.interpolate`` (bilinear) at 1, 1/sqrt(2), 1/2; ``activation_features(query=True)`` for the query
and ``query=False`` for the database (fewer than 512 features per database image: NMS). Skipped, with a line saying
so, when there are not enough such files. The database images are unrelated to the query (a cache of random
images), so all pairs are negatives. ``--scaling`` sets ``activation_features``' 8-bit levels here and in the
detector rows (default ``channel``, the function's default; the ``DSM`` re-ranker uses ``image``, which finds fewer
features on weak channels).

**Rows** (median of ``--repeats`` runs after one warm-up, a third as many for the loops and the detector; IQR in
brackets; torch on every core unless ``--threads``, the count is printed):

- ``batched vs per-pair loop``: ``spatial_match(q, db)`` over all pairs at once against ``spatial_match(q, db[k])``
  for each ``k`` (the same algorithm one pair at a time). Max abs diff: the largest difference of the inlier
  counts (the batched matcher is deterministic and independent of batching: 0).
- ``batched vs OpenCV RANSAC``: against ``cv2.estimateAffine2D(src, dst, method=cv2.RANSAC,
  ransacReprojThreshold=2.0)`` (6-dof affine from 3-point samples, OpenCV's defaults: at most 2000 iterations,
  confidence 0.99, 10 refinement iterations) on the centres of the same tentative correspondences, one call per
  pair and (query scale, database scale) with at least 3 correspondences (fewer: no call, 0 inliers). Only the
  calls are timed; building the correspondences (a per-pair NumPy equality join on the channels, as a user of
  OpenCV would) is timed separately and given in the case text. The results differ by design (sampled vs
  exhaustive, 6 vs 5 dof): the diff column compares nothing; the case text gives both mean inlier counts.
- ``activation_features, query`` / ``database``: the detector on one ``(512, 24, 32)`` map at 3 scales (the first
  real map of that shape when the files exist, otherwise a synthetic map of Gaussian blobs), ms per image,
  against OpenCV's bare ``MSER.detectRegions`` on the same 8-bit channels with the same parameters (the floor of
  the detector: the rest is the high-activation filter, the diversity rule, the ellipse fits, NMS and the caps).
- ``activation_features backend=torch``: the batched torch MSER (``deepagg.functional.mser``) on the same map, one
  image per call and 8 copies of it per call (its 256 level steps are paid once per call), ms per image, against
  the OpenCV backend on one image; the diff column is the fraction of the OpenCV backend's features that the torch
  backend does not find (OpenCV breaks ties between equal-size children by its scan order). With ``--device
  cuda`` also 8 images per call on the GPU.
- ``--device cuda``: the batched matcher on the GPU (synchronised) against the CPU's batched time; max abs diff:
  inlier counts against the CPU. Says so and skips when CUDA is unavailable.

After the table: the mean tentative correspondences per pair, the targets of the issue (<= 50 ms per query on
2 cores, stretch 25 ms; at least 20x the per-pair loop) as met / not met, and the thread counts. ``--profile``
also prints where the batched matcher's time goes: ``torch.profiler`` (top operators by self CPU time) and
``cProfile`` (top functions by own time) over one call.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import math
import os
import pstats
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deepagg.functional import _blocking
from deepagg.functional.spatial import LocalFeatures, activation_features, spatial_match

C, H, W = 512, 24, 32
SEED = 0
TARGET_MS, STRETCH_MS, TARGET_LOOP = 50.0, 25.0, 20.0
ERROR = 2.0
FEATURE_DIR = Path("~/.cache/deepagg/data/features").expanduser()
# activation_features' MSER defaults (for the bare-OpenCV reference of the detector rows)
MSER = {"delta": 12, "min_area": 2, "max_area": 0.5, "max_variation": 0.5, "min_diversity": 0.0}


Image = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # centres, covariances, channels, scales


def _cv2() -> Any:
    import cv2

    return cv2


# ------------------------------------------------------------------------------------------------------- data


def scale_factors(n_scales: int) -> list[float]:
    return [2.0 ** (-s / 2) for s in range(n_scales)]


def map_sizes(n_scales: int, h: int = H, w: int = W) -> list[tuple[int, int]]:
    """``(H, W)`` per scale, as ``F.interpolate(scale_factor=f)`` gives them (floor)."""
    return [(math.floor(h * f), math.floor(w * f)) for f in scale_factors(n_scales)]


def _random_cov(n: int, g: torch.Generator) -> torch.Tensor:
    """``(n, 2, 2)`` SPD: eigenvalues uniform in [1, 6] px^2, uniform orientation."""
    ev = 1.0 + 5.0 * torch.rand(n, 2, generator=g)
    th = math.pi * torch.rand(n, generator=g)
    rot = torch.stack([torch.stack([th.cos(), -th.sin()], 1), torch.stack([th.sin(), th.cos()], 1)], 1)
    return rot @ torch.diag_embed(ev) @ rot.mT


def _random_image(n: int, n_scales: int, channels_per_image: int, g: torch.Generator) -> Image:
    """``n`` features of one image: (centres (n, 2), covariances (n, 2, 2), channels (n,), scales (n,))."""
    sizes = map_sizes(n_scales)
    area = torch.tensor([float(h * w) for h, w in sizes])
    scales = torch.multinomial(area / area.sum(), n, replacement=True, generator=g) if n else torch.zeros(0).long()
    chan_set = torch.randperm(C, generator=g)[: min(channels_per_image, C)]
    channels = chan_set[torch.randint(len(chan_set), (n,), generator=g)]
    hw = torch.tensor(sizes, dtype=torch.float32)[scales]  # (n, 2) (H, W)
    centres = torch.rand(n, 2, generator=g) * (hw.flip(1) - 1)  # (x, y) in [0, W-1] x [0, H-1]
    return centres, _random_cov(n, g), channels, scales


def _pack(images: Sequence[Image], n_scales: int) -> LocalFeatures:
    """Per-image (centres, covariances, channels, scales) as padded LocalFeatures (strongest first: random)."""
    b, n = len(images), max(len(im[0]) for im in images)
    out = LocalFeatures(
        torch.zeros(b, n, 2),
        torch.zeros(b, n, 2, 2),
        torch.zeros(b, n),
        torch.full((b, n), -1, dtype=torch.int64),
        torch.full((b, n), -1, dtype=torch.int64),
        torch.zeros(b, n, dtype=torch.bool),
        torch.tensor(map_sizes(n_scales), dtype=torch.int64)[None].expand(b, -1, -1).contiguous(),
    )
    for i, (cen, cov, ch, sc) in enumerate(images):
        k = len(cen)
        out.centers[i, :k], out.covariances[i, :k], out.channels[i, :k], out.scales[i, :k] = cen, cov, ch, sc
        out.strengths[i, :k] = torch.sort(torch.rand(k), descending=True).values
        out.mask[i, :k] = True
    return out


def synthetic_features(
    pairs: int,
    features: int,
    n_scales: int,
    *,
    positives: float = 0.2,
    channels_per_image: int = 300,
    seed: int = SEED,
) -> tuple[LocalFeatures, LocalFeatures, torch.Tensor]:
    """``(query (1 image), database (pairs images), which database images are warps of the query)``."""
    g = torch.Generator().manual_seed(seed)
    q = _random_image(features, n_scales, channels_per_image, g)
    qc, qcov, qch, qs = q
    f = torch.tensor(scale_factors(n_scales))
    sizes = torch.tensor(map_sizes(n_scales), dtype=torch.float32)
    n_pos = round(positives * pairs)
    is_pos = torch.zeros(pairs, dtype=torch.bool)
    is_pos[torch.randperm(pairs, generator=g)[:n_pos]] = True
    db: list[Image] = []
    for k in range(pairs):
        if not is_pos[k]:
            db.append(_random_image(features, n_scales, channels_per_image, g))
            continue
        u = torch.rand(6, generator=g)
        sigma = math.exp(math.log(0.8) + (math.log(1.25) - math.log(0.8)) * float(u[0]))
        aspect = 0.9 + 0.2 * float(u[1])
        a, c, b = sigma * math.sqrt(aspect), sigma / math.sqrt(aspect), -0.1 + 0.2 * float(u[2])
        m = torch.tensor([[a, 0.0], [b, c]])
        shift = (torch.rand(2, generator=g) * 6 - 3).tolist()
        share = 0.05 + 0.25 * float(u[3])
        pick = torch.randperm(features, generator=g)[: round(share * features)]
        fs, hw = f[qs[pick]], sizes[qs[pick]]
        mid = (hw.flip(1) - 1) / 2  # the map centre stays about in place
        cen = (qc[pick] - mid) @ m.T + mid + torch.tensor(shift) * fs[:, None]
        cen += 0.25 * torch.randn(cen.shape, generator=g)
        lq = torch.linalg.cholesky(qcov[pick])
        noise = torch.eye(2) + 0.1 * torch.randn(len(pick), 2, 2, generator=g)
        lw = m @ lq @ noise
        inside = ((cen >= 0) & (cen <= hw.flip(1) - 1)).all(1)
        warped = (cen[inside], (lw @ lw.mT)[inside], qch[pick][inside], qs[pick][inside])
        rest = _random_image(features - int(inside.sum()), n_scales, channels_per_image, g)
        cen_, cov_, ch_, sc_ = (torch.cat([x, y]) for x, y in zip(warped, rest, strict=True))
        db.append((cen_, cov_, ch_, sc_))
    return _pack([q], n_scales), _pack(db, n_scales), is_pos


def real_maps(
    n: int, directory: Path | None = None, *, size: tuple[int, int] | None = None, longest: int | None = W
) -> list[torch.Tensor]:
    """The first ``n`` ``(512, H, W)`` tensors among the ``.pt`` files under ``directory`` (sorted paths).

    Only maps with ``(H, W) == size`` when given, and with ``max(H, W) == longest`` (32: the maps of full-size
    1024-pixel images; the cache also holds the maps of the same images at smaller scales) when given.
    """
    out: list[torch.Tensor] = []
    directory = FEATURE_DIR if directory is None else directory
    if not directory.is_dir():
        return out
    for path in sorted(directory.rglob("*.pt")):
        try:
            x = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # anything unreadable is not a feature map
            continue
        if (
            isinstance(x, torch.Tensor)
            and x.ndim == 3
            and x.shape[0] == C
            and x.is_floating_point()
            and (size is None or tuple(x.shape[1:]) == size)
            and (longest is None or max(x.shape[1:]) == longest)
        ):
            out.append(x.float())
            if len(out) == n:
                break
    return out


def pyramid(a: torch.Tensor, n_scales: int) -> list[torch.Tensor]:
    """``(C, H, W)`` at scales 1, 1/sqrt(2), 1/2, ... (bilinear)."""
    return [a] + [
        F.interpolate(a[None], scale_factor=f, mode="bilinear", align_corners=False)[0]
        for f in scale_factors(n_scales)[1:]
    ]


def synthetic_map(channels: int = C, h: int = H, w: int = W, seed: int = SEED) -> torch.Tensor:
    """A ReLU-like activation map: 60 % of the channels hold 1-4 Gaussian blobs (sigma 0.7-3 px) plus noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    out = torch.zeros(channels, h, w)
    for c in range(channels):
        if float(torch.rand(1, generator=g)) > 0.6:
            continue
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            cx, cy = float(torch.rand(1, generator=g)) * (w - 1), float(torch.rand(1, generator=g)) * (h - 1)
            s = 0.7 + 2.3 * float(torch.rand(1, generator=g))
            amp = 0.5 + 4.0 * float(torch.rand(1, generator=g))
            out[c] += amp * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    out += 0.1 * torch.randn(out.shape, generator=g)
    return out.clamp(min=0)


# ------------------------------------------------------------------------------------------------ references


def opencv_units(q: LocalFeatures, db: LocalFeatures) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per pair, per (query scale, database scale) with correspondences: (query centres, database centres).

    The tentative correspondences of ``spatial_match``: every (query feature, database feature) of the same
    channel, split by the two features' scales; a NumPy equality join per pair.
    """
    s = q.num_scales
    mq = q.mask[0].numpy()
    qch, qsc, qcen = q.channels[0].numpy()[mq], q.scales[0].numpy()[mq], q.centers[0].numpy()[mq]
    out = []
    for k in range(len(db)):
        md = db.mask[k].numpy()
        dch, dsc, dcen = db.channels[k].numpy()[md], db.scales[k].numpy()[md], db.centers[k].numpy()[md]
        i, j = np.nonzero(qch[:, None] == dch[None, :])
        unit = qsc[i] * s + dsc[j]
        units = []
        for u in range(s * s):
            sel = unit == u
            if sel.any():
                units.append((np.ascontiguousarray(qcen[i[sel]]), np.ascontiguousarray(dcen[j[sel]])))
        out.append(units)
    return out


def opencv_ransac(units: list[list[tuple[np.ndarray, np.ndarray]]]) -> np.ndarray:
    """Inliers per pair: the most over its scale pairs of ``cv2.estimateAffine2D``'s RANSAC (threshold 2 px)."""
    cv2 = _cv2()
    best = np.zeros(len(units), dtype=np.int64)
    for k, pair in enumerate(units):
        for src, dst in pair:
            if len(src) < 3:  # no affine hypothesis: 0 inliers
                continue
            model, inl = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=ERROR)
            if model is not None:
                best[k] = max(best[k], int(inl.sum()))
    return best


def bare_mser(maps: list[torch.Tensor], scaling: str = "channel") -> int:
    """OpenCV's ``MSER.detectRegions`` on every 8-bit channel (levels as ``activation_features``'s): regions found."""
    cv2 = _cv2()
    found = 0
    for m in maps:
        a = m.clamp(min=0)
        if scaling == "raw":
            u8 = a.round().clamp(max=255).to(torch.uint8)
        else:
            top = a.amax(dim=(1, 2), keepdim=True) if scaling == "channel" else a.amax().reshape(1, 1, 1)
            u8 = torch.where(top > 0, a / top.clamp(min=1e-30) * 255.0, torch.zeros_like(a)).round().to(torch.uint8)
        u8n = u8.numpy()
        h, w = u8n.shape[1:]
        mser = cv2.MSER_create(
            delta=MSER["delta"],
            min_area=MSER["min_area"],
            max_area=max(MSER["min_area"] + 1, int(MSER["max_area"] * h * w)),
            max_variation=MSER["max_variation"],
            min_diversity=MSER["min_diversity"],
        )
        for c in np.flatnonzero(u8n.reshape(len(u8n), -1).max(1) > 0):
            found += len(mser.detectRegions(u8n[c])[0])
    return found


# ------------------------------------------------------------------------------------------------------ timing


def timed(fn: Callable[[], Any], repeats: int, sync: bool = False) -> tuple[float, float, Any]:
    """``(median ms, IQR ms, result)`` over ``repeats`` runs after one warm-up run (which gives the result)."""

    def once() -> Any:
        out = fn()
        if sync:
            torch.cuda.synchronize()
        return out

    result = once()
    ts = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        once()
        ts.append((time.perf_counter() - t0) * 1e3)
    q1, med, q3 = np.percentile(ts, [25, 50, 75])
    return float(med), float(q3 - q1), result


def row(
    case: str,
    shape: str,
    ours: tuple[float, float],
    ref: tuple[float, float],
    diff: float,
    reference: str,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "bench": "spatial",
        "case": case,
        "shape": shape,
        "ours_ms": ours[0],
        "ours_iqr_ms": ours[1],
        "ref_ms": ref[0],
        "ref_iqr_ms": ref[1],
        "ratio": ref[0] / ours[0],
        "max_abs_diff": diff,
        "reference": reference,
        **extra,
    }


# --------------------------------------------------------------------------------------------------------- rows


def inputs(
    pairs: int, features: int, n_scales: int, real: bool, positives: float, scaling: str = "channel"
) -> tuple[LocalFeatures, LocalFeatures, torch.Tensor, str]:
    """``(query, database, positives mask, source label)``: real maps with ``real`` (when found), else synthetic."""
    if real:
        maps = real_maps(1 + pairs)
        if len(maps) < 1 + pairs:
            print(
                f"bench_spatial --real: {len(maps)} (512, H, W) feature maps with max(H, W) = {W} under "
                f"{FEATURE_DIR}, {1 + pairs} needed; real inputs skipped, synthetic features used",
                flush=True,
            )
        else:
            kw: dict[str, Any] = {"max_features": features, "scaling": scaling}
            q = activation_features(pyramid(maps[0], n_scales), query=True, **kw)
            db = LocalFeatures.cat([activation_features(pyramid(m, n_scales), query=False, **kw) for m in maps[1:]])
            return q, db, torch.zeros(pairs, dtype=torch.bool), f"real maps, scaling={scaling}"
    q, db, pos = synthetic_features(pairs, features, n_scales, positives=positives)
    return q, db, pos, "synthetic"


def matcher_rows(
    q: LocalFeatures, db: LocalFeatures, pos: torch.Tensor, source: str, repeats: int, device: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The matcher rows and the numbers printed under the table."""
    p, s = len(db), q.num_scales
    units = opencv_units(q, db)
    n_corr = np.array([sum(len(u[0]) for u in pair) for pair in units], dtype=np.float64)
    shape = f"P={p} N={q.centers.shape[1]} S={s} ({source})"
    spatial_match(q, db)  # the heap's first growth, so that the faults below are those of every call
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    batched_ms, batched_iqr, res = timed(lambda: spatial_match(q, db), repeats)
    # minor page faults per batched call: the allocator's cost, see _blocking.raise_trim_threshold
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / (max(1, repeats) + 1)
    inl = res.inliers
    singles = [db[k] for k in range(p)]
    loop_repeats = max(1, repeats // 3)
    loop_ms, loop_iqr, loop_inl = timed(lambda: torch.cat([spatial_match(q, d).inliers for d in singles]), loop_repeats)
    diff = float((loop_inl - inl).abs().max()) if p else 0.0
    if diff != 0:
        raise RuntimeError(f"bench_spatial: batched and per-pair inlier counts differ by up to {diff}")

    def mean(x: torch.Tensor | np.ndarray, sel: torch.Tensor) -> float:
        v = np.asarray(x, dtype=np.float64)[sel.numpy()]
        return float(v.mean()) if len(v) else float("nan")

    inl_txt = f"inliers pos / neg {mean(inl, pos):.1f} / {mean(inl, ~pos):.1f}" if bool(pos.any()) else ""
    rows = [
        row(
            f"spatial_match batched vs per-pair loop ({batched_ms / max(p, 1):.2f} ms/pair; "
            f"loop {loop_ms / max(p, 1):.2f} ms/pair)",
            shape,
            (batched_ms, batched_iqr),
            (loop_ms, loop_iqr),
            diff,
            f"spatial_match(q, db[k]) for each of the {p} pairs; diff: inlier counts",
        )
    ]
    _cv2().setRNGSeed(SEED)
    build_ms, build_iqr, _ = timed(lambda: opencv_units(q, db), loop_repeats)
    cv_ms, cv_iqr, cv_inl = timed(lambda: opencv_ransac(units), loop_repeats)
    calls = sum(len(u[0]) >= 3 for pair in units for u in pair)
    cv_txt = (
        f"OpenCV inliers pos / neg {mean(cv_inl, pos):.1f} / {mean(cv_inl, ~pos):.1f}"
        if bool(pos.any())
        else f"inliers ours / OpenCV {float(inl.double().mean()):.1f} / {float(cv_inl.mean()):.1f}"
    )
    rows.append(
        row(
            f"spatial_match batched vs OpenCV RANSAC ({calls} calls; correspondence build {build_ms:.0f} ms "
            f"not timed in; {inl_txt + '; ' if inl_txt else ''}{cv_txt})",
            shape,
            (batched_ms, batched_iqr),
            (cv_ms, cv_iqr),
            0.0,
            "cv2.estimateAffine2D RANSAC 2 px per pair and scale pair (results differ by design: not compared)",
            opencv_build_ms=build_ms,
            opencv_build_iqr_ms=build_iqr,
            opencv_calls=calls,
        )
    )
    if device == "cuda":
        if not torch.cuda.is_available():
            print("bench_spatial --device cuda: CUDA is not available; the GPU row is skipped", flush=True)
        else:
            qg, dbg = q.to("cuda"), db.to("cuda")
            g_ms, g_iqr, g_res = timed(lambda: spatial_match(qg, dbg), repeats, sync=True)
            g_diff = float((g_res.inliers.cpu() - inl).abs().max()) if p else 0.0
            rows.append(
                row(
                    f"spatial_match batched on {torch.cuda.get_device_name()} vs batched on the CPU",
                    shape,
                    (g_ms, g_iqr),
                    (batched_ms, batched_iqr),
                    g_diff,
                    "the same call on the CPU; diff: inlier counts",
                )
            )
    info = {
        "pairs": p,
        "batched_ms": batched_ms,
        "loop_ratio": loop_ms / batched_ms,
        "opencv_ratio": cv_ms / batched_ms,
        "q_features": int(q.counts()[0]),
        "db_features": float(db.counts().double().mean()) if p else 0.0,
        "corr_mean": float(n_corr.mean()) if p else 0.0,
        "corr_pos": float(n_corr[pos.numpy()].mean()) if bool(pos.any()) else float("nan"),
        "corr_neg": float(n_corr[~pos.numpy()].mean()) if bool((~pos).any()) else float("nan"),
        "page_faults_per_call": faults,
    }
    return rows, info


def feature_keys(f: LocalFeatures, i: int) -> set[tuple[int, int, float, float]]:
    """Image ``i``'s features as (channel, scale, centre x, centre y) rounded to 1e-4 px."""
    k = int(f.counts()[i])
    cen = (f.centers[i, :k].double().cpu() * 1e4).round().tolist()
    chans, scales = f.channels[i, :k].tolist(), f.scales[i, :k].tolist()
    return {(int(c), int(s), x, y) for c, s, (x, y) in zip(chans, scales, cen, strict=True)}


def missed(ours: LocalFeatures, ref: LocalFeatures) -> float:
    """Fraction of ``ref``'s features (all images) that ``ours`` does not have."""
    total = int(ref.counts().sum())
    same = sum(len(feature_keys(ours, i) & feature_keys(ref, i)) for i in range(len(ref)))
    return 1.0 - same / max(1, total)


def detector_rows(
    channels: int, n_scales: int, repeats: int, scaling: str = "channel", device: str = "cpu", batch: int = 8
) -> list[dict[str, Any]]:
    """``activation_features`` on one map at ``n_scales`` scales (query and database settings) vs bare MSER; the
    torch backend against the OpenCV backend, on one image and on ``batch`` images at once (and on CUDA)."""
    maps = real_maps(1, size=(H, W)) if channels == C else []
    source = "real map" if maps else "synthetic map"
    a = maps[0] if maps else synthetic_map(channels)
    levels = pyramid(a, n_scales)
    shape = f"{tuple(a.shape)} x {n_scales} scales ({source}, scaling={scaling})"
    mser_ms, mser_iqr, regions = timed(lambda: bare_mser(levels, scaling), repeats)
    rows = []
    opencv: dict[bool, tuple[float, float, LocalFeatures]] = {}
    for query in (True, False):
        ms, iqr, feats = timed(functools.partial(activation_features, levels, query=query, scaling=scaling), repeats)
        opencv[query] = (ms, iqr, feats)
        rows.append(
            row(
                f"activation_features, {'query' if query else 'database'} ({int(feats.counts()[0])} features of "
                f"{regions} MSER regions)",
                shape,
                (ms, iqr),
                (mser_ms, mser_iqr),
                0.0,
                "cv2 MSER.detectRegions on the same 8-bit channels (the detector's floor; not compared)",
            )
        )
    # backend="torch": the batched torch MSER, one image and `batch` images (the same map) per call; ms per image.
    # The diff column: the fraction of the OpenCV backend's features it does not find (ties OpenCV breaks by its
    # scan order, deepagg.functional.mser).
    stacked = [torch.stack([m] * batch) for m in levels]
    runs: list[tuple[str, list[torch.Tensor], int, bool]] = [("1 image", levels, 1, False)]
    runs.append((f"{batch} images per call", stacked, batch, False))
    if device == "cuda":
        if torch.cuda.is_available():
            gpu = f"{batch} images per call on {torch.cuda.get_device_name()}"
            runs.append((gpu, [m.cuda() for m in stacked], batch, True))
        else:
            print("bench_spatial --device cuda: CUDA is not available; the GPU detector row is skipped", flush=True)
    for query in (True, False):
        ref_ms, ref_iqr, ref = opencv[query]
        for label, inp, n, sync in runs:
            ms, iqr, feats = timed(
                functools.partial(activation_features, inp, query=query, scaling=scaling, backend="torch"),
                repeats,
                sync=sync,
            )
            rows.append(
                row(
                    f"activation_features backend=torch, {'query' if query else 'database'}, {label} (ms per image)",
                    shape,
                    (ms / n, iqr / n),
                    (ref_ms, ref_iqr),
                    missed(feats[:1].to("cpu"), ref),
                    "the OpenCV backend on one image; diff: fraction of its features not found",
                )
            )
    return rows


def run(
    quick: bool = False,
    *,
    pairs: int = 100,
    features: int = 512,
    scales: int = 3,
    repeats: int = 11,
    real: bool = False,
    positives: float = 0.2,
    scaling: str = "channel",
    device: str = "cpu",
    info: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The rows of the module docstring (``quick``: 8 pairs of 64 features, a 32-channel map, 2 repeats)."""
    torch.manual_seed(SEED)
    if quick:
        pairs, features, repeats, real = 8, 64, 2, False
    q, db, pos, source = inputs(pairs, features, scales, real, positives, scaling)
    rows, numbers = matcher_rows(q, db, pos, source, repeats, device)
    rows += detector_rows(32 if quick else C, scales, max(1, repeats // 3), scaling, device, 2 if quick else 8)
    if info is not None:
        info.update(numbers)
    return rows


def profile(
    pairs: int, features: int, scales: int, real: bool, positives: float, scaling: str = "channel", top: int = 15
) -> None:
    """Where one batched ``spatial_match`` call spends its time: torch.profiler and cProfile tables."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    q, db, _, source = inputs(pairs, features, scales, real, positives, scaling)
    sizes = np.array([len(u[0]) for pair in opencv_units(q, db) for u in pair], dtype=np.int64)
    print(
        f"\nprofile: {len(db)} pairs ({source}), {len(sizes)} non-empty units (pair, query scale, database scale), "
        f"correspondences per unit median {np.median(sizes):.0f}, max {sizes.max() if len(sizes) else 0}; "
        f"sum of T^2 (hypotheses x correspondences scored, no padding) {int((sizes**2).sum())}"
    )
    spatial_match(q, db)  # warm-up
    t0 = time.perf_counter()
    spatial_match(q, db)
    print(f"one call without a profiler: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        spatial_match(q, db)
    print(f"torch.profiler, one call, top {top} operators by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    pr = cProfile.Profile()
    pr.enable()
    spatial_match(q, db)
    pr.disable()
    stats = pstats.Stats(pr)
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"cProfile, one call, top {top} functions by own time:")
    print("\n".join(ln for ln in buf.getvalue().splitlines()[4:] if ln.strip()))
    phases = [
        (name, calls, cum)
        for (path, _, name), (calls, _, _, cum, _) in stats.stats.items()  # type: ignore[attr-defined]
        if path.endswith("spatial.py")
    ]
    print("cProfile, deepagg/functional/spatial.py functions by cumulative time (ms, calls):")
    for name, calls, cum in sorted(phases, key=lambda x: -x[2]):
        print(f"  {name}: {cum * 1e3:.1f} ms, {calls} calls")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--pairs", type=int, default=100, help="database images verified for the query")
    parser.add_argument("--features", type=int, default=512, help="local features per image")
    parser.add_argument("--scales", type=int, default=3, help="scales (1, 1/sqrt(2), 1/2, ...)")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs (the loops and detector: a third)")
    parser.add_argument("--positives", type=float, default=0.2, help="fraction of true warps of the query")
    parser.add_argument("--real", action="store_true", help=f"features of real maps under {FEATURE_DIR}")
    parser.add_argument(
        "--scaling",
        choices=("channel", "image", "raw"),
        default="channel",
        help="activation_features' 8-bit levels (--real and the detector rows; the DSM re-ranker uses image)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="also the batched matcher on CUDA")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all CPUs)")
    parser.add_argument("--profile", action="store_true", help="also profile one batched call")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and the summary numbers here")
    parser.add_argument(
        "--no-heap-nudge",
        action="store_true",
        help="skip _blocking.raise_trim_threshold (in a fresh process: glibc's default heap trimming, for comparison)",
    )
    args = parser.parse_args(argv)
    if args.no_heap_nudge:
        _blocking._nudged = True  # as if done: the process keeps glibc's default state
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks.run import print_rows

    info: dict[str, Any] = {}
    rows = run(
        args.quick,
        pairs=args.pairs,
        features=args.features,
        scales=args.scales,
        repeats=args.repeats,
        real=args.real,
        positives=args.positives,
        scaling=args.scaling,
        device=args.device,
        info=info,
    )
    print_rows(rows)
    ms = info["batched_ms"]
    split = (
        f" (positives {info['corr_pos']:.0f}, negatives {info['corr_neg']:.0f})"
        if info["corr_pos"] == info["corr_pos"]
        else " (no positives)"
    )
    print(
        f"\ntentative correspondences per pair: mean {info['corr_mean']:.0f}{split} over {args.scales}x{args.scales} "
        f"scale pairs; features per image: query {info['q_features']}, database mean {info['db_features']:.0f}"
    )
    print(
        f"target <= {TARGET_MS:.0f} ms per query: {'met' if ms <= TARGET_MS else 'not met'} ({ms:.1f} ms for "
        f"{info['pairs']} pairs; stretch {STRETCH_MS:.0f} ms: {'met' if ms <= STRETCH_MS else 'not met'})"
    )
    print(f"ratios: per-pair loop / batched {info['loop_ratio']:.1f}x, OpenCV / batched {info['opencv_ratio']:.2f}x")
    nudge = "skipped (--no-heap-nudge)" if args.no_heap_nudge else "on"
    print(f"minor page faults per batched call: {info['page_faults_per_call']:.0f} (glibc heap nudge {nudge})")
    print(
        f">= {TARGET_LOOP:.0f}x the per-pair loop: {'met' if info['loop_ratio'] >= TARGET_LOOP else 'not met'} "
        f"({info['loop_ratio']:.1f}x)"
    )
    print(
        f"{torch.get_num_threads()} torch threads, {_cv2().getNumThreads()} OpenCV threads, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__}, OpenCV {_cv2().__version__}"
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": info, "threads": torch.get_num_threads()}, indent=2))
    if args.profile:
        pairs, features = (8, 64) if args.quick else (args.pairs, args.features)
        profile(pairs, features, args.scales, args.real and not args.quick, args.positives, args.scaling)
    return rows


if __name__ == "__main__":
    main()
