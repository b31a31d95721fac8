r"""Fig. 3 of Iscen et al. (CVPR 2017) on a run of the eval app: mAP against the number of iterations, CG vs eq. 3.

Usage::

    python -m lightning_apps.eval save_descriptors=regions output_dir=RUN    # once: the descriptors
    python -m lightning_apps.diffusion_figure --run RUN [--regional] [--k 200] [--kq 200]
        [--iters 0,1,2,3,5,10,15,20,30,50,80,110] [--out diffusion_iterations.png]

Reads ``RUN/descriptors.pt`` (written by ``save_descriptors``) and ``RUN/config.yaml`` (the dataset, for its
ground truth), builds the diffusion graph once (:class:`deepagg.Diffusion`), and for each iteration count t
ranks the database by (a) t iterations of conjugate gradient (:func:`deepagg.functional.conjugate_gradient`,
tol 1e-6, MATLAB ``pcg``'s smallest-residual iterate) and (b) t steps of the plain diffusion iteration of eq. 3,
:math:`f^t = \alpha S f^{t-1} + (1 - \alpha) y` from :math:`f^0 = 0` (a Jacobi iteration, section 4.3), then
prints and plots the Medium and Hard mAP of both against t, each point labelled with its solve time per query
(all queries in one batch). t = 0 ranks by the seeds ``y`` alone (the k-NN baseline restricted to kq
neighbours). The database rows the run could not read are left out, as in the app. Writes one PNG
(atomically). User errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from deepagg import Diffusion
from deepagg._io import atomic_write
from deepagg.metrics import evaluate_revisited
from lightning_apps.hew_figure import HewFigureError, cli_main

__all__ = ["Curves", "iteration_curves", "main"]

DEFAULT_ITERS = (0, 1, 2, 3, 5, 10, 15, 20, 30, 50, 80, 110)

Curves = dict[str, dict[str, list[float]]]


def _load(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    desc, conf = run / "descriptors.pt", run / "config.yaml"
    for p, how in ((desc, "run the eval app with save_descriptors=regions (or true)"), (conf, "an eval run folder")):
        if not p.is_file():
            raise HewFigureError(f"diffusion_figure: --run {run} has no {p.name}; {how}.")
    saved = torch.load(desc, map_location="cpu", weights_only=True)
    from lightning_apps import eval as app

    cfg = OmegaConf.load(conf)
    if "dataset" not in cfg:
        raise HewFigureError(f"diffusion_figure: {conf} names no dataset; is it an eval run folder?")
    ds = app.load_dataset(cfg.dataset, cfg)  # type: ignore[arg-type]
    return saved, ds.gnd


def _ranks(scores: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Rankings by decreasing score; equal scores keep the order of ``base`` (the cosine ranking)."""
    order = torch.argsort(scores.gather(1, base), dim=1, descending=True, stable=True)
    return base.gather(1, order)


def iteration_curves(
    saved: dict[str, Any], gnd: list[dict[str, Any]], iters: Sequence[int], **diffusion: Any
) -> tuple[Curves, Diffusion]:
    """The mAP (x100, medium and hard) and solve ms per query for CG and eq. 3 at each iteration count."""
    q, db, valid = saved["q"].double(), saved["db"].double(), saved["valid"]
    idx = torch.nonzero(valid).flatten()
    extras = saved.get("extras") or {}
    d = Diffusion(**diffusion)
    if d.regional:
        if "db_regions" not in extras:
            raise HewFigureError(
                "diffusion_figure: --regional needs region vectors; run the eval app with save_descriptors=regions."
            )
        d.fit(db[idx], extras["db_regions"][idx].double(), extras["db_region_mask"][idx])
        y = d.seeds(extras["q_regions"].double(), extras["q_region_mask"])
    else:
        d.fit(db[idx])
        y = d.seeds(q)
    op = d.operator
    assert op is not None
    base = torch.argsort(q @ db[idx].T, dim=1, descending=True, stable=True)
    curves: Curves = {m: {"iters": [], "medium": [], "hard": [], "ms": []} for m in ("cg", "eq3")}

    def record(method: str, t: int, f: torch.Tensor, ms: float) -> None:
        ranks = idx[_ranks(d.pool(f), base)]
        res = evaluate_revisited(ranks.numpy(), gnd)
        c = curves[method]
        c["iters"].append(t)
        c["medium"].append(100 * float(res["medium"]["map"]))
        c["hard"].append(100 * float(res["hard"]["map"]))
        c["ms"].append(ms)

    nq = max(q.shape[0], 1)
    for t in iters:
        start = time.perf_counter()
        f, _ = op.solve(y, max_iter=t, tol=d.tol)
        record("cg", t, f, 1e3 * (time.perf_counter() - start) / nq)
        start = time.perf_counter()
        f = torch.zeros_like(y)
        yy = (1 - d.alpha) * y.to(op.dtype)
        if op.perm is not None:
            yy = yy[op.perm]
            f = f[op.perm]
        for _ in range(t):
            f = torch.addmm(yy, op.s, f, alpha=d.alpha)
        if op.perm is not None:
            out = torch.empty_like(f)
            out[op.perm] = f
            f = out
        record("eq3", t, f, 1e3 * (time.perf_counter() - start) / nq)
    return curves, d


