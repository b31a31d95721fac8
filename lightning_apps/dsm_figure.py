r"""Figs. 5 and 6 of the DSM paper (Siméoni et al., CVPR 2019) on a run of the eval app with ``rerank=dsm``.

Usage::

    python -m lightning_apps.eval rerank=dsm output_dir=RUN          # once: writes RUN/dsm.pt
    python -m lightning_apps.dsm_figure RUN [--inliers OUT.png] [--pair QUERY RANK --out OUT.png]
        [--protocol medium|hard] [--thresholds 0,2,5,10]

Reads ``RUN/dsm.pt`` (:func:`lightning_apps.eval.save_dsm`): the local features of every query and database
image, the re-ranked shortlist of each query (``"ranks"`` :math:`(Q, T)`, database indices) with the inlier
counts of spatial matching in the same order (``"inliers"``), the image paths, the query boxes, the ground truth
and the DSM settings.

``--inliers OUT.png`` (Fig. 6): the distribution of the number of inliers of the positive and of the negative
database images over the shortlists of all queries, as two series of bars: for each bin of inlier counts, the
fraction of the matched positive (negative) images whose count falls in it (each series sums to 1). Positives,
negatives and junk follow ``--protocol``'s revisited ground truth (medium: positives easy + hard, junk left out;
hard: positives hard, easy and junk left out); every other shortlisted image is a negative. The summary is
printed: the numbers of positive, negative and junk images in the shortlists, the median and mean inliers of each,
and for each ``--thresholds`` N the fraction of the negatives (and of the positives) with at most N inliers.

``--pair QUERY RANK --out OUT.png`` (Fig. 5): query ``QUERY`` (0-based, cropped to its box) beside its
``RANK``-th re-ranked result (0-based: 0 is the top of the re-ranked shortlist). The match is recomputed with
:func:`deepagg.functional.spatial_match` (``return_matches=True``, the run's ``error``, ``max_scale_change`` and
``lo_iters``); each inlier correspondence gets its own colour: the two features' ellipses, drawn at 2 sigma (the
1-sigma ellipse of the covariance scaled by 2, so that small regions stay visible), and a line joining their
centres. The title gives the inlier and tentative correspondence counts (and the count stored in the run).

Activation-map coordinates to pixels: a feature of scale ``s`` lives in that scale's map of ``h x w`` cells
(``map_sizes``), which covers the whole image (the query's crop) of ``W x H`` pixels, so its centre ``(x, y)``
(column, row, cell centres at integers) is at pixel ``x' = (x + 0.5) W / w - 0.5``, ``y' = (y + 0.5) H / h - 0.5``
and its covariance scales by ``diag(W / w, H / h)`` on both sides. Images are read with PIL (RGB), the query
cropped with :func:`deepagg.data.crop_query` (the eval app's convention).

PNGs are written atomically. User errors (no run folder or dsm.pt, a dsm.pt without inlier counts, a query or
rank out of range, an unreadable image) are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepagg._io import atomic_write
from deepagg.data import crop_query
from deepagg.functional.spatial import LocalFeatures, SpatialMatch, spatial_match
from lightning_apps.diffusion_figure import run_name
from lightning_apps.hew_figure import HewFigureError, cli_main

__all__ = [
    "DsmFigureError",
    "InlierStats",
    "PairMatch",
    "inlier_stats",
    "load_dsm",
    "main",
    "map_to_image",
    "match_pair",
    "pair_images",
    "parse_thresholds",
    "plot_inliers",
    "plot_pair",
    "split_by_gnd",
    "summary_lines",
]

PROG = "dsm_figure"
PROTOCOLS = ("medium", "hard")
DEFAULT_THRESHOLDS = "0,2,5,10"
ELLIPSE_FACTOR = 2.0  # ellipses are drawn at this many sigma (the 1-sigma ellipse scaled by it)
PAIR_HEIGHT = 420  # display height of each image of the --pair figure, pixels
GAP = 16  # between the two images, pixels
MAX_BINS = 30  # of the --inliers histogram; wider bins beyond


class DsmFigureError(HewFigureError):
    """A user error (missing run folder or dsm.pt, no inliers, index out of range): one line on stderr, exit 2."""


# ------------------------------------------------------------------------------------------------- loading


def load_dsm(run: Path) -> dict[str, Any]:
    """``run/dsm.pt`` (CPU tensors), checked to hold the re-ranked shortlists and their inlier counts.

    Raises:
        DsmFigureError: If the folder or the file is missing or unreadable, or the file has no ``"inliers"`` (or
            ``"ranks"``), or their shapes differ.
    """
    run = Path(run)
    if not run.is_dir():
        raise DsmFigureError(f"{PROG}: run folder {run} does not exist.")
    path = run / "dsm.pt"
    if not path.is_file():
        raise DsmFigureError(
            f"{PROG}: {run} has no dsm.pt; run the eval app with rerank=dsm and output_dir={run} to write it."
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle / runtime / zip errors
        raise DsmFigureError(f"{PROG}: cannot read {path}: {type(err).__name__}: {err}") from None
    if not isinstance(saved, dict):
        raise DsmFigureError(f"{PROG}: {path} is not a dsm.pt of the eval app (a dict); got {type(saved).__name__}.")
    for key in ("inliers", "ranks"):
        if saved.get(key) is None:
            raise DsmFigureError(
                f"{PROG}: {path} has no {key!r} (the DSM re-ranking did not run); re-run the eval app with rerank=dsm."
            )
    inl, ranks = torch.as_tensor(saved["inliers"]), torch.as_tensor(saved["ranks"])
    if inl.ndim != 2 or inl.shape != ranks.shape:
        raise DsmFigureError(
            f"{PROG}: {path} must hold 'inliers' and 'ranks' of one shape (Q, top); got {tuple(inl.shape)} and "
            f"{tuple(ranks.shape)}."
        )
    gnd = saved.get("gnd")
    if gnd is None or len(gnd) != inl.shape[0]:
        raise DsmFigureError(
            f"{PROG}: {path} must hold a ground truth 'gnd' for each of its {inl.shape[0]} queries; got "
            f"{'none' if gnd is None else len(gnd)}."
        )
    saved["inliers"], saved["ranks"] = inl.long(), ranks.long()
    return saved


# ------------------------------------------------------------------------------------------------- Fig. 6


def split_by_gnd(gnd: dict[str, Any], protocol: str) -> tuple[set[int], set[int]]:
    """The positive and the junk database indices of one query under ``protocol`` (``"medium"``/``"hard"``).

    Revisited ground truth (``easy``/``hard``/``junk``): medium positives are easy + hard, junk is junk; hard
    positives are hard, junk is junk + easy. An old-protocol entry (``ok``/``junk``) is the same in both.
    """
    if protocol not in PROTOCOLS:
        raise DsmFigureError(f"{PROG}: --protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}.")

    def ids(key: str) -> set[int]:
        return {int(v) for v in np.asarray(gnd.get(key, []), dtype=np.int64).reshape(-1)}

    if "ok" in gnd and "easy" not in gnd and "hard" not in gnd:
        return ids("ok"), ids("junk")
    if protocol == "medium":
        return ids("easy") | ids("hard"), ids("junk")
    return ids("hard"), ids("junk") | ids("easy")


@dataclass(frozen=True)
class InlierStats:
    """Inlier counts of the shortlisted database images, split by the ground truth.

    Attributes:
        positive: Inlier counts of the positive images (one per (query, shortlisted image)), int64.
        negative: Inlier counts of the negative images.
        junk: Number of shortlisted junk images (left out).
        queries: Number of queries.
        top: Shortlist length.
    """

    positive: np.ndarray
    negative: np.ndarray
    junk: int
    queries: int
    top: int


def inlier_stats(saved: dict[str, Any], protocol: str = "medium") -> InlierStats:
    """The inlier counts of :func:`load_dsm`'s shortlists, split into positives and negatives (junk left out)."""
    inl, ranks = saved["inliers"].numpy(), saved["ranks"].numpy()
    pos: list[int] = []
    neg: list[int] = []
    junk = 0
    for qi in range(inl.shape[0]):
        positives, junks = split_by_gnd(saved["gnd"][qi], protocol)
        for d, n in zip(ranks[qi].tolist(), inl[qi].tolist(), strict=True):
            if d < 0:  # padding, if a writer ever pads
                continue
            if d in junks:
                junk += 1
            elif d in positives:
                pos.append(n)
            else:
                neg.append(n)
    return InlierStats(np.asarray(pos, np.int64), np.asarray(neg, np.int64), junk, inl.shape[0], inl.shape[1])


