"""Evaluate a retrieval pipeline on the revisited Oxford/Paris protocol: ``python -m lightning_apps.eval``.

Backbone -> pooling -> (whitening) -> (re-ranking), every part a Hydra config group that instantiates a deepagg
object (``conf/``). Without ``+dataset=...`` the embedded ``clutter`` benchmark is built (once, from Debian
photos) and evaluated; ``+dataset=roxf data_root=DIR`` evaluates ROxford5k from DIR (same code path). Prints the
Easy/Medium/Hard mAP and mP@k table and writes ``results.json``, ``results.md``, ``per_query_ap.csv``,
``config.yaml`` and ``topk.png`` into Hydra's output folder.

Examples::

    python -m lightning_apps.eval                                  # clutter, VGG16, GeM, learned whitening
    python -m lightning_apps.eval pool=rmac whiten=none backbone=mobilenet_v2
    python -m lightning_apps.eval rerank=alpha_qe 'scales=[1,0.7071067811865476,0.5]'
    python -m lightning_apps.eval +dataset=roxf data_root=/data/revisitop
    python -m lightning_apps.eval trainer=ddp                      # 2 processes (gloo on CPU)
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from deepagg.data.dataset import RetrievalDataset
from deepagg.data.revisitop import DatasetNotFoundError, ImageReadError
from deepagg.nn import DBA, QueryExpansion
from lightning_apps.extract import (
    FeatureCache,
    combine_scales,
    extract_maps,
    plan_items,
    pool_cached,
)
from lightning_apps.metrics import RevisitedMAP
from lightning_apps.report import format_table, save_grid, write_results

log = logging.getLogger("lightning_apps.eval")
# Lightning chatter that says nothing about this app (its predict_step returns None on purpose, and the
# size-bucket batch sampler returns every index by construction).
for _msg in (".*predict returned None.*", ".*custom batch sampler.*", ".*LeafSpec.*"):
    warnings.filterwarnings("ignore", message=_msg)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_DATASET = "clutter"
# The training set whitening is fitted on when ``whiten_train`` is null: never the test images.
WHITEN_TRAIN = {
    "clutter": "clutter_train",
    "clutter_tiny": "clutter_train",
    "roxford5k": "rparis6k",
    "rparis6k": "roxford5k",
    "oxford5k": "paris6k",
    "paris6k": "oxford5k",
}


class ConfigError(ValueError):
    """A configuration that cannot be run; reported in one paragraph, exit code 2."""


def dataset_config(name: str) -> DictConfig:
    """The YAML of ``conf/dataset/<name>.yaml`` (used when no ``+dataset=`` was given, and for training sets)."""
    path = CONF_DIR / "dataset" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
        raise ConfigError(f"eval: no dataset config {name!r}; choose one of {choices}.")
    return OmegaConf.load(path)  # type: ignore[return-value]


def with_default_dataset(cfg: DictConfig) -> DictConfig:
    """Compose ``dataset/clutter.yaml`` into ``cfg`` when the user chose no dataset (design.md section 5)."""
    if cfg.get("dataset") is None:
        with open_dict(cfg):
            cfg.dataset = dataset_config(DEFAULT_DATASET)
    return cfg


def load_dataset(node: DictConfig, root_cfg: DictConfig) -> RetrievalDataset:
    """Instantiate a dataset node, resolving ``${data_root}`` against the root config."""
    merged = OmegaConf.merge({"data_root": root_cfg.data_root}, {"node": node})
    try:
        return instantiate(merged.node)
    except InstantiationException as err:  # Hydra wraps the loader's own, user-facing error
        if isinstance(err.__cause__, DatasetNotFoundError):
            raise err.__cause__ from None
        raise


def _model_id(cfg: DictConfig) -> str:
    spec = {
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "ckpt": cfg.get("ckpt_path"),
        "normalize": "imagenet",
        "store": "float16",
        "batching": cfg.batching,
        "precision": str(cfg.precision),
    }
    if not cfg.backbone.get("pretrained", True):
        spec["seed"] = cfg.seed  # random weights depend on the seed
    return hashlib.sha256(repr(spec).encode()).hexdigest()[:16]


def describe(
    trainer: pl.Trainer,
    backbone: torch.nn.Module,
    pool: torch.nn.Module,
    ds: RetrievalDataset,
    cfg: DictConfig,
    cache: FeatureCache,
    *,
    queries: bool,
) -> tuple[torch.Tensor, dict[int, str]]:
    """Multi-scale descriptors of the database images (``queries=False``) or of the cropped queries."""
    paths = ds.queries if queries else ds.images
    plans = plan_items(
        paths,
        ds.bbx if queries else None,
        imsize=int(cfg.imsize),
        scales=list(cfg.scales),
        model_id=_model_id(cfg),
        is_query=queries,
    )
    failures: dict[int, str] = {}
    per_scale = []
    for items in plans:
        failures.update(
            extract_maps(
                trainer,
                backbone,
                items,
                cache,
                batch_size=int(cfg.batch_size),
                batching=str(cfg.batching),
                num_workers=int(cfg.num_workers),
                overwrite=bool(cfg.overwrite),
            )
        )
        if queries:  # plan_items already refused unreadable query files; a decode failure ends up here
            bad = [str(paths[i]) for i, it in enumerate(items) if not cache.has(it.key)]
            if bad:
                raise ImageReadError(f"eval: query images could not be read: {bad[:5]}")
        per_scale.append(pool_cached(items, cache, pool, batch_size=int(cfg.batch_size) * 8))
    return combine_scales(per_scale, float(cfg.ms_power)), failures


def _manifest_sha256(ds: RetrievalDataset) -> str:
    """sha256 of a built benchmark's manifest (sources, seed, builder version); empty for external data."""
    path = ds.root / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def positive_pairs(ds: RetrievalDataset) -> torch.Tensor:
    """(query row, positive row) pairs of a training set, rows indexing ``cat(database, queries)``."""
    pairs = []
    n_db = ds.num_images
    for qi, g in enumerate(ds.gnd):
        pos = np.concatenate([g.get(k, np.array([], np.int64)) for k in ("easy", "hard", "ok")])
        pairs += [(n_db + qi, int(j)) for j in pos]
    if not pairs:
        raise ConfigError(f"eval: the whitening training set {ds.name!r} has no positive pairs.")
    return torch.tensor(pairs, dtype=torch.long)


