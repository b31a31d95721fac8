"""Collect the ``results.json`` of many runs into one Markdown table: ``python -m lightning_apps.summarize DIR``.

Typical use, a Hydra multirun over pooling x whitening x backbone, then one table::

    python -m lightning_apps.eval -m backbone=vgg16,mobilenet_v2 pool=mac,spoc,gem,rmac,crow whiten=none,learned \
        hydra.sweep.dir=multirun/table
    python -m lightning_apps.summarize multirun/table

Besides the fixed columns (dataset, backbone, precision, pooling, whitening, re-ranking), every setting of the
runs' configs that differs between the runs becomes a column of its own, so that a sweep such as
``imsize=128,192 'scales=[1.0],[1.0,0.7071067811865476]'`` gives four distinguishable rows::

    | dataset | backbone | precision | pooling | whitening | re-ranking | imsize | scales | Medium mAP | Hard mAP |
    |---|---|---|---|---|---|---|---|---:|---:|
    | roxford5k | vgg16 | 32-true | GeM | learned | none | 128 | [1.0] | 40.00 | 20.00 |
    | roxford5k | vgg16 | 32-true | GeM | learned | none | 128 | [1.0, 0.7071] | 41.00 | 21.00 |
    ...

    common settings: ms_power=1.0

A run's config is the ``config`` entry of its ``results.json`` or, failing that, the ``config.yaml`` beside it;
runs that have neither show ``-`` in those columns. Settings that cannot change the numbers
(:data:`IGNORED_SETTINGS`) never become columns unless ``--all-settings`` is given; ``--columns KEY ...`` forces
columns.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["COMMON_SETTINGS", "IGNORED_SETTINGS", "collect", "common_settings", "main", "table"]

#: Config keys that cannot change the numbers, hence never become columns (unless ``--all-settings``). A pattern
#: matches the dotted key itself and every key below it (``hydra`` covers ``hydra.run.dir``); shell wildcards work.
IGNORED_SETTINGS: tuple[str, ...] = (
    "output_dir",
    "hydra",
    "num_vis_queries",
    "num_workers",
    "overwrite",
    "cache_dir",
    "data_root",
    "dataset.data_root",  # ${data_root} inside the dataset node (revisitop datasets)
    "dataset.root",  # ${data_root} inside the dataset node (clutter datasets)
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.logger",
    "trainer.enable_checkpointing",
)

#: Settings listed under the table ("common settings: ...") when every run has the same value.
COMMON_SETTINGS: tuple[str, ...] = ("imsize", "scales", "ms_power")

# Config keys whose value a fixed column already shows (same pattern rules as IGNORED_SETTINGS). The parameters
# of the re-ranker (``rerank.k``, ``rerank.alpha``) are covered too when its repr in the re-ranking column names
# them, e.g. ``QueryExpansion(k=10, alpha=3.0)``; see _covered().
_SHOWN: tuple[str, ...] = (
    "dataset._target_",
    "dataset.name",
    "dataset.variant",  # clutter: the dataset name is clutter, clutter_tiny or clutter_train
    "backbone._target_",
    "precision",
    "trainer.precision",  # ${precision}
    "pool._target_",
    "whiten.fit",
    "whiten.module",  # null for whiten=none, the Whiten partial otherwise
    "rerank._target_",
)
_FIXED = ("dataset", "backbone", "precision", "pooling", "whitening", "re-ranking")
_META_SORT = ("dataset", "backbone", "precision", "pool", "whiten", "rerank")
_MISSING: Any = object()  # a key absent from a run's config (printed as "-", like null)
_RESOLVER_CALL = re.compile(r"\$\{\s*[\w.-]+\s*:")  # ${oc.env:...}, ${now:...}: depends on where it is evaluated


def collect(root: Path) -> list[dict[str, Any]]:
    """Every single-run ``results.json`` below ``root``, sorted by dataset, backbone, precision, pool, ...

    Side-by-side results (``"kind": "comparison"``, written by ``mode=compare``) are already one table each; they
    are skipped here (:func:`comparison_tables` prints them).
    """
    runs = []
    for path in sorted(Path(root).rglob("results.json")):
        payload = json.loads(path.read_text())
        if payload.get("kind") == "comparison":
            continue
        runs.append({"path": path, **payload})
    return sorted(runs, key=_meta_key)


def _natural(text: str) -> tuple[tuple[int, float | str], ...]:
    """A sort key that orders the numbers inside a string numerically (``HeR(k=25)`` before ``HeR(k=100)``)."""
    parts = re.split(r"(\d+(?:\.\d+)?)", text)
    return tuple((0, float(p)) if i % 2 else (1, p) for i, p in enumerate(parts) if p)  # digits first, as ASCII


def _meta_key(run: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(run["meta"].get(k)) for k in _META_SORT)


def _short(target: str) -> str:
    """``deepagg.GeM`` -> ``GeM``; a module repr such as ``QueryExpansion(k=10, alpha=3.0)`` stays whole."""
    text = str(target)
    return text if "(" in text else text.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------------------------------------------
# A run's settings: its config flattened to dotted keys
# ----------------------------------------------------------------------------------------------------------------


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"pool": {"p": 3.0}, "scales": [1.0]}`` -> ``{"pool.p": 3.0, "scales": [1.0]}`` (lists stay values)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _escape_resolver_calls(node: Any) -> Any:
    """Turn ``${oc.env:...}`` (and any other resolver call) into literal text, so that it is kept verbatim."""
    if isinstance(node, dict):
        return {k: _escape_resolver_calls(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape_resolver_calls(v) for v in node]
    if isinstance(node, str) and _RESOLVER_CALL.search(node):
        return node.replace("${", "\\${")
    return node


def _resolve_leaves(node: DictConfig | ListConfig, raw: Any) -> Any:
    """Resolve leaf by leaf; a leaf whose interpolation cannot be resolved keeps its raw ``${...}`` text."""
    items = raw.items() if isinstance(raw, dict) else enumerate(raw)
    out: dict[Any, Any] | list[Any] = {} if isinstance(raw, dict) else []
    for key, value in items:
        if isinstance(value, (dict, list)):
            child = _resolve_leaves(node[key], value)
        else:
            try:
                child = node[key]
                if isinstance(child, (DictConfig, ListConfig)):  # an interpolation that points at a node
                    child = OmegaConf.to_container(child, resolve=True)
            except OmegaConfBaseException:
                child = value
        if isinstance(out, dict):
            out[key] = child
        else:
            out.append(child)
    return out


def _load_config_yaml(path: Path) -> dict[str, Any] | None:
    """``config.yaml`` as a plain dict, node interpolations (``${precision}``) resolved where possible.

    Resolver calls such as ``${oc.env:DEEPAGG_DATA,...}`` stay as written: evaluated here they would describe
    this machine's environment, not the one the run saw.
    """
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if not isinstance(raw, dict):
            raise ValueError("not a mapping")
        return _resolve_leaves(OmegaConf.create(_escape_resolver_calls(raw)), raw)  # type: ignore[no-any-return]
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError) as err:
        warnings.warn(f"summarize: ignoring unreadable {path}: {err}", stacklevel=2)
        return None


def _settings(run: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A run's flattened config, and whether it is complete.

    The ``config`` entry of ``results.json``, else the ``config.yaml`` beside it. A run with neither (an old run)
    only knows ``imsize`` and ``scales`` from its ``meta``; it is incomplete, so a key absent there says nothing.
    """
    config = run.get("config")
    if config is None and run.get("path") is not None:
        yaml_path = Path(run["path"]).with_name("config.yaml")
        config = _load_config_yaml(yaml_path) if yaml_path.is_file() else None
    if isinstance(config, dict):
        return _flatten(config), True
    meta = run.get("meta", {})
    return {k: meta[k] for k in ("imsize", "scales") if k in meta}, False


