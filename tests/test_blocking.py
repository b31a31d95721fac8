"""Tests of deepagg.functional._blocking: block lengths, the blocked loop, its workspace, padding and crops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deepagg.functional as F
from deepagg.functional import _blocking
from deepagg.functional._blocking import (
    batch_blocks,
    blocked,
    cache_bytes,
    channel_chunked,
    chunk_bytes,
    cpu_vendor,
    fast_path,
    fill_padding,
    rectangles,
    valid_counts,
    weighted_sums,
)

from ._base import BaseTester


def _padded_mask(sizes: list[tuple[int, int]], h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(len(sizes), h, w, dtype=torch.bool)
    for i, (hh, ww) in enumerate(sizes):
        mask[i, :hh, :ww] = True
    return mask


class TestBatchBlocks(BaseTester):
    def test_one_block_for_small_batches(self) -> None:
        assert batch_blocks(torch.empty(0, 512, 24, 32)) == 1
        assert batch_blocks(torch.empty(1, 512, 24, 32)) == 1

    def test_cpu_blocks_of_about_block_bytes(self) -> None:
        # 512 x 24 x 32 float32 is 1.5 MiB: two images per 4 MiB block; a 6 MiB map gets a block of its own.
        assert _blocking.BLOCK_BYTES == 4 * 2**20
        assert batch_blocks(torch.empty(32, 512, 24, 32)) == 2
        assert batch_blocks(torch.empty(8, 512, 48, 64)) == 1
        assert batch_blocks(torch.empty(32, 512, 24, 32, dtype=torch.float16)) == 5
        assert batch_blocks(torch.empty(32, 512, 24, 32, dtype=torch.float16), itemsize=4) == 2
        assert batch_blocks(torch.empty(64, 8, 4, 4)) == 64
        # HeW's Woodbury path asks for 16 MiB blocks (its C x C factorisations batch over a block's images).
        assert batch_blocks(torch.empty(32, 512, 24, 32), block_bytes=16 * 2**20) == 10
        assert batch_blocks(torch.empty(8, 512, 48, 64), block_bytes=16 * 2**20) == 2
        assert batch_blocks(torch.empty(8, 512, 48, 64), block_bytes=1) == 1

    def test_one_block_off_cpu(self) -> None:
        assert batch_blocks(torch.empty(32, 512, 24, 32, device="meta")) == 32

    def test_one_block_under_compile(self) -> None:
        x = torch.rand(32, 512, 4, 4)

        def fn(t: torch.Tensor) -> torch.Tensor:
            return t[:, 0, 0, 0] * batch_blocks(t, itemsize=2**20)  # 8 MiB per image: 1 per block eagerly

        assert batch_blocks(x, itemsize=2**20) == 1
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        self.assert_close(compiled(x), x[:, 0, 0, 0] * 32)


class TestBlocked(BaseTester):
    def test_blocks_concatenated(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(_blocking, "BLOCK_BYTES", 2 * 3 * 4 * 5 * 4)  # two images per block
        x = torch.rand(5, 3, 4, 5)
        seen: list[int] = []

        def fn(xb: torch.Tensor, mb: torch.Tensor | None, *, scale: float) -> torch.Tensor:
            assert mb is None
            seen.append(xb.shape[0])
            return xb.sum(dim=(1, 2, 3)) * scale

        out = blocked(fn, x, scale=2.0)
        assert seen == [2, 2, 1]
        self.assert_close(out, x.sum(dim=(1, 2, 3)) * 2.0)

    def test_tuple_outputs_and_masks(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(_blocking, "BLOCK_BYTES", 2 * 3 * 4 * 5 * 4)
        x = torch.rand(5, 3, 4, 5)
        mask = torch.rand(5, 4, 5) > 0.3

        def fn(xb: torch.Tensor, mb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            assert mb is not None
            assert mb.shape[0] == xb.shape[0]
            return xb.amax(dim=(2, 3)), mb.sum(dim=(1, 2))

        a, b = blocked(fn, x, mask)
        self.assert_close(a, x.amax(dim=(2, 3)))
        assert torch.equal(b, mask.sum(dim=(1, 2)))

    def test_workspace_shared_by_all_blocks(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(_blocking, "BLOCK_BYTES", 2 * 3 * 4 * 5 * 4)
        x = torch.rand(5, 3, 4, 5)
        pointers: list[int] = []

        def fn(xb: torch.Tensor, mb: torch.Tensor | None, *, fast: bool, buf: torch.Tensor | None) -> torch.Tensor:
            assert fast
            assert buf is not None
            assert buf.shape == xb.shape
            assert buf.dtype == torch.float64
            pointers.append(buf.data_ptr())
            return buf.copy_(xb).clamp_(min=0.5).sum(dim=(1, 2, 3))

        out = blocked(fn, x, workspace=torch.float64, fast_args=True)
        assert len(set(pointers)) == 1
        assert len(pointers) == 3
        self.assert_close(out, x.double().clamp(min=0.5).sum(dim=(1, 2, 3)))

    def test_no_workspace_and_exact_form_under_autograd(self) -> None:
        x = torch.rand(3, 2, 4, 5, requires_grad=True)

        def fn(xb: torch.Tensor, mb: torch.Tensor | None, *, fast: bool, buf: torch.Tensor | None) -> torch.Tensor:
            assert not fast
            assert buf is None
            return xb.sum(dim=(1, 2, 3))

        blocked(fn, x, workspace=torch.float32, fast_args=True).sum().backward()
        assert x.grad is not None
        assert not fast_path(x)

    def test_nan_block_redone_exactly(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(_blocking, "BLOCK_BYTES", 2 * 3 * 4 * 5 * 8)
        x = torch.rand(4, 3, 4, 5, dtype=torch.float64)
        mask = torch.rand(4, 4, 5) > 0.4
        mask[:, 0, 0] = True
        x[~mask[:, None].expand_as(x)] = float("nan")  # NaN garbage: the fast fill leaves it, the redo removes it
        calls: list[bool] = []

        def fn(xb: torch.Tensor, mb: torch.Tensor | None, *, fast: bool, buf: torch.Tensor | None) -> torch.Tensor:
            calls.append(fast)
            assert mb is not None
            return fill_padding(xb, mb, 0.0, fast=fast, out=buf).sum(dim=(1, 2, 3))

        out = blocked(fn, x, mask, workspace=torch.float64, fast_args=True)
        assert calls == [True, False, True, False]
        expected = torch.where(mask[:, None], x, 0.0).sum(dim=(1, 2, 3))
        torch.testing.assert_close(out, expected, rtol=0.0, atol=0.0)

    @pytest.mark.parametrize("rectangle", [True, False], ids=["rectangles", "other-mask"])
    def test_crop(self, rectangle: bool) -> None:
        sizes = [(4, 5), (2, 3), (3, 5)]
        mask = _padded_mask(sizes, 4, 5)
        if not rectangle:
            mask[1, 3, 4] = True
        x = torch.rand(3, 2, 4, 5)
        seen: list[tuple[tuple[int, ...], bool]] = []

        def fn(xb: torch.Tensor, mb: torch.Tensor | None, *, fast: bool, buf: torch.Tensor | None) -> torch.Tensor:
            seen.append((tuple(xb.shape), mb is None))
            if mb is not None:
                xb = fill_padding(xb, mb, 0.0, fast=fast)
            return xb.sum(dim=(1, 2, 3))

        out = blocked(fn, x, mask, crop=True, fast_args=True)
        if rectangle:
            assert seen == [((1, 2, h, w), True) for h, w in sizes]
        else:
            assert seen == [((3, 2, 4, 5), False)]
        self.assert_close(out, torch.where(mask[:, None], x, 0.0).sum(dim=(1, 2, 3)))


class TestFillPadding(BaseTester):
    @pytest.mark.parametrize("floor", [None, 0.25])
    @pytest.mark.parametrize("dt", [torch.float16, torch.float32, torch.float64], ids=str)
    def test_fast_equals_exact(self, floor: float | None, dt: torch.dtype) -> None:
        x = (torch.rand(3, 4, 5, 6) - 0.3).to(dt)
        mask = torch.rand(3, 5, 6) > 0.4
        x[0, :, ~mask[0]] = float("inf")
        x[1, :, ~mask[1]] = -float("inf")
        x[2, :, ~mask[2]] = 6e4 if dt == torch.float16 else 1e30
        x[2, 1, mask[2]] = float("nan")  # a NaN at a valid position stays
        for value in (0.0, float("-inf")):
            exact = fill_padding(x, mask, value, floor=floor)
            fast = fill_padding(x, mask, value, floor=floor, fast=True)
            assert fast.dtype == exact.dtype == dt
            torch.testing.assert_close(fast, exact, rtol=0.0, atol=0.0, equal_nan=True)
            into = torch.empty_like(x)
            assert fill_padding(x, mask, value, floor=floor, fast=True, out=into) is into
            torch.testing.assert_close(into, exact, rtol=0.0, atol=0.0, equal_nan=True)
            copy = x.clone()
            fill_padding(copy, mask, value, floor=floor, out=copy)
            torch.testing.assert_close(copy, exact, rtol=0.0, atol=0.0, equal_nan=True)

    def test_fast_keeps_nan_garbage(self) -> None:
        x = torch.full((1, 2, 2, 2), float("nan"))
        mask = torch.tensor([[[True, False], [False, False]]])
        assert torch.isnan(fill_padding(x, mask, 0.0, fast=True)[0, :, 1]).all()  # documented: blocked redoes
        assert (fill_padding(x, mask, 0.0)[0, :, 1] == 0).all()


class TestMasks:
    def test_rectangles(self) -> None:
        sizes = [(4, 5), (1, 1), (3, 2)]
        assert rectangles(_padded_mask(sizes, 4, 5)) == sizes
        for i, j in [(0, 1), (3, 4)]:  # a hole, and a valid cell outside the rectangle
            mask = _padded_mask(sizes, 4, 5)
            mask[2, i, j] = not mask[2, i, j]
            assert rectangles(mask) is None
        assert rectangles(torch.zeros(0, 4, 5, dtype=torch.bool)) == []

    def test_valid_counts(self) -> None:
        mask = torch.rand(4, 5, 6) > 0.5
        expected = mask.sum(dim=(1, 2)).double()
        torch.testing.assert_close(valid_counts(mask, torch.float64), expected)
        torch.testing.assert_close(valid_counts(mask.to("meta"), torch.float64).shape, expected.shape)
        assert valid_counts(torch.zeros(0, 5, 6, dtype=torch.bool), torch.float32).shape == (0,)


class TestChannelChunked(BaseTester):
    @pytest.mark.parametrize("layout", ["contiguous", "crop", "empty"])
    def test_chunks_concatenated(self, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
        # 4 maps of 3 x 5 float32 per chunk: 2 images x 7 channels = 14 maps in 4 chunks, the last one of 2; the
        # work tensor is the same memory for every chunk and fn's outputs come back as (B, C).
        monkeypatch.setattr(_blocking, "CHUNK_BYTES", 4 * 3 * 5 * 4)
        x = torch.rand(2, 7, 3, 5)
        if layout == "crop":
            x = torch.rand(1, 9, 6, 8)[:, :, :3, :5]  # one image's top-left rectangle: a strided view
        elif layout == "empty":
            x = torch.rand(0, 7, 3, 5)
        seen: list[tuple[int, int]] = []

        def fn(m: torch.Tensor, work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            assert work.shape == m.shape
            assert work.is_contiguous()
            seen.append((work.data_ptr(), len(m)))
            torch.mul(m, 2.0, out=work)
            top = work.amax(dim=(-2, -1)) if len(m) else work.sum(dim=(-2, -1))  # amax of no map is an error
            return work.sum(dim=(-2, -1)), top

        sums, tops = channel_chunked(fn, x, torch.float32)
        b, c = x.shape[:2]
        assert sums.shape == tops.shape == (b, c)
        if b:
            self.assert_close(sums, 2 * x.sum(dim=(-2, -1)))
            self.assert_close(tops, 2 * x.amax(dim=(-2, -1)))
            counts = [n for _, n in seen]
            assert counts == [4] * (b * c // 4) + ([b * c % 4] if b * c % 4 else [])
            assert len({ptr for ptr, _ in seen}) == 1  # one work allocation for all chunks

    @pytest.mark.parametrize("p", [3.0, 7.6])
    @pytest.mark.parametrize("padded", [False, True])
    def test_gem_over_chunks(self, p: float, padded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        # GeM's CPU fast paths over chunks of 3 channel maps (the whole batch, or each cropped image of a padded
        # batch) against the float64 per-image reference.
        monkeypatch.setattr(_blocking, "CHUNK_BYTES", 3 * 6 * 7 * 4)
        x = torch.rand(3, 8, 6, 7) * 3
        sizes = [(6, 7), (4, 5), (5, 3)] if padded else [(6, 7)] * 3
        mask = _padded_mask(sizes, 6, 7) if padded else None
        got = F.gem(x, p=p, mask=mask)
        for i, (h, w) in enumerate(sizes):
            ref = x[i, :, :h, :w].double().clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1 / p)
            self.assert_close(got[i].double(), ref, rtol=1e-5, atol=1e-6)


class TestWeightedSums(BaseTester):
    @pytest.mark.parametrize("fast", [True, False])
    @pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 7, 9), (0, 5, 4, 6)])
    def test_reference(self, fast: bool, shape: tuple[int, ...]) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        w = torch.rand(shape[0], *shape[2:], generator=g, dtype=torch.float64)
        ref = torch.einsum("bcp,bp->bc", x.flatten(2), w.flatten(1))
        out = weighted_sums(x, w, fast=fast)
        assert out.shape == shape[:2]
        self.assert_close(out, ref)

    def test_gradient_of_the_batched_form(self) -> None:
        x = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
        w = torch.rand(2, 4, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: weighted_sums(a, b, fast=False), (x, w))


class TestMachineConstants:
    @staticmethod
    def _sysfs(root: Path, caches: list[tuple[str, str, str]]) -> Path:
        for i, (level, kind, size) in enumerate(caches):
            d = root / f"index{i}"
            d.mkdir(parents=True)
            (d / "level").write_text(f"{level}\n")
            (d / "type").write_text(f"{kind}\n")
            (d / "size").write_text(f"{size}\n")
        return root

    def test_cache_bytes(self, tmp_path: Path) -> None:
        amd = [("1", "Instruction", "32K"), ("1", "Data", "32K"), ("2", "Unified", "512K"), ("3", "Unified", "32768K")]
        root = self._sysfs(tmp_path / "amd", amd)
        assert cache_bytes(1, root) == 32 * 2**10  # the data cache, not the instruction cache listed first
        assert cache_bytes(2, root) == 512 * 2**10
        assert cache_bytes(3, root) == 32 * 2**20
        intel = [("1", "Data", "48K"), ("2", "Unified", "2M"), ("3", "Unified", "105M")]
        assert cache_bytes(2, self._sysfs(tmp_path / "intel", intel)) == 2 * 2**20
        assert cache_bytes(2, self._sysfs(tmp_path / "no_l2", [("1", "Data", "32K")])) is None
        assert cache_bytes(2, tmp_path / "missing") is None
        assert cache_bytes(2, self._sysfs(tmp_path / "bad", [("2", "Unified", "lots")])) is None

    def test_chunk_bytes(self) -> None:
        assert chunk_bytes(2 * 2**20) == 768 * 2**10  # Intel Xeon, 2 MiB L2 per core: chunks stay in L2
        assert chunk_bytes(4 * 2**20) == 3 * 2**19
        assert chunk_bytes(512 * 2**10) == _blocking.BLOCK_BYTES  # AMD EPYC, 512 KiB L2: L3-sized chunks
        assert chunk_bytes(None) == 768 * 2**10
        assert chunk_bytes(cache_bytes(2)) == _blocking.CHUNK_BYTES  # this machine's, set at import

    def test_cpu_vendor(self, tmp_path: Path) -> None:
        info = tmp_path / "cpuinfo"
        info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
        assert cpu_vendor(info) == "AuthenticAMD"
        info.write_text("processor\t: 0\nCPU implementer\t: 0x41\n")  # arm64: no vendor_id
        assert cpu_vendor(info) is None
        assert cpu_vendor(tmp_path / "missing") is None
        assert (cpu_vendor() in (None, "GenuineIntel")) == _blocking.MV_FAST


_FAULTS = """
import resource, sys
import torch
from benchmarks.bench_spatial import pyramid, synthetic_features, synthetic_map
from deepagg.functional import _blocking, hew
from deepagg.functional.spatial import activation_features, spatial_match

