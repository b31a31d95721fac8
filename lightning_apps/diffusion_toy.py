r"""The 2-D toy of Fig. 1 of Iscen et al., CVPR 2017: diffusion follows the query's manifold, plain NN does not.

Usage::

    python -m lightning_apps.diffusion_toy [--data moons|spirals] [--points 300] [--noise S] [--at U]
        [--k 10] [--kq 10] [--gamma 3] [--alpha 0.99] [--iters 300] [--tol 1e-8] [--sigma 0.15]
        [--panel 400] [--grid 200] [--seed 0] [--out diffusion_toy.png]

**What it shows.** Three panels over the same plane: (a) plain nearest-neighbour search, the similarity of
every point z of the plane to the query q; (b) diffusion from the same query on the mutual k-NN graph; (c)
diffusion from two queries, one on each manifold (the paper's "multiple queries"). Database points are blue,
the queries red, their kq nearest neighbours (the non-zero entries of the seed vector y, eq. 7) green. The shade
and the contour lines show the ranking score any point of the plane would get: plain NN spreads in circles
around the query and takes in the other manifold; diffusion follows the query's own manifold.

**Data.** Two interleaved manifolds A and B of ``--points`` points each, uniform along their length plus
Gaussian noise ``--noise``: two spiral arms (default; radius 1, 1.5 turns each, B is A turned by pi) or two
half-moons (radius 1). The query is the noiseless point of A at fraction ``--at`` of its length (middle of the
spiral arm, or the tip of moon A in the hollow of moon B, by default); the second query of panel (c) is the
same point of B.

**Embedding.** The library's similarity is the inner product of unit vectors under the monomial kernel
:math:`\max(x^\top z, 0)^\gamma`, so a 2-D point :math:`p` is mapped to a unit vector whose inner products are
a Gaussian of the distance: :math:`\phi(p)_c = \exp(-|p - c|^2 / \sigma^2)` over a regular grid of centres
:math:`c` (spacing :math:`\sigma / \sqrt 2`, covering the plot with a 3 sigma margin; about 1300 dimensions by
default), normalised to unit norm. The grid sum is a quadrature of a Gaussian convolution, so
:math:`\phi(p)^\top \phi(p') = \exp(-|p - p'|^2 / 2\sigma^2)` up to a relative error below 1e-3
(deterministic, no random features). The similarity is then :math:`\exp(-\gamma |p - p'|^2 / 2\sigma^2)`:
nearest neighbours by inner product are nearest neighbours in the plane, and similarities fall to 0 a few
sigma away.

**Scores.** Everything goes through :mod:`deepagg.functional.diffusion`: the graph is
``mutual_knn_affinity(x, k=k, gamma=gamma)`` (eqs. 1, 5, 6), the seeds ``query_seeds(q, x, k=kq,
gamma=gamma)`` (eq. 7), the scores ``f = diffusion_scores(A, y, alpha=alpha, max_iter=iters, tol=tol)``
(eq. 4; alpha 0.99 as in the paper; conjugate gradient with 300 iterations and tol 1e-8 by default instead of
the library's 20 and 1e-6, so that the picture shows the converged solution: the relative residual, about
1e-8, is printed and in the caption). Two queries (eq. 8) seed ``y = y(q1) + y(q2)``, the sum of their eq.-7
vectors (``query_seeds`` with the two points as regions of one query would also keep only the kq largest
entries of the sum, section 5.1: about half of each query's neighbours).

**Score of a point z of the plane** (shade and contours). Plain NN: :math:`s(z | q) =
\max(\phi(z)^\top \phi(q), 0)^\gamma`, the similarity to the query. Diffusion: eq. 7 read in reverse,
:math:`g(z) = \sum_i s_{k_q}(x_i | z) f_i = y(z)^\top f`, where :math:`y(z)` = ``query_seeds(z, x, k=kq)`` is
the seed vector z itself would get as a query: the diffusion scores of its kq nearest database points,
weighted by its similarities to them. Nothing is interpolated between manifolds: g fades away from the
data as :math:`s(z | q)` fades away from the query, and it is 0 where z's kq nearest points all score 0.

Each panel is shaded by the rank z would take among the N database points scored by the same function
(:math:`s(x_i | q)`, or :math:`g(x_i)`, which differs from :math:`f_i` by the weighted sum over the
neighbours, so the plane and the database are on one scale): dark orange for rank 1, white from rank
N/2 = |A| on. The contour lines are the scores of the database points ranked 5 %, 25 % (|A|/2) and 50 %
(|A|) of N: inside a line, z would enter that top. The scores are computed on ``--grid`` x 3/4 ``--grid``
samples of the plotted plane; the shade is drawn with bilinear interpolation between them and the contour lines
are traced on their logarithm (matplotlib, Agg backend).

**Summary.** One line on stdout: for the query on A, the fraction of A points among the top |A|/2 of the
database by plain NN (:math:`s(x_i | q)`) and by diffusion (:math:`f_i`, the library's ranking); for the two
queries, the fraction of B points among the top |A|/2; the parameters and the CG residual. Then the output
path. The PNG is written atomically. Bad arguments are one line on stderr and exit code 2 (argparse's own
usage errors, e.g. a non-integer ``--points``, exit with 2 as well).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deepagg._io import atomic_write
from deepagg.functional.diffusion import diffusion_scores, mutual_knn_affinity, query_seeds
from lightning_apps.hew_figure import HewFigureError, cli_main

__all__ = [
    "DATASETS",
    "DiffusionToyError",
    "Toy",
    "ToyResult",
    "compute",
    "contour_levels",
    "figure_size",
    "main",
    "make_toy",
    "rank_fraction",
    "render",
    "top_fraction",
    "unit_embedding",
]

PROG = "diffusion_toy"
DATASETS = ("moons", "spirals")
DEFAULT_NOISE = {"moons": 0.07, "spirals": 0.035}
DEFAULT_AT = {"moons": 0.1, "spirals": 0.45}
RANK_LEVELS = (0.05, 0.25, 0.5)
"""Contour lines: the score of the database point at these fractions of the ranking (0.25 N = |A|/2)."""
MIN_PANEL = 300  # narrower and the titles do not fit their four lines
MARGIN = 10
HEADER_H = 46  # two lines of the figure title
TITLE_H = 76  # four lines of a panel title
FOOTER_H = 92  # the legend row and four caption lines
MAX_DIM = 20000  # embedding dimensions (centres) beyond which --sigma is too small for the plot
CHUNK = 4096  # plane points per query_seeds call

DPI = 100
BLUE = "#2857dc"
GREEN = "#14aa3c"
RED = "#e11414"
# Shade of a rank: white (rank N/2 and below) through light yellow and orange to a dark orange (rank 1).
_SHADE_T = np.array([0.0, 0.35, 0.7, 1.0])
_SHADE_RGB = np.array([[255, 255, 255], [255, 238, 170], [250, 170, 80], [205, 95, 25]], float)


class DiffusionToyError(HewFigureError):
    """A user error (bad argument): one line on stderr, exit code 2."""


@dataclass(frozen=True)
class Toy:
    """The data: two manifolds and the query points.

    Attributes:
        points: Database points :math:`(N, 2)`, manifold A first.
        labels: 0 (A) or 1 (B) per point, :math:`(N,)`.
        queries: The query on A and the query on B, :math:`(2, 2)`.
        name: ``"moons"`` or ``"spirals"``.
    """

    points: np.ndarray
    labels: np.ndarray
    queries: np.ndarray
    name: str


@dataclass(frozen=True)
class ToyResult:
    r"""Scores of the database and of the plane, per panel (NN, diffusion, diffusion with two queries).

    Attributes:
        db_scores: Per panel, the panel's score function at the database points, :math:`(N,)` each:
            :math:`s(x_i | q)`, then :math:`g(x_i) = y(x_i)^\top f` for the two diffusions.
        grid_scores: Per panel, the score of the plane's grid points, :math:`(G_y, G_x)` each.
        seeds: Per panel, the indices of the database points with a non-zero seed (the kq-NN of the queries).
        nn: Plain NN similarity :math:`s(x_i | q)` of the database to the query on A, :math:`(N,)`.
        f: Diffusion scores of the query on A, :math:`(N,)`.
        f_two: Diffusion scores of the two queries, :math:`(N,)`.
        residual: Largest relative CG residual :math:`\|y - L_\alpha f\| / \|y\|` of the two solves.
        bounds: The plane shown, ``(x0, y0, x1, y1)``.
        dim: Embedding dimension.
    """

    db_scores: tuple[np.ndarray, np.ndarray, np.ndarray]
    grid_scores: tuple[np.ndarray, np.ndarray, np.ndarray]
    seeds: tuple[np.ndarray, np.ndarray, np.ndarray]
    nn: np.ndarray
    f: np.ndarray
    f_two: np.ndarray
    residual: float
    bounds: tuple[float, float, float, float]
    dim: int


# ------------------------------------------------------------------------------------------------ data


def _moon(u: np.ndarray, which: int) -> np.ndarray:
    t = math.pi * u
    if which == 0:
        return np.stack([np.cos(t), np.sin(t)], axis=-1)
    return np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=-1)


_SPIRAL_TURNS = (0.5 * math.pi, 3.5 * math.pi)  # angle range of each arm


def _spiral(u: np.ndarray, which: int) -> np.ndarray:
    """Point at fraction ``u`` of the arc length of arm ``which`` (r = theta / theta1; arm B is arm A turned by pi)."""
    t0, t1 = _SPIRAL_TURNS
    theta = np.sqrt(t0**2 + u * (t1**2 - t0**2))  # arc length grows as theta^2 (approximately)
    r = theta / t1
    p = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=-1)
    return p if which == 0 else -p


def make_toy(name: str, n: int, *, noise: float, at: float, seed: int = 0) -> Toy:
    """Two interleaved manifolds of ``n`` points each (uniform along their length, plus Gaussian noise).

    Args:
        name: ``"moons"`` (two half-moons, radius 1) or ``"spirals"`` (two arms, radius 1, 1.5 turns).
        n: Points per manifold.
        noise: Standard deviation of the noise added to each coordinate.
        at: Where the queries lie: the noiseless point at this fraction of each manifold's length.
        seed: Seed of the sampling.

    Returns:
        The :class:`Toy`.

    Example:
        >>> toy = make_toy("moons", 5, noise=0.0, at=0.0)
        >>> toy.points.shape, toy.labels.tolist(), toy.queries.round(3).tolist()
        ((10, 2), [0, 0, 0, 0, 0, 1, 1, 1, 1, 1], [[1.0, 0.0], [0.0, 0.5]])
    """
    curve = _moon if name == "moons" else _spiral
    rng = np.random.default_rng(seed)
    parts = [curve(rng.uniform(0.0, 1.0, n), which) for which in (0, 1)]
    points = np.concatenate(parts) + rng.normal(0.0, noise, size=(2 * n, 2))
    labels = np.repeat(np.arange(2), n)
    queries = np.concatenate([curve(np.array([at]), which) for which in (0, 1)])
    return Toy(points, labels, queries, name)


# ------------------------------------------------------------------------------------------------ scores


def _centres(bounds: tuple[float, float, float, float], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The embedding's grid of centres as its two axes ``(xs, ys)``: spacing sigma / sqrt 2, 3 sigma margin."""
    x0, y0, x1, y1 = bounds
    step = sigma / math.sqrt(2.0)
    pad = 3.0 * sigma
    return np.arange(x0 - pad, x1 + pad + step / 2, step), np.arange(y0 - pad, y1 + pad + step / 2, step)


