"""The evaluation app: config composition, every YAML, end to end on a tiny dataset, DDP, cache, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from deepagg import HeR, Reranker
from deepagg.data.revisitop import DatasetNotFoundError, ImageReadError, load_revisitop
from deepagg.metrics import evaluate_revisited
from lightning_apps import eval as app
from lightning_apps.extract import inspect_images
from lightning_apps.metrics import RevisitedMAP

from ._fakedata import copy_as_old_protocol, make_fake_revisitop, truncate_image

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
FAST = [
    "backbone=mobilenet_v2",
    "backbone.pretrained=false",
    "imsize=128",
    "num_vis_queries=2",
    "trainer.enable_progress_bar=false",
]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------


def test_default_composition_has_no_dataset_and_gets_clutter() -> None:
    cfg = _compose([])
    assert "dataset" not in cfg
    cfg = app.with_default_dataset(cfg)
    assert cfg.dataset._target_ == "deepagg.data.ensure_clutter"
    assert cfg.dataset.variant == "default"
    assert cfg.backbone._target_ == "deepagg.backbones.vgg16"
    assert cfg.pool._target_ == "deepagg.GeM"
    assert cfg.whiten.fit == "learned"


def test_plus_dataset_roxf_composes() -> None:
    cfg = _compose(["+dataset=roxf", "data_root=/somewhere"])
    assert cfg.dataset.name == "roxford5k"
    assert OmegaConf.to_container(cfg, resolve=True)["dataset"]["data_root"] == "/somewhere"


@pytest.mark.parametrize(
    "path",
    sorted((CONF / "pool").glob("*.yaml")) + sorted((CONF / "rerank").glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_every_pool_and_rerank_yaml_instantiates(path: Path) -> None:
    node = OmegaConf.load(path)
    if "_target_" not in node:
        assert path.name == "none.yaml"
        return
    obj = instantiate(node)
    assert isinstance(obj, torch.nn.Module)
    assert type(obj).__module__.startswith("deepagg")


@pytest.mark.parametrize("path", sorted((CONF / "whiten").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_whiten_yaml_instantiates(path: Path) -> None:
    node = OmegaConf.load(path)
    if node.module is None:
        return
    whiten = instantiate(node.module)(in_dim=8)
    assert whiten.__class__.__name__ == "Whiten"


@pytest.mark.parametrize("path", sorted((CONF / "trainer").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_trainer_yaml_composes(path: Path) -> None:
    cfg = _compose([f"trainer={path.stem}"])
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    app.resolve_precision(cfg)  # VGG16's precision=auto becomes what this machine runs natively
    assert cfg.trainer.precision in ("bf16-mixed", "32-true")
    if path.stem in ("default", "cpu"):
        assert instantiate(cfg.trainer).world_size == 1


@pytest.mark.parametrize("name", ["vgg16", "mobilenet_v2"])
def test_backbone_yaml_instantiates(name: str) -> None:
    cfg = _compose([f"backbone={name}", "backbone.pretrained=false"])
    net = instantiate(cfg.backbone)
    assert net(torch.zeros(1, 3, 64, 64)).shape[1] == net.out_channels


@pytest.mark.parametrize("path", sorted((CONF / "dataset").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_dataset_yaml_targets_a_loader(path: Path, tmp_path: Path) -> None:
    node = OmegaConf.load(path)
    assert node._target_ in ("deepagg.data.ensure_clutter", "deepagg.data.revisitop.load_revisitop")
    if node._target_.endswith("load_revisitop"):
        cfg = OmegaConf.merge({"data_root": str(tmp_path)}, {"node": node})
        with pytest.raises(DatasetNotFoundError, match=rf"python -m deepagg.data.download {node.name}"):
            app.load_dataset(node, cfg)


# --------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    make_fake_revisitop(tmp_path / "data")
    return tmp_path


def _run(overrides: list[str], root: Path, out: str = "out") -> dict:
    cfg = _compose(
        [
            "+dataset=roxf",
            f"data_root={root / 'data'}",
            "+dataset.check_counts=false",
            f"output_dir={root / out}",
            *FAST,
            *overrides,
        ]
    )
    return app.run(cfg)


def test_end_to_end_on_tiny_revisitop(fake_root: Path) -> None:
    results = _run(["whiten=none"], fake_root)
    assert set(results) == {"easy", "medium", "hard"}
    out = fake_root / "out"
    for name in ("results.json", "results.md", "per_query_ap.csv", "config.yaml", "topk.png"):
        assert (out / name).is_file(), name
    assert "| medium |" in (out / "results.md").read_text()
    lines = (out / "per_query_ap.csv").read_text().splitlines()
    assert lines[0] == "query,easy,medium,hard"
    assert len(lines) == 3
    with Image.open(out / "topk.png") as im:
        assert im.size[0] > im.size[1] > 0


def test_cached_rerun_gives_identical_numbers(fake_root: Path) -> None:
    first = _run(["whiten=none", "rerank=aqe"], fake_root, "a")
    n_files = len(list((fake_root / "data" / "features").rglob("*.pt")))
    second = _run(["whiten=none", "rerank=aqe"], fake_root, "b")
    assert len(list((fake_root / "data" / "features").rglob("*.pt"))) == n_files
    np.testing.assert_array_equal(first["medium"]["aps"], second["medium"]["aps"])


@pytest.fixture
def lenient_dataset_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake roxford5k has 10 images, not 4993: let training-set configs skip the count check too."""
    real = app.dataset_config

    def lenient(name: str):
        node = real(name)
        if node._target_.endswith("load_revisitop"):
            node.check_counts = False
        return node

    monkeypatch.setattr(app, "dataset_config", lenient)


