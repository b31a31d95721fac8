"""Extraction plans, cache keys and the feature cache of the evaluation app (``lightning_apps/extract.py``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from deepagg.backbones import imagenet_normalize, mobilenet_v2
from lightning_apps.extract import (
    FLOAT16_MAX,
    CacheEntryError,
    FeatureCache,
    ImageDataset,
    SizeBucketSampler,
    cache_key,
    extract_maps,
    inspect_images,
    model_id,
    plan_items,
    pool_cached,
    target_size,
)

from ._fakedata import make_fake_revisitop, truncate_image


def _trainer() -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = make_fake_revisitop(tmp_path_factory.mktemp("fake"))
    return sorted((root / "jpg").glob("p*.jpg"))


MODEL = model_id(backbone={"_target_": "x"}, ckpt_sha256=None, precision="32-true", device="cpu")


# --------------------------------------------------------------------------------------------------------------
# Keys: every input that changes a map's numbers changes the key, and nothing else does
# --------------------------------------------------------------------------------------------------------------


def test_model_id_changes_with_each_input() -> None:
    base = {"backbone": {"_target_": "deepagg.backbones.vgg16", "pretrained": True}, "ckpt_sha256": None}
    ref = model_id(**base, precision="32-true", device="cpu")
    variants = [
        model_id(**{**base, "backbone": {"_target_": "deepagg.backbones.mobilenet_v2", "pretrained": True}},
                 precision="32-true", device="cpu"),
        model_id(**{**base, "backbone": {"_target_": "deepagg.backbones.vgg16", "pretrained": False}},
                 precision="32-true", device="cpu"),
        model_id(**{**base, "ckpt_sha256": "a" * 64}, precision="32-true", device="cpu"),
        model_id(**base, precision="bf16-mixed", device="cpu"),
        model_id(**base, precision="32-true", device="cuda:NVIDIA H200"),
        model_id(**base, precision="32-true", device="cpu", seed=1),
        model_id(**base, precision="32-true", device="cpu", normalize="none"),
        model_id(**base, precision="32-true", device="cpu", store="float32"),
    ]  # fmt: skip
    assert len({ref, *variants}) == len(variants) + 1
    assert model_id(**base, precision="32-true", device="cpu") == ref  # deterministic


def test_cache_key_changes_with_each_input() -> None:
    args = ("d" * 64, None, (384, 512), None, "torchvision", MODEL)
    ref = cache_key(*args)
    variants = [
        cache_key("e" * 64, *args[1:]),  # image content
        cache_key(args[0], (1.0, 2.0, 30.0, 40.0), *args[2:]),  # query box
        cache_key(args[0], None, (383, 512), *args[3:]),  # pixel size
        cache_key(*args[:3], (400, 512), *args[4:]),  # padded canvas
        cache_key(*args[:4], "cirtorch", MODEL),  # resize method
        cache_key(*args[:5], "0" * 16),  # model
        cache_key(*args[:4], "cirtorch", MODEL, scale=0.5, base_hw=(768, 1024)),  # cirtorch: scale of the base image
    ]
    assert len({ref, *variants}) == len(variants) + 1
    # the scale is not in a torchvision key: the pixels depend on the size only
    assert cache_key(*args, scale=0.5, base_hw=(768, 1024)) == ref


def test_plan_keys_follow_pixels_not_requests(photos: list[Path]) -> None:
    infos = inspect_images(photos[:2])
    # The photos are 384 px wide: imsize 1024 and 2048 both give the native size, so they share the key.
    native = max(infos[0].hw)
    a = plan_items(infos, None, imsize=1024, scales=[1.0], model=MODEL)[0]
    b = plan_items(infos, None, imsize=2048, scales=[1.0], model=MODEL)[0]
    assert [it.key for it in a] == [it.key for it in b]
    assert max(a[0].out_hw) == native
    # a scale above 1 enlarges (as cirtorch's multi-scale does); three scales are three different sizes
    plans = plan_items(infos, None, imsize=1024, scales=[1.0, 0.5, 1.5], model=MODEL)
    assert [max(p[0].out_hw) for p in plans] == [native, round(0.5 * native), round(1.5 * native)]
    assert len({p[0].key for p in plans}) == 3
    # scales act on the size at imsize: at imsize 128, scale 0.5 is 64 px
    assert max(plan_items(infos, None, imsize=128, scales=[0.5], model=MODEL)[0][0].out_hw) == 64


def test_target_size_rules() -> None:
    full = (480, 640)
    assert target_size(full, full, imsize=512, scale=1.0) == ((384, 512), (384, 512))
    assert target_size(full, full, imsize=512, scale=0.5)[0] == (192, 256)
    assert target_size(full, full, imsize=2000, scale=1.0)[0] == (480, 640)  # never enlarged by imsize
    assert target_size(full, full, imsize=2000, scale=2.0)[0] == (960, 1280)  # a scale > 1 enlarges
    # cirtorch: the scale-s size is floor(base * s) of the scale-1 thumbnail
    assert target_size(full, full, imsize=500, scale=0.7071067811865476, resize="cirtorch") == (
        (math.floor(375 * 0.7071067811865476), math.floor(500 * 0.7071067811865476)),
        (375, 500),
    )
    # a query crop keeps the scale of its whole image
    assert target_size(full, (200, 320), imsize=320, scale=1.0)[0] == (100, 160)


def test_pad_canvas_is_planned_over_the_whole_list(photos: list[Path], tmp_path: Path) -> None:
    small = tmp_path / "small.jpg"
    with Image.open(photos[0]) as im:
        im.resize((im.width // 2, im.height // 2)).save(small)
    infos = inspect_images([photos[0], small, photos[1]])
    exact = plan_items(infos, None, imsize=512, scales=[1.0], model=MODEL, batching="exact")[0]
    pad = plan_items(infos, None, imsize=512, scales=[1.0], model=MODEL, batching="pad", batch_size=8)[0]
    big = (max(it.out_hw[0] for it in pad), max(it.out_hw[1] for it in pad))
    assert all(it.canvas_hw == big for it in pad)
    assert all(it.canvas_hw == it.out_hw for it in exact)
    assert pad[1].key != exact[1].key  # the small image's map depends on its canvas
    alone = plan_items(infos[1:2], None, imsize=512, scales=[1.0], model=MODEL, batching="pad", batch_size=8)[0]
    assert alone[0].canvas_hw == alone[0].out_hw
    assert alone[0].key != pad[1].key


def test_unreadable_file_has_no_key(photos: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    infos = inspect_images([photos[0], bad, tmp_path / "missing.jpg"])
    assert infos[0].digest is not None
    assert infos[1].digest is None
    assert infos[2].digest is None
    assert "UnidentifiedImageError" in str(infos[1].error)
    items = plan_items(infos, None, imsize=128, scales=[1.0], model=MODEL)[0]
    assert items[0].key is not None
    assert items[1].key is None
    assert items[2].key is None


# --------------------------------------------------------------------------------------------------------------
# Pixels: the cirtorch resize is cirtorch's, literally
# --------------------------------------------------------------------------------------------------------------


def _cirtorch_reference(path: Path, bbx, imsize: int, scale: float) -> torch.Tensor:
    """cnnimageretrieval-pytorch's ImagesFromList + extract_ms, step by step (PIL, thumbnail, interpolate)."""
    with Image.open(path) as f:
        img = f.convert("RGB")
    full = max(img.size)
    if bbx is not None:
        img = img.crop(bbx)
    img.thumbnail((imsize * max(img.size) / full, imsize * max(img.size) / full), Image.Resampling.LANCZOS)
    x = torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1).float()[None] / 255.0
    x = imagenet_normalize(x)
    if scale != 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    return x[0]


