"""Feature-map extraction with Lightning: image inspection, extraction plans, batches, and the on-disk cache.

The cache holds backbone feature maps (not pooled vectors), so every pooling and re-ranking choice reuses one
extraction (``store="descriptors"`` keeps only pooled vectors instead, see :class:`FeatureCache`). One file per
cache key, written atomically and fsynced (a temporary file in the same folder, flushed to disk, then
:func:`os.replace`): an interrupted run or a power cut leaves only complete files, the next run resumes where it
stopped, and an entry that cannot be read back (zero-length, truncated) is removed and recomputed.

**What a key holds** (:func:`cache_key`): everything that changes a map's numbers and nothing else -- the image
content (sha256 of the file), the query box, the exact pixel size the image is resized to, the resize method,
the padded canvas of its batch (``batching="pad"`` only), and the model identity (:func:`model_id`: backbone
config, sha256 of a checkpoint's bytes, the precision the trainer actually runs, the device kind, input
normalisation, storage dtype). The requested ``imsize`` and scale are not in the key, only the size they give:
two requests that give the same pixels share one entry.

**Sizes** (:func:`target_size`). At scale 1 the image's long side becomes ``min(imsize, native long side)``:
``imsize`` never enlarges an image (cirtorch's ``thumbnail``). A scale ``s`` multiplies that long side
(``round(s * min(imsize, L))``), so ``s > 1`` upsamples, as cirtorch's multi-scale extraction does. Query crops
keep the scale the whole image gets (cirtorch's rule, :func:`deepagg.data.revisitop.query_resize_size`).

**Resize methods.** ``resize="torchvision"`` (the default): the decoded uint8 image (cropped for queries) is
resized once, straight to its target size, with torchvision's antialiased bilinear filter on floats.
``resize="cirtorch"`` reproduces cnnimageretrieval-pytorch pixel for pixel: Pillow's ``thumbnail`` with LANCZOS
on the uint8 image (cropped for queries) to the scale-1 size, ImageNet normalisation, then for a scale
``s != 1`` ``torch.nn.functional.interpolate(scale_factor=s, mode="bilinear", align_corners=False)`` of that
tensor (output size ``floor(h * s) x floor(w * s)``).

**Batches.** ``batching="exact"`` (the default) groups images of one size: no padding, and a map does not depend
on which other images share its batch. ``batching="pad"`` mixes sizes: the batches are planned once over the
whole image list (sorted by size, ``batch_size`` per batch) and every image is padded bottom/right (with zeros,
after normalisation) to its batch's canvas. Features within the receptive field of the padding depend on the
canvas, so the canvas is part of the key, and a resumed run pads a missing image to the same canvas again.

**Distributed.** ``trainer.predict`` shards the batches over the processes (DDP); each process writes the cache
files of its shard, and after a barrier every process reads the whole cache. On one process this is the same
code path. When nothing is left to extract no process group is started and each process does all the work.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
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
from deepagg.backbones import IMAGENET_MEAN, IMAGENET_STD, imagenet_normalize
from deepagg.data.revisitop import (
    ImageReadError,
    bbx_to_pixels,
    crop_query,
    query_resize_size,
    read_image,
)

__all__ = [
    "FLOAT16_MAX",
    "RESIZE_METHODS",
    "CacheEntryError",
    "ExtractionItem",
    "FeatureCache",
    "ImageDataset",
    "ImageInfo",
    "MapExtractor",
    "SizeBucketSampler",
    "cache_key",
    "combine_scales",
    "distributed",
    "extract_maps",
    "inspect_images",
    "model_id",
    "plan_items",
    "pool_cached",
    "target_size",
]

log = logging.getLogger("lightning_apps.extract")

RESIZE_METHODS = ("torchvision", "cirtorch")
FLOAT16_MAX = 65504.0  # the largest finite float16; maps beyond it are stored as float32


def distributed() -> bool:
    """Whether a torch.distributed process group is running (Lightning starts one in ``trainer.predict``)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ------------------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class ImageInfo:
    """An image file as the plan sees it: content digest and size from the header, or why it cannot be read."""

    path: Path
    digest: str | None
    hw: tuple[int, int] | None
    error: str | None = None


