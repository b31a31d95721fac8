r"""Fig. 1 of the selective-features paper: the SIFT, SUM and MAX masks of an image, and their Fig. 2a statistic.

Usage::

    python -m lightning_apps.masks_figure [--image PATH ...] [--backbone vgg16|mobilenet_v2] [--imsize 512]
        [--out masks.png] [--fractions N]

Writes one PNG (atomically) in the manner of Fig. 1 of Hoang et al., "Selective deep convolutional features for
image retrieval" (ACM MM 2017, sec. 3.2), one row per image and five titled panels: (a) the image; (b) the image
with the centres of its SIFT (DoG) keypoints as yellow dots; (c) the SIFT mask, (d) the SUM mask and (e) the MAX
mask of :mod:`deepagg.functional.masks` on the backbone's last (post-ReLU) feature map, each drawn over the grey
image on the feature grid: kept cells red, dropped cells blue, the boundary between them white. Each mask
panel's title gives the fraction of the grid positions the mask keeps; the same fractions are printed, one line
per mask, then the output path.

Cells and pixels: the :math:`h \times w` feature grid is spread evenly over the resized image (the network input,
``W x H`` pixels), cell ``(i, j)`` covering pixels ``[j W / w, (j + 1) W / w) x [i H / h, (i + 1) H / h)``, the
cell :func:`~deepagg.functional.masks.sift_mask` maps a keypoint to. Keypoints are detected on the resized image,
as the SIFT mask detects them (kornia's DoG detector, response threshold 4/255; see ``sift_mask``).

``--fractions N`` prints instead the paper's Fig. 2a statistic: the mean, over the first ``N`` database images of
the embedded ``clutter`` benchmark (all of them if it has fewer), of the fraction of positions each mask keeps
(``none`` = no mask = 1). The paper reports about 75 %, 50 % and 30 % kept by SIFT, SUM and MAX on Oxford5k,
Paris6k and Holidays (VGG16 pool5 at 1024 px). The figure is then written only if ``--out`` or ``--image`` is
given as well.

Images are resized as the eval app resizes database images (long side ``min(imsize, L)``, antialiased bilinear,
ImageNet normalisation for the backbone). Without ``--image`` the photo is
:func:`lightning_apps.hew_figure.default_image`'s database image of the ``clutter`` benchmark under
``$DEEPAGG_DATA`` (default ``~/.cache/deepagg/data``); the benchmark is not built here (``python -m
lightning_apps.eval`` builds it). Weights are the offline ones of :mod:`deepagg.backbones`. User errors (missing
image or dataset, ``--imsize`` or ``--fractions`` too small, missing weight package) are one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from deepagg._io import atomic_write
from deepagg.backbones import imagenet_normalize
from deepagg.data import ImageReadError, load_gnd, read_image
from deepagg.functional.masks import _sift_keypoints, max_mask, sift_mask, sum_mask
from lightning_apps.coweight_figure import resized
from lightning_apps.hew_figure import (
    BACKBONES,
    MARGIN,
    MIN_SIDE,
    HewFigureError,
    cli_main,
    colormap,
    data_root,
    default_image,
    heat_overlay,
    load_backbone,
    load_font,
    wrap_text,
)

__all__ = [
    "MASKS",
    "MasksFigureError",
    "Row",
    "compute_masks",
    "database_images",
    "keypoint_pixel",
    "main",
    "mean_fractions",
    "render",
    "sift_keypoints",
]

PROG = "masks_figure"
MASKS = ("SIFT", "SUM", "MAX")
"""The masks, in the order of the figure's panels and of the printed lines."""
PANEL_SIDE = 300  # long side of the image in each panel, pixels
FOOTER = 62  # height of the legend / caption strip under each panel
POINT_RADIUS = 2  # of the yellow keypoint dots, pixels
YELLOW = (255, 255, 0)
EDGE_RGB = (255, 255, 255)  # boundary between kept and dropped cells
# The mask (1 = kept, 0 = dropped) is drawn with hew_figure's colour map over [-0.2, 1.2]: a bright red and a
# bright blue, rather than the map's dark ends.
MASK_VMIN, MASK_VMAX = -0.2, 1.2
_MEANING = {
    "SIFT": "cells holding a DoG keypoint, dilated 3 x 3 (eq. 1)",
    "SUM": "cells whose channel sum >= its median (eq. 3)",
    "MAX": "arg-max cell of each channel, union (eq. 2)",
}


