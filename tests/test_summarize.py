"""``python -m lightning_apps.summarize``: the columns of settings that differ between runs (hand-made run folders)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from lightning_apps import summarize

FIXED = "| dataset | backbone | precision | pooling | whitening | re-ranking"
HEADER = FIXED + " | Medium mAP | Hard mAP |"


def _config(**overrides: Any) -> dict[str, Any]:
    """The composed ``eval`` config (roxf, vgg16, GeM, learned whitening, no re-ranking), as config.yaml holds it."""
    cfg: dict[str, Any] = {
        "backbone": {"_target_": "deepagg.backbones.vgg16", "pretrained": True},
        "precision": "32-true",
        "pool": {"_target_": "deepagg.GeM", "p": 3.0, "eps": 1e-06, "learnable": False},
        "whiten": {
            "module": {"_target_": "deepagg.Whiten", "_partial_": True},
            "fit": "learned",
            "dim": None,
            "force_on_test": False,
        },
        "rerank": {},
        "trainer": {
            "_target_": "pytorch_lightning.Trainer",
            "accelerator": "auto",
            "devices": 1,
            "precision": "${precision}",
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": True,
            "use_distributed_sampler": False,
        },
        "data_root": "${oc.env:DEEPAGG_DATA,${oc.env:HOME}/.cache/deepagg/data}",
        "cache_dir": "${data_root}/features",
        "overwrite": False,
        "whiten_train": None,
        "ckpt_path": None,
        "imsize": 512,
        "scales": [1.0],
        "ms_power": 1.0,
        "batch_size": 8,
        "batching": "exact",
        "num_workers": 0,
        "kappas": [1, 5, 10],
        "num_vis_queries": 6,
        "seed": 0,
        "output_dir": None,
        "dataset": {
            "_target_": "deepagg.data.revisitop.load_revisitop",
            "data_root": "${data_root}",
            "name": "roxford5k",
        },
    }
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")  # pool__p=4.0 sets pool.p
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        if value is _DROP:
            node.pop(leaf)
        else:
            node[leaf] = value
    return cfg


_DROP = object()  # _config(ms_power=_DROP): a config written before the key existed


def _meta(cfg: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as the app writes it for ``cfg``."""
    rr = cfg["rerank"]
    rerank = f"{rr['_target_'].rsplit('.', 1)[-1]}(k={rr['k']}, alpha={rr['alpha']})" if rr else "none"
    return {
        "dataset": cfg["dataset"]["name"],
        "backbone": cfg["backbone"]["_target_"],
        "pool": cfg["pool"]["_target_"],
        "whiten": cfg["whiten"].get("fit", "none"),
        "rerank": rerank,
        "imsize": cfg["imsize"],
        "precision": cfg["precision"],
        "scales": cfg["scales"],
    }


def _write_run(
    root: Path,
    name: str,
    cfg: dict[str, Any] | None,
    medium: float = 0.5,
    *,
    where: str = "yaml",
    meta: dict[str, Any] | None = None,
) -> Path:
    """A run folder: results.json (+ config.yaml when ``where == "yaml"``, or a ``config`` entry for "json")."""
    out = root / name
    out.mkdir(parents=True)
    payload: dict[str, Any] = {
        "meta": meta if meta is not None else _meta(cfg or _config()),
        "kappas": [1, 5, 10],
        "protocol": "revisitop",
        "results": {"medium": {"map": medium}, "hard": {"map": medium / 2}},
    }
    if cfg is not None and where == "json":
        resolved = copy.deepcopy(cfg)
        resolved["trainer"]["precision"] = resolved["precision"]
        payload["config"] = resolved
    elif cfg is not None:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    (out / "results.json").write_text(json.dumps(payload))
    return out


def _rows(text: str) -> list[dict[str, str]]:
    """The table as one dict per row, keyed by the header."""
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")), strict=True)) for line in lines[2:]]