def inspect_images(paths: Sequence[str | Path]) -> list[ImageInfo]:
    """sha256 and ``(height, width)`` (from the header, pixels not decoded) of every file; errors are recorded."""
    infos = []
    for p in paths:
        path = Path(p)
        try:
            digest = sha256_file(path)
            with Image.open(path) as im:
                hw = (int(im.height), int(im.width))
        except OSError as err:  # missing, unreadable, or not an image (PIL's UnidentifiedImageError)
            infos.append(ImageInfo(path, None, None, f"{type(err).__name__}: {err}"))
            continue
        infos.append(ImageInfo(path, digest, hw))
    return infos


@dataclass(frozen=True)
class ExtractionItem:
    """One image to extract at one scale: file, optional query box, target size, batch canvas and cache key.

    ``out_hw`` is the size the (cropped) image is resized to; ``canvas_hw`` the padded size of its batch
    (``== out_hw`` unless ``batching="pad"``); ``base_hw`` the scale-1 size (used by ``resize="cirtorch"``).
    ``key`` is None for an image that cannot be read (it has no cache entry).
    """

    path: Path
    bbx: tuple[float, float, float, float] | None
    scale: float
    key: str | None
    out_hw: tuple[int, int]
    canvas_hw: tuple[int, int]
    base_hw: tuple[int, int]
    resize: str = "torchvision"


