"""Evaluate a retrieval pipeline on the revisited Oxford/Paris protocol: ``python -m lightning_apps.eval``.

Backbone -> pooling -> (whitening) -> (re-ranking), every part a Hydra config group that instantiates a deepagg
object (``conf/``). Without ``+dataset=...`` the embedded ``clutter`` benchmark is built (once, from Debian
photos) and evaluated; ``+dataset=roxf data_root=DIR`` evaluates ROxford5k from DIR (same code path). Prints the
Easy/Medium/Hard mAP and mP@k table and writes ``results.json``, ``results.md``, ``per_query_ap.csv``,
``config.yaml`` and ``topk.png`` into Hydra's output folder.

The whole configuration is checked before any work (values, every object it instantiates, the checkpoint, every
dataset the run needs and why, the query images, the whitening training set against the test images by
content): a user error is one paragraph on stderr and exit code 2, never a traceback after the extraction.

**Re-rankers.** ``rerank=<name>`` instantiates ``conf/rerank/<name>.yaml``, which must build a
:class:`deepagg.Reranker` (one interface for all of them, ``deepagg/nn/rerank.py``): :func:`rank` ranks the
valid database rows by cosine similarity (:meth:`deepagg.RerankState.initial`), calls ``rerank.rerank(state)``
and maps the rankings back to database indices. Chains (e.g. AQE then HeR) are a :class:`deepagg.RerankChain`
YAML. **Adding a re-ranker is one module + one YAML, no edit here**: subclass ``deepagg.Reranker``, implement
``rerank(state) -> state``, and point a ``conf/rerank/<name>.yaml`` ``_target_`` at it. A re-ranker whose
``requires`` names extra inputs the app does not provide yet (:data:`APP_EXTRAS`) is refused before any
extraction, with their names.

**Diffusion.** ``rerank=diffusion`` (global, Iscen et al. CVPR 2017) and ``rerank=regional_diffusion`` (R-MAC
regions of the cached maps, :func:`region_extras`) build the mutual k-NN graph of the database once and save
it under ``<cache_dir>/graphs/`` keyed by the descriptors' sha256, so later runs reuse it.

**HeW centre.** A pool with ``fit_center`` and ``variant="hewr"`` (``pool=hew_hewr``) centres local features by
the mean local feature of a training set (the authors' practice: the other dataset). Before any image is
described, the app fits it on the backbone feature maps of the database images of the whitening training set
(``whiten_train``, or the test set's partner in :data:`WHITEN_TRAIN`, also with ``whiten=none``), at the run's
imsize and scales, through the feature-map cache; with ``store=descriptors`` those maps are extracted into the
cache anyway (the centre needs maps; a rerun reuses them). The pooled-descriptor cache key covers the fitted
centre, and ``results.json`` records where it was fitted (``meta["pool_center_fitted_on"]``).

**Learned pools.** A pool with ``fit`` and a ``fitted`` buffer (``pool=temb``, ``pool=vlad``, ``pool=fv``) is
fitted the same way, on the training set's database images (never the test images), with the codebook seeded by
``seed``; the fitted ``state_dict`` is cached under ``<cache_dir>/pools/`` (:func:`fit_pool`), and
``meta["pool_fitted_on"]`` / ``meta["pool_fit_sha256"]`` record it.

Examples::

    python -m lightning_apps.eval                                  # clutter, VGG16, GeM, learned whitening
    python -m lightning_apps.eval pool=rmac whiten=none backbone=mobilenet_v2
    python -m lightning_apps.eval rerank=alpha_qe 'scales=[1,0.7071067811865476,0.5]'
    python -m lightning_apps.eval +dataset=roxf data_root=/data/revisitop
    python -m lightning_apps.eval trainer=ddp                      # 2 processes (gloo on CPU)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from deepagg._io import atomic_write, sha256_file
from deepagg.data.dataset import RetrievalDataset
from deepagg.data.revisitop import DatasetNotFoundError, ImageReadError
from deepagg.functional import l2n, rmac_regions
from deepagg.functional.spatial import LocalFeatures
from deepagg.nn import DSM, Diffusion, Reranker, RerankState
from deepagg.nn.diffusion import REGIONAL_EXTRAS
from deepagg.nn.spatial import LOCAL_FEATURE_EXTRAS
from lightning_apps.extract import (
    RESIZE_METHODS,
    CacheEntryError,
    ExtractionItem,
    FeatureCache,
    ImageInfo,
    combine_scales,
    distributed,
    extract_maps,
    inspect_images,
    model_id,
    plan_items,
    pool_cached,
    sift_selection,
)
from lightning_apps.metrics import RevisitedMAP
from lightning_apps.paths import CONF_DIR
from lightning_apps.report import format_table, save_grid, write_results

log = logging.getLogger("lightning_apps.eval")
# Lightning chatter that says nothing about this app (its predict_step returns None on purpose, and the
# size-bucket batch sampler returns every index by construction).
for _msg in (".*predict returned None.*", ".*custom batch sampler.*", ".*LeafSpec.*"):
    warnings.filterwarnings("ignore", message=_msg)


class _NoAdverts(logging.Filter):
    """Drop Lightning's "try installing litlogger" tip, printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


for _name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoAdverts())

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
MIN_SIDE = 32  # smallest long side (pixels) imsize * scale may ask for: below it a CNN map is a few cells or none
STORES = ("maps", "descriptors")
BATCHING = ("exact", "pad")
WHITEN_FITS = ("learned", "pca")
#: Names of the ``RerankState.extras`` this app can give a re-ranker (its ``requires``), built in :func:`run`:
#: the R-MAC region vectors of the database and query images (regional diffusion, :func:`region_extras`) and
#: their DSM local features (:func:`local_feature_extras`).
APP_EXTRAS: frozenset[str] = frozenset(REGIONAL_EXTRAS) | frozenset(LOCAL_FEATURE_EXTRAS)


class ConfigError(ValueError):
    """A configuration that cannot be run; reported in one paragraph, exit code 2."""


# ------------------------------------------------------------------------------------------------------ config


def dataset_config(name: str) -> DictConfig:
    """The YAML of ``conf/dataset/<name>.yaml`` (used when no ``+dataset=`` was given, and for training sets)."""
    path = CONF_DIR / "dataset" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
        raise ConfigError(f"eval: no dataset config {name!r}; choose one of {choices}.")
    return OmegaConf.load(path)  # type: ignore[return-value]


def with_default_dataset(cfg: DictConfig) -> DictConfig:
    """Compose ``dataset/clutter.yaml`` into ``cfg`` when the user chose no dataset (design.md section 5).

    Keys the user set without choosing a dataset (``dataset.seed=1``, which :func:`dataset_key_overrides` turns
    into ``+dataset.seed=1``) are merged over it.
    """
    node = cfg.get("dataset")
    if node is None or "_target_" not in node:
        with open_dict(cfg):
            cfg.dataset = OmegaConf.merge(dataset_config(DEFAULT_DATASET), node if node is not None else {})
    return cfg