def fit_whitening(
    cfg: DictConfig,
    trainer: pl.Trainer,
    backbone: torch.nn.Module,
    pool: torch.nn.Module,
    test: RetrievalDataset,
    cache: FeatureCache,
    dim: int,
) -> torch.nn.Module | None:
    """Instantiate and fit ``cfg.whiten`` on its training set (refusing the test images unless forced)."""
    w = cfg.whiten
    if w.get("module") is None:
        return None
    train_name = cfg.get("whiten_train") or WHITEN_TRAIN.get(test.name)
    if train_name is None:
        raise ConfigError(f"eval: no default whitening training set for {test.name!r}; set whiten_train=<dataset>.")
    train = load_dataset(dataset_config(train_name), cfg)
    overlap = {p.resolve() for p in train.images} & {p.resolve() for p in test.images + test.queries}
    if (overlap or train.fingerprint == test.fingerprint) and not w.get("force_on_test", False):
        raise ConfigError(
            f"eval: whitening would be fitted on test images ({train.name!r} shares {len(overlap)} images with "
            f"{test.name!r}); that inflates every number. Choose another whiten_train, or set "
            f"whiten.force_on_test=true to do it anyway."
        )
    db, _ = describe(trainer, backbone, pool, train, cfg, cache, queries=False)
    q, _ = describe(trainer, backbone, pool, train, cfg, cache, queries=True)
    x = torch.cat([db, q])
    module = instantiate(w.module)(in_dim=dim, out_dim=w.get("dim"))
    if w.fit == "learned":
        module.fit_learned(x, positive_pairs(train))
    elif w.fit == "pca":
        module.fit_pca(x, shrinkage=float(w.get("shrinkage", 1.0)))
    else:
        raise ConfigError(f"eval: whiten.fit must be 'learned' or 'pca'; got {w.fit!r}.")
    log.info("whitening (%s) fitted on %s: %d descriptors", w.fit, train.name, x.shape[0])
    return module


