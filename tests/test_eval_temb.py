"""The evaluation app with learned pools (pool=temb|vlad|fv): fitted on the training set only, cached, reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from deepagg.data.revisitop import load_revisitop
from lightning_apps.extract import inspect_images

from .test_eval_app import CONF, _meta, _run, _spy_pipeline, fake_root, lenient_dataset_configs, train_set

__all__ = ["fake_root", "lenient_dataset_configs", "train_set"]  # fixtures used below

# Real (offline) MobileNetV2 weights: a randomly initialised backbone gives all-zero maps at this size.
SMALL = ["whiten=none", "num_vis_queries=0", "backbone.pretrained=true", "pool.d=8", "pool.k=17"]
pytestmark = pytest.mark.weights


def _train_maps(pipe, train_root: Path) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    train = load_revisitop(train_root / "data", "rparis6k", check_counts=False)
    return [pipe.cache.get(str(it.key)) for it in pipe.plans(inspect_images(train.images), None)[0]]


@pytest.mark.usefixtures("lenient_dataset_configs")
def test_temb_is_fitted_on_the_training_set_cached_and_reused(
    train_set: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pipes = _spy_pipeline(monkeypatch)
    with caplog.at_level("INFO", logger="lightning_apps.eval"):
        first = _run([*SMALL, "pool=temb"], train_set, "a")
    fitted = pipes[-1].pool
    meta = _meta(train_set / "a")
    assert meta["pool_fitted_on"] == "rparis6k"
    assert meta["whiten_train"] is None  # whiten=none: only the pool came from rparis6k
    assert 0 < meta["pool_kept_fraction"] <= 1
    # By hand: the same pool fitted on the cached training maps, generator seeded with the run's seed (0).
    node = OmegaConf.load(CONF / "pool" / "temb.yaml")
    node.d, node.k = 8, 17
    pool = instantiate(node).fit(iter(_train_maps(pipes[-1], train_set)), generator=torch.Generator().manual_seed(0))
    for name, value in pool.state_dict().items():
        torch.testing.assert_close(fitted.state_dict()[name], value, msg=name)
    saved = list((train_set / "data" / "features" / "pools").glob("*.pt"))
    assert len(saved) == 1
    # A rerun loads the cached fit and gives the same numbers; another seed fits again (another file).
    with caplog.at_level("INFO", logger="lightning_apps.eval"):
        second = _run([*SMALL, "pool=temb"], train_set, "b")
        _run([*SMALL, "pool=temb", "seed=1"], train_set, "c")
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pool TEmbPool fitted")]
    assert messages == [
        "pool TEmbPool fitted on rparis6k",
        "pool TEmbPool fitted on rparis6k (cached)",
        "pool TEmbPool fitted on rparis6k",
    ]
    np.testing.assert_array_equal(first["medium"]["aps"], second["medium"]["aps"])
    assert (
        _meta(train_set / "b")["pool_fit_sha256"]
        == meta["pool_fit_sha256"]
        != _meta(train_set / "c")["pool_fit_sha256"]
    )
    assert len(list((train_set / "data" / "features" / "pools").glob("*.pt"))) == 2


@pytest.mark.usefixtures("lenient_dataset_configs")
def test_a_corrupt_cached_fit_is_refitted(train_set: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = _run([*SMALL, "pool=temb"], train_set, "a")
    (saved,) = (train_set / "data" / "features" / "pools").glob("*.pt")
    saved.write_bytes(b"truncated")
    with caplog.at_level("WARNING", logger="lightning_apps.eval"):
        again = _run([*SMALL, "pool=temb"], train_set, "b")
    assert any("cannot load the fitted pool" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(first["medium"]["aps"], again["medium"]["aps"])
    assert torch.load(saved, weights_only=True)["local_mean"].numel() > 0


@pytest.mark.usefixtures("lenient_dataset_configs")
@pytest.mark.parametrize("pool", ["vlad", "fv"])
def test_vlad_and_fv_run(train_set: Path, pool: str) -> None:
    small = [*SMALL[:3], "pool.d=4", "pool.k=3", f"pool={pool}"]
    results = _run(small, train_set, pool)
    assert 0.0 <= results["medium"]["map"] <= 1.0
    assert _meta(train_set / pool)["pool_fitted_on"] == "rparis6k"


@pytest.mark.usefixtures("lenient_dataset_configs")
def test_sift_masks_are_cached_and_used(train_set: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_apps import extract

    calls: list[int] = []
    real = extract.sift_selection

    def counting(cache, item, grid_hw):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(cache, item, grid_hw)

    monkeypatch.setattr(extract, "sift_selection", counting)
    monkeypatch.setattr("lightning_apps.eval.sift_selection", counting)
    first = _run([*SMALL, "pool=temb", "pool.mask=sift"], train_set, "a")
    n_entries = len(list((train_set / "data" / "features").rglob("*.pt")))
    second = _run([*SMALL, "pool=temb", "pool.mask=sift", "pool.aggregation=sum"], train_set, "b")
    # 10 training + 10 database images + 2 queries, once each per run; the second run reads them back.
    assert len(calls) == 44
    assert len(list((train_set / "data" / "features").rglob("*.pt"))) == n_entries + 1  # one more fitted pool
    assert 0.0 <= first["medium"]["map"] <= 1.0
    assert 0.0 <= second["medium"]["map"] <= 1.0


@pytest.mark.usefixtures("lenient_dataset_configs")
def test_temb_needs_the_training_set_up_front(fake_root: Path) -> None:
    """pool=temb with whiten=none still needs rparis6k (its fit), named before any extraction."""
    from deepagg.data.revisitop import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match=r"'rparis6k' is needed to fit pool=TEmbPool"):
        _run([*SMALL, "pool=temb"], fake_root)