def test_imsize_scales_multirun_gives_distinct_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ms = [1.0, 0.7071067811865476]
    grid = [(128, [1.0], 0.40), (128, ms, 0.41), (192, [1.0], 0.42), (192, ms, 0.43)]
    for n, (imsize, scales, medium) in enumerate(grid):
        _write_run(tmp_path, f"multirun/{3 - n}", _config(imsize=imsize, scales=scales, output_dir=f"out/{n}"), medium)
    text = summarize.main([str(tmp_path)])
    assert text.splitlines()[0] == FIXED + " | imsize | scales | Medium mAP | Hard mAP |"
    assert text.splitlines()[1] == "|---|---|---|---|---|---|---|---|---:|---:|"
    rows = _rows(text)
    assert [(r["imsize"], r["scales"], r["Medium mAP"]) for r in rows] == [
        ("128", "[1.0]", "40.00"),
        ("128", "[1.0, 0.7071]", "41.00"),
        ("192", "[1.0]", "42.00"),
        ("192", "[1.0, 0.7071]", "43.00"),
    ]
    assert rows[0]["pooling"] == "GeM"
    assert rows[0]["precision"] == "32-true"
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("\n\ncommon settings: ms_power=1.0")  # imsize and scales are columns
    assert "common settings" not in text  # main returns the table alone


def test_numeric_order_and_floats_that_need_more_digits(tmp_path: Path) -> None:
    _write_run(tmp_path, "a", _config(imsize=1024, scales=[1.0, 0.70710678]))
    _write_run(tmp_path, "b", _config(imsize=64, scales=[1.0, 0.70711]))
    _write_run(tmp_path, "c", _config(imsize=128, scales=[1.0, 0.70711], ms_power=3))
    _write_run(tmp_path, "d", _config(imsize=128, scales=[1.0, 0.70711], ms_power=3.0, seed=1))
    rows = _rows(summarize.main([str(tmp_path)]))
    assert [r["imsize"] for r in rows] == ["64", "128", "128", "1024"]  # numbers sort as numbers
    assert [r["scales"] for r in rows] == ["[1.0, 0.70711]"] * 3 + ["[1.0, 0.707107]"]  # 4 digits would tie
    assert [r["ms_power"] for r in rows] == ["1.0", "3", "3.0", "1.0"]  # 3 == 3.0 does not make a column alone
    assert [r["seed"] for r in rows] == ["0", "0", "1", "0"]


def test_int_and_float_of_equal_value_are_not_a_difference(tmp_path: Path) -> None:
    _write_run(tmp_path, "a", _config(ms_power=3))
    _write_run(tmp_path, "b", _config(ms_power=3.0))
    assert summarize.main([str(tmp_path)]).splitlines()[0] == HEADER


def test_whiten_dim_becomes_a_column_rerank_parameters_are_in_their_column(tmp_path: Path) -> None:
    qe = {"_target_": "deepagg.QueryExpansion", "k": 10, "alpha": 3.0}
    _write_run(tmp_path, "a", _config(whiten__dim=None, rerank=qe), 0.1)
    _write_run(tmp_path, "b", _config(whiten__dim=128, rerank=qe), 0.2)
    _write_run(tmp_path, "c", _config(whiten__dim=128, rerank={**qe, "k": 5}), 0.3)
    _write_run(tmp_path, "d", _config(whiten__dim=128, rerank={**qe, "alpha": 0.0}), 0.4)
    text = summarize.main([str(tmp_path)])
    assert text.splitlines()[0] == FIXED + " | whiten.dim | Medium mAP | Hard mAP |"  # no rerank.k, rerank.alpha
    rows = _rows(text)
    assert [(r["re-ranking"], r["whiten.dim"], r["Medium mAP"]) for r in rows] == [
        ("QueryExpansion(k=5, alpha=3.0)", "128", "30.00"),  # numbers inside the cells sort numerically
        ("QueryExpansion(k=10, alpha=0.0)", "128", "40.00"),
        ("QueryExpansion(k=10, alpha=3.0)", "-", "10.00"),
        ("QueryExpansion(k=10, alpha=3.0)", "128", "20.00"),
    ]


