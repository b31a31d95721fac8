"""Blocking over the batch on CPU: why batched pooling is not slower than a per-image loop.

A batched pooling op over ``(B, C, H, W)`` maps makes map-sized temporaries (the clamped map, its power, the
weighted map). At B = 32 and a 512 x 24 x 32 float32 map each one is 50 MB, above glibc's largest mmap
threshold (32 MB), so every temporary is a fresh ``mmap`` whose pages are faulted in on first touch, and it does
not fit in the last-level cache either: the map is streamed from memory once per temporary. Cut into blocks of
about ``BLOCK_BYTES`` of map, the same ops run in cache, and only the first op of a block reads the map from
memory. Measured at 32 x 512 x 24 x 32 on 2 AMD EPYC cores (AVX2) with the ops as they were before blocking:
batched GeM about 40 ms, the same ops over blocks of two images about 10 ms; CroW 115-130 ms and 35-45 ms (with
the current ops, ``benchmarks/bench_pooling.py``: about 5 and 15 ms).

Blocks alone are not enough: glibc hands the freed top of its heap back to the OS once it exceeds twice the
largest chunk it has mmapped so far (a threshold that depends on the process's history), and a block that
allocates its temporaries afresh then pays the page faults again on every block (measured: 10k faults and 4x
the time for a 32-image GeM in one process, none in another). So :func:`blocked` allocates one workspace of one
block's size per call and hands it to every block, which writes its map-sized temporary there (``out=`` and
in-place ops): at most one large allocation per call, whatever the allocator's state. Ops whose temporaries are
still several MiB (HeW's 16 MiB blocks; the DSM matcher and detector) rely on :func:`raise_trim_threshold`
instead, which :func:`blocked` calls on the CPU fast path: one untouched 31 MiB free per process lifts glibc's
trim threshold to 62 MiB (HeW at 32 x 512 x 24 x 32 in a fresh process, ad hoc: 25k page
faults and about 215 ms per call without it, none and about 170 ms with it).

On CPU the part of a pooling op that makes map-sized temporaries runs over blocks of images, chosen from static
shapes only; on every other device, and while ``torch.compile`` traces (the compiler fuses the temporaries away
itself), the op runs on the whole batch at once: one batched code path on the GPU. Every blocked function treats
images independently, so the result does not depend on the blocking (up to the order of float sums).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

__all__ = [
    "BLOCK_BYTES",
    "CHUNK_BYTES",
    "CROP_IMAGES",
    "MV_FAST",
    "batch_blocks",
    "blocked",
    "cache_bytes",
    "channel_chunked",
    "chunk_bytes",
    "cpu_vendor",
    "fast_path",
    "fill_padding",
    "raise_trim_threshold",
    "rectangles",
    "valid_counts",
    "weighted_sums",
]

#: Target size in bytes of one block of feature map (compute dtype): a few images' worth, well inside L3 and
#: far below glibc's mmap threshold. On 2 AMD EPYC cores 2 MiB measured slower, 4, 6 and 8 MiB alike within the
#: run-to-run noise (GeM, CroW, R-MAC, padded MAC at 32 x 512 x 24 x 32 and 8 x 512 x 48 x 64).
BLOCK_BYTES = 4 * 2**20

#: Padded batches whose blocks hold at most this many images are pooled image by image, each cropped to its
#: valid rectangle (see :func:`blocked`): per image the call overhead is then small next to the map's time.
CROP_IMAGES = 4

T = TypeVar("T", torch.Tensor, tuple[torch.Tensor, ...])


def cache_bytes(level: int, root: str | Path = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The first CPU's data (or unified) cache of ``level`` in bytes, from Linux's sysfs; None where unknown."""
    try:
        for index in sorted(Path(root).glob("index*")):
            found = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            if found == str(level) and kind in ("Data", "Unified"):
                size = (index / "size").read_text().strip().upper()  # e.g. "512K", "2048K", "2M"
                unit = {"K": 2**10, "M": 2**20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * unit
    except (OSError, ValueError):
        return None
    return None


def chunk_bytes(l2: int | None) -> int:
    """:data:`CHUNK_BYTES` for a core with ``l2`` bytes of L2 cache (None: unknown).

    With a large L2 (at least 2 MiB per core) the chunk is 3/8 of it, so a chunk's temporary stays there between
    its passes: on 2 cores of an Intel Xeon (2 MiB L2) 768 KiB measured fastest for GeM at 32 x 512 x 24 x 32 and
    8 x 512 x 48 x 64 (192 KiB: call overhead; 3 MiB and more: the temporary leaves L2). With a small L2 the
    chunk is :data:`BLOCK_BYTES` (L3-resident; fewer calls): on 2 cores of an AMD EPYC (512 KiB L2) GeM took
    about 20% less time with 4 MiB chunks than with 768 KiB ones (unpadded, interleaved, three runs of 25 per
    shape), and 2 and 8 MiB were no better. Unknown (no sysfs): 768 KiB.
    """
    if l2 is None:
        return 3 * 2**18
    return 3 * l2 // 8 if l2 >= 2 * 2**20 else BLOCK_BYTES


#: Target size in bytes of one chunk of channel maps for :func:`channel_chunked` (see :func:`chunk_bytes`): set
#: once from this machine's L2 cache.
CHUNK_BYTES = chunk_bytes(cache_bytes(2))


def cpu_vendor(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's ``vendor_id`` (``GenuineIntel``, ``AuthenticAMD``, ...) from Linux's cpuinfo; None where unknown."""
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


#: Whether ``torch.mv`` on the CPU reads a map at memory speed here, so that a 0/1-masked sum is best done as one
#: matrix-vector product per image (:func:`deepagg.functional.spoc`). torch's x86 builds call MKL's ``sgemv``,
#: which on 2 AMD EPYC cores read a 512 x 3072 float32 map in 0.78 ms (NumPy's OpenBLAS: 0.46 ms; a plain sum of
#: a whole 32-image batch runs at about twice mv's speed), while on Intel Xeons it was the fastest form. True on
#: Intel CPUs and where the vendor is unknown, False elsewhere.
MV_FAST = cpu_vendor() in (None, "GenuineIntel")


def channel_chunked(
    fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]], x: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """``fn(maps, work)`` over chunks of the channel maps of ``x`` (B, C, H, W); returns ``(B, C)`` outputs.

    For per-channel reductions on the CPU fast path: ``fn`` gets ``k`` channel maps ``(k, H, W)`` (a view, any
    strides) and a contiguous ``dtype`` work tensor of that shape for its temporary, and returns per-channel
    ``(k,)`` tensors. The chunks hold about :data:`CHUNK_BYTES` and share one work allocation, so the temporary
    stays in the core's cache between its passes and from one chunk to the next. ``x`` must be contiguous or
    hold one image (a cropped view).
    """
    b, c, h, w = x.shape
    maps = x.reshape(b * c, h, w)  # a view: x is contiguous or one (possibly strided) image
    itemsize = torch.finfo(dtype).bits // 8
    step = max(1, min(b * c, CHUNK_BYTES // max(1, h * w * itemsize)))
    work = torch.empty(step, h, w, dtype=dtype, device=x.device)
    starts = range(0, b * c, step) if b * c else range(1)  # no map: one empty chunk gives the empty outputs
    parts = [fn(maps[r : r + step], work[: min(step, b * c - r)]) for r in starts]
    return tuple(torch.cat(col).view(b, c) for col in zip(*parts, strict=True))


def batch_blocks(x: torch.Tensor, itemsize: int | None = None, block_bytes: int | None = None) -> int:
    """Images per block for ``x`` of shape ``(B, ...)``: all of them off-CPU or under ``torch.compile``.

    Args:
        x: The batch, images along dim 0.
        itemsize: Bytes per element of the temporaries (default: that of ``x``; pass 4 when a half map is
            upcast to float32 for the computation).
        block_bytes: Target bytes of map per block (default :data:`BLOCK_BYTES`).

    Returns:
        A block length in ``[1, max(B, 1)]``.
    """
    b = x.shape[0]
    if x.device.type != "cpu" or torch.compiler.is_compiling() or b <= 1:
        return max(b, 1)
    per_image = max(math.prod(x.shape[1:]), 1) * (itemsize or x.element_size())
    return max(1, min(b, (BLOCK_BYTES if block_bytes is None else block_bytes) // per_image))


def fast_path(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the CPU forms of :func:`blocked` and :func:`fill_padding` (eager CPU, no autograd)."""
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def fill_padding(
    x: torch.Tensor,
    mask: torch.Tensor,
    value: float,
    *,
    floor: float | None = None,
    fast: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` (B, C, H, W) with its padding (``mask`` (B, H, W) False) set to ``value``, valid values >= ``floor``.

    The valid positions are clamped below at ``floor`` if given. The result is written to ``out`` if given
    (which may be ``x`` itself).

    The exact form is ``torch.where`` (``masked_fill_`` into ``out``). On CPU ``where``, ``masked_fill`` and every
    other elementwise op that reads or writes a bool tensor measured 5-18x slower than a float op of the same
    size (they are not vectorised), so with ``fast`` it is one ``clamp`` with per-position bounds:
    ``[floor, inf]`` at valid positions (the identity, NaN included, when ``floor`` is None) and
    ``[value, value]`` in the padding. That sets every finite or infinite padding value to ``value`` but leaves a
    NaN there, and its gradient would reach padding equal to ``value``; so ``fast`` is for no-grad CPU blocks
    only, whose caller redoes a block with a NaN in its output exactly (:func:`blocked` does).
    """
    if fast:
        lo, fill, inf = (torch.full((), v, dtype=x.dtype, device=x.device) for v in (floor or 0.0, value, math.inf))
        lower = torch.where(mask, -inf if floor is None else lo, fill)[:, None]
        upper = torch.where(mask, inf, fill)[:, None]
        if out is None:
            return torch.clamp(x, lower, upper)
        return x.clamp_(lower, upper) if out is x else torch.clamp(x, lower, upper, out=out)
    if out is not None:
        if out is not x:
            out = out.copy_(x) if floor is None else torch.clamp(x, min=floor, out=out)
        elif floor is not None:
            out = x.clamp_(min=floor)
        return out.masked_fill_(~mask[:, None], value)
    y = x if floor is None else x.clamp(min=floor)
    return torch.where(mask[:, None], y, torch.full((), value, dtype=y.dtype, device=x.device))


#: An untouched block whose free raises glibc's dynamic thresholds as far as they go (the mmap threshold stops at
#: 32 MiB on 64-bit, and only a freed chunk below that maximum, headers included, moves it).
NUDGE_BYTES = 31 * 2**20
_nudged = False


def raise_trim_threshold() -> None:
    """Once per process: allocate and free an untouched 31 MiB block, so that glibc stops trimming its heap.

    glibc (mallopt(3), ``M_MMAP_THRESHOLD``) raises its mmap threshold to the size of each mmapped chunk freed, up
    to 32 MiB, and its heap trim threshold to twice that. Until a process has freed a large chunk, an op whose
    temporaries of a few MiB grow the heap by more than the trim threshold has the heap handed back to the OS when
    they are freed, and pays the page faults again on the next call (``spatial_match`` at the benchmark's size:
    about 1,800-2,700 faults, a fifth of its time; ``python -m benchmarks.bench_spatial --no-heap-nudge``). The free
    here is what a program's first large tensor free does anyway; the block is never written, so it costs one
    ``mmap`` and one ``munmap`` and no page. Afterwards the process keeps up to 62 MiB of freed heap instead of
    returning it. No effect with another allocator or with ``MALLOC_MMAP_THRESHOLD_`` set (glibc then turns the
    dynamic thresholds off).
    """
    global _nudged
    if not _nudged:
        _nudged = True
        block = torch.empty(NUDGE_BYTES, dtype=torch.uint8)  # never written: no page is touched
        del block


def valid_counts(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The number of valid positions of each image of ``mask`` (B, H, W), as ``dtype`` (NumPy on eager CPU)."""
    if fast_path(mask):
        return torch.from_numpy(mask.numpy().reshape(mask.shape[0], math.prod(mask.shape[1:])).sum(axis=1)).to(dtype)
    return mask.sum(dim=(-2, -1)).to(dtype)


def weighted_sums(x: torch.Tensor, w: torch.Tensor, *, fast: bool) -> torch.Tensor:
    r""":math:`\sum_p w_{b,p} x_{b,:,p}` of maps ``x`` (B, C, ...) and per-position weights ``w`` (B, ...): (B, C).

    With ``fast`` (eager CPU without autograd, :func:`fast_path`) one matrix-vector product per image, which
    reads each map once and makes no map-sized temporary (an ad-hoc timing at 32 x 512 x 24 x 32 on 2 cores:
    1.0 ms, against 1.9 ms for one ``bmm`` and 15 ms for the product-sum of the whole batch); otherwise one
    batched product-sum (GPU, ``torch.compile``, autograd). A 0 weight times inf or NaN is NaN either way.
    """
    b, c = x.shape[:2]
    if fast and b > 0:
        pairs = zip(x.reshape(b, c, -1), w.reshape(b, -1), strict=True)
        return torch.stack([torch.mv(xi, wi) for xi, wi in pairs])
    return (x * w[:, None]).sum(dim=tuple(range(2, x.ndim)))


def _has_nan(out: torch.Tensor | tuple[torch.Tensor, ...]) -> bool:
    parts = (out,) if isinstance(out, torch.Tensor) else out
    return any(bool(torch.isnan(t).any()) for t in parts if t.is_floating_point())


def rectangles(mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """Each image's valid ``(h, w)`` when the CPU ``mask`` (B, H, W) is a top-left rectangle per image, else None.

    In NumPy, from the first column and row and one comparison: torch's bool kernels took 0.4 ms for a
    32 x 24 x 32 mask on 2 cores, this takes about 20 us.
    """
    m = mask.numpy()
    heights = m[:, :, 0].sum(axis=1)
    widths = m[:, 0, :].sum(axis=1)
    rect = (np.arange(m.shape[1])[None, :, None] < heights[:, None, None]) & (
        np.arange(m.shape[2])[None, None, :] < widths[:, None, None]
    )
    if not np.array_equal(rect, m):
        return None
    return [(int(h), int(w)) for h, w in zip(heights, widths, strict=True)]


def blocked(
    fn: Callable[..., T],
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    itemsize: int | None = None,
    block_bytes: int | None = None,
    workspace: torch.dtype | None = None,
    crop: bool = False,
    fast_args: bool = False,
    **kwargs: object,
) -> T:
    """``fn(x, mask, **kwargs)`` computed over blocks of the batch and concatenated.

    ``fn`` must treat images independently (a padded image gives what it gives alone) and return a tensor, or
    a tuple of tensors, with the batch along dim 0. The blocks are :func:`batch_blocks` images long (``itemsize``
    and ``block_bytes`` are passed on); with one block (GPU, compile, small batches) this is exactly one call of
    ``fn``.

    With ``fast_args``, ``fn`` also takes ``fast`` and ``buf`` keywords. ``fast`` is :func:`fast_path` of ``x``:
    ``fn`` may then use the fast form of :func:`fill_padding`, and a masked block whose output holds a NaN (NaN
    garbage in the padding, or a NaN the op makes anyway) is computed again with ``fast=False``. With
    ``workspace`` (a dtype) and ``fast``, ``buf`` is an uninitialised tensor of that dtype shaped like ``fn``'s
    ``x``, carved from one block-sized allocation made once per call and shared by all blocks, for ``fn``'s
    map-sized temporary; otherwise it is None and ``fn`` allocates. ``fn`` must not return ``buf`` or a view of
    it.

    With ``crop`` on the CPU fast path, when a block holds at most ``CROP_IMAGES`` images and ``mask`` is a
    top-left rectangle per image (a padded batch), each image is cropped to its valid rectangle (a view) and
    pooled alone, with no mask: no pass over the padding, nothing to fill (whether that beats filling the
    padding depends on the op: a reduction over a cropped, strided view can be slower than over a full map).
    """
    fast = fast_path(x)
    if fast:
        raise_trim_threshold()  # blocks of MiBs (HeW's 16 MiB): without it, faulted in again on every call
    step = batch_blocks(x, itemsize, block_bytes)
    flat = None
    if fast and fast_args and workspace is not None:
        flat = torch.empty(min(step, x.shape[0]) * math.prod(x.shape[1:]), dtype=workspace, device=x.device)

    def run(xb: torch.Tensor, mb: torch.Tensor | None) -> T:
        if not fast_args:
            return fn(xb, mb, **kwargs)
        buf = None if flat is None else flat[: xb.numel()].view(xb.shape)
        out = fn(xb, mb, fast=fast, buf=buf, **kwargs)
        if fast and mb is not None and _has_nan(out):
            out = fn(xb, mb, fast=False, buf=None, **kwargs)
        return out

    sizes = None
    if crop and fast and mask is not None and x.shape[0] > 0 and step <= CROP_IMAGES:
        sizes = rectangles(mask)
    if sizes is not None:
        # One as_strided per image (three slices cost three dispatches): image i's top-left h x w rectangle.
        stride, offset = x.stride(), x.storage_offset()
        parts = [
            run(x.as_strided((1, x.shape[1], h, w), stride, offset + i * stride[0]), None)
            for i, (h, w) in enumerate(sizes)
        ]
    elif step >= x.shape[0]:
        return run(x, mask)
    else:
        masks = [None] * len(range(0, x.shape[0], step)) if mask is None else list(mask.split(step))
        parts = [run(xb, mb) for xb, mb in zip(x.split(step), masks, strict=True)]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)  # type: ignore[arg-type,return-value]
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]