def unit_embedding(p: np.ndarray, centres: tuple[np.ndarray, np.ndarray], sigma: float) -> torch.Tensor:
    r"""Unit vectors whose inner products are :math:`\exp(-|p - p'|^2 / 2\sigma^2)` (module doc), float64.

    Feature :math:`(i, j)` (index ``i * len(xs) + j``) is :math:`\exp(-|p - (x_j, y_i)|^2 / \sigma^2)`, computed
    as the product of its two 1-D factors.

    Args:
        p: Points :math:`(M, 2)`.
        centres: The axes ``(xs, ys)`` of the grid of centres, spacing :math:`\le \sigma / \sqrt 2`, covering
            the points with a margin of a few :math:`\sigma`.
        sigma: Kernel width.

    Returns:
        :math:`(M, D)` float64 tensor of unit rows, ``D = len(xs) * len(ys)``.

    Example:
        >>> c = _centres((-1.0, -1.0, 1.0, 1.0), 0.5)
        >>> e = unit_embedding(np.array([[0.0, 0.0], [0.3, 0.4]]), c, 0.5)
        >>> k = float(e[0] @ e[1])  # |p - p'| = 0.5 = sigma: exp(-1/2) = 0.6065
        >>> round(k, 3), abs(k - math.exp(-0.5)) < 1e-3
        (0.606, True)
    """
    xs, ys = centres
    dx = (p[:, :1] - xs[None, :]) ** 2
    dy = (p[:, 1:] - ys[None, :]) ** 2
    # Each factor shifted by its row's smallest squared distance before exp (the normalisation cancels it):
    # no row underflows to all zeros far from the centres.
    ex = np.exp(-(dx - dx.min(axis=1, keepdims=True)) / sigma**2)
    ey = np.exp(-(dy - dy.min(axis=1, keepdims=True)) / sigma**2)
    ex /= np.linalg.norm(ex, axis=1, keepdims=True)  # the norm of the product is the product of the norms
    ey /= np.linalg.norm(ey, axis=1, keepdims=True)
    return torch.from_numpy((ey[:, :, None] * ex[:, None, :]).reshape(p.shape[0], -1))


