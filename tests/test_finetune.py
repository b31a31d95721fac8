"""The fine-tuning app (``python -m lightning_apps.finetune``) on the tiny ``clutter`` variant, on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

import lightning_apps.eval as eval_app
from deepagg.functional import l2n
from lightning_apps import finetune as ft
from lightning_apps.eval import ConfigError
from lightning_apps.paths import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]


def _compose(overrides: list[str], name: str = "finetune"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory, debian_packages: None) -> Path:
    """A data root with ``clutter_tiny`` built once for this module (4 objects, 8 queries, 40 images)."""
    from deepagg.data import ensure_clutter

    root = tmp_path_factory.mktemp("ft") / "data"
    ensure_clutter(root, variant="tiny", progress=False)
    return root


def _tiny(root: Path, out: Path, *extra: str):
    return _compose(
        [
            f"data_root={root}",
            "train_dataset=clutter_tiny",
            "+dataset=clutter_tiny",
            "val_objects=1",
            "train_imsize=96",
            "tuples_per_epoch=4",
            "tuples_per_batch=2",
            "max_epochs=1",
            "test.enabled=false",
            "trainer.enable_progress_bar=false",
            f"output_dir={out}",
            *extra,
        ]
    )


class MaskOnlyPool(torch.nn.Module):
    """A pool with no parameters and no gradient path: the share of positions above the mean, per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2n((x > x.mean((2, 3), keepdim=True)).float().mean((2, 3)))


# ------------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("group", ["loss", "miner", "optim"])
def test_every_new_group_composes_and_instantiates(group: str) -> None:
    names = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert len(names) >= 2
    g = torch.Generator().manual_seed(0)
    for name in names:
        cfg = _compose([f"{group}={name}"])
        obj = instantiate(cfg[group])
        if group == "loss":
            a, p, n = l2n(torch.randn(3, 8, generator=g)), l2n(torch.randn(3, 8, generator=g)), torch.randn(3, 2, 8)
            value = obj(a, p, l2n(n, dim=-1), torch.ones(3, 2, dtype=torch.bool))
            assert value.ndim == 0
            assert torch.isfinite(value)
        elif group == "miner":
            q, c = l2n(torch.randn(2, 8, generator=g)), l2n(torch.randn(6, 8, generator=g))
            idx = obj(q, c, torch.tensor([0, 1]), torch.tensor([0, 1, 2, 2, -1, 0]), generator=g)
            assert idx.shape == (2, cfg.miner.num_negatives)
        else:
            w = torch.nn.Parameter(torch.randn(4))
            opt = obj([{"params": [w]}])
            assert isinstance(opt, torch.optim.Optimizer)
            assert opt.param_groups[0]["lr"] == cfg.optim.lr


def test_default_finetune_config() -> None:
    cfg = _compose([])
    assert cfg.backbone._target_ == "deepagg.backbones.mobilenet_v2"
    assert cfg.pool._target_ == "deepagg.GeM"
    assert cfg.whiten.get("module") is None
    assert cfg.loss._target_ == "deepagg.ContrastiveLoss"
    assert cfg.miner.strategy == "hardest"
    assert cfg.train_dataset == "clutter_train"
    assert "dataset" not in cfg
    assert cfg.trainer.reload_dataloaders_every_n_epochs == 1
    assert cfg.trainer.enable_checkpointing
    ft.check_finetune_config(cfg)


