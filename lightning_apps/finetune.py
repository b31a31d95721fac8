"""Fine-tune a backbone and any differentiable deepagg pool on retrieval tuples: ``python -m lightning_apps.finetune``.

The Radenović recipe (Fine-tuning CNN image retrieval with no human annotation, TPAMI 2018; ``cirtorch``) on the
embedded ``clutter`` benchmark's train split (``clutter_train``: objects and photos disjoint from the test split):

- **Tuples.** Every epoch draws ``tuples_per_epoch`` matching pairs (a query or database view of an object and an
  ``easy``/``hard`` view of the same object; junk views are never pairs), and for each the ``num_negatives``
  hardest negatives of *other* objects (or no object) under the current model, at most one per object
  (:class:`deepagg.HardNegativeMiner`, ``conf/miner/``). The negatives are mined again at the start of every
  epoch (``reload_dataloaders_every_n_epochs: 1``), from descriptors of the whole training part.
- **Model.** backbone -> pool (L2) -> optional whitening layer (``whiten=learned``: a :class:`deepagg.Whiten`
  initialised by Lw on the training part's descriptors, then trained as a linear layer), one image at a time (each
  keeps its size, long side ``train_imsize``). Batch-norm layers keep their ImageNet statistics (``freeze_bn``).
  GeM's p trains too (``learn_pool``), at ``pool_lr_mult`` times the learning rate, without weight decay.
- **Loss** (``conf/loss/``): contrastive (margin 0.7) or triplet (margin 0.1). **Optimizer** (``conf/optim/``):
  Adam or SGD, the learning rate times ``lr_decay`` after every epoch.
- **Validation**: ``val_objects`` objects of the train split are held out (their queries and views are in no
  tuple); their queries are searched in the whole training database; every epoch their Medium/Hard mAP
  (:class:`lightning_apps.metrics.RevisitedMAP`) is logged (``val/mAP_medium``, ``val/mAP_hard``, ``val/mAP`` =
  their mean) and the best epoch is saved
  (``checkpoints/best.ckpt``; ``last.ckpt`` every epoch). The model before training is validated too (epoch 0).
- **Outputs** (``output_dir``, else Hydra's run folder): ``checkpoints/``, ``logs/metrics.csv`` (and TensorBoard
  with ``loggers=[csv,tensorboard]``), ``training_curve.png``, ``results.json``/``results.md`` and, with
  ``test.enabled``, ``test/``: the test set's mAP before and after, as ``python -m lightning_apps.eval`` computes it,
  with the per-query paired comparison (:mod:`lightning_apps.compare_report`).
- **Resume**: ``resume=last`` (or a path) continues a run where it stopped: same step count, optimizer and
  scheduler state, and the same tuples (each epoch's draw is seeded by ``seed`` and the epoch).

A checkpoint evaluates with ``python -m lightning_apps.eval mode=single backbone=<b> pool=<p> ckpt_path=<ckpt>``
(the trained pool state goes to a pool of the same class; ``whiten=checkpoint`` uses the trained whitening layer).

Examples::

    python -m lightning_apps.finetune                                   # MobileNetV2 + GeM, contrastive, CPU
    python -m lightning_apps.finetune pool=hew loss=triplet miner=random
    python -m lightning_apps.finetune backbone=vgg16 trainer=gpu precision=bf16-mixed
    python -m lightning_apps.finetune trainer=ddp                       # 2 processes (gloo on CPU)
    python -m lightning_apps.finetune resume=last output_dir=runs/ft    # continue an interrupted run
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader, Dataset

from deepagg._io import atomic_write
from deepagg.data.dataset import RetrievalDataset
from deepagg.data.revisitop import ImageReadError
from lightning_apps.eval import (
    CheckpointParts,
    ConfigError,
    _instantiate,
    _is_int,
    _is_number,
    _plain,
    apply_checkpoint_pool,
    build_session,
    check_config,
    dataset_config,
    dataset_key_overrides,
    describe_with,
    exit_on_user_error,
    load_checkpoint,
    load_dataset,
    needs_center,
    needs_fit,
    output_dir,
    positive_pairs,
    rank,
    rerank_with,
    resolve_precision,
    score,
    with_default_dataset,
)
from lightning_apps.extract import ImageDataset, inspect_images, plan_items
from lightning_apps.metrics import RevisitedMAP
from lightning_apps.paths import CONF_DIR

log = logging.getLogger("lightning_apps.finetune")
# Batch-norm layers are in eval mode on purpose (freeze_bn): Lightning's warning about it says nothing new.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")

LOGGERS = ("csv", "tensorboard")


# ------------------------------------------------------------------------------------------------------ split


@dataclass
class TrainSplit:
    """The training set's images (database rows, then query rows) split into a training and a validation part.

    ``labels[r]`` is the object index of row ``r`` (-1: no object, a distractor). ``pairs`` are the matching
    (anchor, positive) rows of the training part (never a junk view), ``candidates`` its database rows (the
    negatives are mined among them). ``val_db`` / ``val_queries`` are the rows of the validation retrieval set
    and ``val_gnd`` its ground truth (indices into ``val_db``).
    """

    name: str
    paths: list[Path]
    bbx: list[Any]
    labels: torch.Tensor
    objects: list[str]
    train_objects: list[str]
    val_objects: list[str]
    pairs: torch.Tensor
    candidates: torch.Tensor
    val_db: torch.Tensor
    val_queries: torch.Tensor
    val_gnd: list[dict[str, np.ndarray]]

    @property
    def train_rows(self) -> torch.Tensor:
        """Every row a tuple may use: the pairs' rows and the candidates."""
        return torch.unique(torch.cat([self.pairs.flatten(), self.candidates]))


