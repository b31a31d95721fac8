"""Run every ``benchmarks/bench_*.py`` and print one table: ``python -m benchmarks.run [--quick] [--json F]``.

Each module exposes ``run(quick: bool) -> list[dict]``; rows carry the op, deepagg's median time, the
reference's median time in the same process and their ratio. ``--quick`` is the smoke run used in the tests.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def print_rows(rows: list[dict]) -> None:
    """Print benchmark rows as a Markdown table."""
    print("| bench | case | shape | deepagg ms (IQR) | reference ms (IQR) | ratio | max abs diff | reference |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['bench']} | {r['case']} | {r['shape']} | {r['ours_ms']:.2f} ({r['ours_iqr_ms']:.2f}) | "
            f"{r['ref_ms']:.2f} ({r['ref_iqr_ms']:.2f}) | {r['ratio']:.1f}x | {r['max_abs_diff']:.1e} | "
            f"{r['reference']} |"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    """Run all benchmark modules (or those named with --only) and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke run)")
    parser.add_argument("--only", nargs="*", default=None, help="module names, e.g. bench_pooling")
    parser.add_argument("--json", type=Path, default=None, help="also write rows + run metadata here")
    args = parser.parse_args(argv)
    names = args.only or sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    rows: list[dict] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        rows += module.run(quick=args.quick)
    print_rows(rows)
    if args.json:
        meta = {
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "quick": args.quick,
        }
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        os.replace(tmp, args.json)
    return rows


if __name__ == "__main__":
    main()
