"""The DSM figures command: Fig. 6 (inlier distribution) and Fig. 5 (one matched pair) from a synthetic dsm.pt."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deepagg.functional.spatial import LocalFeatures
from lightning_apps import dsm_figure as df

# The synthetic run: 3 queries, 10 database images, shortlists of 6. Query 0 (a 128 x 96 photo cropped to
# bbx -> 96 x 64 px) matches database image 4 (160 x 120 px) through a known upright affine warp.
Q_HW = ((8, 12), (4, 6))  # (H, W) of the query's maps at the two scales (of the 96 x 64 crop)
DB_HW = ((12, 16), (6, 8))
BBX = (16.0, 16.0, 112.0, 80.0)
WARP = np.array([[1.2, 0.0, 1.0], [0.1, 1.2, 0.5]])  # query map (scale 0) -> database map (scale 0)
N_TRUE, N_NOISE = 10, 3
RANKS = [
    [4, 1, 7, 2, 9, 0],
    [3, 5, 6, 8, 0, 1],
    [2, 7, 4, 9, 1, 6],
]
INLIERS = [
    [N_TRUE, 7, 3, 1, 0, 0],
    [15, 4, 2, 2, 1, 0],
    [9, 6, 5, 3, 0, 0],
]
GND = [
    {"easy": [4, 2], "hard": [1], "junk": [7]},
    {"easy": [3], "hard": [8, 5], "junk": [6, 9]},
    {"easy": [], "hard": [2, 9], "junk": [4]},
]
Q_GREY, DB_GREY = (120, 120, 120), (170, 170, 170)


def _features(centers: np.ndarray, covs: np.ndarray, channels: list[int], scales: list[int], hw: Any) -> LocalFeatures:
    n = len(centers)
    return LocalFeatures(
        torch.as_tensor(centers, dtype=torch.float32)[None].reshape(1, n, 2),
        torch.as_tensor(covs, dtype=torch.float32)[None].reshape(1, n, 2, 2),
        torch.linspace(1.0, 0.5, n)[None],
        torch.as_tensor(channels, dtype=torch.int64)[None],
        torch.as_tensor(scales, dtype=torch.int64)[None],
        torch.ones(1, n, dtype=torch.bool),
        torch.as_tensor(hw, dtype=torch.int64)[None],
    )


def _pair_features() -> tuple[LocalFeatures, LocalFeatures]:
    """The query's 10 features (channels 0..9, scale 0) and their warped copies plus 3 outliers (channels 0..2)."""
    rng = np.random.default_rng(0)
    qc = np.stack([rng.uniform(1, 10, N_TRUE), rng.uniform(1, 6, N_TRUE)], 1)
    a = rng.uniform(0.3, 0.8, (N_TRUE, 2, 2))
    qcov = a @ a.transpose(0, 2, 1) + 0.2 * np.eye(2)
    lin, t = WARP[:, :2], WARP[:, 2]
    dc = qc @ lin.T + t
    dcov = lin @ qcov @ lin.T
    noise_c = dc[:N_NOISE] + np.array([5.0, 3.0])  # far from where the warp puts them
    q = _features(qc, qcov, list(range(N_TRUE)), [0] * N_TRUE, Q_HW)
    db = _features(
        np.concatenate([dc, noise_c]),
        np.concatenate([dcov, dcov[:N_NOISE]]),
        [*range(N_TRUE), *range(N_NOISE)],
        [0] * (N_TRUE + N_NOISE),
        DB_HW,
    )
    return q, db