def _bounds(points: np.ndarray, aspect: float) -> tuple[float, float, float, float]:
    """The data's box padded by 8 % and widened to width / height = ``aspect`` (equal scales on both axes)."""
    lo, hi = points.min(0), points.max(0)
    span = hi - lo
    lo, hi = lo - 0.08 * span, hi + 0.08 * span
    w, h = hi - lo
    if w / h < aspect:
        extra = (h * aspect - w) / 2
        lo[0], hi[0] = lo[0] - extra, hi[0] + extra
    else:
        extra = (w / aspect - h) / 2
        lo[1], hi[1] = lo[1] - extra, hi[1] + extra
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _grid(bounds: tuple[float, float, float, float], gx: int, gy: int) -> np.ndarray:
    """Sample centres of a ``gy x gx`` grid over the bounds, row 0 at the top (largest y): :math:`(gy gx, 2)`."""
    x0, y0, x1, y1 = bounds
    xs = x0 + (np.arange(gx) + 0.5) * (x1 - x0) / gx
    ys = y1 - (np.arange(gy) + 0.5) * (y1 - y0) / gy
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


def compute(
    toy: Toy,
    *,
    k: int,
    kq: int,
    gamma: float,
    alpha: float,
    iters: int,
    tol: float,
    sigma: float,
    grid: tuple[int, int],
) -> ToyResult:
    """Graph, seeds, diffusion and the score of every grid point of the plane, for the three panels.

    Args:
        toy: The data.
        k: Neighbours of the mutual k-NN graph.
        kq: Neighbours of a query (and of a plane point) in eq. 7.
        gamma: Kernel exponent.
        alpha: Diffusion parameter.
        iters: CG iterations.
        tol: CG relative tolerance.
        sigma: Width of the embedding's Gaussian.
        grid: ``(gx, gy)`` samples of the plane.

    Returns:
        The :class:`ToyResult`.

    Raises:
        DiffusionToyError: If ``sigma`` is so small that the embedding would exceed :data:`MAX_DIM` dimensions.
    """
    gx, gy = grid
    bounds = _bounds(np.concatenate([toy.points, toy.queries]), gx / gy)
    centres = _centres(bounds, sigma)
    dim = centres[0].size * centres[1].size
    if dim > MAX_DIM:
        raise DiffusionToyError(
            f"{PROG}: --sigma {sigma:g} is too small for the plot: the embedding would have {dim} "
            f"dimensions (at most {MAX_DIM}); use a larger --sigma."
        )
    x = unit_embedding(toy.points, centres, sigma)
    q = unit_embedding(toy.queries, centres, sigma)
    a = mutual_knn_affinity(x, k=k, gamma=gamma)
    y_each = query_seeds(q, x, k=kq, gamma=gamma)  # (N, 2): eq. 7 for the query on A, and for the one on B
    y = torch.stack([y_each[:, 0], y_each.sum(1)], dim=1)  # one query; two queries (eq. 8, summed)
    f, res = diffusion_scores(a, y, alpha=alpha, max_iter=iters, tol=tol, return_residual=True)
    residual = float((res / y.norm(dim=0).clamp(min=torch.finfo(y.dtype).tiny)).max())
    nn = (x @ q[0]).clamp(min=0).pow(gamma)

    # The plane: s(z | q) for NN, y(z)^T f for diffusion (eq. 7 read in reverse); the database points too.
    plane = _grid(bounds, gx, gy)
    grid_nn, grid_f = [], []
    for s in range(0, plane.shape[0], CHUNK):
        z = unit_embedding(plane[s : s + CHUNK], centres, sigma)
        grid_nn.append((z @ q[0]).clamp(min=0).pow(gamma))
        grid_f.append(query_seeds(z, x, k=kq, gamma=gamma).T @ f)
    g_nn = torch.cat(grid_nn).numpy().reshape(gy, gx)
    g_f = torch.cat(grid_f).numpy().reshape(gy, gx, 2)
    db_f = (query_seeds(x, x, k=kq, gamma=gamma).T @ f).numpy()
    seeds = tuple(np.flatnonzero(col) for col in (y_each[:, 0].numpy(), y_each[:, 0].numpy(), y[:, 1].numpy()))
    return ToyResult(
        db_scores=(nn.numpy(), db_f[:, 0], db_f[:, 1]),
        grid_scores=(g_nn, g_f[..., 0], g_f[..., 1]),
        seeds=(seeds[0], seeds[1], seeds[2]),
        nn=nn.numpy(),
        f=f[:, 0].numpy(),
        f_two=f[:, 1].numpy(),
        residual=residual,
        bounds=bounds,
        dim=dim,
    )


