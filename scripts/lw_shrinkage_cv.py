"""Choose the Lw shrinkage on the whitening training set alone: leave-objects-out validation on clutter_train.

Usage (after one evaluation run has cached the maps; only the training split is read, never the test set)::

    .venv/bin/python scripts/lw_shrinkage_cv.py backbone=vgg16
    .venv/bin/python scripts/lw_shrinkage_cv.py backbone=mobilenet_v2 data_root=/tmp/data

The 11 objects of ``clutter_train`` are split into 4 folds. For each fold, learned whitening is fitted on the
rows and pairs of the other objects (distractors included) with every shrinkage of the grid, and the fold's
queries are ranked against the whole training database (revisitop Medium/Hard mAP, averaged over folds).
The arguments are Hydra overrides of ``conf/eval.yaml``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from deepagg import Whiten
from deepagg.metrics import evaluate_revisited
from lightning_apps import eval as app
from lightning_apps.extract import FeatureCache, inspect_images, model_id
from lightning_apps.paths import CONF_DIR

GRID = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9)


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["trainer.enable_progress_bar=false", *overrides])
    cfg = app.with_default_dataset(cfg)
    app.resolve_precision(cfg)
    trainer = instantiate(cfg.trainer)
    backbone, pool = instantiate(cfg.backbone), instantiate(cfg.pool).eval()
    train = app.load_dataset(app.dataset_config("clutter_train"), cfg)
    model = model_id(
        backbone=app._plain(cfg.backbone),
        ckpt_sha256=None,
        precision=str(trainer.precision),
        device=app._device_kind(trainer),
    )
    pipe = app.Pipeline(cfg, trainer, backbone, pool, FeatureCache(Path(cfg.cache_dir)), model, "")
    xdb, _ = pipe.describe(pipe.plans(inspect_images(train.images), None))
    xq, _ = pipe.describe(pipe.plans(inspect_images(train.queries), train.bbx))
    x = torch.cat([xdb, xq]).double()
    pairs = app.positive_pairs(train).numpy()
    manifest = train.extra["manifest"]
    owner = [r.get("object") for r in manifest["images"]] + [r.get("object") for r in manifest["queries"]]
    objects = sorted({o for o in owner if o is not None})
    folds = [objects[i::4] for i in range(4)]
    print(f"clutter_train: {len(xdb)} database images, {len(xq)} queries, {len(pairs)} pairs, {len(objects)} objects")
    print("| shrinkage | train-CV Medium mAP | train-CV Hard mAP |\n|---:|---:|---:|")
    for a in GRID:
        medium, hard = [], []
        for held in folds:
            keep = np.array([o not in held for o in owner])
            rows = np.nonzero(keep)[0]
            remap = -np.ones(len(x), dtype=np.int64)
            remap[rows] = np.arange(len(rows))
            fit_pairs = pairs[keep[pairs[:, 0]] & keep[pairs[:, 1]]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a = 0: the rank warning, expected
                w = Whiten(x.shape[1], dtype=torch.float64).fit_learned(
                    x[rows], torch.from_numpy(remap[fit_pairs]), shrinkage=a
                )
            qi = [i for i, o in enumerate(owner[len(xdb) :]) if o in held]
            ranks = torch.argsort(w(xq[qi].double()) @ w(xdb.double()).T, dim=1, descending=True, stable=True)
            res = evaluate_revisited(ranks.numpy(), [train.gnd[i] for i in qi], kappas=(1,))
            medium.append(res["medium"]["map"])
            hard.append(res["hard"]["map"])
        print(f"| {a} | {100 * np.mean(medium):.2f} | {100 * np.mean(hard):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