def test_whiten_checkpoint_composes_in_eval() -> None:
    cfg = _compose(["whiten=checkpoint", "ckpt_path=/x.ckpt"], name="eval")
    assert cfg.whiten.fit == "checkpoint"
    assert cfg.whiten.module is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tuples_per_batch=0"], r"tuples_per_batch must be an int >= 1; got 0\."),
        (["lr_decay=1.5"], r"lr_decay must be a number in \(0, 1\]; got 1\.5\."),
        (["loggers=[csv,wandb]"], r"loggers must be a list of \['csv', 'tensorboard'\]; got \['csv', 'wandb'\]\."),
        (["whiten=pca"], r"whiten must be none or learned .*; got fit='pca'\."),
        (["resume=/nonexistent.ckpt"], r"resume must be null, last or a checkpoint file; '/nonexistent\.ckpt' is not"),
    ],
)
def test_bad_values_are_refused_before_any_work(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ft.check_finetune_config(_compose(overrides))


def test_bad_value_exits_2_with_one_paragraph(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_apps.finetune", "tuples_per_epoch=0", f"output_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error: finetune: invalid configuration: tuples_per_epoch must be an int >= 1; got 0." in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------------ checks


def test_non_differentiable_pool_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"pool=mask_only \(MaskOnlyPool\) cannot be fine-tuned: its output does not"):
        ft.check_differentiable(MaskOnlyPool(), 8, "mask_only")


@pytest.mark.parametrize("name", ["gem", "mac", "spoc", "rmac", "crow", "hew", "agaussian_echannel"])
def test_differentiable_pools_pass_the_check(name: str) -> None:
    pool = instantiate(_compose([f"pool={name}"]).pool)
    ft.check_differentiable(pool, 16, name)


def _fake_split_dataset(gts: list[str | None], objects: list[str | None]) -> SimpleNamespace:
    n = len(gts)
    return SimpleNamespace(
        name="fake",
        num_images=n,
        num_queries=0,
        gnd=[],
        images=[f"db_{i}.jpg" for i in range(n)],
        queries=[],
        bbx=[],
        extra={
            "manifest": {"images": [{"object": o, "gt": g} for o, g in zip(objects, gts, strict=True)], "queries": []}
        },
    )


def test_empty_train_split_is_refused() -> None:
    # Two objects, one held out; the other has only junk views: no matching pair is left to train on.
    ds = _fake_split_dataset(["junk", "junk", "easy", "hard", None], ["a", "a", "b", "b", None])
    with pytest.raises(ConfigError, match=r"the train split of 'fake' is empty: no matching pair .* outside the 1"):
        ft.split_train(ds, 1, seed=_seed_holding_out(["a", "b"], "b"))  # type: ignore[arg-type]


def _seed_holding_out(objects: list[str], wanted: str) -> int:
    for seed in range(100):
        if objects[int(torch.randperm(len(objects), generator=torch.Generator().manual_seed(seed))[0])] == wanted:
            return seed
    raise AssertionError


def test_split_without_object_labels_and_too_many_val_objects() -> None:
    ds = _fake_split_dataset(["easy", "hard"], ["a", "a"])
    ds.extra = {}
    with pytest.raises(ConfigError, match=r"train_dataset 'fake' does not name the object of every image"):
        ft.split_train(ds, 1, seed=0)  # type: ignore[arg-type]
    ds = _fake_split_dataset(["easy", "hard"], ["a", "b"])
    with pytest.raises(ConfigError, match=r"val_objects must be between 1 and 1 .* got 2\."):
        ft.split_train(ds, 2, seed=0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------ runs


def _parts(cfg):
    from omegaconf import open_dict

    cfg = eval_app.with_default_dataset(cfg)
    train = eval_app.load_dataset(eval_app.dataset_config(str(cfg.train_dataset)), cfg)
    split = ft.split_train(train, int(cfg.val_objects), int(cfg.seed))
    images = ft.load_images(split, imsize=int(cfg.train_imsize), resize=str(cfg.resize))
    with open_dict(cfg):
        cfg.trainer.precision = "32-true"
    module, data = ft.build_model(cfg, split, images, ft._group_name("pool", cfg.pool))
    return cfg, split, images, module, data


@pytest.mark.weights
@pytest.mark.debian
def test_split_is_by_object_and_mined_negatives_are_other_objects_hardest_first(
    tiny_root: Path, tmp_path: Path
) -> None:
    _cfg, split, _, module, data = _parts(_tiny(tiny_root, tmp_path, "tuples_per_epoch=8"))
    train_labels = set(split.labels[split.train_rows].tolist()) - {-1}
    val_labels = set(split.labels[split.val_queries].tolist())
    assert len(val_labels) == 1
    assert not train_labels & val_labels
    held = torch.isin(split.labels, torch.tensor(sorted(val_labels)))
    assert not set(split.train_rows.tolist()) & set(torch.nonzero(held).flatten().tolist())
    assert split.val_db.tolist() == list(range(40))  # held-out views among every database image
    for g, q in zip(split.val_gnd, split.val_queries.tolist(), strict=True):  # positives: the query's object only
        pos = np.concatenate([g["easy"], g["hard"], g["junk"]])
        assert len(pos)
        assert set(split.labels[split.val_db[pos]].tolist()) == {int(split.labels[q])}
    manifest = json.loads((tiny_root / "clutter_tiny" / "manifest.json").read_text())
    gt = [r.get("gt") for r in manifest["images"]]
    tuples = data.mine(module, 0)
    assert len(tuples) == 8
    for a, p, *negs in tuples:
        la = int(split.labels[a])
        assert int(split.labels[p]) == la
        assert p >= len(gt) or gt[p] in ("easy", "hard")
        assert negs, "every tuple gets negatives"
        objs = [int(split.labels[n]) for n in negs]
        assert la not in objs  # never a positive or a junk view: those are views of the anchor's object
        assert len([o for o in objs if o >= 0]) == len({o for o in objs if o >= 0})  # one per object
        desc = module.describe([data.images[r] for r in (a, *negs)])
        sims = desc[1:] @ desc[0]
        assert bool((sims[:-1] >= sims[1:] - 1e-5).all()), "hardest first"


@pytest.mark.weights
@pytest.mark.debian
def test_two_steps_lower_the_loss_on_a_fixed_batch(tiny_root: Path, tmp_path: Path) -> None:
    import pytorch_lightning as pl

    _cfg, _split, images, module, data = _parts(_tiny(tiny_root, tmp_path))
    pl.seed_everything(0, verbose=False)
    fixed = data.mine(module, 0)  # epoch 0 draws the same tuples inside fit (same seed, same model)
    batch = [[images[r] for r in t] for t in fixed]
    module.train()
    with torch.no_grad():
        before = float(module.tuple_loss(batch))
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, reload_dataloaders_every_n_epochs=1, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    assert data.last_tuples == fixed
    module.train()
    with torch.no_grad():
        after = float(module.tuple_loss(batch))
    assert after < before, (before, after)


@pytest.mark.weights
@pytest.mark.debian
def test_resume_continues_step_count_and_optimizer_state(tiny_root: Path, tmp_path: Path) -> None:
    straight = ft.run_finetune(_tiny(tiny_root, tmp_path / "a", "max_epochs=2"))
    assert straight is not None
    assert straight["global_step"] == 4
    assert straight["epochs"] == 2
    ft.run_finetune(_tiny(tiny_root, tmp_path / "b", "max_epochs=1"))
    first = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2
    resumed = ft.run_finetune(_tiny(tiny_root, tmp_path / "b", "max_epochs=2", "resume=last"))
    assert resumed is not None
    assert resumed["global_step"] == 4
    assert resumed["val_before"] is None
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    assert a["epoch"] == b["epoch"]
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    assert len(sa) > 10
    for k in sa:
        assert float(sa[k]["step"]) == float(sb[k]["step"]) == 4
        torch.testing.assert_close(sa[k]["exp_avg"], sb[k]["exp_avg"], rtol=0, atol=0)
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=0)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 2
    # the log and the curve cover all epochs, the model before training included
    metrics = ft.read_metrics(tmp_path / "a" / "logs" / "metrics.csv")
    assert [x for x, _ in metrics["val/mAP_medium"]] == [0.0, 1.0, 2.0]
    assert len(metrics["train/loss_step"]) == 4
    with Image.open(tmp_path / "a" / "training_curve.png") as im:
        assert im.size[0] > im.size[1] > 100
    summary = json.loads((tmp_path / "a" / "results.json").read_text())
    assert summary["best_checkpoint"].endswith("best.ckpt")
    assert Path(summary["best_checkpoint"]).is_file()
    assert "ckpt_path=" in summary["eval_command"]


@pytest.mark.weights
@pytest.mark.debian
def test_checkpoint_loads_in_the_eval_app(tiny_root: Path, tmp_path: Path) -> None:
    summary = ft.run_finetune(_tiny(tiny_root, tmp_path / "ft", "optim.lr=1e-4"))
    assert summary is not None
    ckpt = summary["best_checkpoint"]
    state = torch.load(ckpt, weights_only=True)  # the eval app loads with weights_only=True
    assert state["deepagg"]["pool_target"] == "deepagg.GeM"
    p_trained = float(state["state_dict"]["pool.p"])
    assert p_trained != 3.0  # GeM's p trained (learn_pool)
    cfg = _compose(
        [
            f"data_root={tiny_root}",
            "+dataset=clutter_tiny",
            "backbone=mobilenet_v2",
            "pool=gem",
            "whiten=none",
            "imsize=96",
            "mode=single",
            f"ckpt_path={ckpt}",
            "save_descriptors=true",
            "num_vis_queries=0",
            "trainer.enable_progress_bar=false",
            f"output_dir={tmp_path / 'eval'}",
        ],
        name="eval",
    )
    results = eval_app.run(cfg)
    assert results is not None
    assert results["medium"]["map"] > 0
    meta = json.loads((tmp_path / "eval" / "results.json").read_text())["meta"]
    assert meta["ckpt_pool"] == "deepagg.GeM"
    assert meta["ckpt_sha256"]
    # the eval app's descriptors are the fine-tuned model's (maps stored in float16 there)
    saved = torch.load(tmp_path / "eval" / "descriptors.pt", weights_only=False)
    _, split, images, module, _ = _parts(_tiny(tiny_root, tmp_path / "x", f"ckpt_path={ckpt}"))
    assert float(module.pool.p) == pytest.approx(p_trained)
    for j in split.val_db[:3].tolist():
        with torch.no_grad():
            mine = module.eval()(images[j])
        torch.testing.assert_close(saved["db"][j], mine, atol=5e-3, rtol=0)


@pytest.mark.weights
@pytest.mark.debian
def test_whitening_layer_trains_and_evaluates_with_whiten_checkpoint(tiny_root: Path, tmp_path: Path) -> None:
    summary = ft.run_finetune(_tiny(tiny_root, tmp_path / "ft", "whiten=learned", "whiten.dim=16"))
    assert summary is not None
    assert summary["eval_command"].endswith("whiten=checkpoint")
    state = torch.load(summary["best_checkpoint"], weights_only=True)["state_dict"]
    assert state["whiten.projection"].shape == (16, 1280)
    base = [f"data_root={tiny_root}", "+dataset=clutter_tiny", "backbone=mobilenet_v2", "pool=gem", "imsize=96"]
    base += ["mode=single", "num_vis_queries=0", "trainer.enable_progress_bar=false"]
    cfg = _compose(
        [*base, "whiten=checkpoint", f"ckpt_path={summary['best_checkpoint']}", f"output_dir={tmp_path / 'e'}"],
        name="eval",
    )
    assert eval_app.run(cfg) is not None
    meta = json.loads((tmp_path / "e" / "results.json").read_text())["meta"]
    assert meta["whiten"] == "checkpoint"
    assert meta["whiten_dim"] == 16
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {k: v for k, v in state.items() if k.startswith("backbone.")}}, plain)
    bad = _compose([*base, "whiten=checkpoint", f"ckpt_path={plain}", f"output_dir={tmp_path / 'f'}"], name="eval")
    with pytest.raises(ConfigError, match=r"whiten=checkpoint needs a ckpt_path of lightning_apps.finetune trained"):
        eval_app.run(bad)