def target_size(
    full_hw: tuple[int, int],
    crop_hw: tuple[int, int],
    *,
    imsize: int,
    scale: float,
    resize: str = "torchvision",
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(out_hw, base_hw)``: the size an image (or query crop) is resized to at ``scale``, and at scale 1.

    The scale-1 size is cirtorch's: the long side of the *whole* image becomes ``min(imsize, L)`` (never
    enlarged), and a crop keeps that scale (:func:`deepagg.data.revisitop.query_resize_size`). At scale ``s``
    the whole image's long side becomes ``max(1, round(s * min(imsize, L)))`` and the crop keeps that scale; for
    ``s > 1`` the image is enlarged. With ``resize="cirtorch"`` the scale-``s`` size is that of cirtorch's
    bilinear interpolation of the scale-1 tensor, ``floor(h * s) x floor(w * s)``.

    Example:
        >>> target_size((480, 640), (480, 640), imsize=512, scale=1.0)
        ((384, 512), (384, 512))
        >>> target_size((480, 640), (480, 640), imsize=1024, scale=0.5)  # never enlarged at scale 1: 640 * 0.5
        ((240, 320), (480, 640))
    """
    long_full = max(full_hw)
    base = query_resize_size(full_hw, crop_hw, min(imsize, long_full))
    if scale == 1.0:
        return base, base
    if resize == "cirtorch":
        return (max(1, math.floor(base[0] * scale)), max(1, math.floor(base[1] * scale))), base
    size = max(1, round(scale * min(imsize, long_full)))
    return query_resize_size(full_hw, crop_hw, size, upscale=True), base


def model_id(
    *,
    backbone: dict[str, Any],
    ckpt_sha256: str | None,
    precision: str,
    device: str,
    seed: int | None = None,
    normalize: str = "imagenet",
    store: str = "float16",
) -> str:
    """The model part of every cache key: what, besides the pixels, changes a feature map's numbers.

    Args:
        backbone: The resolved backbone config (target and arguments).
        ckpt_sha256: sha256 of the checkpoint file's bytes (not its path), or None without a checkpoint.
        precision: The precision the trainer actually runs (``trainer.precision``, e.g. ``"bf16-mixed"``).
        device: The device kind (``"cpu"``, or ``"cuda:<device name>"``): bf16/float kernels differ by device.
        seed: The seed, for randomly initialised backbones only (``pretrained=False``).
        normalize: The input normalisation.
        store: The storage dtype of the maps.
    """
    spec: dict[str, Any] = {
        "backbone": backbone,
        "ckpt_sha256": ckpt_sha256,
        "precision": precision,
        "device": device,
        "normalize": normalize,
        "store": store,
    }
    if seed is not None:
        spec["seed"] = seed
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_key(
    digest: str,
    bbx: tuple[float, float, float, float] | None,
    out_hw: tuple[int, int],
    canvas_hw: tuple[int, int] | None,
    resize: str,
    model: str,
    *,
    scale: float = 1.0,
    base_hw: tuple[int, int] | None = None,
) -> str:
    """sha256 key of one feature map: image content, crop, pixel size, resize method, batch canvas, model.

    ``canvas_hw`` is the padded batch size for ``batching="pad"`` and None for exact batches. With
    ``resize="cirtorch"`` the pixels at a scale other than 1 are an interpolation of the scale-1 image, so the
    scale and the scale-1 size are part of the key too.
    """
    parts: list[Any] = [digest, list(bbx) if bbx is not None else None, list(out_hw), resize, model]
    parts.append(list(canvas_hw) if canvas_hw is not None else None)
    if resize == "cirtorch" and scale != 1.0:
        parts += [scale, list(base_hw) if base_hw is not None else None]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _batches(sizes: Sequence[tuple[int, int]], batch_size: int, *, exact: bool) -> list[list[int]]:
    """Indices sorted by ``(size, index)``, cut into batches of ``batch_size`` (of one size when ``exact``)."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (sizes[i], i)):
        if current and (len(current) == batch_size or (exact and sizes[current[0]] != sizes[i])):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def plan_items(
    infos: Sequence[ImageInfo],
    bbxs: Sequence[tuple[float, float, float, float] | None] | None,
    *,
    imsize: int,
    scales: Sequence[float],
    model: str,
    batching: str = "exact",
    batch_size: int = 8,
    resize: str = "torchvision",
) -> list[list[ExtractionItem]]:
    """The extraction items of every image at every scale: ``items[s][i]``.

    Sizes follow :func:`target_size`. An unreadable image (``info.digest is None``) keeps its slot with
    ``key=None``: it has no map, and the caller ranks it last. With ``batching="pad"`` the batches of each scale
    are planned here over the whole list, and each item records its batch's canvas.
    """
    if batching not in ("exact", "pad"):
        raise ValueError(f"plan_items(): batching must be 'exact' or 'pad'; got {batching!r}.")
    if resize not in RESIZE_METHODS:
        raise ValueError(f"plan_items(): resize must be one of {RESIZE_METHODS}; got {resize!r}.")
    plans: list[list[ExtractionItem]] = []
    for scale in scales:
        sized: list[tuple[tuple[int, int], tuple[int, int]] | None] = []
        for i, info in enumerate(infos):
            bbx = bbxs[i] if bbxs is not None else None
            if info.digest is None or info.hw is None:
                sized.append(None)
                continue
            crop_hw = info.hw
            if bbx is not None:
                x0, y0, x1, y1 = bbx_to_pixels(bbx, info.hw, query=str(info.path))
                crop_hw = (y1 - y0, x1 - x0)
            sized.append(target_size(info.hw, crop_hw, imsize=imsize, scale=float(scale), resize=resize))
        canvas: dict[int, tuple[int, int]] = {}
        if batching == "pad":
            readable = [i for i, s in enumerate(sized) if s is not None]
            sizes = [sized[i][0] for i in readable]  # type: ignore[index]
            for batch in _batches(sizes, batch_size, exact=False):
                hw = (max(sizes[j][0] for j in batch), max(sizes[j][1] for j in batch))
                for j in batch:
                    canvas[readable[j]] = hw
        items = []
        for i, info in enumerate(infos):
            bbx = bbxs[i] if bbxs is not None else None
            s = sized[i]
            if s is None or info.digest is None:
                items.append(ExtractionItem(info.path, bbx, float(scale), None, (1, 1), (1, 1), (1, 1), resize))
                continue
            out_hw, base_hw = s
            pad_hw = canvas.get(i)
            key = cache_key(info.digest, bbx, out_hw, pad_hw, resize, model, scale=float(scale), base_hw=base_hw)
            items.append(ExtractionItem(info.path, bbx, float(scale), key, out_hw, pad_hw or out_hw, base_hw, resize))
        plans.append(items)
    return plans


# ------------------------------------------------------------------------------------------------------ images