def split_train(ds: RetrievalDataset, val_objects: int, seed: int) -> TrainSplit:
    """Split a training set with per-image object labels (``clutter_train``'s manifest) by objects.

    ``val_objects`` objects (a permutation of the sorted object ids drawn from ``seed``) are held out with their
    queries and database views: no tuple uses them. The validation retrieval set is their queries against the
    whole database (their views among the training objects' views and the distractors, all negatives to them),
    so that its mAP is not near 100 from a database of mostly positives.

    Raises:
        ConfigError: If the manifest names no object per image, ``val_objects`` leaves no object to train on, or
            the training part has no matching pair (an empty train split).
    """
    manifest = getattr(ds, "extra", {}).get("manifest") or {}
    images, queries = manifest.get("images") or [], manifest.get("queries") or []
    n_db, n_q = ds.num_images, ds.num_queries
    if len(images) != n_db or len(queries) != n_q:
        raise ConfigError(
            f"finetune: train_dataset {ds.name!r} does not name the object of every image (its manifest.json needs "
            f"'images' and 'queries' records with an 'object', as clutter_train has); choose train_dataset="
            "clutter_train."
        )
    names = [r.get("object") for r in images] + [r.get("object") for r in queries]
    objects = sorted({str(o) for o in names if o is not None})
    if not 1 <= val_objects < len(objects):
        raise ConfigError(
            f"finetune: val_objects must be between 1 and {len(objects) - 1} (train_dataset {ds.name!r} has "
            f"{len(objects)} objects and at least one must be left to train on); got {val_objects}."
        )
    index = {o: i for i, o in enumerate(objects)}
    labels = torch.tensor([index[str(o)] if o is not None else -1 for o in names], dtype=torch.long)
    order = torch.randperm(len(objects), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(objects[i] for i in order[:val_objects])
    held_ids = torch.tensor([index[o] for o in held])
    is_val = torch.isin(labels, held_ids)
    rows = torch.arange(n_db + n_q)
    try:
        pairs = positive_pairs(ds)
    except ConfigError:  # no pair at all: the error below says so in fine-tuning terms
        pairs = torch.empty(0, 2, dtype=torch.long)
    if pairs.numel():
        pairs = pairs[~is_val[pairs].any(1)]
    if pairs.shape[0] == 0:
        raise ConfigError(
            f"finetune: the train split of {ds.name!r} is empty: no matching pair (a query or view and an easy/hard "
            f"view of the same object) is left outside the {val_objects} validation objects; choose another "
            "train_dataset or fewer val_objects."
        )
    is_db = rows < n_db
    candidates = rows[is_db & ~is_val]
    val_db = rows[is_db]  # the held-out objects' views among every other database image (negatives)
    val_queries = rows[~is_db & is_val]
    position = {int(r): j for j, r in enumerate(val_db)}
    val_gnd = []
    for r in val_queries.tolist():
        g = ds.gnd[r - n_db]
        val_gnd.append(
            {
                k: np.array([position[int(j)] for j in np.asarray(g.get(k, []), dtype=np.int64)], dtype=np.int64)
                for k in ("easy", "hard", "junk")
            }
        )
    return TrainSplit(
        name=ds.name,
        paths=[Path(p) for p in ds.images] + [Path(p) for p in ds.queries],
        bbx=[None] * n_db + list(ds.bbx),
        labels=labels,
        objects=objects,
        train_objects=[o for o in objects if o not in held],
        val_objects=held,
        pairs=pairs,
        candidates=candidates,
        val_db=val_db,
        val_queries=val_queries,
        val_gnd=val_gnd,
    )


def load_images(split: TrainSplit, *, imsize: int, resize: str) -> dict[int, torch.Tensor]:
    """Every row's image as the backbone sees it (query crops to ``bbx``, long side ``imsize``), ImageNet-normalised.

    The same pixels as the eval app's (:func:`lightning_apps.extract.plan_items`, :class:`ImageDataset`), read once.

    Raises:
        ImageReadError: If an image cannot be read.
    """
    rows = torch.unique(torch.cat([split.train_rows, split.val_db, split.val_queries])).tolist()
    infos = inspect_images([split.paths[r] for r in rows])
    bad = [f"{i.path} ({i.error})" for i in infos if i.digest is None]
    if bad:
        raise ImageReadError(f"finetune: {len(bad)} training image(s) cannot be read: {'; '.join(bad[:5])}")
    (items,) = plan_items(
        infos, [split.bbx[r] for r in rows], imsize=imsize, scales=[1.0], model="finetune", resize=resize
    )
    data = ImageDataset(items)
    out: dict[int, torch.Tensor] = {}
    for j, r in enumerate(rows):
        got = data[j]
        if got["image"] is None:
            raise ImageReadError(f"finetune: training image {split.paths[r]} cannot be read: {got['error']}")
        out[r] = got["image"]
    return out


class _Rows(Dataset):
    """``(row, image)`` of some rows (validation, mining)."""

    def __init__(self, rows: Sequence[int], images: dict[int, torch.Tensor]) -> None:
        self.rows, self.images = [int(r) for r in rows], images

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, self.images[self.rows[i]]


class _Tuples(Dataset):
    """Tuples of images: anchor, positive, then its mined negatives (each image keeps its size)."""

    def __init__(self, tuples: Sequence[Sequence[int]], images: dict[int, torch.Tensor]) -> None:
        self.tuples, self.images = [list(t) for t in tuples], images

    def __len__(self) -> int:
        return len(self.tuples)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return [self.images[r] for r in self.tuples[i]]


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


# ------------------------------------------------------------------------------------------------------ model


class Finetuner(pl.LightningModule):
    """backbone -> pool -> optional whitening, trained on tuples by ``loss``; validated by revisitop mAP.

    Args:
        backbone: Feature extractor (images to maps).
        pool: Aggregation module (L2-normalised descriptors), differentiable w.r.t. the maps.
        whiten: A fitted :class:`deepagg.Whiten` with ``learnable=True``, or None.
        loss: ``loss(anchor (T, D), positive (T, D), negatives (T, K, D), neg_mask (T, K))``.
        optimizer: A partial optimizer (``conf/optim/``) called with the parameter groups.
        val_gnd: Ground truth of the validation queries (indices into the validation database).
        n_val_db: Number of validation database images (the first rows of the validation loader).
        pool_lr_mult: The pool's learning-rate factor (its parameters get no weight decay).
        lr_decay: Per-epoch factor of the learning rate.
        freeze_bn: Keep batch-norm layers in eval mode while training.
        info: Stored in every checkpoint under ``"deepagg"`` (the eval app reads ``pool_target``).
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        pool: torch.nn.Module,
        whiten: torch.nn.Module | None,
        loss: torch.nn.Module,
        optimizer: Any,
        *,
        val_gnd: list[dict[str, np.ndarray]],
        n_val_db: int,
        kappas: Sequence[int] = (1, 5, 10),
        pool_lr_mult: float = 10.0,
        lr_decay: float = 1.0,
        freeze_bn: bool = True,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone, self.pool, self.whiten, self.loss = backbone, pool, whiten, loss
        self.optimizer_factory = optimizer
        self.val_gnd, self.n_val_db, self.kappas = val_gnd, n_val_db, tuple(kappas)
        self.pool_lr_mult, self.lr_decay, self.freeze_bn = pool_lr_mult, lr_decay, freeze_bn
        self.info = dict(info or {})
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_val: dict[str, float] = {}

    def train(self, mode: bool = True) -> Finetuner:
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """The descriptor ``(D,)`` of one normalised image ``(3, h, w)``."""
        d = self.pool(self.backbone(image[None]).float())
        if self.whiten is not None:
            d = self.whiten(d)
        return d[0]

    def describe(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Descriptors ``(N, D)`` of images, without gradients, in eval mode (mining); the mode is restored."""
        was = self.training
        self.eval()
        try:
            trainer = self._trainer  # None before fit (e.g. the Lw initialisation, tests)
            context = trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
            with torch.no_grad(), context:
                return torch.stack([self(im.to(self.device)).float() for im in images])
        finally:
            self.train(was)

    def tuple_loss(self, batch: list[list[torch.Tensor]]) -> torch.Tensor:
        """The loss of a batch of tuples ``[anchor, positive, negative, ...]`` (negatives padded and masked)."""
        # One forward per image: each keeps its own size (padding would change the maps near the border).
        desc = [torch.stack([self(im) for im in t]).float() for t in batch]
        negatives = torch.nn.utils.rnn.pad_sequence([d[2:] for d in desc], batch_first=True)
        counts = torch.tensor([d.shape[0] - 2 for d in desc], device=negatives.device)
        mask = torch.arange(negatives.shape[1], device=negatives.device) < counts[:, None]
        anchor, positive = torch.stack([d[0] for d in desc]), torch.stack([d[1] for d in desc])
        return self.loss(anchor, positive, negatives, mask)  # type: ignore[no-any-return]

    def training_step(self, batch: list[list[torch.Tensor]], batch_idx: int) -> torch.Tensor:
        loss = self.tuple_loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch), sync_dist=True)
        return loss

    def validation_step(self, batch: list[tuple[int, torch.Tensor]], batch_idx: int) -> None:
        for i, image in batch:
            self._val.append((torch.tensor(i, device=self.device), self(image.to(self.device)).float()))

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def on_validation_epoch_end(self) -> None:
        idx = torch.stack([i for i, _ in self._val])
        desc = torch.stack([d for _, d in self._val])
        self._val = []
        if self.trainer.world_size > 1:  # every process gets every descriptor (the sampler pads by repeating)
            gathered = self.all_gather(idx), self.all_gather(desc)
            assert isinstance(gathered[0], torch.Tensor)
            assert isinstance(gathered[1], torch.Tensor)
            idx, desc = gathered[0].flatten(), gathered[1].flatten(0, -2)
        n = self.n_val_db + len(self.val_gnd)
        table = desc.new_zeros(n, desc.shape[1])
        table[idx] = desc
        db, q = table[: self.n_val_db].cpu(), table[self.n_val_db :].cpu()
        metric = RevisitedMAP(self.val_gnd, kappas=self.kappas, sync_on_compute=False)
        metric.update(rank(q, db, None), torch.arange(q.shape[0]))
        res = metric.compute()
        medium, hard = 100 * float(res["medium"]["map"]), 100 * float(res["hard"]["map"])
        trained = 0 if self.trainer.state.fn == "validate" else self.current_epoch + 1
        self.last_val = {"epochs": trained, "medium": medium, "hard": hard, "mean": (medium + hard) / 2}
        self.log_dict(
            {
                "val/mAP_medium": medium,
                "val/mAP_hard": hard,
                "val/mAP": (medium + hard) / 2,
                "val/epochs_trained": float(trained),
            },
            prog_bar=False,
            batch_size=1,
        )
        log.info("validation after %d epoch(s): mAP Medium %.2f, Hard %.2f", trained, medium, hard)

    def configure_optimizers(self) -> Any:
        groups: list[dict[str, Any]] = [{"params": [p for p in self.backbone.parameters() if p.requires_grad]}]
        pool_params = [p for p in self.pool.parameters() if p.requires_grad]
        if pool_params:
            groups.append({"params": pool_params, "lr_mult": self.pool_lr_mult, "weight_decay": 0.0})
        if self.whiten is not None:
            groups.append({"params": [p for p in self.whiten.parameters() if p.requires_grad]})
        optimizer = self.optimizer_factory(groups)
        for g in optimizer.param_groups:  # the pool's lr: the optimizer's lr times pool_lr_mult
            g["lr"] = g["lr"] * g.pop("lr_mult", 1.0)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["deepagg"] = dict(self.info)