@pytest.mark.parametrize("scale", [1.0, 0.7071067811865476, 0.5])
@pytest.mark.parametrize("query", [False, True])
def test_cirtorch_resize_reproduces_cirtorch(photos: list[Path], scale: float, query: bool) -> None:
    bbx = (50.4, 40.6, 300.2, 200.5) if query else None
    items = plan_items(inspect_images([photos[0]]), [bbx], imsize=200, scales=[scale], model=MODEL, resize="cirtorch")
    got = ImageDataset(items[0])[0]["image"]
    want = _cirtorch_reference(photos[0], bbx, 200, scale)
    assert got.shape == want.shape
    assert tuple(got.shape[1:]) == items[0][0].out_hw
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torchvision_resize_is_the_default_and_differs(photos: list[Path]) -> None:
    infos = inspect_images([photos[0]])
    tv = ImageDataset(plan_items(infos, None, imsize=200, scales=[1.0], model=MODEL)[0])[0]["image"]
    ct = ImageDataset(plan_items(infos, None, imsize=200, scales=[1.0], model=MODEL, resize="cirtorch")[0])[0]["image"]
    assert tv.shape == ct.shape
    assert 0 < (tv - ct).abs().mean() < 0.1  # same size, slightly different pixels


# --------------------------------------------------------------------------------------------------------------
# The cache: atomic, fsynced, corrupt entries detected, float16 overflow widened
# --------------------------------------------------------------------------------------------------------------