def dataset_key_overrides(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``dataset.<key>=<value>`` made ``+dataset.<key>=<value>`` when no dataset is chosen.

    ``dataset`` is deliberately absent from the defaults list (so that ``+dataset=roxf`` works), so Hydra would
    refuse ``dataset.seed=1`` ("not in struct"); with this rewrite it sets a key of the default ``clutter``
    (:func:`with_default_dataset`). With a dataset chosen (``+dataset=...``) nothing changes.
    """
    chosen = "dataset" in override_keys(argv[1:], top=False)
    if chosen:
        return list(argv)
    return [argv[0], *(f"+{a}" if a.startswith("dataset.") and "=" in a else a for a in argv[1:])]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _plain(v: Any) -> Any:
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def check_config(cfg: DictConfig) -> None:
    """Check every plain value of the config (no I/O); raises one :class:`ConfigError` listing every problem.

    The objects the config instantiates (backbone, pool, re-ranker, trainer) validate their own arguments when
    :func:`run` builds them, also before any work.
    """
    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    imsize = _plain(cfg.get("imsize"))
    imsize_ok = _is_int(imsize) and imsize >= MIN_SIDE
    need(imsize_ok, f"imsize must be an int >= {MIN_SIDE} (the long side in pixels); got {imsize!r}.")
    scales = _plain(cfg.get("scales"))
    if not isinstance(scales, list) or not scales:
        problems.append(f"scales must be a non-empty list of positive numbers, e.g. [1.0]; got {scales!r}.")
    else:
        bad = [s for s in scales if not _is_number(s) or float(s) <= 0]
        need(not bad, f"scales must be finite numbers > 0; got {scales!r}.")
        need(
            len({float(s) for s in scales if _is_number(s)}) == len(scales), f"scales must be distinct; got {scales!r}."
        )
        if imsize_ok and not bad:
            small = [s for s in scales if round(float(s) * imsize) < MIN_SIDE]
            need(
                not small,
                f"every scale must give a long side of at least {MIN_SIDE} px at imsize={imsize}; scales {small} give "
                f"{[round(float(s) * imsize) for s in small]} px.",
            )
    ms_power = _plain(cfg.get("ms_power"))
    need(_is_number(ms_power) and float(ms_power) > 0, f"ms_power must be a finite number > 0; got {ms_power!r}.")
    batch_size = _plain(cfg.get("batch_size"))
    need(_is_int(batch_size) and batch_size >= 1, f"batch_size must be an int >= 1; got {batch_size!r}.")
    workers = _plain(cfg.get("num_workers"))
    need(_is_int(workers) and workers >= 0, f"num_workers must be an int >= 0; got {workers!r}.")
    kappas = _plain(cfg.get("kappas"))
    need(
        isinstance(kappas, list) and bool(kappas) and all(_is_int(k) and k >= 1 for k in kappas),
        f"kappas must be a non-empty list of ints >= 1 (the k of mP@k); got {kappas!r}.",
    )
    n_vis = _plain(cfg.get("num_vis_queries"))
    need(_is_int(n_vis) and n_vis >= 0, f"num_vis_queries must be an int >= 0; got {n_vis!r}.")
    for key, choices in (("batching", BATCHING), ("resize", RESIZE_METHODS), ("store", STORES)):
        value = _plain(cfg.get(key))
        need(value in choices, f"{key} must be one of {list(choices)}; got {value!r}.")
    need(
        isinstance(_plain(cfg.get("overwrite")), bool),
        f"overwrite must be true or false; got {cfg.get('overwrite')!r}.",
    )
    need(_is_int(_plain(cfg.get("seed"))), f"seed must be an int; got {cfg.get('seed')!r}.")
    save = _plain(cfg.get("save_descriptors", False))
    need(save in (False, True, "regions"), f"save_descriptors must be false, true or regions; got {save!r}.")
    need(
        save != "regions" or _plain(cfg.get("store")) == "maps",
        f"save_descriptors=regions computes region vectors from cached maps; set store=maps (got {cfg.get('store')}).",
    )
    w = cfg.whiten
    if w.get("module") is not None:
        need(w.get("fit") in WHITEN_FITS, f"whiten.fit must be one of {list(WHITEN_FITS)}; got {w.get('fit')!r}.")
        dim = _plain(w.get("dim"))
        need(dim is None or (_is_int(dim) and dim >= 1), f"whiten.dim must be null or an int >= 1; got {dim!r}.")
        if w.get("fit") == "pca":
            s = _plain(w.get("shrinkage", 1.0))
            need(_is_number(s) and float(s) >= 0, f"whiten.shrinkage must be a finite number >= 0; got {s!r}.")
        if w.get("fit") == "learned":
            c = _plain(w.get("center", "all"))
            need(c in ("all", "queries"), f"whiten.center must be 'all' or 'queries'; got {c!r}.")
            a = _plain(w.get("shrinkage", 0.0))
            need(
                _is_number(a) and 0.0 <= float(a) <= 1.0,
                f"whiten.shrinkage must be a number in [0, 1] for whiten=learned (0: Lw as published); got {a!r}.",
            )
    if problems:
        raise ConfigError("eval: invalid configuration: " + " ".join(problems))


def _instantiate(node: DictConfig, what: str) -> Any:
    """``instantiate(node)``, with the object's own argument error turned into a :class:`ConfigError`."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, DatasetNotFoundError):
            raise cause from None
        raise ConfigError(f"eval: {what} cannot be built from {_plain(node)}: {cause}") from None


def load_dataset(node: DictConfig, root_cfg: DictConfig) -> RetrievalDataset:
    """Instantiate a dataset node, resolving ``${data_root}`` against the root config."""
    merged = OmegaConf.merge({"data_root": root_cfg.data_root}, {"node": node})
    return _instantiate(merged.node, "the dataset")  # type: ignore[no-any-return]


@dataclass
class CheckpointParts:
    """What a checkpoint holds besides the backbone: a fine-tuned pool and whitening (``lightning_apps.finetune``).

    ``pool_target`` is the ``_target_`` of the pool it was trained with; ``pool`` / ``whiten`` its ``state_dict``
    and the trained whitening layer's (``mean``, ``projection``, ``fitted``: a :class:`deepagg.Whiten`), or None.
    """

    pool_target: str | None = None
    pool: dict[str, torch.Tensor] | None = None
    whiten: dict[str, torch.Tensor] | None = None


def _prefixed(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_checkpoint(backbone: torch.nn.Module, path: str | None, parts: CheckpointParts | None = None) -> str | None:
    """Load a fine-tuned backbone ``state_dict`` (plain, ``{"backbone": ...}`` or Lightning's ``state_dict``).

    A checkpoint of ``lightning_apps.finetune`` (a Lightning checkpoint with a ``"deepagg"`` entry) also holds
    the trained pool and whitening layer: they are put into ``parts`` when given (:func:`build_session` applies
    the pool's to pools of the same class and the whitening's with ``whiten=checkpoint``).

    Returns the sha256 of the file's bytes (the cache key uses content, not the path), or None without a path.
    """
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"eval: ckpt_path {str(p)!r} is not a file.")
    digest = sha256_file(p)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"eval: ckpt_path {str(p)!r} cannot be read as a torch checkpoint: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
        info = state.get("deepagg") if isinstance(state.get("deepagg"), dict) else {}
        full = state["state_dict"]
        if parts is not None:
            parts.pool_target = info.get("pool_target")
            parts.pool = _prefixed(full, "pool.") or None
            parts.whiten = _prefixed(full, "whiten.") or None
        state = _prefixed(full, "backbone.")
    elif isinstance(state, dict) and isinstance(state.get("backbone"), dict):
        state = state["backbone"]
    try:
        backbone.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"eval: ckpt_path {str(p)!r} does not fit the backbone: {first}") from None
    return digest


def apply_checkpoint_pool(pools: Sequence[torch.nn.Module], nodes: Sequence[Any], parts: CheckpointParts) -> list[str]:
    """Load the checkpoint's trained pool into every pool built from the same class; returns their class names.

    A pool of another class (e.g. HeW on a backbone fine-tuned with GeM) keeps its configured values.
    """
    if parts.pool is None or parts.pool_target is None:
        return []
    loaded = []
    for pool, node in zip(pools, nodes, strict=True):
        if str(node.get("_target_")) != parts.pool_target:
            continue
        try:
            pool.load_state_dict(parts.pool)
        except (RuntimeError, TypeError) as err:
            first = str(err).strip().splitlines()[0]
            raise ConfigError(
                f"eval: the checkpoint's trained pool does not fit {type(pool).__name__}: {first}"
            ) from None
        loaded.append(type(pool).__name__)
    return loaded


def checkpoint_whiten(parts: CheckpointParts, dim: int, path: Any) -> torch.nn.Module:
    """The whitening layer trained by ``lightning_apps.finetune`` (``whiten=checkpoint``), as a fitted Whiten."""
    from deepagg import Whiten

    state = parts.whiten
    if state is None or "projection" not in state:
        raise ConfigError(
            f"eval: whiten=checkpoint needs a ckpt_path of lightning_apps.finetune trained with a whitening layer "
            f"(finetune whiten=learned); {'ckpt_path is not set' if not path else f'{str(path)!r} holds none'}. Use "
            "whiten=learned to fit Lw on the training set instead."
        )
    rows, cols = (int(n) for n in state["projection"].shape)
    if cols != dim:
        raise ConfigError(
            f"eval: the checkpoint's whitening layer takes {cols}-D descriptors; this pool gives {dim}-D ones."
        )
    module = Whiten(dim, rows)
    module.load_state_dict(state)
    return module.eval()


def native_bf16(accelerator: str) -> bool:
    """Whether bf16 matmuls are native on this machine: a CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16.

    Without them (e.g. an AVX2-only CPU) bf16 autocast is emulated: VGG16 ran about 12 times slower than in
    float32 on such a machine (AMD EPYC, 2 cores), while on an AMX CPU it ran 3.5 times faster.
    """
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    cpu = torch.cpu
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(c is None for c in checks):  # an older or newer torch without these probes: read the CPU flags
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "amx_bf16" in flags or "avx512_bf16" in flags
    return any(bool(c()) for c in checks if c is not None)


def resolve_precision(cfg: DictConfig) -> None:
    """Replace ``precision: auto`` (trainer and top level) by ``bf16-mixed`` or ``32-true`` for this machine."""
    node = cfg.trainer
    if str(node.get("precision")) != "auto":
        return
    chosen = "bf16-mixed" if native_bf16(str(node.get("accelerator", "auto"))) else "32-true"
    with open_dict(cfg):
        node.precision = chosen
        if str(cfg.get("precision")) == "auto":
            cfg.precision = chosen
    log.info("precision=auto: %s on this machine", chosen)


