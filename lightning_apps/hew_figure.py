"""Fig. 1 of the HeW paper for one photo: which deep local features heat-diffusion weighting favours.

Usage::

    python -m lightning_apps.hew_figure [--image PATH] [--backbone vgg16|mobilenet_v2] [--imsize 512]
        [--lam L] [--variant paper|hewr] [--region x0,y0,x1,y1] [--out hew.png]

Writes one PNG (atomically) with four titled panels, as in Fig. 1 of "Heat diffusion based feature weighting
and re-ranking" (HeW): (1) the image; (2) SPoC's weights, uniform ``1/n``, as a heat map over the image; (3)
HeW's weights (:func:`deepagg.functional.hew_weights` on the backbone's post-ReLU feature map), normalised to
mean 1 over the valid positions, as a heat map with a colour bar from their min to their max; (4) the weights
of a bursty region: the region outlined on the HeW heat map and a strip chart of the HeW weights of the cells
inside it against those outside, with both means. Warmer colours are larger weights; panels 2 to 4 share one
colour scale, so SPoC's uniform weights (1 after the same normalisation) show as one flat colour.

The region is ``--region`` (pixels of the original image; the feature cells whose centres fall inside it, or
the cell under its centre) or, by default, the most repetitive 3 x 3 window of feature cells: the one whose
cells have the highest mean cosine similarity to all the other cells of the image. The means inside and
outside are printed, then the output path.

The image is resized as the eval app resizes database images (long side ``min(imsize, L)``, antialiased
bilinear, ImageNet normalisation). Without ``--image`` it is a photo of the embedded ``clutter`` benchmark
under ``$DEEPAGG_DATA`` (default ``~/.cache/deepagg/data``): the first database image that shows one whole,
unoccluded object whose box is 30-60 % of the image's long side (a distinctive object on a large background),
else the first database image. The benchmark is not built here (``python -m lightning_apps.eval`` builds it).
``--variant hewr`` centres the features by the mean local feature of this image itself (the authors centre
by a training-set mean), which the panel says. User errors (missing image or dataset, bad region, missing
weight package) are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2 import functional as TF

from deepagg._io import atomic_write
from deepagg.backbones import WeightsNotFoundError, imagenet_normalize, mobilenet_v2, vgg16
from deepagg.data import ImageReadError, load_gnd, read_image
from deepagg.functional import hew_weights
from deepagg.nn.heat import HEW_DEFAULT_LAM
from lightning_apps.extract import target_size

__all__ = [
    "HewFigureError",
    "Labels",
    "RegionStats",
    "cells_from_pixels",
    "colormap",
    "colour_bar",
    "default_image",
    "heat_overlay",
    "hew_weight_map",
    "load_backbone",
    "load_font",
    "main",
    "most_repetitive_region",
    "region_stats",
    "render",
    "wrap_text",
]

BACKBONES = ("vgg16", "mobilenet_v2")
VARIANTS = ("paper", "hewr")
MIN_SIDE = 32  # as the eval app: below it a CNN map is a few cells or none
WINDOW = 3  # side, in feature cells, of the automatic bursty region
PANEL_SIDE = 440  # long side of the image in each panel, pixels
MARGIN = 10
FOOTER = 124  # height of the colour-bar / chart strip under each image
ALPHA = 0.62  # opacity of the heat map over the (grey) image
INVALID_RGB = (128, 128, 128)

# Jet-like colour map (dark blue, blue, cyan, yellow, red, dark red): warmer colours for larger values.
_ANCHORS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_ANCHOR_RGB = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], float)
LUT: np.ndarray = (
    np.stack([np.interp(np.linspace(0.0, 1.0, 256), _ANCHORS, _ANCHOR_RGB[:, c]) for c in range(3)], axis=-1)
    .round()
    .astype(np.uint8)
)
"""The 256 x 3 uint8 colour table of :func:`colormap`."""


class HewFigureError(ValueError):
    """A user error (missing image or dataset, bad argument): one line on stderr, exit code 2."""


@dataclass(frozen=True)
class RegionStats:
    """HeW weights (mean-1 normalised) of the valid cells inside and outside a region.

    Attributes:
        mean_inside: Mean weight of the valid cells inside (NaN if none).
        mean_outside: Mean weight of the valid cells outside (NaN if none).
        n_inside: Number of valid cells inside.
        n_outside: Number of valid cells outside.
    """

    mean_inside: float
    mean_outside: float
    n_inside: int
    n_outside: int

    @property
    def ratio(self) -> float:
        """``mean_inside / mean_outside`` (NaN if either is undefined)."""
        if not (math.isfinite(self.mean_inside) and math.isfinite(self.mean_outside)) or self.mean_outside == 0:
            return math.nan
        return self.mean_inside / self.mean_outside


@dataclass(frozen=True)
class Labels:
    """The panel titles and the caption of :func:`render`.

    Attributes:
        image: Title of panel 1.
        hew: Title of panel 3.
        region: Title of panel 4.
        caption: Extra line under the image of panel 1 (e.g. backbone and grid size).
    """

    image: str = "Image"
    hew: str = "HeW weights"
    region: str = "Weights of a bursty region"
    caption: str = ""


# ------------------------------------------------------------------------------------------------ weights


def hew_weight_map(maps: torch.Tensor, *, lam: float, variant: str = "paper") -> tuple[np.ndarray, str]:
    """HeW weights of one feature map, NaN where a position takes no part (a zero feature, ``"paper"``).

    Args:
        maps: Feature map of shape :math:`(1, C, h, w)`, non-negative (post-ReLU).
        lam: Ground conductance, > 0.
        variant: ``"paper"``, or ``"hewr"`` with the features centred by this image's own mean local feature.

    Returns:
        ``(weights, note)``: a float64 array of shape :math:`(h, w)` and a short note on the centring ("" for
        ``"paper"``).

    Raises:
        HewFigureError: If no position gets a finite positive weight.

    Example:
        >>> w, note = hew_weight_map(torch.rand(1, 8, 3, 4), lam=1.0)
        >>> w.shape, note
        ((3, 4), '')
    """
    x = maps.detach().to(torch.float64)
    if variant == "hewr":
        center = x.mean(dim=(0, 2, 3))
        w = hew_weights(x, lam=lam, variant="hewr", center=center)[0]
        note = "centre = mean local feature of this image"
    else:
        w = hew_weights(x, lam=lam, variant="paper")[0]
        note = ""
    out = w.cpu().numpy().astype(np.float64)
    out[~(np.isfinite(out) & (out > 0))] = np.nan
    if not np.isfinite(out).any():
        raise HewFigureError(
            "hew_figure: HeW gives no finite positive weight for this image (all features zero, or a kernel that "
            "is not positive definite); try another image or a larger --lam."
        )
    return out, note


def most_repetitive_region(maps: torch.Tensor, size: int = WINDOW) -> tuple[int, int, int, int]:
    """The ``size`` x ``size`` window of feature cells that is most similar to the rest of the image.

    Each non-zero cell scores the mean cosine similarity of its feature to those of all other non-zero cells;
    the window (clipped to the grid) with the highest mean score over its non-zero cells wins, the first in
    row-major order on a tie.

    Args:
        maps: Feature map of shape :math:`(1, C, h, w)`.
        size: Window side in cells.

    Returns:
        The window as a half-open cell box ``(x0, y0, x1, y1)``.

    Example:
        >>> f = torch.zeros(1, 2, 4, 4)
        >>> f[0, 0] = 1.0
        >>> f[0, :, 0, 0] = torch.tensor([0.0, 1.0])  # the one distinctive cell, top left
        >>> most_repetitive_region(f, size=2)
        (1, 0, 3, 2)
    """
    _, c, h, w = maps.shape
    f = maps.detach().to(torch.float64)[0].reshape(c, h * w).T
    norm = f.norm(dim=1)
    valid = norm > 0
    u = torch.where(valid[:, None], f / norm.clamp(min=1e-300)[:, None], torch.zeros_like(f))
    sim = u @ u.T
    n_valid = int(valid.sum())
    score = (sim.sum(1) - valid.to(sim.dtype)) / max(n_valid - 1, 1)  # minus the self term (1 for valid cells)
    s = torch.where(valid, score, torch.zeros_like(score)).reshape(h, w).numpy()
    v = valid.reshape(h, w).numpy().astype(np.float64)
    kh, kw = min(size, h), min(size, w)
    best, box = -math.inf, (0, 0, kw, kh)
    for y in range(h - kh + 1):
        for x in range(w - kw + 1):
            nv = v[y : y + kh, x : x + kw].sum()
            if nv == 0:
                continue
            mean = s[y : y + kh, x : x + kw].sum() / nv
            if mean > best + 1e-12:
                best, box = mean, (x, y, x + kw, y + kh)
    return box


def cells_from_pixels(
    box: tuple[float, float, float, float], image_wh: tuple[int, int], grid_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Feature cells of a pixel box: those whose centres lie inside it, else the cell under its centre.

    The ``h x w`` grid is spread evenly over the image, cell ``(y, x)`` covering
    ``[x W/w, (x+1) W/w) x [y H/h, (y+1) H/h)``.

    Args:
        box: ``(x0, y0, x1, y1)`` in pixels of the image.
        image_wh: ``(W, H)`` of the image.
        grid_hw: ``(h, w)`` of the feature grid.

    Returns:
        A half-open cell box ``(x0, y0, x1, y1)``.

    Example:
        >>> cells_from_pixels((0, 0, 100, 50), (400, 200), (4, 8))
        (0, 0, 2, 1)
    """
    (bw, bh), (gh, gw) = image_wh, grid_hw

    def span(lo: float, hi: float, side: int, cells: int) -> tuple[int, int]:
        cell = side / cells
        first = max(0, math.ceil(lo / cell - 0.5))
        last = min(cells - 1, math.floor(hi / cell - 0.5))
        if first > last:  # narrower than a cell: the cell under the centre
            first = last = min(cells - 1, max(0, int((lo + hi) / 2 / cell)))
        return first, last + 1

    x0, x1 = span(box[0], box[2], bw, gw)
    y0, y1 = span(box[1], box[3], bh, gh)
    return x0, y0, x1, y1


