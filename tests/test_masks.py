"""Tests of the selective MAX, SUM and SIFT masks (Hoang et al., ACM MM 2017, sec. 3.2).

MAX and SUM are compared with float64 Python-loop references of eqs. 2 and 3; SIFT's mapping and dilation are
checked against a literal loop over the detector's own keypoints. The real-photo test is marked ``debian``: it
needs the ``darknet`` Debian package (``apt-get download``, cached as in ``tests/test_data_clutter.py``) and is
skipped where apt-get is not on PATH.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import kornia
import pytest
import torch

from deepagg._checks import DeviceError, DTypeError, ShapeError
from deepagg.data import fetch_debs
from deepagg.data.revisitop import read_image
from deepagg.data.sources import SCENE_FILES, DebianSourceError
from deepagg.functional.masks import _sift_keypoints, max_mask, sift_mask, sum_mask

from ._base import BaseTester

# --------------------------------------------------------------------------------------------------------------
# References: one image (C, H, W), Python loops in float64; ``valid`` (H, W) bool or None.
# --------------------------------------------------------------------------------------------------------------


def ref_max_mask(img: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    c, h, w = img.shape
    vals = img.double().tolist()
    ok = [[True] * w for _ in range(h)] if valid is None else valid.tolist()
    out = torch.zeros(h, w, dtype=torch.bool)
    for k in range(c):
        best, pos = None, None
        for i in range(h):  # row-major: a later equal value does not replace the first maximum
            for j in range(w):
                if ok[i][j] and (best is None or vals[k][i][j] > best):
                    best, pos = vals[k][i][j], (i, j)
        if best is not None and best != 0:  # an all-zero channel selects nothing
            out[pos] = True
    return out


def ref_sum_mask(img: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    c, h, w = img.shape
    vals = img.double().tolist()
    ok = [[True] * w for _ in range(h)] if valid is None else valid.tolist()
    sums = [[sum(vals[k][i][j] for k in range(c)) for j in range(w)] for i in range(h)]
    valid_sums = sorted(sums[i][j] for i in range(h) for j in range(w) if ok[i][j])
    out = torch.zeros(h, w, dtype=torch.bool)
    if not valid_sums:
        return out
    median = valid_sums[(len(valid_sums) - 1) // 2]  # the lower median
    for i in range(h):
        for j in range(w):
            out[i, j] = ok[i][j] and sums[i][j] >= median
    return out


def ref_sift_mask(
    xy: torch.Tensor,
    keep: torch.Tensor,
    image_hw: tuple[int, int],
    feature_hw: tuple[int, int],
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Literal loop: each kept keypoint's covering cell, dilated to its clipped 3 x 3 block; all (valid) if none.

    With ``valid`` (h, w), keypoints whose cell is padding are dropped and padded cells are never selected.
    """
    (height, width), (h, w) = image_hw, feature_hw
    ok = [[True] * w for _ in range(h)] if valid is None else valid.tolist()
    out = torch.zeros(h, w, dtype=torch.bool)
    found = False
    for (x, y), k in zip(xy.tolist(), keep.tolist(), strict=True):
        row = min(max(math.floor((y + 0.5) * h / height), 0), h - 1)
        col = min(max(math.floor((x + 0.5) * w / width), 0), w - 1)
        if not k or not ok[row][col]:
            continue
        found = True
        for i in range(row - 1, row + 2):
            for j in range(col - 1, col + 2):
                if 0 <= i < h and 0 <= j < w and ok[i][j]:
                    out[i, j] = True
    return out if found else torch.tensor(ok, dtype=torch.bool)


def _maps(b: int, c: int, h: int, w: int, seed: int, *, ties: bool = False) -> torch.Tensor:
    """Post-ReLU-like float64 maps with some all-zero channels; ``ties``: small integers (many equal values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (b, c, h, w), generator=g).double() if ties else torch.randn(b, c, h, w, generator=g)
    x = x.double().clamp(min=0)
    x[:, ::3] = 0.0  # every third channel is all zero
    return x


def _padded(
    sizes: list[tuple[int, int]], c: int, seed: int, *, ties: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A padded batch (inf/nan garbage in the padding), its mask and the images alone."""
    hh, ww = max(s[0] for s in sizes), max(s[1] for s in sizes)
    x = torch.full((len(sizes), c, hh, ww), float("nan"), dtype=torch.float64)
    x[:, :, -1, -1] = float("inf")
    x[:, 1, -1, :] = float("inf")
    mask = torch.zeros(len(sizes), hh, ww, dtype=torch.bool)
    singles = []
    for i, (h, w) in enumerate(sizes):
        img = _maps(1, c, h, w, seed=seed + i, ties=ties)
        x[i, :, :h, :w] = img[0]
        mask[i, :h, :w] = True
        singles.append(img)
    return x, mask, singles


