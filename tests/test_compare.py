"""The side-by-side main job (``mode=compare``): every row present, each equal to its single-pipeline run."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from lightning_apps import compare
from lightning_apps import eval as app
from lightning_apps.paths import CONF_DIR

from ._fakedata import make_fake_revisitop

REPO = Path(__file__).resolve().parents[1]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


# --------------------------------------------------------------------------------------------------------------
# Mode and config
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "mode"),
    [
        ([], "compare"),
        (["imsize=256", "+dataset=roxf", "dataset.seed=1"], "compare"),
        (["pool=hew"], "single"),
        (["rerank=dsm"], "single"),
        (["pool.p=4"], "single"),
        (["compare.pools=[gem]"], "compare"),
    ],
)
def test_auto_mode_is_single_when_a_pool_or_rerank_is_chosen(overrides: list[str], mode: str) -> None:
    cfg = _compose([])
    assert cfg.mode == "auto"
    assert app.resolve_mode(cfg, overrides) == mode


def test_explicit_mode_wins_and_bad_mode_is_an_error() -> None:
    assert app.resolve_mode(_compose(["mode=single"]), []) == "single"
    assert app.resolve_mode(_compose(["mode=compare"]), ["pool=hew"]) == "compare"
    with pytest.raises(app.ConfigError, match=r"mode must be one of \['auto', 'compare', 'single'\]; got 'both'"):
        app.resolve_mode(_compose(["mode=both"]), [])


def test_default_compare_section_names_every_paper() -> None:
    c = _compose([]).compare
    assert list(c.pools) == ["gem", "spoc", "hew", "agaussian_echannel", "temb"]
    assert list(c.reranks) == ["aqe", "alpha_qe", "qe_her", "diffusion", "regional_diffusion", "dsm", "dsm_diffusion"]
    assert c.baseline == "gem"
    compare.check_compare(app.with_default_dataset(_compose([])))
    for name in [*c.pools]:
        assert compare.group_node("pool", name).get("_target_")
    for name in [*c.reranks]:
        assert compare.group_node("rerank", name).get("_target_")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["compare.baseline=mac"], r"compare.baseline must be one of compare.pools \[.*\]; got 'mac'"),
        (["compare.pools=[]"], r"compare.pools must be a non-empty list of conf/pool names; got \[\]"),
        (["compare.pools=[gem,gem]"], r"compare.pools must be distinct; got \['gem', 'gem'\]"),
        (["compare.reranks=[none]"], r"compare.reranks must be a list of conf/rerank names \(not none\)"),
        (["compare.n_boot=10"], r"compare.n_boot must be an int >= 100 \(bootstrap resamples\); got 10"),
        (["compare.imsize=big"], r"compare.imsize must be null \(the run's imsize\) or an int; got 'big'"),
        (["+compare.overrides={hew_x:{lam:2}}"], r"compare.overrides names \['hew_x'\], which are not in conf/pool/"),
    ],
)
def test_compare_section_errors(overrides: list[str], match: str) -> None:
    with pytest.raises(app.ConfigError, match=match):
        compare.check_compare(_compose(overrides))


def test_unknown_row_name_lists_the_choices() -> None:
    with pytest.raises(app.ConfigError, match=r"compare.pools names 'nope', which is not in conf/pool/; choose from"):
        compare.group_node("pool", "nope")


def test_row_overrides_are_merged_and_spelled_in_the_command() -> None:
    node = compare.group_node("rerank", "dsm_diffusion", {"scales": [1.0], "diffusion": {"k": 10}})
    assert list(node.scales) == [1.0]
    assert node.diffusion.k == 10
    assert node.diffusion.kq == 5  # the rest of the YAML is kept
    cfg = _compose(["compare.imsize=320", "+compare.overrides={dsm_diffusion:{scales:[1.0],diffusion:{k:10}}}"])
    cfg.imsize = 320
    cmd = compare._command(cfg, "hew", "dsm_diffusion", ["backbone=vgg16"])
    assert cmd == (
        "python -m lightning_apps.eval mode=single backbone=vgg16 imsize=320 pool=hew rerank=dsm_diffusion "
        "rerank.scales=[1.0] rerank.diffusion.k=10"
    )


# --------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------

TINY = [
    "backbone=mobilenet_v2",
    "imsize=160",
    "compare.imsize=null",  # run_compare() outside Hydra sees no command line: imsize=160 must win explicitly
    "whiten=none",
    "trainer.enable_progress_bar=false",
    "compare.n_boot=500",
    "compare.pools=[gem,spoc,hew,agaussian_echannel]",
    "+compare.overrides={diffusion:{k:10},regional_diffusion:{k:20},dsm_diffusion:{diffusion:{k:10}}}",
]


def _single(command: str, base: list[str]) -> dict:
    """Run the single pipeline a row's command names (its pool/rerank overrides) on the test's base overrides."""
    args = shlex.split(command)[3:]
    assert args[0] == "mode=single"
    own = [a for a in args[1:] if a.split("=", 1)[0].split(".", 1)[0] in ("pool", "rerank")]
    cfg = _compose([*base, "mode=single", *own])
    return app.run(cfg)


@pytest.mark.debian
def test_side_by_side_on_clutter_tiny_has_every_row_and_equals_single_runs(
    tmp_path: Path, debian_packages: None
) -> None:
    base = ["+dataset=clutter_tiny", f"data_root={tmp_path / 'data'}", *TINY]
    rows = compare.run_compare(_compose([*base, "mode=compare", f"output_dir={tmp_path / 'cmp'}"]))
    assert rows is not None
    names = [r.name for r in rows]
    assert names[:4] == ["GeM", "SPoC", "HeW", "aGaussian+eChannel"]
    best = max(rows[:4], key=lambda r: r.results["medium"]["map"] + r.results["hard"]["map"]).name
    suffixes = ["AQE", "alpha-QE", "QE + HeR", "diffusion", "regional diffusion", "DSM", "DSM + diffusion"]
    assert names[4:] == [f"{best} + {s}" for s in suffixes]
    assert [r.kind for r in rows] == ["pool"] * 4 + ["rerank"] * 7
    # Files: the table has every row, the CSV one column per row and setup, the PNG exists.
    out = tmp_path / "cmp"
    md = (out / "results.md").read_text()
    assert all(f"| {n} " in md for n in names)
    with (out / "per_query_ap.csv").open() as fh:
        table = list(csv.reader(fh))
    assert table[0][0] == "query"
    assert f"{names[-1]}/hard" in table[0]
    assert len(table) == 1 + 8  # clutter_tiny: 8 queries
    assert (out / "compare.png").stat().st_size > 10_000
    payload = json.loads((out / "results.json").read_text())
    assert {"extraction", "build", "pool: GeM"} <= set(payload["timings"])
    # Every row equals its single-pipeline run (pools, QE chains, region vectors, DSM local features, diffusion).
    for row in rows:
        single = _single(row.command, [*base, f"output_dir={tmp_path / 'single'}"])
        for setup in ("easy", "medium", "hard"):
            np.testing.assert_array_equal(single[setup]["aps"], row.results[setup]["aps"], err_msg=row.name)
            assert single[setup]["map"] == row.results[setup]["map"]


def test_cli_compare_on_fake_data_spells_the_user_overrides_in_each_command(tmp_path: Path) -> None:
    make_fake_revisitop(tmp_path / "data")
    args = [
        "+dataset=roxf",
        f"data_root={tmp_path / 'data'}",
        "+dataset.check_counts=false",
        "backbone=mobilenet_v2",
        "backbone.pretrained=false",
        "imsize=128",
        "whiten=none",
        "trainer.enable_progress_bar=false",
        "compare.pools=[mac,gem]",
        "compare.baseline=gem",
        "compare.reranks=[aqe]",
        "compare.n_boot=200",
        f"output_dir={tmp_path / 'out'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_apps.eval", *args, f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wall time by stage:" in proc.stdout
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    commands = [row["command"] for row in payload["rows"]]
    assert [row["name"] for row in payload["rows"]] == ["MAC", "GeM", f"{payload['meta']['best_pool']} + AQE"]
    for cmd in commands:
        assert cmd.startswith("python -m lightning_apps.eval mode=single +dataset=roxf ")
        assert "imsize=128" in cmd  # the command line's imsize wins over compare.imsize
        assert cmd.count("imsize=") == 1
        assert "compare." not in cmd
        assert "output_dir" not in cmd


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["eval", "dataset.seed=1"], ["eval", "+dataset.seed=1"]),
        (["eval", "dataset.seed=1", "pool=hew"], ["eval", "+dataset.seed=1", "pool=hew"]),
        (["eval", "+dataset=clutter", "dataset.seed=1"], ["eval", "+dataset=clutter", "dataset.seed=1"]),
        (["eval", "+dataset=roxf", "dataset.name=rparis6k"], ["eval", "+dataset=roxf", "dataset.name=rparis6k"]),
        (["eval", "imsize=256"], ["eval", "imsize=256"]),
    ],
)
def test_dataset_keys_without_a_dataset_set_the_default_clutter(argv: list[str], want: list[str]) -> None:
    assert app.dataset_key_overrides(argv) == want


def test_default_dataset_takes_the_users_seed() -> None:
    cfg = app.with_default_dataset(_compose(["+dataset.seed=1"]))
    assert cfg.dataset._target_ == "deepagg.data.ensure_clutter"
    assert cfg.dataset.seed == 1
    assert cfg.dataset.variant == "default"
    assert app.with_default_dataset(_compose([])).dataset.seed == 0


def test_summarize_prints_side_by_side_tables_and_skips_them_in_its_own(tmp_path: Path) -> None:
    from lightning_apps import summarize

    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "results.json").write_text(json.dumps({"kind": "comparison", "rows": []}))
    table = "| method | kind |\n|---|---|\n| GeM | pool |"
    (tmp_path / "cmp" / "results.md").write_text(f"# clutter\n\nintro\n\n{table}\n\nmore\n")
    assert summarize.collect(tmp_path) == []
    text = summarize.main([str(tmp_path)])
    assert text == f"{tmp_path / 'cmp'} (side by side; the paired statistics are in its results.md):\n{table}"
    (tmp_path / "cmp" / "results.md").unlink()
    with pytest.raises(SystemExit, match=r"no results\.json below"):
        summarize.main([str(tmp_path)])