def _bins(top: int) -> np.ndarray:
    """Integer bin edges ``[0, w, 2w, ..., > top]``: width 1 up to ``MAX_BINS`` bins, wider beyond."""
    width = max(1, math.ceil((top + 1) / MAX_BINS))
    return np.arange(0, top + width + 1, width)


def plot_inliers(stats: InlierStats, title: str, out: Path) -> None:
    """Fig. 6: fraction of the matched positive / negative images per bin of inlier counts, as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = int(max([0, *stats.positive.tolist(), *stats.negative.tolist()]))
    edges = _bins(top)
    width = float(edges[1] - edges[0])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    series = (
        ("positive images", stats.positive, "tab:green", -0.2),
        ("negative images", stats.negative, "tab:red", 0.2),
    )
    for label, counts, color, shift in series:
        hist, _ = np.histogram(counts, bins=edges)
        frac = hist / max(len(counts), 1)
        x = edges[:-1] + (width - 1) / 2 + shift * width
        ax.bar(x, frac, width=0.4 * width, color=color, alpha=0.85, label=f"{label} ({len(counts)})")
    ax.set_xlabel("number of inliers" + (f" (bins of {int(width)})" if width > 1 else ""))
    ax.set_ylabel("fraction of matched images")
    ax.set_xlim(edges[0] - 0.5 * width, edges[-1] - 0.5)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def _save(fig: Any, out: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    with atomic_write(out, "wb") as fh:
        fh.write(buf.getvalue())


def parse_thresholds(text: str) -> list[int]:
    """``"0,2,5"`` as sorted unique ints >= 0."""
    try:
        vals = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        vals = []
    if not vals or vals[0] < 0:
        raise DsmFigureError(f"{PROG}: --thresholds must be comma-separated ints >= 0; got {text!r}.")
    return vals


def _median(a: np.ndarray) -> str:
    return f"{float(np.median(a)):.1f}" if len(a) else "n/a"


def _mean(a: np.ndarray) -> str:
    return f"{float(a.mean()):.2f}" if len(a) else "n/a"


def _frac(a: np.ndarray, n: int) -> str:
    return f"{float((a <= n).mean()):.4f}" if len(a) else "n/a"


def summary_lines(stats: InlierStats, thresholds: Sequence[int]) -> list[str]:
    """The printed summary of :func:`inlier_stats` (one line per series, then one per threshold)."""
    lines = []
    for name, a in (("positive", stats.positive), ("negative", stats.negative)):
        lines.append(f"  {name} images: {len(a)}, inliers median {_median(a)}, mean {_mean(a)}")
    lines.append(f"  junk images (left out): {stats.junk}")
    for n in thresholds:
        neg, pos = _frac(stats.negative, n), _frac(stats.positive, n)
        lines.append(f"  <= {n} inliers: {neg} of the negatives, {pos} of the positives")
    return lines


# ------------------------------------------------------------------------------------------------- Fig. 5


def map_to_image(
    centers: torch.Tensor | np.ndarray,
    covariances: torch.Tensor | np.ndarray,
    map_hw: Sequence[int],
    image_wh: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(n, 2)`` and covariances ``(n, 2, 2)`` of an ``h x w`` activation map in pixels of a ``W x H`` image.

    ``x' = (x + 0.5) W / w - 0.5``, ``y' = (y + 0.5) H / h - 0.5``; covariances scale by ``diag(W/w, H/h)`` on both
    sides.

    Example:
        >>> c, s = map_to_image(np.array([[0.0, 0.0]]), np.eye(2)[None], (2, 4), (40, 20))
        >>> c.tolist(), s[0].diagonal().tolist()
        ([[4.5, 4.5]], [100.0, 100.0])
    """
    h, w = (float(v) for v in map_hw)
    big_w, big_h = (float(v) for v in image_wh)
    f = np.array([big_w / w, big_h / h])
    c = (np.asarray(centers, np.float64).reshape(-1, 2) + 0.5) * f - 0.5
    s = np.asarray(covariances, np.float64).reshape(-1, 2, 2) * (f[:, None] * f[None, :])
    return c, s