if sys.argv[1] == "match":  # the benchmark's top 100: temporaries of a few MiB
    q, db, _ = synthetic_features(100, 512, 3)
    run = lambda: spatial_match(q, db)
elif sys.argv[1] == "detect":  # one 512-channel map at 3 scales: NumPy's region temporaries
    maps = pyramid(synthetic_map(512), 3)
    run = lambda: activation_features(maps)
else:  # HeW over blocked()'s 16 MiB image blocks
    x = torch.relu(torch.randn(32, 512, 24, 32, generator=torch.Generator().manual_seed(0)) + 0.3)
    run = lambda: hew(x, lam=1.0)
if sys.argv[2] == "off":
    _blocking._nudged = True  # as if done: no nudge in this process
run()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    run()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


class TestRaiseTrimThreshold:
    def test_once_per_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        sizes: list[int] = []
        real_empty = torch.empty

        def spy(*args: object, **kwargs: object) -> torch.Tensor:
            sizes.append(int(args[0]))  # type: ignore[call-overload]
            return real_empty(*args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(_blocking, "_nudged", False)
        monkeypatch.setattr(_blocking.torch, "empty", spy)
        _blocking.raise_trim_threshold()
        _blocking.raise_trim_threshold()
        assert sizes == [31 * 2**20]

    @pytest.mark.skipif(
        __import__("platform").libc_ver()[0] != "glibc"
        or any(k.startswith("MALLOC_") for k in __import__("os").environ),
        reason="glibc's dynamic malloc thresholds only",
    )
    @pytest.mark.parametrize("op", ["match", "detect", "hew"])
    def test_heap_is_kept(self, op: str) -> None:
        # In fresh processes (the state is process-wide): without the untouched 31 MiB free, every benchmark-sized
        # call of spatial_match / activation_features / hew grows glibc's heap past its trim threshold, has it
        # trimmed, and faults its pages in again (about 2,700 / 6,000 / 25,000 per call measured); with it, the
        # heap stays.
        import subprocess
        import sys

        root = str(Path(__file__).resolve().parents[1])

        def faults(mode: str) -> int:
            out = subprocess.run(
                [sys.executable, "-c", _FAULTS, op, mode], capture_output=True, text=True, check=True, cwd=root
            )
            return int(out.stdout.split()[-1])

        off, on = faults("off"), faults("on")
        assert off > 3000
        assert on < off // 5