class MasksFigureError(HewFigureError):
    """A user error (missing image or dataset, bad argument): one line on stderr, exit code 2.

    A :class:`~lightning_apps.hew_figure.HewFigureError`, as the errors of the hew_figure helpers used here are.
    """


@dataclass(frozen=True)
class Row:
    """One image of the figure.

    Attributes:
        image: The resized image (the network input; any mode, shown as RGB fitted to :data:`PANEL_SIDE` px).
        masks: One bool mask of shape :math:`(h, w)` per name of :data:`MASKS`, True = kept.
        keypoints: The SIFT keypoint centres ``(x, y)`` in pixels of ``image`` (0-based pixel centres), ``(N, 2)``.
        title: Title of the image panel.
        caption: Text under the image panel (e.g. the backbone), above its size and grid.
    """

    image: Image.Image
    masks: dict[str, np.ndarray]
    keypoints: np.ndarray
    title: str = "Image"
    caption: str = ""


# ------------------------------------------------------------------------------------------------ the masks


def compute_masks(x: torch.Tensor, maps: torch.Tensor) -> dict[str, np.ndarray]:
    """The three masks of one image, per name of :data:`MASKS` a bool ``(h, w)`` array (True = kept).

    Args:
        x: The network input before normalisation, ``(3, H, W)`` floats in [0, 1] (the SIFT detector's image).
        maps: The backbone's feature maps of ``x``, ``(1, C, h, w)``, non-negative.
    """
    feature_hw = (int(maps.shape[2]), int(maps.shape[3]))
    masks = {"SIFT": sift_mask(x[None], feature_hw), "SUM": sum_mask(maps), "MAX": max_mask(maps)}
    return {name: m[0].cpu().numpy() for name, m in masks.items()}


def sift_keypoints(x: torch.Tensor) -> np.ndarray:
    """The SIFT keypoint centres :func:`~deepagg.functional.masks.sift_mask` uses (with its defaults).

    Args:
        x: An image ``(3, H, W)``, floats in [0, 1].

    Returns:
        The ``(N, 2)`` float array of the centres ``(x, y)`` in pixels of ``x`` (0-based pixel centres).
    """
    xy, keep = _sift_keypoints(x[None])
    return xy[0][keep[0]].cpu().numpy().astype(np.float64)


