"""The main job: every paper's method side by side on one benchmark, from one extraction (``mode=compare``).

``python -m lightning_apps.eval`` (``mode=auto`` without a ``pool=`` or ``rerank=`` on the command line, or
``mode=compare``) evaluates, on the same cached feature maps of the run's backbone, every pooling of
``compare.pools`` (each with its own whitening, fitted once on the training set), then every re-ranker of
``compare.reranks`` on the descriptors of the best of those pools (the highest mean of Medium and Hard mAP; it is
chosen on the test set itself, which ``results.md`` says). No row re-runs the app: the stages of
:mod:`lightning_apps.eval` (:func:`~lightning_apps.eval.build_session`, :func:`~lightning_apps.eval.describe_with`,
:func:`~lightning_apps.eval.rerank_with`, :func:`~lightning_apps.eval.score`) are shared, so maps are extracted
once, each pooling's whitening is fitted once, and re-rankers work on descriptors already in memory. Each row
records the single-pipeline command that gives the same numbers (``mode=single ...``; a test checks it).

Writes ``results.md``, ``results.json``, ``per_query_ap.csv``, ``config.yaml`` and ``compare.png``
(:mod:`lightning_apps.compare_report`: gains over ``compare.baseline`` with a paired per-query comparison: queries
improved / worsened / tied, an exact sign test, a bootstrap interval of the gain) and prints the table and the
wall time split by stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_apps.compare_report import Row, comparison_table, format_timings, write_comparison
from lightning_apps.eval import (
    ConfigError,
    Described,
    _is_int,
    _opencv_version,
    _plain,
    build_session,
    check_config,
    describe_with,
    output_dir,
    override_keys,
    rerank_with,
    run_meta,
    score,
    with_default_dataset,
)
from lightning_apps.paths import CONF_DIR

log = logging.getLogger("lightning_apps.compare")

#: Row labels of the config names (others are shown by their config name).
LABELS = {
    "gem": "GeM",
    "spoc": "SPoC",
    "mac": "MAC",
    "rmac": "R-MAC",
    "crow": "CroW",
    "hew": "HeW",
    "hew_hewr": "HeW (hewr)",
    "agaussian_echannel": "aGaussian+eChannel",
    "temb": "T-emb (MAX, democratic)",
    "vlad": "VLAD",
    "fv": "FV",
    "aqe": "AQE",
    "alpha_qe": "alpha-QE",
    "qe_her": "QE + HeR",
    "her": "HeR",
    "dba": "DBA",
    "diffusion": "diffusion",
    "regional_diffusion": "regional diffusion",
    "dsm": "DSM",
    "dsm_diffusion": "DSM + diffusion",
}
#: Command-line keys that belong to the comparison itself (not repeated in each row's single-run command).
_OWN_KEYS = ("mode", "compare", "output_dir", "hydra")


def group_node(group: str, name: str, overrides: Any = None) -> DictConfig:
    """``conf/<group>/<name>.yaml`` with ``overrides`` (a mapping of dotted keys) merged in."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(
            f"eval: compare.{group}s names {name!r}, which is not in conf/{group}/; choose from {choices}."
        )
    node = OmegaConf.load(path)
    for key, value in dict(_plain(overrides) or {}).items():
        OmegaConf.update(node, str(key), value, force_add=False)
    return node  # type: ignore[return-value]