@dataclass(frozen=True)
class PairMatch:
    """One (query, re-ranked result) pair of a run and its recomputed spatial match.

    Attributes:
        query: Query index.
        rank: Position in the re-ranked shortlist (0 = top).
        db: Database index.
        label: ``"positive"``, ``"negative"`` or ``"junk"`` under the protocol.
        stored: Inlier count stored in the run.
        match: :func:`spatial_match` of the pair (``return_matches=True``), batch of one.
    """

    query: int
    rank: int
    db: int
    label: str
    stored: int
    match: SpatialMatch

    @property
    def inliers(self) -> int:
        return int(self.match.inliers[0])

    @property
    def tentative(self) -> int:
        assert self.match.matches is not None
        return int((self.match.matches[0, :, 0] >= 0).sum())


def _features(saved: dict[str, Any], key: str) -> LocalFeatures:
    d = saved.get(key)
    if d is None:
        raise DsmFigureError(f"{PROG}: dsm.pt has no {key!r}; re-run the eval app with rerank=dsm.")
    return LocalFeatures.from_dict(d)


def match_pair(saved: dict[str, Any], query: int, rank: int, protocol: str = "medium") -> PairMatch:
    """Recompute the spatial match of query ``query`` and its ``rank``-th re-ranked result with the run's settings.

    Raises:
        DsmFigureError: If ``query`` or ``rank`` is out of range, or the features are missing.
    """
    inl, ranks = saved["inliers"], saved["ranks"]
    nq, top = ranks.shape
    if not 0 <= query < nq:
        raise DsmFigureError(f"{PROG}: --pair QUERY must be in 0..{nq - 1} (the run has {nq} queries); got {query}.")
    if not 0 <= rank < top:
        raise DsmFigureError(
            f"{PROG}: --pair RANK must be in 0..{top - 1} (the re-ranked shortlist has {top} images); got {rank}."
        )
    q_feats, db_feats = _features(saved, "q_local_features"), _features(saved, "db_local_features")
    d = int(ranks[query, rank])
    if not (0 <= d < len(db_feats)) or query >= len(q_feats):
        raise DsmFigureError(
            f"{PROG}: dsm.pt is inconsistent: database image {d} of query {query} has no local features "
            f"({len(q_feats)} query and {len(db_feats)} database rows)."
        )
    cfg = saved.get("dsm") or {}
    settings = {k: cfg[k] for k in ("error", "max_scale_change", "lo_iters") if cfg.get(k) is not None}
    m = spatial_match(
        q_feats[query], db_feats[d], torch.zeros(1, 2, dtype=torch.int64), return_matches=True, **settings
    )
    positives, junk = split_by_gnd(saved["gnd"][query], protocol)
    label = "junk" if d in junk else "positive" if d in positives else "negative"
    return PairMatch(query, rank, d, label, int(inl[query, rank]), m)