def mean_fractions(masks: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """Per mask, the mean over images of the fraction of positions kept (``none``: 1).

    Example:
        >>> m = {"SIFT": np.ones((2, 2), bool), "SUM": np.eye(2, dtype=bool), "MAX": np.zeros((2, 2), bool)}
        >>> mean_fractions([m, {**m, "MAX": np.eye(2, dtype=bool)}])
        {'none': 1.0, 'SIFT': 1.0, 'SUM': 0.5, 'MAX': 0.25}
    """
    out = {"none": 1.0}
    for name in MASKS:
        out[name] = float(np.mean([np.asarray(m[name]).mean() for m in masks]))
    return out


def keypoint_pixel(xy: np.ndarray, image_wh: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Panel pixels of keypoint centres ``(x, y)`` given in pixels of a ``W x H`` image shown at ``size``.

    Pixel ``i`` spans ``[i, i + 1)``, so a 0-based centre ``x`` is at ``(x + 0.5) size_w / W``.

    Example:
        >>> keypoint_pixel(np.array([[0.0, 0.0], [511.0, 383.0]]), (512, 384), (300, 225)).tolist()
        [[0.29296875, 0.29296875], [299.70703125, 224.70703125]]
    """
    scale = np.array([size[0] / image_wh[0], size[1] / image_wh[1]])
    return (np.asarray(xy, dtype=np.float64).reshape(-1, 2) + 0.5) * scale


# ------------------------------------------------------------------------------------------------ drawing


def _outline(draw: ImageDraw.ImageDraw, mask: np.ndarray, size: tuple[int, int]) -> None:
    """Draw the boundary between kept and dropped cells (not the image border)."""
    h, w = mask.shape
    xs = [round(j * size[0] / w) for j in range(w + 1)]
    ys = [round(i * size[1] / h) for i in range(h + 1)]
    for i, j in zip(*np.nonzero(mask[:, 1:] != mask[:, :-1]), strict=True):
        draw.line([(xs[j + 1], ys[i]), (xs[j + 1], ys[i + 1])], fill=EDGE_RGB, width=1)
    for i, j in zip(*np.nonzero(mask[1:, :] != mask[:-1, :]), strict=True):
        draw.line([(xs[j], ys[i + 1]), (xs[j + 1], ys[i + 1])], fill=EDGE_RGB, width=1)


def _mask_panel(gray: Image.Image, mask: np.ndarray) -> Image.Image:
    """The mask over the grey image: each cell's pixels (nearest, no blur) red if kept, blue if dropped."""
    size = gray.size
    cells = np.asarray(Image.fromarray(np.asarray(mask, dtype=bool)).resize(size, Image.Resampling.NEAREST), bool)
    panel = heat_overlay(gray, cells.astype(np.float64), MASK_VMIN, MASK_VMAX, size)  # already at size: no blur
    _outline(ImageDraw.Draw(panel), np.asarray(mask, dtype=bool), size)
    return panel


def _keypoint_panel(shown: Image.Image, xy: np.ndarray, image_wh: tuple[int, int]) -> Image.Image:
    panel = shown.copy()
    draw = ImageDraw.Draw(panel)
    r = POINT_RADIUS
    for x, y in keypoint_pixel(xy, image_wh, panel.size):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=YELLOW, outline=(0, 0, 0), width=1)
    return panel


def _legend(draw: ImageDraw.ImageDraw, xy: tuple[int, int], font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    """Red 'kept' and blue 'dropped' swatches at ``xy``; returns the height used."""
    x, y = xy
    for value, label in ((1.0, "kept"), (0.0, "dropped")):
        r, g, b = (int(c) for c in colormap(np.array([value]), MASK_VMIN, MASK_VMAX)[0])
        draw.rectangle((x, y + 1, x + 12, y + 12), fill=(r, g, b), outline=(0, 0, 0))
        draw.text((x + 17, y), label, fill=(0, 0, 0), font=font)
        x += 17 + int(draw.textlength(label, font=font)) + 14
    return 17


def _mask_title(letter: str, name: str, mask: np.ndarray) -> str:
    m = np.asarray(mask, dtype=bool)
    return f"({letter}) {name} mask: keeps {100 * m.mean():.1f} % ({int(m.sum())} of {m.size})"


def render(rows: Sequence[Row]) -> tuple[Image.Image, list[list[tuple[int, int, int, int]]]]:
    """The figure: per row the image, the image with its keypoints, and the SIFT, SUM and MAX masks.

    Needs no backbone.

    Args:
        rows: The images, one row each.

    Returns:
        ``(figure, boxes)``: the RGB figure and, per row and panel, the box ``(x0, y0, x1, y1)`` (half-open) of
        the image in the figure.

    Raises:
        ValueError: If ``rows`` is empty, or a row lacks a mask of :data:`MASKS` or has one that is not 2-D,
            differs in shape from the others, or keypoints that are not ``(N, 2)``.

    Example:
        >>> m = np.zeros((6, 8), bool); m[1:3, 2:4] = True
        >>> row = Row(Image.new("RGB", (160, 120)), {"SIFT": m, "SUM": m, "MAX": m}, np.array([[40.0, 30.0]]))
        >>> fig, boxes = render([row])
        >>> len(boxes[0]), boxes[0][4][2] - boxes[0][4][0], boxes[0][4][3] - boxes[0][4][1]
        (5, 300, 225)
    """
    if not rows:
        raise ValueError("render(): rows must not be empty.")
    for k, row in enumerate(rows):
        missing = [n for n in MASKS if n not in row.masks]
        if missing:
            raise ValueError(f"render(): rows[{k}] has no {', '.join(missing)} mask.")
        shapes = {np.shape(row.masks[n]) for n in MASKS}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"render(): rows[{k}].masks must be 2-D (h, w) of one shape; got {sorted(shapes)}.")
        if np.ndim(row.keypoints) != 2 or np.shape(row.keypoints)[1] != 2:
            raise ValueError(f"render(): rows[{k}].keypoints must be (N, 2); got shape {np.shape(row.keypoints)}.")
    title_font, font = load_font(15), load_font(12)
    pw = PANEL_SIDE + 2 * MARGIN
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    titles = [
        [
            f"(a) {row.title}",
            f"(b) Image + SIFT: {len(row.keypoints)} keypoints",
            *(_mask_title(letter, n, row.masks[n]) for letter, n in zip("cde", MASKS, strict=True)),
        ]
        for row in rows
    ]
    wrapped = [[wrap_text(probe, t, title_font, PANEL_SIDE) for t in panel] for panel in titles]
    title_h = 8 + 19 * max(len(lines) for panel in wrapped for lines in panel)
    sizes = []
    for row in rows:
        scale = PANEL_SIDE / max(row.image.size)
        sizes.append((max(1, round(row.image.width * scale)), max(1, round(row.image.height * scale))))
    fig = Image.new("RGB", (len(wrapped[0]) * pw, sum(title_h + s[1] + FOOTER for s in sizes)), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    boxes: list[list[tuple[int, int, int, int]]] = []
    oy = 0
    for row, size, lines_of in zip(rows, sizes, wrapped, strict=True):
        shown = row.image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        gray = shown.convert("L")
        gh, gw = np.shape(row.masks[MASKS[0]])
        panels = [shown, _keypoint_panel(shown, row.keypoints, row.image.size)]
        panels += [_mask_panel(gray, row.masks[n]) for n in MASKS]
        notes = [
            f"{row.caption}\n" if row.caption else "",
            "yellow: DoG keypoint centres (kornia, |DoG| > 4/255), as the SIFT mask detects them",
        ]
        fallback = "no keypoint: every cell kept (sift_mask's fallback)"
        notes += [_MEANING[n] if n != "SIFT" or len(row.keypoints) else fallback for n in MASKS]
        boxes.append([])
        for k, (panel, lines, note) in enumerate(zip(panels, lines_of, notes, strict=True)):
            ox = k * pw
            for i, line in enumerate(lines):
                draw.text((ox + MARGIN, oy + 6 + 19 * i), line, fill=(0, 0, 0), font=title_font)
            ix, iy = ox + MARGIN, oy + title_h
            fig.paste(panel, (ix, iy))
            boxes[-1].append((ix, iy, ix + size[0], iy + size[1]))
            fy = iy + size[1] + 6
            if k == 0:
                note += f"{row.image.width} x {row.image.height} px, {gh} x {gw} feature cells"
            elif k >= 2:
                fy += _legend(draw, (ix, fy), font)
            for i, line in enumerate(wrap_text(draw, note, font, size[0])):
                draw.text((ix, fy + 15 * i), line, fill=(0, 0, 0), font=font)
        oy += title_h + size[1] + FOOTER
    return fig, boxes


# ------------------------------------------------------------------------------------------------ the command


def database_images(count: int, root: Path | None = None) -> list[Path]:
    """The first ``count`` database images of the ``clutter`` benchmark under ``root`` (all if it has fewer).

    Args:
        count: How many, >= 1.
        root: The data root (None: :func:`lightning_apps.hew_figure.data_root`).

    Raises:
        MasksFigureError: If the benchmark is not there, cannot be read or has no database image.
    """
    folder = (root if root is not None else data_root()) / "clutter"
    if not (folder / "gnd_clutter.pkl").is_file():
        raise MasksFigureError(
            f"{PROG}: the clutter benchmark is not under {folder} (no gnd_clutter.pkl); build it with "
            "`python -m lightning_apps.eval` (data_root: $DEEPAGG_DATA or ~/.cache/deepagg/data)."
        )
    try:
        images = load_gnd(folder, "clutter").images
    except (OSError, ValueError) as err:
        raise MasksFigureError(
            f"{PROG}: the clutter benchmark under {folder} cannot be read: {' '.join(str(err).split())}"
        ) from None
    if not images:
        raise MasksFigureError(f"{PROG}: the clutter benchmark under {folder} has no database image.")
    return list(images[:count])


def _read(path: Path) -> torch.Tensor:
    try:
        return read_image(path, what="image")
    except ImageReadError as err:
        reason = " ".join(str(getattr(err, "reason", "") or err).split())
        raise MasksFigureError(f"{PROG}: cannot read image {path}: {reason}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m lightning_apps.{PROG}",
        description="Write a Fig. 1-style PNG of the SIFT, SUM and MAX masks of an image, or (--fractions N) print "
        "the mean fraction of positions each mask keeps over N clutter database images.",
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
    p.add_argument("--out", type=Path, default=None, help="output PNG (default masks.png)")
    p.add_argument(
        "--fractions",
        type=int,
        default=None,
        metavar="N",
        help="print the mean fraction kept by each mask over the first N clutter database images instead of "
        "writing the figure (also write it if --out or --image is given)",
    )
    return p


def _maps(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return net(imagenet_normalize(x[None])).float()


def _figure(
    args: argparse.Namespace, net: torch.nn.Module, paths: Sequence[Path], images: Sequence[torch.Tensor], start: float
) -> Path:
    rows = []
    for path, img in zip(paths, images, strict=True):
        x = resized(img, args.imsize)
        maps = _maps(net, x)
        masks, keypoints = compute_masks(x, maps), sift_keypoints(x)
        gh, gw = int(maps.shape[2]), int(maps.shape[3])
        in_h, in_w = int(x.shape[1]), int(x.shape[2])
        print(
            f"{PROG}: {path} ({img.shape[2]} x {img.shape[1]}), {args.backbone} at {in_w} x {in_h} px, "
            f"{gh} x {gw} cells, {len(keypoints)} SIFT keypoints"
        )
        for name in MASKS:
            m = masks[name]
            print(f"  {name} mask: {m.mean():.4f} of the positions kept ({int(m.sum())} of {m.size} cells)")
        shown = Image.fromarray((x * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy())
        caption = f"{args.backbone}; original {img.shape[2]} x {img.shape[1]} px"
        rows.append(Row(shown, masks, keypoints, title=f"Image: {path.name}", caption=caption))
    fig, _ = render(rows)
    out = Path(args.out) if args.out is not None else Path("masks.png")
    with atomic_write(out) as fh:
        fig.save(fh, format="PNG")
    print(f"{PROG}: {len(rows)} x 5 panels, {fig.width} x {fig.height} px; {time.perf_counter() - start:.1f} s")
    print(out)
    return out


def _fractions(args: argparse.Namespace, net: torch.nn.Module, paths: Sequence[Path]) -> dict[str, float]:
    start = time.perf_counter()
    per_image = []
    for path in paths:
        x = resized(_read(path), args.imsize)
        maps = _maps(net, x)
        per_image.append(compute_masks(x, maps))
    means = mean_fractions(per_image)
    which = f"first {len(paths)}" + (" (all)" if len(paths) < args.fractions else "")
    print(
        f"{PROG}: mean fraction of the positions kept over the {which} clutter database images "
        f"({paths[0].parent}), {args.backbone} at imsize {args.imsize}"
    )
    for name, value in means.items():
        if name == "none":
            print(f"  none: {value:.4f}")
        else:
            values = [float(m[name].mean()) for m in per_image]
            print(f"  {name}: {value:.4f} (min {min(values):.4f}, max {max(values):.4f})")
    print(f"{PROG}: {len(paths)} images; {time.perf_counter() - start:.1f} s")
    return means


def run(args: argparse.Namespace) -> Path | None:
    """Compute the masks, print their fractions and write the figure (and/or the ``--fractions`` statistic).

    Returns:
        The figure's path, or None where only the statistic was asked for.

    Raises:
        HewFigureError: On a user error (a :class:`MasksFigureError`, or one of the hew_figure helpers').
    """
    start = time.perf_counter()
    if args.imsize < MIN_SIDE:
        raise MasksFigureError(f"{PROG}: --imsize must be >= {MIN_SIDE}; got {args.imsize}.")
    if args.fractions is not None and args.fractions < 1:
        raise MasksFigureError(f"{PROG}: --fractions must be >= 1 (a number of images); got {args.fractions}.")
    figure = args.fractions is None or args.out is not None or bool(args.image)
    # Inputs are read (and the benchmark found) before the slow backbone load.
    paths = ([Path(p) for p in args.image] if args.image else [default_image()]) if figure else []
    images = [_read(p) for p in paths]
    db = database_images(args.fractions) if args.fractions is not None else []
    net = load_backbone(args.backbone)
    out = _figure(args, net, paths, images, start) if figure else None
    if db:
        _fractions(args, net, db)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command (see the module doc); returns 0, or 2 after one line on stderr for a user error."""
    return cli_main(PROG, _parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
