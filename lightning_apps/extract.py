"""Feature-map extraction with Lightning: image datasets, size-bucketed batches, and the on-disk cache.

The cache holds backbone feature maps (not pooled vectors), so every pooling and re-ranking choice reuses one
extraction. One file per (image content, crop, backbone, preprocessing, scale), written atomically (a
temporary file in the same folder, then :func:`os.replace`): an interrupted run leaves only complete files
and the next run resumes where it stopped. Maps are stored in float16 and every run pools from the
float16-rounded maps, cached or fresh, so a cached run gives exactly the numbers of an uncached one.

Batches: images are grouped by their exact resized size (``batching="exact"``, the default), so a batch needs
no padding and a descriptor does not depend on the batch size. ``batching="pad"`` mixes sizes, padding
bottom/right with zeros after normalisation and passing the feature-grid mask to the pooling layer; features
within the receptive field of the padding then differ slightly from a lone image's.

Distributed: ``trainer.predict`` shards the images over the processes (DDP); each process writes the cache
files of its shard, and after a barrier every process reads the whole cache. On one process this is the same
code path.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms.v2 import functional as TF

from deepagg._io import atomic_write, sha256_file
from deepagg.backbones import imagenet_normalize
from deepagg.data.revisitop import (
    ImageReadError,
    bbx_to_pixels,
    crop_query,
    query_resize_size,
    read_image,
)

__all__ = [
    "ExtractionItem",
    "FeatureCache",
    "ImageDataset",
    "MapExtractor",
    "SizeBucketSampler",
    "extract_maps",
    "pool_cached",
]


@dataclass(frozen=True)
class ExtractionItem:
    """One image to extract: its file, an optional query box, the scale, and its cache key."""

    path: Path
    bbx: tuple[float, float, float, float] | None
    scale: float
    key: str
    out_hw: tuple[int, int]


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    with Image.open(path) as im:
        return im.height, im.width


def plan_items(
    paths: Sequence[Path],
    bbxs: Sequence[tuple[float, float, float, float] | None] | None,
    *,
    imsize: int,
    scales: Sequence[float],
    model_id: str,
    is_query: bool,
) -> list[list[ExtractionItem]]:
    """The extraction items of every image at every scale: ``items[s][i]``.

    Database images are resized so that the longer side is ``round(imsize * scale)`` (never enlarged, as
    cirtorch's ``thumbnail``); query crops follow cirtorch (:func:`deepagg.data.revisitop.query_resize_size`):
    the crop keeps the scale the whole image would get. Unreadable database images keep their slot (the
    caller gives them a zero descriptor); an unreadable query raises :class:`ImageReadError`.
    """
    plans: list[list[ExtractionItem]] = [[] for _ in scales]
    for i, path in enumerate(paths):
        path = Path(path)
        bbx = bbxs[i] if bbxs is not None else None
        try:
            digest = sha256_file(path)
            full_hw = _image_size(path)
        except OSError as err:
            if is_query:
                raise ImageReadError(f"query image {path} cannot be read: {err}") from err
            digest, full_hw = "unreadable", (1, 1)
        for s, scale in enumerate(scales):
            size = max(1, round(imsize * scale))
            if bbx is not None and digest != "unreadable":
                x0, y0, x1, y1 = bbx_to_pixels(bbx, full_hw, query=str(path))
                out_hw = query_resize_size(full_hw, (y1 - y0, x1 - x0), size)
            else:
                out_hw = query_resize_size(full_hw, full_hw, size)
            key_src = json.dumps([digest, bbx, size, list(out_hw), model_id])
            key = hashlib.sha256(key_src.encode()).hexdigest()
            plans[s].append(ExtractionItem(path, bbx, float(scale), key, tuple(out_hw)))
    return plans


class ImageDataset(Dataset):
    """Reads, crops (queries), resizes and ImageNet-normalises the images of a list of extraction items."""

    def __init__(self, items: Sequence[ExtractionItem]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        try:
            img = read_image(item.path, what="image")
        except ImageReadError as err:
            return {"index": i, "image": None, "error": str(err)}
        if item.bbx is not None:
            img = crop_query(img, item.bbx, query=str(item.path))
        x = TF.resize(img.float() / 255.0, list(item.out_hw), antialias=True).clamp(0.0, 1.0)
        return {"index": i, "image": imagenet_normalize(x[None])[0], "error": None}


def collate_padded(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad images bottom/right with zeros (after normalisation) to the largest in the batch."""
    ok = [b for b in batch if b["image"] is not None]
    errors = {b["index"]: b["error"] for b in batch if b["image"] is None}
    if not ok:
        return {
            "index": torch.zeros(0, dtype=torch.long),
            "images": torch.zeros(0, 3, 1, 1),
            "hw": [],
            "errors": errors,
        }
    h = max(b["image"].shape[1] for b in ok)
    w = max(b["image"].shape[2] for b in ok)
    images = torch.zeros(len(ok), 3, h, w)
    for j, b in enumerate(ok):
        images[j, :, : b["image"].shape[1], : b["image"].shape[2]] = b["image"]
    return {
        "index": torch.tensor([b["index"] for b in ok]),
        "images": images,
        "hw": [tuple(b["image"].shape[1:]) for b in ok],
        "errors": errors,
    }


class SizeBucketSampler(Sampler[list[int]]):
    """Batches of indices sorted by output size; with ``exact=True`` a batch holds one size only.

    Under DDP, pass ``rank``/``world_size``: batches are dealt round-robin, so every process gets a disjoint
    subset (no padding by repetition; processes may get different batch counts, and a process with nothing to
    do gets one empty batch).
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        batch_size: int,
        *,
        exact: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.batches: list[list[int]] = []
        order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
        current: list[int] = []
        for i in order:
            if current and (len(current) == batch_size or (exact and sizes[current[0]] != sizes[i])):
                self.batches.append(current)
                current = []
            current.append(i)
        if current:
            self.batches.append(current)
        # Lightning refuses a rank with no batch at all: such a rank gets one empty batch (a no-op).
        self.batches = self.batches[rank::world_size] or [[]]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FeatureCache:
    """Feature maps on disk, one ``<key>.pt`` file per image (float16), written atomically."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """The file of one cache key (two-level fan-out)."""
        return self.root / key[:2] / f"{key}.pt"

    def has(self, key: str) -> bool:
        """Whether a complete entry exists (partial writes are never visible)."""
        return self.path(key).is_file()

    def put(self, key: str, fmap: torch.Tensor) -> None:
        """Store one map ``(C, h, w)`` atomically."""
        with atomic_write(self.path(key)) as fh:
            torch.save(fmap.detach().to("cpu", torch.float16).contiguous().clone(), fh)

    def get(self, key: str) -> torch.Tensor:
        """Load one map as float32."""
        return torch.load(self.path(key), weights_only=True).float()


class MapExtractor(pl.LightningModule):
    """Runs the backbone over batches and writes each image's valid feature map to the cache."""

    def __init__(self, backbone: torch.nn.Module, cache: FeatureCache, items: Sequence[ExtractionItem]) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.cache = cache
        self.items = list(items)
        self._meta: torch.nn.Module | None = None
        self.failures: dict[int, str] = {}

    def _valid_extent(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Feature-grid size of a lone image of ``hw`` pixels (shape inference on the meta device)."""
        if self._meta is None:
            self._meta = copy.deepcopy(self.backbone).to("meta")
        out = self._meta(torch.empty(1, 3, *hw, device="meta"))
        return int(out.shape[2]), int(out.shape[3])

    def on_predict_start(self) -> None:
        # channels_last lets oneDNN pick its fastest convolutions (with bf16 autocast on AMX CPUs: ~3.5x).
        self.backbone.to(memory_format=torch.channels_last)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.failures.update(batch["errors"])
        if batch["images"].shape[0] == 0:
            return
        with torch.no_grad():
            maps = self.backbone(batch["images"].to(memory_format=torch.channels_last)).float()
        uniform = len(set(batch["hw"])) == 1
        for j, i in enumerate(batch["index"].tolist()):
            fh, fw = (maps.shape[2], maps.shape[3]) if uniform else self._valid_extent(batch["hw"][j])
            self.cache.put(self.items[i].key, maps[j, :, :fh, :fw])


def extract_maps(
    trainer: pl.Trainer,
    backbone: torch.nn.Module,
    items: Sequence[ExtractionItem],
    cache: FeatureCache,
    *,
    batch_size: int = 8,
    batching: str = "exact",
    num_workers: int = 0,
    overwrite: bool = False,
) -> dict[int, str]:
    """Make sure every item's feature map is in the cache; returns ``{item index: reason}`` for unreadable ones.

    Only the missing entries are extracted (all with ``overwrite=True``), so an interrupted run resumes.
    """
    if batching not in ("exact", "pad"):
        raise ValueError(f"extract_maps(): batching must be 'exact' or 'pad'; got {batching!r}.")
    todo = [i for i, it in enumerate(items) if overwrite or not cache.has(it.key)]
    if not todo:
        return {}
    sub = [items[i] for i in todo]
    dataset = ImageDataset(sub)
    sampler = SizeBucketSampler(
        [it.out_hw for it in sub],
        batch_size,
        exact=batching == "exact",
        rank=trainer.global_rank,
        world_size=trainer.world_size,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_padded, num_workers=num_workers
    )
    module = MapExtractor(backbone, cache, sub)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier("deepagg-extract")
    return {todo[i]: reason for i, reason in module.failures.items()}


def pool_cached(
    items: Sequence[ExtractionItem], cache: FeatureCache, pool: torch.nn.Module, *, batch_size: int = 64
) -> torch.Tensor:
    """Pool the cached maps of ``items`` into descriptors ``(N, D)``, ``batch_size`` maps of one size at a time.

    Maps are read from the cache chunk by chunk, so memory holds one chunk, not the whole dataset (ROxf at
    1024 px would need about 30 GB of float32 VGG16 maps). Items without a cached map (unreadable images) get
    a zero descriptor: they rank last for every query.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        if cache.has(it.key):
            groups.setdefault(it.out_hw, []).append(i)
    if not groups:
        raise RuntimeError("pool_cached(): no feature map could be computed (every image failed to load).")
    out: torch.Tensor | None = None
    with torch.no_grad():
        for idx in groups.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                desc = pool(torch.stack([cache.get(items[i].key) for i in chunk])).float()
                if out is None:
                    out = desc.new_zeros(len(items), desc.shape[1])
                out[chunk] = desc
    assert out is not None
    return out


def combine_scales(per_scale: Sequence[torch.Tensor], p: float = 1.0) -> torch.Tensor:
    """Multi-scale descriptor: generalised mean (power ``p``) of the per-scale descriptors, L2-normalised.

    ``p = 1`` averages; cirtorch uses the GeM ``p`` of the network. Zero rows stay zero.
    """
    stacked = torch.stack(list(per_scale))
    combined = stacked.mean(0) if p == 1.0 else stacked.clamp(min=0).pow(p).mean(0).pow(1.0 / p)
    return torch.nn.functional.normalize(combined, dim=-1)