@pytest.mark.usefixtures("lenient_dataset_configs")
def test_whitening_on_test_images_is_refused(fake_root: Path) -> None:
    with pytest.raises(app.ConfigError, match=r"whitening would be fitted on test images"):
        _run(["whiten=pca", "whiten_train=roxf"], fake_root)


@pytest.mark.usefixtures("lenient_dataset_configs")
def test_whitening_forced_on_test_images_runs(fake_root: Path) -> None:
    results = _run(
        ["whiten=pca", "whiten_train=roxf", "whiten.force_on_test=true", "whiten.dim=4", "backbone.pretrained=true"],
        fake_root,
    )
    assert 0.0 <= results["medium"]["map"] <= 1.0


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lightning_apps.eval", *args, f"hydra.run.dir={cwd / 'hydra'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_data_exits_2_with_one_paragraph(tmp_path: Path) -> None:
    proc = _cli(["+dataset=roxf", f"data_root={tmp_path}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert "python -m deepagg.data.download roxford5k" in err[0]
    assert str(tmp_path) in err[0]


def test_bad_whiten_train_exits_2(fake_root: Path) -> None:
    proc = _cli(
        [
            "+dataset=roxf",
            f"data_root={fake_root / 'data'}",
            "+dataset.check_counts=false",
            "whiten_train=nonexistent",
            *FAST,
        ],
        fake_root,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no dataset config 'nonexistent'" in proc.stderr


def _csv(path: Path) -> str:
    return path.read_text()


def _meta(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["meta"]


def test_ddp_equals_one_process_on_empty_and_full_cache(fake_root: Path) -> None:
    """Issue 6.1: DDP on a full cache (no process group is started) and the failure report of every shard."""
    jpg = fake_root / "data" / "datasets" / "roxford5k" / "jpg"
    # Ten equal-size database images, batches of 8: index 1 is on rank 0's batch, index 9 on rank 1's.
    for name in ("p0_v1", "p1_v4"):
        truncate_image(jpg / f"{name}.jpg")
    common = ["+dataset=roxf", f"data_root={fake_root / 'data'}", "+dataset.check_counts=false", "whiten=none", *FAST]
    common = [c for c in common if not c.startswith("backbone.pretrained")] + ["num_vis_queries=0", "mode=single"]
    # one process, in-process, fills cache c1
    _run(
        ["whiten=none", "backbone.pretrained=true", "num_vis_queries=0", f"cache_dir={fake_root / 'c1'}"],
        fake_root,
        "one",
    )
    # DDP on an empty cache: every shard's unreadable image is reported
    two = _cli(
        [*common, "trainer=ddp", f"output_dir={fake_root / 'two'}", f"cache_dir={fake_root / 'c2'}"], fake_root / "h2"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert _csv(fake_root / "one" / "per_query_ap.csv") == _csv(fake_root / "two" / "per_query_ap.csv")
    want = {str(jpg / "p0_v1.jpg"), str(jpg / "p1_v4.jpg")}
    assert set(_meta(fake_root / "one")["unreadable_database_images"]) == want
    assert set(_meta(fake_root / "two")["unreadable_database_images"]) == want
    c1 = sorted(p.name for p in (fake_root / "c1").rglob("*.pt"))
    assert c1 == sorted(p.name for p in (fake_root / "c2").rglob("*.pt"))
    # DDP again on the full cache c1 with another pooling: nothing to extract, same numbers as one process
    ddp_mac = _cli(
        [*common, "trainer=ddp", "pool=mac", f"output_dir={fake_root / 'ddp_mac'}", f"cache_dir={fake_root / 'c1'}"],
        fake_root / "h3",
    )
    assert ddp_mac.returncode == 0, ddp_mac.stderr[-3000:]
    _run(
        ["whiten=none", "backbone.pretrained=true", "num_vis_queries=0", "pool=mac", f"cache_dir={fake_root / 'c1'}"],
        fake_root,
        "one_mac",
    )
    assert _csv(fake_root / "one_mac" / "per_query_ap.csv") == _csv(fake_root / "ddp_mac" / "per_query_ap.csv")
    assert set(_meta(fake_root / "ddp_mac")["unreadable_database_images"]) == want
    assert sorted(p.name for p in (fake_root / "c1").rglob("*.pt")) == c1


# --------------------------------------------------------------------------------------------------------------
# Cache, sampler, metric
# --------------------------------------------------------------------------------------------------------------


def test_revisited_map_metric_matches_library_and_checks_coverage() -> None:
    rng = np.random.default_rng(0)
    gnd = [
        {"easy": rng.choice(30, 3, replace=False), "hard": np.array([q]), "junk": np.array([29 - q])} for q in range(6)
    ]
    ranks = torch.stack([torch.randperm(30) for _ in range(6)])
    metric = RevisitedMAP(gnd, kappas=(1, 5))
    metric.update(ranks[3:], torch.arange(3, 6))
    metric.update(ranks[:3], torch.arange(3))
    metric.update(ranks[:1], torch.arange(1))  # a DistributedSampler-style repeat is dropped
    got = metric.compute()
    want = evaluate_revisited(ranks.numpy(), gnd, kappas=(1, 5))
    for setup in ("easy", "medium", "hard"):
        np.testing.assert_allclose(got[setup]["aps"], want[setup]["aps"])
    partial = RevisitedMAP(gnd)
    partial.update(ranks[:2], torch.arange(2))
    with pytest.raises(RuntimeError, match=r"every query must be ranked once; 4 of 6 are missing"):
        partial.compute()
    with pytest.raises(ValueError, match=r"ranks must be \(Q, K\) and query_idx \(Q,\)"):
        partial.update(ranks[0], torch.arange(1))


def test_unknown_dataset_config_is_a_config_error() -> None:
    with pytest.raises(app.ConfigError, match=r"no dataset config 'nope'; choose one of \["):
        app.dataset_config("nope")


def test_positive_pairs_index_queries_after_database() -> None:
    ds = type(
        "D",
        (),
        {
            "num_images": 4,
            "name": "x",
            "gnd": [{"easy": np.array([1]), "hard": np.array([2]), "junk": np.array([], int)}],
        },
    )()
    assert app.positive_pairs(ds).tolist() == [[4, 1], [4, 2]]


def test_summarize_collects_runs(fake_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_apps import summarize

    _run(["whiten=none", "pool=mac"], fake_root, "runs/mac")
    _run(["whiten=none", "pool=spoc"], fake_root, "runs/spoc")
    text = summarize.main([str(fake_root / "runs")])
    lines = text.splitlines()
    assert lines[0] == "| dataset | backbone | precision | pooling | whitening | re-ranking | Medium mAP | Hard mAP |"
    assert [line.split(" | ")[3] for line in lines[2:]] == ["MAC", "SPoC"]
    assert [line.split(" | ")[2] for line in lines[2:]] == ["32-true", "32-true"]
    with pytest.raises(SystemExit, match=r"no results\.json below"):
        summarize.main([str(fake_root / "nothing")])


@pytest.mark.debian
def test_end_to_end_on_clutter_tiny(tmp_path: Path, debian_packages: None) -> None:
    """The default code path (a dataset built by the project from Debian photos), tiny variant, real weights."""
    cfg = _compose(
        [
            "+dataset=clutter_tiny",
            f"data_root={tmp_path / 'data'}",
            f"output_dir={tmp_path / 'out'}",
            "backbone=mobilenet_v2",
            "whiten=none",
            "imsize=256",
            "num_vis_queries=2",
            "trainer.enable_progress_bar=false",
        ]
    )
    results = app.run(cfg)
    assert results["medium"]["map"] > 0.3  # real weights on real photos: far above chance
    assert (tmp_path / "out" / "topk.png").is_file()
    assert "clutter_tiny" in (tmp_path / "out" / "results.md").read_text()


def test_padded_batches_match_exact_batches_closely(fake_root: Path) -> None:
    exact = _run(["whiten=none", "batching=exact", "backbone.pretrained=true"], fake_root, "exact")
    padded = _run(["whiten=none", "batching=pad", "batch_size=4", "backbone.pretrained=true"], fake_root, "pad")
    # Mixed sizes in one batch: padding + feature-grid mask; only the receptive field of the padding differs.
    np.testing.assert_allclose(padded["medium"]["aps"], exact["medium"]["aps"], atol=0.1)
    assert len(list((fake_root / "data" / "features").rglob("*.pt"))) == 2 * 12  # batching is in the cache key


def test_unreadable_database_image_is_reported_and_ranked_last(fake_root: Path) -> None:
    bad = fake_root / "data" / "datasets" / "roxford5k" / "jpg" / "p0_v4.jpg"
    bad.write_bytes(b"not a jpeg")
    results = _run(["whiten=none"], fake_root)
    meta = __import__("json").loads((fake_root / "out" / "results.json").read_text())["meta"]
    assert list(meta["unreadable_database_images"]) == [str(bad)]
    assert 0.0 < results["medium"]["map"] < 1.0  # the unreadable positive cannot be found


def test_unreadable_query_is_an_error(fake_root: Path) -> None:
    (fake_root / "data" / "datasets" / "roxford5k" / "jpg" / "q1.jpg").write_bytes(b"broken")
    with pytest.raises(ImageReadError, match=r"q1\.jpg"):
        _run(["whiten=none"], fake_root)


def test_multiscale_extracts_each_scale_once(fake_root: Path) -> None:
    single = _run(["whiten=none"], fake_root, "s1")
    multi = _run(["whiten=none", "scales=[1.0,0.7071067811865476,0.5]", "ms_power=3.0"], fake_root, "s3")
    # 12 images at 3 scales; scale 1 is shared with the single-scale run through the cache.
    assert len(list((fake_root / "data" / "features").rglob("*.pt"))) == 12 * 3
    assert set(multi) == set(single)
    assert "0.7071067811865476" in (fake_root / "s3" / "config.yaml").read_text()


def test_combine_scales_generalised_mean() -> None:
    from lightning_apps.extract import combine_scales

    a = torch.nn.functional.normalize(torch.rand(3, 5), dim=-1)
    b = torch.nn.functional.normalize(torch.rand(3, 5), dim=-1)
    torch.testing.assert_close(combine_scales([a, a]), a)
    torch.testing.assert_close(combine_scales([a, b]), torch.nn.functional.normalize(a + b, dim=-1))
    want = torch.nn.functional.normalize(((a**3 + b**3) / 2) ** (1 / 3), dim=-1)
    torch.testing.assert_close(combine_scales([a, b], p=3.0), want)


# --------------------------------------------------------------------------------------------------------------
# Issue 6: numbers a user can trust
# --------------------------------------------------------------------------------------------------------------


def _entries(root: Path) -> set[str]:
    return {p.name for p in (root / "data" / "features").rglob("*.pt")}


@pytest.mark.weights
def test_checkpoint_is_keyed_by_content(fake_root: Path) -> None:
    """Issue 6.2a: overwrite the checkpoint file with other weights and rerun: new maps, new numbers."""
    from deepagg.backbones import mobilenet_v2

    ckpt = fake_root / "model.pt"
    state = mobilenet_v2(pretrained=True).state_dict()
    torch.save(state, ckpt)
    first = _run(["whiten=none", f"ckpt_path={ckpt}"], fake_root, "a")
    entries = _entries(fake_root)
    gen = torch.Generator().manual_seed(0)
    torch.save(
        {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state.items()},
        ckpt,
    )
    second = _run(["whiten=none", f"ckpt_path={ckpt}"], fake_root, "b")
    assert len(_entries(fake_root)) == 2 * len(entries)
    assert not np.array_equal(first["medium"]["aps"], second["medium"]["aps"])
    assert _meta(fake_root / "b")["ckpt_sha256"] != _meta(fake_root / "a")["ckpt_sha256"]
    # a Lightning-style checkpoint ({"state_dict": {"backbone.<name>": ...}}) of the same weights hits the cache
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in torch.load(ckpt).items()}}, fake_root / "lit.ckpt")
    third = _run(["whiten=none", f"ckpt_path={fake_root / 'lit.ckpt'}"], fake_root, "c")
    assert len(_entries(fake_root)) == 3 * len(entries)  # other bytes: other key, same numbers
    np.testing.assert_array_equal(third["medium"]["aps"], second["medium"]["aps"])


def test_trainer_precision_override_is_keyed_and_reported(fake_root: Path) -> None:
    """Issue 6.2b: trainer.precision=bf16-mixed is the precision used, keyed and reported (not the top-level 32)."""
    _run(["whiten=none", "imsize=64"], fake_root, "fp32")  # small: bf16 depthwise convolutions are slow on CPU
    entries = _entries(fake_root)
    _run(["whiten=none", "imsize=64", "trainer.precision=bf16-mixed"], fake_root, "bf16")
    assert _meta(fake_root / "fp32")["precision"] == "32-true"
    assert _meta(fake_root / "bf16")["precision"] == "bf16-mixed"
    assert len(_entries(fake_root)) == 2 * len(entries)
    assert _meta(fake_root / "bf16")["device"] == "cpu"


def test_sizes_that_give_the_same_pixels_share_entries(fake_root: Path) -> None:
    """Issue 6.3: imsize above the native size is capped (documented) and never extracted twice."""
    _run(["whiten=none", "imsize=4096"], fake_root, "a")
    entries = _entries(fake_root)
    _run(["whiten=none", "imsize=8192"], fake_root, "b")
    assert _entries(fake_root) == entries
    # a scale above 1 enlarges, as cirtorch's multi-scale does: a new size, new entries
    _run(["whiten=none", "imsize=128", "scales=[1.0,1.5]"], fake_root, "c")
    assert len(_entries(fake_root)) == 3 * len(entries)


BAD_OVERRIDES = [
    (["imsize=-5"], r"imsize must be an int >= 32 \(the long side in pixels\); got -5\."),
    (["imsize=0"], r"imsize must be an int >= 32 .*; got 0\."),
    (["imsize=abc"], r"imsize must be an int >= 32 .*; got 'abc'\."),
    (["scales=[0.01]"], r"long side of at least 32 px at imsize=128; scales \[0\.01\] give \[1\] px"),
    (["scales=[]"], r"scales must be a non-empty list of positive numbers, e\.g\. \[1\.0\]; got \[\]\."),
    (["scales=[1.0,1.0]"], r"scales must be distinct; got \[1\.0, 1\.0\]\."),
    (["scales=[1.0,-0.5]"], r"scales must be finite numbers > 0; got \[1\.0, -0\.5\]\."),
    (["batch_size=0"], r"batch_size must be an int >= 1; got 0\."),
    (["kappas=[0]"], r"kappas must be a non-empty list of ints >= 1 \(the k of mP@k\); got \[0\]\."),
    (["ms_power=0"], r"ms_power must be a finite number > 0; got 0\."),
    (["batching=foo"], r"batching must be one of \['exact', 'pad'\]; got 'foo'\."),
    (["resize=foo"], r"resize must be one of \['torchvision', 'cirtorch'\]; got 'foo'\."),
    (["store=foo"], r"store must be one of \['maps', 'descriptors'\]; got 'foo'\."),
    (["num_workers=-1"], r"num_workers must be an int >= 0; got -1\."),
    (["whiten=pca", "whiten.dim=5000"], r"whiten.dim must be at most the pooled dimension 1280 .*got 5000"),
    (["whiten=learned", "whiten.center=mean"], r"whiten\.center must be 'all' or 'queries'; got 'mean'\."),
    (["whiten=pca", "whiten.shrinkage=-1"], r"whiten\.shrinkage must be a finite number >= 0; got -1\."),
    (["whiten=learned", "whiten.shrinkage=2"], r"whiten\.shrinkage must be a number in \[0, 1\] for whiten=learned"),
    (["rerank=aqe", "rerank.k=-1"], r"rerank cannot be built from .*k must be >= 0; got -1\."),
    (["pool=gem", "pool.p=-2"], r"pool cannot be built from .*p"),
    (["ckpt_path=/nonexistent/model.pt"], r"ckpt_path '/nonexistent/model\.pt' is not a file\."),
    (
        ["+rerank._target_=deepagg.GeM"],
        r"rerank must build a deepagg\.Reranker; deepagg\.GeM builds deepagg\.nn\.pooling\.GeM, which is not one\. "
        r"Subclass deepagg\.Reranker and implement rerank\(state: RerankState\) -> RerankState",
    ),
    (
        ["+rerank._target_=tests.test_eval_app.NeedsRegions"],
        r"re-ranker NeedsRegions requires extra inputs \['knn_graph'\] \(its `requires`\) that this app cannot "
        r"provide yet \(it provides \['db_local_features', 'db_region_mask', 'db_regions', 'q_local_features', "
        r"'q_region_mask', 'q_regions'\]\)",
    ),
]  # fmt: skip


class NeedsRegions(Reranker):
    """A re-ranker that needs extras the app does not provide (for the up-front check)."""

    requires = ("db_regions", "knn_graph")

    def rerank(self, state):  # type: ignore[no-untyped-def]
        raise AssertionError("never called: the app refuses it before any work")


@pytest.mark.parametrize(
    ("overrides", "message"), BAD_OVERRIDES, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_bad_overrides_fail_before_any_work(fake_root: Path, overrides: list[str], message: str) -> None:
    """Issue 6.3/6.4: every user error is one ConfigError before any extraction (no cache folder is made)."""
    with pytest.raises(app.ConfigError, match=message):
        _run(["whiten=none", *overrides], fake_root)
    assert not (fake_root / "data" / "features").exists()


def test_all_problems_are_reported_at_once(fake_root: Path) -> None:
    with pytest.raises(app.ConfigError, match=r"ms_power must be .* batch_size must be .* kappas must be"):
        _run(["whiten=none", "batch_size=0", "kappas=[0]", "ms_power=0"], fake_root)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batch_size=0"], "batch_size must be an int >= 1; got 0."),
        (["imsize=abc"], "imsize must be an int >= 32 (the long side in pixels); got 'abc'."),
    ],
)
def test_bad_override_exits_2_without_traceback(fake_root: Path, overrides: list[str], message: str) -> None:
    proc = _cli(
        ["+dataset=roxf", f"data_root={fake_root / 'data'}", "+dataset.check_counts=false", *FAST, *overrides],
        fake_root,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert message in err[0]


def test_unreadable_query_exits_2_before_extraction(fake_root: Path) -> None:
    (fake_root / "data" / "datasets" / "roxford5k" / "jpg" / "q1.jpg").write_bytes(b"broken")
    proc = _cli(
        [
            "+dataset=roxf",
            f"data_root={fake_root / 'data'}",
            "+dataset.check_counts=false",
            "whiten=none",
            *FAST,
            "mode=single",
        ],
        fake_root,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "1 test query image(s) of 'roxford5k' cannot be read" in proc.stderr
    assert "q1.jpg" in proc.stderr
    assert not (fake_root / "data" / "features").exists()


def test_missing_whitening_set_is_named_with_its_reason_up_front(fake_root: Path) -> None:
    """Issue 6.4: +dataset=roxf with whiten=learned and no RPar: say so before extracting ROxf."""
    with pytest.raises(DatasetNotFoundError) as info:
        _run([], fake_root)  # whiten=learned by default; there is no rparis6k
    text = str(info.value)
    assert "'rparis6k' is needed to fit whiten=learned (the default whitening training set for 'roxford5k')" in text
    assert "set whiten_train=<another dataset> or whiten=none" in text
    assert "python -m deepagg.data.download rparis6k" in text
    assert not (fake_root / "data" / "features").exists()


@pytest.fixture
def train_set(fake_root: Path) -> Path:
    """A whitening training set (rparis6k) that shares no image content with the fake roxford5k."""
    make_fake_revisitop(fake_root / "data", "rparis6k", seed=1, flip_db=True, flip_queries=True)
    return fake_root


@pytest.mark.usefixtures("lenient_dataset_configs")
@pytest.mark.parametrize(
    ("whiten", "rerank"), [("learned", "dba"), ("pca", "aqe"), ("learned", "alpha_qe"), ("none", "dba")]
)
def test_unreadable_database_image_ranks_last_on_every_path(
    train_set: Path, monkeypatch: pytest.MonkeyPatch, whiten: str, rerank: str
) -> None:
    """Issue 6.5: after whitening and re-ranking an unreadable image is still last (not l2n(-P mu), no neighbours)."""
    truncate_image(train_set / "data" / "datasets" / "roxford5k" / "jpg" / "p0_v2.jpg")
    seen = []
    real_rank = app.rank
    monkeypatch.setattr(app, "rank", lambda *a, **k: seen.append(real_rank(*a, **k)) or seen[-1])
    _run([f"whiten={whiten}", f"rerank={rerank}", "rerank.k=3", "backbone.pretrained=true"], train_set)
    ranks = seen[0]
    assert ranks.shape == (2, 10)
    assert ranks[:, -1].tolist() == [2, 2]
    assert all(sorted(r) == list(range(10)) for r in ranks.tolist())


def test_rank_keeps_invalid_rows_out_of_reranking() -> None:
    from deepagg.functional import l2n
    from deepagg.nn import DBA, QueryExpansion, RerankChain

    g = torch.Generator().manual_seed(0)
    db = l2n(torch.randn(6, 4, generator=g))
    db[3] = l2n(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))[0]  # whatever an unreadable row became after whitening
    q = db[3:4].clone()  # the query is most similar to the invalid row
    valid = torch.tensor([True, True, True, False, True, True])
    for rr in (None, DBA(k=2), QueryExpansion(k=2, alpha=0.0), HeR(k=3), RerankChain([QueryExpansion(k=2), HeR()])):
        ranks = app.rank(q, db, rr, valid)
        assert ranks[0, -1] == 3
        sub = app.rank(q, db[valid], rr)  # the same as ranking the valid rows alone
        assert ranks[0, :-1].tolist() == torch.tensor([0, 1, 2, 4, 5])[sub[0]].tolist()


@pytest.mark.usefixtures("lenient_dataset_configs")
def test_whitening_guard_compares_content_not_paths(fake_root: Path) -> None:
    """Issue 6.6: a byte-identical copy of ROxf in cirtorch's layout as oxford5k is refused as a training set."""
    copy_as_old_protocol(fake_root / "data" / "datasets" / "roxford5k", fake_root / "data")
    with pytest.raises(app.ConfigError, match=r"'oxford5k' shares 12 images with 'roxford5k' by content \(e\.g\. "):
        _run(["whiten=pca", "whiten_train=oxford5k"], fake_root)
    assert not (fake_root / "data" / "features").exists()


@pytest.mark.usefixtures("lenient_dataset_configs")
def test_whitening_guard_checks_the_training_queries(fake_root: Path) -> None:
    make_fake_revisitop(fake_root / "data", "rparis6k", seed=1, flip_db=True, flip_queries=False)
    with pytest.raises(app.ConfigError, match=r"'rparis6k' shares 2 images with 'roxford5k' by content"):
        _run(["whiten=pca"], fake_root)


@pytest.mark.usefixtures("lenient_dataset_configs")
def test_rank_deficient_learned_whitening_warns_and_caps(train_set: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 6.7: 12 images with 10 pairs cannot determine 1280 dimensions: warn, cap, report the dim used."""
    with caplog.at_level("WARNING", logger="lightning_apps.eval"):
        _run(["whiten=learned", "whiten.shrinkage=0", "backbone.pretrained=true"], train_set)
    meta = _meta(train_set / "out")
    assert meta["whiten_dim"] == 10  # rank of the 10 query-positive differences (distinct images)
    assert any("determine only 10 of the 1280 requested dimensions" in r.getMessage() for r in caplog.records)


def test_positive_pairs_add_same_object_database_pairs() -> None:
    records = [{"object": "a", "gt": "easy"}, {"object": "a", "gt": "hard"}, {"object": "a", "gt": "junk"}]
    records += [{"object": None, "gt": None}, {"object": "b", "gt": "easy"}, {"object": "b", "gt": "hard"}]
    ds = type(
        "D",
        (),
        {
            "num_images": 6,
            "name": "x",
            "gnd": [{"easy": np.array([0]), "hard": np.array([1]), "junk": np.array([2])}],
            "extra": {"manifest": {"images": records}},
        },
    )()
    assert app.positive_pairs(ds).tolist() == [[6, 0], [6, 1], [0, 1], [4, 5]]
    valid = torch.tensor([True, False, True, True, True, True, True])
    assert app.positive_pairs(ds, valid).tolist() == [[6, 0], [4, 5]]


def test_cache_size_is_reported(fake_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 6.11: the run says how much disk its entries take and how big the cache folder is."""
    _run(["whiten=none"], fake_root)
    out = capsys.readouterr().out
    meta = _meta(fake_root / "out")["cache"]
    files = list((fake_root / "data" / "features").rglob("*.pt"))
    assert meta["entries_used"] == len(files) == 12
    assert meta["bytes_used"] == sum(p.stat().st_size for p in files)
    assert meta["store"] == "maps"
    assert "feature cache (maps): 12 entries used by this run" in out


@pytest.mark.weights
def test_corrupt_cache_entries_are_recomputed(fake_root: Path) -> None:
    """Issue 6.11: a zero-length file (power cut) and a truncated one are detected and recomputed."""
    first = _run(["whiten=none", "backbone.pretrained=true"], fake_root, "a")
    files = sorted((fake_root / "data" / "features").rglob("*.pt"))
    files[0].write_bytes(b"")
    files[1].write_bytes(files[1].read_bytes()[:100])
    second = _run(["whiten=none", "backbone.pretrained=true"], fake_root, "b")
    np.testing.assert_array_equal(first["medium"]["aps"], second["medium"]["aps"])
    assert files[0].stat().st_size > 100
    assert torch.load(files[1]).ndim == 3


@pytest.mark.weights
def test_store_descriptors_gives_the_same_numbers_with_less_disk(fake_root: Path) -> None:
    maps = _run(["whiten=none", "backbone.pretrained=true"], fake_root, "maps")
    descs = _run(
        ["whiten=none", "backbone.pretrained=true", "store=descriptors", f"cache_dir={fake_root / 'd'}"], fake_root, "d"
    )
    np.testing.assert_allclose(descs["medium"]["aps"], maps["medium"]["aps"], atol=1e-9)
    # 4 x 3 x 1280 float16 maps here vs 1280 float32 vectors; at 512 px with VGG16, 0.65 MB vs 2 KB
    assert _meta(fake_root / "d")["cache"]["bytes_used"] * 3 < _meta(fake_root / "maps")["cache"]["bytes_used"]


def test_resize_cirtorch_is_its_own_cache_entry(fake_root: Path) -> None:
    _run(["whiten=none"], fake_root, "tv")
    entries = _entries(fake_root)
    results = _run(["whiten=none", "resize=cirtorch", "scales=[1.0,0.7071067811865476]"], fake_root, "ct")
    assert len(_entries(fake_root)) == 3 * len(entries)
    assert _meta(fake_root / "ct")["resize"] == "cirtorch"
    assert 0.0 <= results["medium"]["map"] <= 1.0


@pytest.mark.parametrize(("native", "want"), [(True, "bf16-mixed"), (False, "32-true")])
def test_precision_auto_follows_the_machine(monkeypatch: pytest.MonkeyPatch, native: bool, want: str) -> None:
    """VGG16's precision=auto is bf16 only where bf16 is native (on an AVX2-only CPU it is ~12x slower)."""
    monkeypatch.setattr(app, "native_bf16", lambda accelerator: native)
    cfg = _compose(["backbone=vgg16"])
    assert cfg.precision == "auto"
    app.resolve_precision(cfg)
    assert cfg.trainer.precision == want
    assert cfg.precision == want
    cfg = _compose(["backbone=vgg16", "precision=32-true"])  # an explicit choice is kept
    app.resolve_precision(cfg)
    assert cfg.trainer.precision == "32-true"


def test_native_bf16_reads_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert app.native_bf16("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert not app.native_bf16("cpu")


# --------------------------------------------------------------------------------------------------------------
# One re-ranker interface; HeW / HeR in the app
# --------------------------------------------------------------------------------------------------------------

# Real weights: the randomly initialised MobileNetV2 of FAST gives all-zero maps at 128 px, on which every
# pooling and re-ranking is the same.
HEW_FAST = ["whiten=none", "num_vis_queries=0", "backbone.pretrained=true"]


def test_rank_with_her_and_invalid_rows_equals_her_on_the_valid_rows() -> None:
    from deepagg.functional import heat_rerank, l2n
    from deepagg.nn.rerank import rank_by_similarity

    g = torch.Generator().manual_seed(3)
    db = l2n(torch.randn(12, 6, generator=g))
    q = l2n(db[[2, 7]] + 0.3 * torch.randn(2, 6, generator=g))
    valid = torch.ones(12, dtype=torch.bool)
    valid[[2, 5]] = False  # the row nearest to the first query is unreadable
    ranks = app.rank(q, db, HeR(k=6, lam=0.5), valid)
    keep = torch.nonzero(valid).flatten()
    want = keep[heat_rerank(q, db[keep], rank_by_similarity(q, db[keep]), k=6, lam=0.5)]
    assert torch.equal(ranks[:, :10], want)
    assert ranks[:, 10:].tolist() == [[2, 5], [2, 5]]


def test_rank_checks_what_the_reranker_is_and_returns() -> None:
    from deepagg.functional import l2n

    q, db = l2n(torch.randn(2, 4)), l2n(torch.randn(5, 4))
    valid = torch.tensor([True, False, True, True, True])

    class Top2(Reranker):
        def rerank(self, state):  # type: ignore[no-untyped-def]
            return state.replace(ranks=state.ranks[:, :2])

    class Floats(Reranker):
        def rerank(self, state):  # type: ignore[no-untyped-def]
            return state.replace(ranks=state.ranks.float())

    assert app.rank(q, db, Top2(), valid).shape == (2, 2)  # truncated: the invalid row is simply not listed
    with pytest.raises(RuntimeError, match=r"Floats\.rerank\(\) returned rankings of shape \(2, 4\) and dtype "):
        app.rank(q, db, Floats(), valid)
    with pytest.raises(app.ConfigError, match=r"got torch\.nn\.modules\.linear\.Identity, which is not one"):
        app.rank(q, db, torch.nn.Identity(), valid)  # type: ignore[arg-type]
    with pytest.raises(app.ConfigError, match=r"NeedsRegions requires extra inputs \['knn_graph'\]"):
        app.rank(q, db, NeedsRegions(), valid)


def _spy_rank(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    calls: list[dict] = []
    real = app.rank

    def spy(q, db, rerank, valid=None, extras=None):  # type: ignore[no-untyped-def]
        calls.append({"q": q, "db": db, "rerank": rerank, "ranks": real(q, db, rerank, valid, extras)})
        return calls[-1]["ranks"]

    monkeypatch.setattr(app, "rank", spy)
    return calls


def _spy_pipeline(monkeypatch: pytest.MonkeyPatch) -> list[app.Pipeline]:
    pipes: list[app.Pipeline] = []

    class Spy(app.Pipeline):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            pipes.append(self)

    monkeypatch.setattr(app, "Pipeline", Spy)
    return pipes


@pytest.mark.weights
def test_her_and_qe_her_equal_reranking_the_plain_descriptors(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rerank=her / qe_her rank exactly as HeR / AQE-then-HeR applied by hand to the descriptors of a plain run."""
    from deepagg.functional import heat_rerank, query_expansion
    from deepagg.nn.heat import HER_DEFAULT_LAM
    from deepagg.nn.rerank import rank_by_similarity

    calls = _spy_rank(monkeypatch)
    plain = _run(HEW_FAST, fake_root, "plain")
    q, db = calls[0]["q"], calls[0]["db"]
    torch.testing.assert_close(calls[0]["ranks"], rank_by_similarity(q, db), rtol=0, atol=0)
    gnd = load_revisitop(fake_root / "data", "roxford5k", check_counts=False).gnd
    lam = HER_DEFAULT_LAM["paper"]
    qe = query_expansion(q, db, k=10)
    want = {
        "her": heat_rerank(q, db, rank_by_similarity(q, db), k=800, lam=lam),
        "qe_her": heat_rerank(qe, db, rank_by_similarity(qe, db), k=800, lam=lam),
    }
    for name, ranks in want.items():
        assert not torch.equal(ranks, calls[0]["ranks"]), f"{name} changes nothing here: a vacuous test"
        results = _run([*HEW_FAST, f"rerank={name}"], fake_root, name)
        torch.testing.assert_close(calls[-1]["db"], db, rtol=0, atol=0)  # same cached descriptors
        assert torch.equal(calls[-1]["ranks"], ranks), name
        by_hand = evaluate_revisited(ranks.numpy(), gnd, kappas=(1, 5, 10))
        for setup in ("easy", "medium", "hard"):
            np.testing.assert_allclose(results[setup]["aps"], by_hand[setup]["aps"], err_msg=f"{name} {setup}")
    assert type(calls[-1]["rerank"]).__name__ == "RerankChain"
    assert _meta(fake_root / "qe_her")["rerank"].startswith("RerankChain(")
    assert 0.0 <= plain["medium"]["map"] <= 1.0


def _pooled_by_hand(pipe: app.Pipeline, pool: torch.nn.Module, paths: list, bbx: list | None) -> torch.Tensor:
    """Descriptors of one scale from the cached maps of the run, pooled one map at a time."""
    items = pipe.plans(inspect_images(paths), bbx)[0]
    with torch.no_grad():
        return torch.cat([pool(pipe.cache.get(str(it.key))[None]) for it in items])


@pytest.mark.weights
@pytest.mark.usefixtures("lenient_dataset_configs")
def test_hew_pools_equal_pooling_the_cached_maps_by_hand(
    train_set: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """pool=hew and pool=hew_hewr (centre fitted on rparis6k's database maps, whiten=none) end to end."""
    from deepagg.nn.rerank import rank_by_similarity

    calls, pipes = _spy_rank(monkeypatch), _spy_pipeline(monkeypatch)
    seen: list[torch.Tensor] = []
    data = train_set / "data"
    test = load_revisitop(data, "roxford5k", check_counts=False)
    train = load_revisitop(data, "rparis6k", check_counts=False)
    for name in ("hew", "hew_hewr"):
        with caplog.at_level("INFO", logger="lightning_apps.eval"):
            results = _run([*HEW_FAST, f"pool={name}"], train_set, name)
        pool = instantiate(OmegaConf.load(CONF / "pool" / f"{name}.yaml"))
        fitted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hew centre fitted")]
        meta = _meta(train_set / name)
        if name == "hew_hewr":
            train_maps = [
                pipes[-1].cache.get(str(it.key)) for it in pipes[-1].plans(inspect_images(train.images), None)[0]
            ]
            pool.fit_center(iter(train_maps))
            torch.testing.assert_close(pipes[-1].pool.center, pool.center)
            n = sum(m.shape[1] * m.shape[2] for m in train_maps)
            assert fitted == [f"hew centre fitted on rparis6k: {n} positions"]
            assert meta["pool_center_fitted_on"] == "rparis6k"
            assert meta["whiten_train"] is None  # whiten=none: only the centre came from rparis6k
        else:
            assert fitted == []
            assert meta["pool_center_fitted_on"] is None
        q = _pooled_by_hand(pipes[-1], pool, test.queries, test.bbx)
        db = _pooled_by_hand(pipes[-1], pool, test.images, None)
        torch.testing.assert_close(calls[-1]["q"], q)
        torch.testing.assert_close(calls[-1]["db"], db)
        by_hand = evaluate_revisited(rank_by_similarity(q, db).numpy(), test.gnd, kappas=(1, 5, 10))
        np.testing.assert_allclose(results["medium"]["aps"], by_hand["medium"]["aps"])
        np.testing.assert_allclose(results["hard"]["aps"], by_hand["hard"]["aps"])
        seen.append(db)
    assert not torch.allclose(seen[0], seen[1], atol=1e-3)  # the centred variant pools otherwise


@pytest.mark.weights
@pytest.mark.usefixtures("lenient_dataset_configs")
def test_hewr_descriptor_cache_follows_the_centre(train_set: Path, caplog: pytest.LogCaptureFixture) -> None:
    """store=descriptors: a centre fitted elsewhere (whiten_train=paris6k) gets new descriptors, never old ones."""
    other = make_fake_revisitop(train_set / "other", "rparis6k", seed=2, flip_db=True, flip_queries=True)
    copy_as_old_protocol(other, train_set / "data", "paris6k")
    common = [*HEW_FAST, "pool=hew_hewr", "store=descriptors"]

    def descriptor_entries() -> set[str]:
        return {p.name for p in (train_set / "data" / "features").rglob("*.pt") if torch.load(p).ndim == 1}

    with caplog.at_level("INFO", logger="lightning_apps.eval"):
        first = _run(common, train_set, "a")
        after_first = descriptor_entries()
        _run([*common, "whiten_train=paris6k"], train_set, "b")
        after_second = descriptor_entries()
        third = _run(common, train_set, "c")
    assert len(after_first) == 12  # the 10 database images and 2 queries of roxford5k
    assert len(after_second) == 24  # another centre: 12 new descriptors
    assert descriptor_entries() == after_second  # the first centre again: its descriptors are reused
    np.testing.assert_array_equal(first["medium"]["aps"], third["medium"]["aps"])
    a, b, c = (_meta(train_set / x) for x in "abc")
    assert (a["pool_center_fitted_on"], b["pool_center_fitted_on"]) == ("rparis6k", "paris6k")
    assert a["pool_center_sha256"] == c["pool_center_sha256"] != b["pool_center_sha256"]
    fitted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hew centre fitted")]
    assert [m.split(":")[0] for m in fitted] == [
        f"hew centre fitted on {x}" for x in ("rparis6k", "paris6k", "rparis6k")
    ]
    # the centre is fitted on maps even with store=descriptors: the training maps are in the cache (3-D entries)
    maps = [p for p in (train_set / "data" / "features").rglob("*.pt") if torch.load(p).ndim == 3]
    assert len(maps) == 20


def test_hewr_centre_set_is_needed_up_front_also_without_whitening(fake_root: Path) -> None:
    """pool=hew_hewr with whiten=none still needs rparis6k (the centre), named before any extraction."""
    with pytest.raises(DatasetNotFoundError) as info:
        _run([*HEW_FAST, "pool=hew_hewr"], fake_root)
    text = str(info.value)
    assert "'rparis6k' is needed to fit the HeW centre of pool=HeWPool (variant hewr)" in text
    assert "python -m deepagg.data.download rparis6k" in text
    assert not (fake_root / "data" / "features").exists()


@pytest.mark.usefixtures("lenient_dataset_configs")
def test_hewr_centre_on_test_images_is_refused(fake_root: Path) -> None:
    """The HeW centre obeys the whitening guard: fitted on the test set's own images it is refused up front."""
    with pytest.raises(app.ConfigError, match=r"the HeW centre of the pool would be fitted on test images"):
        _run([*HEW_FAST, "pool=hew_hewr", "whiten_train=roxf"], fake_root)
    assert not (fake_root / "data" / "features").exists()
