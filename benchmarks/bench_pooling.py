"""Pooling layers, one batched call vs a plain per-image loop (cirtorch's extraction runs one image at a time).

``python -m benchmarks.bench_pooling`` prints, for every pool at 32 x 512 x 24 x 32 and 8 x 512 x 48 x 64
(float32, default allocator, the process's threads):

- unmasked: deepagg's batched call against the per-image reference formula (cirtorch-style: MAC, SPoC, GeM,
  R-MAC, CroW as in ``yahoo/crow``; HeW and aGaussian/eChannel have no outside reference, so their loop calls
  deepagg's own function on one image at a time);
- padded: a variable-size batch (image i is ``(H - i % 5) x (W - i % 7)``, padded bottom/right) pooled in one
  call with its mask, against cropping each image to its own size and pooling it alone with the reference.

Each row gives the median time of both sides in the same process, their ratio (reference / deepagg) and the
largest difference between the two outputs. The process first allocates and frees 31 MiB once: that raises
glibc's (dynamic) mmap threshold, so the loops' 1.5-6 MiB temporaries come from the heap instead of being paged
in again on every call, which otherwise happens or not depending on what the process allocated before (the
per-image GeM loop measured 6 ms or 25 ms at 32 x 512 x 24 x 32 in two orders of the same rows). That is the
loops' best case; deepagg's ops allocate one workspace per call and do not depend on it. The
aGaussian/eChannel rows (only when ``deepagg.functional.coweight`` is importable) also give their time relative
to deepagg's GeM on the same batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.common import compare
from deepagg import functional as F
from deepagg.functional._blocking import raise_trim_threshold
from deepagg.functional.pooling import rmac_grid

try:  # written in parallel with this benchmark: rows only where it exists
    from deepagg.functional.coweight import agaussian_echannel
except ImportError:  # pragma: no cover
    agaussian_echannel = None

Pool = Callable[[torch.Tensor], torch.Tensor]


def ref_mac_loop(x: torch.Tensor) -> torch.Tensor:
    """MAC, one image at a time."""
    return torch.stack([img.amax(dim=(-2, -1)) for img in x])


def ref_spoc_loop(x: torch.Tensor) -> torch.Tensor:
    """SPoC (mean), one image at a time."""
    return torch.stack([img.mean(dim=(-2, -1)) for img in x])


def ref_gem_loop(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """cirtorch-style GeM, one image at a time."""
    return torch.stack([img.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p) for img in x])


def ref_rmac_loop(x: torch.Tensor, levels: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """R-MAC as a loop over images and over regions."""
    out = []
    for img in x:
        v = torch.zeros(img.shape[0], dtype=img.dtype)
        for y, xx, h, w in rmac_grid(img.shape[1], img.shape[2], levels):
            r = img[:, y : y + h, xx : xx + w].amax(dim=(-2, -1))
            v += r / (r.norm() + eps)
        out.append(v)
    return torch.stack(out)


def ref_crow_loop(x: torch.Tensor, a: float = 2.0, b: float = 2.0) -> torch.Tensor:
    """yahoo/crow's formulas, one image at a time."""
    out = []
    for img in x:
        s = img.sum(0)
        spatial = (s / s.pow(a).sum().pow(1.0 / a)).pow(1.0 / b)
        q = (img != 0).float().mean(dim=(-2, -1))
        channel = torch.where(q > 0, torch.log(q.sum() / q.clamp(min=1e-12)), torch.zeros_like(q))
        out.append((img * spatial).sum(dim=(-2, -1)) * channel)
    return torch.stack(out)


def per_image(fn: Pool) -> Pool:
    """deepagg's own ``fn`` called on one image at a time (the loop for pools without an outside reference)."""
    return lambda x: torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])


def cropped(ref: Pool, sizes: list[tuple[int, int]]) -> Pool:
    """Variable-size images the usual way: each image cropped to its size and pooled alone by ``ref``."""
    return lambda x: torch.cat([ref(x[i : i + 1, :, :h, :w]) for i, (h, w) in enumerate(sizes)])


def _hew(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.hew(x, lam=1.0, mask=mask)


def _gem76(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.gem(x, 7.6, mask=mask)


def _ref_gem76(x: torch.Tensor) -> torch.Tensor:
    return ref_gem_loop(x, 7.6)


def pools() -> list[tuple[str, Callable[..., torch.Tensor], Pool]]:
    """(name, deepagg op taking ``mask=``, per-image reference) for every pool."""
    rows: list[tuple[str, Callable[..., torch.Tensor], Pool]] = [
        ("mac", F.mac, ref_mac_loop),
        ("spoc", F.spoc, ref_spoc_loop),
        ("gem", F.gem, ref_gem_loop),
        ("gem, p=7.6", _gem76, _ref_gem76),
        ("rmac", F.rmac, ref_rmac_loop),
        ("crow", F.crow, ref_crow_loop),
        ("hew (paper, lam=1)", _hew, per_image(_hew)),
    ]
    if agaussian_echannel is not None:
        rows.append(("agaussian_echannel", agaussian_echannel, per_image(agaussian_echannel)))
    return rows


def padded_batch(b: int, h: int, w: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Sizes ``(h - i % 5, w - i % 7)`` and their bottom/right padding mask."""
    sizes = [(h - (i % 5), w - (i % 7)) for i in range(b)]
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    for i, (hh, ww) in enumerate(sizes):
        mask[i, :hh, :ww] = True
    return sizes, mask


def _sides(
    x: torch.Tensor,
    op: Callable[..., torch.Tensor],
    ref: Pool,
    mask: torch.Tensor | None,
    sizes: list[tuple[int, int]],
) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """deepagg's batched call and the loop it is timed against (cropping each image when ``mask`` is given)."""
    if mask is None:
        return lambda: op(x), lambda: ref(x)
    crop_loop = cropped(ref, sizes)
    return lambda: op(x, mask=mask), lambda: crop_loop(x)


def run(quick: bool = False) -> list[dict]:
    """Time every pool, unmasked and padded, at both shapes; return one row per case."""
    raise_trim_threshold()  # before the first loop too: the loops' best case (deepagg's ops call it themselves)
    torch.manual_seed(0)
    shapes = [(4, 64, 12, 16), (2, 64, 16, 20)] if quick else [(32, 512, 24, 32), (8, 512, 48, 64)]
    rows = []
    for b, c, h, w in shapes:
        x = torch.relu(torch.randn(b, c, h, w) + 0.3)
        sizes, mask = padded_batch(b, h, w)
        gem_ms: dict[bool, float] = {}
        for name, op, ref in pools():
            for padded in (False, True):
                ours, loop = _sides(x, op, ref, mask if padded else None, sizes)
                expected = loop()
                diff = float((ours() - expected).abs().max())
                row = compare(
                    "pooling",
                    f"{name}, padded+mask" if padded else name,
                    f"{b}x{c}x{h}x{w}",
                    ours,
                    loop,
                    diff,
                    tol=1e-5 * max(float(expected.abs().max()), 1.0),
                    quick=quick,
                    reference="crop each image, per-image loop" if padded else "per-image loop",
                )
                if name == "gem":
                    gem_ms[padded] = row["ours_ms"]
                if name == "agaussian_echannel":
                    row["vs_gem"] = row["ours_ms"] / gem_ms[padded]
                    row["case"] += f" ({row['vs_gem']:.1f}x GeM's time)"
                rows.append(row)
    return rows


if __name__ == "__main__":
    from benchmarks.run import main

    main(["--only", "bench_pooling"])