def _read(path: str, what: str) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise DsmFigureError(f"{PROG}: cannot read {what} image {path}: {type(err).__name__}: {err}") from None


def _ellipse(ax: Any, c: np.ndarray, s: np.ndarray, color: Any, clip: Any) -> None:
    from matplotlib.patches import Ellipse

    vals, vecs = np.linalg.eigh(s)
    vals = np.clip(vals, 0.0, None)
    angle = math.degrees(math.atan2(vecs[1, 1], vecs[0, 1]))  # the major axis (largest eigenvalue last)
    ax.add_patch(
        Ellipse(
            (c[0], c[1]),
            2 * ELLIPSE_FACTOR * math.sqrt(vals[1]),
            2 * ELLIPSE_FACTOR * math.sqrt(vals[0]),
            angle=angle,
            fill=False,
            edgecolor=color,
            linewidth=1.6,
            clip_path=clip,
        )
    )


def pair_images(saved: dict[str, Any], pair: PairMatch) -> tuple[Any, Any]:
    """The pair's query image (RGB, cropped to its box) and database image, as PIL images.

    Raises:
        DsmFigureError: If dsm.pt lacks the paths or an image cannot be read.
    """
    queries, images = saved.get("queries"), saved.get("images")
    if queries is None or images is None or pair.query >= len(queries) or pair.db >= len(images):
        raise DsmFigureError(f"{PROG}: dsm.pt has no image paths for query {pair.query} and database image {pair.db}.")
    qimg = _read(str(queries[pair.query]), "query")
    bbx = list(saved.get("bbx") or [])
    if pair.query < len(bbx) and bbx[pair.query] is not None:
        try:
            qimg = crop_query(qimg, bbx[pair.query], query=str(queries[pair.query]))
        except ValueError as err:
            raise DsmFigureError(f"{PROG}: {err}") from None
    return qimg, _read(str(images[pair.db]), "database")