# ----------------------------------------------------------------------------------------------------------------
# Comparing and printing values
# ----------------------------------------------------------------------------------------------------------------


def _canon(value: Any) -> Any:
    """A hashable form in which equal settings are equal (``1 == 1.0``, but ``True != 1``; NaN equals NaN)."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if isinstance(value, (int, float)):
        return ("num", value)
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_canon(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((str(k), _canon(v)) for k, v in value.items()), key=lambda kv: kv[0])))
    return ("str", str(value))


def _order(value: Any) -> tuple[Any, ...]:
    """A sort key that orders numbers numerically and never compares different types."""
    if value is _MISSING or value is None:
        return (0,)
    if isinstance(value, bool):
        return (1, value)
    if isinstance(value, (int, float)):
        return (2, -math.inf if math.isnan(value) else value)
    if isinstance(value, str):
        return (3, value)
    if isinstance(value, (list, tuple)):
        return (4, tuple(_order(v) for v in value))
    return (5, json.dumps(value, sort_keys=True, default=str))


def _format(value: Any, digits: int, *, top: bool = True) -> str:
    """Compact text: floats to ``digits`` significant digits (``1.0``, ``0.7071``), null/missing as ``-``."""
    if value is _MISSING or value is None:
        return "-" if top else "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = f"{value:.{digits}g}"
        return text if re.search(r"[.e]|inf|nan", text) else text + ".0"  # 1.0, not 1: it is a float
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(v, digits, top=False) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_format(v, digits, top=False)}" for k, v in value.items()) + "}"
    return str(value)


def _format_column(values: Sequence[Any]) -> list[str]:
    """Format one column with the fewest float digits (at least 4) that keep different values apart."""
    distinct = {_canon(None if v is _MISSING else v): v for v in values}  # null and missing: both "-"
    for digits in range(4, 18):
        if len({_format(v, digits) for v in distinct.values()}) == len(distinct):
            break
    return [_format(v, digits).replace("|", "\\|").replace("\n", " ") for v in values]


def _is(column: str, key: str) -> bool:
    """Whether ``key`` is the setting ``column`` or lies below it (``pool`` -> ``pool.p``)."""
    return key == column or key.startswith(column + ".")


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(_is(p, key) or fnmatchcase(key, p) for p in patterns)


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------


def _fixed_values(run: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """dataset, backbone, precision, pool, whitening, re-ranking from ``meta`` (precision: else from the config)."""
    m = run["meta"]
    precision = m["precision"] if "precision" in m else settings.get("precision", "n/a")
    return [str(m.get(k)) if k != "precision" else str(precision) for k in _META_SORT]


def _fixed_cells(values: list[str]) -> list[str]:
    dataset, backbone, precision, pool, whiten, rerank = values
    return [dataset, _short(backbone), precision, _short(pool), whiten, _short(rerank)]


def _covered(key: str, rows: list[tuple[list[str], dict[str, Any]]]) -> bool:
    """Whether a fixed column already shows ``key`` (a re-ranker parameter counts when its repr names it)."""
    if _matches(key, _SHOWN):
        return True
    name = key.removeprefix("rerank.")
    if name == key or "." in name:
        return False
    named = re.compile(rf"[(,\s]{re.escape(name)}=")
    return all(named.search(cells[5]) for cells, settings in rows if key in settings)


def _differs(key: str, rows: list[tuple[list[str], dict[str, Any]]], complete: list[bool]) -> bool:
    """Two runs hold different values, or a run lacks ``key`` that a run with the same fixed columns has.

    The second case keeps, say, ``pool.p`` out of a GeM-versus-MAC table: MAC has no ``p``, and the pooling column
    already tells the two apart. A run without a config (``complete`` False) lacks nothing.
    """
    if len({_canon(s[key]) for _, s in rows if key in s}) > 1:
        return True
    having = {tuple(cells) for cells, s in rows if key in s}
    pairs = zip(rows, complete, strict=True)
    return any(full and key not in s and tuple(cells) in having for (cells, s), full in pairs)


def _extra_keys(
    rows: list[tuple[list[str], dict[str, Any]]], complete: list[bool], columns: Sequence[str], all_settings: bool
) -> list[str]:
    """The forced ``columns`` (a node name stands for every key below it), then every differing setting."""
    keys: list[str] = []  # in config order, first appearance first
    for _, settings in rows:
        keys += [k for k in settings if k not in keys]
    out: list[str] = []
    for col in columns:
        out += [k for k in ([k for k in keys if _is(col, k)] or [col]) if k not in out]
    for key in keys:
        if key in out or _covered(key, rows) or (not all_settings and _matches(key, IGNORED_SETTINGS)):
            continue
        if _differs(key, rows, complete):
            out.append(key)
    return out


def table(
    runs: list[dict[str, Any]],
    setups: tuple[str, ...] = ("medium", "hard"),
    *,
    columns: Sequence[str] = (),
    all_settings: bool = False,
) -> str:
    """Markdown table: the fixed columns, the settings that differ between the runs, then mAP per setup (x100).

    Args:
        runs: Runs as returned by :func:`collect` (``path``, ``meta``, ``results``, optionally ``config``).
        setups: Protocol setups to show the mAP of.
        columns: Config keys (dotted, e.g. ``whiten.dim``; a node such as ``pool`` means every key below it) to
            show even when they do not differ.
        all_settings: Also show differing keys of :data:`IGNORED_SETTINGS`.

    Returns:
        The table; rows sorted by the fixed columns, then by the extra columns.
    """
    loaded = [_settings(r) for r in runs]
    fixed = [_fixed_values(r, s) for r, (s, _) in zip(runs, loaded, strict=True)]
    rows = [(_fixed_cells(f), s) for f, (s, _) in zip(fixed, loaded, strict=True)]
    complete = [full for _, full in loaded]
    extra = _extra_keys(rows, complete, columns, all_settings)
    order = sorted(
        range(len(runs)),
        key=lambda i: (
            tuple(_natural(str(v)) for v in fixed[i]),
            tuple(_order(rows[i][1].get(k, _MISSING)) for k in extra),
            str(runs[i].get("path", "")),
        ),
    )
    extra_cells = [_format_column([rows[i][1].get(k, _MISSING) for i in order]) for k in extra]
    header = [*_FIXED, *extra, *(f"{s.capitalize()} mAP" for s in setups)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * (len(_FIXED) + len(extra)) + "---:|" * len(setups),
    ]
    for row, i in enumerate(order):
        res = runs[i]["results"]
        cells = [*rows[i][0], *(col[row] for col in extra_cells)]
        for s in setups:
            v = res.get(s, res).get("map")
            cells.append("n/a" if v is None else f"{100 * v:.2f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def common_settings(runs: list[dict[str, Any]], keys: Sequence[str] = COMMON_SETTINGS) -> str:
    """``common settings: imsize=512, scales=[1.0], ms_power=1.0`` for the ``keys`` every run shares.

    A key that some run lacks or that differs between runs is left out; "" when none is left.
    """
    settings = [_settings(r)[0] for r in runs]
    parts = []
    for key in keys:
        if settings and all(key in s for s in settings) and len({_canon(s[key]) for s in settings}) == 1:
            parts.append(f"{key}={_format_column([settings[0][key]])[0]}")
    return "common settings: " + ", ".join(parts) if parts else ""


def _check_columns(runs: list[dict[str, Any]], columns: Sequence[str]) -> None:
    known: list[str] = []
    for run in runs:
        settings, _ = _settings(run)
        known += [k for k in settings if k not in known]
    for col in columns:
        if known and not any(_is(col, k) for k in known):
            hint = difflib.get_close_matches(col, known, n=3)
            raise SystemExit(f"summarize: no run has the setting {col!r}" + (f"; did you mean {hint}?" if hint else ""))


def comparison_tables(root: Path) -> str:
    """The score table of every side-by-side run (``mode=compare``) below ``root``, each under its folder's name."""
    parts = []
    for path in sorted(Path(root).rglob("results.json")):
        try:
            kind = json.loads(path.read_text()).get("kind")
        except ValueError:
            continue
        md = path.parent / "results.md"
        if kind != "comparison" or not md.is_file():
            continue
        lines = md.read_text().splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("| method")), None)
        if start is None:
            continue
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
        head = f"{path.parent} (side by side; the paired statistics are in its results.md):"
        parts.append(head + "\n" + "\n".join(lines[start:end]))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> str:
    """Print the table of every run below the given folder and the common settings; returns the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--setups", nargs="+", default=["medium", "hard"])
    parser.add_argument(
        "--columns",
        nargs="+",
        default=[],
        metavar="KEY",
        help="config keys to show as columns even when equal in every run, e.g. whiten.dim rerank.k (comma lists work)",
    )
    parser.add_argument(
        "--all-settings",
        action="store_true",
        help="also show differing settings that cannot change the numbers (output_dir, num_workers, hydra.*, ...)",
    )
    args = parser.parse_args(argv)
    columns = [c for arg in args.columns for c in arg.split(",") if c]
    runs = collect(args.root)
    side = comparison_tables(args.root)
    if not runs and side:
        print(side)
        return side
    if not runs:
        raise SystemExit(f"summarize: no results.json below {args.root}")
    _check_columns(runs, columns)
    text = table(runs, tuple(args.setups), columns=columns, all_settings=args.all_settings)
    common = common_settings(runs, [k for k in COMMON_SETTINGS if not any(_is(c, k) for c in columns)])
    print(text + (f"\n\n{common}" if common else "") + (f"\n\n{side}" if side else ""))
    return text


if __name__ == "__main__":
    main()