def _device_kind(trainer: pl.Trainer) -> str:
    """``cpu`` or ``cuda:<device name>``: the kind of device the extraction runs on (part of the cache key)."""
    dev = trainer.strategy.root_device
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return dev.type


def _module_id(module: torch.nn.Module, node: Any) -> str:
    """Config plus parameter/buffer values of a module: identifies the descriptors it computes."""
    h = hashlib.sha256(json.dumps(_plain(node), sort_keys=True, default=str).encode())
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    h.update(buf.getvalue())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ pipeline


@dataclass
class Pipeline:
    """The built objects a run shares between the test set and the whitening training set."""

    cfg: DictConfig
    trainer: pl.Trainer
    backbone: torch.nn.Module
    pool: torch.nn.Module
    cache: FeatureCache
    model: str
    pool_id: str
    used_keys: set[str] = field(default_factory=set)
    pool_node: Any = None  # the config node the pool was built from (part of a learned pool's cache key)
    session: Any = None  # the Session whose timings get the extraction seconds

    def extract(self, items: Sequence[ExtractionItem], **kwargs: Any) -> dict[int, str]:
        """:func:`extract_maps` of ``items`` with this pipeline's trainer, backbone and cache; timed."""
        t = time.perf_counter()
        c = self.cfg
        try:
            return extract_maps(
                self.trainer,
                self.backbone,
                items,
                self.cache,
                batch_size=int(c.batch_size),
                num_workers=int(c.num_workers),
                **kwargs,
            )
        finally:
            if self.session is not None:
                self.session.add_time("extraction", time.perf_counter() - t)

    def plans(self, infos: Sequence[ImageInfo], bbx: Sequence[Any] | None) -> list[list[ExtractionItem]]:
        c = self.cfg
        return plan_items(
            infos,
            bbx,
            imsize=int(c.imsize),
            scales=[float(s) for s in c.scales],
            model=self.model,
            batching=str(c.batching),
            batch_size=int(c.batch_size),
            resize=str(c.resize),
        )

    def keys(self, items: Sequence[ExtractionItem]) -> list[str | None]:
        """Cache keys of the items: their maps, or their pooled descriptors with ``store=descriptors``."""
        if self.cfg.store == "maps":
            return [it.key for it in items]
        return [
            hashlib.sha256(f"{it.key}|{self.pool_id}".encode()).hexdigest() if it.key is not None else None
            for it in items
        ]

    def describe(self, plans: list[list[ExtractionItem]]) -> tuple[torch.Tensor, dict[int, str]]:
        """Descriptors (multi-scale) of the planned images, extracting what the cache lacks; failures by index."""
        c = self.cfg
        descriptors = c.store == "descriptors"
        failures: dict[int, str] = {}
        per_scale = []
        for items in plans:
            keys = self.keys(items)
            self.used_keys.update(k for k in keys if k is not None)
            for _attempt in range(3):
                failures.update(
                    self.extract(
                        items,
                        overwrite=bool(c.overwrite) and _attempt == 0,
                        pool=self.pool if descriptors else None,
                        keys=keys,
                    )
                )
                desc, bad = pool_cached(
                    items, self.cache, None if descriptors else self.pool, batch_size=int(c.batch_size) * 8, keys=keys
                )
                if not _any_rank(bool(bad)):
                    break
            else:
                raise RuntimeError(
                    f"eval: cache entries under {self.cache.root} cannot be read back right after being written "
                    "(disk full or failing?)."
                )
            per_scale.append(desc)
        return combine_scales(per_scale, float(c.ms_power)), failures