def plot_pair(saved: dict[str, Any], pair: PairMatch, qimg: Any, dimg: Any, out: Path) -> tuple[int, int]:
    """Fig. 5 of one pair: both images, the inlier ellipses and lines; returns the PNG's (width, height).

    ``qimg`` (the query's crop) and ``dimg`` are the PIL images of :func:`pair_images`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    sides = []
    x0 = 0.0
    for img in (qimg, dimg):
        scale = PAIR_HEIGHT / img.height
        w = max(1, round(img.width * scale))
        sides.append((img.resize((w, PAIR_HEIGHT)), scale, x0))
        x0 += w + GAP
    canvas = np.full((PAIR_HEIGHT, int(x0 - GAP), 3), 255, np.uint8)
    for img, _, off in sides:
        canvas[:, int(off) : int(off) + img.width] = np.asarray(img)
    dpi = 100
    head = 70
    fig = plt.figure(figsize=(canvas.shape[1] / dpi, (PAIR_HEIGHT + head) / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, PAIR_HEIGHT / (PAIR_HEIGHT + head)))
    ax.imshow(canvas, interpolation="bilinear")
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
    ax.set_ylim(PAIR_HEIGHT - 0.5, -0.5)
    ax.axis("off")
    m = pair.match
    assert m.matches is not None
    assert m.inlier_mask is not None
    idx = m.matches[0][m.inlier_mask[0]].numpy()
    qs, ds = (int(v) for v in m.scale_pairs[0])
    if len(idx):
        q_feats, db_feats = _features(saved, "q_local_features"), _features(saved, "db_local_features")
        pts = []
        for feats, row, s, k, (img, scale, off), orig in (
            (q_feats, pair.query, qs, idx[:, 0], sides[0], qimg),
            (db_feats, pair.db, ds, idx[:, 1], sides[1], dimg),
        ):
            hw = feats.map_sizes[row, s].tolist()
            c, cov = map_to_image(feats.centers[row, k], feats.covariances[row, k], hw, orig.size)
            c = (c + 0.5) * scale - 0.5  # original pixels -> the displayed image
            c[:, 0] += off
            clip = Rectangle((off - 0.5, -0.5), img.width, PAIR_HEIGHT, transform=ax.transData)
            pts.append((c, cov * scale**2, clip))  # each image's ellipses stay on that image
        cmap = plt.get_cmap("hsv")
        for t in range(len(idx)):
            color = cmap(t / max(len(idx), 1))
            for c, cov, clip in pts:
                _ellipse(ax, c[t], cov[t], color, clip)
            ax.plot([pts[0][0][t, 0], pts[1][0][t, 0]], [pts[0][0][t, 1], pts[1][0][t, 1]], color=color, lw=1.0)
    scales = list((saved.get("dsm") or {}).get("scales") or [])
    at = ""
    if qs >= 0:
        names = [f"{scales[i]:.3g}" if i < len(scales) else f"#{i}" for i in (qs, ds)]
        at = f", query scale {names[0]}, database scale {names[1]}"
    fig.text(
        0.5,
        1 - 8 / (PAIR_HEIGHT + head),
        f"query {pair.query} and its re-ranked result {pair.rank} (database image {pair.db}, {pair.label}): "
        f"{pair.inliers} inliers of {pair.tentative} tentative correspondences{at} (stored: {pair.stored})",
        ha="center",
        va="top",
        fontsize=9,
    )
    fig.text(
        0.5,
        1 - 38 / (PAIR_HEIGHT + head),
        f"inlier features: their ellipses at {ELLIPSE_FACTOR:g} sigma ({ELLIPSE_FACTOR:g} x the 1-sigma ellipse of "
        "the covariance), lines join corresponding centres, one colour per correspondence",
        ha="center",
        va="top",
        fontsize=8,
        color="0.3",
    )
    _save(fig, out)
    plt.close(fig)
    return canvas.shape[1], PAIR_HEIGHT + head


# ------------------------------------------------------------------------------------------------- the CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m lightning_apps.{PROG}", description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, metavar="RUN_DIR", help="an eval run folder with dsm.pt (rerank=dsm)")
    p.add_argument("--inliers", type=Path, metavar="OUT.png", help="write Fig. 6, the inlier distribution")
    p.add_argument(
        "--pair", type=int, nargs=2, metavar=("QUERY", "RANK"), help="Fig. 5 of query QUERY and its RANK-th result"
    )
    p.add_argument("--out", type=Path, metavar="OUT.png", help="the --pair figure")
    p.add_argument("--protocol", choices=PROTOCOLS, default="medium", help="positives and junk (default medium)")
    p.add_argument("--thresholds", default=DEFAULT_THRESHOLDS, help="print the fractions with <= N inliers")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Do what the arguments ask; returns ``{"stats": InlierStats, "pair": PairMatch or None}``."""
    if args.inliers is None and args.pair is None:
        raise DsmFigureError(f"{PROG}: nothing to draw; give --inliers OUT.png and/or --pair QUERY RANK --out OUT.png.")
    if args.pair is not None and args.out is None:
        raise DsmFigureError(f"{PROG}: --pair QUERY RANK needs --out OUT.png.")
    if args.pair is None and args.out is not None:
        raise DsmFigureError(f"{PROG}: --out is the --pair figure; give --pair QUERY RANK as well.")
    thresholds = parse_thresholds(args.thresholds)
    saved = load_dsm(args.run)
    result: dict[str, Any] = {"stats": None, "pair": None}
    images = None
    if args.pair is not None:  # checked first: a bad index or image fails before anything is written
        result["pair"] = match_pair(saved, args.pair[0], args.pair[1], args.protocol)
        images = pair_images(saved, result["pair"])
    stats = inlier_stats(saved, args.protocol)
    result["stats"] = stats
    cfg = saved.get("dsm") or {}
    if args.inliers is not None:
        print(
            f"{PROG}: {args.run / 'dsm.pt'}: {stats.queries} queries, top {stats.top} re-ranked, "
            f"{args.protocol} protocol"
        )
        for line in summary_lines(stats, thresholds):
            print(line)
        setting = ", ".join(f"{k}={cfg[k]:g}" for k in ("error", "max_scale_change") if cfg.get(k) is not None)
        title = (
            f"DSM inliers, {run_name(args.run)}: all {stats.queries} queries, top {stats.top}, "
            f"{args.protocol} protocol" + (f" ({setting})" if setting else "")
        )
        plot_inliers(stats, title, args.inliers)
        print(args.inliers)
    pair = result["pair"]
    if pair is not None:
        print(
            f"{PROG}: query {pair.query} vs re-ranked result {pair.rank} (database image {pair.db}, {pair.label}): "
            f"{pair.inliers} inliers of {pair.tentative} tentative correspondences (stored: {pair.stored})"
        )
        assert images is not None
        plot_pair(saved, pair, *images, args.out)
        print(args.out)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on a user error, one line on stderr)."""
    return cli_main(PROG, _parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