def _write_run(run: Path, **override: Any) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    photo = np.zeros((96, 128, 3), dtype=np.uint8)  # black outside the box, grey inside
    photo[16:80, 16:112] = Q_GREY
    Image.fromarray(photo).save(run / "q.png")
    Image.new("RGB", (160, 120), DB_GREY).save(run / "db4.png")
    q, db4 = _pair_features()
    q_all = LocalFeatures.cat([q, LocalFeatures.empty(2, 2)])
    q_all = LocalFeatures(**{**q_all.as_dict(), "map_sizes": torch.tensor([Q_HW] * 3)})
    db_rows = [LocalFeatures.empty(1, 2) for _ in range(10)]
    db_rows[4] = db4
    db_all = LocalFeatures.cat(db_rows)
    payload = {
        "q_local_features": q_all.as_dict(),
        "db_local_features": db_all.as_dict(),
        "inliers": torch.tensor(INLIERS),
        "ranks": torch.tensor(RANKS),
        "queries": [str(run / "q.png")] * 3,
        "images": [str(run / ("db4.png" if i == 4 else f"missing{i}.png")) for i in range(10)],
        "bbx": [list(BBX), None, None],
        "gnd": GND,
        "dsm": {"scales": [1.0, 0.5], "error": 2.0, "max_scale_change": 3.0, "lo_iters": 3},
    }
    payload.update(override)
    torch.save(payload, run / "dsm.pt")
    return run


def _expected(protocol: str) -> tuple[list[int], list[int], int]:
    pos, neg, junk = [], [], 0
    for ranks, inl, g in zip(RANKS, INLIERS, GND, strict=True):
        p = set(g["easy"]) | set(g["hard"]) if protocol == "medium" else set(g["hard"])
        j = set(g["junk"]) if protocol == "medium" else set(g["junk"]) | set(g["easy"])
        for d, n in zip(ranks, inl, strict=True):
            if d in j:
                junk += 1
            elif d in p:
                pos.append(n)
            else:
                neg.append(n)
    return pos, neg, junk


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_map_to_image() -> None:
    c, s = df.map_to_image(np.array([[0.0, 0.0], [11.0, 7.0]]), np.tile(np.eye(2), (2, 1, 1)), (8, 12), (96, 64))
    # cell (0, 0) of an 8 x 12 map over 96 x 64 px spans pixels 0..8 x 0..8: its centre is pixel 3.5
    assert c.tolist() == [[3.5, 3.5], [91.5, 59.5]]
    assert s[0].tolist() == [[64.0, 0.0], [0.0, 64.0]]
    _, s = df.map_to_image(np.zeros((1, 2)), np.array([[[1.0, 0.5], [0.5, 2.0]]]), (4, 4), (8, 16))
    assert s[0].tolist() == [[4.0, 4.0], [4.0, 32.0]]  # diag(2, 4) S diag(2, 4)


