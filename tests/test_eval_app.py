"""The evaluation app: config composition, every YAML, end to end on a tiny dataset, DDP, cache, errors."""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
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

from deepagg.data.revisitop import DatasetNotFoundError, ImageReadError
from deepagg.metrics import evaluate_revisited
from lightning_apps import eval as app
from lightning_apps.extract import FeatureCache, SizeBucketSampler, extract_maps, plan_items
from lightning_apps.metrics import RevisitedMAP

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
FAST = [
    "backbone=mobilenet_v2",
    "backbone.pretrained=false",
    "imsize=128",
    "num_vis_queries=2",
    "trainer.enable_progress_bar=false",
]


def _photos() -> list[np.ndarray]:
    root = Path(next(iter(importlib.util.find_spec("sklearn").submodule_search_locations))) / "datasets" / "images"
    return [np.asarray(Image.open(root / n).convert("RGB")) for n in ("china.jpg", "flower.jpg")]


def make_fake_revisitop(data_root: Path, name: str = "roxford5k") -> Path:
    """Two real photos, five crops each as the database, the whole photos as queries (revisitop layout)."""
    root = data_root / "datasets" / name
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    imlist, qimlist, gnd = [], [], []
    for p, photo in enumerate(_photos()):
        h, w = photo.shape[:2]
        for v in range(5):
            ch, cw = int(h * 0.6), int(w * 0.6)
            y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
            Image.fromarray(photo[y : y + ch, x : x + cw]).save(root / "jpg" / f"p{p}_v{v}.jpg")
            imlist.append(f"p{p}_v{v}")
        Image.fromarray(photo).save(root / "jpg" / f"q{p}.jpg")
        qimlist.append(f"q{p}")
        gnd.append(
            {
                "bbx": [50.0, 40.0, 400.0, 300.0],
                "easy": np.arange(p * 5, p * 5 + 3),
                "hard": np.arange(p * 5 + 3, p * 5 + 5),
                "junk": np.array([], dtype=np.int64),
            }
        )
    with (root / f"gnd_{name}.pkl").open("wb") as fh:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, fh)
    return root


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


def test_ddp_two_processes_equal_one(fake_root: Path) -> None:
    common = ["+dataset=roxf", f"data_root={fake_root / 'data'}", "+dataset.check_counts=false", "whiten=none", *FAST]
    one = _cli([*common, f"output_dir={fake_root / 'one'}", f"cache_dir={fake_root / 'c1'}"], fake_root / "h1")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(
        [*common, "trainer=ddp", f"output_dir={fake_root / 'two'}", f"cache_dir={fake_root / 'c2'}"], fake_root / "h2"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert (fake_root / "one" / "per_query_ap.csv").read_text() == (fake_root / "two" / "per_query_ap.csv").read_text()
    # The two processes wrote the cache between them: the same set of files as one process.
    c1 = sorted(p.name for p in (fake_root / "c1").rglob("*.pt"))
    c2 = sorted(p.name for p in (fake_root / "c2").rglob("*.pt"))
    assert c1 == c2


# --------------------------------------------------------------------------------------------------------------
# Cache, sampler, metric
# --------------------------------------------------------------------------------------------------------------


def test_cache_write_crash_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = FeatureCache(tmp_path / "cache")

    def boom(obj, fh, *args, **kwargs):
        fh.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.put("ab" + "0" * 62, torch.ones(2, 3, 4))
    assert not cache.has("ab" + "0" * 62)
    assert list((tmp_path / "cache").rglob("*")) == [tmp_path / "cache" / "ab"]


def test_interrupted_extraction_resumes(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pytorch_lightning as pl

    from deepagg.backbones import mobilenet_v2

    ds_root = fake_root / "data" / "datasets" / "roxford5k" / "jpg"
    paths = sorted(ds_root.glob("p*.jpg"))
    items = plan_items(paths, None, imsize=96, scales=[1.0], model_id="m", is_query=False)[0]
    cache = FeatureCache(fake_root / "cache")
    net = mobilenet_v2(pretrained=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    real_put = FeatureCache.put
    calls = {"n": 0}

    def crash_after_three(self, key, fmap):
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        real_put(self, key, fmap)

    monkeypatch.setattr(FeatureCache, "put", crash_after_three)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_maps(trainer, net, items, cache, batch_size=2)
    assert sum(cache.has(it.key) for it in items) == 3
    assert not list((fake_root / "cache").rglob("*.tmp"))
    monkeypatch.setattr(FeatureCache, "put", real_put)
    written = []
    monkeypatch.setattr(FeatureCache, "put", lambda self, key, fmap: (written.append(key), real_put(self, key, fmap)))
    extract_maps(trainer, net, items, cache, batch_size=2)
    assert len(written) == len(items) - 3
    assert all(cache.has(it.key) for it in items)


def test_size_bucket_sampler_exact_and_sharded() -> None:
    sizes = [(4, 5), (3, 3), (4, 5), (3, 3), (4, 5), (2, 2)]
    batches = list(SizeBucketSampler(sizes, 2))
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len({sizes[i] for i in b}) == 1 for b in batches)
    r0 = list(SizeBucketSampler(sizes, 2, rank=0, world_size=2))
    r1 = list(SizeBucketSampler(sizes, 2, rank=1, world_size=2))
    assert sorted(i for b in r0 + r1 for i in b) == list(range(6))
    assert list(SizeBucketSampler([(1, 1)], 2, rank=1, world_size=2)) == [[]]


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
def test_end_to_end_on_clutter_tiny(tmp_path: Path) -> None:
    """The default code path (a dataset built by the project from Debian photos), tiny variant, real weights."""
    try:
        from deepagg.data.sources import DebianSourceError, fetch_debs

        fetch_debs(["tuxpaint-stamps-default"])
    except DebianSourceError as exc:
        if not os.environ.get("DEEPAGG_REQUIRE_DEBIAN") and shutil.which("apt-get") is None:
            pytest.skip(f"needs apt-get: {exc}")
        raise
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