SHAPES = [(0, 5, 3, 4), (1, 6, 4, 7), (3, 8, 5, 3), (3, 12, 6, 9)]


# --------------------------------------------------------------------------------------------------------------
# MAX mask
# --------------------------------------------------------------------------------------------------------------


class TestMaxMask(BaseTester):
    def test_smoke(self, device: torch.device, dtype: torch.dtype) -> None:
        x = _maps(2, 6, 4, 5, seed=0).to(device=device, dtype=dtype)
        out = max_mask(x)
        assert out.shape == (2, 4, 5)
        assert out.dtype == torch.bool
        assert out.device.type == device.type

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("ties", [False, True])
    def test_reference(self, shape: tuple[int, int, int, int], ties: bool) -> None:
        x = _maps(*shape, seed=1, ties=ties)
        expected = torch.stack([ref_max_mask(img) for img in x]) if shape[0] else torch.zeros(0, *shape[2:]).bool()
        assert torch.equal(max_mask(x), expected)

    @pytest.mark.parametrize("batch", [0, 1, 2])
    def test_cardinality(self, batch: int) -> None:
        x = _maps(batch, 4, 3, 5, seed=2)
        assert max_mask(x).shape == (batch, 3, 5)
        assert max_mask(x, mask=torch.ones(batch, 3, 5, dtype=torch.bool)).shape == (batch, 3, 5)
        assert max_mask(torch.rand(batch, 4, 0, 5)).shape == (batch, 0, 5)

    def test_ties_go_to_lower_flat_index(self) -> None:
        x = torch.zeros(1, 1, 3, 4)
        x[0, 0, 0, 3] = 2.0  # flat index 3
        x[0, 0, 2, 0] = 2.0  # flat index 8; column-major (the authors' MATLAB) would pick this one
        expected = torch.zeros(1, 3, 4, dtype=torch.bool)
        expected[0, 0, 3] = True
        assert torch.equal(max_mask(x), expected)
        # A constant channel: every position tied, (0, 0) wins.
        expected = torch.zeros(1, 3, 4, dtype=torch.bool)
        expected[0, 0, 0] = True
        assert torch.equal(max_mask(torch.full((1, 1, 3, 4), 0.5)), expected)

    def test_zero_channel_selects_nothing(self) -> None:
        x = torch.zeros(1, 3, 4, 5)
        x[0, 1, 2, 3] = 1.0
        expected = torch.zeros(1, 4, 5, dtype=torch.bool)
        expected[0, 2, 3] = True
        assert torch.equal(max_mask(x), expected)  # channels 0 and 2 (all zero) select nothing, not (0, 0)

    def test_all_zero_map_is_empty(self) -> None:
        assert not max_mask(torch.zeros(2, 8, 3, 4)).any()

    def test_union_over_channels(self) -> None:
        x = torch.zeros(1, 4, 3, 3)
        for k, (i, j) in enumerate([(0, 1), (2, 2), (0, 1), (1, 0)]):
            x[0, k, i, j] = k + 1.0
        assert max_mask(x)[0].nonzero().tolist() == [[0, 1], [1, 0], [2, 2]]

    @pytest.mark.parametrize("ties", [False, True])
    def test_padded_batch_equals_single_images(self, ties: bool) -> None:
        sizes = [(5, 7), (3, 7), (5, 4), (2, 2), (4, 6)]
        x, mask, singles = _padded(sizes, 7, seed=10, ties=ties)
        out = max_mask(x, mask=mask)
        for i, (single, (h, w)) in enumerate(zip(singles, sizes, strict=True)):
            assert torch.equal(out[i, :h, :w], max_mask(single)[0])
            assert torch.equal(out[i, :h, :w], ref_max_mask(single[0]))
        assert not out[~mask].any()
        assert torch.equal(out, torch.stack([ref_max_mask(img, m) for img, m in zip(x, mask, strict=True)]))

    def test_empty_image_mask_selects_nothing(self) -> None:
        x, mask, _ = _padded([(3, 4), (2, 3)], 4, seed=11)
        mask[1] = False
        assert not max_mask(x, mask=mask)[1].any()

    def test_full_mask_equals_no_mask(self) -> None:
        x = _maps(3, 6, 4, 5, seed=12, ties=True)
        assert torch.equal(max_mask(x, mask=torch.ones(3, 4, 5, dtype=torch.bool)), max_mask(x))

    def test_noncontiguous(self) -> None:
        x = _maps(2, 6, 5, 7, seed=13, ties=True)
        y = self.noncontiguous(x)
        assert not y.is_contiguous()
        assert torch.equal(max_mask(y), max_mask(x))
        assert torch.equal(max_mask(x.to(memory_format=torch.channels_last)), max_mask(x))
        mask = torch.ones(2, 7, 5, dtype=torch.bool).transpose(1, 2)
        assert torch.equal(max_mask(y, mask=mask), max_mask(x))

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
    def test_dtype(self, dt: torch.dtype) -> None:
        x = _maps(3, 6, 4, 5, seed=14, ties=True)  # small integers: exact in every dtype
        out = max_mask(x.to(dt))
        assert out.dtype == torch.bool
        assert torch.equal(out, torch.stack([ref_max_mask(img) for img in x]))

    def test_no_gradient(self) -> None:
        x = _maps(2, 3, 4, 5, seed=15).requires_grad_()
        out = max_mask(x)
        assert not out.requires_grad
        assert out.dtype == torch.bool

    def test_compile(self) -> None:
        x = _maps(3, 6, 5, 7, seed=16, ties=True).float()
        compiled = torch.compile(max_mask, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), max_mask(x))
        xp, mask, _ = _padded([(5, 7), (3, 4)], 6, seed=17)
        masked = torch.compile(lambda t, m: max_mask(t, mask=m), backend="eager", fullgraph=True)
        assert torch.equal(masked(xp, mask), max_mask(xp, mask=mask))

    def test_exception(self) -> None:
        x = torch.rand(2, 3, 4, 5)
        with pytest.raises(
            ShapeError,
            match=r"max_mask\(\): x must have shape \(B, C, H, W\); got \(3, 4, 5\) with 3 dims\. Pass feature maps",
        ):
            max_mask(torch.rand(3, 4, 5))
        with pytest.raises(
            DTypeError, match=r"max_mask\(\): x must be a floating-point tensor; got dtype torch\.int64"
        ):
            max_mask(torch.ones(1, 2, 3, 3, dtype=torch.long))
        with pytest.raises(
            ShapeError, match=r"max_mask\(\): mask must have shape \(B, H, W\) with W=5; got \(2, 4, 4\)\."
        ):
            max_mask(x, mask=torch.ones(2, 4, 4, dtype=torch.bool))
        with pytest.raises(
            ShapeError, match=r"max_mask\(\): mask must have shape \(B, H, W\) with B=2; got \(1, 4, 5\)\."
        ):
            max_mask(x, mask=torch.ones(1, 4, 5, dtype=torch.bool))
        with pytest.raises(
            DTypeError, match=r"max_mask\(\): mask must have dtype in \[torch\.bool\]; got torch\.uint8"
        ):
            max_mask(x, mask=torch.ones(2, 4, 5, dtype=torch.uint8))
        with pytest.raises(
            TypeError, match=r"max_mask\(\): x must be a torch\.Tensor of shape \(B, C, H, W\); got list"
        ):
            max_mask([[1.0]])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# SUM mask