@pytest.mark.weights
@pytest.mark.debian
def test_test_step_reports_before_and_after_with_paired_stats(tiny_root: Path, tmp_path: Path) -> None:
    summary = ft.run_finetune(
        _tiny(tiny_root, tmp_path, "test.enabled=true", "test.imsize=96", "test.whiten=none", "test.n_boot=200")
    )
    assert summary is not None
    rows = summary["test"]["rows"]
    assert list(rows) == ["before (ImageNet)", "after (fine-tuned)"]
    assert "ckpt_path=" in rows["after (fine-tuned)"]["command"]
    report = (tmp_path / "test" / "results.md").read_text()
    assert "after (fine-tuned)" in report
    assert "improved" in report.lower()
    per_query = (tmp_path / "test" / "per_query_ap.csv").read_text().splitlines()
    assert len(per_query) == 1 + 8
    # the before row is the eval app's own number for the same pipeline
    cfg = _compose(
        [
            f"data_root={tiny_root}",
            "+dataset=clutter_tiny",
            "backbone=mobilenet_v2",
            "pool=gem",
            "imsize=96",
            "mode=single",
            "whiten=none",
            "num_vis_queries=0",
            f"output_dir={tmp_path / 'e'}",
        ],
        name="eval",
    )
    res = eval_app.run(cfg)
    assert rows["before (ImageNet)"]["medium"] == round(100 * float(res["medium"]["map"]), 2)


