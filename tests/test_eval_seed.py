"""The eval app on a second ``clutter`` draw: ``dataset.seed=N`` fits whitening on the partner of the same seed.

The builder is replaced by a fake that writes an empty dataset folder (the manifest and gnd file that
:func:`deepagg.data.ensure_clutter` reads), so these tests need neither the Debian sources nor a build; what the
seeds build is tested in ``tests/test_data_clutter.py``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from deepagg.data import clutter as clutter_mod
from deepagg.data.clutter import VARIANTS
from lightning_apps import eval as app

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture
def builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every ``(variant, seed)`` the app has built; the builds are empty folders under ``tmp_path``."""
    calls: list[tuple[str, int]] = []

    def fake_build(root, *, variant, seed, cache_dir, overwrite, progress):
        calls.append((variant, seed))
        folder = Path(root) / clutter_mod._dataset_name(variant, seed, "build_clutter")
        folder.mkdir(parents=True)
        manifest = {"seed": seed, "variant": variant, "builder_version": VARIANTS[variant].version}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with (folder / f"gnd_{folder.name}.pkl").open("wb") as fh:
            pickle.dump({"imlist": [], "qimlist": [], "gnd": []}, fh)
        return folder

    monkeypatch.setattr(clutter_mod, "build_clutter", fake_build)
    return calls


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["+dataset=clutter", f"data_root={tmp_path}", *overrides])
    return app.with_default_dataset(cfg)


@pytest.mark.parametrize(("seed", "suffix"), [(0, ""), (1, "_seed1"), (3, "_seed3")])
def test_partner_has_the_test_seed(tmp_path, builds, seed, suffix):
    test, train, train_name = app._need_datasets(_cfg(tmp_path, f"dataset.seed={seed}"))
    assert train is not None
    assert (test.name, train.name, train_name) == (f"clutter{suffix}", f"clutter_train{suffix}", "clutter_train")
    assert builds == [("default", seed), ("train", seed)]
    assert train.extra["manifest"]["seed"] == test.extra["manifest"]["seed"] == seed
    assert train.root == tmp_path / f"clutter_train{suffix}"


def test_tiny_partner_has_the_test_seed(tmp_path, builds):
    test, train, _ = app._need_datasets(_cfg(tmp_path, "dataset.variant=tiny", "dataset.seed=2"))
    assert train is not None
    assert (test.name, train.name) == ("clutter_tiny_seed2", "clutter_train_seed2")
    assert builds == [("tiny", 2), ("train", 2)]


def test_learned_pool_partner_has_the_test_seed(tmp_path, builds):
    # whiten=none: the training set is still needed to fit a learned pool, and gets the seed too
    _, train, _ = app._need_datasets(_cfg(tmp_path, "dataset.seed=1", "whiten=none"), fit="TEmbPool")
    assert train is not None
    assert train.name == "clutter_train_seed1"
    assert builds == [("default", 1), ("train", 1)]


def test_explicit_whiten_train_keeps_its_seed(tmp_path, builds):
    test, train, train_name = app._need_datasets(_cfg(tmp_path, "dataset.seed=1", "whiten_train=clutter_train"))
    assert train is not None
    assert (test.name, train.name, train_name) == ("clutter_seed1", "clutter_train", "clutter_train")
    assert builds == [("default", 1), ("train", 0)]


def test_no_training_set_without_whitening(tmp_path, builds):
    _, train, train_name = app._need_datasets(_cfg(tmp_path, "dataset.seed=1", "whiten=none"))
    assert (train, train_name) == (None, None)
    assert builds == [("default", 1)]


def test_missing_partner_names_the_seed(tmp_path, builds, monkeypatch):
    from deepagg.data.revisitop import DatasetNotFoundError

    real = app.load_dataset

    def no_train(node, cfg):
        if node.variant == "train":
            raise DatasetNotFoundError("not there")
        return real(node, cfg)

    monkeypatch.setattr(app, "load_dataset", no_train)
    with pytest.raises(DatasetNotFoundError, match=r"'clutter_train' \(dataset.seed=1, as the test set\) is needed"):
        app._need_datasets(_cfg(tmp_path, "dataset.seed=1"))