@pytest.mark.parametrize("protocol", ["medium", "hard"])
def test_cli_inliers_figure_and_summary(protocol: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write_run(tmp_path / "run")
    out = tmp_path / "fig" / "inliers.png"
    assert df.main([str(run), "--inliers", str(out), "--protocol", protocol, "--thresholds", "2,0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    pos_list, neg_list, junk = _expected(protocol)
    pos, neg = np.asarray(pos_list), np.asarray(neg_list)
    assert len(pos) + len(neg) + junk == 18
    assert lines[0] == f"dsm_figure: {run / 'dsm.pt'}: 3 queries, top 6 re-ranked, {protocol} protocol"
    assert lines[1] == f"  positive images: {len(pos)}, inliers median {np.median(pos):.1f}, mean {pos.mean():.2f}"
    assert lines[2] == f"  negative images: {len(neg)}, inliers median {np.median(neg):.1f}, mean {neg.mean():.2f}"
    assert lines[3] == f"  junk images (left out): {junk}"
    for line, n in zip(lines[4:6], (0, 2), strict=True):
        m = re.fullmatch(rf"  <= {n} inliers: (\d\.\d{{4}}) of the negatives, (\d\.\d{{4}}) of the positives", line)
        assert m is not None, line
        assert float(m[1]) == pytest.approx((neg <= n).mean(), abs=5e-5)
        assert float(m[2]) == pytest.approx((pos <= n).mean(), abs=5e-5)
    assert lines[6] == str(out)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (750, 420)
    assert [p.name for p in out.parent.iterdir()] == ["inliers.png"]  # atomic write leaves no temporary file


def test_inlier_stats_split() -> None:
    saved = {"inliers": torch.tensor(INLIERS), "ranks": torch.tensor(RANKS), "gnd": GND}
    stats = df.inlier_stats(saved, "medium")
    # medium, query 0: 4, 1, 2 positive, 7 junk; query 1: 3, 5, 8 positive, 6 junk; query 2: 2, 9 positive, 4 junk
    assert stats.positive.tolist() == [10, 7, 1, 15, 4, 2, 9, 3]
    assert stats.negative.tolist() == [0, 0, 1, 0, 6, 0, 0]
    assert (stats.junk, stats.queries, stats.top) == (3, 3, 6)
    old = df.split_by_gnd({"ok": [1, 2], "junk": [3]}, "hard")  # old protocol: the same in both setups
    assert old == ({1, 2}, {3})


def test_cli_pair_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write_run(tmp_path / "run")
    out = tmp_path / "pair.png"
    assert df.main([str(run), "--pair", "0", "0", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        f"dsm_figure: query 0 vs re-ranked result 0 (database image 4, positive): {N_TRUE} inliers of "
        f"{N_TRUE + N_NOISE} tentative correspondences (stored: {N_TRUE})",
        str(out),
    ]
    qw, dw = round(96 * df.PAIR_HEIGHT / 64), round(160 * df.PAIR_HEIGHT / 120)
    with Image.open(out) as im:
        assert im.format == "PNG"
        fig = np.asarray(im.convert("RGB")).astype(int)
    head = 70
    assert fig.shape == (df.PAIR_HEIGHT + head, qw + df.GAP + dw, 3)
    # the query panel is the crop (grey: no black border of the photo), the database panel the other grey
    assert (fig[head + 2, 2] == Q_GREY).all()
    assert (fig[-3, qw - 3] == Q_GREY).all()
    assert (fig[head + 2, -3] == DB_GREY).all()
    # every inlier centre is drawn where the map -> pixel mapping puts it (a line starts there, not grey)
    q, db = _pair_features()
    assert df.match_pair(df.load_dsm(run), 0, 0).match.scale_pairs[0].tolist() == [0, 0]
    for feats, hw, size, off, grey in (
        (q, Q_HW[0], (96, 64), 0, Q_GREY),
        (db, DB_HW[0], (160, 120), qw + df.GAP, DB_GREY),
    ):
        scale = df.PAIR_HEIGHT / size[1]
        for x, y in feats.centers[0, :N_TRUE].tolist():
            px = ((x + 0.5) * size[0] / hw[1]) * scale - 0.5 + off  # ((x + 0.5) W / w - 0.5 + 0.5) s - 0.5
            py = ((y + 0.5) * size[1] / hw[0]) * scale - 0.5 + head
            patch = fig[round(py) - 1 : round(py) + 2, round(px) - 1 : round(px) + 2]
            assert np.abs(patch - np.array(grey)).max() > 40, (x, y)


def test_match_pair_recovers_the_warp(tmp_path: Path) -> None:
    """The recomputed match: all 10 true correspondences are inliers, the 3 outliers not; the warp is recovered."""
    saved = df.load_dsm(_write_run(tmp_path / "run"))
    pair = df.match_pair(saved, 0, 0)
    assert (pair.db, pair.label, pair.stored, pair.inliers, pair.tentative) == (4, "positive", 10, 10, 13)
    assert pair.match.transforms[0].numpy() == pytest.approx(WARP, abs=1e-4)
    assert df.match_pair(saved, 0, 1).label == "positive"
    assert df.match_pair(saved, 0, 2).label == "junk"
    assert df.match_pair(saved, 0, 5, "hard").label == "negative"
    assert df.match_pair(saved, 1, 0).inliers == 0  # no features: nothing to match


# ------------------------------------------------------------------------------------------------ errors


def test_missing_run_and_dsm_pt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nope = tmp_path / "nope"
    with pytest.raises(df.DsmFigureError, match=rf"^dsm_figure: run folder {re.escape(str(nope))} does not exist\.$"):
        df.load_dsm(nope)
    assert df.main([str(nope), "--inliers", str(tmp_path / "o.png")]) == 2
    assert _err_line(capsys) == f"error: dsm_figure: run folder {nope} does not exist."
    empty = tmp_path / "empty"
    empty.mkdir()
    message = f"dsm_figure: {empty} has no dsm.pt; run the eval app with rerank=dsm and output_dir={empty} to write it."
    with pytest.raises(df.DsmFigureError, match=f"^{re.escape(message)}$"):
        df.load_dsm(empty)
    assert df.main([str(empty), "--inliers", str(tmp_path / "o.png")]) == 2
    assert _err_line(capsys) == f"error: {message}"
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("how", ["missing", "none"])
def test_dsm_pt_without_inliers(how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write_run(tmp_path / "run", inliers=None)
    if how == "missing":
        saved = torch.load(run / "dsm.pt", weights_only=True)
        del saved["inliers"]
        torch.save(saved, run / "dsm.pt")
    message = (
        f"dsm_figure: {run / 'dsm.pt'} has no 'inliers' (the DSM re-ranking did not run); re-run the eval app with "
        "rerank=dsm."
    )
    with pytest.raises(df.DsmFigureError, match=f"^{re.escape(message)}$"):
        df.load_dsm(run)
    assert df.main([str(run), "--inliers", str(tmp_path / "o.png")]) == 2
    assert _err_line(capsys) == f"error: {message}"
    assert not (tmp_path / "o.png").exists()


def test_query_and_rank_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write_run(tmp_path / "run")
    saved = df.load_dsm(run)
    with pytest.raises(df.DsmFigureError, match=r"^dsm_figure: --pair QUERY must be in 0\.\.2 \(the run has 3 "):
        df.match_pair(saved, 3, 0)
    with pytest.raises(df.DsmFigureError, match=r"^dsm_figure: --pair RANK must be in 0\.\.5 \(the re-ranked "):
        df.match_pair(saved, 0, -1)
    out, fig6 = tmp_path / "o.png", tmp_path / "f6.png"
    assert df.main([str(run), "--pair", "-1", "0", "--out", str(out), "--inliers", str(fig6)]) == 2
    assert _err_line(capsys) == "error: dsm_figure: --pair QUERY must be in 0..2 (the run has 3 queries); got -1."
    assert df.main([str(run), "--pair", "2", "6", "--out", str(out)]) == 2
    assert _err_line(capsys) == (
        "error: dsm_figure: --pair RANK must be in 0..5 (the re-ranked shortlist has 6 images); got 6."
    )
    assert not out.exists()
    assert not fig6.exists()  # the pair is checked before anything is written


def test_bad_arguments_and_unreadable_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write_run(tmp_path / "run")
    assert df.main([str(run)]) == 2
    assert _err_line(capsys) == (
        "error: dsm_figure: nothing to draw; give --inliers OUT.png and/or --pair QUERY RANK --out OUT.png."
    )
    assert df.main([str(run), "--pair", "0", "0"]) == 2
    assert _err_line(capsys) == "error: dsm_figure: --pair QUERY RANK needs --out OUT.png."
    assert df.main([str(run), "--inliers", str(tmp_path / "o.png"), "--thresholds", "1,x"]) == 2
    assert _err_line(capsys) == "error: dsm_figure: --thresholds must be comma-separated ints >= 0; got '1,x'."
    # rank 1 of query 0 is database image 1, whose file does not exist
    assert df.main([str(run), "--pair", "0", "1", "--out", str(tmp_path / "p.png")]) == 2
    line = _err_line(capsys)
    assert line.startswith(f"error: dsm_figure: cannot read database image {run / 'missing1.png'}: FileNotFoundError")
    assert not (tmp_path / "p.png").exists()