def _region_mask(shape: tuple[int, int], region: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = region
    mask = np.zeros(shape, dtype=bool)
    mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    return mask


def _normalise(weights: np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    valid = np.isfinite(w) & (w > 0)
    if not valid.any():
        raise HewFigureError("hew_figure: the weight map has no finite positive weight.")
    out = np.full(w.shape, np.nan)
    out[valid] = w[valid] / w[valid].mean()
    return out


def region_stats(weights: np.ndarray, region: tuple[int, int, int, int]) -> RegionStats:
    """Mean of the mean-1 normalised weights of the valid cells inside and outside a cell box.

    Args:
        weights: Weights of shape :math:`(h, w)`; non-finite or non-positive entries are invalid cells.
        region: Half-open cell box ``(x0, y0, x1, y1)``.

    Returns:
        The :class:`RegionStats`.

    Example:
        >>> w = np.ones((4, 4))
        >>> w[:2, :2] = 0.25
        >>> s = region_stats(w, (0, 0, 2, 2))
        >>> round(s.mean_inside, 3), round(s.mean_outside, 3), s.n_inside, s.n_outside
        (0.308, 1.231, 4, 12)
    """
    w = _normalise(weights)
    valid = np.isfinite(w)
    inside = _region_mask(w.shape, region)
    a, b = w[valid & inside], w[valid & ~inside]
    return RegionStats(
        float(a.mean()) if a.size else math.nan, float(b.mean()) if b.size else math.nan, int(a.size), int(b.size)
    )


# ------------------------------------------------------------------------------------------------ drawing


def colormap(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map values linearly from ``[vmin, vmax]`` to the jet-like :data:`LUT` (NaN: grey).

    Args:
        values: Array of any shape.
        vmin: Value of the coolest colour.
        vmax: Value of the warmest colour (``vmax <= vmin``: everything mid-scale).

    Returns:
        uint8 RGB array of shape ``values.shape + (3,)``.

    Example:
        >>> colormap(np.array([0.0, 1.0, np.nan]), 0.0, 1.0).tolist()
        [[0, 0, 128], [128, 0, 0], [128, 128, 128]]
    """
    v = np.asarray(values, dtype=np.float64)
    t = np.full(v.shape, 0.5) if vmax <= vmin else (v - vmin) / (vmax - vmin)
    idx = np.clip(np.nan_to_num(t, nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.int64)
    rgb = LUT[idx]
    rgb[~np.isfinite(v)] = INVALID_RGB
    return rgb


def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at ``size`` px (the fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def wrap_text(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int
) -> list[str]:
    """``text`` broken into lines no wider than ``width`` px (paragraphs at newlines kept)."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split():
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def heat_overlay(gray: Image.Image, values: np.ndarray, vmin: float, vmax: float, size: tuple[int, int]) -> Image.Image:
    """``values`` (h, w) as a colour map blended over the grey image, bilinear between cell centres."""
    v = np.asarray(values, dtype=np.float64)
    valid = np.isfinite(v)
    filled = np.where(valid, v, np.nanmean(v) if valid.any() else 0.0).astype(np.float32)
    up = np.asarray(Image.fromarray(filled, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    holes = np.asarray(Image.fromarray(~valid).resize(size, Image.Resampling.NEAREST), dtype=bool)
    up[holes] = np.nan
    colour = colormap(up, vmin, vmax).astype(np.float64)
    base = np.asarray(gray.convert("RGB"), dtype=np.float64)
    out = (1.0 - ALPHA) * base + ALPHA * colour
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8), mode="RGB")


def colour_bar(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    vmin: float,
    vmax: float,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    marks: Sequence[float] = (),
) -> None:
    """A horizontal colour bar from ``vmin`` to ``vmax`` in ``box``, labelled at both ends and at ``marks``."""
    x0, y0, x1, y1 = box
    ramp = colormap(np.linspace(vmin, vmax, max(x1 - x0, 2)), vmin, vmax)
    for i, (r, g, b) in enumerate(ramp[: x1 - x0]):
        draw.line([(x0 + i, y0), (x0 + i, y1)], fill=(int(r), int(g), int(b)))
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0, y1 + 3), f"min {vmin:.2f}", fill=(0, 0, 0), font=font)
    right = f"max {vmax:.2f}"
    draw.text((x1 - draw.textlength(right, font=font), y1 + 3), right, fill=(0, 0, 0), font=font)
    for m in marks:
        if vmax > vmin and vmin <= m <= vmax:
            xm = x0 + (m - vmin) / (vmax - vmin) * (x1 - x0)
            draw.line([(xm, y0 - 3), (xm, y1 + 3)], fill=(0, 0, 0), width=2)
            label = f"{m:g}"
            draw.text((xm - draw.textlength(label, font=font) / 2, y0 - 16), label, fill=(0, 0, 0), font=font)


def _strip_chart(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    weights: np.ndarray,
    inside: np.ndarray,
    stats: RegionStats,
    vmin: float,
    vmax: float,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    """Per group (inside / outside) a bar to the mean, in the mean's colour, and one dot per cell."""
    x0, y0, x1, _ = box
    label_w = int(max(draw.textlength(t, font=font) for t in ("inside (n=0000)", "outside (n=0000)"))) + 8
    ax0, ax1 = x0 + label_w, x1 - 8
    top = max(vmax, 1.0) * 1.05

    def px(value: float) -> float:
        return ax0 + min(max(value, 0.0), top) / top * (ax1 - ax0)

    valid = np.isfinite(weights)
    rng = np.random.default_rng(0)
    rows = (
        ("inside", valid & inside, stats.mean_inside, stats.n_inside),
        ("outside", valid & ~inside, stats.mean_outside, stats.n_outside),
    )
    row_h = 24
    for k, (name, sel, mean, n) in enumerate(rows):
        yc = y0 + 10 + k * row_h + row_h // 2
        draw.text((x0, yc - 7), f"{name} (n={n})", fill=(0, 0, 0), font=font)
        if math.isfinite(mean):
            r, g, b = colormap(np.array([mean]), vmin, vmax)[0]
            draw.rectangle((ax0, yc - 8, px(mean), yc + 8), fill=(int(r), int(g), int(b)), outline=(0, 0, 0))
        vals = weights[sel]
        jitter = rng.uniform(-6.0, 6.0, size=vals.size)
        for value, dy in zip(vals.tolist(), jitter.tolist(), strict=True):
            xv, yv = px(value), yc + dy
            draw.ellipse((xv - 1.5, yv - 1.5, xv + 1.5, yv + 1.5), fill=(20, 20, 20))
        if math.isfinite(mean):
            draw.line([(px(mean), yc - 11), (px(mean), yc + 11)], fill=(0, 0, 0), width=2)
    ya = y0 + 10 + 2 * row_h + 4
    draw.line([(ax0, ya), (ax1, ya)], fill=(0, 0, 0))
    for tick in sorted({0.0, 1.0, round(vmax, 2)}):
        xt = px(tick)
        draw.line([(xt, ya), (xt, ya + 4)], fill=(0, 0, 0))
        label = f"{tick:g}"
        draw.text((xt - draw.textlength(label, font=font) / 2, ya + 5), label, fill=(0, 0, 0), font=font)
    ratio = "n/a" if not math.isfinite(stats.ratio) else f"{stats.ratio:.2f}"
    text = f"mean inside {_fmt(stats.mean_inside)} / mean outside {_fmt(stats.mean_outside)} = {ratio}"
    draw.text((x0, ya + 22), text, fill=(0, 0, 0), font=font)


def _fmt(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


def render(
    image: Image.Image,
    weights: np.ndarray,
    region: tuple[int, int, int, int],
    *,
    labels: Labels | None = None,
) -> tuple[Image.Image, RegionStats]:
    """The four-panel figure: image, SPoC weights, HeW weights, the weights of a bursty region.

    Needs no backbone: ``weights`` is any :math:`(h, w)` map of positive weights over the image (cells spread
    evenly over it); non-finite or non-positive entries are invalid cells (grey, left out of every mean). The
    weights are normalised to mean 1 over the valid cells; SPoC's uniform ``1/n`` becomes 1 everywhere, drawn
    on the same colour scale (the min and max of the normalised weights).

    Args:
        image: The photo (any mode; shown as RGB, fitted to a :data:`PANEL_SIDE` px long side).
        weights: Weight map of shape :math:`(h, w)`.
        region: Half-open cell box ``(x0, y0, x1, y1)`` of the bursty region.
        labels: Panel titles (None: generic ones).

    Returns:
        ``(figure, stats)``: the RGB figure and the inside/outside means of the normalised weights.

    Example:
        >>> w = np.ones((6, 8))
        >>> w[:3, :3] = 0.2
        >>> fig, stats = render(Image.new("RGB", (160, 120), (90, 140, 60)), w, (0, 0, 3, 3))
        >>> fig.mode, stats.mean_inside < stats.mean_outside
        ('RGB', True)
    """
    labels = labels or Labels()
    if np.ndim(weights) != 2:
        raise ValueError(f"render(): weights must be 2-D (h, w); got shape {np.shape(weights)}.")
    w = _normalise(weights)
    gh, gw = w.shape
    stats = region_stats(w, region)
    valid = np.isfinite(w)
    vmin, vmax = float(w[valid].min()), float(w[valid].max())

    rgb = image.convert("RGB")
    scale = PANEL_SIDE / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    shown = rgb.resize(size, Image.Resampling.LANCZOS)
    gray = shown.convert("L")
    spoc = np.where(valid, 1.0, np.nan)

    title_font, font = load_font(15), load_font(12)
    pw = size[0] + 2 * MARGIN
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    hew_title = labels.hew
    spoc_title = f"SPoC weights: uniform 1/n (n = {int(valid.sum())} cells), = 1 on the mean-1 scale"
    titles = [labels.image, spoc_title, hew_title, labels.region]
    wrapped = [wrap_text(probe, t, title_font, pw - 2 * MARGIN) for t in titles]
    title_h = 8 + 19 * max(len(lines) for lines in wrapped)
    ph = title_h + size[1] + FOOTER
    fig = Image.new("RGB", (2 * pw, 2 * ph), (255, 255, 255))
    draw = ImageDraw.Draw(fig)

    cell_w, cell_h = size[0] / gw, size[1] / gh
    x0, y0, x1, y1 = region
    panels = [
        shown,
        heat_overlay(gray, spoc, vmin, vmax, size),
        heat_overlay(gray, w, vmin, vmax, size),
        heat_overlay(gray, w, vmin, vmax, size),
    ]
    for k, (panel, lines) in enumerate(zip(panels, wrapped, strict=True)):
        ox, oy = (k % 2) * pw, (k // 2) * ph
        for i, line in enumerate(lines):
            draw.text((ox + MARGIN, oy + 6 + 19 * i), line, fill=(0, 0, 0), font=title_font)
        ix, iy = ox + MARGIN, oy + title_h
        fig.paste(panel, (ix, iy))
        fy = iy + size[1] + 8
        bar = (ix + 6, fy + 22, ix + size[0] - 6, fy + 38)
        if k == 0:
            text = f"{rgb.width} x {rgb.height} px, {gh} x {gw} feature cells"
            if labels.caption:
                text = f"{labels.caption}\n{text}"
            for i, line in enumerate(wrap_text(draw, text, font, size[0])):
                draw.text((ix, fy + 16 * i), line, fill=(0, 0, 0), font=font)
        elif k in (1, 2):
            colour_bar(draw, bar, vmin, vmax, font, marks=(1.0,))
            note = (
                "every valid cell has weight 1: one flat colour"
                if k == 1
                else f"normalised to mean 1 over {int(valid.sum())} valid cells; warmer = larger"
            )
            draw.text((ix, fy + 58), note, fill=(0, 0, 0), font=font)
        else:
            rx0, ry0 = ix + round(x0 * cell_w), iy + round(y0 * cell_h)
            rx1, ry1 = ix + round(x1 * cell_w) - 1, iy + round(y1 * cell_h) - 1
            draw.rectangle((rx0 - 1, ry0 - 1, rx1 + 1, ry1 + 1), outline=(0, 0, 0), width=1)
            draw.rectangle((rx0, ry0, rx1, ry1), outline=(255, 255, 255), width=3)
            inside = _region_mask(w.shape, region)
            _strip_chart(draw, (ix, fy - 6, ix + size[0], fy + FOOTER - 8), w, inside, stats, vmin, vmax, font)
    return fig, stats


# ------------------------------------------------------------------------------------------------ the command


def data_root() -> Path:
    """Where datasets live, as in the eval app: ``$DEEPAGG_DATA``, else ``~/.cache/deepagg/data``."""
    env = os.environ.get("DEEPAGG_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepagg" / "data"


def default_image(root: Path | None = None) -> Path:
    """The default photo: a database image of the ``clutter`` benchmark under ``root`` (see the module doc).

    Args:
        root: The data root (None: :func:`data_root`).

    Returns:
        The image file.

    Raises:
        HewFigureError: If the benchmark is not there.
    """
    folder = (root if root is not None else data_root()) / "clutter"
    if not (folder / "gnd_clutter.pkl").is_file():
        raise HewFigureError(
            f"hew_figure: the clutter benchmark is not under {folder} (no gnd_clutter.pkl); build it with "
            "`python -m lightning_apps.eval` (data_root: $DEEPAGG_DATA or ~/.cache/deepagg/data), or pass --image PATH."
        )
    try:
        ds = load_gnd(folder, "clutter")
    except (OSError, ValueError) as err:
        raise HewFigureError(
            f"hew_figure: the clutter benchmark under {folder} cannot be read: {' '.join(str(err).split())}"
        ) from None
    if not ds.images:
        raise HewFigureError(f"hew_figure: the clutter benchmark under {folder} has no database image.")
    try:
        records = json.loads((folder / "manifest.json").read_text()).get("images", [])
        by_name = {r["name"]: r for r in records if isinstance(r, dict) and "name" in r}
    except (OSError, ValueError, AttributeError):
        by_name = {}
    for path in ds.images:
        r = by_name.get(path.stem, {})
        scale = r.get("scale")
        if (
            r.get("object") is not None
            and float(r.get("visible") or 0.0) >= 0.99
            and r.get("occlusion_target") is None
            and isinstance(scale, (int, float))
            and 0.3 <= scale <= 0.6
        ):
            return path
    return ds.images[0]


def parse_region(text: str, image_wh: tuple[int, int]) -> tuple[float, float, float, float]:
    """Parse ``--region x0,y0,x1,y1`` (pixels of the original image) and check it against the image.

    Raises:
        HewFigureError: If it is not four numbers with ``0 <= x0 < x1 <= W`` and ``0 <= y0 < y1 <= H``.
    """
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise HewFigureError(
            f"hew_figure: --region must be x0,y0,x1,y1 (four numbers, pixels); got {text!r}."
        ) from None
    w, h = image_wh
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise HewFigureError(
            f"hew_figure: --region {text} must satisfy 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h} "
            f"(pixels of the {w} x {h} image)."
        )
    return x0, y0, x1, y1


def load_backbone(name: str) -> torch.nn.Module:
    """The ImageNet backbone ``name`` in eval mode; a missing weight package is a :class:`HewFigureError`."""
    try:
        net = vgg16() if name == "vgg16" else mobilenet_v2()
    except WeightsNotFoundError as err:
        raise HewFigureError(f"hew_figure: {' '.join(str(err).split())}") from None
    return net.eval()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightning_apps.hew_figure",
        description="Write a Fig. 1-style PNG of HeW heat-diffusion weights (vs SPoC) for one image.",
    )
    p.add_argument("--image", type=Path, default=None, help="photo (default: a clutter database image)")
    p.add_argument("--backbone", choices=BACKBONES, default="vgg16")
    p.add_argument("--imsize", type=int, default=512, help="long side in pixels (never enlarged; default 512)")
    p.add_argument("--lam", type=float, default=None, help="ground conductance (default: HEW_DEFAULT_LAM[variant])")
    p.add_argument("--variant", choices=VARIANTS, default="paper")
    p.add_argument("--region", default=None, help="x0,y0,x1,y1 in image pixels (default: most repetitive 3x3 cells)")
    p.add_argument("--out", type=Path, default=Path("hew.png"), help="output PNG (default hew.png)")
    return p


def run(args: argparse.Namespace) -> Path:
    """Compute the weights and write the figure; returns the output path.

    Raises:
        HewFigureError: On a user error.
    """
    start = time.perf_counter()
    lam = HEW_DEFAULT_LAM[args.variant] if args.lam is None else float(args.lam)
    if not (math.isfinite(lam) and lam > 0):
        raise HewFigureError(f"hew_figure: --lam must be a finite number > 0; got {args.lam!r}.")
    if args.imsize < MIN_SIDE:
        raise HewFigureError(f"hew_figure: --imsize must be >= {MIN_SIDE}; got {args.imsize}.")
    path = Path(args.image) if args.image is not None else default_image()
    try:
        img = read_image(path, what="image")
    except ImageReadError as err:
        reason = " ".join(str(getattr(err, "reason", "") or err).split())
        raise HewFigureError(f"hew_figure: cannot read image {path}: {reason}") from None
    full_hw = (int(img.shape[1]), int(img.shape[2]))
    pil = Image.fromarray(img.permute(1, 2, 0).numpy(), mode="RGB")
    box = parse_region(args.region, pil.size) if args.region is not None else None

    net = load_backbone(args.backbone)
    out_hw, _ = target_size(full_hw, full_hw, imsize=args.imsize, scale=1.0)  # the eval app's sizing rule
    x = TF.resize(img.float() / 255.0, list(out_hw), antialias=True).clamp(0.0, 1.0)
    with torch.inference_mode():
        maps = net(imagenet_normalize(x[None])).float()
    gh, gw = int(maps.shape[2]), int(maps.shape[3])
    weights, note = hew_weight_map(maps, lam=lam, variant=args.variant)
    if box is None:
        region = most_repetitive_region(maps)
        where = (
            f"most repetitive {region[3] - region[1]}x{region[2] - region[0]} cells (highest mean cosine to the rest)"
        )
    else:
        region = cells_from_pixels(box, pil.size, (gh, gw))
        where = f"--region {args.region} px"
    hew_title = f"HeW weights ({args.variant}, lam = {lam:g}{', ' + note if note else ''})"
    labels = Labels(
        image=f"Image: {path.name}",
        hew=hew_title,
        region=f"Weights of a bursty region: {where}",
        caption=f"{args.backbone} at {out_hw[1]} x {out_hw[0]} px",
    )
    fig, stats = render(pil, weights, region, labels=labels)
    out = Path(args.out)
    with atomic_write(out) as fh:
        fig.save(fh, format="PNG")
    px0 = region[0] * pil.width / gw, region[1] * pil.height / gh
    px1 = region[2] * pil.width / gw, region[3] * pil.height / gh
    print(
        f"hew_figure: {path} ({pil.width} x {pil.height}), {args.backbone} at {out_hw[1]} x {out_hw[0]}, "
        f"{gh} x {gw} cells, HeW {args.variant} lam={lam:g}{' (' + note + ')' if note else ''}"
    )
    print(
        f"bursty region cells x {region[0]}:{region[2]}, y {region[1]}:{region[3]} "
        f"(~ pixels {px0[0]:.0f},{px0[1]:.0f},{px1[0]:.0f},{px1[1]:.0f}; {where}): HeW weight (mean 1) "
        f"mean inside {_fmt(stats.mean_inside)} (n={stats.n_inside}), mean outside {_fmt(stats.mean_outside)} "
        f"(n={stats.n_outside}), ratio {_fmt(stats.ratio)}; {time.perf_counter() - start:.1f} s"
    )
    print(out)
    return out


def cli_main(prog: str, parser: argparse.ArgumentParser, run_fn: Any, argv: Sequence[str] | None = None) -> int:
    """Entry point shared by the figure commands: ``run_fn(parsed args)``; 0, or 2 after one line on stderr.

    A :class:`HewFigureError` raised by one of this module's helpers names ``hew_figure``; the line names ``prog``
    instead, so the user sees the command they typed.
    """
    try:
        run_fn(parser.parse_args(argv))
    except HewFigureError as err:
        text = " ".join(str(err).split())
        if text.startswith("hew_figure: "):
            text = f"{prog}: {text.removeprefix('hew_figure: ')}"
        print(f"error: {text}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on a user error, one line on stderr)."""
    args = _parser().parse_args(argv)
    try:
        run(args)
    except HewFigureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