def top_fraction(scores: np.ndarray, labels: np.ndarray, manifold: int, m: int) -> float:
    """Fraction of points of ``manifold`` among the ``m`` best-scored (stable sort: ties to the lower index).

    Example:
        >>> top_fraction(np.array([0.9, 0.1, 0.8, 0.7]), np.array([0, 0, 1, 1]), 0, 2)
        0.5
    """
    top = np.argsort(-np.asarray(scores), kind="stable")[:m]
    return float((np.asarray(labels)[top] == manifold).mean())


def rank_fraction(values: np.ndarray, db_scores: np.ndarray) -> np.ndarray:
    """Where a value would rank among the database scores, as the fraction of them that are strictly higher.

    A point of the plane scoring ``v`` would enter the top m of the database (rank ``1 + #{higher}``) iff
    ``rank_fraction(v) < m / N``: 0 above every database score, ``m / N`` just below the m-th best. A score
    tied with the m-th best is inside the top m.

    Example:
        >>> rank_fraction(np.array([5.0, 2.0, 1.5, 0.0]), np.array([3.0, 2.0, 1.0, 0.0]))
        array([0.  , 0.25, 0.5 , 0.75])
    """
    ordered = np.sort(np.asarray(db_scores, dtype=np.float64))
    n = ordered.size
    at_most = np.searchsorted(ordered, np.asarray(values, dtype=np.float64), side="right")  # db scores <= value
    return (n - at_most) / n