class TupleData(pl.LightningDataModule):
    """Tuples mined every epoch with the current model; the validation images.

    ``train_dataloader`` runs at the start of every epoch (``reload_dataloaders_every_n_epochs=1``): it draws
    ``tuples_per_epoch`` pairs with a generator seeded by ``seed`` and the epoch, describes the anchors and every
    candidate with the current model, and mines each anchor's negatives (:attr:`last_tuples` keeps them).
    """

    def __init__(
        self,
        split: TrainSplit,
        images: dict[int, torch.Tensor],
        miner: torch.nn.Module,
        *,
        tuples_per_epoch: int,
        tuples_per_batch: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.split, self.images, self.miner = split, images, miner
        self.tuples_per_epoch, self.tuples_per_batch, self.seed = tuples_per_epoch, tuples_per_batch, seed
        self.last_tuples: list[list[int]] = []

    def mine(self, model: Finetuner, epoch: int) -> list[list[int]]:
        """This epoch's tuples ``[anchor, positive, negatives...]`` (rows), mined with ``model``."""
        s = self.split
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        pick = torch.randperm(s.pairs.shape[0], generator=g)[: self.tuples_per_epoch]
        pairs = s.pairs[pick]
        anchors = pairs[:, 0]
        t = time.perf_counter()
        rows = torch.unique(torch.cat([anchors, s.candidates]))
        desc = model.describe([self.images[int(r)] for r in rows]).cpu()
        where = torch.full((int(rows.max()) + 1,), -1, dtype=torch.long)
        where[rows] = torch.arange(rows.numel())
        negs = self.miner(
            desc[where[anchors]],
            desc[where[s.candidates]],
            s.labels[anchors],
            s.labels[s.candidates],
            generator=g,
        )
        neg_rows = torch.where(negs >= 0, s.candidates[negs.clamp_min(0)], -1)  # candidate index -> row
        tuples = [
            [*pair, *(r for r in row if r >= 0)] for pair, row in zip(pairs.tolist(), neg_rows.tolist(), strict=True)
        ]
        n_neg = sum(len(t) - 2 for t in tuples)
        log.info(
            "epoch %d: %d tuples, %d negatives mined from %d candidates (%.1f s)",
            epoch, len(tuples), n_neg, s.candidates.numel(), time.perf_counter() - t,
        )  # fmt: skip
        self.last_tuples = tuples
        return tuples

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        assert trainer is not None
        model = trainer.lightning_module
        tuples = self.mine(model, trainer.current_epoch)  # type: ignore[arg-type]
        return DataLoader(
            _Tuples(tuples, self.images), batch_size=self.tuples_per_batch, shuffle=False, collate_fn=_as_list
        )

    def val_dataloader(self) -> DataLoader:
        rows = torch.cat([self.split.val_db, self.split.val_queries]).tolist()
        return DataLoader(_Rows(rows, self.images), batch_size=1, shuffle=False, collate_fn=_as_list)


# ------------------------------------------------------------------------------------------------------ checks


def check_differentiable(pool: torch.nn.Module, channels: int, name: str) -> None:
    """Refuse a pool through which no gradient reaches the feature maps (the backbone could not learn).

    Raises:
        ConfigError: If the pool's output carries no gradient, or a zero or non-finite one, to a random map.
    """
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, channels, 5, 7, generator=g) + 0.05).requires_grad_(True)
    why = ""
    try:
        y = pool(x)
        if not isinstance(y, torch.Tensor) or not y.requires_grad:
            why = "its output does not depend differentiably on the feature maps"
        else:
            (y * torch.randn(y.shape, generator=g)).sum().backward()
            if x.grad is None or not bool(torch.isfinite(x.grad).all()) or not bool(x.grad.abs().sum() > 0):
                why = "the gradient it passes to the feature maps is zero or not finite"
    except RuntimeError as err:
        why = f"backpropagating through it fails ({str(err).splitlines()[0]})"
    finally:
        pool.zero_grad(set_to_none=True)
    if why:
        raise ConfigError(
            f"finetune: pool={name} ({type(pool).__name__}) cannot be fine-tuned: {why}, so the backbone would not "
            "learn. Choose a differentiable pool: gem, mac, spoc, rmac, crow, hew or agaussian_echannel."
        )


