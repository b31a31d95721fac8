"""Tests of aGaussian/eChannel co-weighting against a float64 loop reference of the paper's Algorithm 1."""

from __future__ import annotations

import math

import pytest
import torch

import deepagg
from deepagg import functional as F
from deepagg._checks import DTypeError, ShapeError
from deepagg.functional.coweight import CHANNEL_OPTIONS, SPATIAL_OPTIONS

from ._base import BaseTester

# --------------------------------------------------------------------------------------------------------------
# The reference: Algorithm 1 and eqs. 1-5 of arXiv 1803.07360 for one image (C, H, W), Python loops, float64.
# --------------------------------------------------------------------------------------------------------------


def ref_center(img: torch.Tensor, alpha: float) -> tuple[float, float]:
    c, h, w = img.shape
    s = [sum(float(img[k, f // w, f % w]) for k in range(c)) for f in range(h * w)]  # eq. 3, row-major
    count = max(1, math.floor(alpha * h * w + 0.5))  # round half-up (design.md 3.1)
    top = sorted(range(h * w), key=lambda f: (-s[f], f))[:count]  # ties: lower index
    return sum(f // w for f in top) / len(top), sum(f % w for f in top) / len(top)


def ref_coweight(
    img: torch.Tensor, alpha: float = 0.1, eps: float = 1e-12, spatial: str = "adaptive", channel: str = "echannel"
) -> torch.Tensor:
    c, h, w = img.shape
    if spatial == "adaptive":
        i0, j0 = ref_center(img, alpha)
    else:
        i0, j0 = (h - 1) / 2, (w - 1) / 2
    sigma = max(h, w) / 4

    def gauss(i: int, j: int) -> float:  # eq. 2
        if spatial == "none":
            return 1.0
        return math.exp(-((i - i0) ** 2 + (j - j0) ** 2) / (2 * sigma**2)) / (2 * math.pi * sigma**2)

    omega = [sum(float(img[k, i, j]) * gauss(i, j) for i in range(h) for j in range(w)) for k in range(c)]  # eq. 1
    if channel == "echannel":
        b = [(o / (w * h)) ** 2 for o in omega]  # eq. 4
        weight = [math.log((c * eps + sum(b)) / (eps + bk)) for bk in b]  # eq. 5
    elif channel == "sparsity":
        q = [sum(1 for i in range(h) for j in range(w) if float(img[k, i, j]) != 0) / (h * w) for k in range(c)]
        weight = [math.log(sum(q) / qk) if qk > 0 else 0.0 for qk in q]
    else:
        weight = [1.0] * c
    return torch.tensor([wk * o for wk, o in zip(weight, omega, strict=True)], dtype=torch.float64)


def _relu_maps(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(*shape, generator=g, dtype=torch.float64) + 0.4).to(dtype)


def _padded(
    sizes: list[tuple[int, int]], c: int, seed: int, garbage: str = "inf/nan"
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A padded batch, its mask and the images alone. Padding garbage: inf/nan, or finite values (large ones,
    which would win the top-alpha ranking and dominate Omega, and negative ones) that the CPU fast path reads
    and must weigh 0 instead of falling back to the zeroing path."""
    hh, ww = max(s[0] for s in sizes), max(s[1] for s in sizes)
    if garbage == "finite":
        x = torch.full((len(sizes), c, hh, ww), 1e3, dtype=torch.float64)
        x[:, :, -1, -1] = -5.0
    else:
        x = torch.full((len(sizes), c, hh, ww), float("nan"), dtype=torch.float64)
        x[:, :, -1, -1] = float("inf")
    mask = torch.zeros(len(sizes), hh, ww, dtype=torch.bool)
    singles = []
    for i, (h, w) in enumerate(sizes):
        img = _relu_maps(c, h, w, seed=seed + i)
        x[i, :, :h, :w] = img
        mask[i, :h, :w] = True
        singles.append(img[None])
    return x, mask, singles


OPTIONS = [(s, c) for s in SPATIAL_OPTIONS for c in CHANNEL_OPTIONS]


class TestAGaussianEChannel(BaseTester):
    def test_smoke(self, device: torch.device, dtype: torch.dtype) -> None:
        x = _relu_maps(2, 8, 6, 5, dtype=dtype).to(device)
        out = F.agaussian_echannel(x)
        assert out.shape == (2, 8)
        assert out.dtype == dtype
        assert out.device.type == device.type

    @pytest.mark.parametrize(("spatial", "channel"), OPTIONS)
    @pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5, 1.0])
    def test_reference(self, spatial: str, channel: str, alpha: float) -> None:
        x = _relu_maps(3, 6, 7, 9, seed=1)
        out = F.agaussian_echannel(x, alpha=alpha, spatial=spatial, channel=channel)
        ref = torch.stack([ref_coweight(img, alpha, spatial=spatial, channel=channel) for img in x])
        self.assert_close(out, ref)

    def test_reference_float32(self) -> None:
        x = _relu_maps(2, 32, 12, 16, seed=2, dtype=torch.float32)
        ref = torch.stack([ref_coweight(img.double()) for img in x])
        self.assert_close(F.agaussian_echannel(x), ref)

    @pytest.mark.parametrize("batch", [0, 1, 2])
    def test_cardinality(self, batch: int) -> None:
        x = _relu_maps(batch, 4, 3, 5)
        assert F.agaussian_echannel(x).shape == (batch, 4)
        assert deepagg.AGaussianEChannelPool()(x).shape == (batch, 4)
        mask = torch.ones(batch, 3, 5, dtype=torch.bool)
        assert F.agaussian_echannel(x, mask=mask).shape == (batch, 4)
        assert F.agaussian_center(x).shape == (batch, 2)

    def test_blob_center(self) -> None:
        x = torch.zeros(1, 3, 24, 32, dtype=torch.float64)
        x[0, :, 10:13, 20:23] = 5.0  # a 3 x 3 hot blob centred at (11, 21)
        x[0, 1] += 0.01  # faint background everywhere
        alpha = 9 / (24 * 32)
        torch.testing.assert_close(F.agaussian_center(x, alpha=alpha), torch.tensor([[11.0, 21.0]]).double())
        assert ref_center(x[0], alpha) == (11.0, 21.0)

    def test_ties_go_to_lower_flat_index(self) -> None:
        x = torch.zeros(1, 2, 4, 6, dtype=torch.float64)
        x[0, 0, 3, 0] = 1.0  # flat index 18
        x[0, 1, 0, 5] = 1.0  # flat index 5: same channel sum, lower index
        torch.testing.assert_close(F.agaussian_center(x, alpha=1 / 24), torch.tensor([[0.0, 5.0]]).double())
        # Two positions: both tied maxima.
        torch.testing.assert_close(F.agaussian_center(x, alpha=2 / 24), torch.tensor([[1.5, 2.5]]).double())
        # Three: the next position is the first zero in row-major order, (0, 0).
        torch.testing.assert_close(F.agaussian_center(x, alpha=3 / 24), torch.tensor([[1.0, 5 / 3]]).double())

    def test_small_alpha_uses_one_position(self) -> None:
        x = _relu_maps(1, 5, 5, 7, seed=3)
        assert math.floor(0.01 * 35 + 0.5) == 0
        flat = x[0].sum(0).flatten()
        best = int(flat.argmax())
        torch.testing.assert_close(
            F.agaussian_center(x, alpha=0.01), torch.tensor([[best // 7, best % 7]], dtype=torch.float64)
        )
        self.assert_close(F.agaussian_echannel(x, alpha=0.01), ref_coweight(x[0], 0.01)[None])

    @pytest.mark.parametrize("masked", [False, True])
    def test_round_half_up(self, masked: bool) -> None:
        # design.md 3.1: round is half-up, so 0.1 * 25 = 2.5 selects 3 positions (Python's round would give 2).
        x = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
        x[0, 0, 0, 0], x[0, 0, 4, 4], x[0, 0, 0, 1] = 3.0, 2.0, 1.0
        mask = None
        if masked:  # the same 5x5 image padded to 6x7: the count comes from the 25 valid cells
            x = torch.nn.functional.pad(x, (0, 2, 0, 1), value=9.0)
            mask = torch.zeros(1, 6, 7, dtype=torch.bool)
            mask[:, :5, :5] = True
        three = torch.tensor([[4 / 3, 5 / 3]]).double()
        torch.testing.assert_close(F.agaussian_center(x, alpha=0.1, mask=mask), three)
        # alpha * 25 = 2.25 rounds to 2: the two largest, (0, 0) and (4, 4).
        torch.testing.assert_close(F.agaussian_center(x, alpha=0.09, mask=mask), torch.tensor([[2.0, 2.0]]).double())
        if not masked:
            assert ref_center(x[0], 0.1) == (4 / 3, 5 / 3)

    @pytest.mark.parametrize("channel", CHANNEL_OPTIONS)
    def test_constant_map_or_full_alpha_is_centred(self, channel: str) -> None:
        const = torch.full((2, 4, 6, 9), 0.7, dtype=torch.float64)
        centred = F.agaussian_echannel(const, spatial="centred", channel=channel)
        self.assert_close(F.agaussian_echannel(const, alpha=1.0, channel=channel), centred)
        torch.testing.assert_close(F.agaussian_center(const, alpha=1.0), torch.tensor([[2.5, 4.0]] * 2).double())
        x = _relu_maps(2, 4, 6, 9, seed=4)
        self.assert_close(
            F.agaussian_echannel(x, alpha=1.0, channel=channel),
            F.agaussian_echannel(x, spatial="centred", channel=channel),
        )

    def test_echannel_smallest_weight_for_largest_omega(self) -> None:
        x = _relu_maps(3, 16, 7, 8, seed=5)
        x[:, 3] *= 10.0  # a bursty channel
        omega = F.agaussian_echannel(x, channel="none")
        weights = F.agaussian_echannel(x, channel="echannel") / omega
        assert torch.equal(weights.argmin(1), omega.argmax(1))
        assert torch.equal(omega.argmax(1), torch.full((3,), 3))
        # and the weights are the paper's eq. 5
        b = (omega / 56) ** 2
        self.assert_close(weights, torch.log((16e-12 + b.sum(1, keepdim=True)) / (1e-12 + b)))

    def test_sparsity_matches_crow_channel_weights(self) -> None:
        x = _relu_maps(2, 6, 5, 7, seed=6)
        x[:, 2] = 0.0  # an all-zero channel gets weight 0
        out = F.agaussian_echannel(x, spatial="none", channel="sparsity")
        q = (x != 0).double().mean(dim=(-2, -1))
        expected = torch.where(q > 0, torch.log(q.sum(1, keepdim=True) / q.clamp(min=1e-12)), 0.0) * x.sum((-2, -1))
        self.assert_close(out, expected)
        assert torch.all(out[:, 2] == 0)

    def test_spatial_none_is_sum_pooling(self) -> None:
        x = _relu_maps(2, 5, 4, 6, seed=7)
        self.assert_close(F.agaussian_echannel(x, spatial="none", channel="none"), x.sum(dim=(-2, -1)))

    def test_zero_image_gives_zero_vector(self) -> None:
        x = torch.zeros(2, 4, 3, 5)
        assert torch.equal(F.agaussian_echannel(x), torch.zeros(2, 4))
        assert torch.equal(deepagg.AGaussianEChannelPool()(x), torch.zeros(2, 4))

    @pytest.mark.parametrize(("spatial", "channel"), OPTIONS)
    def test_module_matches_functional(self, spatial: str, channel: str) -> None:
        x = _relu_maps(3, 8, 5, 6, seed=8, dtype=torch.float32)
        module = deepagg.AGaussianEChannelPool(alpha=0.2, spatial=spatial, channel=channel)
        expected = F.agaussian_echannel(x, alpha=0.2, spatial=spatial, channel=channel)
        self.assert_close(module(x), expected / expected.norm(dim=1, keepdim=True))
        self.assert_close(module(x).norm(dim=1), torch.ones(3))
        assert module.out_dim(8) == 8
        assert repr(module) == f"AGaussianEChannelPool(alpha=0.2, eps=1e-12, spatial='{spatial}', channel='{channel}')"
        assert deepagg.nn.AGaussianEChannelPool is deepagg.AGaussianEChannelPool

    def test_sequential_with_backbone(self) -> None:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), deepagg.AGaussianEChannelPool())
        assert net(torch.rand(2, 3, 12, 10)).shape == (2, 8)

    @pytest.mark.parametrize("garbage", ["inf/nan", "finite"])
    @pytest.mark.parametrize(("spatial", "channel"), OPTIONS)
    @pytest.mark.parametrize("alpha", [0.1, 1.0])
    def test_padded_batch_equals_single_images(self, spatial: str, channel: str, alpha: float, garbage: str) -> None:
        sizes = [(6, 9), (4, 9), (6, 5), (3, 3), (5, 7), (5, 5)]  # 0.1 * 25 = 2.5: round half-up
        x, mask, singles = _padded(sizes, 5, seed=20, garbage=garbage)
        out = F.agaussian_echannel(x, alpha=alpha, mask=mask, spatial=spatial, channel=channel)
        alone = torch.cat([F.agaussian_echannel(s, alpha=alpha, spatial=spatial, channel=channel) for s in singles])
        assert torch.isfinite(out).all()
        self.assert_close(out, alone)
        centers = F.agaussian_center(x, alpha=alpha, mask=mask)
        self.assert_close(centers, torch.cat([F.agaussian_center(s, alpha=alpha) for s in singles]))

    def test_padded_reference_and_ties_in_padding(self) -> None:
        # Padding of value 0 must not win ties against valid zeros of lower index in the padded grid.
        sizes = [(3, 4), (5, 6)]
        x, mask, singles = _padded(sizes, 3, seed=30)
        x = torch.where(mask[:, None], x, 0.0)
        x[0] = 0.0  # an all-zero valid region: every position tied
        singles[0] = torch.zeros_like(singles[0])
        for alpha in (0.05, 0.3, 1.0):
            out = F.agaussian_echannel(x, alpha=alpha, mask=mask)
            self.assert_close(out, torch.stack([ref_coweight(s[0], alpha) for s in singles]))
            self.assert_close(
                F.agaussian_center(x, alpha=alpha, mask=mask),
                torch.tensor([ref_center(s[0], alpha) for s in singles], dtype=torch.float64),
            )

    @pytest.mark.parametrize("garbage", [1e3, float("inf"), float("nan")])
    @pytest.mark.parametrize(("spatial", "channel"), OPTIONS)
    def test_holes_fast_path_equals_zeroing_path(self, spatial: str, channel: str, garbage: float) -> None:
        # Masks with holes (not a padded rectangle): the CPU fast path without autograd reads the masked
        # positions (weight 0; inf/nan there falls back to zeroing) and must equal the autograd path, which
        # zeroes them first.
        g = torch.Generator().manual_seed(41)
        x = _relu_maps(4, 6, 7, 8, seed=40)
        mask = torch.rand(4, 7, 8, generator=g) > 0.4
        mask[:, 0, 0] = True
        x = torch.where(mask[:, None], x, garbage)
        out = F.agaussian_echannel(x, mask=mask, spatial=spatial, channel=channel)
        ref = F.agaussian_echannel(x.clone().requires_grad_(), mask=mask, spatial=spatial, channel=channel)
        assert torch.isfinite(out).all()
        self.assert_close(out, ref.detach())

    def test_full_mask_equals_no_mask(self) -> None:
        x = _relu_maps(2, 5, 6, 7, seed=9)
        mask = torch.ones(2, 6, 7, dtype=torch.bool)
        torch.testing.assert_close(F.agaussian_echannel(x, mask=mask), F.agaussian_echannel(x))

    def test_blocked_batch_equals_single_images(self) -> None:
        # 512 x 24 x 32 float32 maps: the CPU path runs blocks of a few images; the results cannot depend on it.
        x = _relu_maps(7, 512, 24, 32, seed=10, dtype=torch.float32)
        out = F.agaussian_echannel(x)
        alone = torch.cat([F.agaussian_echannel(img[None]) for img in x])
        torch.testing.assert_close(out, alone, rtol=1e-6, atol=0.0)

    def test_noncontiguous(self) -> None:
        x = _relu_maps(2, 6, 5, 7, seed=11)
        y = self.noncontiguous(x)
        self.assert_close(F.agaussian_echannel(y), F.agaussian_echannel(x))
        cl = x.to(memory_format=torch.channels_last)
        self.assert_close(F.agaussian_echannel(cl), F.agaussian_echannel(x))

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
    def test_dtype_preserved(self, dt: torch.dtype) -> None:
        x = _relu_maps(2, 6, 5, 7, seed=12, dtype=dt)
        assert F.agaussian_echannel(x).dtype == dt
        assert deepagg.AGaussianEChannelPool()(x).dtype == dt
        ref = torch.stack([ref_coweight(img.double()) for img in x])
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dt, 1e-6)
        torch.testing.assert_close(F.agaussian_echannel(x).double(), ref, rtol=tol, atol=0.0)

    @pytest.mark.parametrize(("spatial", "channel"), OPTIONS)
    def test_gradcheck(self, spatial: str, channel: str) -> None:
        x = (torch.rand(2, 3, 5, 4, dtype=torch.float64) + 0.1).requires_grad_()
        assert self.gradcheck(lambda t: F.agaussian_echannel(t, alpha=0.2, spatial=spatial, channel=channel), (x,))

    def test_gradcheck_masked_module(self) -> None:
        x = (torch.rand(2, 3, 5, 4, dtype=torch.float64) + 0.1).requires_grad_()
        mask = torch.ones(2, 5, 4, dtype=torch.bool)
        mask[1, 3:] = False
        mask[1, :, 2:] = False
        pool = deepagg.AGaussianEChannelPool(alpha=0.3)
        assert self.gradcheck(lambda t: pool(t, mask), (x,))
        # Padding gets no gradient.
        pool(x, mask).sum().backward()
        assert torch.all(x.grad[1][:, ~mask[1]] == 0)

    def test_center_has_no_gradient(self) -> None:
        x = _relu_maps(1, 3, 4, 5, seed=13).requires_grad_()
        assert not F.agaussian_center(x).requires_grad

    def test_compile(self) -> None:
        x = _relu_maps(3, 6, 5, 7, seed=14, dtype=torch.float32)
        module = deepagg.AGaussianEChannelPool()
        self.assert_close(torch.compile(module, backend="eager", fullgraph=True)(x), module(x))
        mask = torch.ones(3, 5, 7, dtype=torch.bool)
        mask[0, 3:] = False
        compiled = torch.compile(lambda t, m: F.agaussian_echannel(t, mask=m), backend="eager", fullgraph=True)
        self.assert_close(compiled(x, mask), F.agaussian_echannel(x, mask=mask))

    def test_export(self) -> None:
        x = _relu_maps(2, 4, 6, 5, seed=15, dtype=torch.float32)
        module = deepagg.AGaussianEChannelPool().eval()
        self.assert_close(torch.export.export(module, (x,)).module()(x), module(x))

    def test_exception(self) -> None:
        fn = "agaussian_echannel"
        x = torch.rand(2, 3, 4, 5)
        for alpha in (0.0, -0.1, 1.5, float("nan"), True, "0.1"):
            with pytest.raises(ValueError, match=rf"{fn}\(\): alpha must be a float in \(0, 1\]; got {alpha!r}"):
                F.agaussian_echannel(x, alpha=alpha)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"agaussian_center\(\): alpha must be a float in \(0, 1\]; got 2"):
            F.agaussian_center(x, alpha=2)
        for eps in (0.0, -1e-12, float("inf")):
            with pytest.raises(ValueError, match=rf"{fn}\(\): eps must be a finite float > 0; got {eps!r}"):
                F.agaussian_echannel(x, eps=eps)
        with pytest.raises(
            ValueError,
            match=r"agaussian_echannel\(\): spatial must be one of \('adaptive', 'centred', 'none'\); got 'center'",
        ):
            F.agaussian_echannel(x, spatial="center")
        with pytest.raises(
            ValueError,
            match=r"agaussian_echannel\(\): channel must be one of \('echannel', 'sparsity', 'none'\); got 'idf'",
        ):
            F.agaussian_echannel(x, channel="idf")
        with pytest.raises(ShapeError, match=rf"{fn}\(\): x must have shape \(B, C, H, W\); got \(2, 3, 7\) with 3"):
            F.agaussian_echannel(torch.rand(2, 3, 7))
        with pytest.raises(DTypeError, match=rf"{fn}\(\): x must be a floating-point tensor; got dtype torch.int64"):
            F.agaussian_echannel(torch.ones(1, 2, 3, 3, dtype=torch.long))
        with pytest.raises(ShapeError, match=rf"{fn}\(\): mask must have shape \(B, H, W\) with W=5; got \(2, 4, 4\)"):
            F.agaussian_echannel(x, mask=torch.ones(2, 4, 4, dtype=torch.bool))
        with pytest.raises(DTypeError, match=rf"{fn}\(\): mask must have dtype in \[torch.bool\]; got torch.float32"):
            F.agaussian_echannel(x, mask=torch.ones(2, 4, 5))
        empty = torch.ones(2, 4, 5, dtype=torch.bool)
        empty[1] = False
        with pytest.raises(RuntimeError, match=rf"{fn}\(\): mask must have at least one True position per image"):
            F.agaussian_echannel(x, mask=empty)

    def test_module_exception(self) -> None:
        name = "AGaussianEChannelPool"
        with pytest.raises(ValueError, match=rf"{name}\(\): alpha must be a float in \(0, 1\]; got 0"):
            deepagg.AGaussianEChannelPool(alpha=0)
        with pytest.raises(ValueError, match=rf"{name}\(\): eps must be a finite float > 0; got -1.0"):
            deepagg.AGaussianEChannelPool(eps=-1.0)
        with pytest.raises(ValueError, match=rf"{name}\(\): spatial must be one of .*; got 'gauss'"):
            deepagg.AGaussianEChannelPool(spatial="gauss")
        with pytest.raises(ValueError, match=rf"{name}\(\): channel must be one of .*; got None"):
            deepagg.AGaussianEChannelPool(channel=None)  # type: ignore[arg-type]
        with pytest.raises(ShapeError, match=r"agaussian_echannel\(\): x must have shape \(B, C, H, W\)"):
            deepagg.AGaussianEChannelPool()(torch.rand(3, 4))