# ------------------------------------------------------------------------------------------------ drawing


def _shade(rank: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] of a rank fraction: dark orange at 0, white from 0.5 on."""
    t = np.clip(1.0 - np.asarray(rank) / 0.5, 0.0, 1.0)
    return np.stack([np.interp(t, _SHADE_T, _SHADE_RGB[:, c]) for c in range(3)], axis=-1) / 255.0


def _log_scores(grid_scores: np.ndarray, db_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logs of the scores, a score of 0 taken as the smallest positive one seen (monotone: ranks unchanged)."""
    both = np.concatenate([grid_scores.ravel(), db_scores])
    positive = both[both > 0]
    floor = float(positive.min()) if positive.size else 1.0
    return np.log(np.maximum(grid_scores, floor)), np.log(np.maximum(db_scores, floor))


def contour_levels(db_scores: np.ndarray) -> list[tuple[float, float]]:
    """``(rank level, score)`` of each of :data:`RANK_LEVELS` whose m-th best database score is positive.

    The score of the database point ranked ``m = ceil(level N)``: a point scoring at least that enters the top m.

    Example:
        >>> contour_levels(np.array([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]))
        [(0.05, 8.0), (0.25, 6.0), (0.5, 4.0)]
    """
    ordered = np.sort(np.asarray(db_scores, dtype=np.float64))[::-1]
    out = []
    for level in RANK_LEVELS:
        m = max(1, math.ceil(level * ordered.size))
        if ordered[m - 1] > 0:
            out.append((level, float(ordered[m - 1])))
    return out