def check_compare(cfg: DictConfig) -> None:
    """Check the ``compare`` section (names, baseline, numbers); one :class:`ConfigError` lists every problem."""
    c = cfg.get("compare")
    if c is None:
        raise ConfigError("eval: mode=compare needs the `compare` section of conf/eval.yaml; it is missing.")
    problems = []
    pools, reranks = _plain(c.get("pools")), _plain(c.get("reranks"))
    if not isinstance(pools, list) or not pools or not all(isinstance(p, str) for p in pools):
        problems.append(f"compare.pools must be a non-empty list of conf/pool names; got {pools!r}.")
    elif len(set(pools)) != len(pools):
        problems.append(f"compare.pools must be distinct; got {pools!r}.")
    elif c.get("baseline") not in pools:
        problems.append(f"compare.baseline must be one of compare.pools {pools}; got {c.get('baseline')!r}.")
    if not isinstance(reranks, list) or not all(isinstance(r, str) and r != "none" for r in reranks):
        problems.append(f"compare.reranks must be a list of conf/rerank names (not none); got {reranks!r}.")
    elif len(set(reranks)) != len(reranks):
        problems.append(f"compare.reranks must be distinct; got {reranks!r}.")
    imsize = _plain(c.get("imsize"))
    if imsize is not None and not _is_int(imsize):
        problems.append(f"compare.imsize must be null (the run's imsize) or an int; got {imsize!r}.")
    n_boot = _plain(c.get("n_boot"))
    if not _is_int(n_boot) or n_boot < 100:
        problems.append(f"compare.n_boot must be an int >= 100 (bootstrap resamples); got {n_boot!r}.")
    overrides = _plain(c.get("overrides")) or {}
    if not isinstance(overrides, dict):
        problems.append(f"compare.overrides must map a pool or rerank name to its overrides; got {overrides!r}.")
    else:
        # Overrides of a known pool or rerank that this run leaves out are kept for when it is put back.
        known = {p.stem for group in ("pool", "rerank") for p in (CONF_DIR / group).glob("*.yaml")}
        unknown = sorted(set(overrides) - known)
        if unknown:
            problems.append(f"compare.overrides names {unknown}, which are not in conf/pool/ or conf/rerank/.")
    if problems:
        raise ConfigError("eval: invalid configuration: " + " ".join(problems))


def _flat(prefix: str, value: Any) -> list[str]:
    """Hydra command-line overrides (``a.b=v``) that set ``value`` under ``prefix``."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _flat(f"{prefix}.{k}", v)]
    text = str(value).replace(" ", "") if isinstance(value, list) else str(value)
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    return [f"{prefix}={text}"]


def _user_overrides() -> list[str]:
    """The command line's overrides that also apply to a single run (not ``mode``, ``compare.*``, ``output_dir``).

    An ``imsize=`` among them wins over ``compare.imsize``.
    """
    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under @hydra.main (tests call run_compare directly)
        return []
    return [o for o in task if not override_keys([o]) & set(_OWN_KEYS)]


def _command(cfg: DictConfig, pool: str, rerank: str | None, base: Sequence[str]) -> str:
    """The single-pipeline command line whose numbers equal this row's."""
    parts = ["python -m lightning_apps.eval mode=single", *base]
    if cfg.compare.get("imsize") is not None:
        parts.append(f"imsize={cfg.imsize}")
    overrides = _plain(cfg.compare.get("overrides")) or {}
    parts.append(f"pool={pool}")
    parts += _flat("pool", overrides[pool]) if pool in overrides else []
    if rerank is not None:
        parts.append(f"rerank={rerank}")
        parts += _flat("rerank", overrides[rerank]) if rerank in overrides else []
    return " ".join(parts)


def _mean_map(results: dict[str, Any]) -> float:
    """The pool-choice score: mean of Medium and Hard mAP (the old protocol's mAP on old-style datasets)."""
    if "medium" in results:
        return (float(results["medium"]["map"]) + float(results["hard"]["map"])) / 2
    return float(results["map"])