def test_a_k_ablation_sorts_numerically(tmp_path: Path) -> None:
    her = {"_target_": "deepagg.HeR", "k": 800, "lam": None, "variant": "paper"}
    for k in (800, 25, 100, 50):
        meta = _meta(_config())
        meta["rerank"] = f"HeR(k={k}, lam=1.0, variant='paper')"
        _write_run(tmp_path, f"k{k}", _config(rerank={**her, "k": k}), k / 1000, meta=meta)
    rows = _rows(summarize.main([str(tmp_path)]))
    assert [r["Medium mAP"] for r in rows] == ["2.50", "5.00", "10.00", "80.00"]


def test_reranker_parameter_missing_from_its_repr_becomes_a_column(tmp_path: Path) -> None:
    for name, gamma in (("a", 3.0), ("b", 2.0)):
        cfg = _config(rerank={"_target_": "deepagg.Diffusion", "k": 50, "gamma": gamma})
        _write_run(tmp_path, name, cfg, meta={**_meta(_config()), "rerank": "Diffusion(k=50)"})
    rows = _rows(summarize.main([str(tmp_path)]))
    assert [r["rerank.gamma"] for r in rows] == ["2.0", "3.0"]
    assert "rerank.k" not in rows[0]


def test_a_key_missing_in_one_run(tmp_path: Path) -> None:
    _write_run(tmp_path, "old", _config(ms_power=_DROP), 0.1)
    _write_run(tmp_path, "new", _config(), 0.2)
    rows = _rows(summarize.main([str(tmp_path)]))
    assert [(r["ms_power"], r["Medium mAP"]) for r in rows] == [("-", "10.00"), ("1.0", "20.00")]


def test_keys_of_a_different_component_are_not_columns(tmp_path: Path) -> None:
    mac = _config(pool={"_target_": "deepagg.MAC"})
    _write_run(tmp_path, "mac", mac)
    _write_run(tmp_path, "gem", _config())
    assert summarize.main([str(tmp_path)]).splitlines()[0] == HEADER  # MAC has no p; the pooling column says so
    _write_run(tmp_path, "gem4", _config(pool__p=4.0))
    rows = _rows(summarize.main([str(tmp_path)]))
    assert [(r["pooling"], r["pool.p"]) for r in rows] == [("GeM", "3.0"), ("GeM", "4.0"), ("MAC", "-")]
    assert "pool.eps" not in rows[0]


def test_whitening_none_versus_learned_adds_no_column(tmp_path: Path) -> None:
    _write_run(tmp_path, "none", _config(whiten={"module": None}))
    _write_run(tmp_path, "lw", _config())
    rows = _rows(summarize.main([str(tmp_path)]))
    assert list(rows[0]) == [*HEADER.strip("| ").split(" | ")]
    assert [r["whitening"] for r in rows] == ["learned", "none"]


def test_runs_that_differ_only_in_ignored_settings(tmp_path: Path) -> None:
    ignored = {  # in config order
        "trainer__logger": True,
        "trainer__enable_checkpointing": True,
        "trainer__enable_model_summary": True,
        "trainer__enable_progress_bar": False,
        "data_root": "/data",
        "cache_dir": "/tmp/cache",
        "overwrite": True,
        "num_workers": 4,
        "num_vis_queries": 0,
        "output_dir": "x",
        "dataset__data_root": "/data",
        "hydra__run__dir": "outputs/x",
    }
    _write_run(tmp_path, "a", _config())
    _write_run(tmp_path, "b", _config(**ignored))
    text = summarize.main([str(tmp_path)])
    assert text.splitlines()[0] == HEADER
    assert len(_rows(text)) == 2
    shown = summarize.main([str(tmp_path), "--all-settings"]).splitlines()[0]
    want = [k.replace("__", ".") for k in ignored]
    assert shown == FIXED + " | " + " | ".join(want) + " | Medium mAP | Hard mAP |"  # config order


