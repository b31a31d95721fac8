"""Tests of MAC, SPoC, GeM, R-MAC and CroW against float64 loop references (house-style section 8)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import deepagg
from deepagg import functional as F
from deepagg._checks import DTypeError, ShapeError
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
