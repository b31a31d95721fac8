"""Pooling layers vs plain per-image references (cirtorch's extraction runs one image at a time).

``python -m benchmarks.bench_pooling`` prints, for each op, the median time of deepagg's batched call and of the
reference run in the same process, their ratio, and the largest difference between the two outputs.
"""

from __future__ import annotations

import torch

from benchmarks.common import compare
from deepagg import functional as F
from deepagg.functional.pooling import rmac_grid


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


def ref_masked_gem_loop(x: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Variable-size images the usual way: each image cropped and pooled alone."""
    return torch.stack([ref_gem_loop(x[i : i + 1, :, :h, :w])[0] for i, (h, w) in enumerate(sizes)])


def run(quick: bool = False) -> list[dict]:
    """Time every pooling op against its reference; return one row per case."""
    torch.manual_seed(0)
    b, c, h, w = (4, 64, 12, 16) if quick else (32, 512, 24, 32)
    x = torch.relu(torch.randn(b, c, h, w) + 0.3)
    sizes = [(h - (i % 5), w - (i % 7)) for i in range(b)]
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    for i, (hh, ww) in enumerate(sizes):
        mask[i, :hh, :ww] = True
    cases = [
        ("gem", lambda: F.gem(x), lambda: ref_gem_loop(x)),
        ("gem, p=7.6", lambda: F.gem(x, p=7.6), lambda: ref_gem_loop(x, p=7.6)),
        ("rmac", lambda: F.rmac(x), lambda: ref_rmac_loop(x)),
        ("crow", lambda: F.crow(x), lambda: ref_crow_loop(x)),
        ("gem, padded+mask", lambda: F.gem(x, mask=mask), lambda: ref_masked_gem_loop(x, sizes)),
    ]
    rows = []
    for name, ours, ref in cases:
        diff = float((ours() - ref()).abs().max())
        rows.append(
            compare(
                "pooling",
                name,
                f"{b}x{c}x{h}x{w}",
                ours,
                ref,
                diff,
                tol=1e-4,
                quick=quick,
                reference="per-image loop (cirtorch-style)",
            )
        )
    return rows


if __name__ == "__main__":
    from benchmarks.run import main

    main(["--only", "bench_pooling"])
