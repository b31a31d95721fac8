"""The diffusion tables of docs/diffusion.md: Tables 1-2 of Iscen et al. (CVPR 2017) in structure, on clutter.

    .venv/bin/python scripts/diffusion_tables.py [--runs multirun/diffusion] [--pools gem,rmac] [extra overrides]

For each pool, one run of the eval app (VGG16, imsize 512, learned whitening on clutter_train unless overridden)
with ``save_descriptors=regions`` writes the whitened global descriptors and R-MAC region vectors of every image
(skipped when ``<runs>/<pool>/descriptors.pt`` exists); then every re-ranker below ranks those same descriptors
through :class:`deepagg.Reranker.rerank`, exactly as the app's ``rank()`` does (``tests/test_eval_diffusion.py``
checks that the app and the library give the same mAP on saved descriptors), and the table prints Medium and
Hard mAP and the re-ranking time per query (graph construction included on the first use of a graph, which is
then cached under ``<cache_dir>/graphs``; the time column says which). One process per pool, so the feature
maps are read once instead of once per row.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from deepagg import Diffusion, QueryExpansion
from deepagg.metrics import evaluate_revisited

REPO = Path(__file__).resolve().parents[1]


def rows() -> list[tuple[str, Any]]:
    """(label, re-ranker or None) in table order."""
    return [
        ("baseline (cosine k-NN)", None),
        ("AQE (k = 10)", QueryExpansion(k=10)),
        ("alpha-QE (k = 10, alpha = 3)", QueryExpansion(k=10, alpha=3.0)),
        ("global diffusion, k = 50 (paper)", Diffusion(k=50)),
        ("global diffusion, k = 10", Diffusion(k=10)),
        ("global diffusion, k = 10, truncated to top 100", Diffusion(k=10, truncate=100)),
        ("global diffusion, k = 10, truncated to top 250", Diffusion(k=10, truncate=250)),
        ("global diffusion, k = 10, transductive", Diffusion(k=10, mode="transductive")),
        ("regional diffusion, sum pooling, k = 200 (paper)", Diffusion(regional=True, pooling="sum")),
        ("regional diffusion, GMP, k = 200 (paper)", Diffusion(regional=True)),
        ("regional diffusion, GMP, k = 200, truncated to top 100", Diffusion(regional=True, truncate=100)),
        ("regional diffusion, sum pooling, k = 50", Diffusion(regional=True, k=50, pooling="sum")),
        ("regional diffusion, GMP, k = 50", Diffusion(regional=True, k=50)),
        ("regional diffusion, GMP, k = 50, truncated to top 250", Diffusion(regional=True, k=50, truncate=250)),
        ("regional diffusion, GMP, 5 GMM regions, k = 50 (paper)", Diffusion(regional=True, reduce_regions=5)),
        ("regional diffusion, GMP, 5 GMM regions, k = 10", Diffusion(regional=True, reduce_regions=5, k=10)),
    ]


def describe(pool: str, runs: Path, extra: list[str]) -> Path:
    out = runs / pool
    if not (out / "descriptors.pt").is_file():
        cmd = [sys.executable, "-m", "lightning_apps.eval", f"pool={pool}", "save_descriptors=regions"]
        cmd += ["num_vis_queries=0", f"output_dir={out}", *extra]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
    return out


def table(run: Path, cache: Path) -> list[tuple[str, float, float, float]]:
    saved = torch.load(run / "descriptors.pt", map_location="cpu", weights_only=True)
    cfg = OmegaConf.load(run / "config.yaml")
    from lightning_apps import eval as app

    gnd = app.load_dataset(cfg.dataset, cfg).gnd  # type: ignore[arg-type]
    q, db, valid = saved["q"], saved["db"], saved["valid"]
    extras = saved["extras"]
    out = []
    for label, rr in rows():
        if isinstance(rr, Diffusion):
            rr.cache_dir = cache
        start = time.perf_counter()
        ranks = app.rank(q, db, rr, valid, extras)
        ms = 1e3 * (time.perf_counter() - start) / q.shape[0]
        res = evaluate_revisited(ranks.numpy(), gnd)
        out.append((label, 100 * float(res["medium"]["map"]), 100 * float(res["hard"]["map"]), ms))
        print(f"{run.name}: {label}: {out[-1][1]:.2f} / {out[-1][2]:.2f} ({ms:.1f} ms per query)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, default=REPO / "multirun" / "diffusion")
    p.add_argument("--pools", default="gem,rmac")
    p.add_argument("extra", nargs="*", help="Hydra overrides for the eval runs")
    args = p.parse_args(argv)
    pools = [s for s in args.pools.split(",") if s]
    results = {}
    for pool in pools:
        run = describe(pool, args.runs, args.extra)
        cache = Path(str(OmegaConf.load(run / "config.yaml").cache_dir)) / "graphs"
        results[pool] = table(run, cache)
    head = " | ".join(f"{pl} M | {pl} H | {pl} ms/query" for pl in pools)
    print(f"\n| method | {head} |\n|---|" + "---:|" * (3 * len(pools)))
    for i, (label, *_) in enumerate(rows()):
        cells = " | ".join(f"{r[1]:.2f} | {r[2]:.2f} | {r[3]:.1f}" for r in (results[pl][i] for pl in pools))
        print(f"| {label} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