def run_compare(cfg: DictConfig) -> list[Row] | None:
    """The side-by-side evaluation; returns the rows on the global-zero process (None elsewhere)."""
    cfg = with_default_dataset(cfg)
    check_compare(cfg)
    c = cfg.compare
    base = _user_overrides()
    if c.get("imsize") is not None and "imsize" in override_keys(base):
        with open_dict(cfg):  # an imsize on the command line wins over compare.imsize
            c.imsize = None
    if c.get("imsize") is not None:
        with open_dict(cfg):
            cfg.imsize = int(c.imsize)
    check_config(cfg)
    from lightning_apps.preflight import preflight

    pool_names, rerank_names = list(c.pools), list(c.reranks)
    overrides = _plain(c.get("overrides")) or {}
    pool_nodes = [group_node("pool", n, overrides.get(n)) for n in pool_names]
    rerank_nodes = [group_node("rerank", n, overrides.get(n)) for n in rerank_names]
    preflight(cfg, rerank_nodes)
    session, pools, reranks = build_session(cfg, pool_nodes, rerank_nodes)
    rows: list[Row] = []
    described: dict[str, Described] = {}
    scores: dict[str, float] = {}
    for name, pool, node in zip(pool_names, pools, pool_nodes, strict=True):
        label = LABELS.get(name, name)
        log.info("compare: pool %s", label)
        d = describe_with(session, pool, node)
        ranks, seconds = rerank_with(session, d, None)
        session.add_time(f"pool: {label}", d.seconds + seconds)
        results = score(session, ranks)
        described[name] = d
        if results is not None:
            scores[name] = _mean_map(results)
            rows.append(Row(label, "pool", _command(cfg, name, None, base), results, d.seconds + seconds))
    best = max(scores, key=lambda n: scores[n]) if scores else pool_names[0]
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # every process re-ranks the same
        picked = [best]
        torch.distributed.broadcast_object_list(picked, src=0)
        best = picked[0]
    d = described.pop(best)
    described.clear()  # the other pools' descriptors are not needed any more
    best_label = LABELS.get(best, best)
    for name, rerank in zip(rerank_names, reranks, strict=True):
        label = f"{best_label} + {LABELS.get(name, name)}"
        log.info("compare: %s", label)
        ranks, seconds = rerank_with(session, d, rerank)
        session.add_time(f"rerank: {LABELS.get(name, name)}", seconds)
        results = score(session, ranks)
        if results is not None:
            note = f"on {best_label}, the best pool (mean of Medium and Hard mAP on this test set)"
            rows.append(Row(label, "rerank", _command(cfg, best, name, base), results, seconds, note))
    if not rows:
        return None
    t_report = time.perf_counter()
    ds = session.ds
    out = output_dir(cfg)
    meta = {
        **run_meta(session),
        "whiten": cfg.whiten.get("fit") if d.whiten is not None else "none",
        "whiten_train": session.train.name if session.train is not None else None,
        "best_pool": best_label,
        "imsize": cfg.imsize,
        "scales": list(cfg.scales),
        "precision": session.precision,
        "unreadable_database_images": len(d.failures),
        "torch": torch.__version__,
        "opencv": _opencv_version(),  # DSM's MSER regions depend on the release (docs/dsm.md)
    }
    baseline = LABELS.get(str(c.baseline), str(c.baseline))
    kappas = list(cfg.kappas)
    n_boot, seed = int(c.n_boot), int(cfg.seed)
    table = comparison_table(rows, baseline, kappas=kappas, n_boot=n_boot, seed=seed)
    session.add_time("report", time.perf_counter() - t_report)
    timings = dict(session.timings)
    timings_total = time.perf_counter() - session.t0
    meta["seconds"] = round(timings_total, 1)
    files = write_comparison(
        out,
        rows,
        baseline=baseline,
        kappas=kappas,
        meta=meta,
        query_names=[p.stem for p in ds.queries],
        timings=timings,
        config_yaml=OmegaConf.to_yaml(cfg),
        n_boot=n_boot,
        seed=seed,
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
    )
    print(
        f"\n{ds.name} ({ds.protocol} protocol, {ds.num_queries} queries, {ds.num_images} images): "
        f"{cfg.backbone._target_} at imsize {cfg.imsize}, whiten={meta['whiten']}, precision={session.precision}; "
        f"re-rankers on {best_label}\n{table}\n\nwall time by stage:\n{format_timings(timings)}"
    )
    print(f"results: {files['markdown']}, {files['figure']} (took {timings_total:.0f} s)")
    return rows