def check_finetune_config(cfg: DictConfig) -> None:
    """Check the fine-tuning values (no I/O); one :class:`ConfigError` lists every problem."""
    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    for key, low in (("tuples_per_epoch", 1), ("tuples_per_batch", 1), ("max_epochs", 1), ("val_objects", 1)):
        v = _plain(cfg.get(key))
        need(_is_int(v) and v >= low, f"{key} must be an int >= {low}; got {v!r}.")
    v = _plain(cfg.get("train_imsize"))
    need(_is_int(v) and v >= 32, f"train_imsize must be an int >= 32 (the long side in pixels); got {v!r}.")
    v = _plain(cfg.get("pool_lr_mult"))
    need(_is_number(v) and float(v) >= 0, f"pool_lr_mult must be a finite number >= 0; got {v!r}.")
    v = _plain(cfg.get("lr_decay"))
    need(_is_number(v) and 0 < float(v) <= 1, f"lr_decay must be a number in (0, 1]; got {v!r}.")
    for key in ("freeze_bn", "learn_pool"):
        need(isinstance(_plain(cfg.get(key)), bool), f"{key} must be true or false; got {cfg.get(key)!r}.")
    loggers = _plain(cfg.get("loggers"))
    need(
        isinstance(loggers, list) and all(x in LOGGERS for x in loggers),
        f"loggers must be a list of {list(LOGGERS)}; got {loggers!r}.",
    )
    if isinstance(loggers, list) and "tensorboard" in loggers:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                problems.append("loggers names tensorboard, which is not installed; pip install tensorboard.")
    fit = cfg.whiten.get("fit")
    need(
        cfg.whiten.get("module") is None or fit == "learned",
        f"whiten must be none or learned (a layer initialised by Lw, then trained); got fit={fit!r}.",
    )
    t = cfg.get("test") or {}
    tw = _plain(t.get("whiten", "auto"))
    need(
        tw in ("auto", "learned", "none", "checkpoint"),
        f"test.whiten must be auto, learned, none or checkpoint; got {tw!r}.",
    )
    need(
        isinstance(_plain(t.get("enabled", False)), bool),
        f"test.enabled must be true or false; got {t.get('enabled')!r}.",
    )
    ti = _plain(t.get("imsize", 512))
    need(_is_int(ti) and ti >= 32, f"test.imsize must be an int >= 32; got {ti!r}.")
    resume = _plain(cfg.get("resume"))
    if resume not in (None, "last"):
        need(
            Path(str(resume)).expanduser().is_file(),
            f"resume must be null, last or a checkpoint file; {resume!r} is not a file.",
        )
    if problems:
        raise ConfigError("finetune: invalid configuration: " + " ".join(problems))


