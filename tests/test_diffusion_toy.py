"""The Fig. 1 diffusion toy command: the embedding's kernel, the ranks behind the shading, and the CLI."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_apps import diffusion_toy as dt

# Small and quick: 2 x 50 moon points, a 24 x 18 score grid, 60 CG iterations (enough for 100 nodes: the
# printed residual is about 1e-7).
SMALL = ["--data", "moons", "--points", "50", "--panel", "300", "--grid", "24", "--iters", "60"]
SUMMARY = re.compile(
    r"top (\d+) \(\|A\|/2\): plain NN ([0-9.]+), diffusion ([0-9.]+); two queries: moon-B points among the top "
    r"\d+ ([0-9.]+) by diffusion;.* max relative residual ([0-9.e+-]+);"
)


def test_unit_embedding_is_a_gaussian_kernel() -> None:
    rng = np.random.default_rng(0)
    sigma = 0.2
    p = rng.uniform(-1.0, 1.0, size=(40, 2))
    e = dt.unit_embedding(p, dt._centres((-1.0, -1.0, 1.0, 1.0), sigma), sigma).numpy()
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0)
    d2 = ((p[:, None] - p[None]) ** 2).sum(-1)
    expected = np.exp(-d2 / (2 * sigma**2))
    assert np.abs(e @ e.T - expected).max() < 1e-3
    far = dt.unit_embedding(np.array([[50.0, 50.0]]), dt._centres((-1.0, -1.0, 1.0, 1.0), sigma), sigma)
    assert math.isclose(float(far.norm()), 1.0)  # far outside the centres: still a unit vector, no NaN


def test_rank_fraction_and_top_fraction() -> None:
    db = np.array([4.0, 3.0, 2.0, 1.0, 0.0, 0.0])
    r = dt.rank_fraction(np.array([9.0, 3.0, 2.5, 0.5, 0.0]), db)
    assert r.tolist() == pytest.approx([0.0, 1 / 6, 2 / 6, 4 / 6, 4 / 6])  # ties with the m-th: inside the top m
    labels = np.array([0, 1, 0, 1, 0, 1])
    assert dt.top_fraction(db, labels, 0, 3) == pytest.approx(2 / 3)
    assert dt.top_fraction(db, labels, 1, 4) == pytest.approx(0.5)


def test_make_toy_layout() -> None:
    toy = dt.make_toy("spirals", 30, noise=0.0, at=0.5, seed=1)
    assert toy.points.shape == (60, 2)
    assert toy.labels.tolist() == [0] * 30 + [1] * 30
    np.testing.assert_allclose(toy.queries[1], -toy.queries[0])  # arm B is arm A turned by pi
    radii = np.linalg.norm(toy.points, axis=1)
    assert radii.max() <= 1.0 + 1e-12


def test_cli_diffusion_beats_plain_nn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fig" / "toy.png"
    assert dt.main([*SMALL, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out)
    match = SUMMARY.search(lines[0])
    assert match is not None, lines[0]
    top, nn, diffusion, two_b, residual = match.groups()
    assert int(top) == 25
    assert float(diffusion) >= 0.95  # diffusion keeps to moon A
    assert float(diffusion) - float(nn) >= 0.25  # plain NN takes in a good part of moon B
    assert 0.25 <= float(two_b) <= 0.75  # two queries, one per moon: both moons in the top
    assert float(residual) < 1e-5
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.mode == "RGB"
        assert im.size == dt.figure_size(300) == (3 * (300 + 2 * dt.MARGIN), dt.HEADER_H + dt.TITLE_H + 225 + 92)
        rgb = np.asarray(im.convert("RGB"), dtype=int)
    # Blue database points, green seeds and red queries are drawn, and the plots are shaded (orange).
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    assert ((b > 180) & (r < 80)).sum() > 100
    assert ((g > 140) & (r < 60) & (b < 100)).sum() > 30
    assert ((r > 200) & (g < 40) & (b < 40)).sum() > 30
    assert ((r > 230) & (g > 140) & (g < 200) & (b < 110)).sum() > 500
    assert [p.name for p in out.parent.iterdir()] == ["toy.png"]  # atomic write leaves no temporary file


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--alpha", "1.5"], "--alpha must be in (0, 1); got 1.5."),
        (["--k", "100"], "--k must be an integer in [1, 100) (N = 2 x --points); got 100."),
        (["--kq", "0"], "--kq must be an integer in [1, 100]"),
        (["--points", "5"], "--points must be an integer >= 10; got 5."),
        (["--panel", "120"], f"--panel must be an integer >= {dt.MIN_PANEL}; got 120."),
        (["--grid", "400"], "--grid must be an integer in [8, --panel = 300]; got 400."),
        (["--at", "1.2"], "--at must be a fraction in [0, 1]; got 1.2."),
        (["--sigma", "nan"], "--sigma must be a finite number > 0; got nan."),
        (["--sigma", "0.002"], "--sigma 0.002 is too small for the plot"),
        (["--noise", "-1"], "--noise must be a finite number >= 0"),
    ],
)
def test_cli_bad_arguments_exit_2(
    args: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.png"
    assert dt.main([*SMALL, *args, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: diffusion_toy: ")
    assert match in err[0]
    assert captured.out == ""
    assert not out.exists()


@pytest.mark.parametrize(("args", "name"), [(["--points", "ten"], "--points"), (["--data", "cubes"], "--data")])
def test_cli_unparsable_arguments_exit_2(args: list[str], name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        dt.main(args)
    assert exc.value.code == 2
    assert f"argument {name}" in capsys.readouterr().err
