r"""Fig. 1 of the aGaussian/eChannel paper: the channel-sum heat map and the adaptive Gaussian centre per alpha.

Usage::

    python -m lightning_apps.coweight_figure [--image PATH ...] [--backbone vgg16|mobilenet_v2] [--imsize 512]
        [--alphas 0.1,0.5,1.0] [--out coweight.png]

Writes one PNG (atomically) in the manner of Fig. 1 of Wang et al., "Adaptive co-weighting deep convolutional
features for object retrieval" (ICME 2018, sec. 2.2), one row per image and titled panels: (1) the image;
(2) the heat map of :math:`S'`, the channel sum of the backbone's last (post-ReLU) feature map, divided by its
maximum and blended over the grey image (red = high, blue = low), with a colour bar; (3...) for each alpha of
``--alphas`` the same heat map with the adaptive Gaussian centre of :func:`deepagg.functional.agaussian_center`
as a yellow point, the top-alpha cells that set it outlined in white (the boundary between the
``max(1, round(alpha h w))`` largest entries of :math:`S'` and the rest; none at alpha = 1, where every cell is
chosen) and the Gaussian's 1-sigma circle in black (:math:`\sigma = \max(h, w) / 4` cells).

Cells and pixels: the :math:`h \times w` feature grid is spread evenly over the resized image (the network
input, ``W x H`` pixels), so cell ``(i, j)`` (row, column, counted from 0, as the centres are) has its centre at
pixel ``x = (j + 0.5) W / w``, ``y = (i + 0.5) H / h``; the panels are that image uniformly scaled, with the
heat map bilinear between cell centres. For each image the centre of each alpha is printed in cells (and in
pixels of the resized image), then the output path.

Images are resized as the eval app resizes database images (long side ``min(imsize, L)``, antialiased bilinear,
ImageNet normalisation). Without ``--image`` the photo is :func:`lightning_apps.hew_figure.default_image`'s
database image of the embedded ``clutter`` benchmark under ``$DEEPAGG_DATA`` (default
``~/.cache/deepagg/data``); the benchmark is not built here (``python -m lightning_apps.eval`` builds it). User
errors (missing image or dataset, ``--alphas`` not in (0, 1], missing weight package) are one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as TF

from deepagg._io import atomic_write
from deepagg.backbones import imagenet_normalize
from deepagg.data import ImageReadError, read_image
from deepagg.functional import agaussian_center
from lightning_apps.extract import target_size
from lightning_apps.hew_figure import (
    BACKBONES,
    MARGIN,
    MIN_SIDE,
    HewFigureError,
    cli_main,
    colour_bar,
    default_image,
    heat_overlay,
    load_backbone,
    load_font,
    wrap_text,
)

__all__ = [
    "CoweightFigureError",
    "Row",
    "centre_pixel",
    "main",
    "parse_alphas",
    "render",
    "resized",
    "top_cells",
]

PROG = "coweight_figure"
DEFAULT_ALPHAS = "0.1,0.5,1.0"  # the paper's Fig. 1: alpha = 10 %, 50 %, 100 %
PANEL_SIDE = 300  # long side of the image in each panel, pixels
FOOTER = 62  # height of the caption / colour-bar strip under each panel
POINT_RADIUS = 6  # of the yellow centre, pixels
YELLOW = (255, 255, 0)
TOP_RGB = (255, 255, 255)  # outline of the top-alpha cells
SIGMA_RGB = (0, 0, 0)  # the 1-sigma circle


class CoweightFigureError(HewFigureError):
    """A user error (missing image or dataset, bad argument): one line on stderr, exit code 2.

    A :class:`~lightning_apps.hew_figure.HewFigureError`, as the errors of the hew_figure helpers used here are.
    """


@dataclass(frozen=True)
class Row:
    """One image of the figure.

    Attributes:
        image: The resized image (the network input; any mode, shown as RGB fitted to :data:`PANEL_SIDE` px).
        smap: The channel-sum map :math:`S'` of shape :math:`(h, w)`, non-negative.
        centres: One ``(row, col)`` centre in cells per alpha of :func:`render`.
        title: Title of the image panel.
        caption: Text under the image panel (e.g. the backbone), above its size and grid.
    """

    image: Image.Image
    smap: np.ndarray
    centres: Sequence[tuple[float, float]]
    title: str = "Image"
    caption: str = ""


# ------------------------------------------------------------------------------------------------ geometry


def parse_alphas(text: str) -> tuple[float, ...]:
    """Parse ``--alphas``: comma-separated fractions in (0, 1].

    Raises:
        CoweightFigureError: If a value is not a number or not in (0, 1].

    Example:
        >>> parse_alphas("0.1, 0.5,1")
        (0.1, 0.5, 1.0)
    """
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise CoweightFigureError(
            f"{PROG}: --alphas must be comma-separated numbers in (0, 1], e.g. {DEFAULT_ALPHAS}; got {text!r}."
        ) from None
    if not all(math.isfinite(v) and 0 < v <= 1 for v in values):
        raise CoweightFigureError(
            f"{PROG}: --alphas must each be in (0, 1] (a fraction of the cells: 0.1 for 10 %); got {text!r}."
        )
    return values


def top_cells(smap: np.ndarray, alpha: float) -> np.ndarray:
    """The cells that set the centre: the ``max(1, round(alpha h w))`` largest entries of ``smap``.

    The rule of :func:`deepagg.functional.agaussian_center` (ties to the lower row-major index; Python's
    ``round``), whose centre is the mean row and column of these cells.

    Args:
        smap: Map of shape :math:`(h, w)`.
        alpha: Fraction in (0, 1].

    Returns:
        A bool mask of shape :math:`(h, w)`.

    Example:
        >>> top_cells(np.array([[1.0, 3.0], [3.0, 2.0]]), 0.5).tolist()
        [[False, True], [True, False]]
    """
    s = np.asarray(smap)
    count = max(1, round(alpha * s.size))
    order = np.argsort(-s.ravel(), kind="stable")[:count]
    mask = np.zeros(s.size, dtype=bool)
    mask[order] = True
    return mask.reshape(s.shape)


def centre_pixel(
    centre: tuple[float, float], grid_hw: tuple[int, int], image_wh: tuple[float, float]
) -> tuple[float, float]:
    """Pixel ``(x, y)`` of a point given in cells ``(row, col)``: ``((col + 0.5) W / w, (row + 0.5) H / h)``.

    The ``h x w`` grid is spread evenly over the ``W x H`` image, so a cell's centre maps to the centre of the
    pixel block it covers.

    Example:
        >>> centre_pixel((0.0, 0.0), (24, 32), (512, 384))
        (8.0, 8.0)
        >>> centre_pixel((11.5, 15.5), (24, 32), (512, 384))  # alpha = 1: the image centre
        (256.0, 192.0)
    """
    (row, col), (h, w), (width, height) = centre, grid_hw, image_wh
    return (col + 0.5) * width / w, (row + 0.5) * height / h


# ------------------------------------------------------------------------------------------------ drawing


def _outline_top(draw: ImageDraw.ImageDraw, top: np.ndarray, size: tuple[int, int]) -> None:
    """Draw the boundary between the chosen cells and the others (not the image border)."""
    h, w = top.shape
    xs = [round(j * size[0] / w) for j in range(w + 1)]
    ys = [round(i * size[1] / h) for i in range(h + 1)]
    for i, j in zip(*np.nonzero(top[:, 1:] != top[:, :-1]), strict=True):
        draw.line([(xs[j + 1], ys[i]), (xs[j + 1], ys[i + 1])], fill=TOP_RGB, width=2)
    for i, j in zip(*np.nonzero(top[1:, :] != top[:-1, :]), strict=True):
        draw.line([(xs[j], ys[i + 1]), (xs[j + 1], ys[i + 1])], fill=TOP_RGB, width=2)


def _alpha_panel(heat: Image.Image, top: np.ndarray, centre: tuple[float, float], size: tuple[int, int]) -> Image.Image:
    """The heat map with the top-alpha outline, the 1-sigma circle and the yellow centre."""
    panel = heat.copy()
    draw = ImageDraw.Draw(panel)
    h, w = top.shape
    _outline_top(draw, top, size)
    x, y = centre_pixel(centre, (h, w), size)
    sigma = max(h, w) / 4
    rx, ry = sigma * size[0] / w, sigma * size[1] / h
    draw.ellipse((x - rx, y - ry, x + rx, y + ry), outline=SIGMA_RGB, width=2)
    r = POINT_RADIUS
    draw.ellipse((x - r, y - r, x + r, y + r), fill=YELLOW, outline=(0, 0, 0), width=1)
    return panel


def _alpha_title(alpha: float) -> str:
    return f"alpha = {100 * alpha:.4g} %"


def render(rows: Sequence[Row], alphas: Sequence[float]) -> tuple[Image.Image, list[list[tuple[int, int, int, int]]]]:
    """The figure: per row the image, the :math:`S'` heat map and, per alpha, the heat map with its centre.

    Needs no backbone. Each row's :math:`S'` is divided by its maximum (if positive) and drawn from its min to its
    max (shared by the row's heat-map panels; the colour bar is under the second panel).

    Args:
        rows: The images, one row each.
        alphas: The alphas, one panel each; each row has one centre per alpha.

    Returns:
        ``(figure, boxes)``: the RGB figure and, per row and panel, the box ``(x0, y0, x1, y1)`` (half-open) of
        the image in the figure.

    Raises:
        ValueError: If ``rows`` is empty, a map is not 2-D, or a row's centres do not match ``alphas``.

    Example:
        >>> s = np.zeros((6, 8)); s[4, 1] = 1.0
        >>> fig, boxes = render([Row(Image.new("RGB", (160, 120)), s, [(4.0, 1.0)])], [0.02])
        >>> len(boxes[0]), boxes[0][2][2] - boxes[0][2][0], boxes[0][2][3] - boxes[0][2][1]
        (3, 300, 225)
    """
    if not rows:
        raise ValueError("render(): rows must not be empty.")
    for k, row in enumerate(rows):
        if np.ndim(row.smap) != 2:
            raise ValueError(f"render(): rows[{k}].smap must be 2-D (h, w); got shape {np.shape(row.smap)}.")
        if len(row.centres) != len(alphas):
            raise ValueError(f"render(): rows[{k}] has {len(row.centres)} centres for {len(alphas)} alphas.")
    title_font, font = load_font(15), load_font(12)
    pw = PANEL_SIDE + 2 * MARGIN
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heads = ["S' = channel sum of the last conv map", *(_alpha_title(a) for a in alphas)]
    wrapped = [[wrap_text(probe, t, title_font, PANEL_SIDE) for t in [row.title, *heads]] for row in rows]
    title_h = 8 + 19 * max(len(lines) for panel in wrapped for lines in panel)
    sizes = []
    for row in rows:
        scale = PANEL_SIDE / max(row.image.size)
        sizes.append((max(1, round(row.image.width * scale)), max(1, round(row.image.height * scale))))
    fig = Image.new("RGB", (len(wrapped[0]) * pw, sum(title_h + s[1] + FOOTER for s in sizes)), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    boxes: list[list[tuple[int, int, int, int]]] = []
    oy = 0
    for row, size, titles in zip(rows, sizes, wrapped, strict=True):
        shown = row.image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        smap = np.asarray(row.smap, dtype=np.float64)
        peak = float(smap.max())
        s = smap / peak if peak > 0 else smap
        vmin, vmax = float(s.min()), float(s.max())
        heat = heat_overlay(shown.convert("L"), s, vmin, vmax, size)
        gh, gw = s.shape
        panels = [shown, heat]
        notes = [f"{row.caption}\n" if row.caption else "", "S' / max S': red = high, blue = low"]
        for alpha, centre in zip(alphas, row.centres, strict=True):
            top = top_cells(s, alpha)
            panels.append(_alpha_panel(heat, top, centre, size))
            chosen = f"all {gh * gw} cells chosen" if top.all() else f"top {int(top.sum())} of {gh * gw} cells outlined"
            notes.append(
                f"centre (row, col) = ({centre[0]:.2f}, {centre[1]:.2f}) cells; {chosen}; "
                f"circle: 1 sigma = {max(gh, gw) / 4:g} cells"
            )
        boxes.append([])
        for k, (panel, lines, note) in enumerate(zip(panels, titles, notes, strict=True)):
            ox = k * pw
            for i, line in enumerate(lines):
                draw.text((ox + MARGIN, oy + 6 + 19 * i), line, fill=(0, 0, 0), font=title_font)
            ix, iy = ox + MARGIN, oy + title_h
            fig.paste(panel, (ix, iy))
            boxes[-1].append((ix, iy, ix + size[0], iy + size[1]))
            fy = iy + size[1] + 6
            if k == 0:
                note += f"{row.image.width} x {row.image.height} px, {gh} x {gw} feature cells"
            elif k == 1:
                colour_bar(draw, (ix + 6, fy, ix + size[0] - 6, fy + 14), vmin, vmax, font)
                fy += 34
            for i, line in enumerate(wrap_text(draw, note, font, size[0])):
                draw.text((ix, fy + 15 * i), line, fill=(0, 0, 0), font=font)
        oy += title_h + size[1] + FOOTER
    return fig, boxes


# ------------------------------------------------------------------------------------------------ the command


def resized(img: torch.Tensor, imsize: int) -> torch.Tensor:
    """An RGB ``uint8`` image ``(3, H, W)`` resized as the eval app does, as floats in [0, 1].

    Example:
        >>> resized(torch.zeros(3, 480, 640, dtype=torch.uint8), 512).shape
        torch.Size([3, 384, 512])
    """
    full_hw = (int(img.shape[-2]), int(img.shape[-1]))
    out_hw, _ = target_size(full_hw, full_hw, imsize=imsize, scale=1.0)  # the eval app's sizing rule
    return TF.resize(img.float() / 255.0, list(out_hw), antialias=True).clamp(0.0, 1.0)


def _read(path: Path) -> torch.Tensor:
    try:
        return read_image(path, what="image")
    except ImageReadError as err:
        reason = " ".join(str(getattr(err, "reason", "") or err).split())
        raise CoweightFigureError(f"{PROG}: cannot read image {path}: {reason}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m lightning_apps.{PROG}",
        description="Write a Fig. 1-style PNG of the aGaussian centres (yellow) on the channel-sum heat map.",
    )
    p.add_argument(
        "--image",
        type=Path,
        nargs="+",
        action="extend",
        default=None,
        help="photo(s), one row each (default: a clutter database image)",
    )
    p.add_argument("--backbone", choices=BACKBONES, default="vgg16")
    p.add_argument("--imsize", type=int, default=512, help="long side in pixels (never enlarged; default 512)")
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, help=f"fractions in (0, 1] (default {DEFAULT_ALPHAS})")
    p.add_argument("--out", type=Path, default=Path("coweight.png"), help="output PNG (default coweight.png)")
    return p


def run(args: argparse.Namespace) -> Path:
    """Compute the maps and centres, print the centres and write the figure; returns the output path.

    Raises:
        HewFigureError: On a user error (a :class:`CoweightFigureError`, or one of the hew_figure helpers').
    """
    start = time.perf_counter()
    alphas = parse_alphas(args.alphas)
    if args.imsize < MIN_SIDE:
        raise CoweightFigureError(f"{PROG}: --imsize must be >= {MIN_SIDE}; got {args.imsize}.")
    paths = [Path(p) for p in args.image] if args.image else [default_image()]
    images = [_read(p) for p in paths]
    net = load_backbone(args.backbone)
    rows = []
    for path, img in zip(paths, images, strict=True):
        x = resized(img, args.imsize)
        with torch.inference_mode():
            maps = net(imagenet_normalize(x[None])).float()
        gh, gw = int(maps.shape[2]), int(maps.shape[3])
        centres = [(float(c[0]), float(c[1])) for c in (agaussian_center(maps, alpha=a)[0] for a in alphas)]
        in_h, in_w = int(x.shape[1]), int(x.shape[2])
        print(
            f"{PROG}: {path} ({img.shape[2]} x {img.shape[1]}), {args.backbone} at {in_w} x {in_h} px, "
            f"{gh} x {gw} cells, sigma = {max(gh, gw) / 4:g} cells"
        )
        for alpha, (i0, j0) in zip(alphas, centres, strict=True):
            px, py = centre_pixel((i0, j0), (gh, gw), (in_w, in_h))
            print(
                f"  {_alpha_title(alpha)}: centre (row, col) = ({i0:.2f}, {j0:.2f}) cells of {gh} x {gw} "
                f"(top {max(1, round(alpha * gh * gw))} cells); pixel (x, y) = ({px:.0f}, {py:.0f}) of the input"
            )
        shown = Image.fromarray((x * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy())
        smap = maps.sum(dim=1)[0].cpu().numpy()  # as agaussian_center sums (float32)
        caption = f"{args.backbone}; original {img.shape[2]} x {img.shape[1]} px"
        rows.append(Row(shown, smap, centres, title=f"Image: {path.name}", caption=caption))
    fig, _ = render(rows, alphas)
    out = Path(args.out)
    with atomic_write(out) as fh:
        fig.save(fh, format="PNG")
    print(
        f"{PROG}: {len(rows)} x {2 + len(alphas)} panels, {fig.width} x {fig.height} px; "
        f"{time.perf_counter() - start:.1f} s"
    )
    print(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command (see the module doc); returns 0, or 2 after one line on stderr for a user error."""
    return cli_main(PROG, _parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