def _load_cirtorch(item: ExtractionItem) -> torch.Tensor:
    """The pixels cirtorch makes: PIL RGB, crop, ``thumbnail`` (LANCZOS), normalise, bilinear per scale."""
    try:
        with Image.open(item.path) as im:
            img = im.convert("RGB")
    except OSError as err:
        raise ImageReadError(f"cannot read image {item.path}: {err}", path=item.path, reason=str(err)) from err
    if item.bbx is not None:
        img = crop_query(img, item.bbx, query=str(item.path))
    bh, bw = item.base_hw
    if (img.height, img.width) != (bh, bw):
        img = img.resize((bw, bh), Image.Resampling.LANCZOS, reducing_gap=2.0)  # = thumbnail((s, s), LANCZOS)
    x = imagenet_normalize(TF.pil_to_tensor(img)[None].float() / 255.0)
    if item.scale != 1.0:
        x = torch.nn.functional.interpolate(x, scale_factor=item.scale, mode="bilinear", align_corners=False)
    return x[0]


class ImageDataset(Dataset):
    """Reads, crops (queries), resizes and ImageNet-normalises the images of a list of extraction items."""

    def __init__(self, items: Sequence[ExtractionItem]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        try:
            if item.resize == "cirtorch":
                x = _load_cirtorch(item)
            else:
                img = read_image(item.path, what="image")
                if item.bbx is not None:
                    img = crop_query(img, item.bbx, query=str(item.path))
                x = TF.resize(img.float() / 255.0, list(item.out_hw), antialias=True).clamp(0.0, 1.0)
                x = imagenet_normalize(x[None])[0]
        except ImageReadError as err:
            return {"index": i, "image": None, "error": str(err), "canvas": item.canvas_hw}
        if tuple(x.shape[1:]) != tuple(item.out_hw):  # the header lied about the size (e.g. EXIF, odd formats)
            return {
                "index": i,
                "image": None,
                "error": f"decoded size {tuple(x.shape[1:])} differs from the planned {item.out_hw}",
                "canvas": item.canvas_hw,
            }
        return {"index": i, "image": x, "error": None, "canvas": item.canvas_hw}


def collate_padded(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad images bottom/right with zeros (after normalisation) to the batch's planned canvas."""
    ok = [b for b in batch if b["image"] is not None]
    errors = {b["index"]: b["error"] for b in batch if b["image"] is None}
    if not ok:
        return {
            "index": torch.zeros(0, dtype=torch.long),
            "images": torch.zeros(0, 3, 1, 1),
            "hw": [],
            "errors": errors,
        }
    h = max(max(b["image"].shape[1], b["canvas"][0]) for b in ok)
    w = max(max(b["image"].shape[2], b["canvas"][1]) for b in ok)
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
    """Batches of indices sorted by size; with ``exact=True`` a batch holds one size only.

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
        # Lightning refuses a rank with no batch at all: such a rank gets one empty batch (a no-op).
        self.batches = _batches(sizes, batch_size, exact=exact)[rank::world_size] or [[]]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ------------------------------------------------------------------------------------------------------ cache


class CacheEntryError(RuntimeError):
    """A cache file exists but cannot be read back (truncated or zero-length after a crash or power cut)."""


class FeatureCache:
    """Feature maps (or pooled descriptors) on disk, one ``<key>.pt`` file per entry, atomic and fsynced.

    Maps are stored as float16 (half the disk of float32); a map with a finite value beyond the float16 range
    (:data:`FLOAT16_MAX`) is stored as float32 instead, since float16 would turn it into ``inf``. Every reader gets
    float32. An entry that exists but cannot be loaded raises :class:`CacheEntryError`; :meth:`has` does not count
    zero-length files.
    """

    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.widened = 0  # maps stored as float32 because float16 would overflow

    def path(self, key: str) -> Path:
        """The file of one cache key (two-level fan-out)."""
        return self.root / key[:2] / f"{key}.pt"

    def has(self, key: str) -> bool:
        """Whether a non-empty entry exists (partial writes are never visible; zero-length files do not count)."""
        try:
            return self.path(key).stat().st_size > 0
        except OSError:
            return False

    def put(self, key: str, fmap: torch.Tensor, *, half: bool = True) -> None:
        """Store one map ``(C, h, w)`` atomically: float16, or float32 where float16 overflows (or ``half=False``)."""
        data = fmap.detach().to("cpu", torch.float32)
        finite = data[torch.isfinite(data)]
        if not half:
            stored = data
        elif finite.numel() and float(finite.abs().max()) > FLOAT16_MAX:
            self.widened += 1
            if self.widened == 1:
                log.warning(
                    "feature cache: values up to %.4g exceed the float16 range (%g); such maps are stored as float32",
                    float(finite.abs().max()),
                    FLOAT16_MAX,
                )
            stored = data
        else:
            stored = data.to(torch.float16)
        with atomic_write(self.path(key), fsync=self.fsync) as fh:
            torch.save(stored.contiguous().clone(), fh)

    def get(self, key: str) -> torch.Tensor:
        """Load one entry as float32; :class:`CacheEntryError` if the file cannot be read back."""
        path = self.path(key)
        try:
            return torch.load(path, weights_only=True).float()
        except FileNotFoundError:
            raise
        except Exception as err:  # zero-length or truncated zip, unpickling garbage
            raise CacheEntryError(f"feature cache entry {path} cannot be read ({type(err).__name__}: {err})") from err

    def remove(self, key: str) -> None:
        """Delete one entry (missing is fine)."""
        self.path(key).unlink(missing_ok=True)

    def fail_path(self, key: str) -> Path:
        """The marker file of an image that could not be decoded (keys hold the content digest, so it is final)."""
        return self.root / key[:2] / f"{key}.fail"

    def put_failure(self, key: str, reason: str) -> None:
        """Remember that the image of ``key`` cannot be decoded, so that later runs do not try again."""
        with atomic_write(self.fail_path(key), "w", fsync=self.fsync) as fh:
            fh.write(reason)

    def failure(self, key: str) -> str | None:
        """The recorded decode failure of ``key``, or None."""
        try:
            return self.fail_path(key).read_text() or "could not be decoded"
        except OSError:
            return None

    def nbytes(self, keys: Sequence[str]) -> int:
        """Bytes on disk of the given entries (missing ones count 0)."""
        total = 0
        for key in keys:
            with contextlib.suppress(OSError):
                total += self.path(key).stat().st_size
        return total

    def folder_nbytes(self) -> tuple[int, int]:
        """``(number of files, bytes)`` of everything under the cache folder."""
        count = total = 0
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                    count += 1
                except OSError:
                    pass
        return count, total


# ------------------------------------------------------------------------------------------------------ extraction


class MapExtractor(pl.LightningModule):
    """Runs the backbone over batches and writes each image's valid feature map (or its descriptor) to the cache.

    With ``pool`` given (``store="descriptors"``), each valid map is rounded to float16 (as a stored map would
    be) and pooled, and only the descriptor is written, under ``keys[i]``.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        cache: FeatureCache,
        items: Sequence[ExtractionItem],
        *,
        pool: torch.nn.Module | None = None,
        keys: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.cache = cache
        self.items = list(items)
        self.pool = pool
        self.keys = list(keys) if keys is not None else [str(it.key) for it in self.items]
        self._meta: list[torch.nn.Module] = []  # a list, so that Lightning does not register or move it
        self.failures: dict[int, str] = {}

    def _valid_extent(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Feature-grid size of a lone image of ``hw`` pixels (shape inference on the meta device)."""
        if not self._meta:
            self._meta.append(copy.deepcopy(self.backbone).to("meta"))
        out = self._meta[0](torch.empty(1, 3, *hw, device="meta"))
        return int(out.shape[2]), int(out.shape[3])

    def on_predict_start(self) -> None:
        # channels_last lets oneDNN pick its fastest convolutions (with bf16 autocast on AMX CPUs: ~3.5x).
        self.backbone.to(memory_format=torch.channels_last)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.failures.update(batch["errors"])
        for i, reason in batch["errors"].items():
            self.cache.put_failure(self.keys[i], reason)
        if batch["images"].shape[0] == 0:
            return
        with torch.no_grad():
            maps = self.backbone(batch["images"].to(memory_format=torch.channels_last)).float()
        uniform = all(hw == tuple(batch["images"].shape[2:]) for hw in batch["hw"])
        for j, i in enumerate(batch["index"].tolist()):
            fh, fw = (maps.shape[2], maps.shape[3]) if uniform else self._valid_extent(batch["hw"][j])
            fmap = maps[j, :, :fh, :fw]
            if fh == 0 or fw == 0:
                self.failures[i] = f"image of {batch['hw'][j]} pixels gives an empty feature map"
                self.cache.put_failure(self.keys[i], self.failures[i])
                continue
            if self.pool is not None:
                extra = {}
                if getattr(self.pool, "mask", None) == "sift":  # the SIFT mask needs the pixels, in [0, 1]
                    h, w = batch["hw"][j]
                    mean = torch.tensor(IMAGENET_MEAN, device=maps.device).view(3, 1, 1)
                    std = torch.tensor(IMAGENET_STD, device=maps.device).view(3, 1, 1)
                    extra["images"] = (batch["images"][j, :, :h, :w] * std + mean).clamp(0.0, 1.0)[None]
                with torch.no_grad():
                    fmap = self.pool(_as_stored(fmap)[None].to(self.device), **extra)[0]
            self.cache.put(self.keys[i], fmap, half=self.pool is None)


def _as_stored(fmap: torch.Tensor) -> torch.Tensor:
    """The values a map has after a round trip through the cache (float16, or float32 if it would overflow)."""
    finite = fmap[torch.isfinite(fmap)]
    if finite.numel() and float(finite.abs().max()) > FLOAT16_MAX:
        return fmap.float()
    return fmap.half().float()


def _gather_failures(local: dict[int, str]) -> dict[int, str]:
    """The union of every process's failures (DDP), or ``local`` on one process."""
    if not distributed():
        return dict(local)
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    out: dict[int, str] = {}
    for part in gathered:
        out.update(part or {})
    return out


def extract_maps(
    trainer: pl.Trainer,
    backbone: torch.nn.Module,
    items: Sequence[ExtractionItem],
    cache: FeatureCache,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    overwrite: bool = False,
    pool: torch.nn.Module | None = None,
    keys: Sequence[str | None] | None = None,
) -> dict[int, str]:
    """Make sure every readable item's entry is in the cache; returns ``{item index: reason}`` for the failures.

    Only the missing entries are extracted (all with ``overwrite=True``), so an interrupted run resumes. Items
    are batched by their planned canvas (one canvas per batch). With ``pool``/``keys`` the entries are pooled
    descriptors under ``keys`` (``store="descriptors"``). Under DDP every process computes the same to-do list
    (a barrier follows it, so no process writes before all have looked) and the failures of all processes are
    gathered. Unreadable items (``key is None``) are reported, not extracted; an image that fails to decode gets a
    ``.fail`` marker in the cache (its key holds the content digest), so later runs report it without trying again
    (``overwrite=True`` tries again).
    """
    keys = list(keys) if keys is not None else [it.key for it in items]
    failures = {i: "cannot be read" for i, k in enumerate(keys) if k is None}
    todo = []
    for i, k in enumerate(keys):
        if k is None or (not overwrite and cache.has(k)):
            continue
        known = None if overwrite else cache.failure(k)
        if known is not None:
            failures[i] = known  # decoding failed in an earlier run: content-addressed, so it would fail again
        else:
            todo.append(i)
    if distributed():
        trainer.strategy.barrier("deepagg-extract-plan")
    if not todo:
        return failures
    sub = [items[i] for i in todo]
    sampler = SizeBucketSampler(
        [it.canvas_hw for it in sub],
        batch_size,
        exact=True,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
    )
    loader = torch.utils.data.DataLoader(
        ImageDataset(sub), batch_sampler=sampler, collate_fn=collate_padded, num_workers=num_workers
    )
    module = MapExtractor(backbone, cache, sub, pool=pool, keys=[str(keys[i]) for i in todo])
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier("deepagg-extract")
    # After predict every process of a DDP run has joined the process group: gather the failures of all shards.
    for j, reason in _gather_failures(module.failures).items():
        failures[todo[j]] = reason
    return failures


def load_rgb(item: ExtractionItem) -> torch.Tensor:
    """The image of ``item`` as the backbone sees it (cropped, resized to ``out_hw``), RGB in [0, 1], ``(3, h, w)``.

    For pools that look at the pixels as well as the maps (the SIFT mask of :class:`deepagg.TEmbPool`).

    Raises:
        ImageReadError: If the image cannot be read or decodes to another size than planned.
    """
    got = ImageDataset([item])[0]
    if got["image"] is None:
        raise ImageReadError(f"cannot read image {item.path}: {got['error']}", path=item.path, reason=got["error"])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (got["image"] * std + mean).clamp(0.0, 1.0)


def sift_selection(cache: FeatureCache, item: ExtractionItem, grid_hw: tuple[int, int]) -> torch.Tensor:
    """The SIFT mask (:func:`deepagg.functional.sift_mask`) of ``item``'s image on a ``grid_hw`` feature grid, cached.

    Detection costs about 0.2 s per 512 px image on 2 CPU cores, more than pooling, so the mask is kept in the
    feature cache (atomic, keyed by the image's map key and the grid) and every later run reads it back.
    """
    from deepagg.functional.masks import sift_mask

    key = hashlib.sha256(f"{item.key}|sift-mask-v1|{grid_hw[0]}x{grid_hw[1]}".encode()).hexdigest()
    if cache.has(key):
        try:
            return cache.get(key)[0] > 0.5
        except (CacheEntryError, FileNotFoundError) as err:
            log.warning("%s; it will be recomputed", err)
            cache.remove(key)
    sel = sift_mask(load_rgb(item)[None], (int(grid_hw[0]), int(grid_hw[1])))[0]
    cache.put(key, sel[None].float())
    return sel


def pool_cached(
    items: Sequence[ExtractionItem],
    cache: FeatureCache,
    pool: torch.nn.Module | None,
    *,
    batch_size: int = 64,
    keys: Sequence[str | None] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Pool the cached maps of ``items`` into descriptors ``(N, D)``, ``batch_size`` maps of one size at a time.

    Maps are read from the cache chunk by chunk, so memory holds one chunk, not the whole dataset (ROxf at
    1024 px would need about 30 GB of float32 VGG16 maps). With ``pool=None`` the entries under ``keys`` are
    descriptors already (``store="descriptors"``). Items without an entry (unreadable images) get a zero row.

    Returns:
        ``(descriptors, bad)``: ``bad`` lists the items whose entry exists but cannot be read back; those
        entries are removed here (recompute them and call again).
    """
    keys = list(keys) if keys is not None else [it.key for it in items]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        k = keys[i]
        if k is not None and cache.has(k):
            groups.setdefault(it.out_hw if pool is not None else (0, 0), []).append(i)
    if not groups:
        raise RuntimeError("pool_cached(): no feature map could be computed (every image failed to load).")
    rows: dict[int, torch.Tensor] = {}
    bad: list[int] = []
    with torch.no_grad():
        for idx in groups.values():
            for start in range(0, len(idx), batch_size):
                chunk, loaded = [], []
                for i in idx[start : start + batch_size]:
                    try:
                        loaded.append(cache.get(str(keys[i])))
                        chunk.append(i)
                    except (CacheEntryError, FileNotFoundError) as err:
                        log.warning("%s; it will be recomputed", err)
                        cache.remove(str(keys[i]))
                        bad.append(i)
                if not chunk:
                    continue
                stacked = torch.stack(loaded)
                if pool is None:
                    desc = stacked.float()
                elif getattr(pool, "mask", None) == "sift":  # SIFT keypoints of the images select local features
                    grid = (int(stacked.shape[-2]), int(stacked.shape[-1]))
                    sel = torch.stack([sift_selection(cache, items[i], grid) for i in chunk])
                    desc = pool(stacked, selection=sel).float()
                else:
                    desc = pool(stacked).float()
                for j, i in enumerate(chunk):
                    rows[i] = desc[j]
    if not rows:
        return torch.zeros(len(items), 0), bad
    dim = next(iter(rows.values())).shape[0]
    out = torch.zeros(len(items), dim)
    for i, row in rows.items():
        out[i] = row
    return out, bad


def combine_scales(per_scale: Sequence[torch.Tensor], p: float = 1.0) -> torch.Tensor:
    """Multi-scale descriptor: generalised mean (power ``p``) of the per-scale descriptors, L2-normalised.

    ``p = 1`` averages; cirtorch uses the GeM ``p`` of the network. Zero rows stay zero.
    """
    stacked = torch.stack(list(per_scale))
    combined = stacked.mean(0) if p == 1.0 else stacked.clamp(min=0).pow(p).mean(0).pow(1.0 / p)
    return torch.nn.functional.normalize(combined, dim=-1)
