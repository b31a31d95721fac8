"""Benchmark: backbone seconds per image by max side (why the main job runs at ``compare.imsize=256``).

Run ``python benchmarks/bench_extraction.py`` (VGG16, ImageNet weights, float32, the process's torch threads;
``--backbone mobilenet_v2``, ``--sides 512 256``, ``--batch 1 2 8``, ``--quick`` for a smoke run with random
weights). Each case times the forward pass of a 4:3 random image batch (the shape of most ``clutter`` images)
in inference mode, median of ``--repeat`` runs after one warm-up; ``ratio`` is the time per image at the first
side divided by this side's (> 1: cheaper), the reference being the app's single-pipeline ``imsize=512``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepagg import backbones


def _quantiles(times: list[float]) -> tuple[float, float]:
    """Median and interquartile range (seconds)."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0]


def run(
    quick: bool = False,
    *,
    backbone: str = "vgg16",
    sides: list[int] | None = None,
    batches: list[int] | None = None,
    repeat: int = 3,
) -> list[dict[str, Any]]:
    """One row per (side, batch) in ``benchmarks/run.py``'s format; the reference is the first side (512).

    ``quick``: MobileNetV2 with random weights at sides 128 and 64, one repeat (the smoke run of the tests).
    """
    if quick:
        backbone, sides, batches, repeat, pretrained = "mobilenet_v2", [128, 64], [1], 1, False
    else:
        sides, batches, pretrained = sides or [512, 362, 320, 288, 256], batches or [1, 8], True
    net = getattr(backbones, backbone)(pretrained=pretrained).eval()
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for batch in batches:
            ref: tuple[float, float] | None = None
            for side in sides:
                x = torch.randn(batch, 3, round(side * 0.75), side)
                net(x)  # warm-up (allocator, oneDNN primitives)
                times = []
                for _ in range(repeat):
                    t = time.perf_counter()
                    net(x)
                    times.append((time.perf_counter() - t) / batch)
                ours = _quantiles(times)
                ref = ours if ref is None else ref
                rows.append(
                    {
                        "bench": "extraction",
                        "case": f"{backbone} max side {side}, batch {batch} (per image)",
                        "shape": f"({batch}, 3, {round(side * 0.75)}, {side})",
                        "ours_ms": ours[0] * 1e3,
                        "ours_iqr_ms": ours[1] * 1e3,
                        "ref_ms": ref[0] * 1e3,
                        "ref_iqr_ms": ref[1] * 1e3,
                        "ratio": ref[0] / ours[0],
                        "max_abs_diff": 0.0,
                        "reference": f"the same backbone at max side {sides[0]}",
                        "threads": torch.get_num_threads(),
                    }
                )
                print(
                    f"{backbone} max side {side:4d} batch {batch}: {ours[0]:.3f} s per image "
                    f"({ref[0] / ours[0]:.2f}x cheaper than side {sides[0]})",
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vgg16", choices=["vgg16", "mobilenet_v2"])
    parser.add_argument("--sides", nargs="+", type=int, default=[512, 362, 320, 288, 256])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="random weights, two small sides, one repeat")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = run(args.quick, backbone=args.backbone, sides=args.sides, batches=args.batch, repeat=args.repeat)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
