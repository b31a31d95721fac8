"""Smoke run of every benchmark (tiny sizes): each must run, agree with its reference and report its rows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks import bench_spatial
from benchmarks import run as bench_run


def test_benchmarks_quick(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    rows = bench_run.main(["--quick", "--json", str(out)])
    names = {r["bench"] for r in rows}
    assert names == {"diffusion", "embedding", "extraction", "heat", "metrics", "pooling", "qe", "spatial"}
    for r in rows:
        assert r["ours_ms"] > 0
        assert r["ref_ms"] > 0
        # the torch MSER's rows give the fraction of OpenCV's features it misses (ties OpenCV breaks by scan order)
        assert r["max_abs_diff"] < (0.1 if "backend=torch" in r["case"] else 1e-4)
    payload = json.loads(out.read_text())
    assert payload["meta"]["quick"] is True
    assert len(payload["rows"]) == len(rows)
    assert "| bench | case |" in capsys.readouterr().out


def test_bench_spatial_quick(tmp_path: Path, monkeypatch, capsys) -> None:
    # The synthetic positives (warps of the query) must be found: more inliers than the negatives.
    q, db, pos = bench_spatial.synthetic_features(12, 128, 3, positives=0.25)
    assert len(q) == 1
    assert len(db) == 12
    assert int(pos.sum()) == 3
    assert (db.counts() == 128).all()
    inl = bench_spatial.spatial_match(q, db).inliers
    assert inl[pos].min() > inl[~pos].max()
    # --real without feature maps: says so and falls back to the synthetic features.
    monkeypatch.setattr(bench_spatial, "FEATURE_DIR", tmp_path / "none")
    *_, source = bench_spatial.inputs(2, 16, 3, True, 0.5)
    assert source == "synthetic"
    assert "real inputs skipped" in capsys.readouterr().out
    rows = bench_spatial.main(["--quick", "--device", "cuda", "--profile", "--json", str(tmp_path / "spatial.json")])
    assert [r["bench"] for r in rows].count("spatial") == len(rows) >= 4
    assert all(r["ours_ms"] > 0 and r["ref_ms"] > 0 for r in rows)
    assert rows[0]["max_abs_diff"] == 0  # batched == per-pair loop, inlier counts
    torch_rows = [r for r in rows if "backend=torch" in r["case"]]
    cuda = torch.cuda.is_available()
    assert len(torch_rows) == (6 if cuda else 4)  # query / database x 1 image / 2 images per call (/ on the GPU)
    assert all(r["max_abs_diff"] < 0.1 for r in torch_rows)  # it finds (nearly) the OpenCV backend's features
    out = capsys.readouterr().out
    assert cuda or "CUDA is not available; the GPU detector row is skipped" in out
    assert "tentative correspondences per pair: mean" in out
    assert "target <= 50 ms per query: " in out
    assert ">= 20x the per-pair loop: " in out
    assert "cProfile, one call" in out
    assert json.loads((tmp_path / "spatial.json").read_text())["summary"]["pairs"] == 8


def test_bench_extraction_quick(tmp_path: Path) -> None:
    from benchmarks import bench_extraction

    rows = bench_extraction.main(["--quick", "--backbone", "mobilenet_v2", "--json", str(tmp_path / "x.json")])
    assert [r["shape"] for r in rows] == ["(1, 3, 96, 128)", "(1, 3, 48, 64)"]
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["ref_ms"] == rows[0]["ours_ms"]
    assert all(r["ours_ms"] > 0 for r in rows)