def test_same_fixed_columns_as_before_for_runs_differing_in_pool(tmp_path: Path) -> None:
    _write_run(tmp_path, "runs/mac", _config(pool={"_target_": "deepagg.MAC"}, whiten={"module": None}))
    _write_run(tmp_path, "runs/spoc", _config(pool={"_target_": "deepagg.SPoC"}, whiten={"module": None}))
    lines = summarize.main([str(tmp_path / "runs")]).splitlines()
    assert lines[0] == HEADER
    assert [line.split(" | ")[3] for line in lines[2:]] == ["MAC", "SPoC"]


def test_columns_forces_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path, "a", _config(imsize=128))
    _write_run(tmp_path, "b", _config(imsize=192))
    text = summarize.main([str(tmp_path), "--columns", "whiten.dim,backbone.pretrained", "scales", "num_workers"])
    assert text.splitlines()[0] == (
        FIXED + " | whiten.dim | backbone.pretrained | scales | num_workers | imsize | Medium mAP | Hard mAP |"
    )
    assert [(r["whiten.dim"], r["backbone.pretrained"], r["scales"], r["imsize"]) for r in _rows(text)] == [
        ("-", "true", "[1.0]", "128"),
        ("-", "true", "[1.0]", "192"),
    ]
    assert capsys.readouterr().out.rstrip().endswith("common settings: ms_power=1.0")  # scales is a column
    node = summarize.main([str(tmp_path), "--columns", "pool"]).splitlines()[0]
    assert node == FIXED + " | pool._target_ | pool.p | pool.eps | pool.learnable | imsize | Medium mAP | Hard mAP |"
    with pytest.raises(SystemExit, match=r"no run has the setting 'imsze'; did you mean \['imsize'\]"):
        summarize.main([str(tmp_path), "--columns", "imsze"])


def test_config_yaml_with_unresolvable_interpolations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPAGG_TEST_BATCH", "8")
    monkeypatch.delenv("DEEPAGG_TEST_UNSET", raising=False)
    _write_run(tmp_path, "a", _config(ms_power="${no_such_key}", batch_size="${oc.env:DEEPAGG_TEST_BATCH}"))
    _write_run(tmp_path, "b", _config(seed="${oc.env:DEEPAGG_TEST_UNSET}"))
    text = summarize.main([str(tmp_path), "--columns", "trainer.precision", "--all-settings"])
    rows = _rows(text)
    # Node interpolations resolve; unknown keys and resolver calls (this machine's environment) stay as written.
    assert [r["trainer.precision"] for r in rows] == ["32-true", "32-true"]
    assert [r["ms_power"] for r in rows] == ["1.0", "${no_such_key}"]  # run b first: numbers before text
    assert [r["batch_size"] for r in rows] == ["8", "${oc.env:DEEPAGG_TEST_BATCH}"]
    assert [r["seed"] for r in rows] == ["${oc.env:DEEPAGG_TEST_UNSET}", "0"]
    assert "cache_dir" not in rows[0]  # "${data_root}/features" in both: equal, not a column


def test_unreadable_config_yaml_is_skipped_with_a_warning(tmp_path: Path) -> None:
    _write_run(tmp_path, "a", _config(imsize=128))
    (_write_run(tmp_path, "b", None) / "config.yaml").write_text("imsize: [unclosed\n")
    with pytest.warns(UserWarning, match=r"ignoring unreadable .*config\.yaml"):
        rows = _rows(summarize.main([str(tmp_path)]))
    assert [r["imsize"] for r in rows] == ["128", "512"]  # run b: from its meta