def _any_rank(flag: bool) -> bool:
    """``flag`` or-reduced over the DDP processes (the decision to re-extract must be the same everywhere)."""
    if not distributed():
        return flag
    t = torch.tensor([int(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _manifest_sha256(ds: RetrievalDataset) -> str:
    """sha256 of a built benchmark's manifest (sources, seed, builder version); empty for external data."""
    path = ds.root / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def positive_pairs(ds: RetrievalDataset, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Matching pairs of a training set as rows of ``cat(database, queries)``.

    Every (query, easy/hard/ok positive) pair, and, where the dataset's manifest names the object of each database
    image (``clutter_train``), every pair of database images of one object that is not junk for it. Pairs with
    a row that is not ``valid`` (an unreadable image) are dropped.
    """
    pairs = []
    n_db = ds.num_images
    for qi, g in enumerate(ds.gnd):
        pos = np.concatenate([g.get(k, np.array([], np.int64)) for k in ("easy", "hard", "ok")])
        pairs += [(n_db + qi, int(j)) for j in pos]
    records = (getattr(ds, "extra", {}).get("manifest") or {}).get("images") or []
    if len(records) == n_db:
        by_object: dict[str, list[int]] = {}
        for j, rec in enumerate(records):
            if rec.get("object") is not None and rec.get("gt") in ("easy", "hard"):
                by_object.setdefault(str(rec["object"]), []).append(j)
        for members in by_object.values():
            pairs += [(a, b) for i, a in enumerate(members) for b in members[i + 1 :]]
    if valid is not None:
        pairs = [(a, b) for a, b in pairs if bool(valid[a]) and bool(valid[b])]
    if not pairs:
        raise ConfigError(f"eval: the whitening training set {ds.name!r} has no positive pairs.")
    return torch.tensor(pairs, dtype=torch.long)


def fit_whitening(
    cfg: DictConfig, pipe: Pipeline, train: RetrievalDataset, infos: tuple[list[ImageInfo], list[ImageInfo]], dim: int
) -> torch.nn.Module:
    """Instantiate and fit ``cfg.whiten`` on its training set (checked against the test set by :func:`run`)."""
    w = cfg.whiten
    db, db_fail = pipe.describe(pipe.plans(infos[0], None))
    q, q_fail = pipe.describe(pipe.plans(infos[1], train.bbx))
    if q_fail:
        raise ImageReadError(f"eval: whitening training queries of {train.name!r} could not be read: {q_fail}")
    x = torch.cat([db, q])
    valid = torch.ones(x.shape[0], dtype=torch.bool)
    valid[list(db_fail)] = False
    module = _instantiate(w.module, "whiten.module")(in_dim=dim, out_dim=w.get("dim"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if w.fit == "learned":
            module.fit_learned(
                x,
                positive_pairs(train, valid),
                center=str(w.get("center", "all")),
                shrinkage=float(w.get("shrinkage", 0.0)),
            )
        else:
            module.fit_pca(x[valid], shrinkage=float(w.get("shrinkage", 1.0)))
    for msg in caught:
        log.warning("whitening: %s", msg.message)
    log.info(
        "whitening (%s) fitted on %s: %d descriptors -> %d dims", w.fit, train.name, int(valid.sum()), module.out_dim
    )
    return module  # type: ignore[no-any-return]


def check_reranker(obj: Any, target: Any = None) -> Reranker:
    """``obj`` if it is a :class:`deepagg.Reranker` whose ``requires`` the app can provide, else a ConfigError."""
    if not isinstance(obj, Reranker):
        cls = type(obj)
        built = f"{target} builds" if target else "got"
        raise ConfigError(
            f"eval: rerank must build a deepagg.Reranker; {built} {cls.__module__}.{cls.__qualname__}, which is not "
            "one. Subclass deepagg.Reranker and implement rerank(state: RerankState) -> RerankState (new rankings, "
            "and possibly new descriptors; list the extra inputs it needs in `requires`), see deepagg/nn/rerank.py."
        )
    missing = [name for name in obj.requires if name not in APP_EXTRAS]
    if missing:
        raise ConfigError(
            f"eval: re-ranker {type(obj).__name__} requires extra inputs {missing} (its `requires`) that this app "
            f"cannot provide yet (it provides {sorted(APP_EXTRAS) or 'none'}); choose another rerank."
        )
    return obj


def rank(
    q: torch.Tensor,
    db: torch.Tensor,
    rerank: Reranker | None,
    valid: torch.Tensor | None = None,
    extras: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Rank by cosine similarity (ties to the lower database index), then apply the re-ranker.

    The re-ranker gets :meth:`RerankState.initial` of the queries and the valid database rows and returns the
    state after re-ranking; its rankings are mapped back to database indices. Database rows that are not
    ``valid`` (unreadable images) take no part in re-ranking (no query or database expansion, no HeR shortlist
    uses them) and come last in every ranking, in index order (when the re-ranker returns full rankings; after a
    truncated ranking they are simply not listed, like every other unlisted image). ``extras`` go into the
    state; those named ``db_*`` have one row per database image and are restricted to the valid rows too.

    Raises:
        ConfigError: If ``rerank`` is not a :class:`deepagg.Reranker` or requires extras the app lacks.
        RuntimeError: If the re-ranker returns rankings that are not ``(Q, K)`` int64 with K <= valid rows.
    """
    if rerank is not None:
        check_reranker(rerank)
    idx = torch.arange(db.shape[0]) if valid is None else torch.nonzero(valid).flatten()
    given = {name: (t[idx] if name.startswith("db_") else t) for name, t in (extras or {}).items()}
    state = RerankState.initial(q, db[idx], **given)
    if rerank is not None:
        with torch.no_grad():
            state = rerank.rerank(state)
    ranks = state.ranks
    if ranks.ndim != 2 or ranks.shape[0] != q.shape[0] or ranks.shape[1] > idx.numel() or ranks.dtype != torch.int64:
        raise RuntimeError(
            f"eval: {type(rerank).__name__}.rerank() returned rankings of shape {tuple(ranks.shape)} and dtype "
            f"{ranks.dtype}; expected ({q.shape[0]}, K) int64 with K <= {idx.numel()} (the valid database rows)."
        )
    order = idx[ranks]
    if valid is None or bool(valid.all()) or ranks.shape[1] < idx.numel():
        return order
    rest = torch.nonzero(~valid).flatten()
    return torch.cat([order, rest.expand(q.shape[0], -1)], dim=1)


class RegionVectors(torch.nn.Module):
    """R-MAC region vectors of feature maps, zero-padded to ``r_max`` regions and flattened: ``(B, r_max * C)``.

    A "pool" for :func:`lightning_apps.extract.pool_cached`, which wants one vector per image: the regions of
    :func:`deepagg.functional.rmac_regions` (region 0 the whole map, then the Tolias grid, ``levels`` levels).
    """

    def __init__(self, r_max: int, levels: int = 3) -> None:
        super().__init__()
        self.r_max, self.levels = r_max, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = rmac_regions(x.float(), levels=self.levels)
        assert isinstance(r, torch.Tensor)
        if r.shape[1] > self.r_max:
            raise RuntimeError(f"eval: {r.shape[1]} R-MAC regions on a {tuple(x.shape[-2:])} map; max {self.r_max}.")
        out = r.new_zeros(r.shape[0], self.r_max, r.shape[2])
        out[:, : r.shape[1]] = r
        return out.flatten(1)


def region_extras(
    pipe: Pipeline, q_plans: list[list[ExtractionItem]], db_plans: list[list[ExtractionItem]], whiten: Any
) -> dict[str, torch.Tensor]:
    """The regional extras (:data:`APP_EXTRAS`): R-MAC region vectors of the query and database images.

    From the cached feature maps of the first scale (``store=maps``): each region's MAC vector, L2-normalised,
    whitened by the run's whitening (fitted on global descriptors, as cirtorch's and Iscen et al.'s regional
    vectors) and L2-normalised again. ``*_regions`` are ``(N, R, D)``, zero rows for padding, ``*_region_mask``
    ``(N, R)`` bool (a region whose MAC vector is all zero is dropped too).
    """
    # An upper bound on the regions of any map (the grid's long-side count exceeds the short one by at most 6);
    # the padding columns no image uses are trimmed below. (The plans know image sizes, not map sizes.)
    r_max = 1 + sum(level * (level + 6) for level in range(1, 4))
    pool = RegionVectors(r_max)
    out: dict[str, torch.Tensor] = {}
    for role, plans in (("q", q_plans[0]), ("db", db_plans[0])):
        flat, bad = pool_cached(plans, pipe.cache, pool, batch_size=int(pipe.cfg.batch_size) * 8)
        if bad:
            raise RuntimeError(f"eval: {len(bad)} cached feature maps could not be read back for the region vectors.")
        regions = flat.view(flat.shape[0], r_max, -1)
        mask = regions.abs().sum(-1) > 0
        used = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
        regions, mask = regions[:, :used], mask[:, :used]
        regions = l2n(regions, dim=-1)
        if whiten is not None:
            if int(whiten.in_dim) != regions.shape[-1]:
                raise ConfigError(
                    f"eval: the whitening was fitted on {whiten.in_dim}-D pooled descriptors and cannot whiten the "
                    f"{regions.shape[-1]}-D region vectors of regional diffusion; use a pool whose descriptor is "
                    "the channel dimension (pool=rmac, gem, mac, spoc) or whiten=none."
                )
            with torch.no_grad():
                white = whiten(regions[mask])
            regions = regions.new_zeros(*regions.shape[:2], white.shape[1])
            regions[mask] = white
        out[f"{role}_regions"], out[f"{role}_region_mask"] = regions, mask
    n_q, n_db = out["q_region_mask"].sum(1).float(), out["db_region_mask"].sum(1).float()
    log.info("region vectors: %.1f per database image, %.1f per query", n_db.mean(), n_q.mean())
    return out


def find_dsm(rerank: Reranker | None) -> DSM | None:
    """The :class:`deepagg.DSM` stage of a re-ranker (itself or inside a chain), or None."""
    if rerank is None:
        return None
    return next((m for m in rerank.modules() if isinstance(m, DSM)), None)


def _opencv_version() -> str:
    """``cv2.__version__``, or ``"none"`` without OpenCV (the detector then fails with its own message)."""
    try:
        import cv2
    except ImportError:
        return "none"
    return str(getattr(cv2, "__version__", "unknown"))


#: Images of one map shape per call of the torch MSER detector (rerank.detector.backend=torch).
TORCH_DETECTOR_IMAGES_PER_CALL = 16


def _detect_and_save(
    dsm: DSM, pending: list[tuple[int, list[torch.Tensor]]], paths: Sequence[Path | None], device: Any, query: bool
) -> None:
    """Local features of the ``pending`` images (same map shapes), one call on ``device``; each written atomically.

    ``paths`` are the images' cache files, in ``pending``'s order; ``pending`` is emptied.
    """
    stacked = [torch.stack([maps[s] for _, maps in pending]).to(device) for s in range(len(dsm.scales))]
    found = dsm.extract(stacked, query=query).to("cpu")
    for j, path in enumerate(paths):
        buf = io.BytesIO()
        torch.save(found[j].trimmed().as_dict(), buf)
        with atomic_write(path, "wb") as fh:  # type: ignore[arg-type]
            fh.write(buf.getvalue())
    pending.clear()


def local_feature_extras(
    pipe: Pipeline,
    dsm: DSM,
    q_infos: Sequence[ImageInfo],
    db_infos: Sequence[ImageInfo],
    bbx: Sequence[Any] | None,
) -> dict[str, LocalFeatures]:
    """The DSM extras (:data:`APP_EXTRAS`): local features of the query and database images.

    The feature maps are extracted at the DSM's scales (``dsm.scales``, exact-size batches) through the feature
    cache, each image's local features detected from its maps (:meth:`deepagg.DSM.extract`) and cached under
    ``<cache_dir>/dsm/`` (written atomically, keyed by the maps' keys, the detector settings and the OpenCV
    release), so the database
    is detected once and later runs (or an interrupted one) only read them back. An image without maps (unreadable)
    gets no features.
    """
    c = pipe.cfg
    # The OpenCV release is part of the key: 4.10 to 5.1 find the same regions with deepagg's settings (docs/dsm.md),
    # but a release that changes MSER must not read back features cached under another. v2: OpenCV's min_diversity
    # became 0 (v1 features of OpenCV 5.0 came from its buggy MSER).
    ident = json.dumps(
        {"max_features": dsm.max_features, "detector": dsm.detector, "opencv": _opencv_version(), "v": 2},
        sort_keys=True,
        default=str,
    )
    # The torch MSER (rerank.detector.backend=torch) runs on the run's device, many images of one map shape per call
    # (its 256 level steps are paid once per call); OpenCV's, on the CPU, one image at a time.
    torch_backend = dsm.detector.get("backend", "opencv") == "torch"
    device = pipe.trainer.strategy.root_device if torch_backend else torch.device("cpu")
    per_call = TORCH_DETECTOR_IMAGES_PER_CALL if torch_backend else 1
    out: dict[str, LocalFeatures] = {}
    for role, infos, boxes in (("q", q_infos, bbx), ("db", db_infos, None)):
        plans = plan_items(
            infos,
            boxes,
            imsize=int(c.imsize),
            scales=list(dsm.scales),
            model=pipe.model,
            batching="exact",
            batch_size=int(c.batch_size),
            resize=str(c.resize),
        )
        query = role == "q"
        feats: list[LocalFeatures] = []
        todo: list[int] = []
        paths: list[Path | None] = []
        for i in range(len(infos)):
            keys = [plans[s][i].key for s in range(len(dsm.scales))]
            if any(k is None for k in keys):
                paths.append(None)
                continue
            key = hashlib.sha256(f"{'|'.join(keys)}|{ident}|query={query}".encode()).hexdigest()  # type: ignore[arg-type]
            path = Path(c.cache_dir) / "dsm" / key[:2] / f"{key}.pt"
            paths.append(path)
            if not path.exists() or bool(c.overwrite):
                todo.append(i)
        if todo:
            for items in plans:
                sub = [items[i] for i in todo]
                pipe.used_keys.update(it.key for it in sub if it.key is not None)
                bad = pipe.extract(sub)
                if bad:
                    log.warning("dsm: %d %s images could not be extracted; they get no local features", len(bad), role)
            t0, step = time.perf_counter(), max(1, len(todo) // 10)
            pending: list[tuple[int, list[torch.Tensor]]] = []  # images of one map shape, detected in one call
            for n, i in enumerate(todo, 1):
                keys = [plans[s][i].key for s in range(len(dsm.scales))]
                try:
                    maps = [pipe.cache.get(k) for k in keys]  # type: ignore[arg-type]
                except (FileNotFoundError, CacheEntryError):
                    paths[i] = None
                    continue
                if pending and [m.shape for m in pending[0][1]] != [m.shape for m in maps]:
                    _detect_and_save(dsm, pending, [paths[j] for j, _ in pending], device, query)
                pending.append((i, maps))
                if len(pending) >= per_call:
                    _detect_and_save(dsm, pending, [paths[j] for j, _ in pending], device, query)
                if n % step == 0 or n == len(todo):
                    dt = time.perf_counter() - t0
                    log.info("dsm: %s local features %d/%d (%.2f s per image)", role, n, len(todo), dt / n)
            if pending:
                _detect_and_save(dsm, pending, [paths[j] for j, _ in pending], device, query)
        for fpath in paths:
            if fpath is None:
                feats.append(LocalFeatures.empty(1, len(dsm.scales)))
                continue
            feats.append(LocalFeatures.from_dict(torch.load(fpath, weights_only=True)))
        out[f"{role}_local_features"] = LocalFeatures.cat(feats)
        counts = out[f"{role}_local_features"].counts().float()
        mean = float(counts.mean()) if len(counts) else 0.0
        log.info("dsm: %.0f local features per %s image (%d images)", mean, role, len(counts))
    return out


def save_dsm(out_dir: Path, dsm: DSM, ds: RetrievalDataset, valid: torch.Tensor, extras: dict[str, Any]) -> Path:
    """Write ``out_dir/dsm.pt``, atomically: what :mod:`lightning_apps.dsm_figure` draws from.

    ``{"q_local_features", "db_local_features"}`` (:meth:`LocalFeatures.as_dict`, every database image),
    ``"inliers"`` / ``"ranks"`` :math:`(Q, top)` (the re-ranked shortlist, database indices), ``"queries"``,
    ``"images"`` (paths), ``"bbx"``, ``"gnd"`` and the DSM settings.
    """
    idx = torch.nonzero(valid).flatten()
    last = dsm.last_verification or {}
    db_feats = extras["db_local_features"]
    payload = {
        "q_local_features": extras["q_local_features"].as_dict(),
        "db_local_features": db_feats.as_dict(),
        "inliers": last.get("inliers"),
        "ranks": idx[last["ranks"]] if "ranks" in last else None,
        "queries": [str(p) for p in ds.queries],
        "images": [str(p) for p in ds.images],
        "bbx": [None if b is None else [float(v) for v in b] for b in ds.bbx],
        "gnd": [{k: np.asarray(v).tolist() for k, v in g.items()} for g in ds.gnd],
        "dsm": {
            "scales": list(dsm.scales),
            "error": dsm.error,
            "max_scale_change": dsm.max_scale_change,
            "lo_iters": dsm.lo_iters,
        },
    }
    path = out_dir / "dsm.pt"
    buf = io.BytesIO()
    torch.save(payload, buf)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


def save_descriptors(
    out_dir: Path, q: torch.Tensor, db: torch.Tensor, valid: torch.Tensor, extras: dict[str, Any] | None
) -> Path:
    """Write the final (whitened) descriptors of the run to ``out_dir/descriptors.pt``, atomically.

    ``{"q": (Q, D), "db": (N, D), "valid": (N,) bool, "extras": {...}}`` (local features as
    :meth:`LocalFeatures.as_dict` dicts): what a user needs to try re-rankers or
    plot their own curves (``lightning_apps.diffusion_figure`` reads it) without re-running the extraction.
    """
    path = out_dir / "descriptors.pt"
    buf = io.BytesIO()
    plain = {k: (v.as_dict() if isinstance(v, LocalFeatures) else v) for k, v in (extras or {}).items()}
    torch.save({"q": q, "db": db, "valid": valid, "extras": plain}, buf)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


def set_graph_cache(rerank: Reranker | None, folder: Path) -> None:
    """Point every diffusion stage without its own ``cache_dir`` at ``folder`` (the graphs live by the features)."""
    if rerank is None:
        return
    for m in rerank.modules():
        if isinstance(m, Diffusion) and m.cache_dir is None:
            m.cache_dir = folder


def needs_center(pool: torch.nn.Module) -> bool:
    """Whether the pool centres local features by a training mean first (``HeWPool(variant="hewr")``)."""
    return callable(getattr(pool, "fit_center", None)) and getattr(pool, "variant", None) == "hewr"


def _need_datasets(
    cfg: DictConfig, *, center: bool = False, fit: str | None = None
) -> tuple[RetrievalDataset, RetrievalDataset | None, str | None]:
    """Load the test set and (when whitening is on, ``center`` or ``fit``) its training set; missing ones are named.

    The training set (``whiten_train``, or the test set's partner in :data:`WHITEN_TRAIN`) serves to fit the
    whitening, with ``center`` the pool's centre (its database images' mean local feature), and with ``fit`` (the
    pool's class name) a learned pool (:func:`fit_pool`). The partner of a built ``clutter`` draw
    (``dataset.seed=N``, dataset ``<name>_seed<N>``) is built with the same seed (``clutter_train_seed<N>``), which
    shares no object and no photo with it; an explicit ``whiten_train`` keeps its own config.
    """
    errors: list[str] = []
    test: RetrievalDataset | None = None
    train: RetrievalDataset | None = None
    try:
        test = load_dataset(cfg.dataset, cfg)
    except DatasetNotFoundError as err:
        errors.append(f"the test set: {err}")
    train_name = None
    whiten_on = cfg.whiten.get("module") is not None
    uses = (
        ([f"fit whiten={cfg.whiten.fit}"] if whiten_on else [])
        + ([f"fit the HeW centre of pool={type_name(cfg.pool)} (variant hewr)"] if center else [])
        + ([f"fit pool={fit} (PCA, codebook, rotation)"] if fit else [])
    )
    center = center or bool(fit)  # the pool's own fit needs the training set whatever whiten says
    if uses:
        test_name = test.name if test is not None else str(cfg.dataset.get("name", cfg.dataset.get("variant", "")))
        # A built clutter draw (dataset.seed=N, named <name>_seed<N>) gets its variant's partner drawn with the same
        # seed: the two splits of one seed share no object and no photo (deepagg.data.clutter). whiten_train=<name>
        # keeps that config's own seed.
        draw = cfg.dataset.get("seed") if type_name(cfg.dataset) == "ensure_clutter" else None
        inherit = bool(draw) and not cfg.get("whiten_train")
        variant_name = test_name.removesuffix(f"_seed{draw}") if draw else test_name
        train_name = cfg.get("whiten_train") or WHITEN_TRAIN.get(variant_name)
        if train_name is None:
            if not center:
                raise ConfigError(
                    f"eval: no default whitening training set for {test_name!r}; set whiten_train=<dataset> or "
                    "whiten=none."
                )
            raise ConfigError(
                f"eval: no default training set for {test_name!r}, needed to {' and '.join(uses)}; set "
                "whiten_train=<dataset> (it names the training set of the centre too)."
            )
        why = (
            f"{train_name!r}{f' (dataset.seed={draw}, as the test set)' if inherit else ''} is needed to "
            f"{' and '.join(uses)} "
            + (
                "(whiten_train)"
                if cfg.get("whiten_train")
                else f"(the default whitening training set for {test_name!r})"
            )
            + "; set whiten_train=<another dataset>"
            + (" or whiten=none to run without it" if not center else "")
        )
        try:
            train_node = dataset_config(str(train_name))
            if inherit and "seed" in train_node:
                train_node.seed = draw
            train = load_dataset(train_node, cfg)
        except DatasetNotFoundError as err:
            errors.append(f"{why}: {err}")
    if errors:
        raise DatasetNotFoundError(
            "eval: the run needs data that is not there. " + " ".join(f"({i}) {e}" for i, e in enumerate(errors, 1))
        )
    assert test is not None
    return test, train, train_name


def type_name(node: DictConfig) -> str:
    """The class name a config node builds (``deepagg.HeWPool`` -> ``HeWPool``)."""
    return str(node.get("_target_", "")).rsplit(".", 1)[-1]


def needs_fit(pool: torch.nn.Module) -> bool:
    """Whether the pool learns its parameters from training maps first and is not fitted yet (``TEmbPool`` ...)."""
    return callable(getattr(pool, "fit", None)) and isinstance(getattr(pool, "fitted", None), torch.Tensor)


def _stream_train_maps(
    pipe: Pipeline, train: RetrievalDataset, infos: Sequence[ImageInfo], consume: Any, what: str
) -> int:
    """Call ``consume(iterator)`` on the feature maps of ``train``'s database images; returns the positions seen.

    The maps are those of the run (imsize, every scale, batching, model), extracted through the feature-map cache
    whatever ``store`` says (a centre or a codebook is learned from local features, not pooled vectors), then
    streamed from the cache one map at a time. A pool that selects local features by SIFT keypoints
    (``mask="sift"``) gets ``(map, None, None, selection)`` tuples with each image's cached SIFT mask.
    Entries that cannot be read back are removed and extracted again, as in :meth:`Pipeline.describe`.
    """
    c = pipe.cfg
    plans = pipe.plans(infos, None)
    for items in plans:
        pipe.used_keys.update(it.key for it in items if it.key is not None)
    with_images = getattr(pipe.pool, "mask", None) == "sift"
    positions = 0
    for _attempt in range(3):
        good: list[ExtractionItem] = []
        for items in plans:
            failures = pipe.extract(items, overwrite=bool(c.overwrite) and _attempt == 0)
            good += [it for i, it in enumerate(items) if it.key is not None and i not in failures]
        if not good:
            raise ImageReadError(f"eval: no database image of {train.name!r} could be read to {what}.")
        bad: list[str] = []
        positions = 0

        def maps(good: list[ExtractionItem] = good, bad: list[str] = bad) -> Iterator[Any]:
            nonlocal positions
            for it in good:
                key = str(it.key)
                try:
                    fmap = pipe.cache.get(key)
                except (CacheEntryError, FileNotFoundError) as err:
                    log.warning("%s; it will be recomputed", err)
                    pipe.cache.remove(key)
                    bad.append(key)
                    continue
                positions += fmap.shape[-2] * fmap.shape[-1]
                if with_images:
                    yield fmap, None, None, sift_selection(pipe.cache, it, (fmap.shape[-2], fmap.shape[-1]))[None]
                else:
                    yield fmap

        try:
            consume(maps())
        except ValueError:
            if not bad:  # no valid position although every map was read: not a cache problem
                raise
        if not _any_rank(bool(bad)):
            break
    else:
        raise RuntimeError(
            f"eval: cache entries under {pipe.cache.root} cannot be read back right after being written "
            "(disk full or failing?)."
        )
    return positions


def fit_pool_center(pipe: Pipeline, train: RetrievalDataset, infos: Sequence[ImageInfo]) -> int:
    """Fit ``pipe.pool.fit_center`` on the feature maps of ``train``'s database images; returns the positions used."""
    return _stream_train_maps(pipe, train, infos, pipe.pool.fit_center, "fit the HeW centre of the pool")


def fit_pool(pipe: Pipeline, train: RetrievalDataset, infos: Sequence[ImageInfo]) -> tuple[str, bool]:
    """Fit a learned pool (``pipe.pool.fit``) on ``train``'s database images, or load the cached fit.

    The fitted ``state_dict`` is cached under ``<cache_dir>/pools/<key>.pt`` (written atomically), keyed by the
    model, the pool's config, the training set's manifest, the run's image geometry and the seed (the codebook's
    generator is seeded with ``seed``), so reruns and every other re-ranker or whitening reuse it.

    Returns:
        ``(sha256 of the fitted state, whether it came from the cache)``.
    """
    c = pipe.cfg
    ident = json.dumps(
        {
            "model": pipe.model,
            "pool": _plain(pipe.pool_node if pipe.pool_node is not None else c.pool),
            "train": train.name,
            "train_manifest": _manifest_sha256(train),
            "train_images": [str(p) for p in train.images] if not _manifest_sha256(train) else len(train.images),
            "imsize": int(c.imsize),
            "scales": [float(s) for s in c.scales],
            "batching": str(c.batching),
            "resize": str(c.resize),
            "seed": int(c.seed),
        },
        sort_keys=True,
        default=str,
    )
    path = Path(c.cache_dir) / "pools" / f"{hashlib.sha256(ident.encode()).hexdigest()}.pt"
    cached = False
    if path.is_file() and not bool(c.overwrite):
        try:
            pipe.pool.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            cached = True
        except Exception as err:  # unreadable (truncated pickle: any error), stale or foreign: fit again
            log.warning("cannot load the fitted pool %s (%s); it will be fitted again", path, err)
    if not cached:
        generator = torch.Generator().manual_seed(int(c.seed))
        positions = _stream_train_maps(
            pipe,
            train,
            infos,
            lambda maps: pipe.pool.fit(maps, generator=generator),
            f"fit pool={type(pipe.pool).__name__}",
        )
        log.info("%s fitted on %s (%d positions)", type(pipe.pool).__name__, train.name, positions)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in pipe.pool.state_dict().items()}
        with atomic_write(path, fsync=True) as fh:
            torch.save(state, fh)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in pipe.pool.state_dict().items()}, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest(), cached


def _check_queries(ds: RetrievalDataset, infos: Sequence[ImageInfo], role: str) -> None:
    bad = [f"{info.path} ({info.error})" for info in infos if info.digest is None]
    if bad:
        raise ImageReadError(
            f"eval: {len(bad)} {role} query image(s) of {ds.name!r} cannot be read (a query is never skipped): "
            f"{'; '.join(bad[:5])}"
        )


def _check_whitening_guard(
    cfg: DictConfig,
    test: RetrievalDataset,
    train: RetrievalDataset,
    test_infos: Sequence[ImageInfo],
    train_infos: Sequence[ImageInfo],
    what: str = "whitening",
) -> None:
    """Refuse a training set (of ``what``) that shares image *content* with the test set (unless forced)."""
    test_digests = {i.digest: i.path for i in test_infos if i.digest is not None}
    shared = [i for i in train_infos if i.digest is not None and i.digest in test_digests]
    if shared and not cfg.whiten.get("force_on_test", False):
        example = f" (e.g. {shared[0].path} = {test_digests[str(shared[0].digest)]})" if shared else ""
        raise ConfigError(
            f"eval: {what} would be fitted on test images ({train.name!r} shares {len(shared)} images with "
            f"{test.name!r} by content{example}); that inflates every number. Choose another whiten_train, or set "
            f"whiten.force_on_test=true to do it anyway."
        )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ------------------------------------------------------------------------------------------------------ stages
# A run is explicit stages that every row of a side-by-side comparison (lightning_apps.compare) shares:
# build_session (objects, datasets, guards: nothing extracted yet), describe_with (maps through the cache, one
# pooling, its whitening), rerank_with (one re-ranker on descriptors already in memory) and score.


@dataclass
class Session:
    """What every pipeline of a run shares: built backbone and trainer, datasets, image infos, cache, timings."""

    cfg: DictConfig
    trainer: pl.Trainer
    backbone: torch.nn.Module
    ckpt_sha256: str | None
    ds: RetrievalDataset
    train: RetrievalDataset | None
    q_infos: list[ImageInfo]
    db_infos: list[ImageInfo]
    train_infos: tuple[list[ImageInfo], list[ImageInfo]] | None
    model: str
    cache: FeatureCache
    precision: str
    t0: float
    #: Seconds per stage, in run order (``build`` = datasets; ``extraction`` = backbone feature maps, every call;
    #: the rest named by the caller).
    timings: dict[str, float] = field(default_factory=dict)
    used_keys: set[str] = field(default_factory=set)
    #: The checkpoint's trained pool and whitening layer (``lightning_apps.finetune``), if it holds them.
    ckpt_parts: CheckpointParts = field(default_factory=CheckpointParts)
    pools_from_ckpt: list[str] = field(default_factory=list)  # classes of the pools given the checkpoint's state

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


@dataclass
class Described:
    """One pooling's descriptors of the test set (whitened when the run whitens), and what made them."""

    pool: torch.nn.Module
    node: DictConfig
    pipe: Pipeline
    q: torch.Tensor
    db: torch.Tensor
    valid: torch.Tensor
    failures: dict[int, str]
    whiten: Any
    q_plans: list[list[ExtractionItem]]
    db_plans: list[list[ExtractionItem]]
    center_sha256: str | None = None
    pool_sha256: str | None = None
    seconds: float = 0.0  # pooling + fits + whitening, extraction excluded
    extras: dict[str, Any] = field(default_factory=dict)  # region vectors / local features, built once


def build_rerank(cfg: DictConfig, node: DictConfig) -> Reranker | None:
    """Instantiate and check one ``rerank`` node (None for ``rerank=none``); its graphs live by the features."""
    if not node.get("_target_"):
        return None
    rerank = _instantiate(node, "rerank")
    check_reranker(rerank, node.get("_target_"))
    if rerank.requires and cfg.store != "maps":
        raise ConfigError(
            f"eval: rerank {type(rerank).__name__} needs {list(rerank.requires)} (region vectors or local "
            f"features), which are computed from cached feature maps; set store=maps (got store={cfg.store})."
        )
    set_graph_cache(rerank, Path(cfg.cache_dir) / "graphs")
    return rerank  # type: ignore[no-any-return]


def build_session(
    cfg: DictConfig, pool_nodes: Sequence[DictConfig], rerank_nodes: Sequence[DictConfig]
) -> tuple[Session, list[torch.nn.Module], list[Reranker | None]]:
    """Build every object the config names and check every input, before any extraction.

    Builds the trainer, backbone (and checkpoint), every pool and re-ranker (each validates its own arguments),
    loads (or builds: the ``build`` stage) the test set and the training set any pool or the whitening needs,
    reads every image header, refuses unreadable queries and training sets that share content with the test set.
    """
    t0 = time.perf_counter()
    pl.seed_everything(int(cfg.seed), verbose=False)
    resolve_precision(cfg)
    trainer: pl.Trainer = _instantiate(cfg.trainer, "trainer")
    backbone = _instantiate(cfg.backbone, "backbone")
    parts = CheckpointParts()
    ckpt_sha256 = load_checkpoint(backbone, cfg.get("ckpt_path"), parts)
    pools = [_instantiate(node, "pool").eval() for node in pool_nodes]
    from_ckpt = apply_checkpoint_pool(pools, pool_nodes, parts)
    if from_ckpt:
        log.info("checkpoint: trained %s state loaded into the pool", parts.pool_target)
    if cfg.whiten.get("fit") == "checkpoint" and parts.whiten is None:
        checkpoint_whiten(parts, 0, cfg.get("ckpt_path"))  # raises the error that says what is missing
    reranks = [build_rerank(cfg, node) for node in rerank_nodes]
    in_channels = getattr(backbone, "out_channels", None)
    wdim = _plain(cfg.whiten.get("dim")) if cfg.whiten.get("module") is not None else None
    for pool in pools:
        dim = pool.out_dim(in_channels) if in_channels is not None and hasattr(pool, "out_dim") else None
        if dim is not None and wdim is not None and wdim > dim:
            raise ConfigError(
                f"eval: invalid configuration: whiten.dim must be at most the pooled dimension {dim} "
                f"({type(pool).__name__} on {in_channels} channels); got {wdim}."
            )
    center = any(needs_center(p) for p in pools)
    learned = next((type_name(n) for p, n in zip(pools, pool_nodes, strict=True) if needs_fit(p)), None)
    t_build = time.perf_counter()
    ds, train, _ = _need_datasets(cfg, center=center, fit=learned)
    whiten_on = cfg.whiten.get("module") is not None
    q_infos, db_infos = inspect_images(ds.queries), inspect_images(ds.images)
    _check_queries(ds, q_infos, "test")
    train_infos: tuple[list[ImageInfo], list[ImageInfo]] | None = None
    if train is not None and whiten_on:
        train_infos = (inspect_images(train.images), inspect_images(train.queries))
        _check_queries(train, train_infos[1], "whitening training")
        _check_whitening_guard(cfg, ds, train, db_infos + q_infos, train_infos[0] + train_infos[1])
    elif train is not None and (center or learned):
        # The HeW centre and learned pools are fitted on the training set's database images: the same guard.
        train_infos = (inspect_images(train.images), [])
        what = "the HeW centre of the pool" if center else f"pool={learned}"
        _check_whitening_guard(cfg, ds, train, db_infos + q_infos, train_infos[0], what)
    build_seconds = time.perf_counter() - t_build
    precision = str(trainer.precision)
    model = model_id(
        backbone=_plain(cfg.backbone),
        ckpt_sha256=ckpt_sha256,
        precision=precision,
        device=_device_kind(trainer),
        seed=None if cfg.backbone.get("pretrained", True) else int(cfg.seed),
    )
    session = Session(
        cfg, trainer, backbone, ckpt_sha256, ds, train, q_infos, db_infos, train_infos, model,
        FeatureCache(Path(cfg.cache_dir)), precision, t0,
    )  # fmt: skip
    session.ckpt_parts, session.pools_from_ckpt = parts, from_ckpt
    session.add_time("setup", time.perf_counter() - t0 - build_seconds)
    session.add_time("build", build_seconds)
    return session, pools, reranks


def describe_with(session: Session, pool: torch.nn.Module, node: DictConfig) -> Described:
    """One pooling's (whitened) descriptors of the test set: fits (centre, learned pool, whitening) included.

    Feature maps come from the cache (extracted on first use: timed as ``extraction`` in ``session.timings``),
    so a second pooling of the same run extracts nothing.
    """
    cfg, train, train_infos = session.cfg, session.train, session.train_infos
    t0 = time.perf_counter()
    before = session.timings.get("extraction", 0.0)
    pipe = Pipeline(cfg, session.trainer, session.backbone, pool, session.cache, session.model, _module_id(pool, node))
    pipe.pool_node, pipe.session, pipe.used_keys = node, session, session.used_keys
    out = Described(pool, node, pipe, *(torch.empty(0),) * 3, {}, None, [], [])  # type: ignore[arg-type]
    if needs_center(pool) and train is not None:
        positions = fit_pool_center(pipe, train, train_infos[0] if train_infos else inspect_images(train.images))
        log.info("hew centre fitted on %s: %d positions", train.name, positions)
        out.center_sha256 = hashlib.sha256(pool.center.detach().cpu().numpy().tobytes()).hexdigest()
        # The descriptor cache key covers the fitted centre: another centre never reuses old descriptors.
        pipe.pool_id = hashlib.sha256(f"{_module_id(pool, node)}|center={out.center_sha256}".encode()).hexdigest()
    if needs_fit(pool) and train is not None:
        out.pool_sha256, cached = fit_pool(pipe, train, train_infos[0] if train_infos else inspect_images(train.images))
        log.info("pool %s fitted on %s%s", type(pool).__name__, train.name, " (cached)" if cached else "")
        pipe.pool_id = _module_id(pool, node)  # the state_dict now holds the fit: new descriptor keys
    ds = session.ds
    out.q_plans, out.db_plans = pipe.plans(session.q_infos, ds.bbx), pipe.plans(session.db_infos, None)
    out.q, q_fail = pipe.describe(out.q_plans)
    if q_fail:
        raise ImageReadError(f"eval: query images could not be read: {[str(ds.queries[i]) for i in q_fail][:5]}")
    out.db, out.failures = pipe.describe(out.db_plans)
    out.valid = torch.ones(ds.num_images, dtype=torch.bool)
    out.valid[list(out.failures)] = False
    if train is not None and train_infos is not None and cfg.whiten.get("module") is not None:
        out.whiten = fit_whitening(cfg, pipe, train, train_infos, out.db.shape[1])
        with torch.no_grad():
            out.db, out.q = out.whiten(out.db), out.whiten(out.q)
    elif cfg.whiten.get("fit") == "checkpoint":
        out.whiten = checkpoint_whiten(session.ckpt_parts, out.db.shape[1], cfg.get("ckpt_path"))
        with torch.no_grad():
            out.db, out.q = out.whiten(out.db), out.whiten(out.q)
    out.seconds = time.perf_counter() - t0 - (session.timings.get("extraction", 0.0) - before)
    return out


def rerank_with(session: Session, d: Described, rerank: Reranker | None) -> tuple[torch.Tensor, float]:
    """Rankings of the test queries by ``d``'s descriptors and ``rerank``; returns them and the seconds it took.

    The extras a re-ranker requires (region vectors, DSM local features) are built once per :class:`Described`
    and kept in ``d.extras`` for the next re-ranker; their own time (detection, map extraction at other scales)
    is not part of the returned seconds (``session.timings`` has it).
    """
    needs = set(rerank.requires) if rerank is not None else set()
    if needs & set(REGIONAL_EXTRAS) and "db_regions" not in d.extras:
        t = time.perf_counter()
        d.extras.update(region_extras(d.pipe, d.q_plans, d.db_plans, d.whiten))
        session.add_time("region vectors", time.perf_counter() - t)
    dsm = find_dsm(rerank)
    if dsm is not None and needs & set(LOCAL_FEATURE_EXTRAS):
        ident = ("dsm", tuple(dsm.scales), dsm.max_features, json.dumps(dsm.detector, sort_keys=True, default=str))
        if d.extras.get("_dsm_ident") != ident:
            t = time.perf_counter()
            before = session.timings.get("extraction", 0.0)
            d.extras.update(local_feature_extras(d.pipe, dsm, session.q_infos, session.db_infos, session.ds.bbx))
            d.extras["_dsm_ident"] = ident
            spent = time.perf_counter() - t - (session.timings.get("extraction", 0.0) - before)
            session.add_time("local features (DSM)", spent)
    extras = {k: v for k, v in d.extras.items() if k in needs}
    t_rank = time.perf_counter()
    ranks = rank(d.q, d.db, rerank, d.valid, extras or None)
    return ranks, time.perf_counter() - t_rank


def score(session: Session, ranks: torch.Tensor) -> dict[str, Any] | None:
    """Revisitop metrics of the rankings (every DDP process scores its share); None off the global-zero process.

    Under DDP (a process group is up) every process scores its share; compute() gathers the list states. When
    nothing had to be extracted no group was started, and this process scores every query itself.
    """
    ds = session.ds
    world, me = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed() else (1, 0)
    mine = torch.arange(me, ds.num_queries, world)
    metric = RevisitedMAP(ds.gnd, kappas=tuple(session.cfg.kappas))
    metric.update(ranks[mine], mine)
    results = metric.compute()
    if me != 0 or not session.trainer.is_global_zero:
        return None
    return results  # type: ignore[no-any-return]


def run_meta(session: Session) -> dict[str, Any]:
    """The ``results.json`` meta every run shares: the test set (and its fingerprints), backbone, checkpoint."""
    ds = session.ds
    return {
        "dataset": ds.name,
        "protocol": ds.protocol,
        "queries": ds.num_queries,
        "database": ds.num_images,
        "dataset_fingerprint": ds.fingerprint,
        "manifest_sha256": _manifest_sha256(ds),
        "backbone": session.cfg.backbone._target_,
        "ckpt_sha256": session.ckpt_sha256,
        "ckpt_pool": session.ckpt_parts.pool_target if session.pools_from_ckpt else None,
    }


def override_keys(overrides: Sequence[str], *, top: bool = True) -> set[str]:
    """The keys Hydra command-line ``overrides`` set (``+pool.p=4`` -> ``pool``; ``top=False``: ``pool.p``)."""
    keys = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    return {k.split(".", 1)[0] for k in keys} if top else keys


def output_dir(cfg: DictConfig) -> Path:
    """``output_dir``, or Hydra's run folder."""
    return Path(cfg.get("output_dir") or HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """The whole evaluation of one pipeline; returns the metric dict on the global-zero process (None elsewhere)."""
    cfg = with_default_dataset(cfg)
    check_config(cfg)
    from lightning_apps.preflight import preflight  # here, not at the top: preflight imports this module

    preflight(cfg)  # a missing weight package, apt-get or writable folder: one paragraph, before any work
    session, (pool,), (rerank,) = build_session(cfg, [cfg.pool], [cfg.rerank])
    trainer, ds, cache, t0 = session.trainer, session.ds, session.cache, session.t0
    d = describe_with(session, pool, cfg.pool)
    valid, failures, whiten = d.valid, d.failures, d.whiten
    center_sha256, pool_sha256, train = d.center_sha256, d.pool_sha256, session.train
    if cfg.get("save_descriptors") and trainer.is_global_zero:
        if cfg.save_descriptors == "regions":
            d.extras.update(region_extras(d.pipe, d.q_plans, d.db_plans, whiten))
        ranks, rank_seconds = rerank_with(session, d, rerank)
        extras = {k: v for k, v in d.extras.items() if not k.startswith("_")}
        save_descriptors(output_dir(cfg), d.q, d.db, valid, extras or None)
    else:
        ranks, rank_seconds = rerank_with(session, d, rerank)
    dsm = find_dsm(rerank)
    if dsm is not None and "db_local_features" in d.extras and trainer.is_global_zero:
        save_dsm(output_dir(cfg), dsm, ds, valid, d.extras)
    results = score(session, ranks)
    if results is None:
        return None
    pipe = d.pipe
    precision = session.precision
    elapsed = time.perf_counter() - t0
    out_dir = output_dir(cfg)
    run_bytes = cache.nbytes(sorted(pipe.used_keys))
    n_files, folder_bytes = cache.folder_nbytes()
    meta = {
        **run_meta(session),
        "pool": cfg.pool._target_,
        "pool_center_fitted_on": train.name if center_sha256 is not None and train is not None else None,
        "pool_center_sha256": center_sha256,
        "pool_fitted_on": train.name if pool_sha256 is not None and train is not None else None,
        "pool_fit_sha256": pool_sha256,
        "pool_kept_fraction": round(float(pool.kept_fraction), 4) if hasattr(pool, "kept_fraction") else None,
        "whiten": cfg.whiten.get("fit") if whiten is not None else "none",
        "whiten_train": train.name if train is not None and whiten is not None else None,
        "whiten_dim": int(whiten.out_dim) if whiten is not None else None,
        "rerank": repr(rerank) if rerank is not None else "none",
        "rank_seconds": round(rank_seconds, 3),
        "imsize": cfg.imsize,
        "scales": list(cfg.scales),
        "resize": cfg.resize,
        "batching": cfg.batching,
        "precision": precision,
        "device": _device_kind(trainer),
        "unreadable_database_images": {str(ds.images[i]): r for i, r in sorted(failures.items())},
        "cache": {
            "dir": str(cache.root),
            "store": str(cfg.store),
            "entries_used": len(pipe.used_keys),
            "bytes_used": run_bytes,
            "folder_files": n_files,
            "folder_bytes": folder_bytes,
            "widened_to_float32": cache.widened,
        },
        "seconds": round(elapsed, 1),
        "torch": torch.__version__,
        "opencv": _opencv_version(),  # DSM's MSER regions depend on the release (docs/dsm.md)
    }
    table = format_table(results, cfg.kappas)
    print(
        f"\n{ds.name} ({ds.protocol} protocol, {ds.num_queries} queries, {ds.num_images} images): "
        f"{meta['backbone']} + {meta['pool']}, whiten={meta['whiten']}, rerank={meta['rerank']}, "
        f"precision={precision}\n{table}"
    )
    if failures:
        print(
            f"{len(failures)} unreadable database image(s) ranked last: {list(meta['unreadable_database_images'])[:5]}"
        )
    files = write_results(
        out_dir,
        results=results,
        kappas=cfg.kappas,
        config_yaml=OmegaConf.to_yaml(cfg),
        meta=meta,
        query_names=[p.stem for p in ds.queries],
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
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
    print(
        f"feature cache ({cfg.store}): {len(pipe.used_keys)} entries used by this run, {_fmt_bytes(run_bytes)}; "
        f"{cache.root} holds {n_files} files, {_fmt_bytes(folder_bytes)}"
    )
    print(f"results: {files['markdown']} (took {elapsed:.0f} s)")
    return results


MODES = ("auto", "compare", "single")
#: Command-line groups whose choice means "this one pipeline" under ``mode=auto``.
SINGLE_GROUPS = ("pool", "rerank")


def resolve_mode(cfg: DictConfig, overrides: Sequence[str] | None = None) -> str:
    """``compare`` or ``single``: ``mode``, with ``auto`` meaning single when ``overrides`` choose a pool or rerank.

    ``overrides`` defaults to Hydra's command-line overrides of this run.
    """
    mode = _plain(cfg.get("mode", "single"))
    if mode not in MODES:
        raise ConfigError(f"eval: invalid configuration: mode must be one of {list(MODES)}; got {mode!r}.")
    if mode != "auto":
        return str(mode)
    if overrides is None:
        try:
            overrides = list(HydraConfig.get().overrides.task)
        except ValueError:
            overrides = []
    return "single" if override_keys(overrides) & set(SINGLE_GROUPS) else "compare"


USER_ERRORS = (DatasetNotFoundError, ConfigError, ImageReadError)


def exit_on_user_error(fn: Any, cfg: DictConfig) -> None:
    """``fn(cfg)``; a user error (missing data, bad config, unreadable image) exits with code 2 and one paragraph."""
    try:
        fn(cfg)
    except USER_ERRORS as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


def _run_mode(cfg: DictConfig) -> None:
    if resolve_mode(cfg) == "compare":
        from lightning_apps.compare import run_compare

        run_compare(cfg)
    else:
        run(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; user errors (missing data, bad config, unreadable query) exit with code 2, one paragraph."""
    exit_on_user_error(_run_mode, cfg)


if __name__ == "__main__":
    # ``python -m lightning_apps.eval`` runs this file as ``__main__``; lightning_apps.compare imports
    # ``lightning_apps.eval``: make that the same module, so its ConfigError is the one main() catches.
    sys.modules.setdefault("lightning_apps.eval", sys.modules[__name__])
    sys.argv = dataset_key_overrides(sys.argv)
    main()