def plot(curves: Curves, title: str, out: Path) -> None:
    """Medium and Hard mAP against iterations, CG and eq. 3, each point labelled with ms per query."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {"cg": ("tab:red", "o", "conjugate gradient"), "eq3": ("tab:blue", "s", "iteration (3)")}
    for ax, setup in zip(axes, ("medium", "hard"), strict=True):
        for m, (color, marker, label) in styles.items():
            c = curves[m]
            ax.plot(c["iters"], c[setup], color=color, marker=marker, label=label)
            for t, v, ms in zip(c["iters"], c[setup], c["ms"], strict=True):
                if t in (1, 5, 10, 20, 50, 110):
                    ax.annotate(f"{ms:.1f}", (t, v), textcoords="offset points", xytext=(0, 6), ha="center",
                                fontsize=7, color=color)  # fmt: skip
        ax.set_xlabel("iterations")
        ax.set_ylabel(f"mAP ({setup.capitalize()})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(f"{title}\nlabels: solve time per query (ms, all queries in one batch)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    with atomic_write(out, "wb") as fh:
        fh.write(buf.getvalue())


def run_name(path: Path) -> str:
    """The dataset of the run (``results.json``'s meta), else the run folder's name."""
    try:
        return str(json.loads((path / "results.json").read_text())["meta"]["dataset"])
    except (OSError, ValueError, KeyError):
        return path.resolve().name


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightning_apps.diffusion_figure", description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="an eval run folder with descriptors.pt")
    p.add_argument("--regional", action="store_true", help="regional diffusion (needs save_descriptors=regions)")
    p.add_argument("--k", type=int, default=None, help="graph neighbours (default: 50 global, 200 regional)")
    p.add_argument("--kq", type=int, default=None, help="query neighbours (default: 10 global, 200 regional)")
    p.add_argument("--alpha", type=float, default=0.99)
    p.add_argument("--iters", default=",".join(map(str, DEFAULT_ITERS)), help="comma-separated iteration counts")
    p.add_argument("--out", type=Path, default=Path("diffusion_iterations.png"))
    return p


def run(args: argparse.Namespace) -> Curves:
    try:
        iters = sorted({int(v) for v in str(args.iters).split(",") if v.strip()})
    except ValueError:
        raise HewFigureError(
            f"diffusion_figure: --iters must be comma-separated ints >= 0; got {args.iters!r}."
        ) from None
    if not iters or iters[0] < 0:
        raise HewFigureError(f"diffusion_figure: --iters must be comma-separated ints >= 0; got {args.iters!r}.")
    saved, gnd = _load(args.run)
    try:
        curves, d = iteration_curves(saved, gnd, iters, regional=args.regional, k=args.k, kq=args.kq, alpha=args.alpha)
    except ValueError as err:
        raise HewFigureError(f"diffusion_figure: {err}") from None
    what = "regional" if d.regional else "global"
    cfg = OmegaConf.load(args.run / "config.yaml")
    net, pool = (str(cfg[g]._target_).split(".")[-1] for g in ("backbone", "pool"))
    setup = f"{run_name(args.run)}, {net} + {pool}"
    title = f"{what} diffusion (k={d.k}, kq={d.kq}, alpha={d.alpha:g}) on {setup}, whiten={cfg.whiten.get('fit')}"
    print(f"{'t':>4} | CG medium / hard | eq. 3 medium / hard | CG ms/query | eq. 3 ms/query")
    cg, it = curves["cg"], curves["eq3"]
    for i, t in enumerate(cg["iters"]):
        print(
            f"{t:>4} | {cg['medium'][i]:6.2f} / {cg['hard'][i]:6.2f} | {it['medium'][i]:6.2f} / {it['hard'][i]:6.2f} "
            f"| {cg['ms'][i]:8.2f} | {it['ms'][i]:8.2f}"
        )
    plot(curves, title, args.out)
    print(args.out)
    return curves


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on a user error, one line on stderr)."""
    return cli_main("diffusion_figure", _parser(), run, argv)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