def figure_size(panel: int, panels: int = 3) -> tuple[int, int]:
    """``(width, height)`` in pixels of the figure with ``panels`` plots of ``panel`` px width (4:3 plots)."""
    return panels * (panel + 2 * MARGIN), HEADER_H + TITLE_H + panel * 3 // 4 + FOOTER_H


def _wrap(text: str, width_px: float, size_pt: float, lines: int) -> str:
    """``text`` wrapped to about ``width_px`` at ``size_pt`` (DejaVu Sans: ~0.55 em a character), ``lines`` at most."""
    chars = max(10, int(width_px / (0.55 * size_pt * DPI / 72)))
    wrapped = textwrap.wrap(text, chars)
    if len(wrapped) > lines:
        wrapped = [*wrapped[: lines - 1], wrapped[lines - 1] + " ..."]
    return "\n".join(wrapped)


_LINESTYLES = ("solid", "dashed", "dotted")


def render(toy: Toy, result: ToyResult, *, panel: int, titles: Sequence[str], header: str, caption: str) -> bytes:
    """The figure as PNG bytes: per panel the shaded ranks, the contour lines and the points (matplotlib, Agg).

    Args:
        toy: The data.
        result: The scores (:func:`compute`), whose grid has the plots' 4:3 aspect.
        panel: Width of a plot in pixels (height ``3/4`` of it).
        titles: One title per panel (four lines at most).
        header: The figure's title (two lines at most).
        caption: The caption under the legend (four lines at most).

    Returns:
        The PNG file's bytes, an RGB image of :func:`figure_size`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.lines import Line2D

    width, height = figure_size(panel, len(titles))
    plot_h = panel * 3 // 4
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.text(MARGIN / width, 1 - 4 / height, _wrap(header, width - 2 * MARGIN, 10, 2), va="top", fontsize=10)
    x0, y0, x1, y1 = result.bounds
    gy, gx = result.grid_scores[0].shape
    xs = x0 + (np.arange(gx) + 0.5) * (x1 - x0) / gx
    ys = y1 - (np.arange(gy) + 0.5) * (y1 - y0) / gy
    for i, title in enumerate(titles):
        left = i * (panel + 2 * MARGIN) + MARGIN
        fig.text(left / width, 1 - HEADER_H / height, _wrap(title, panel, 8.5, 4), va="top", fontsize=8.5)
        ax = fig.add_axes((left / width, FOOTER_H / height, panel / width, plot_h / height))
        log_grid, log_db = _log_scores(result.grid_scores[i], result.db_scores[i])
        shade = _shade(rank_fraction(log_grid, log_db))
        ax.imshow(shade, extent=(x0, x1, y0, y1), origin="upper", interpolation="bilinear", aspect="auto")
        levels = contour_levels(result.db_scores[i])
        for level, score in levels:
            style = _LINESTYLES[RANK_LEVELS.index(level)]
            ax.contour(xs, ys, log_grid, levels=[math.log(score)], colors="0.2", linewidths=0.9, linestyles=style)
        ax.scatter(toy.points[:, 0], toy.points[:, 1], s=7, c=[BLUE], linewidths=0, zorder=3)
        seeds = toy.points[result.seeds[i]]
        ax.scatter(seeds[:, 0], seeds[:, 1], s=28, c=[GREEN], edgecolors="black", linewidths=0.5, zorder=4)
        queries = toy.queries[: 2 if i == 2 else 1]
        ax.scatter(queries[:, 0], queries[:, 1], s=90, c=[RED], edgecolors="black", linewidths=0.8, zorder=5)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xticks([])
        ax.set_yticks([])

    handles = [
        Line2D([], [], marker="o", ls="", ms=4, mfc=BLUE, mec=BLUE, label="database"),
        Line2D([], [], marker="o", ls="", ms=8, mfc=RED, mec="black", label="query"),
        Line2D([], [], marker="o", ls="", ms=5, mfc=GREEN, mec="black", label="its kq nearest neighbours (eq. 7)"),
        *(
            Line2D([], [], color="0.2", lw=0.9, ls=style, label=f"top {round(100 * level)} %")
            for level, style in zip(RANK_LEVELS, _LINESTYLES, strict=True)
        ),
    ]
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(MARGIN / width, (FOOTER_H - 2) / height),
        ncol=len(handles),
        frameon=False,
        fontsize=8,
        handletextpad=0.3,
        columnspacing=1.0,
        borderaxespad=0.0,
        borderpad=0.0,
    )
    bar_w = min(160, panel // 2)
    cax = fig.add_axes(((width - 3 * MARGIN - bar_w) / width, (FOOTER_H - 16) / height, bar_w / width, 9 / height))
    cmap = ListedColormap(_shade(np.linspace(0.0, 0.5, 256)))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 0.5), cmap), cax=cax, orientation="horizontal")
    bar.set_ticks([0.0, 0.25, 0.5], labels=["rank 1", "N/4", "N/2"], fontsize=7)
    bar.ax.tick_params(length=2, pad=1)
    ticks = bar.ax.get_xticklabels()
    ticks[0].set_horizontalalignment("left")
    ticks[-1].set_horizontalalignment("right")
    fig.text(MARGIN / width, (FOOTER_H - 30) / height, _wrap(caption, width - 2 * MARGIN, 8, 4), va="top", fontsize=8)
    rgba = io.BytesIO()
    fig.savefig(rgba, format="png", dpi=DPI)
    plt.close(fig)
    buf = io.BytesIO()
    with Image.open(rgba) as im:  # matplotlib writes RGBA; the figure is opaque
        im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ the command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m lightning_apps.{PROG}",
        description="Write the 2-D toy of Fig. 1 of Iscen et al. (CVPR 2017): ranking scores of plain NN and of "
        "diffusion on a mutual k-NN graph over two interleaved manifolds, and print how many points of the "
        "query's manifold each ranks first.",
    )
    p.add_argument("--data", choices=DATASETS, default="spirals", help="the two manifolds (default spirals)")
    p.add_argument("--points", type=int, default=300, help="points per manifold (default 300)")
    p.add_argument("--noise", type=float, default=None, help="noise std (default 0.07 moons, 0.035 spirals)")
    p.add_argument("--at", type=float, default=None, help="query at this fraction of a manifold's length")
    p.add_argument("--k", type=int, default=10, help="neighbours of the mutual k-NN graph (default 10)")
    p.add_argument("--kq", type=int, default=10, help="neighbours of a query, eq. 7 (default 10)")
    p.add_argument("--gamma", type=float, default=3.0, help="kernel exponent (default 3)")
    p.add_argument("--alpha", type=float, default=0.99, help="diffusion alpha in (0, 1) (default 0.99)")
    p.add_argument("--iters", type=int, default=300, help="CG iterations (default 300; the library's is 20)")
    p.add_argument("--tol", type=float, default=1e-8, help="CG relative tolerance (default 1e-8)")
    p.add_argument("--sigma", type=float, default=0.15, help="width of the embedding's Gaussian (default 0.15)")
    p.add_argument("--panel", type=int, default=400, help=f"plot width in pixels (>= {MIN_PANEL}; default 400)")
    p.add_argument("--grid", type=int, default=200, help="score samples across a plot (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data (default 0)")
    p.add_argument("--out", type=Path, default=Path("diffusion_toy.png"), help="output PNG")
    return p


def _check_args(args: argparse.Namespace) -> tuple[float, float]:
    """Range checks of the arguments; returns ``(noise, at)`` with the dataset's defaults filled in."""

    def bad(name: str, rule: str, value: object) -> DiffusionToyError:
        return DiffusionToyError(f"{PROG}: --{name} must be {rule}; got {value!r}.")

    noise = DEFAULT_NOISE[args.data] if args.noise is None else args.noise
    at = DEFAULT_AT[args.data] if args.at is None else args.at
    n = 2 * args.points
    if args.points < 10:
        raise bad("points", "an integer >= 10", args.points)
    if not (math.isfinite(noise) and noise >= 0):
        raise bad("noise", "a finite number >= 0", noise)
    if not (math.isfinite(at) and 0 <= at <= 1):
        raise bad("at", "a fraction in [0, 1]", at)
    if not 1 <= args.k < n:
        raise bad("k", f"an integer in [1, {n}) (N = 2 x --points)", args.k)
    if not 1 <= args.kq <= n:
        raise bad("kq", f"an integer in [1, {n}] (N = 2 x --points)", args.kq)
    if not (math.isfinite(args.gamma) and args.gamma > 0):
        raise bad("gamma", "a finite number > 0", args.gamma)
    if not 0 < args.alpha < 1:
        raise bad("alpha", "in (0, 1)", args.alpha)
    if args.iters < 1:
        raise bad("iters", "an integer >= 1", args.iters)
    if not (math.isfinite(args.tol) and args.tol >= 0):
        raise bad("tol", "a finite number >= 0", args.tol)
    if not (math.isfinite(args.sigma) and args.sigma > 0):
        raise bad("sigma", "a finite number > 0", args.sigma)
    if args.panel < MIN_PANEL:
        raise bad("panel", f"an integer >= {MIN_PANEL}", args.panel)
    if not 8 <= args.grid <= args.panel:
        raise bad("grid", f"an integer in [8, --panel = {args.panel}]", args.grid)
    return float(noise), float(at)