def rank(q: torch.Tensor, db: torch.Tensor, rerank: torch.nn.Module | None) -> torch.Tensor:
    """Apply the re-ranker and rank by cosine similarity (ties to the lower database index)."""
    if isinstance(rerank, DBA):
        db = rerank(db)
    elif isinstance(rerank, QueryExpansion):
        q = rerank(q, db)
    elif rerank is not None:
        raise ConfigError(f"eval: unsupported re-ranker {type(rerank).__name__}.")
    return torch.argsort(q @ db.T, dim=1, descending=True, stable=True)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """The whole evaluation; returns the metric dict on the global-zero process (None elsewhere)."""
    cfg = with_default_dataset(cfg)
    pl.seed_everything(int(cfg.seed), verbose=False)
    t0 = time.perf_counter()
    ds = load_dataset(cfg.dataset, cfg)
    trainer: pl.Trainer = instantiate(cfg.trainer)
    backbone = instantiate(cfg.backbone)
    if cfg.get("ckpt_path"):
        state = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state.get("backbone", state))
    pool = instantiate(cfg.pool).eval()
    cache = FeatureCache(Path(cfg.cache_dir))
    db, failures = describe(trainer, backbone, pool, ds, cfg, cache, queries=False)
    q, _ = describe(trainer, backbone, pool, ds, cfg, cache, queries=True)
    whiten = fit_whitening(cfg, trainer, backbone, pool, ds, cache, db.shape[1])
    if whiten is not None:
        with torch.no_grad():
            db, q = whiten(db), whiten(q)
    rerank = instantiate(cfg.rerank) if cfg.rerank.get("_target_") else None
    ranks = rank(q, db, rerank)
    # Every process scores its share of the queries; compute() gathers the list states over the DDP world.
    mine = torch.arange(trainer.global_rank, ds.num_queries, trainer.world_size)
    metric = RevisitedMAP(ds.gnd, kappas=tuple(cfg.kappas))
    metric.update(ranks[mine], mine)
    results = metric.compute()
    if not trainer.is_global_zero:
        return None
    elapsed = time.perf_counter() - t0
    out_dir = Path(cfg.get("output_dir") or HydraConfig.get().runtime.output_dir)
    meta = {
        "dataset": ds.name,
        "protocol": ds.protocol,
        "queries": ds.num_queries,
        "database": ds.num_images,
        "dataset_fingerprint": ds.fingerprint,
        "manifest_sha256": _manifest_sha256(ds),
        "backbone": cfg.backbone._target_,
        "pool": cfg.pool._target_,
        "whiten": cfg.whiten.get("fit") if whiten is not None else "none",
        "rerank": repr(rerank) if rerank is not None else "none",
        "imsize": cfg.imsize,
        "precision": str(cfg.precision),
        "scales": list(cfg.scales),
        "unreadable_database_images": {str(ds.images[i]): r for i, r in failures.items()},
        "seconds": round(elapsed, 1),
        "torch": torch.__version__,
    }
    table = format_table(results, cfg.kappas)
    print(
        f"\n{ds.name} ({ds.protocol} protocol, {ds.num_queries} queries, {ds.num_images} images): "
        f"{meta['backbone']} + {meta['pool']}, whiten={meta['whiten']}, rerank={meta['rerank']}\n{table}"
    )
    files = write_results(
        out_dir,
        results=results,
        kappas=cfg.kappas,
        config_yaml=OmegaConf.to_yaml(cfg),
        meta=meta,
        query_names=[p.stem for p in ds.queries],
    )
    n_vis = min(int(cfg.num_vis_queries), ds.num_queries)
    if n_vis > 0:
        files["grid"] = save_grid(
            out_dir / "topk.png",
            queries=ds.queries,
            bbx=ds.bbx,
            images=ds.images,
            ranks=ranks.numpy(),
            gnd=ds.gnd,
            query_ids=np.linspace(0, ds.num_queries - 1, n_vis).round().astype(int).tolist(),
        )
    print(f"results: {files['markdown']} (took {elapsed:.0f} s)")
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; user errors (missing data, bad config) exit with code 2 and one paragraph."""
    try:
        run(cfg)
    except (DatasetNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
