"""The eval app with diffusion: global and regional runs, the graph cache, saved descriptors, the Fig. 3 command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepagg import Diffusion, RerankState
from deepagg.metrics import evaluate_revisited
from lightning_apps import diffusion_figure
from lightning_apps import eval as app

from ._fakedata import make_fake_revisitop
from .test_eval_app import _run

# Real (offline) MobileNetV2 weights: a randomly initialised backbone gives all-zero maps at this size.
GLOBAL = ["whiten=none", "backbone.pretrained=true", "rerank=diffusion", "rerank.k=3", "rerank.kq=2"]
REGIONAL = ["whiten=none", "backbone.pretrained=true", "rerank=regional_diffusion", "rerank.k=5", "rerank.kq=5"]
pytestmark = pytest.mark.weights


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    make_fake_revisitop(tmp_path / "data")
    return tmp_path


def _graphs(root: Path) -> list[Path]:
    return sorted((root / "data" / "features" / "graphs").glob("*.pt"))


def _map(out: Path) -> dict[str, float]:
    res = json.loads((out / "results.json").read_text())["results"]
    return {s: res[s]["map"] for s in ("medium", "hard")}


def test_global_diffusion_run_equals_the_library_on_its_descriptors(fake_root: Path) -> None:
    _run([*GLOBAL, "save_descriptors=true"], fake_root, "a")
    out = fake_root / "a"
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["rerank"].startswith("Diffusion(regional=False, k=3, kq=2")
    assert meta["rank_seconds"] >= 0
    graphs = _graphs(fake_root)
    assert len(graphs) == 1
    assert "-k3-g3-torch-flat" in graphs[0].name
    saved = torch.load(out / "descriptors.pt", weights_only=True)
    assert saved["q"].shape[0] == 2
    assert saved["db"].shape[0] == 10
    ranks = Diffusion(k=3, kq=2).rerank(RerankState.initial(saved["q"], saved["db"])).ranks
    from deepagg.data.revisitop import load_revisitop

    gnd = load_revisitop(fake_root / "data", "roxford5k", check_counts=False).gnd
    res = evaluate_revisited(ranks.numpy(), gnd)
    got = _map(out)
    for s in ("medium", "hard"):
        assert got[s] == pytest.approx(float(res[s]["map"]), abs=1e-12)


def test_graph_is_cached_and_reused_across_runs(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(GLOBAL, fake_root, "a")
    (graph,) = _graphs(fake_root)
    stamp = graph.stat().st_mtime_ns
    import deepagg.nn.diffusion as mod

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the second run must load the cached graph")

    monkeypatch.setattr(mod, "mutual_knn_affinity", boom)
    _run(GLOBAL, fake_root, "b")
    assert graph.stat().st_mtime_ns == stamp
    assert _map(fake_root / "a") == _map(fake_root / "b")


def test_regional_diffusion_runs_on_region_vectors(fake_root: Path) -> None:
    _run([*REGIONAL, "save_descriptors=regions"], fake_root, "a")
    saved = torch.load(fake_root / "a" / "descriptors.pt", weights_only=True)
    ex = saved["extras"]
    assert ex["db_regions"].shape[:2] == ex["db_region_mask"].shape
    assert ex["db_regions"].shape[0] == 10
    assert ex["q_regions"].shape[0] == 2
    assert bool(ex["db_region_mask"][:, 0].all())  # region 0, the whole map, is always there
    valid = ex["db_regions"][ex["db_region_mask"]]
    torch.testing.assert_close(valid.norm(dim=1), torch.ones(valid.shape[0]))
    ranks = (
        Diffusion(regional=True, k=5, kq=5)
        .rerank(
            RerankState.initial(
                saved["q"],
                saved["db"],
                db_regions=ex["db_regions"],
                db_region_mask=ex["db_region_mask"],
                q_regions=ex["q_regions"],
                q_region_mask=ex["q_region_mask"],
            )
        )
        .ranks
    )
    from deepagg.data.revisitop import load_revisitop

    gnd = load_revisitop(fake_root / "data", "roxford5k", check_counts=False).gnd
    res = evaluate_revisited(ranks.numpy(), gnd)
    assert _map(fake_root / "a")["hard"] == pytest.approx(float(res["hard"]["map"]), abs=1e-12)


def test_regional_diffusion_needs_cached_maps(fake_root: Path) -> None:
    msg = r"needs \['db_regions', .*\(region vectors or local features\).* set store=maps \(got store=descriptors\)"
    with pytest.raises(app.ConfigError, match=msg):
        _run([*REGIONAL, "store=descriptors"], fake_root)
    with pytest.raises(app.ConfigError, match=r"save_descriptors must be false, true or regions; got 'all'"):
        _run([*GLOBAL, "save_descriptors=all"], fake_root)
    assert not (fake_root / "data" / "features").exists()


def test_too_large_k_is_a_clear_error(fake_root: Path) -> None:
    with pytest.raises(ValueError, match=r"k must be < the number of graph nodes 10 .* got k = 50"):
        _run(["whiten=none", "rerank=diffusion"], fake_root)


def test_iteration_figure_from_a_run(fake_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run([*REGIONAL, "save_descriptors=regions"], fake_root, "a")
    png = fake_root / "fig.png"
    args = ["--run", str(fake_root / "a"), "--regional", "--k", "5", "--kq", "5", "--iters", "0,1,2,20"]
    assert diffusion_figure.main([*args, "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in out.splitlines() if line.strip()[:2].strip().isdigit()]
    assert [int(r.split("|")[0]) for r in rows] == [0, 1, 2, 20]
    # 20 CG iterations give the mAP of the app's run (same graph, same seeds, same solver).
    cg_hard = float(rows[-1].split("|")[1].split("/")[1])
    assert cg_hard == pytest.approx(100 * _map(fake_root / "a")["hard"], abs=0.01)
    assert diffusion_figure.main(["--run", str(fake_root), "--out", str(png)]) == 2
    assert "has no descriptors.pt; run the eval app with save_descriptors" in capsys.readouterr().err
    assert diffusion_figure.main([*args, "--iters", "a,b"]) == 2
    assert "--iters must be comma-separated ints >= 0; got 'a,b'" in capsys.readouterr().err
