"""What a person wants to see after an evaluation: the E/M/H table, JSON + Markdown, per-query AP, a PNG grid."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from deepagg._io import atomic_write
from deepagg.data.revisitop import crop_query

__all__ = ["format_table", "save_grid", "write_results"]

PROTOCOL_NOTES = (
    "revisitop protocol: queries cropped to bbx (cirtorch resize convention); junk removed from the ranking; "
    "trapezoidal AP over all positives; queries without positives skipped; mP@k with k = min(max(pos), k). "
    "Easy: positives easy, junk = junk+hard. Medium: positives easy+hard. Hard: positives hard, junk = junk+easy. "
    "Rankings by cosine similarity, ties to the lower database index (stable sort)."
)


def _atomic_write(path: Path, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def _pct(v: float) -> str:
    return "  nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def format_table(results: dict[str, Any], kappas: Sequence[int]) -> str:
    """Markdown table of mAP and mP@k (x100, 2 decimals) per setup."""
    setups: list[str] = [s for s in ("easy", "medium", "hard") if s in results] or ["all"]
    rows = {"all": results} if setups == ["all"] else results
    head = "| setup | mAP | " + " | ".join(f"mP@{k}" for k in kappas) + " |"
    sep = "|---|---:|" + "---:|" * len(kappas)
    lines = [head, sep]
    for s in setups:
        r = rows[s]
        lines.append(f"| {s} | {_pct(r['map'])} | " + " | ".join(_pct(float(v)) for v in r["mpr"]) + " |")
    return "\n".join(lines)


def _jsonable(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in results.items():
        if isinstance(val, dict):
            out[key] = _jsonable(val)
        elif isinstance(val, np.ndarray):
            out[key] = [None if (isinstance(v, float) and math.isnan(v)) else v for v in val.tolist()]
        elif isinstance(val, float) and math.isnan(val):
            out[key] = None
        else:
            out[key] = val
    return out


def write_results(
    out_dir: Path,
    *,
    results: dict[str, Any],
    kappas: Sequence[int],
    config_yaml: str,
    meta: dict[str, Any],
    query_names: Sequence[str],
    config: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md``, ``per_query_ap.csv`` and ``config.yaml`` into ``out_dir``.

    ``per_query_ap.csv`` has one row per query (name, then AP per setup; empty for a query without positives)
    so that two runs can be compared query by query (e.g. a paired sign test). ``config`` (the resolved run
    config as a plain dict) is stored in ``results.json`` under ``"config"``, so that tools such as
    ``python -m lightning_apps.summarize`` can show every setting that differs between runs.
    """
    out_dir = Path(out_dir)
    table = format_table(results, kappas)
    payload: dict[str, Any] = {
        "meta": meta,
        "kappas": list(kappas),
        "protocol": PROTOCOL_NOTES,
        "results": _jsonable(results),
    }
    if config is not None:
        payload["config"] = config
    files = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "per_query": out_dir / "per_query_ap.csv",
        "config": out_dir / "config.yaml",
    }
    _atomic_write(files["json"], json.dumps(payload, indent=2, default=str))
    md = [f"# {meta.get('dataset', 'evaluation')}", "", table, "", f"Protocol: {PROTOCOL_NOTES}", ""]
    md += [f"- {k}: {v}" for k, v in meta.items()]
    md += ["", "## Config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    _atomic_write(files["markdown"], "\n".join(md))
    setups = [s for s in ("easy", "medium", "hard") if s in results]
    aps = {s: results[s]["aps"] for s in setups} if setups else {"all": results["aps"]}
    lines = ["query," + ",".join(aps)]
    for qi, name in enumerate(query_names):
        cells = ["" if math.isnan(float(a[qi])) else f"{float(a[qi]):.6f}" for a in aps.values()]
        lines.append(f"{name}," + ",".join(cells))
    _atomic_write(files["per_query"], "\n".join(lines) + "\n")
    _atomic_write(files["config"], config_yaml)
    return files


def _thumb(path: Path, bbx: tuple[float, float, float, float] | None, size: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except OSError:
        return Image.new("RGB", (size, size), (40, 40, 40))
    if bbx is not None:
        img = crop_query(img, bbx)
    img.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def save_grid(
    path: Path,
    *,
    queries: Sequence[Path],
    bbx: Sequence[tuple[float, float, float, float] | None],
    images: Sequence[Path],
    ranks: np.ndarray,
    gnd: Sequence[dict[str, np.ndarray]],
    query_ids: Sequence[int],
    top: int = 10,
    size: int = 128,
) -> Path:
    """A PNG grid: per row a query crop, then its top results framed green, red or grey.

    Green is a positive, red a negative and grey junk; positives are the Medium setup's (easy + hard) for the
    revisited protocol.
    """
    border = 6
    cell = size + 2 * border
    grid = Image.new("RGB", (cell * (top + 1), cell * len(query_ids)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, qi in enumerate(query_ids):
        g = gnd[qi]
        pos = set(
            np.concatenate(
                [g.get("easy", np.array([], int)), g.get("hard", np.array([], int)), g.get("ok", np.array([], int))]
            ).tolist()
        )
        junk = set(g.get("junk", np.array([], int)).tolist())
        grid.paste(_thumb(queries[qi], bbx[qi], size), (border, row * cell + border))
        draw.rectangle([0, row * cell, cell - 1, (row + 1) * cell - 1], outline=(0, 0, 255), width=border // 2)
        for col, j in enumerate(ranks[qi, :top].tolist(), start=1):
            colour = (0, 170, 0) if j in pos else (150, 150, 150) if j in junk else (210, 0, 0)
            x0, y0 = col * cell, row * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour)
            grid.paste(_thumb(images[j], None, size), (x0 + border, y0 + border))
    with atomic_write(path) as fh:
        grid.save(fh, format="PNG")
    return path