@pytest.mark.weights
@pytest.mark.debian
def test_non_differentiable_pool_fails_the_run_before_training(tiny_root: Path, tmp_path: Path) -> None:
    from omegaconf import open_dict

    cfg = _tiny(tiny_root, tmp_path)
    with open_dict(cfg):
        cfg.pool = {"_target_": "tests.test_finetune.MaskOnlyPool"}
    with pytest.raises(ConfigError, match=r"\(MaskOnlyPool\) cannot be fine-tuned"):
        ft.run_finetune(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.weights
@pytest.mark.debian
@pytest.mark.parametrize(
    "extra", [["loss=triplet", "miner=random", "optim=sgd"], ["pool=hew"], ["pool=temb"], ["pool=hew_hewr"]]
)
def test_other_losses_miners_optimizers_and_pools_run(tiny_root: Path, tmp_path: Path, extra: list[str]) -> None:
    summary = ft.run_finetune(_tiny(tiny_root, tmp_path, *extra))
    assert summary is not None
    assert summary["global_step"] == 2
    assert np.isfinite(summary["val_last"]["medium"])


# ------------------------------------------------------------------------------------------------------ synthetic


def _synthetic(precision_dtype: list[torch.dtype]):
    """A tiny conv backbone + learnable GeM on random images: 3 objects and 2 distractors, no files."""
    from functools import partial

    from deepagg import ContrastiveLoss, GeM, HardNegativeMiner

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, -1, -1])
    split = ft.TrainSplit(
        name="synthetic", paths=[Path(f"{i}.jpg") for i in range(10)], bbx=[None] * 10, labels=labels,
        objects=["a", "b", "c"], train_objects=["a", "b", "c"], val_objects=[],
        pairs=torch.tensor([[0, 1], [3, 4], [6, 7], [1, 2]]), candidates=torch.arange(10), val_db=torch.arange(10),
        val_queries=torch.tensor([2, 5]),
        val_gnd=[{"easy": np.array([0, 1]), "hard": np.array([], np.int64), "junk": np.array([2])},
                 {"easy": np.array([3, 4]), "hard": np.array([], np.int64), "junk": np.array([5])}],
    )  # fmt: skip
    images = {i: torch.randn(3, 32, 40, generator=g) for i in range(10)}
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.ReLU())
    backbone[0].register_forward_hook(lambda m, i, o: precision_dtype.append(o.dtype))
    module = ft.Finetuner(
        backbone, GeM(learnable=True), None, ContrastiveLoss(), partial(torch.optim.Adam, lr=1e-3),
        val_gnd=split.val_gnd, n_val_db=10,
    )  # fmt: skip
    data = ft.TupleData(
        split, images, HardNegativeMiner(num_negatives=2), tuples_per_epoch=4, tuples_per_batch=2, seed=0
    )
    return module, data


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_synthetic_run_in_float32_and_mixed_precision(precision: str) -> None:
    import pytorch_lightning as pl

    dtypes: list[torch.dtype] = []
    module, data = _synthetic(dtypes)
    trainer = pl.Trainer(
        accelerator="cpu", precision=precision, max_epochs=2, reload_dataloaders_every_n_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4
    assert module.last_val["epochs"] == 2
    assert 0 < module.last_val["medium"] <= 100
    assert float(module.pool.p) != 3.0  # GeM's p is trained, at lr * pool_lr_mult
    assert all(len(t) == 4 for t in data.last_tuples)  # anchor, positive and 2 negatives of other objects
    want = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    assert want in dtypes  # the training steps ran under autocast in mixed precision


def test_fast_dev_run_on_a_synthetic_datamodule() -> None:
    import pytorch_lightning as pl

    module, data = _synthetic([])
    trainer = pl.Trainer(accelerator="cpu", fast_dev_run=True, logger=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1


@pytest.mark.weights
@pytest.mark.debian
def test_command_line_run_under_ddp_on_two_processes(tiny_root: Path, tmp_path: Path) -> None:
    """``python -m lightning_apps.finetune trainer=ddp``: 2 CPU processes share each epoch's tuples."""
    args = [f"data_root={tiny_root}", "train_dataset=clutter_tiny", "+dataset=clutter_tiny", "val_objects=1"]
    args += ["train_imsize=96", "tuples_per_epoch=8", "tuples_per_batch=2", "max_epochs=2", "test.enabled=false"]
    args += ["trainer=ddp", "trainer.enable_progress_bar=false", f"output_dir={tmp_path}"]
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_apps.finetune", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["global_step"] == 4  # 8 tuples per epoch, 4 per process, 2 per step, 2 epochs
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert [x for x, _ in ft.read_metrics(tmp_path / "logs" / "metrics.csv")["val/mAP"]] == [0.0, 1.0, 2.0]
    assert "evaluate it: python -m lightning_apps.eval mode=single backbone=mobilenet_v2 pool=gem" in proc.stdout


@pytest.mark.weights
@pytest.mark.debian
def test_fitted_pools_are_fitted_on_the_train_split_first(tiny_root: Path, tmp_path: Path) -> None:
    *_, module, _ = _parts(_tiny(tiny_root, tmp_path, "pool=temb"))
    assert bool(module.pool.fitted)  # PCA, codebook and rotation learned from the training part's maps
    ft.check_differentiable(module.pool, 1280, "temb")  # and the backbone trains through it
    with pytest.raises(ConfigError, match=r"pool=temb with mask=sift selects features by SIFT keypoints"):
        _parts(_tiny(tiny_root, tmp_path, "pool=temb", "pool.mask=sift"))
