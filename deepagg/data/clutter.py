r"""The embedded ``clutter`` benchmark: real photographic objects placed in real photos, revisitop ground truth.

Everything is built from a seed by this module, from real photos and real photographic object cut-outs in
Debian packages (see :mod:`deepagg.data.sources`); no image is ever committed. The result is a folder in the
revisitop layout that :func:`deepagg.data.load_gnd` reads::

    <root>/<name>/jpg/<image>.jpg          database images (db_XXXX) and query images (q_XXX)
    <root>/<name>/gnd_<name>.pkl           {"imlist", "qimlist", "gnd": [{"bbx", "easy", "hard", "junk"}]}
    <root>/<name>/manifest.json            sources (sha256), seed, builder version, one record per image

with ``name`` = ``clutter`` (``variant="default"``), ``clutter_tiny`` (tests) or ``clutter_train`` for seed 0,
and ``<that name>_seed<N>`` (``clutter_seed1``, ``clutter_train_seed1``, ...) for seed ``N != 0`` (see **Seeds**).

**Construction** ("real photos of real objects, synthetic compositing"). Each object (a Tux Paint photo
cut-out with its alpha mask) lives in a *home* photo: it is pasted once, at full resolution (object long side
6-8.5 % of the photo's, at least 140 px), into a high-resolution wallpaper photo, or into one half of a photo
whose long side is 2560 px or more. Most of its database views are crops of that home around the object at
zooms from close-up to far (the object's box is from about 6 % -- or as far as the home allows, at most about
9 % -- to 70 % of the crop's long side, log-stratified so every object gets the whole range), so that views
chain into each other through shared surroundings, as photos of a landmark do. The other views paste the
object, small to medium (12 % to 50 % of the short side), into other photos of the same split. Every view
gets its own rotation and perspective warp (of the whole crop for home views, of the object for pastes),
occlusion (a patch of another photo over part of the object, or the image border cutting it), colour,
gamma, saturation, blur and JPEG change. A database image shows exactly one object or none. Distractors are
plain photos, crops of home photos away from their object, and crops of photo regions no object lives in.

**Queries.** Per object, held-out views that are not in the database: a close home crop (zoom 30-50 %,
mild warp) and a large paste into another photo (every variant). ``bbx`` is the object's visible
box in the query image padded by 10 % of its size on each side; as in revisitop the query image is to be
cropped to ``bbx`` before use.

**Ground truth.** Each database view of the query's object is put in exactly one set, from measured values
(:data:`THRESHOLDS`, the one place these numbers live):

- ``visible``: fraction of the object's (warped) alpha mass that is inside the image and not occluded;
- ``size`` (``scale`` in the manifest): long side of the visible object box divided by the image's long side;
- ``warp``: ``max(|rotation| / 30 deg, perspective / 0.25)``, perspective being the amplitude ``p`` of the
  corner jitter of the warp (each corner of the crop, for home views, or of the object, for pastes, moves by
  up to ``p`` times that side's length along each axis).

``junk`` if ``visible < 0.3`` or ``size < 0.07`` (barely visible); ``easy`` if ``visible >= 0.8`` and
``size >= 0.25`` and ``warp <= 0.4`` (large, clear, mildly warped); ``hard`` otherwise (small, occluded or
strongly warped). Images of other objects and distractors are negatives. The builder checks that every
query of the default variant has at least 10 positives (``easy`` + ``hard``), at least one ``easy`` and at
least one ``hard`` (it re-draws an object's views otherwise). The measured distribution is written to the
manifest (``counts``).

**Sizes.** ``default``: 33 objects x 2 queries = 66 queries; 33 x (9 home crops + 4 pastes) = 429 views
plus 33 home-background crops, 11 crops of unused photo regions and 23 plain photos: 496 database images,
long side <= 640 px, JPEG quality 90, built in about a minute once the sources are cached (VGG16 at max side
512 extracts them in about 9 minutes on 2 CPU cores in float32, under 3 minutes with bf16 autocast). The
benchmark depends on the Debian packages alone: the optional scikit-image / scikit-learn photos
(``python_distractors``) are off in every variant, so what ``clutter`` means does not change with the Python
packages installed. Measured with seed 0: per query 1-6 (mean 3.2) ``easy``, 5-11 (mean 8.3) ``hard``, 1-3 (mean
1.6) ``junk``, 10-12 (mean 11.5) positives. ``tiny``: 4 objects, 8 queries, 40 database images, long side
<= 256 px (about 5 s). ``train``: the 11 other objects in other photos, the same recipe at about 4.3 times
the views per object: 11 x 2 = 22 queries; 11 x (39 home crops + 13 pastes) = 572 views (per object 4
occluded and 4 border-cut home crops, 9 strongly warped ones) plus 11 home-background crops and 7 plain
photos: 590 database images, 612 images in all, long side <= 640 px, built in about 60 s (150 + 11 images in
about 25 s before 1.2). Measured with seed 0: per object 49-52 (mean 50.9) non-junk views; per query 11-16
(mean 13.4) ``easy``, 35-40 (mean 37.5) ``hard``, 0-3 (mean 1.1) ``junk``. The size is set by the learned
whitening fitted on it (Lw, 512-D VGG16 descriptors): with every (query, ``easy``/``hard``) pair and every
pair of non-junk database views of one object as positives, the pair differences span (non-junk views) +
(queries) - (objects) = 560 + 22 - 11 = 571 dimensions, more than 512 with a margin (130 before 1.2, so the
covariance of the differences was singular). The builder re-draws an object with fewer than 48 non-junk
views (``min_positives``), so the span is at least 11 x (48 + 2 - 1) = 539 for every seed.

**Train split.** Objects and scene photos are split into ``train`` (a quarter) and ``test`` (the rest) by a
rule of the seed alone, the same for every variant, so ``clutter_train`` shares no object and no photo with
``clutter``/``clutter_tiny`` of the same seed. Seed 0: sorted by id (objects) and by ``(package, path)``
(photos), every fourth one (index % 4 == 3) belongs to ``train``. Seed ``N != 0``: the sorted objects are
permuted by a generator of ``N`` (``SeedSequence([N, key("split"), key("objects")])``) and every fourth one of
the permutation (position % 4 == 3) is ``train``; the photos likewise, but each size group on its own (long side
>= 2560 px: two homes; >= 1800 px: one home; smaller: paste backgrounds and occluders), so that every seed's
splits have about the home regions seed 0's have. The manifest's ``split_rule`` states the rule used. It is
written in the same format: its queries (two per object) with their ``easy`` + ``hard`` images are positive
pairs, and ``manifest["images"][j]["object"]`` gives the object id of every database image, so pairs of
database images of one object are positives too (``None``: a distractor, negative to all).

**Seeds.** ``seed`` (``dataset.seed=N`` in the apps) selects an independent draw of the benchmark: another
object/photo split (above), so other objects (of 44 in all, 33 test 11 train per seed), each in a home photo
drawn anew, with other views, zooms, warps, occlusions, paste scenes, distractors and queries; the view plan, the
thresholds and the checks are those of seed 0. Seed 0 is the benchmark every earlier number was measured on
(byte-identical to builder 1.1 / 1.2) and keeps the folder names above; seed ``N`` is built into
``<root>/<name>_seed<N>`` with gnd file ``gnd_<name>_seed<N>.pkl``, and its dataset name
(:attr:`~deepagg.data.RetrievalDataset.name`, the manifest's ``dataset``) is ``<name>_seed<N>``, so results
tables and caches keep the draws apart, and building one seed never touches another seed's folder. The
whitening partner of a seed is ``clutter_train`` of the same seed (the eval app picks it). Measured with seed 1
(seed 0 in brackets): ``clutter_seed1`` 33 objects, 10 of them not in seed 0's ``clutter`` (seed 0 trains on
them), none in its old home; 66 queries; 497 database images (496): 429 views, 33 home-background crops, 12
(11) crops of unused photo regions, 23 plain photos; per query 1-5 (1-6), mean 3.1 (3.2) ``easy``, 6-11 (5-11),
mean 8.6 (8.3) ``hard``, 1-3, mean 1.3 (1.6) ``junk``, 10-12, mean 11.7 (11.5) positives.
``clutter_train_seed1``: 11 objects, 612 images (the same), per object 48-52, mean 50.3 (49-52, mean 50.9)
non-junk views, so Lw's pair differences span 553 + 22 - 11 = 564 (571) dimensions; per query 11-17, mean
13.6 ``easy``, 31-40, mean 36.6 ``hard``, 0-4, mean 1.7 ``junk``. Seed 2 is alike (8 objects new to the test
split; 376 non-junk test views, per query 10-12 positives; ``clutter_train_seed2`` 48-52 non-junk views per
object). With the same seed the two splits share no object, no photo and no image.

**Reproducibility.** Every random draw comes from ``numpy.random.Generator(PCG64(SeedSequence([seed, ...])))``
keyed by the split, object and view, so each image depends only on its own key; geometry uses pure-Python
float maths, intensity changes use integer lookup tables, resampling is PIL's (LANCZOS for scaling, BICUBIC
for perspective), JPEGs are written by PIL at fixed settings. The same seed, sources and Pillow/libjpeg build
give the same bytes (the manifest records the sha256 of every source and output file and the Pillow version).
JPEG sources much larger than the working size are decoded with libjpeg's DCT scaling (``draft``). Builds
are atomic: the folder is written as ``<root>/.<name>.tmp-<pid>`` and renamed when complete (``name`` with its
``_seed<N>`` suffix).

**Versions.** Each variant carries the builder version that last changed its output, written to the
manifest as ``builder_version``: ``clutter`` and ``clutter_tiny`` 1.1 (no scikit-image / scikit-learn
distractors), ``clutter_train`` 1.2 (grown from 161 to 612 images so that learned whitening is determined).
:data:`BUILDER_VERSION` is the newest of them. :func:`ensure_clutter` rebuilds a folder whose manifest has
another seed or another version than its variant's, so a change to one variant's plan rebuilds that variant
only; a change to shared code that alters the bytes of a variant must bump that variant's version too. The
tests check that ``clutter_tiny`` (and, marked ``slow``, ``clutter``) is byte-identical to what the 1.1
builder wrote.

**Manifest.** ``seed``, ``variant``, ``builder_version``, ``thresholds``, ``packages`` (each .deb's name and
sha256), ``sources`` (every source file used: package, path, sha256), ``objects`` (id, stamp, merged
duplicate stamps, home photo region), ``counts`` (easy/hard/junk per query) and, per database image and
query, ``name``, ``kind`` (``home-crop``, ``paste``, ``home-background``, ``scene``; ``query-home``,
``query-paste``), ``object`` (id or ``None``), ``gt``, ``bbox`` (visible object box ``[x1, y1, x2, y2]``),
``visible``, ``scale`` (the ``size`` above), ``zoom`` or ``object_size``, ``rotation``, ``perspective``,
``warp``, occlusion targets, ``scene`` (the photo region it was made from), ``photometric``, ``size``
(width, height) and ``sha256`` of the written file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from deepagg.data.dataset import RetrievalDataset, load_gnd
from deepagg.data.sources import (
    PACKAGES,
    DebianSourceError,
    SourceFile,
    deb_record,
    fetch_debs,
    python_photos,
    scene_photos,
    sha256_file,
    stamp_objects,
)

__all__ = [
    "BUILDER_VERSION",
    "THRESHOLDS",
    "VARIANTS",
    "ViewThresholds",
    "build_clutter",
    "classify_view",
    "ensure_clutter",
]

BUILDER_VERSION = "1.2"  # the newest of the variants' versions (see the module documentation)


@dataclass(frozen=True)
class ViewThresholds:
    """Where a database view of the query's object goes: ``junk``, ``easy`` or ``hard`` (see module docs).

    Attributes:
        junk_max_visible: Below this visible fraction a view is junk.
        junk_max_size: Below this relative object size (box long side / image long side) a view is junk.
        easy_min_visible: An easy view shows at least this fraction of the object.
        easy_min_size: An easy view's object box is at least this fraction of the image's long side.
        easy_max_warp: An easy view is warped at most this much (``max(|rot| / 30 deg, persp / 0.25)``).
    """

    junk_max_visible: float = 0.3
    junk_max_size: float = 0.07
    easy_min_visible: float = 0.8
    easy_min_size: float = 0.25
    easy_max_warp: float = 0.4


THRESHOLDS = ViewThresholds()


def classify_view(visible: float, size: float, warp: float, thresholds: ViewThresholds = THRESHOLDS) -> str:
    """The ground-truth set of one view of the query's object: ``"junk"``, ``"easy"`` or ``"hard"``.

    Args:
        visible: Visible fraction of the object, in :math:`[0, 1]`.
        size: Long side of the visible object box divided by the image's long side.
        warp: Warp strength ``max(|rotation| / 30 deg, perspective / 0.25)``.
        thresholds: The thresholds; default :data:`THRESHOLDS`.

    Returns:
        The set name.

    Example:
        >>> classify_view(0.95, 0.4, 0.1), classify_view(0.95, 0.12, 0.1), classify_view(0.2, 0.5, 0.0)
        ('easy', 'hard', 'junk')
    """
    if visible < thresholds.junk_max_visible or size < thresholds.junk_max_size:
        return "junk"
    if visible >= thresholds.easy_min_visible and size >= thresholds.easy_min_size and warp <= thresholds.easy_max_warp:
        return "easy"
    return "hard"


def _warp_score(rotation: float, perspective: float) -> float:
    return max(abs(rotation) / 30.0, perspective / 0.25)


# --------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class _Variant:
    name: str
    version: str  # the builder version that last changed this variant's output (manifest "builder_version")
    split: str  # "test" or "train"
    n_objects: int | None  # None: every object of the split
    queries: tuple[str, ...]  # kinds of the held-out query views per object
    home_views: int
    paste_views: int
    occluded: int  # home views with a patch over part of the object
    border: int  # home views whose crop cuts the object
    barely: int  # home views with the object nearly hidden (junk, as measured, in almost all cases)
    strong_warp: int  # home views with strong rotation/perspective
    home_background: int  # crops of the home photo away from the object (distractors), per object
    scene_distractors: int | None  # whole plain photos of the split (None: all)
    unused_home_distractors: bool  # one crop of every home-capable photo region no object lives in
    python_distractors: bool  # the optional scikit-image / scikit-learn photos
    min_positives: int  # re-draw an object with fewer non-junk (easy + hard) database views
    out_long: int
    home_cap: int
    scene_cap: int
    min_object_px: int


# The three variants (name -> sizes and view plan); documented in the module docstring.
VARIANTS: dict[str, _Variant] = {
    "default": _Variant(
        name="clutter", version="1.1", split="test", n_objects=None, queries=("home", "paste"),
        home_views=9, paste_views=4, occluded=1, border=1, barely=1, strong_warp=2, home_background=1,
        scene_distractors=None, unused_home_distractors=True, python_distractors=False, min_positives=10,
        out_long=640, home_cap=2560, scene_cap=1024, min_object_px=140,
    ),
    "tiny": _Variant(
        name="clutter_tiny", version="1.1", split="test", n_objects=4, queries=("home", "paste"),
        home_views=6, paste_views=2, occluded=1, border=1, barely=0, strong_warp=1, home_background=1,
        scene_distractors=4, unused_home_distractors=False, python_distractors=False, min_positives=2,
        out_long=256, home_cap=1280, scene_cap=512, min_object_px=90,
    ),
    "train": _Variant(
        name="clutter_train", version="1.2", split="train", n_objects=None, queries=("home", "paste"),
        home_views=39, paste_views=13, occluded=4, border=4, barely=0, strong_warp=9, home_background=1,
        scene_distractors=None, unused_home_distractors=False, python_distractors=False, min_positives=48,
        out_long=640, home_cap=2560, scene_cap=1024, min_object_px=140,
    ),
}  # fmt: skip

_SPLIT_CODE = {"test": 1, "train": 2}
_HOME_MIN_LONG = 1800  # a photo can be a home if its long side is at least this
_HALVE_MIN_LONG = 2560  # ... and it gives two homes (its two halves along the long side) from this size on
_ASPECTS = (4 / 3, 3 / 2, 16 / 10, 3 / 4, 2 / 3)  # image width / height of the views
_ASPECT_P = (0.35, 0.3, 0.15, 0.1, 0.1)
_JPEG = {"quality": 90, "optimize": False, "progressive": False, "subsampling": 2}


def _split_of(index: int) -> str:
    return "train" if index % 4 == 3 else "test"


# The manifest's ``split_rule``: seed 0 (the rule of every build before seeds had their own splits) and seed N.
_SPLIT_RULE_0 = "objects sorted by id and photos sorted by (package, path): index % 4 == 3 -> train"
_SPLIT_RULE_N = (
    "objects sorted by id, then permuted by PCG64(SeedSequence([seed, key('split'), key('objects')])): position % 4 "
    "== 3 -> train; photos sorted by (package, path), grouped by long side (halve: >= 2560 px, home: >= 1800 px, "
    "scene: smaller), each group permuted by PCG64(SeedSequence([seed, key('split'), key(group)])): position % 4 == "
    "3 -> train"
)


def _photo_group(long_side: int) -> str:
    if long_side >= _HALVE_MIN_LONG:
        return "halve"
    return "home" if long_side >= _HOME_MIN_LONG else "scene"


def _splits(n: int, seed: int, group: str) -> list[str]:
    """``"train"`` or ``"test"`` for each of ``n`` sorted items: every fourth one is ``train``.

    Seed 0 takes every fourth item in sorted order (:func:`_split_of`); any other seed every fourth item of a
    permutation drawn from the seed and ``group``, so each seed has its own split, the same for every variant.
    """
    if seed == 0:
        return [_split_of(i) for i in range(n)]
    out = ["test"] * n
    for pos, i in enumerate(_rng(seed, "split", group).permutation(n)):
        if pos % 4 == 3:
            out[int(i)] = "train"
    return out


def _photo_splits(long_sides: list[int], seed: int) -> list[str]:
    """The split of each photo (sorted by ``(package, path)``) given its long side; see :func:`_splits`.

    Seed 0 splits the sorted list as a whole. Other seeds split each size group on its own, so every seed's
    ``train`` and ``test`` get about a quarter and three quarters of the home-capable photos, as seed 0's do.
    """
    if seed == 0:
        return _splits(len(long_sides), 0, "photos")
    out = ["test"] * len(long_sides)
    for group in ("halve", "home", "scene"):
        idx = [i for i, s in enumerate(long_sides) if _photo_group(s) == group]
        for i, split in zip(idx, _splits(len(idx), seed, group), strict=True):
            out[i] = split
    return out


# --------------------------------------------------------------------------------------------- randomness


def _key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    ints = [k if isinstance(k, int) else _key(k) for k in keys]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *ints])))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * rng.random())


# --------------------------------------------------------------------------------------------- geometry


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting in Python floats (bit-identical on every platform)."""
    n = len(b)
    m = [[*row[:], b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        p = m[col][col]
        if abs(p) < 1e-12:
            raise ValueError("degenerate quadrilateral")
        for r in range(col + 1, n):
            f = m[r][col] / p
            if f:
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def _perspective(out_pts: list[tuple[float, float]], in_pts: list[tuple[float, float]]) -> list[float]:
    """PIL ``PERSPECTIVE`` coefficients mapping output points to input points (4 correspondences)."""
    a: list[list[float]] = []
    b: list[float] = []
    for (x, y), (u, v) in zip(out_pts, in_pts, strict=True):
        a.append([x, y, 1.0, 0.0, 0.0, 0.0, -x * u, -y * u])
        b.append(u)
        a.append([0.0, 0.0, 0.0, x, y, 1.0, -x * v, -y * v])
        b.append(v)
    return _solve(a, b)


def _quad(cx: float, cy: float, w: float, h: float, rot_deg: float, jitter: list[float]) -> list[tuple[float, float]]:
    """Corners (TL, TR, BR, BL) of a ``w x h`` rectangle centred at ``(cx, cy)``, rotated, corners jittered."""
    t = math.radians(rot_deg)
    c, s = math.cos(t), math.sin(t)
    pts = []
    for i, (dx, dy) in enumerate(((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5))):
        x, y = dx * w + jitter[2 * i] * w, dy * h + jitter[2 * i + 1] * h
        pts.append((cx + c * x - s * y, cy + s * x + c * y))
    return pts


def _fit_quad(pts: list[tuple[float, float]], width: int, height: int) -> list[tuple[float, float]]:
    """Shrink (about the centroid) and shift a quadrilateral until it lies inside ``[0, width] x [0, height]``."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = sum(xs) / 4, sum(ys) / 4
    k = min(1.0, 0.999 * width / (max(xs) - min(xs)), 0.999 * height / (max(ys) - min(ys)))
    pts = [(cx + (x - cx) * k, cy + (y - cy) * k) for x, y in pts]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    dx = -min(xs) if min(xs) < 0 else (width - max(xs) if max(xs) > width else 0.0)
    dy = -min(ys) if min(ys) < 0 else (height - max(ys) if max(ys) > height else 0.0)
    return [(x + dx, y + dy) for x, y in pts]


def _warp_crop(
    img: Image.Image, alpha: Image.Image | None, pts: list[tuple[float, float]], size: tuple[int, int]
) -> tuple[Image.Image, Image.Image | None]:
    """Warp the quadrilateral ``pts`` of ``img`` (and of the alpha layer) onto an image of ``size``."""
    w, h = size
    x0 = max(0, math.floor(min(p[0] for p in pts)) - 2)
    y0 = max(0, math.floor(min(p[1] for p in pts)) - 2)
    x1 = min(img.width, math.ceil(max(p[0] for p in pts)) + 2)
    y1 = min(img.height, math.ceil(max(p[1] for p in pts)) + 2)
    sub = img.crop((x0, y0, x1, y1))
    sub_a = alpha.crop((x0, y0, x1, y1)) if alpha is not None else None
    local = [(x - x0, y - y0) for x, y in pts]
    top = (math.dist(local[0], local[1]) + math.dist(local[3], local[2])) / 2
    left = (math.dist(local[0], local[3]) + math.dist(local[1], local[2])) / 2
    d = max(w / top, h / left)
    if d < 0.9:  # pre-scale with an antialiasing filter, then warp at about 1:1
        nw, nh = max(1, round(sub.width * d)), max(1, round(sub.height * d))
        fx, fy = nw / sub.width, nh / sub.height
        sub = sub.resize((nw, nh), Image.Resampling.LANCZOS)
        sub_a = sub_a.resize((nw, nh), Image.Resampling.LANCZOS) if sub_a is not None else None
        local = [(x * fx, y * fy) for x, y in local]
    coeffs = _perspective([(0.0, 0.0), (float(w), 0.0), (float(w), float(h)), (0.0, float(h))], local)
    out = sub.transform((w, h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC)
    out_a = (
        sub_a.transform((w, h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC)
        if sub_a is not None
        else None
    )
    return out, out_a


def _inside_fraction(alpha: Image.Image, box: tuple[int, int, int, int], pts: list[tuple[float, float]]) -> float:
    """Fraction of the alpha mass inside ``box`` that also lies inside the quadrilateral ``pts``."""
    win = np.asarray(alpha.crop(box), dtype=np.int64)
    mask = Image.new("L", alpha.crop(box).size, 0)
    ImageDraw.Draw(mask).polygon([(x - box[0], y - box[1]) for x, y in pts], fill=255)
    total = int(win.sum())
    return int((win * (np.asarray(mask) > 0)).sum()) / total if total else 0.0


def _out_size(aspect: float, long_side: int) -> tuple[int, int]:
    if aspect >= 1:
        return long_side, max(1, round(long_side / aspect))
    return max(1, round(long_side * aspect)), long_side


# --------------------------------------------------------------------------------------------- images


def _load_photo(src: SourceFile, half: int | None, cap: int) -> Image.Image:
    """A photo (or one half of it along its long side) as RGB, its long side scaled down to at most ``cap``."""
    with Image.open(src.path) as im:
        w, h = im.size
        if half is None:
            box = (0, 0, w, h)
        elif w >= h:
            box = (0, 0, w // 2, h) if half == 0 else (w // 2, 0, w, h)
        else:
            box = (0, 0, w, h // 2) if half == 0 else (0, h // 2, w, h)
        bw, bh = box[2] - box[0], box[3] - box[1]
        scale = min(1.0, cap / max(bw, bh))
        tw, th = max(1, round(bw * scale)), max(1, round(bh * scale))
        if im.format == "JPEG" and scale < 0.5:
            im.draft("RGB", (math.ceil(w * scale * 1.25), math.ceil(h * scale * 1.25)))
        dx, dy = im.size[0] / w, im.size[1] / h
        rgb = im.convert("RGB")
        src_box = (box[0] * dx, box[1] * dy, min(rgb.width, box[2] * dx), min(rgb.height, box[3] * dy))
        return rgb.resize((tw, th), Image.Resampling.LANCZOS, box=src_box)


def _photo_size(src: SourceFile) -> tuple[int, int]:
    with Image.open(src.path) as im:
        return im.size


def _load_stamp(src: SourceFile) -> Image.Image:
    """A stamp as RGBA cropped to its alpha box, after re-checking the photographic-stamp filter."""
    with Image.open(src.path) as im:
        im.load()
        if im.mode != "RGBA" or max(im.size) < 200:
            raise DebianSourceError(
                f"build_clutter(): stamp {src.key} must be RGBA with a long side >= 200 px; got {im.mode} {im.size}."
            )
        arr = np.asarray(im)
        opaque = arr[..., 3] >= 128
        colours = np.unique(arr[opaque][:, :3].astype(np.uint32) @ np.array([1, 256, 65536], dtype=np.uint32)).size
        if colours <= 3000:
            raise DebianSourceError(
                f"build_clutter(): stamp {src.key} has {colours} opaque colours (<= 3000): not a photo cut-out."
            )
        bbox = im.getchannel("A").point(lambda v: 255 if v >= 16 else 0).getbbox()
        return im.crop(bbox) if bbox else im.copy()


def _thumb(stamp: Image.Image) -> np.ndarray:
    bg = Image.new("RGBA", stamp.size, (128, 128, 128, 255))
    bg.alpha_composite(stamp)
    g = np.asarray(bg.convert("L").resize((24, 24), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
    g = g - g.mean()
    return g / (np.linalg.norm(g) + 1e-9)


def _check_distinct(stamps: dict[str, Image.Image]) -> None:
    """Refuse two object ids whose stamps are (mirrored) near-duplicates: they must be merged in the catalogue."""
    ids = sorted(stamps)
    thumbs = {i: _thumb(stamps[i]) for i in ids}
    mirrored = {i: _thumb(stamps[i].transpose(Image.Transpose.FLIP_LEFT_RIGHT)) for i in ids}
    for a_i, a in enumerate(ids):
        for b in ids[a_i + 1 :]:
            sim = max(float(thumbs[a] @ thumbs[b]), float(thumbs[a] @ mirrored[b]))
            if sim > 0.97:
                raise DebianSourceError(
                    f"build_clutter(): objects {a!r} and {b!r} are near-duplicate stamps (similarity {sim:.3f}); "
                    "merge them into one object id in deepagg.data.sources.STAMP_OBJECTS."
                )


def _lut(rng: np.random.Generator, mild: bool) -> list[int]:
    k = 0.4 if mild else 1.0
    gains = [1.0 + k * _u(rng, -0.06, 0.06) for _ in range(3)]
    bright = 1.0 + k * _u(rng, -0.25, 0.25)
    gamma = math.exp(k * _u(rng, -0.22, 0.22))
    contrast = 1.0 + k * _u(rng, -0.2, 0.2)
    lut = []
    for c in range(3):
        for v in range(256):
            x = ((v / 255.0) ** gamma - 0.5) * contrast + 0.5
            lut.append(min(255, max(0, int(x * bright * gains[c] * 255.0 + 0.5))))
    return lut


def _photometric(img: Image.Image, rng: np.random.Generator, mild: bool = False) -> tuple[Image.Image, dict[str, Any]]:
    """Colour, gamma, contrast, saturation, blur and JPEG change of a whole view (integer ops, PIL filters)."""
    img = img.point(_lut(rng, mild))
    sat = 1.0 + (0.4 if mild else 1.0) * _u(rng, -0.3, 0.3)
    img = ImageEnhance.Color(img).enhance(sat)
    blur = _u(rng, 0.4, 1.5) if (not mild and rng.random() < 0.35) else 0.0
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    jpeg = int(_u(rng, 30, 80)) if (not mild and rng.random() < 0.5) else 0
    if jpeg:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=jpeg, optimize=False, progressive=False, subsampling=2)
        buf.seek(0)
        with Image.open(buf) as re:
            img = re.convert("RGB")
    return img, {"saturation": round(sat, 4), "blur": round(blur, 4), "jpeg_quality": jpeg}


def _occlude(
    img: Image.Image,
    box: tuple[int, int, int, int],
    target: float,
    source: Image.Image,
    rng: np.random.Generator,
) -> Image.Image:
    """Paste a patch of ``source`` over about ``1 - target`` of ``box`` from a random side; returns its mask."""
    bx0, by0, bx1, by1 = box
    bw, bh = bx1 - bx0, by1 - by0
    side = int(rng.integers(4))
    cover = 1.0 - target
    m1, m2 = _u(rng, 0.0, 0.35), _u(rng, 0.0, 0.35)
    if side in (0, 1):  # left / right
        cw = max(1, round(bw * cover))
        x0 = bx0 - round(bw * _u(rng, 0.05, 0.5)) if side == 0 else bx1 - cw
        x1 = bx0 + cw if side == 0 else bx1 + round(bw * _u(rng, 0.05, 0.5))
        y0, y1 = by0 - round(bh * m1), by1 + round(bh * m2)
    else:  # top / bottom
        ch = max(1, round(bh * cover))
        y0 = by0 - round(bh * _u(rng, 0.05, 0.5)) if side == 2 else by1 - ch
        y1 = by0 + ch if side == 2 else by1 + round(bh * _u(rng, 0.05, 0.5))
        x0, x1 = bx0 - round(bw * m1), bx1 + round(bw * m2)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(img.width, max(x0 + 1, x1)), min(img.height, max(y0 + 1, y1))
    pw, ph = x1 - x0, y1 - y0
    scale = _u(rng, 0.5, 1.5)
    sw, sh = min(source.width, max(1, round(pw * scale))), min(source.height, max(1, round(ph * scale)))
    sx, sy = int(rng.integers(source.width - sw + 1)), int(rng.integers(source.height - sh + 1))
    patch = source.resize((pw, ph), Image.Resampling.LANCZOS, box=(sx, sy, sx + sw, sy + sh))
    mask = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask)
    if rng.random() < 0.5:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    else:
        r = round(min(pw, ph) * _u(rng, 0.1, 0.4))
        draw.rounded_rectangle((x0, y0, x1 - 1, y1 - 1), radius=r, fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(1.0))
    full = Image.new("RGB", img.size)
    full.paste(patch, (x0, y0))
    img.paste(full, (0, 0), mask)
    return mask


def _visible(alpha: Image.Image, occ: Image.Image | None) -> tuple[np.ndarray, float]:
    a = np.asarray(alpha, dtype=np.int64)
    total = int(a.sum())
    if occ is None:
        return a, 1.0 if total else 0.0
    vis = a * (255 - np.asarray(occ, dtype=np.int64)) // 255
    return vis, (int(vis.sum()) / total) if total else 0.0


def _bbox(vis: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(vis >= 128)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _encode(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **_JPEG)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- build state


@dataclass
class _Region:
    """A home-capable photo or one half of it."""

    src: SourceFile
    half: int | None

    @property
    def key(self) -> str:
        return self.src.key + ("" if self.half is None else f"#half{self.half}")


@dataclass
class _View:
    kind: str
    image: Image.Image
    obj: str | None
    record: dict[str, Any]
    data: bytes = b""


@dataclass
class _Home:
    region: _Region
    image: Image.Image
    alpha: Image.Image
    box: tuple[int, int, int, int]


@dataclass
class _Ctx:
    variant: _Variant
    seed: int
    stamps: dict[str, SourceFile]
    merged: dict[str, list[SourceFile]]
    homes: dict[str, _Region]
    scenes: list[_Region]  # paste backgrounds: mid photos (half None) and home-capable regions
    occluders: list[SourceFile]
    used: dict[str, SourceFile] = field(default_factory=dict)
    _stamp_cache: dict[str, Image.Image] = field(default_factory=dict)
    _scene_cache: dict[str, Image.Image] = field(default_factory=dict)

    def stamp(self, oid: str) -> Image.Image:
        if oid not in self._stamp_cache:
            src = self.stamps[oid]
            self.used[src.key] = src
            self._stamp_cache[oid] = _load_stamp(src)
        return self._stamp_cache[oid]

    def scene(self, region: _Region) -> Image.Image:
        if region.key not in self._scene_cache:
            self.used[region.src.key] = region.src
            self._scene_cache[region.key] = _load_photo(region.src, region.half, self.variant.scene_cap)
        return self._scene_cache[region.key]

    def occluder(self, rng: np.random.Generator) -> Image.Image:
        src = self.occluders[int(rng.integers(len(self.occluders)))]
        return self.scene(_Region(src, None))


def _r(x: float) -> float:
    return round(float(x), 5)


# --------------------------------------------------------------------------------------------- views


def _make_home(ctx: _Ctx, oid: str, rng: np.random.Generator) -> _Home:
    region = ctx.homes[oid]
    ctx.used[region.src.key] = region.src
    image = _load_photo(region.src, region.half, ctx.variant.home_cap)
    long_side = max(image.size)
    s = max(ctx.variant.min_object_px, round(long_side * _u(rng, 0.06, 0.085)))
    s = min(s, round(0.3 * min(image.size)))
    stamp = ctx.stamp(oid)
    f = s / max(stamp.size)
    obj = stamp.resize((max(1, round(stamp.width * f)), max(1, round(stamp.height * f))), Image.Resampling.LANCZOS)
    cx, cy = _u(rng, 0.3, 0.7) * image.width, _u(rng, 0.35, 0.7) * image.height
    x0, y0 = round(cx - obj.width / 2), round(cy - obj.height / 2)
    image.paste(obj, (x0, y0), obj)
    alpha = Image.new("L", image.size, 0)
    alpha.paste(obj.getchannel("A"), (x0, y0))
    return _Home(region, image, alpha, (x0, y0, x0 + obj.width, y0 + obj.height))


def _finish(
    ctx: _Ctx,
    kind: str,
    oid: str | None,
    out: Image.Image,
    alpha: Image.Image | None,
    inside: float,
    occlusion: float | None,
    rng: np.random.Generator,
    record: dict[str, Any],
    mild: bool,
) -> _View:
    """Occlude, measure, change colour/blur/JPEG and fill in the record of one view."""
    occ = None
    if alpha is not None:
        vis0, _ = _visible(alpha, None)
        box0 = _bbox(vis0)
        if occlusion is not None and box0 is not None:
            occ = _occlude(out, box0, occlusion, ctx.occluder(rng), rng)
        vis, ratio = _visible(alpha, occ)
        box = _bbox(vis)
        visible = inside * ratio if box is not None else 0.0
        size = max(box[2] - box[0], box[3] - box[1]) / max(out.size) if box is not None else 0.0
        warp = _warp_score(record["rotation"], record["perspective"])
        record.update(
            bbox=list(box) if box is not None else None,
            visible=_r(visible),
            scale=_r(size),
            warp=_r(warp),
            gt=classify_view(visible, size, warp) if kind not in ("query-home", "query-paste") else None,
        )
    out, photo = _photometric(out, rng, mild=mild)
    record.update(photometric=photo, size=[out.width, out.height])
    return _View(kind, out, oid, record)


def _home_view(ctx: _Ctx, home: _Home, oid: str, rng: np.random.Generator, spec: dict[str, Any]) -> _View:
    """A crop of the object's home photo: zoom ``spec["zoom"]``, perspective, rotation, optional cut/occlusion."""
    var = ctx.variant
    img = home.image
    ox0, oy0, ox1, oy1 = home.box
    ow, oh = ox1 - ox0, oy1 - oy0
    s = max(ow, oh)
    aspect = _ASPECTS[int(rng.choice(len(_ASPECTS), p=_ASPECT_P))]
    crop_long = s / spec["zoom"]
    cw, ch = (crop_long, crop_long / aspect) if aspect >= 1 else (crop_long * aspect, crop_long)
    k = min(1.0, img.width / cw, img.height / ch)
    cw, ch = cw * k, ch * k
    ocx, ocy = (ox0 + ox1) / 2, (oy0 + oy1) / 2
    cx = ocx + _u(rng, -0.85, 0.85) * max(0.0, cw - ow) / 2
    cy = ocy + _u(rng, -0.85, 0.85) * max(0.0, ch - oh) / 2
    border = spec.get("border")
    if border is not None:  # put the crop's edge through the object so about `border` of it stays inside
        side = int(rng.integers(4))
        if side == 0:
            cx = ox0 + (1 - border) * ow + cw / 2
        elif side == 1:
            cx = ox1 - (1 - border) * ow - cw / 2
        elif side == 2:
            cy = oy0 + (1 - border) * oh + ch / 2
        else:
            cy = oy1 - (1 - border) * oh - ch / 2
    rot = spec["rotation"]
    persp = spec["perspective"]
    jitter = [_u(rng, -persp, persp) for _ in range(8)]
    pts = _fit_quad(_quad(cx, cy, cw, ch, rot, jitter), img.width, img.height)
    out_long = min(var.out_long, round(2 * crop_long * k))
    size = _out_size(aspect, out_long)
    out, alpha = _warp_crop(img, home.alpha, pts, size)
    win = (max(0, ox0 - 2), max(0, oy0 - 2), min(img.width, ox1 + 2), min(img.height, oy1 + 2))
    inside = _inside_fraction(home.alpha, win, pts)
    record = {
        "zoom": _r(spec["zoom"]),
        "rotation": _r(rot),
        "perspective": _r(persp),
        "occlusion_target": _r(spec["occlusion"]) if spec.get("occlusion") is not None else None,
        "border_target": _r(border) if border is not None else None,
        "scene": home.region.key,
    }
    kind = spec.get("kind", "home-crop")
    return _finish(ctx, kind, oid, out, alpha, inside, spec.get("occlusion"), rng, record, spec.get("mild", False))


def _scene_crop(
    ctx: _Ctx, region: _Region, rng: np.random.Generator, area: tuple[float, float], long_side: int
) -> tuple[Image.Image, float]:
    scene = ctx.scene(region)
    aspect = _ASPECTS[int(rng.choice(len(_ASPECTS), p=_ASPECT_P))]
    a = _u(rng, *area) * scene.width * scene.height
    cw, ch = math.sqrt(a * aspect), math.sqrt(a / aspect)
    k = min(1.0, scene.width / cw, scene.height / ch)
    cw, ch = min(scene.width, cw * k), min(scene.height, ch * k)
    x0, y0 = max(0.0, _u(rng, 0, scene.width - cw)), max(0.0, _u(rng, 0, scene.height - ch))
    size = _out_size(aspect, long_side)
    return scene.resize(size, Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch)), aspect


def _paste_view(ctx: _Ctx, oid: str, rng: np.random.Generator, spec: dict[str, Any]) -> _View:
    """The object pasted into another photo of the split: scale, rotation, perspective, cut/occlusion."""
    var = ctx.variant
    own = ctx.homes[oid].src.key
    pool = [r for r in ctx.scenes if r.src.key != own]
    region = pool[int(rng.integers(len(pool)))]
    bg, _ = _scene_crop(ctx, region, rng, (0.45, 1.0), var.out_long)
    stamp = ctx.stamp(oid)
    target = spec["object_size"] * min(bg.size)
    f = target / max(stamp.size)
    obj = stamp.resize((max(1, round(stamp.width * f)), max(1, round(stamp.height * f))), Image.Resampling.LANCZOS)
    bright = 1.0 + _u(rng, -0.15, 0.15)
    rgb = obj.convert("RGB").point([min(255, int(v * bright + 0.5)) for v in range(256)] * 3)
    obj = Image.merge("RGBA", (*rgb.split(), obj.getchannel("A")))
    rot, persp = spec["rotation"], spec["perspective"]
    jitter = [_u(rng, -persp, persp) for _ in range(8)]
    dst = _quad(0.0, 0.0, obj.width, obj.height, rot, jitter)
    minx, miny = math.floor(min(p[0] for p in dst)), math.floor(min(p[1] for p in dst))
    cw = math.ceil(max(p[0] for p in dst)) - minx
    chh = math.ceil(max(p[1] for p in dst)) - miny
    coeffs = _perspective(
        [(x - minx, y - miny) for x, y in dst],
        [(0.0, 0.0), (float(obj.width), 0.0), (float(obj.width), float(obj.height)), (0.0, float(obj.height))],
    )
    warped = obj.transform((cw, chh), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC)
    wa = warped.getchannel("A")
    full = int(np.asarray(wa, dtype=np.int64).sum())
    px = round(_u(rng, 0, max(0, bg.width - cw)))
    py = round(_u(rng, 0, max(0, bg.height - chh)))
    border = spec.get("border")
    if border is not None:
        side = int(rng.integers(4))
        if side == 0:
            px = -round((1 - border) * cw)
        elif side == 1:
            px = bg.width - round(border * cw)
        elif side == 2:
            py = -round((1 - border) * chh)
        else:
            py = bg.height - round(border * chh)
    bg.paste(warped, (px, py), warped)
    alpha = Image.new("L", bg.size, 0)
    alpha.paste(wa, (px, py))
    inside = int(np.asarray(alpha, dtype=np.int64).sum()) / full if full else 0.0
    record = {
        "object_size": _r(spec["object_size"]),
        "rotation": _r(rot),
        "perspective": _r(persp),
        "occlusion_target": _r(spec["occlusion"]) if spec.get("occlusion") is not None else None,
        "border_target": _r(border) if border is not None else None,
        "scene": region.key,
    }
    kind = spec.get("kind", "paste")
    return _finish(ctx, kind, oid, bg, alpha, inside, spec.get("occlusion"), rng, record, spec.get("mild", False))


def _distractor(ctx: _Ctx, region: _Region, rng: np.random.Generator, kind: str, home: _Home | None) -> _View | None:
    """A view with no object: a plain photo, or a crop of a home photo that keeps clear of its object."""
    var = ctx.variant
    rot, persp = _u(rng, -5, 5), _u(rng, 0.0, 0.06)
    if home is None:
        bg, _ = _scene_crop(ctx, region, rng, (0.5, 1.0), var.out_long)
        out = bg
    else:
        img = home.image
        ox0, oy0, ox1, oy1 = home.box
        mx, my = 0.1 * (ox1 - ox0), 0.1 * (oy1 - oy0)
        for _ in range(40):
            aspect = _ASPECTS[int(rng.choice(len(_ASPECTS), p=_ASPECT_P))]
            long_side = _u(rng, 0.25, 0.7) * min(img.size)
            cw, ch = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
            jitter = [_u(rng, -persp, persp) for _ in range(8)]
            cx, cy = _u(rng, cw / 2, img.width - cw / 2), _u(rng, ch / 2, img.height - ch / 2)
            pts = _fit_quad(_quad(cx, cy, cw, ch, rot, jitter), img.width, img.height)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if max(xs) < ox0 - mx or min(xs) > ox1 + mx or max(ys) < oy0 - my or min(ys) > oy1 + my:
                break
        else:
            return None
        out, _ = _warp_crop(img, None, pts, _out_size(aspect, min(var.out_long, round(2 * long_side))))
    record = {"rotation": _r(rot), "perspective": _r(persp), "scene": region.key}
    return _finish(ctx, kind, None, out, None, 0.0, None, rng, record, mild=False)


def _object_views(ctx: _Ctx, oi: int, oid: str, attempt: int) -> tuple[list[_View], list[_View], list[_View]]:
    """All views of one object: (database views, query views, home-background distractors)."""
    var, split = ctx.variant, _SPLIT_CODE[ctx.variant.split]
    plan = _rng(ctx.seed, split, "plan", oi, attempt)
    home = _make_home(ctx, oid, plan)
    s = max(home.box[2] - home.box[0], home.box[3] - home.box[1])
    # zoom range: the object from 6 % (or as far as the home allows) to 70 % of the crop's long side
    f_lo = max(0.06, s / max(home.image.size))
    f_hi = 0.7
    n = var.home_views
    specs: list[dict[str, Any]] = []
    for k in range(n):
        t = (k + _u(plan, 0.1, 0.9)) / n
        specs.append({"zoom": math.exp(math.log(f_lo) + t * (math.log(f_hi) - math.log(f_lo)))})
    # occlusion / border roles go to middle zooms, so the closest views stay clean and the far ones small
    near = [k for k in range(n) if 0.1 <= specs[k]["zoom"] < 0.3] or list(range(n))
    roles = ["occluded"] * var.occluded + ["border"] * var.border + ["barely"] * var.barely
    chosen = plan.permutation(near)[: len(roles)] if len(near) >= len(roles) else plan.permutation(n)[: len(roles)]
    strong = {int(i) for i in plan.permutation(n)[: var.strong_warp]}
    for k in range(n):
        sp = specs[k]
        if k in strong:
            sp["rotation"] = _u(plan, 12, 25) * (1 if plan.random() < 0.5 else -1)
            sp["perspective"] = _u(plan, 0.12, 0.25)
        else:
            sp["rotation"], sp["perspective"] = _u(plan, -7, 7), _u(plan, 0.0, 0.08)
    for role, k in zip(roles, chosen, strict=False):
        if role == "occluded":
            specs[int(k)]["occlusion"] = _u(plan, 0.4, 0.75)
        elif role == "border":
            specs[int(k)]["border"] = _u(plan, 0.45, 0.8)
        else:
            specs[int(k)]["occlusion"] = _u(plan, 0.08, 0.25)
    m = var.paste_views
    pspecs: list[dict[str, Any]] = []
    for k in range(m):
        t = (k + _u(plan, 0.1, 0.9)) / m
        sp = {
            "object_size": math.exp(math.log(0.12) + t * (math.log(0.5) - math.log(0.12))),
            "rotation": _u(plan, -25, 25),
            "perspective": _u(plan, 0.0, 0.25),
        }
        r = plan.random()
        if r < 0.3:
            sp["occlusion"] = _u(plan, 0.35, 0.8)
        elif r < 0.45:
            sp["border"] = _u(plan, 0.4, 0.8)
        pspecs.append(sp)
    db: list[_View] = []
    for k, sp in enumerate(specs):
        db.append(_home_view(ctx, home, oid, _rng(ctx.seed, split, "home", oi, attempt, k), sp))
    for k, sp in enumerate(pspecs):
        db.append(_paste_view(ctx, oid, _rng(ctx.seed, split, "paste", oi, attempt, k), sp))
    queries: list[_View] = []
    for qk, qkind in enumerate(var.queries):
        qrng = _rng(ctx.seed, split, "query", oi, attempt, qk)
        if qkind == "home":
            sp = {
                "zoom": _u(qrng, 0.3, 0.5),
                "rotation": _u(qrng, -4, 4),
                "perspective": _u(qrng, 0.0, 0.04),
                "kind": "query-home",
                "mild": True,
            }
            queries.append(_home_view(ctx, home, oid, qrng, sp))
        else:
            sp = {
                "object_size": _u(qrng, 0.45, 0.6),
                "rotation": _u(qrng, -6, 6),
                "perspective": _u(qrng, 0.0, 0.05),
                "kind": "query-paste",
                "mild": True,
            }
            queries.append(_paste_view(ctx, oid, qrng, sp))
    bgs: list[_View] = []
    for k in range(var.home_background):
        v = _distractor(ctx, home.region, _rng(ctx.seed, split, "homebg", oi, attempt, k), "home-background", home)
        if v is not None:
            bgs.append(v)
    return db, queries, bgs


def _good(views: list[_View], var: _Variant) -> bool:
    gts = [v.record["gt"] for v in views]
    return (
        gts.count("easy") >= 1 and gts.count("hard") >= 1 and gts.count("easy") + gts.count("hard") >= var.min_positives
    )


# --------------------------------------------------------------------------------------------- catalogue / split


def _catalogue(
    var: _Variant, seed: int, cache_dir: str | os.PathLike[str] | None, progress: bool
) -> tuple[_Ctx, list[str], dict[str, Any], list[_Region], list[SourceFile], list[SourceFile]]:
    roots = fetch_debs(PACKAGES, cache_dir, progress=progress)
    objects = stamp_objects(roots["tuxpaint-stamps-default"])
    photos = scene_photos(roots)
    object_split = _splits(len(objects), seed, "objects")
    split_objects = [obj for obj, split in zip(objects, object_split, strict=True) if split == var.split]
    long_sides = [max(_photo_size(p)) for p in photos]
    photo_split = _photo_splits(long_sides, seed)
    regions: list[_Region] = []
    mids: list[SourceFile] = []
    for p, long_side, split in zip(photos, long_sides, photo_split, strict=True):
        if split != var.split:
            continue
        group = _photo_group(long_side)
        if group == "halve":
            regions.extend([_Region(p, 0), _Region(p, 1)])
        elif group == "home":
            regions.append(_Region(p, None))
        else:
            mids.append(p)
    code = _SPLIT_CODE[var.split]
    plan = _rng(seed, code, "catalogue")
    ids = [oid for oid, _ in split_objects]
    n = len(ids) if var.n_objects is None else var.n_objects
    if n > len(ids) or n > len(regions):
        raise RuntimeError(
            f"build_clutter(): variant {var.name} needs {n} objects and home photos; the {var.split} split has "
            f"{len(ids)} objects and {len(regions)} home-capable photo regions."
        )
    chosen = sorted(ids) if n == len(ids) else sorted(str(i) for i in plan.choice(ids, n, replace=False))
    order = [int(i) for i in plan.permutation(len(regions))]
    homes = {oid: regions[order[k]] for k, oid in enumerate(chosen)}
    home_keys = {r.key for r in homes.values()}
    unused = [r for r in regions if r.key not in home_keys]
    files = dict(split_objects)
    ctx = _Ctx(
        variant=var,
        seed=seed,
        stamps={oid: files[oid][0] for oid in chosen},
        merged={oid: files[oid][1:] for oid in chosen},
        homes=homes,
        scenes=[_Region(p, None) for p in mids] + regions,
        occluders=mids,
    )
    debs = {pkg: deb_record(root) for pkg, root in sorted(roots.items())}
    scene_order = [int(i) for i in plan.permutation(len(mids))]
    mids_sel = [mids[i] for i in scene_order]
    if var.scene_distractors is not None:
        mids_sel = mids_sel[: var.scene_distractors]
    extra = python_photos() if var.python_distractors else []
    return ctx, chosen, debs, unused, mids_sel, extra


# --------------------------------------------------------------------------------------------- public API


def _dataset_name(variant: str, seed: int, fn: str) -> str:
    """The dataset's name (its folder and gnd file): the variant's name for seed 0, ``<name>_seed<seed>`` else."""
    if variant not in VARIANTS:
        raise ValueError(f"{fn}(): variant must be one of {sorted(VARIANTS)}; got {variant!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{fn}(): seed must be a non-negative int; got {seed!r}.")
    return VARIANTS[variant].name if seed == 0 else f"{VARIANTS[variant].name}_seed{seed}"


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"clutter: {msg}", file=sys.stderr, flush=True)