def test_results_json_config_wins_over_config_yaml(tmp_path: Path) -> None:
    run = _write_run(tmp_path, "a", _config(imsize=256), where="json")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(_config(imsize=999))))
    _write_run(tmp_path, "b", _config(imsize=128))
    assert [r["imsize"] for r in _rows(summarize.main([str(tmp_path)]))] == ["128", "256"]


def test_old_runs_without_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old_meta = {k: v for k, v in _meta(_config()).items() if k not in ("imsize", "scales", "precision")}
    _write_run(tmp_path, "old1", None, 0.1, meta=old_meta)
    _write_run(tmp_path, "old2", None, 0.2, meta={**old_meta, "pool": "deepagg.MAC"})
    text = summarize.main([str(tmp_path)])
    assert text.splitlines()[0] == HEADER
    assert [(r["pooling"], r["precision"]) for r in _rows(text)] == [("GeM", "n/a"), ("MAC", "n/a")]
    assert "common settings" not in capsys.readouterr().out
    # Mixed with runs that have a config: only their differences become columns; the old run shows "-".
    _write_run(tmp_path, "new1", _config(whiten__dim=64), 0.3)
    _write_run(tmp_path, "new2", _config(), 0.4)
    _write_run(tmp_path, "old3", None, 0.5, meta=_meta(_config(imsize=1024)))
    text = summarize.main([str(tmp_path)])
    assert text.splitlines()[0] == FIXED + " | whiten.dim | imsize | Medium mAP | Hard mAP |"
    rows = _rows(text)
    got = {r["Medium mAP"]: (r["precision"], r["imsize"], r["whiten.dim"]) for r in rows}
    assert len(got) == 5
    assert got == {
        "10.00": ("n/a", "-", "-"),
        "30.00": ("32-true", "512", "64"),
        "40.00": ("32-true", "512", "-"),
        "50.00": ("32-true", "1024", "-"),  # imsize from meta
        "20.00": ("n/a", "-", "-"),
    }


def test_precision_from_config_when_meta_lacks_it(tmp_path: Path) -> None:
    meta = {k: v for k, v in _meta(_config()).items() if k != "precision"}
    _write_run(tmp_path, "a", _config(precision="bf16-mixed"), meta=meta)
    _write_run(tmp_path, "b", _config(), meta=meta)
    text = summarize.main([str(tmp_path)])
    assert text.splitlines()[0] == HEADER  # precision is the fixed column, not an extra one
    assert [r["precision"] for r in _rows(text)] == ["32-true", "bf16-mixed"]


def test_table_and_common_settings_api(tmp_path: Path) -> None:
    _write_run(tmp_path, "a", _config(scales=[1.0, 0.7071067811865476, 0.5]))
    _write_run(tmp_path, "b", _config(scales=[1.0, 0.7071067811865476, 0.5], pool={"_target_": "deepagg.MAC"}))
    runs = summarize.collect(tmp_path)
    assert summarize.common_settings(runs) == "common settings: imsize=512, scales=[1.0, 0.7071, 0.5], ms_power=1.0"
    assert summarize.common_settings(runs, ("seed",)) == "common settings: seed=0"
    assert summarize.table(runs, ("hard",), columns=["seed"]).splitlines()[0] == FIXED + " | seed | Hard mAP |"
    assert summarize.table(runs).splitlines()[0] == HEADER


def test_old_config_yaml_and_new_resolved_config_of_the_same_setup(tmp_path: Path) -> None:
    _write_run(tmp_path, "old", _config())  # config.yaml: ${data_root}, ${oc.env:...} unresolved
    data = "/home/me/.cache/deepagg/data"
    resolved = _config(data_root=data, cache_dir=f"{data}/features", dataset__data_root=data)
    _write_run(tmp_path, "new", resolved, where="json")
    assert summarize.main([str(tmp_path)]).splitlines()[0] == HEADER