def test_cache_write_crash_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = FeatureCache(tmp_path / "cache")

    def boom(obj, fh, *args, **kwargs):
        fh.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.put("ab" + "0" * 62, torch.ones(2, 3, 4))
    assert not cache.has("ab" + "0" * 62)
    assert list((tmp_path / "cache").rglob("*")) == [tmp_path / "cache" / "ab"]


def test_cache_fsyncs_before_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    FeatureCache(tmp_path).put("cd" + "1" * 62, torch.ones(2, 2, 2))
    assert len(synced) == 1


def test_zero_length_and_truncated_entries(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    key = "ef" + "2" * 62
    cache.put(key, torch.rand(4, 3, 5))
    full = cache.path(key).read_bytes()
    cache.path(key).write_bytes(b"")  # what a power cut before the data reached the disk can leave
    assert not cache.has(key)
    cache.path(key).write_bytes(full[: len(full) // 2])
    assert cache.has(key)
    with pytest.raises(CacheEntryError, match=r"cannot be read"):
        cache.get(key)


def test_float16_overflow_is_stored_wider(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    fmap = torch.tensor([[[1.0, 70000.0], [3.0, 1e6]]])
    cache.put("aa" + "3" * 62, fmap)
    torch.testing.assert_close(cache.get("aa" + "3" * 62), fmap, rtol=0, atol=0)
    assert cache.widened == 1
    cache.put("bb" + "4" * 62, torch.tensor([[[1.0, FLOAT16_MAX]]]))
    assert torch.load(cache.path("bb" + "4" * 62)).dtype == torch.float16
    assert cache.widened == 1


def test_pool_cached_removes_corrupt_entries(photos: list[Path], tmp_path: Path) -> None:
    items = plan_items(inspect_images(photos[:3]), None, imsize=64, scales=[1.0], model=MODEL)[0]
    cache = FeatureCache(tmp_path)
    for it in items:
        cache.put(str(it.key), torch.rand(8, 2, 3))
    cache.path(str(items[1].key)).write_bytes(b"PK\x03\x04garbage")
    pool = torch.nn.AdaptiveAvgPool2d(1)
    desc, bad = pool_cached(items, cache, lambda x: pool(x).flatten(1))
    assert bad == [1]
    assert not cache.path(str(items[1].key)).exists()
    assert torch.all(desc[1] == 0)
    assert torch.all(desc[0] != 0)


# --------------------------------------------------------------------------------------------------------------
# Extraction: resume, pad canvas on resume, decode failures remembered, sampler
# --------------------------------------------------------------------------------------------------------------


def test_interrupted_extraction_resumes(photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items = plan_items(inspect_images(photos), None, imsize=96, scales=[1.0], model=MODEL)[0]
    cache = FeatureCache(tmp_path / "cache")
    net = mobilenet_v2(pretrained=False)
    real_put = FeatureCache.put
    calls = {"n": 0}

    def crash_after_three(self, key, fmap, **kw):
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        real_put(self, key, fmap, **kw)

    monkeypatch.setattr(FeatureCache, "put", crash_after_three)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_maps(_trainer(), net, items, cache, batch_size=2)
    assert sum(cache.has(str(it.key)) for it in items) == 3
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    written = []
    monkeypatch.setattr(
        FeatureCache, "put", lambda self, key, fmap, **kw: (written.append(key), real_put(self, key, fmap, **kw))
    )
    extract_maps(_trainer(), net, items, cache, batch_size=2)
    assert len(written) == len(items) - 3
    assert all(cache.has(str(it.key)) for it in items)


@pytest.mark.weights
def test_resumed_pad_extraction_pads_to_the_planned_canvas(photos: list[Path], tmp_path: Path) -> None:
    small = tmp_path / "small.jpg"
    with Image.open(photos[0]) as im:
        im.resize((im.width // 2, im.height // 3)).save(small)
    infos = inspect_images([photos[0], small, photos[5]])
    items = plan_items(infos, None, imsize=128, scales=[1.0], model=MODEL, batching="pad", batch_size=8)[0]
    net = mobilenet_v2(pretrained=True)
    full = FeatureCache(tmp_path / "full")
    extract_maps(_trainer(), net, items, full, batch_size=8)
    resumed = FeatureCache(tmp_path / "resumed")
    extract_maps(_trainer(), net, items[1:2], resumed, batch_size=8)  # only the small image is missing
    want = full.get(str(items[1].key))
    assert want.abs().sum() > 0
    # Same canvas, batch of 1 instead of 3: equal up to the kernels' float rounding (one float16 ulp here).
    torch.testing.assert_close(resumed.get(str(items[1].key)), want, rtol=1e-2, atol=2e-3)
    # and it is not the map the image gets alone (the padding is in its receptive field)
    alone = plan_items(infos[1:2], None, imsize=128, scales=[1.0], model=MODEL, batching="pad")[0]
    extract_maps(_trainer(), net, alone, resumed, batch_size=8)
    assert resumed.get(str(alone[0].key)).shape == full.get(str(items[1].key)).shape
    assert (resumed.get(str(alone[0].key)) - want).abs().max() > 0.1


def test_decode_failures_are_remembered(photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "trunc.jpg"
    bad.write_bytes(photos[0].read_bytes())
    truncate_image(bad)
    items = plan_items(inspect_images([photos[1], bad]), None, imsize=64, scales=[1.0], model=MODEL)[0]
    assert items[1].key is not None  # the header reads
    cache = FeatureCache(tmp_path / "cache")
    net = mobilenet_v2(pretrained=False)
    failures = extract_maps(_trainer(), net, items, cache, batch_size=2)
    assert list(failures) == [1]
    assert "truncated" in failures[1]
    predicted = []
    monkeypatch.setattr(pl.Trainer, "predict", lambda *a, **k: predicted.append(1))
    again = extract_maps(_trainer(), net, items, cache, batch_size=2)
    assert again == failures
    assert not predicted
    extract_maps(_trainer(), net, items, cache, batch_size=2, overwrite=True)
    assert predicted  # overwrite=true tries again


def test_size_bucket_sampler_exact_and_sharded() -> None:
    sizes = [(4, 5), (3, 3), (4, 5), (3, 3), (4, 5), (2, 2)]
    batches = list(SizeBucketSampler(sizes, 2))
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len({sizes[i] for i in b}) == 1 for b in batches)
    r0 = list(SizeBucketSampler(sizes, 2, rank=0, world_size=2))
    r1 = list(SizeBucketSampler(sizes, 2, rank=1, world_size=2))
    assert sorted(i for b in r0 + r1 for i in b) == list(range(6))
    assert list(SizeBucketSampler([(1, 1)], 2, rank=1, world_size=2)) == [[]]


def test_descriptor_store_matches_pooled_maps(photos: list[Path], tmp_path: Path) -> None:
    from deepagg import GeM

    items = plan_items(inspect_images(photos[:4]), None, imsize=96, scales=[1.0], model=MODEL)[0]
    net, pool = mobilenet_v2(pretrained=False), GeM(learnable=False).eval()
    maps = FeatureCache(tmp_path / "maps")
    extract_maps(_trainer(), net, items, maps, batch_size=2)
    from_maps, _ = pool_cached(items, maps, pool)
    descs = FeatureCache(tmp_path / "descs")
    keys = [f"{it.key[:60]}dddd" for it in items]  # any distinct keys
    extract_maps(_trainer(), net, items, descs, batch_size=2, pool=pool, keys=keys)
    from_descs, _ = pool_cached(items, descs, None, keys=keys)
    torch.testing.assert_close(from_descs, from_maps, rtol=1e-6, atol=1e-7)
    size = lambda c: sum(p.stat().st_size for p in c.root.rglob("*.pt"))  # noqa: E731
    assert size(descs) < size(maps)
