"""The eval app with DSM: local features detected once and cached, dsm.pt, verified diffusion, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepagg import DSM, RerankState
from deepagg.functional import LocalFeatures
from deepagg.metrics import evaluate_revisited
from lightning_apps import eval as app

from ._fakedata import make_fake_revisitop
from .test_eval_app import _run

# Real (offline) MobileNetV2 weights: random weights give almost empty maps. 256 px: maps of 8 x 8 at scale 1.
DSM_RUN = ["whiten=none", "backbone.pretrained=true", "imsize=256", "rerank=dsm", "rerank.scales=[1.0,0.5]"]
pytestmark = pytest.mark.weights


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    make_fake_revisitop(tmp_path / "data")
    return tmp_path


def _map(out: Path) -> dict[str, float]:
    res = json.loads((out / "results.json").read_text())["results"]
    return {s: res[s]["map"] for s in ("medium", "hard")}


def _dsm_files(root: Path) -> list[Path]:
    return sorted((root / "data" / "features" / "dsm").glob("*/*.pt"))


def test_dsm_run_equals_the_library_on_its_features(fake_root: Path) -> None:
    _run([*DSM_RUN, "save_descriptors=true"], fake_root, "a")
    out = fake_root / "a"
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["rerank"].startswith("DSM(top=100, scales=[1.0, 0.5]")
    import cv2

    assert meta["opencv"] == cv2.__version__  # the MSER release the features came from
    saved = torch.load(out / "descriptors.pt", weights_only=True)
    dsm_pt = torch.load(out / "dsm.pt", weights_only=True)
    qf = LocalFeatures.from_dict(dsm_pt["q_local_features"])
    dbf = LocalFeatures.from_dict(dsm_pt["db_local_features"])
    assert len(qf) == 2
    assert len(dbf) == 10
    assert qf.num_scales == dbf.num_scales == 2
    assert int(dbf.counts().sum()) > 0
    # one cached file per image (queries and database)
    assert len(_dsm_files(fake_root)) == 12
    state = RerankState.initial(saved["q"], saved["db"], q_local_features=qf, db_local_features=dbf)
    dsm = DSM(scales=(1.0, 0.5))
    ranks = dsm.rerank(state).ranks
    assert torch.equal(dsm_pt["ranks"], ranks[:, : dsm_pt["ranks"].shape[1]])
    assert torch.equal(dsm_pt["inliers"], dsm.last_verification["inliers"])  # type: ignore[index]
    from deepagg.data.revisitop import load_revisitop

    gnd = load_revisitop(fake_root / "data", "roxford5k", check_counts=False).gnd
    res = evaluate_revisited(ranks.numpy(), gnd)
    got = _map(out)
    for s in ("medium", "hard"):
        assert got[s] == pytest.approx(float(res[s]["map"]), abs=1e-12)


def test_local_features_are_cached_and_reused(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(DSM_RUN, fake_root, "a")
    files = _dsm_files(fake_root)
    stamps = [f.stat().st_mtime_ns for f in files]
    import deepagg.nn.spatial as mod

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the second run must read the cached local features")

    monkeypatch.setattr(mod, "activation_features", boom)
    _run(DSM_RUN, fake_root, "b")
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert _map(fake_root / "a") == _map(fake_root / "b")


def test_other_detector_settings_get_their_own_cache_entries(fake_root: Path) -> None:
    _run(DSM_RUN, fake_root, "a")
    _run([*DSM_RUN, "rerank.detector.delta=8"], fake_root, "b")
    assert len(_dsm_files(fake_root)) == 24


def test_another_opencv_release_gets_its_own_cache_entries(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Features cached under one OpenCV release are not read back under another (a release may change MSER).
    import cv2

    _run(DSM_RUN, fake_root, "a")
    assert len(_dsm_files(fake_root)) == 12
    monkeypatch.setattr(cv2, "__version__", "99.0.0")
    _run(DSM_RUN, fake_root, "b")
    assert len(_dsm_files(fake_root)) == 24


def test_dsm_diffusion_runs(fake_root: Path) -> None:
    _run([*DSM_RUN, "rerank=dsm_diffusion", "rerank.diffusion.k=3", "rerank.diffusion.kq=2"], fake_root, "a")
    meta = json.loads((fake_root / "a" / "results.json").read_text())["meta"]
    assert "verified=10, seeds=5" in meta["rerank"]
    assert (fake_root / "a" / "dsm.pt").is_file()


def test_dsm_needs_cached_maps(fake_root: Path) -> None:
    with pytest.raises(app.ConfigError, match=r"needs \['q_local_features', 'db_local_features'\] .* set store=maps"):
        _run([*DSM_RUN, "store=descriptors"], fake_root, "a")


def _feature_keys(f: LocalFeatures, i: int) -> set[tuple[int, int, float, float]]:
    """Image ``i``'s features as (channel, scale, centre x, centre y)."""
    k = int(f.counts()[i])
    return set(zip(f.channels[i, :k].tolist(), f.scales[i, :k].tolist(), *f.centers[i, :k].T.tolist(), strict=True))


def test_torch_detector_runs_without_opencv(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # rerank.detector.backend=torch: the batched torch MSER, no OpenCV needed (preflight included); its features
    # are cached under their own keys and agree with OpenCV's (see deepagg.functional.mser for where they may not).
    import importlib.util
    import sys

    _run(DSM_RUN, fake_root, "a")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cv2" else real(name, *a))
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    _run([*DSM_RUN, "rerank.detector.backend=torch"], fake_root, "b")
    assert len(_dsm_files(fake_root)) == 24
    meta = json.loads((fake_root / "b" / "results.json").read_text())["meta"]
    assert "'backend': 'torch'" in meta["rerank"]
    assert meta["opencv"] == "none"
    same = total = 0
    for role in ("q_local_features", "db_local_features"):
        fa = LocalFeatures.from_dict(torch.load(fake_root / "a" / "dsm.pt", weights_only=True)[role])
        fb = LocalFeatures.from_dict(torch.load(fake_root / "b" / "dsm.pt", weights_only=True)[role])
        for i in range(len(fa)):
            same += len(_feature_keys(fa, i) & _feature_keys(fb, i))
            total += int(fa.counts()[i])
    assert total > 0
    assert same >= 0.95 * total, (same, total)


def test_torch_detector_batches_images_of_one_shape(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Images whose maps have the same shapes (the fake database's crops) go to the detector together; the features
    # are those of one image per call.
    calls: list[int] = []
    real = app._detect_and_save

    def spy(dsm, pending, *args):  # type: ignore[no-untyped-def]
        calls.append(len(pending))
        real(dsm, pending, *args)

    monkeypatch.setattr(app, "_detect_and_save", spy)
    _run([*DSM_RUN, "rerank.detector.backend=torch"], fake_root, "a")
    assert max(calls) > 1
    assert sum(calls) == 12  # every image once
    monkeypatch.setattr(app, "TORCH_DETECTOR_IMAGES_PER_CALL", 1)
    calls.clear()
    _run([*DSM_RUN, "rerank.detector.backend=torch", "overwrite=true"], fake_root, "b")
    assert calls == [1] * 12
    for role in ("q_local_features", "db_local_features"):
        fa = LocalFeatures.from_dict(torch.load(fake_root / "a" / "dsm.pt", weights_only=True)[role])
        fb = LocalFeatures.from_dict(torch.load(fake_root / "b" / "dsm.pt", weights_only=True)[role])
        for name, x in fa.as_dict().items():
            assert torch.equal(x, getattr(fb, name)), (role, name)