# --------------------------------------------------------------------------------------------------------------


class TestSumMask(BaseTester):
    def test_smoke(self, device: torch.device, dtype: torch.dtype) -> None:
        x = _maps(2, 6, 4, 5, seed=20).to(device=device, dtype=dtype)
        out = sum_mask(x)
        assert out.shape == (2, 4, 5)
        assert out.dtype == torch.bool
        assert out.device.type == device.type

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("ties", [False, True])
    def test_reference(self, shape: tuple[int, int, int, int], ties: bool) -> None:
        x = _maps(*shape, seed=21, ties=ties)
        expected = torch.stack([ref_sum_mask(img) for img in x]) if shape[0] else torch.zeros(0, *shape[2:]).bool()
        assert torch.equal(sum_mask(x), expected)

    @pytest.mark.parametrize("batch", [0, 1, 2])
    def test_cardinality(self, batch: int) -> None:
        x = _maps(batch, 4, 3, 5, seed=22)
        assert sum_mask(x).shape == (batch, 3, 5)
        assert sum_mask(x, mask=torch.ones(batch, 3, 5, dtype=torch.bool)).shape == (batch, 3, 5)
        assert sum_mask(torch.rand(batch, 4, 5, 0)).shape == (batch, 5, 0)

    def test_even_count_uses_lower_median(self) -> None:
        # Sums 1, 2, 3, 4: the lower median is 2, so 3 positions are kept (MATLAB's prctile(., 50) = 2.5 keeps 2).
        x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        assert torch.equal(sum_mask(x), torch.tensor([[[False, True], [True, True]]]))
        assert int(sum_mask(torch.arange(1.0, 7.0).view(1, 1, 2, 3)).sum()) == 4  # 1..6: median 3 keeps 3..6

    def test_odd_count(self) -> None:
        x = torch.arange(9.0).flip(0).view(1, 1, 3, 3)  # sums 8..0: median 4 keeps 8..4
        assert sum_mask(x)[0].flatten().tolist() == [True] * 5 + [False] * 4

    def test_sums_over_channels(self) -> None:
        x = torch.zeros(1, 2, 1, 4)
        x[0, 0] = torch.tensor([4.0, 0.0, 1.0, 0.0])
        x[0, 1] = torch.tensor([0.0, 3.0, 1.0, 1.0])  # sums 4, 3, 2, 1: median 2
        assert sum_mask(x)[0, 0].tolist() == [True, True, True, False]

    def test_ties_at_the_median_are_kept(self) -> None:
        x = torch.zeros(1, 3, 3, 3)
        x[0, :, 0, :2] = 1.0  # 2 positive sums, 7 zeros: the median is 0 and every position is kept
        assert sum_mask(x).all()
        x = torch.zeros(1, 1, 2, 3)
        x[0, 0] = torch.tensor([[1.0, 2.0, 2.0], [2.0, 5.0, 0.0]])  # sorted 0 1 2 2 2 5: median 2, three tied
        assert sum_mask(x)[0].tolist() == [[False, True, True], [True, True, False]]

    def test_all_zero_map_keeps_everything(self) -> None:
        assert sum_mask(torch.zeros(2, 4, 3, 5)).all()

    @pytest.mark.parametrize("ties", [False, True])
    def test_padded_batch_equals_single_images(self, ties: bool) -> None:
        sizes = [(5, 7), (3, 7), (5, 4), (2, 2), (4, 6), (1, 1)]
        x, mask, singles = _padded(sizes, 7, seed=30, ties=ties)
        out = sum_mask(x, mask=mask)
        for i, (single, (h, w)) in enumerate(zip(singles, sizes, strict=True)):
            assert torch.equal(out[i, :h, :w], sum_mask(single)[0])
            assert torch.equal(out[i, :h, :w], ref_sum_mask(single[0]))
        assert not out[~mask].any()
        assert torch.equal(out, torch.stack([ref_sum_mask(img, m) for img, m in zip(x, mask, strict=True)]))

    def test_padding_zeros_do_not_move_the_median(self) -> None:
        # Valid sums 1..4 in a 3 x 3 grid padded with zeros: the median is that of the 4 valid sums (2).
        x = torch.zeros(1, 1, 3, 3)
        x[0, 0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        mask = torch.zeros(1, 3, 3, dtype=torch.bool)
        mask[0, :2, :2] = True
        assert sum_mask(x, mask=mask)[0].tolist() == [[False, True, False], [True, True, False], [False] * 3]

    def test_empty_image_mask_selects_nothing(self) -> None:
        x, mask, _ = _padded([(3, 4), (2, 3)], 4, seed=31)
        mask[1] = False
        out = sum_mask(x, mask=mask)
        assert not out[1].any()
        assert out[0].any()

    def test_full_mask_equals_no_mask(self) -> None:
        x = _maps(3, 6, 4, 5, seed=32, ties=True)
        assert torch.equal(sum_mask(x, mask=torch.ones(3, 4, 5, dtype=torch.bool)), sum_mask(x))

    def test_noncontiguous(self) -> None:
        x = _maps(2, 6, 5, 7, seed=33)
        y = self.noncontiguous(x)
        assert not y.is_contiguous()
        assert torch.equal(sum_mask(y), sum_mask(x))
        assert torch.equal(sum_mask(x.to(memory_format=torch.channels_last)), sum_mask(x))
        mask = torch.ones(2, 7, 5, dtype=torch.bool).transpose(1, 2)
        assert torch.equal(sum_mask(y, mask=mask), sum_mask(x))

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
    def test_dtype(self, dt: torch.dtype) -> None:
        # 200 channels of small integers: sums up to 400, beyond float16/bfloat16 accumulation of the integers
        # (bfloat16 holds no odd integer above 256), so the sums must be taken in float32.
        g = torch.Generator().manual_seed(34)
        x = torch.randint(0, 3, (2, 200, 4, 5), generator=g).double()
        out = sum_mask(x.to(dt))
        assert out.dtype == torch.bool
        assert torch.equal(out, torch.stack([ref_sum_mask(img) for img in x]))

    def test_no_gradient(self) -> None:
        x = _maps(2, 3, 4, 5, seed=35).requires_grad_()
        out = sum_mask(x)
        assert not out.requires_grad
        assert out.dtype == torch.bool

    def test_compile(self) -> None:
        x = _maps(3, 6, 5, 7, seed=36).float()
        compiled = torch.compile(sum_mask, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), sum_mask(x))
        xp, mask, _ = _padded([(5, 7), (3, 4)], 6, seed=37)
        masked = torch.compile(lambda t, m: sum_mask(t, mask=m), backend="eager", fullgraph=True)
        assert torch.equal(masked(xp, mask), sum_mask(xp, mask=mask))

    def test_exception(self) -> None:
        x = torch.rand(2, 3, 4, 5)
        with pytest.raises(
            ShapeError,
            match=r"sum_mask\(\): x must have shape \(B, C, H, W\); got \(2, 3, 4, 5, 1\) with 5 dims\. Pass feature",
        ):
            sum_mask(torch.rand(2, 3, 4, 5, 1))
        with pytest.raises(DTypeError, match=r"sum_mask\(\): x must be a floating-point tensor; got dtype torch\.bool"):
            sum_mask(torch.ones(1, 2, 3, 3, dtype=torch.bool))
        with pytest.raises(
            ShapeError, match=r"sum_mask\(\): mask must have shape \(B, H, W\) with H=4; got \(2, 5, 5\)\."
        ):
            sum_mask(x, mask=torch.ones(2, 5, 5, dtype=torch.bool))
        with pytest.raises(ShapeError, match=r"sum_mask\(\): mask must have shape \(B, H, W\); got \(2, 4\) with 2"):
            sum_mask(x, mask=torch.ones(2, 4, dtype=torch.bool))
        with pytest.raises(
            DTypeError, match=r"sum_mask\(\): mask must have dtype in \[torch\.bool\]; got torch\.float32"
        ):
            sum_mask(x, mask=torch.ones(2, 4, 5))