# ------------------------------------------------------------------------------------------------------ run


def _group_name(group: str, node: Any = None) -> str:
    """The choice of a config group in this run (``gem``).

    Hydra's, else the first ``conf/<group>/*.yaml`` building the class of ``node`` (runs composed without
    ``@hydra.main``, e.g. in tests).
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices[group])
    except Exception:
        pass
    target = str(node.get("_target_")) if node is not None else None
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        loaded: Any = OmegaConf.load(path)
        inner = loaded.get(group, loaded) if group == "backbone" else loaded
        if target is not None and str(inner.get("_target_")) == target:
            return path.stem
    return group


def fit_on_training_maps(
    pool: torch.nn.Module, backbone: torch.nn.Module, split: TrainSplit, images: dict[int, torch.Tensor], seed: int
) -> None:
    """Fit a pool that learns from feature maps (T-emb's PCA/codebook/rotation, HeW ``hewr``'s centre) first.

    On the starting backbone's maps of the training part's database images (never a validation or test image),
    one at a time, with the codebook seeded by ``seed``; fine-tuning then trains the backbone through the fitted
    pool. (The eval app fits such a pool again on its training set's maps of the fine-tuned backbone.)
    """
    was = backbone.training
    backbone.eval()

    def maps() -> Any:
        with torch.no_grad():
            for r in split.candidates.tolist():
                yield backbone(images[int(r)][None]).float()[0]

    fitter: Any = pool
    try:
        if needs_center(pool):
            fitter.fit_center(maps())
        else:
            fitter.fit(maps(), generator=torch.Generator().manual_seed(seed))
    except ValueError as err:
        raise ConfigError(f"finetune: {type(pool).__name__} cannot be fitted on the train split: {err}") from None
    finally:
        backbone.train(was)
    log.info("%s fitted on %d training images before fine-tuning", type(pool).__name__, split.candidates.numel())


def build_model(
    cfg: DictConfig, split: TrainSplit, images: dict[int, torch.Tensor], pool_name: str
) -> tuple[Finetuner, TupleData]:
    """Backbone (+ ``ckpt_path``), pool, whitening layer (Lw on the training part), loss, miner, module and data."""
    from deepagg import Whiten

    backbone = _instantiate(cfg.backbone, "backbone")
    parts = CheckpointParts()
    load_checkpoint(backbone, cfg.get("ckpt_path"), parts)
    pool_node = cfg.pool.copy()
    if bool(cfg.learn_pool) and "learnable" in pool_node:
        with open_dict(pool_node):
            pool_node.learnable = True
    pool = _instantiate(pool_node, "pool")
    apply_checkpoint_pool([pool], [pool_node], parts)
    channels = int(getattr(backbone, "out_channels", 0)) or int(backbone(torch.zeros(1, 3, 64, 64)).shape[1])
    if getattr(pool, "mask", None) == "sift":
        raise ConfigError(
            f"finetune: pool={pool_name} with mask=sift selects features by SIFT keypoints of the pixels, which "
            "training does not compute; use pool.mask=max or sum."
        )
    if needs_fit(pool) or needs_center(pool):
        fit_on_training_maps(pool, backbone, split, images, int(cfg.seed))
    check_differentiable(pool, channels, pool_name)
    loss = _instantiate(cfg.loss, "loss")
    miner = _instantiate(cfg.miner, "miner")
    optimizer = _instantiate(cfg.optim, "optim")
    info = {
        "pool_target": str(cfg.pool._target_),
        "pool": pool_name,
        "backbone_target": str(cfg.backbone._target_),
        "whiten": cfg.whiten.get("module") is not None,
        "train_dataset": split.name,
        "val_objects": split.val_objects,
    }
    module = Finetuner(
        backbone,
        pool,
        None,
        loss,
        optimizer,
        val_gnd=split.val_gnd,
        n_val_db=split.val_db.numel(),
        kappas=tuple(cfg.kappas),
        pool_lr_mult=float(cfg.pool_lr_mult),
        lr_decay=float(cfg.lr_decay),
        freeze_bn=bool(cfg.freeze_bn),
        info=info,
    )
    data = TupleData(
        split,
        images,
        miner,
        tuples_per_epoch=int(cfg.tuples_per_epoch),
        tuples_per_batch=int(cfg.tuples_per_batch),
        seed=int(cfg.seed),
    )
    if cfg.whiten.get("module") is not None:
        # Lw on the training part's descriptors (database rows and pairs of it), as the eval app fits it.
        rows = torch.unique(torch.cat([split.candidates, split.pairs.flatten()]))
        with torch.no_grad():
            module.eval()
            desc = torch.stack([module(images[int(r)]) for r in rows])
        where = {int(r): j for j, r in enumerate(rows)}
        pairs = torch.tensor([[where[int(a)], where[int(b)]] for a, b in split.pairs])
        whiten = Whiten(desc.shape[1], _plain(cfg.whiten.get("dim")), learnable=True)
        with torch.no_grad():
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                whiten.fit_learned(
                    desc,
                    pairs,
                    center=str(cfg.whiten.get("center", "all")),
                    shrinkage=float(cfg.whiten.get("shrinkage", 0.0)),
                )
        for w in caught:
            log.warning("whitening: %s", w.message)
        module.whiten = whiten.train()
        log.info("whitening layer: Lw on %d training descriptors -> %d dims, then trained", len(rows), whiten.out_dim)
    return module, data


def _instantiate_trainer(node: DictConfig, **kwargs: Any) -> pl.Trainer:
    """``instantiate(node, **kwargs)``, with a bad trainer argument turned into a :class:`ConfigError`."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)  # type: ignore[no-any-return]
    except InstantiationException as err:
        raise ConfigError(
            f"finetune: the trainer cannot be built from {_plain(node)}: {err.__cause__ or err}"
        ) from None


def _loggers(cfg: DictConfig, out: Path) -> list[Any]:
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    made: list[Any] = []
    for name in _plain(cfg.loggers):
        if name == "csv":
            made.append(CSVLogger(save_dir=str(out), name="logs", version=""))
        else:
            made.append(TensorBoardLogger(save_dir=str(out), name="logs", version="tensorboard"))
    return made


def keep_log(folder: Path, step: int) -> None:
    """Before resuming at global step ``step``: move ``metrics.csv`` aside as ``metrics_until_step<step>.csv``.

    Lightning's CSV logger would start ``metrics.csv`` afresh; :func:`read_metrics` reads the kept rows (those
    logged before ``step``: what the checkpoint holds) and then the new file, so the log covers the whole run.
    """
    path = folder / "metrics.csv"
    if path.is_file():
        path.replace(folder / f"metrics_until_step{step}.csv")


def _log_rows(folder: Path) -> list[dict[str, str]]:
    """The rows of the run's CSV logs in order: the parts kept by :func:`keep_log`, then ``metrics.csv``."""
    parts = sorted(folder.glob("metrics_until_step*.csv"), key=lambda p: int(p.stem.rsplit("step", 1)[1]))
    rows: list[dict[str, str]] = []
    for part in [*parts, folder / "metrics.csv"]:
        if not part.is_file():
            continue
        limit = int(part.stem.rsplit("step", 1)[1]) if part.name != "metrics.csv" else None
        rows = [r for r in rows if limit is None or not r.get("step") or int(r["step"]) < limit]
        with part.open() as fh:
            new = list(csv.DictReader(fh))
        if limit is not None:
            new = [r for r in new if not r.get("step") or int(r["step"]) < limit]
        rows += new
    return rows


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """The CSV log as ``{metric: [(x, value), ...]}``: ``train/loss_step`` against steps, the rest against epochs.

    ``path`` is the run's ``logs/metrics.csv`` (the parts kept at each resume are read first, :func:`keep_log`).
    Validation values are placed at ``val/epochs_trained`` (0: the model before training).
    """
    out: dict[str, list[tuple[float, float]]] = {}
    rows = _log_rows(path.parent)
    for row in rows:
        for key, value in row.items():
            if not value or key in ("epoch", "step", "val/epochs_trained"):
                continue
            if key == "train/loss_step":
                x = float(row["step"])
            elif key.startswith("val/"):
                x = float(row.get("val/epochs_trained") or 0)
            elif row.get("epoch"):
                x = float(row["epoch"]) + 1
            else:
                continue
            out.setdefault(key, []).append((x, float(value)))
    return out


def plot_curve(metrics: dict[str, list[tuple[float, float]]], path: Path, title: str) -> Path:
    """``training_curve.png``: the training loss (per step and per epoch) and validation mAP per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = metrics.get("train/loss_step", [])
    epochs = metrics.get("train/loss_epoch", [])
    if steps:
        per_epoch = max(1, len(steps) // max(1, len(epochs)))
        ax1.plot([s / per_epoch for s, _ in steps], [v for _, v in steps], lw=0.8, alpha=0.5, label="per step")
    if epochs:
        ax1.plot([e for e, _ in epochs], [v for _, v in epochs], "o-", label="epoch mean")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax1.legend()
    for key, label in (("val/mAP_medium", "Medium"), ("val/mAP_hard", "Hard")):
        pts = sorted(dict(metrics.get(key, [])).items())
        if pts:
            ax2.plot([x for x, _ in pts], [v for _, v in pts], "o-", label=label)
    ax2.set_xlabel("epochs trained")
    ax2.set_ylabel("validation mAP (%)")
    ax2.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return path


def eval_config(cfg: DictConfig, *, ckpt_path: str | None, whiten: str) -> DictConfig:
    """The eval app's single-pipeline config of this run's backbone and pool on the test set (``test.imsize``)."""
    from lightning_apps.compare import group_node

    e = cfg.copy()
    with open_dict(e):
        e.imsize = int(cfg.test.imsize)
        e.ckpt_path = ckpt_path
        e.whiten = group_node("whiten", whiten)
        trainer = group_node("trainer", "default")
        trainer.precision = cfg.trainer.precision
        e.trainer = trainer
        e.mode = "single"
    return e


def evaluate_test(
    cfg: DictConfig, best: str, pool_name: str, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    """Test-set mAP before and after fine-tuning, as the eval app computes it, and their paired comparison."""
    from lightning_apps.compare_report import Row, comparison_table, write_comparison
    from lightning_apps.preflight import preflight

    tw = str(cfg.test.whiten)
    after_w = tw if tw != "auto" else ("checkpoint" if cfg.whiten.get("module") is not None else "learned")
    before_w = "learned" if after_w == "checkpoint" else after_w
    backbone = _group_name("backbone", cfg.backbone)
    base = f"python -m lightning_apps.eval mode=single backbone={backbone} pool={pool_name} imsize={cfg.test.imsize}"
    rows = []
    timings = dict(timings or {})
    for label, ckpt, w in (("before (ImageNet)", None, before_w), ("after (fine-tuned)", best, after_w)):
        t = time.perf_counter()
        e = with_default_dataset(eval_config(cfg, ckpt_path=ckpt, whiten=w))
        check_config(e)
        preflight(e)
        session, (pool,), _ = build_session(e, [e.pool], [])
        d = describe_with(session, pool, e.pool)
        ranks, _ = rerank_with(session, d, None)
        results = score(session, ranks)
        assert results is not None
        command = base + f" whiten={w}" + (f" ckpt_path={ckpt}" if ckpt else "")
        rows.append(Row(label, "pool", command, results, d.seconds))
        timings[f"test: {label} (extraction, fits, pooling)"] = time.perf_counter() - t
        ds = session.ds
    out = output_dir(cfg) / "test"
    table = comparison_table(
        rows, rows[0].name, kappas=list(cfg.kappas), n_boot=int(cfg.test.n_boot), seed=int(cfg.seed)
    )
    write_comparison(
        out,
        rows,
        baseline=rows[0].name,
        kappas=list(cfg.kappas),
        meta={"dataset": ds.name, "queries": ds.num_queries, "database": ds.num_images, "checkpoint": best},
        query_names=[p.stem for p in ds.queries],
        timings=timings,
        config_yaml=OmegaConf.to_yaml(cfg),
        n_boot=int(cfg.test.n_boot),
        seed=int(cfg.seed),
    )
    print(f"\n{ds.name} test set, {backbone} + {pool_name} at imsize {cfg.test.imsize}:\n{table}")
    return {
        "dataset": ds.name,
        "rows": {
            r.name: {
                "command": r.command,
                "medium": round(100 * float(r.results["medium"]["map"]), 2),
                "hard": round(100 * float(r.results["hard"]["map"]), 2),
            }
            for r in rows
        },
        "report": str(out / "results.md"),
    }


def run_finetune(cfg: DictConfig) -> dict[str, Any] | None:
    """The whole fine-tuning run (and test); returns the summary written to ``results.json`` on global zero."""
    t0 = time.perf_counter()
    check_finetune_config(cfg)
    cfg = with_default_dataset(cfg)
    check_config(cfg)
    from lightning_apps.compare import group_node
    from lightning_apps.preflight import preflight

    pre = cfg.copy()  # preflight also checks what building train_dataset needs (it is the "whitening" set here)
    with open_dict(pre):
        pre.whiten, pre.whiten_train = group_node("whiten", "learned"), str(cfg.train_dataset)
    preflight(pre)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    resolve_precision(cfg)
    out = output_dir(cfg)
    pool_name = _group_name("pool", cfg.pool)
    train_ds = load_dataset(dataset_config(str(cfg.train_dataset)), cfg)
    split = split_train(train_ds, int(cfg.val_objects), int(cfg.seed))
    log.info(
        "train split of %s: %d objects (%d pairs, %d candidate negatives); validation: %d objects (%s), %d queries, "
        "%d images", split.name, len(split.train_objects), split.pairs.shape[0], split.candidates.numel(),
        len(split.val_objects), ", ".join(split.val_objects), split.val_queries.numel(), split.val_db.numel(),
    )  # fmt: skip
    images = load_images(split, imsize=int(cfg.train_imsize), resize=str(cfg.resize))
    module, data = build_model(cfg, split, images, pool_name)
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    ckpt_dir = out / "checkpoints"
    best_cb = ModelCheckpoint(
        dirpath=str(ckpt_dir), filename="best", monitor="val/mAP", mode="max", save_top_k=1,
        enable_version_counter=False,
    )  # fmt: skip
    # last.ckpt after every epoch (Lightning's save_last only follows a new best).
    last_cb = ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", save_top_k=1, enable_version_counter=False)
    resume = _plain(cfg.get("resume"))
    if resume == "last":
        resume = str(ckpt_dir / "last.ckpt")
        if not Path(resume).is_file():
            raise ConfigError(
                f"finetune: resume=last, but {resume} does not exist (set output_dir to the folder of the run to "
                "resume)."
            )
    if resume is not None:
        keep_log(out / "logs", int(torch.load(resume, map_location="cpu", weights_only=False)["global_step"]))
    loggers = _loggers(cfg, out)
    callbacks: list[Any] = [best_cb, last_cb] + ([LearningRateMonitor(logging_interval="epoch")] if loggers else [])
    # The trainer group is shared with the eval app (no logger, no checkpoints): built here with both.
    trainer = _instantiate_trainer(cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(out))
    before = None
    if resume is None:
        trainer.validate(module, datamodule=data, verbose=False)
        before = dict(module.last_val)
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    fit_seconds = time.perf_counter() - t_fit
    if not trainer.is_global_zero:
        return None
    best = best_cb.best_model_path or str(ckpt_dir / "last.ckpt")
    metrics = read_metrics(out / "logs" / "metrics.csv")
    curve = plot_curve(
        metrics,
        out / "training_curve.png",
        f"{_group_name('backbone', cfg.backbone)} + {pool_name}, {_group_name('loss', cfg.loss)} loss",
    )
    summary_whiten = cfg.whiten.get("module") is not None
    summary: dict[str, Any] = {
        "kind": "finetune",
        "train_dataset": split.name,
        "train_objects": split.train_objects,
        "val_objects": split.val_objects,
        "pairs": int(split.pairs.shape[0]),
        "backbone": str(cfg.backbone._target_),
        "pool": pool_name,
        "loss": repr(module.loss),
        "miner": repr(data.miner),
        "global_step": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "val_before": before,
        "val_best": float(best_cb.best_model_score) if best_cb.best_model_score is not None else None,
        "val_last": dict(module.last_val),
        "best_checkpoint": best,
        "last_checkpoint": str(ckpt_dir / "last.ckpt"),
        "eval_command": (
            f"python -m lightning_apps.eval mode=single backbone={_group_name('backbone', cfg.backbone)} "
            f"pool={pool_name} ckpt_path={best}" + (" whiten=checkpoint" if summary_whiten else "")
        ),
        "fit_seconds": round(fit_seconds, 1),
        "training_curve": str(curve),
        "torch": torch.__version__,
    }
    if bool(cfg.test.enabled):
        if trainer.world_size > 1:
            log.warning("test: skipped under DDP; run the eval command of results.json on one process")
        else:
            t = time.perf_counter()
            summary["test"] = evaluate_test(cfg, best, pool_name, {"fine-tuning (fit)": fit_seconds})
            summary["test_seconds"] = round(time.perf_counter() - t, 1)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    with atomic_write(out / "results.json", "w") as fh:
        fh.write(json.dumps(summary, indent=2, default=str))
    v0 = f"{before['medium']:.2f} / {before['hard']:.2f}" if before else "(resumed)"
    vb = module.last_val
    print(
        f"\nfine-tuned {summary['backbone']} + {pool_name} on {split.name} for {summary['epochs']} epochs "
        f"({summary['global_step']} steps, {fit_seconds:.0f} s): validation mAP Medium / Hard {v0} -> "
        f"{vb.get('medium', math.nan):.2f} / {vb.get('hard', math.nan):.2f} (last), best mean {summary['val_best']}\n"
        f"best checkpoint: {best}\nevaluate it: {summary['eval_command']}\ncurve: {curve}\n"
        f"results: {out / 'results.json'} (took {summary['seconds']:.0f} s)"
    )
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="finetune")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; user errors exit with code 2 and one paragraph."""
    exit_on_user_error(run_finetune, cfg)


if __name__ == "__main__":
    sys.modules.setdefault("lightning_apps.finetune", sys.modules[__name__])
    sys.argv = dataset_key_overrides(sys.argv)
    main()
