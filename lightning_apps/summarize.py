"""Collect the ``results.json`` of many runs into one Markdown table: ``python -m lightning_apps.summarize DIR``.

Typical use, a Hydra multirun over pooling x whitening x backbone, then one table::

    python -m lightning_apps.eval -m backbone=vgg16,mobilenet_v2 pool=mac,spoc,gem,rmac,crow whiten=none,learned \
        hydra.sweep.dir=multirun/table
    python -m lightning_apps.summarize multirun/table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["collect", "main", "table"]


def collect(root: Path) -> list[dict[str, Any]]:
    """Every ``results.json`` below ``root``, sorted by dataset, backbone, precision, pool, whitening, re-ranking."""
    runs = []
    for path in sorted(Path(root).rglob("results.json")):
        payload = json.loads(path.read_text())
        runs.append({"path": path, **payload})
    keys = ("dataset", "backbone", "precision", "pool", "whiten", "rerank")
    return sorted(runs, key=lambda r: tuple(str(r["meta"].get(k)) for k in keys))


def _short(target: str) -> str:
    """``deepagg.GeM`` -> ``GeM``; a module repr such as ``QueryExpansion(k=10, alpha=3.0)`` stays whole."""
    text = str(target)
    return text if "(" in text else text.rsplit(".", 1)[-1]


def table(runs: list[dict[str, Any]], setups: tuple[str, ...] = ("medium", "hard")) -> str:
    """Markdown rows: dataset, backbone, precision, pooling, whitening, re-ranking, then mAP per setup (x100)."""
    columns = ["dataset", "backbone", "precision", "pooling", "whitening", "re-ranking"]
    columns += [f"{s.capitalize()} mAP" for s in setups]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) - len(setups)) + "---:|" * len(setups)]
    for r in runs:
        m, res = r["meta"], r["results"]
        cells = [
            m["dataset"],
            _short(m["backbone"]),
            m.get("precision", "n/a"),
            _short(m["pool"]),
            m["whiten"],
            _short(m["rerank"]),
        ]
        for s in setups:
            v = res.get(s, res).get("map")
            cells.append("n/a" if v is None else f"{100 * v:.2f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Print the table of every run below the given folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--setups", nargs="+", default=["medium", "hard"])
    args = parser.parse_args(argv)
    runs = collect(args.root)
    if not runs:
        raise SystemExit(f"summarize: no results.json below {args.root}")
    text = table(runs, tuple(args.setups))
    print(text)
    return text


if __name__ == "__main__":
    main()