# --------------------------------------------------------------------------------------------------------------
# SIFT mask
# --------------------------------------------------------------------------------------------------------------


def _blobs(h: int, w: int, centres: list[tuple[float, float]], sigma: float = 3.0) -> torch.Tensor:
    """A gray image (1, 1, h, w) in [0, 1]: a flat background with a bright Gaussian blob at each (x, y)."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    img = torch.full((h, w), 0.2)
    for x, y in centres:
        img = img + 0.6 * torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return img[None, None]


def _texture(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smoothed noise images (b, 1, h, w) in [0, 1] with many DoG keypoints."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.avg_pool2d(torch.rand(b, 1, h, w, generator=g), 5, stride=1, padding=2)


def _reference(images: torch.Tensor, feature_hw: tuple[int, int], mask: torch.Tensor | None = None) -> torch.Tensor:
    xy, keep = _sift_keypoints(images)
    hw = (images.shape[-2], images.shape[-1])
    valid = [None] * len(images) if mask is None else list(mask)
    return torch.stack([ref_sift_mask(p, k, hw, feature_hw, m) for p, k, m in zip(xy, keep, valid, strict=True)])


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    """The darknet package's photos (Debian), downloaded once into the persistent user cache."""
    try:
        roots = fetch_debs(["darknet"])
    except DebianSourceError as exc:
        if shutil.which("apt-get") is None and not os.environ.get("DEEPAGG_REQUIRE_DEBIAN"):
            pytest.skip(f"needs the darknet Debian package and apt-get is not on PATH: {exc}")
        raise
    return [roots["darknet"] / rel for rel in SCENE_FILES["darknet"]]


