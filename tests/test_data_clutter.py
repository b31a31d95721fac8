"""Tests of the embedded ``clutter`` benchmark builder and its Debian sources.

Tests marked ``debian`` need the Debian packages (``apt-get download``, cached in ``$DEEPAGG_CACHE/debian``
or ``~/.cache/deepagg/debian`` across sessions, so a rerun is fast); they are skipped where apt-get is not on
PATH and the cache is not already filled. The others run anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deepagg.data import RetrievalDataset, build_clutter, ensure_clutter, fetch_debs, load_gnd, read_gnd_file
from deepagg.data import clutter as clutter_mod
from deepagg.data import sources as sources_mod
from deepagg.data.clutter import BUILDER_VERSION, THRESHOLDS, VARIANTS, ViewThresholds, classify_view
from deepagg.data.sources import PACKAGES, DebianSourceError, default_cache_dir

NAME = "clutter_tiny"
LW_DIM = 512  # VGG16 GeM descriptors: the learned whitening fitted on clutter_train needs that many dimensions

# The 1.1 builder: the last commit of deepagg/data/clutter.py before clutter_train grew (1.2). The default and
# tiny variants are still at 1.1 and must stay byte-identical to what that code writes.
V1_1_COMMIT = "bd88f61ebfb8e29845710530de3d1ee9d50b0d41"
# ... and what it wrote with seed 0, recorded with the environment below (the manifest's "software" and the
# sha256 of every .deb): sha256 of the gnd pickle and of manifest.json (which holds every image's sha256).
V1_1_ENV = {
    "software": {"numpy": "2.4.6", "pillow": "13.0.0"},
    "debs": {
        "darknet": "9ca14d36112d242a782bfed4104fa5adcd2ae8bc599ab610f42eb609ee125a01",
        "lomiri-wallpapers-16.04": "a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab",
        "lomiri-wallpapers-20.04": "d44e89b8473aafe64a5b678f014862dc31335aaaf18665c544d985d854f1a709",
        "mate-backgrounds": "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04",
        "opencv-doc": "4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a",
        "plasma-workspace-wallpapers": "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b",
        "tuxpaint-stamps-default": "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34",
    },
}
V1_1_HASHES = {
    "tiny": (
        "498a34854bba9a583433f0a421e794848ed19402a5da20b1178f5c5292a46fc6",
        "f0c3c4219580cfbcca1d68e7f3449a0ac58647e9466e5a2b44070ff7912a4770",
    ),
    "default": (
        "c636e38cd29585f9bdd132fecbdcd2a31475d52e07919695d3b7da488eb2beb9",
        "2d270cf5169845cbaf470835ac31e16017cc87060f5d107596f2747e3d1d7c8d",
    ),
}


# --------------------------------------------------------------------------------------------- no Debian needed


class TestClassifyView:
    def test_sets(self):
        t = THRESHOLDS
        assert classify_view(1.0, 0.5, 0.0) == "easy"
        assert classify_view(t.easy_min_visible, t.easy_min_size, t.easy_max_warp) == "easy"
        assert classify_view(0.79, 0.5, 0.0) == "hard"  # occluded
        assert classify_view(1.0, 0.2, 0.0) == "hard"  # small
        assert classify_view(1.0, 0.5, 0.5) == "hard"  # strongly warped
        assert classify_view(0.29, 0.5, 0.0) == "junk"  # barely visible
        assert classify_view(1.0, 0.06, 0.0) == "junk"  # tiny

    def test_custom_thresholds(self):
        loose = ViewThresholds(easy_min_size=0.1)
        assert classify_view(1.0, 0.2, 0.0, loose) == "easy"

    def test_warp_score(self):
        assert clutter_mod._warp_score(15.0, 0.0) == pytest.approx(0.5)
        assert clutter_mod._warp_score(-3.0, 0.25) == pytest.approx(1.0)


def _fake_folder(root: Path, variant: str, version: str, seed: int = 0) -> None:
    """A ``<root>/<name>`` that ensure_clutter takes for a build of ``variant`` by builder ``version`` with ``seed``."""
    folder = root / (VARIANTS[variant].name + (f"_seed{seed}" if seed else ""))
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"seed": seed, "variant": variant, "builder_version": version}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with (folder / f"gnd_{folder.name}.pkl").open("wb") as fh:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": []}, fh)


class TestVariants:
    def test_versions(self):
        # 1.2 changed clutter_train only: clutter and clutter_tiny folders written by 1.1 stay valid
        assert VARIANTS["default"].version == "1.1"
        assert VARIANTS["tiny"].version == "1.1"
        assert VARIANTS["train"].version == "1.2"
        newest = max((v.version for v in VARIANTS.values()), key=lambda v: tuple(int(x) for x in v.split(".")))
        assert newest == BUILDER_VERSION

    @pytest.mark.parametrize(
        ("variant", "stored", "rebuilt"),
        [("default", "1.1", False), ("tiny", "1.1", False), ("train", "1.1", True), ("train", "1.2", False)],
    )
    def test_ensure_compares_the_variant_version(self, tmp_path, monkeypatch, variant, stored, rebuilt):
        _fake_folder(tmp_path, variant, stored)
        calls = []

        def fake_build(root, *, variant, seed, cache_dir, overwrite, progress):
            calls.append(variant)
            _fake_folder(Path(root), variant, VARIANTS[variant].version)

        monkeypatch.setattr(clutter_mod, "build_clutter", fake_build)
        ds = ensure_clutter(tmp_path, variant, 0, progress=False)
        assert calls == ([variant] if rebuilt else [])
        assert ds.extra["manifest"]["builder_version"] == VARIANTS[variant].version

    def test_train_determines_learned_whitening(self):
        # Lw's positives: (query, easy/hard) and pairs of non-junk database views of one object; their
        # differences span (non-junk views) + (queries) - (objects) dimensions. The builder re-draws an object
        # with fewer than min_positives non-junk views, so even at that floor the span exceeds the descriptor.
        var = VARIANTS["train"]
        n = sum(1 for i in range(len(sources_mod.STAMP_OBJECTS)) if clutter_mod._split_of(i) == "train")
        assert n == 11
        assert n * (var.min_positives + len(var.queries) - 1) > LW_DIM
        assert var.min_positives <= var.home_views + var.paste_views - var.barely

    def test_train_is_more_of_the_same(self):
        # the 1.1 train plan scaled up: per 9 home crops 1 occluded, 1 border-cut, 2 strongly warped; 3 home
        # crops per paste; the default variant's two query kinds; the same image sizes
        var, old = VARIANTS["train"], {"occluded": 1, "border": 1, "strong_warp": 2}
        for role, per9 in old.items():
            assert round(getattr(var, role) * 9 / var.home_views) == per9
        assert round(var.home_views / var.paste_views) == 3
        assert var.barely == 0
        assert var.queries == VARIANTS["default"].queries
        same = ("out_long", "home_cap", "scene_cap", "min_object_px", "home_background", "scene_distractors")
        assert all(getattr(var, k) == getattr(VARIANTS["default"], k) for k in same)


class TestSeeds:
    """Seed N != 0 is an independent draw in its own folder ``<name>_seed<N>``, with its own object/photo split."""

    def test_names(self):
        assert [clutter_mod._dataset_name(v, 0, "f") for v in ("default", "tiny", "train")] == [
            "clutter",
            "clutter_tiny",
            "clutter_train",
        ]
        assert clutter_mod._dataset_name("default", 1, "f") == "clutter_seed1"
        assert clutter_mod._dataset_name("train", 12, "f") == "clutter_train_seed12"

    @pytest.mark.parametrize("seed", [-1, 1.0, True, "1"])
    def test_bad_seed_ensure(self, tmp_path, seed):
        with pytest.raises(ValueError, match=r"ensure_clutter\(\): seed must be a non-negative int"):
            ensure_clutter(tmp_path, "tiny", seed)

    def test_ensure_keeps_one_folder_per_seed(self, tmp_path, monkeypatch):
        calls = []

        def fake_build(root, *, variant, seed, cache_dir, overwrite, progress):
            calls.append((variant, seed))
            _fake_folder(Path(root), variant, VARIANTS[variant].version, seed)

        monkeypatch.setattr(clutter_mod, "build_clutter", fake_build)
        for seed in (0, 1, 0, 1, 2):  # alternating seeds build each one once
            ds = ensure_clutter(tmp_path, "default", seed, progress=False)
            assert ds.name == ("clutter" if seed == 0 else f"clutter_seed{seed}")
            assert ds.root == tmp_path / ds.name
            assert ds.extra["manifest"]["seed"] == seed
        assert calls == [("default", 0), ("default", 1), ("default", 2)]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["clutter", "clutter_seed1", "clutter_seed2"]

    def test_seed_0_split_is_the_fixed_rule(self):
        assert clutter_mod._splits(44, 0, "objects") == [clutter_mod._split_of(i) for i in range(44)]
        sides = [3000, 2000, 1000] * 20
        assert clutter_mod._photo_splits(sides, 0) == [clutter_mod._split_of(i) for i in range(60)]

    @pytest.mark.parametrize("seed", [1, 2, 7])
    def test_other_seeds_split_a_quarter(self, seed):
        n = len(sources_mod.STAMP_OBJECTS)
        split = clutter_mod._splits(n, seed, "objects")
        assert split == clutter_mod._splits(n, seed, "objects")  # a function of the seed only (every variant)
        assert split.count("train") == n // 4
        assert split != clutter_mod._splits(n, 0, "objects")
        # photos: a quarter of each size group (halve >= 2560 px, home >= 1800 px, smaller), so every seed's test
        # split has home regions for all its objects, as seed 0 has
        sides = [3000] * 28 + [2000] * 3 + [1000] * 30
        photo = clutter_mod._photo_splits(sides, seed)
        for lo, hi in ((0, 28), (28, 31), (31, 61)):
            assert photo[lo:hi].count("train") == (hi - lo) // 4

    def test_seeds_draw_other_objects(self):
        n = len(sources_mod.STAMP_OBJECTS)
        test = {s: {i for i, v in enumerate(clutter_mod._splits(n, s, "objects")) if v == "test"} for s in range(4)}
        for seed in (1, 2, 3):
            assert test[seed] - test[0], f"seed {seed} tests no object that seed 0 does not"
        assert len({frozenset(t) for t in test.values()}) == 4


class TestGeometry:
    def test_perspective_maps_corners(self):
        out = [(0.0, 0.0), (100.0, 0.0), (100.0, 50.0), (0.0, 50.0)]
        quad = [(10.0, 5.0), (130.0, 12.0), (120.0, 90.0), (3.0, 70.0)]
        a, b, c, d, e, f, g, h = clutter_mod._perspective(out, quad)
        for (x, y), (u, v) in zip(out, quad, strict=True):
            den = g * x + h * y + 1
            assert (a * x + b * y + c) / den == pytest.approx(u)
            assert (d * x + e * y + f) / den == pytest.approx(v)

    def test_fit_quad_inside(self):
        pts = clutter_mod._quad(90.0, 10.0, 300.0, 100.0, 20.0, [0.05] * 8)
        fitted = clutter_mod._fit_quad(pts, 200, 150)
        assert all(0 <= x <= 200 and 0 <= y <= 150 for x, y in fitted)

    def test_rng_keys(self):
        a = clutter_mod._rng(0, 1, "home", 3).random(4)
        b = clutter_mod._rng(0, 1, "home", 3).random(4)
        c = clutter_mod._rng(1, 1, "home", 3).random(4)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


class TestErrors:
    def test_unknown_variant(self, tmp_path):
        with pytest.raises(ValueError, match="variant must be one of"):
            build_clutter(tmp_path, variant="huge")
        with pytest.raises(ValueError, match="variant must be one of"):
            ensure_clutter(tmp_path, "huge")

    def test_bad_seed(self, tmp_path):
        with pytest.raises(ValueError, match="seed must be a non-negative int"):
            build_clutter(tmp_path, variant="tiny", seed=-1)

    def test_existing_folder(self, tmp_path):
        (tmp_path / NAME).mkdir()
        with pytest.raises(FileExistsError, match="overwrite=True"):
            build_clutter(tmp_path, variant="tiny")

    def test_bad_package_name(self, tmp_path):
        with pytest.raises(ValueError, match="Debian package names"):
            fetch_debs(["Not A Package"], tmp_path)

    def test_no_apt_get(self, tmp_path, monkeypatch):
        real_which = shutil.which
        monkeypatch.setattr(sources_mod.shutil, "which", lambda n: None if n == "apt-get" else real_which(n))
        with pytest.raises(DebianSourceError, match="apt-get is not on PATH"):
            fetch_debs(["darknet"], tmp_path)

    def test_not_found_message(self, tmp_path, monkeypatch):
        calls = []

        def fake_run(cmd, cwd=None):
            calls.append(list(cmd))
            if "update" in cmd:
                return 0, "Reading package lists... Done"
            return 100, "E: Unable to locate package no-such-pkg"

        monkeypatch.setattr(sources_mod, "_run", fake_run)
        monkeypatch.setattr(sources_mod.shutil, "which", lambda n: f"/usr/bin/{n}")
        with pytest.raises(DebianSourceError, match="no-such-pkg not found"):
            fetch_debs(["no-such-pkg"], tmp_path)
        # first try with the system lists, then apt-get update into a private lists dir, then a retry with it
        assert calls[0][-2:] == ["download", "no-such-pkg"]
        assert "update" in calls[1]
        assert any(a.startswith("Dir::State::Lists=") for a in calls[1])
        assert any(a.startswith("Dir::State::Lists=") for a in calls[2])
        assert not list((tmp_path / "debs").glob("*.deb"))

    def test_update_fails(self, tmp_path, monkeypatch):
        def fake_run(cmd, cwd=None):
            return (100, "E: Failed to fetch http://deb.debian.org/...") if "update" in cmd else (100, "E: 404")

        monkeypatch.setattr(sources_mod, "_run", fake_run)
        monkeypatch.setattr(sources_mod.shutil, "which", lambda n: f"/usr/bin/{n}")
        with pytest.raises(DebianSourceError, match="apt-get update"):
            fetch_debs(["darknet"], tmp_path)

    def test_no_dpkg(self, tmp_path, monkeypatch):
        (tmp_path / "debs").mkdir()
        (tmp_path / "debs" / "darknet_1.0_amd64.deb").write_bytes(b"not a deb")
        monkeypatch.setattr(sources_mod.shutil, "which", lambda n: None)
        with pytest.raises(DebianSourceError, match="dpkg is not on PATH"):
            fetch_debs(["darknet"], tmp_path)

    @pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg")
    def test_broken_deb(self, tmp_path):
        (tmp_path / "debs").mkdir()
        (tmp_path / "debs" / "darknet_1.0_amd64.deb").write_bytes(b"not a deb")
        with pytest.raises(DebianSourceError, match=r"dpkg -x darknet_1\.0_amd64\.deb failed"):
            fetch_debs(["darknet"], tmp_path)
        assert not (tmp_path / "extracted" / "darknet").exists()
        assert not list((tmp_path / "extracted").glob(".darknet.*"))

    def test_catalogue_errors(self, tmp_path):
        with pytest.raises(DebianSourceError, match=r"stamp_objects\(\): tuxpaint-stamps-default: expected file"):
            sources_mod.stamp_objects(tmp_path)
        with pytest.raises(DebianSourceError, match="was not fetched"):
            sources_mod.scene_photos({})
        with pytest.raises(DebianSourceError, match="not made by fetch_debs"):
            sources_mod.deb_record(tmp_path)

    def test_stamp_filter(self, tmp_path):
        from PIL import Image

        rng = np.random.default_rng(0)
        photo = rng.integers(0, 256, (240, 260, 4), dtype=np.uint8)
        photo[..., 3] = 255
        cases = {
            "rgb.png": (Image.fromarray(photo[..., :3]), "must be RGBA"),
            "small.png": (Image.fromarray(photo[:150, :150]), "long side >= 200"),
            "flat.png": (Image.fromarray(np.full((240, 260, 4), 200, dtype=np.uint8)), "opaque colours"),
        }
        for name, (img, msg) in cases.items():
            img.save(tmp_path / name)
            with pytest.raises(DebianSourceError, match=msg):
                clutter_mod._load_stamp(sources_mod.SourceFile("x", name, tmp_path / name))
        img = Image.fromarray(photo)
        img.save(tmp_path / "ok.png")
        assert clutter_mod._load_stamp(sources_mod.SourceFile("x", "ok.png", tmp_path / "ok.png")).size == (260, 240)

    def test_duplicate_objects_refused(self):
        from PIL import Image

        rng = np.random.default_rng(1)
        a = Image.fromarray(rng.integers(0, 256, (64, 80, 4), dtype=np.uint8))
        b = Image.fromarray(rng.integers(0, 256, (64, 80, 4), dtype=np.uint8))
        clutter_mod._check_distinct({"a": a, "b": b})
        with pytest.raises(DebianSourceError, match="near-duplicate"):
            clutter_mod._check_distinct({"a": a, "mirror": a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)})

    def test_parse_not_found(self):
        out = "E: Unable to locate package foo\nE: Package 'bar' has no installation candidate\n"
        assert sources_mod._not_found(out) == ["bar", "foo"]

    def test_default_cache_dir(self, monkeypatch, tmp_path):
        monkeypatch.setenv("DEEPAGG_CACHE", str(tmp_path))
        assert default_cache_dir() == tmp_path / "debian"

    def test_catalogue_is_sane(self):
        stamps = [f for files in sources_mod.STAMP_OBJECTS.values() for f in files]
        assert len(stamps) == len(set(stamps)), "a stamp file is listed twice"
        assert set(sources_mod.SCENE_FILES) | {sources_mod.STAMP_PACKAGE} == set(PACKAGES)
        # the fixed split leaves enough objects for the default variant and for train
        n = len(sources_mod.STAMP_OBJECTS)
        assert sum(1 for i in range(n) if i % 4 != 3) >= 30
        assert sum(1 for i in range(n) if i % 4 == 3) >= 10


# --------------------------------------------------------------------------------------------- Debian sources


@pytest.fixture(scope="session")
def debs() -> dict[str, Path]:
    """The Debian packages, downloaded once into the persistent user cache (not a tmp dir)."""
    try:
        return fetch_debs(PACKAGES)
    except DebianSourceError as exc:
        if shutil.which("apt-get") is None and not os.environ.get("DEEPAGG_REQUIRE_DEBIAN"):
            pytest.skip(f"needs the Debian packages of the clutter benchmark and apt-get is not on PATH: {exc}")
        raise


@pytest.fixture(scope="session")
def tiny(debs, tmp_path_factory) -> Path:
    return build_clutter(tmp_path_factory.mktemp("tiny_a"), variant="tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_seed1(debs, tmp_path_factory) -> Path:
    return build_clutter(tmp_path_factory.mktemp("tiny_s1"), variant="tiny", seed=1, progress=False)


@pytest.fixture(scope="session")
def builder_v1_1() -> Iterator[types.ModuleType | str]:
    """``deepagg/data/clutter.py`` as of :data:`V1_1_COMMIT`, imported under another name; or why it cannot be."""
    repo = Path(__file__).resolve().parents[1]
    git = shutil.which("git")
    if git is None:
        yield "git is not on PATH"
        return
    proc = subprocess.run(
        [git, "-C", str(repo), "show", f"{V1_1_COMMIT}:deepagg/data/clutter.py"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        yield f"git show {V1_1_COMMIT[:12]} failed (no history here?): {proc.stderr.strip()}"
        return
    name = "deepagg.data._clutter_v1_1"
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up while the class body runs
    try:
        exec(compile(proc.stdout, f"{V1_1_COMMIT[:12]}:deepagg/data/clutter.py", "exec"), module.__dict__)
    except ImportError as exc:  # a later deepagg.data.sources the old code cannot import from
        yield f"the 1.1 builder does not import against this deepagg: {exc}"
    else:
        yield module
    finally:
        sys.modules.pop(name, None)


def _same_files(a: Path, b: Path) -> None:
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"


def _check_recorded(folder: Path, variant: str) -> str | None:
    """Compare a seed-0 build with the hashes the 1.1 builder wrote; the reason to skip if the sources differ."""
    m = _manifest(folder)
    env = {"software": m["software"], "debs": {pkg: rec["sha256"] for pkg, rec in m["packages"].items()}}
    if env != V1_1_ENV:
        return f"the hashes were recorded with other .debs or Pillow/numpy: {V1_1_ENV} vs {env}"
    gnd_sha, manifest_sha = V1_1_HASHES[variant]
    assert hashlib.sha256((folder / f"gnd_{folder.name}.pkl").read_bytes()).hexdigest() == gnd_sha
    assert hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest() == manifest_sha
    hashes = _image_hashes(folder)
    assert hashes == {r["name"] + ".jpg": r["sha256"] for r in m["images"] + m["queries"]}
    return None


def _lw_pairs(manifest: dict, data: dict) -> np.ndarray:
    """Learned-whitening positives of a training build as the eval app takes them (rows: database, then queries)."""
    n_db = len(data["imlist"])
    pairs = [(n_db + qi, int(j)) for qi, g in enumerate(data["gnd"]) for j in np.concatenate([g["easy"], g["hard"]])]
    views: dict[str, list[int]] = {}
    for j, r in enumerate(manifest["images"]):
        if r["object"] is not None and r["gt"] != "junk":
            views.setdefault(r["object"], []).append(j)
    pairs += [(a, b) for idx in views.values() for i, a in enumerate(idx) for b in idx[i + 1 :]]
    return np.asarray(pairs, dtype=np.int64)


def _image_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "jpg").glob("*.jpg"))}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.debian
class TestSources:
    def test_fetch_is_cached(self, debs):
        again = fetch_debs(PACKAGES)
        assert again == debs
        for pkg, root in debs.items():
            record = sources_mod.deb_record(root)
            assert record["package"] == pkg
            assert len(record["sha256"]) == 64

    def test_catalogue_files_exist(self, debs):
        objects = sources_mod.stamp_objects(debs[sources_mod.STAMP_PACKAGE])
        assert len(objects) == len(sources_mod.STAMP_OBJECTS)
        photos = sources_mod.scene_photos(debs)
        assert len(photos) == sum(len(v) for v in sources_mod.SCENE_FILES.values())
        assert all(p.path.is_file() for p in photos)

    @pytest.mark.parametrize("seed", [0, 1, 2, 3])
    def test_splits_are_disjoint(self, debs, seed):
        test_ctx, test_ids, *_ = clutter_mod._catalogue(VARIANTS["default"], seed, None, False)
        train_ctx, train_ids, *_ = clutter_mod._catalogue(VARIANTS["train"], seed, None, False)
        assert not set(test_ids) & set(train_ids)
        test_photos = {r.src.key for r in test_ctx.scenes} | {s.key for s in test_ctx.occluders}
        train_photos = {r.src.key for r in train_ctx.scenes} | {s.key for s in train_ctx.occluders}
        assert not test_photos & train_photos
        assert len(test_ids) == 33
        assert len(train_ids) == 11
        tiny_ctx, tiny_ids, *_ = clutter_mod._catalogue(VARIANTS["tiny"], seed, None, False)
        assert set(tiny_ids) <= set(test_ids)
        assert {r.src.key for r in tiny_ctx.scenes} <= test_photos

    def test_seed_1_tests_other_objects(self, debs):
        _, test0, *_ = clutter_mod._catalogue(VARIANTS["default"], 0, None, False)
        _, train0, *_ = clutter_mod._catalogue(VARIANTS["train"], 0, None, False)
        _, test1, *_ = clutter_mod._catalogue(VARIANTS["default"], 1, None, False)
        assert set(test1) - set(test0)  # objects seed 0 trains on are test objects of seed 1
        assert set(test1) - set(test0) <= set(train0)


@pytest.mark.debian
class TestTinyBuild:
    def test_layout_and_load(self, tiny):
        assert tiny.name == NAME
        assert not list(tiny.parent.glob(f".{NAME}.*")), "a temporary build folder was left behind"
        ds = load_gnd(tiny, NAME)
        assert isinstance(ds, RetrievalDataset)
        assert ds.protocol == "revisited"
        assert ds.num_queries == 8
        assert 36 <= ds.num_images <= 44
        assert all(p.is_file() for p in ds.images + ds.queries)
        assert not set(ds.images) & set(ds.queries)

    def test_gnd_schema(self, tiny):
        data = read_gnd_file(tiny / f"gnd_{NAME}.pkl")
        assert set(data) == {"imlist", "qimlist", "gnd"}
        n = len(data["imlist"])
        sizes = {q["name"]: q["size"] for q in _manifest(tiny)["queries"]}
        for qname, g in zip(data["qimlist"], data["gnd"], strict=True):
            assert set(g) == {"bbx", "easy", "hard", "junk"}
            sets = [g[k] for k in ("easy", "hard", "junk")]
            for idx in sets:
                assert isinstance(idx, np.ndarray)
                assert idx.dtype == np.int64
                assert idx.ndim == 1
                assert ((idx >= 0) & (idx < n)).all()
            union = np.concatenate(sets)
            assert len(np.unique(union)) == len(union), "easy/hard/junk must be disjoint"
            assert len(g["easy"]) >= 1
            assert len(g["hard"]) >= 1
            x1, y1, x2, y2 = g["bbx"]
            w, h = sizes[qname]
            assert 0 <= x1 < x2 <= w
            assert 0 <= y1 < y2 <= h

    def test_gnd_matches_manifest(self, tiny):
        data = read_gnd_file(tiny / f"gnd_{NAME}.pkl")
        m = _manifest(tiny)
        assert m["thresholds"] == {k: getattr(THRESHOLDS, k) for k in m["thresholds"]}
        assert m["seed"] == 0
        assert m["builder_version"] == VARIANTS["tiny"].version
        assert [r["name"] for r in m["images"]] == data["imlist"]
        assert [q["name"] for q in m["queries"]] == data["qimlist"]
        for q, g in zip(m["queries"], data["gnd"], strict=True):
            expect: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
            for j, r in enumerate(m["images"]):
                if r["object"] == q["object"]:
                    assert r["kind"] in ("home-crop", "paste")
                    gt = classify_view(r["visible"], r["scale"], r["warp"])
                    assert gt == r["gt"]
                    expect[gt].append(j)
                else:  # other objects and distractors are negatives
                    assert r["object"] is None or r["object"] != q["object"]
            for key, idx in expect.items():
                assert g[key].tolist() == idx
        for r in m["images"]:
            assert (r["object"] is None) == (r["kind"] in ("scene", "home-background"))
            if r["object"] is not None:
                assert 0.0 <= r["visible"] <= 1.0
                x1, y1, x2, y2 = r["bbox"]
                assert 0 <= x1 < x2 <= r["size"][0]
                assert 0 <= y1 < y2 <= r["size"][1]

    def test_manifest_hashes(self, tiny, debs):
        m = _manifest(tiny)
        hashes = _image_hashes(tiny)
        for r in m["images"] + m["queries"]:
            assert hashes[r["name"] + ".jpg"] == r["sha256"]
        assert len(hashes) == len(m["images"]) + len(m["queries"])
        assert m["sources"], "the manifest must list its sources"
        for s in m["sources"]:
            root = debs[s["package"]]
            assert hashlib.sha256((root / s["path"]).read_bytes()).hexdigest() == s["sha256"]
        for o in m["objects"]:
            assert o["stamp"].startswith(sources_mod.STAMP_PACKAGE + ":")

    def test_deterministic(self, tiny, tmp_path):
        again = build_clutter(tmp_path, variant="tiny", seed=0, progress=False)
        assert (again / f"gnd_{NAME}.pkl").read_bytes() == (tiny / f"gnd_{NAME}.pkl").read_bytes()
        assert _image_hashes(again) == _image_hashes(tiny)
        assert (again / "manifest.json").read_bytes() == (tiny / "manifest.json").read_bytes()

    def test_other_seed_differs(self, tiny, tiny_seed1):
        other = tiny_seed1
        assert other.name == f"{NAME}_seed1"
        a, b = _image_hashes(other), _image_hashes(tiny)
        assert not set(a.values()) & set(b.values())
        assert (other / f"gnd_{NAME}_seed1.pkl").read_bytes() != (tiny / f"gnd_{NAME}.pkl").read_bytes()
        m0, m1 = _manifest(tiny), _manifest(other)
        assert (m1["dataset"], m1["variant"], m1["seed"]) == (f"{NAME}_seed1", "tiny", 1)
        assert m1["split_rule"] != m0["split_rule"]
        assert "permuted" in m1["split_rule"]
        assert "index % 4 == 3" in m0["split_rule"]
        assert {o["id"] for o in m1["objects"]} != {o["id"] for o in m0["objects"]}
        ds = load_gnd(other, other.name)
        assert ds.num_queries == 8
        assert all(p.is_file() for p in ds.images + ds.queries)

    def test_other_seed_stays_in_its_split(self, tiny_seed1, debs):
        # every object and photo of the seed-1 build is in seed 1's test split, none in its train split
        train_ctx, train_ids, *_ = clutter_mod._catalogue(VARIANTS["train"], 1, None, False)
        train_photos = {r.src.key for r in train_ctx.scenes} | {s.key for s in train_ctx.occluders}
        m = _manifest(tiny_seed1)
        assert not {o["id"] for o in m["objects"]} & set(train_ids)
        photos = {s["key"] for s in m["sources"] if s["package"] != sources_mod.STAMP_PACKAGE}
        assert photos
        assert not photos & train_photos

    def test_interrupted_build_leaves_nothing(self, debs, tmp_path, monkeypatch):
        calls = {"n": 0}
        real = clutter_mod._encode

        def failing(img):
            calls["n"] += 1
            if calls["n"] == 10:
                raise KeyboardInterrupt("simulated interruption")
            return real(img)

        monkeypatch.setattr(clutter_mod, "_encode", failing)
        with pytest.raises(KeyboardInterrupt):
            build_clutter(tmp_path, variant="tiny", progress=False)
        assert list(tmp_path.iterdir()) == []

    def test_interrupted_rebuild_keeps_old(self, tiny, tmp_path, monkeypatch):
        root = tmp_path / "root"
        shutil.copytree(tiny, root / NAME)
        before = _image_hashes(root / NAME)

        def boom(*args, **kwargs):
            raise RuntimeError("simulated failure")

        monkeypatch.setattr(clutter_mod, "_check_distinct", boom)
        with pytest.raises(RuntimeError, match="simulated failure"):
            build_clutter(root, variant="tiny", seed=0, overwrite=True, progress=False)
        assert sorted(p.name for p in root.iterdir()) == [NAME]
        assert _image_hashes(root / NAME) == before
        assert _manifest(root / NAME)["seed"] == 0

    def test_ensure_reuses_and_rebuilds(self, tiny, tmp_path, monkeypatch):
        root = tmp_path / "root"
        shutil.copytree(tiny, root / NAME)
        calls = []
        real = clutter_mod.build_clutter

        def counting(*args, **kwargs):
            calls.append(kwargs.get("seed"))
            return real(*args, **kwargs)

        monkeypatch.setattr(clutter_mod, "build_clutter", counting)
        mtime = os.stat(root / NAME / "manifest.json").st_mtime_ns
        ds = ensure_clutter(root, "tiny", 0, progress=False)
        assert calls == []
        assert os.stat(root / NAME / "manifest.json").st_mtime_ns == mtime
        assert ds.num_queries == 8
        assert ds.extra["manifest"]["seed"] == 0
        assert len(ds.fingerprint) == 64

        before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / NAME).rglob("*") if p.is_file()}
        ds1 = ensure_clutter(root, "tiny", 1, progress=False)
        assert calls == [1]
        assert ds1.name == f"{NAME}_seed1"
        assert ds1.root == root / f"{NAME}_seed1"
        assert ds1.extra["manifest"]["seed"] == 1
        assert ds1.fingerprint != ds.fingerprint
        ensure_clutter(root, "tiny", 1, progress=False)
        assert calls == [1]
        # the seed-0 folder is untouched by the seed-1 build, and reused as it was
        after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / NAME).rglob("*") if p.is_file()}
        assert after == before
        assert sorted(p.name for p in root.iterdir()) == [NAME, f"{NAME}_seed1"]
        assert ensure_clutter(root, "tiny", 0, progress=False).fingerprint == ds.fingerprint
        assert calls == [1]


@pytest.mark.debian
class TestUnchangedVariants:
    """``clutter_tiny`` and ``clutter`` are still what builder 1.1 wrote: 1.2 changed ``clutter_train`` only.

    Two independent checks. The 1.1 code itself, read from git at :data:`V1_1_COMMIT` and imported under
    another module name, builds the variant again from the same sources with the same Pillow: every file must
    be byte-identical, on any machine with the git history. The hashes recorded from that code need no git
    but hold only with the .debs and Pillow/numpy they were recorded with (skipped otherwise). The ``clutter``
    check builds the full variant (twice), so it is marked ``slow``.
    """

    def test_tiny_same_as_v1_1_code(self, tiny, builder_v1_1, tmp_path):
        if isinstance(builder_v1_1, str):
            pytest.skip(builder_v1_1)
        _same_files(builder_v1_1.build_clutter(tmp_path, variant="tiny", seed=0, progress=False), tiny)

    def test_tiny_same_as_recorded(self, tiny):
        reason = _check_recorded(tiny, "tiny")
        if reason is not None:
            pytest.skip(reason)

    @pytest.mark.slow
    def test_default_same_as_v1_1(self, debs, builder_v1_1, tmp_path):
        folder = build_clutter(tmp_path / "new", variant="default", seed=0, progress=False)
        reasons = [_check_recorded(folder, "default")]
        if isinstance(builder_v1_1, str):
            reasons.append(builder_v1_1)
        else:
            _same_files(builder_v1_1.build_clutter(tmp_path / "old", variant="default", seed=0, progress=False), folder)
        if all(reasons):
            pytest.skip("; ".join(str(r) for r in reasons))


@pytest.mark.debian
class TestTrain:
    def test_object_views(self, debs):
        # the plan of one clutter_train object (about 10 s; the whole build below is marked slow)
        var = VARIANTS["train"]
        ctx, chosen, *_ = clutter_mod._catalogue(var, 0, None, False)
        assert len(chosen) == 11
        db, queries, bgs = clutter_mod._object_views(ctx, 0, chosen[0], 0)
        assert [v.kind for v in db] == ["home-crop"] * var.home_views + ["paste"] * var.paste_views
        assert [q.kind for q in queries] == ["query-home", "query-paste"]
        assert len(bgs) <= var.home_background
        homes = [v.record for v in db if v.kind == "home-crop"]
        assert sum(r["occlusion_target"] is not None for r in homes) == var.occluded + var.barely
        assert sum(r["border_target"] is not None for r in homes) == var.border
        assert sum(r["warp"] >= 0.4 for r in homes) == var.strong_warp  # strong: >= 12 deg or >= 0.12 persp.
        zooms = sorted(r["zoom"] for r in homes)
        assert zooms[0] < 0.1
        assert zooms[-1] > 0.6
        assert clutter_mod._good(db, var)
        assert all(max(v.image.size) <= var.out_long for v in db + queries)

    @pytest.mark.slow
    def test_build(self, tiny, tmp_path):  # about 60 s
        var = VARIANTS["train"]
        folder = build_clutter(tmp_path, variant="train", seed=0, progress=False)
        m = _manifest(folder)
        data = read_gnd_file(folder / "gnd_clutter_train.pkl")
        assert m["builder_version"] == var.version
        assert len(data["imlist"]) == 590
        assert len(data["qimlist"]) == 22
        kinds: dict[str, int] = {}
        for r in m["images"]:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        assert kinds == {"home-crop": 429, "paste": 143, "home-background": 11, "scene": 7}
        assert sorted(q["kind"] for q in m["queries"]) == ["query-home"] * 11 + ["query-paste"] * 11
        assert max(max(r["size"]) for r in m["images"] + m["queries"]) <= 640
        nonjunk: dict[str, int] = {}
        for r in m["images"]:
            if r["object"] is not None and r["gt"] != "junk":
                nonjunk[r["object"]] = nonjunk.get(r["object"], 0) + 1
        assert len(nonjunk) == 11
        assert min(nonjunk.values()) >= var.min_positives
        for q, g in zip(m["queries"], data["gnd"], strict=True):
            assert len(g["easy"]) + len(g["hard"]) == nonjunk[q["object"]]
        assert sum(nonjunk.values()) == 560  # seed 0, as measured (module docstring)
        # the span of Lw's pair differences, with the images in general position (random descriptors)
        pairs = _lw_pairs(m, data)
        x = np.random.default_rng(0).standard_normal((len(data["imlist"]) + len(data["qimlist"]), 640))
        rank = np.linalg.matrix_rank(x[pairs[:, 0]] - x[pairs[:, 1]])
        assert rank == sum(nonjunk.values()) + len(data["qimlist"]) - len(nonjunk) == 571
        assert rank > LW_DIM
        # no photo or object of the test split
        assert not {s["key"] for s in m["sources"]} & {s["key"] for s in _manifest(tiny)["sources"]}
