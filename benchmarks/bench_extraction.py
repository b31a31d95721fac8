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


def run(backbone: str, sides: list[int], batches: list[int], repeat: int, pretrained: bool) -> list[dict[str, Any]]:
    """One row per (side, batch): seconds per image and the ratio against the first side at the same batch."""
    net = getattr(backbones, backbone)(pretrained=pretrained).eval()
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for batch in batches:
            ref = None
            for side in sides:
                x = torch.randn(batch, 3, round(side * 0.75), side)
                net(x)  # warm-up (allocator, oneDNN primitives)
                times = []
                for _ in range(repeat):
                    t = time.perf_counter()
                    net(x)
                    times.append((time.perf_counter() - t) / batch)
                per_image = statistics.median(times)
                ref = per_image if ref is None else ref
                rows.append(
                    {
                        "backbone": backbone,
                        "side": side,
                        "batch": batch,
                        "s_per_image": round(per_image, 4),
                        "ratio_vs_first_side": round(ref / per_image, 2),
                        "threads": torch.get_num_threads(),
                    }
                )
                print(
                    f"{backbone} max side {side:4d} batch {batch}: {per_image:.3f} s per image "
                    f"({ref / per_image:.2f}x cheaper than side {sides[0]})",
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
    if args.quick:
        rows = run(args.backbone, [128, 64], [1], 1, pretrained=False)
    else:
        rows = run(args.backbone, args.sides, args.batch, args.repeat, pretrained=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