def run(args: argparse.Namespace) -> Path:
    """Compute the scores, print the summary and write the figure; returns the output path.

    Raises:
        DiffusionToyError: On a bad argument.
    """
    start = time.perf_counter()
    noise, at = _check_args(args)
    toy = make_toy(args.data, args.points, noise=noise, at=at, seed=args.seed)
    gx = args.grid
    gy = max(2, round(gx * 3 / 4))
    result = compute(
        toy,
        k=args.k,
        kq=args.kq,
        gamma=args.gamma,
        alpha=args.alpha,
        iters=args.iters,
        tol=args.tol,
        sigma=args.sigma,
        grid=(gx, gy),
    )
    half = args.points // 2
    frac_nn = top_fraction(result.nn, toy.labels, 0, half)
    frac_f = top_fraction(result.f, toy.labels, 0, half)
    frac_two = top_fraction(result.f_two, toy.labels, 1, half)
    name = "moon" if args.data == "moons" else "spiral"
    n = 2 * args.points
    header = (
        f"Diffusion vs nearest neighbours on two interleaved {args.data} (Iscen et al., CVPR 2017, Fig. 1): "
        f"N = {n} points, mutual {args.k}-NN graph, kernel max(x.z, 0)^{args.gamma:g}, kq = {args.kq}, "
        f"alpha = {args.alpha:g}, {args.iters} CG iterations (library default 20), tol {args.tol:g}"
    )
    titles = (
        f"(a) Plain nearest neighbours: score of z = its similarity s(z|q) to the query. Top {half} (|A|/2) "
        f"database points: {frac_nn:.0%} from {name} A.",
        f"(b) Diffusion: score of z = y(z)^T f, the diffusion scores f of its kq nearest database points, "
        f"weighted by similarity (eq. 7 in reverse). Top {half} by f: {frac_f:.0%} from {name} A.",
        f"(c) Diffusion, two queries, one per {name} (eq. 8: y = y(q1) + y(q2)): each spreads along its own "
        f"{name}. Top {half} by f: {1 - frac_two:.0%} from A, {frac_two:.0%} from B.",
    )
    caption = (
        f"Points are embedded as unit vectors with x.z = exp(-|p - p'|^2 / 2 sigma^2), sigma = {args.sigma:g} "
        f"({result.dim} Gaussian features on a grid). Shade: the rank a point z of the plane would take among the "
        f"N database points, all scored by the same function (white: rank N/2 = |A| or worse). Diffusion score of z: "
        f"the kernel-weighted sum of the diffusion scores of its kq nearest database points (eq. 7 read in "
        f"reverse); it fades away from the data as s(z|q) fades away from the query. Scores on a {gx} x {gy} grid, "
        f"interpolated. Max CG relative residual {result.residual:.1e}."
    )
    png = render(toy, result, panel=args.panel, titles=titles, header=header, caption=caption)
    out = Path(args.out)
    with atomic_write(out) as fh:
        fh.write(png)
    print(
        f"{PROG}: {args.data}, N = {n}, query on {name} A: fraction of {name}-A points among the top {half} "
        f"(|A|/2): plain NN {frac_nn:.3f}, diffusion {frac_f:.3f}; two queries: {name}-B points among the top "
        f"{half} {frac_two:.3f} by diffusion; k = {args.k}, kq = {args.kq}, gamma = {args.gamma:g}, alpha = "
        f"{args.alpha:g}, {args.iters} CG iterations, max relative residual {result.residual:.1e}; "
        f"{time.perf_counter() - start:.1f} s"
    )
    print(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command (see the module doc); returns 0, or 2 after one line on stderr for a bad argument."""
    return cli_main(PROG, _parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