class TestSiftMask(BaseTester):
    def test_smoke(self, device: torch.device) -> None:
        images = _texture(2, 64, 96, seed=0).to(device)
        out = sift_mask(images, (4, 6))
        assert out.shape == (2, 4, 6)
        assert out.dtype == torch.bool
        assert out.device.type == device.type

    @pytest.mark.debian
    def test_real_photos(self, photos: list[Path]) -> None:
        # Two different photos resized to 384 x 288 (dog.jpg is 4:3, horses.jpg 3:2), on an 18 x 24 grid (stride 16).
        chosen = [p for p in photos if p.name in ("dog.jpg", "horses.jpg")]
        assert len(chosen) == 2
        images = torch.cat(
            [
                torch.nn.functional.interpolate(
                    read_image(p)[None].float() / 255, size=(288, 384), mode="bilinear", antialias=True
                )
                for p in chosen
            ]
        )
        images = images.clamp(0, 1)
        out = sift_mask(images, (18, 24))
        assert out.shape == (2, 18, 24)
        kept = out.sum(dim=(1, 2))
        assert torch.all(kept >= 1)
        assert torch.all(kept < 18 * 24)  # fewer than mask "none" keeps
        assert not torch.equal(out[0], out[1])
        assert torch.equal(out, _reference(images, (18, 24)))

    @pytest.mark.parametrize("channels", [1, 3])
    def test_blank_image_keeps_everything(self, channels: int) -> None:
        blank = torch.full((2, channels, 64, 96), 0.5)
        assert sift_mask(blank, (4, 6)).all()
        _, keep = _sift_keypoints(blank)
        assert not keep.any()
        mask = torch.ones(2, 4, 6, dtype=torch.bool)
        mask[0, 3:] = False
        mask[1, :, 4:] = False
        assert torch.equal(sift_mask(blank, (4, 6), mask=mask), mask)

    @pytest.mark.parametrize(
        ("centre", "feature_hw", "cell"),
        [
            ((70.0, 40.0), (6, 8), (2, 4)),  # interior: a full 3 x 3 block
            ((47.3, 31.6), (6, 8), (2, 2)),  # sub-pixel centre
            ((18.0, 18.0), (3, 4), (0, 0)),  # corner cell: the block is clipped to 2 x 2
            ((100.0, 70.0), (6, 8), (4, 6)),
            ((100.0, 40.0), (3, 4), (1, 3)),  # right border: clipped to 3 x 2
        ],
    )
    def test_single_blob_gives_its_block(
        self, centre: tuple[float, float], feature_hw: tuple[int, int], cell: tuple[int, int]
    ) -> None:
        image = _blobs(96, 128, [centre])
        xy, keep = _sift_keypoints(image)
        assert int(keep.sum()) == 1
        torch.testing.assert_close(xy[keep], torch.tensor([centre]), atol=0.05, rtol=0.0)
        h, w = feature_hw
        expected = torch.zeros(1, h, w, dtype=torch.bool)
        expected[0, max(cell[0] - 1, 0) : cell[0] + 2, max(cell[1] - 1, 0) : cell[1] + 2] = True
        out = sift_mask(image, feature_hw)
        assert torch.equal(out, expected)
        assert torch.equal(out, _reference(image, feature_hw))

    @pytest.mark.parametrize("feature_hw", [(6, 8), (12, 16), (5, 7), (24, 32), (1, 1)])
    def test_reference(self, feature_hw: tuple[int, int]) -> None:
        images = _texture(2, 96, 128, seed=1)
        images[1] = _blobs(96, 128, [(30.0, 30.0), (90.5, 60.25)])[0]
        out = sift_mask(images, feature_hw)
        assert torch.equal(out, _reference(images, feature_hw))
        if feature_hw == (12, 16):
            assert not torch.equal(out[0], out[1])
            assert 1 <= int(out[1].sum()) < 12 * 16
        h, w = feature_hw
        mask = torch.ones(2, h, w, dtype=torch.bool)
        mask[0, (h + 1) // 2 :] = False  # bottom padding
        mask[1, :, (w + 1) // 2 :] = False  # right padding
        out = sift_mask(images, feature_hw, mask=mask)
        assert torch.equal(out, _reference(images, feature_hw, mask))
        assert not out[~mask].any()

    def test_batch_equals_single_images(self) -> None:
        images = torch.cat(
            [_texture(1, 96, 128, seed=2), _blobs(96, 128, [(64.0, 48.0)]), torch.full((1, 1, 96, 128), 0.3)]
        )
        out = sift_mask(images, (6, 8))
        alone = torch.cat([sift_mask(img[None], (6, 8)) for img in images])
        assert torch.equal(out, alone)
        assert out[2].all()  # the blank one falls back to every position
        assert int(out[1].sum()) == 9

    def test_padding(self) -> None:
        # A 96 x 128 image whose last 2 of 8 feature columns are padding (cells of 16 x 16 pixels), with one blob in
        # the valid part (cell (2, 2)) and one in the padding (cell (2, 6)): the padded blob's keypoint is dropped,
        # so its block, which would reach the valid column 5, selects nothing.
        image = _blobs(96, 128, [(40.0, 40.0), (104.0, 40.0)])
        assert int(_sift_keypoints(image)[1].sum()) == 2
        mask = torch.ones(1, 6, 8, dtype=torch.bool)
        mask[0, :, 6:] = False
        expected = torch.zeros(1, 6, 8, dtype=torch.bool)
        expected[0, 1:4, 1:4] = True
        assert torch.equal(sift_mask(image, (6, 8), mask=mask), expected)
        # The padded blob alone: no keypoint left, so every valid position is kept.
        only_padded = _blobs(96, 128, [(104.0, 40.0)])
        assert int(_sift_keypoints(only_padded)[1].sum()) == 1
        assert torch.equal(sift_mask(only_padded, (6, 8), mask=mask), mask)
        # A valid keypoint's block reaching into the padding is cut there.
        near = _blobs(96, 128, [(88.0, 40.0)])  # cell (2, 5): its block spans columns 4..6
        expected = torch.zeros(1, 6, 8, dtype=torch.bool)
        expected[0, 1:4, 4:6] = True
        assert torch.equal(sift_mask(near, (6, 8), mask=mask), expected)
        # Batched, with another image and its own mask.
        images = torch.cat([image, _texture(1, 96, 128, seed=8)])
        masks = torch.cat([mask, torch.ones(1, 6, 8, dtype=torch.bool)])
        masks[1, 4:] = False
        out = sift_mask(images, (6, 8), mask=masks)
        assert torch.equal(out[0], sift_mask(image, (6, 8), mask=mask)[0])
        assert torch.equal(out, _reference(images, (6, 8), masks))
        assert not out[~masks].any()

    @pytest.mark.parametrize("batch", [0, 1, 2])
    def test_cardinality(self, batch: int) -> None:
        images = _texture(batch, 64, 80, seed=3)
        assert sift_mask(images, (4, 5)).shape == (batch, 4, 5)
        mask = torch.ones(batch, 4, 5, dtype=torch.bool)
        assert sift_mask(images, (4, 5), mask=mask).shape == (batch, 4, 5)
        assert sift_mask(torch.rand(batch, 3, 64, 80), [7, 3]).shape == (batch, 7, 3)

    def test_rgb_is_converted_to_gray(self) -> None:
        g = torch.Generator().manual_seed(4)
        rgb = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 96, 128, generator=g), 5, stride=1, padding=2)
        gray = kornia.color.rgb_to_grayscale(rgb)
        assert torch.equal(sift_mask(rgb, (6, 8)), sift_mask(gray, (6, 8)))

    def test_noncontiguous(self) -> None:
        images = _texture(2, 96, 128, seed=5)
        y = self.noncontiguous(images)
        assert not y.is_contiguous()
        assert torch.equal(sift_mask(y, (6, 8)), sift_mask(images, (6, 8)))

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float64])
    def test_dtype(self, dt: torch.dtype) -> None:
        # Detection runs in float32: a low-precision image gives the mask of its float32 values.
        images = _texture(2, 96, 128, seed=6).to(dt)
        out = sift_mask(images, (6, 8))
        assert out.dtype == torch.bool
        assert torch.equal(out, sift_mask(images.float(), (6, 8)))

    def test_no_gradient(self) -> None:
        images = _texture(1, 64, 96, seed=7).requires_grad_()
        out = sift_mask(images, (4, 6))
        assert not out.requires_grad
        assert images.grad is None

    def test_num_features_and_threshold(self) -> None:
        image = _blobs(96, 128, [(30.0, 30.0), (90.0, 60.0)])
        assert int(sift_mask(image, (6, 8)).sum()) == 18
        assert int(sift_mask(image, (6, 8), num_features=1).sum()) == 9  # only the stronger one
        assert sift_mask(image, (6, 8), threshold=1.0).all()  # no keypoint passes: fallback

    def test_exception(self) -> None:
        fn = r"sift_mask\(\)"
        images = torch.rand(2, 1, 32, 48)
        with pytest.raises(ShapeError, match=rf"{fn}: images must have shape \(B, C, H, W\); got \(1, 32, 48\) with 3"):
            sift_mask(torch.rand(1, 32, 48), (2, 3))
        with pytest.raises(
            ShapeError,
            match=rf"{fn}: images must have 1 \(gray\) or 3 \(RGB\) channels, shape \(B, 1 or 3, H, W\); "
            r"got \(2, 4, 32, 48\)\.",
        ):
            sift_mask(torch.rand(2, 4, 32, 48), (2, 3))
        with pytest.raises(DTypeError, match=rf"{fn}: images must be a floating-point tensor; got dtype torch\.uint8"):
            sift_mask(torch.zeros(2, 3, 32, 48, dtype=torch.uint8), (2, 3))
        for bad in [(2,), (2, 3, 4), 6, "ab", (2.0, 3), (True, 3), None]:
            with pytest.raises(
                TypeError, match=rf"{fn}: feature_hw must be two positive ints \(h, w\), the feature grid; got "
            ):
                sift_mask(images, bad)  # type: ignore[arg-type]
        for bad in [(0, 3), (2, -1)]:
            message = (
                rf"{fn}: feature_hw must be two positive ints \(h, w\), the feature grid; got {re.escape(repr(bad))}"
            )
            with pytest.raises(ValueError, match=message):
                sift_mask(images, bad)
        with pytest.raises(
            ShapeError,
            match=rf"{fn}: mask must have shape \(B, h, w\) with w=3; got \(2, 2, 4\)\. The mask is on the feature "
            r"grid feature_hw, True = valid\.",
        ):
            sift_mask(images, (2, 3), mask=torch.ones(2, 2, 4, dtype=torch.bool))
        with pytest.raises(ShapeError, match=rf"{fn}: mask must have shape \(B, h, w\) with B=2; got \(1, 2, 3\)\."):
            sift_mask(images, (2, 3), mask=torch.ones(1, 2, 3, dtype=torch.bool))
        with pytest.raises(DTypeError, match=rf"{fn}: mask must have dtype in \[torch\.bool\]; got torch\.int64"):
            sift_mask(images, (2, 3), mask=torch.ones(2, 2, 3, dtype=torch.long))
        with pytest.raises(ValueError, match=rf"{fn}: num_features must be >= 1; got 0\."):
            sift_mask(images, (2, 3), num_features=0)
        with pytest.raises(TypeError, match=rf"{fn}: num_features must be an int >= 1; got float 1\.5"):
            sift_mask(images, (2, 3), num_features=1.5)  # type: ignore[arg-type]
        for bad in [-0.1, float("nan"), float("inf"), "0.1", True]:
            with pytest.raises(ValueError, match=rf"{fn}: threshold must be a finite float >= 0; got {bad!r}"):
                sift_mask(images, (2, 3), threshold=bad)  # type: ignore[arg-type]

    @pytest.mark.gpu
    def test_device_mismatch(self) -> None:
        mask = torch.ones(1, 2, 3, dtype=torch.bool)
        with pytest.raises(DeviceError, match=r"sift_mask\(\): mask must be on the same device as images \(cuda:0\)"):
            sift_mask(torch.rand(1, 1, 32, 48, device="cuda"), (2, 3), mask=mask)
        x = torch.rand(1, 4, 2, 3, device="cuda")
        with pytest.raises(
            DeviceError, match=r"max_mask\(\): mask must be on the same device as x \(cuda:0\); got cpu"
        ):
            max_mask(x, mask=mask)
        with pytest.raises(
            DeviceError, match=r"sum_mask\(\): mask must be on the same device as x \(cuda:0\); got cpu"
        ):
            sum_mask(x, mask=mask)