def _build_into(
    tmp: Path,
    dsname: str,
    var: _Variant,
    variant: str,
    seed: int,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    ctx, chosen, debs, unused, mids_sel, extra = _catalogue(var, seed, cache_dir, progress)
    _check_distinct({oid: ctx.stamp(oid) for oid in chosen})
    code = _SPLIT_CODE[var.split]
    db: list[_View] = []
    queries: list[tuple[str, _View]] = []
    attempts: dict[str, int] = {}
    for oi, oid in enumerate(chosen):
        for attempt in range(20):
            views, qviews, bgs = _object_views(ctx, oi, oid, attempt)
            if _good(views, var):
                break
        else:  # pragma: no cover - the view plan makes this practically impossible
            raise RuntimeError(f"build_clutter(): could not draw valid views for object {oid!r} in 20 attempts.")
        attempts[oid] = attempt
        db.extend(views)
        db.extend(bgs)
        queries.extend((oid, q) for q in qviews)
        _say(progress, f"{dsname}: object {oi + 1}/{len(chosen)} {oid} ({time.perf_counter() - t0:.1f} s)")
    plain = [(r, _rng(seed, code, "unused", _key(r.key))) for r in (unused if var.unused_home_distractors else [])]
    plain += [(_Region(s, None), _rng(seed, code, "scene", _key(s.key))) for s in mids_sel]
    plain += [(_Region(s, None), _rng(seed, code, "python", _key(s.key))) for s in extra]
    for region, rng in plain:
        v = _distractor(ctx, region, rng, "scene", None)
        if v is not None:
            db.append(v)

    order = [int(i) for i in _rng(seed, code, "shuffle").permutation(len(db))]
    db = [db[i] for i in order]
    jpg = tmp / "jpg"
    jpg.mkdir(parents=True)
    imlist = [f"db_{i:04d}" for i in range(len(db))]
    qimlist = [f"q_{i:03d}" for i in range(len(queries))]
    images: list[dict[str, Any]] = []
    for name, v in zip(imlist, db, strict=True):
        v.data = _encode(v.image)
        (jpg / f"{name}.jpg").write_bytes(v.data)
        images.append(
            {"name": name, "kind": v.kind, "object": v.obj, **v.record, "sha256": hashlib.sha256(v.data).hexdigest()}
        )
    gnd: list[dict[str, Any]] = []
    qrecords: list[dict[str, Any]] = []
    counts: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
    for name, (oid, q) in zip(qimlist, queries, strict=True):
        q.data = _encode(q.image)
        (jpg / f"{name}.jpg").write_bytes(q.data)
        box = q.record["bbox"]
        if box is None:  # pragma: no cover - queries are drawn unoccluded and inside the image
            raise RuntimeError(f"build_clutter(): query {name} of {oid!r} does not show its object.")
        pw, ph = 0.1 * (box[2] - box[0]), 0.1 * (box[3] - box[1])
        w, h = q.image.size
        bbx = [max(0.0, box[0] - pw), max(0.0, box[1] - ph), min(float(w), box[2] + pw), min(float(h), box[3] + ph)]
        entry: dict[str, Any] = {"bbx": [round(float(v), 2) for v in bbx]}
        for key in ("easy", "hard", "junk"):
            idx = [j for j, v in enumerate(db) if v.obj == oid and v.record.get("gt") == key]
            entry[key] = np.asarray(idx, dtype=np.int64)
            counts[key].append(len(idx))
        gnd.append(entry)
        qrecords.append(
            {
                "name": name,
                "kind": q.kind,
                "object": oid,
                **q.record,
                "bbx": entry["bbx"],
                "sha256": hashlib.sha256(q.data).hexdigest(),
            }
        )
    with (tmp / f"gnd_{dsname}.pkl").open("wb") as fh:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, fh, protocol=4)

    sources = [
        {"key": k, "package": s.package, "path": s.relpath, "sha256": sha256_file(s.path)}
        for k, s in sorted(ctx.used.items())
    ]
    manifest: dict[str, Any] = {
        "dataset": dsname,
        "variant": variant,
        "split": var.split,
        "seed": seed,
        "builder_version": var.version,
        "software": {"pillow": PIL.__version__, "numpy": np.__version__},
        "thresholds": asdict(THRESHOLDS),
        "warp_definition": "max(|rotation_deg| / 30, perspective / 0.25)",
        "split_rule": _SPLIT_RULE_0 if seed == 0 else _SPLIT_RULE_N,
        "packages": debs,
        "python_photos": [s.key for s in extra],
        "sources": sources,
        "objects": [
            {
                "id": oid,
                "stamp": ctx.stamps[oid].key,
                "merged": [m.key for m in ctx.merged[oid]],
                "home": ctx.homes[oid].key,
                "attempt": attempts[oid],
            }
            for oid in chosen
        ],
        "counts": counts,
        "num_images": len(imlist),
        "num_queries": len(qimlist),
        "images": images,
        "queries": qrecords,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _say(progress, f"{dsname}: {len(imlist)} images, {len(qimlist)} queries in {time.perf_counter() - t0:.1f} s")
    return manifest


def build_clutter(
    root: str | os.PathLike[str],
    *,
    variant: str = "default",
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build the ``clutter`` benchmark (or its ``tiny`` / ``train`` variant) from Debian photos.

    See the module documentation for the construction, the ground truth and the folder layout. The build is
    written to ``<root>/.<name>.tmp-<pid>`` and renamed to ``<root>/<name>`` only when complete, so an
    interrupted build never leaves a folder that looks finished.

    Args:
        root: Folder that receives ``<name>/`` (``clutter``, ``clutter_tiny`` or ``clutter_train``; with
            ``_seed<N>`` appended for a seed ``N != 0``).
        variant: ``"default"``, ``"tiny"`` or ``"train"``.
        seed: The seed (see the module documentation: each seed has its own object/photo split and folder);
            the same seed and sources give the same bytes.
        cache_dir: Debian download cache (default: :func:`deepagg.data.sources.default_cache_dir`).
        overwrite: Replace an existing ``<root>/<name>``.
        progress: Print progress to stderr.

    Returns:
        The dataset folder, to pass to :func:`deepagg.data.load_gnd` with the dataset's name (the folder's name).

    Raises:
        ValueError: If ``variant`` is unknown or ``seed`` is not a non-negative int.
        FileExistsError: If the folder exists and ``overwrite`` is False.
        DebianSourceError: If the Debian sources cannot be fetched (no apt-get, no mirror, unknown package).

    Example:
        >>> folder = build_clutter("data", variant="tiny")  # doctest: +SKIP
        >>> load_gnd(folder, "clutter_tiny").num_queries  # doctest: +SKIP
        8
        >>> build_clutter("data", variant="tiny", seed=1).name  # doctest: +SKIP
        'clutter_tiny_seed1'
    """
    name = _dataset_name(variant, seed, "build_clutter")
    var = VARIANTS[variant]
    root = Path(root).expanduser()
    dest = root / name
    if dest.exists() and not overwrite:
        raise FileExistsError(
            f"build_clutter(): {dest} exists; pass overwrite=True to rebuild it, or use ensure_clutter() to reuse it."
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build_into(tmp, name, var, variant, seed, cache_dir, progress)
        if dest.exists():
            old = root / f".{name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ensure_clutter(
    root: str | os.PathLike[str],
    variant: str = "default",
    seed: int = 0,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> RetrievalDataset:
    """The ``clutter`` benchmark under ``root``: built if absent, or built with another seed or variant version.

    A folder is reused when its manifest has this ``seed`` and ``variant`` and the variant's own builder
    version (see the module documentation), so a change to another variant does not rebuild it. Each seed has
    its own folder (``<name>`` for seed 0, ``<name>_seed<N>`` otherwise), so alternating seeds rebuild nothing.

    Args:
        root: Folder that holds (or receives) ``<name>/`` (``<name>_seed<N>/`` for a seed ``N != 0``).
        variant: ``"default"``, ``"tiny"`` or ``"train"``.
        seed: The seed; ``N != 0`` is an independent draw (module documentation, **Seeds**).
        cache_dir: Debian download cache (see :func:`build_clutter`).
        progress: Print progress to stderr while building.

    Returns:
        The :class:`~deepagg.data.RetrievalDataset`, named like its folder (``clutter_seed1`` ...);
        ``extra["manifest"]`` holds the manifest and ``fingerprint`` is the sha256 of the gnd pickle followed by
        the manifest.

    Raises:
        ValueError: If ``variant`` is unknown or ``seed`` is not a non-negative int.
        DebianSourceError: If a build is needed and the Debian sources cannot be fetched.

    Example:
        >>> ds = ensure_clutter("data", "tiny")  # doctest: +SKIP
        >>> ds.num_images, ds.num_queries  # doctest: +SKIP
        (40, 8)
    """
    name = _dataset_name(variant, seed, "ensure_clutter")
    folder = Path(root).expanduser() / name
    manifest = _read_manifest(folder)
    fresh = (
        manifest is not None
        and manifest.get("seed") == seed
        and manifest.get("builder_version") == VARIANTS[variant].version
        and manifest.get("variant") == variant
        and (folder / f"gnd_{name}.pkl").is_file()
    )
    if not fresh:
        build_clutter(root, variant=variant, seed=seed, cache_dir=cache_dir, overwrite=True, progress=progress)
        manifest = _read_manifest(folder)
    ds = load_gnd(folder, name)
    h = hashlib.sha256((folder / f"gnd_{name}.pkl").read_bytes())
    h.update((folder / "manifest.json").read_bytes())
    ds.fingerprint = h.hexdigest()
    ds.extra["manifest"] = manifest
    return ds
