"""ROxf/RPar/Oxford5k/Paris6k loading, query crop/resize, unreadable images, and the downloader on loopback."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import pickle
import random
import re
import runpy
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from deepagg._checks import ShapeError
from deepagg.data import revisitop
from deepagg.data.download import (
    ArchiveError,
    ChecksumError,
    DownloadError,
    download,
    download_dataset,
    extract,
    main,
    sha256_file,
)
from deepagg.data.revisitop import (
    DATASETS,
    BoundingBoxError,
    DatasetNotFoundError,
    ImageReadError,
    bbx_to_pixels,
    crop_query,
    load_revisitop,
    query_resize_size,
    read_image,
    read_images_skipping,
    read_query,
    resolve_dataset_name,
)

REPO = Path(__file__).resolve().parents[1]
W, H = 24, 16  # size of the fake images

# ----------------------------------------------------------------------------------------------------------------
# A tiny fake benchmark in revisitop's format
# ----------------------------------------------------------------------------------------------------------------


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (W, H)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _gnd(protocol: str) -> dict[str, Any]:
    db = [f"db_{i}" for i in range(6)]
    queries = ["q_0", "q_1"]
    boxes = [[2.0, 1.5, 20.3, 14.0], [0.0, 0.0, 10.6, 8.4]]
    if protocol == "revisited":
        gnd = [
            {"bbx": boxes[0], "easy": np.array([0, 1]), "hard": np.array([2]), "junk": np.array([5])},
            {"bbx": boxes[1], "easy": np.array([3]), "hard": np.array([], dtype=np.int64), "junk": np.array([])},
        ]
        return {"imlist": db, "qimlist": queries, "gnd": gnd}
    gnd = [
        {"bbx": boxes[0], "ok": np.array([0, 1, 2, 6]), "junk": np.array([5])},
        {"bbx": boxes[1], "ok": np.array([3, 7]), "junk": np.array([], dtype=np.int64)},
    ]
    return {"imlist": db + queries, "qimlist": queries, "gnd": gnd}


def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=3)  # Python 3 default of revisitop's era; see report on protocol 2


def _write_fake(folder: Path, name: str, protocol: str) -> dict[str, Any]:
    data = _gnd(protocol)
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(dict.fromkeys(data["imlist"] + data["qimlist"])):
        (folder / "jpg" / f"{n}.jpg").write_bytes(_jpeg((40 * i % 256, 80, 160)))
    (folder / f"gnd_{name}.pkl").write_bytes(_pickle(data))
    return data


@pytest.fixture
def roxf_root(tmp_path: Path) -> Path:
    _write_fake(tmp_path / "datasets" / "roxford5k", "roxford5k", "revisited")
    return tmp_path


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


class TestLoad:
    @pytest.mark.parametrize("layout", ["datasets/roxford5k", "test/roxford5k", "roxford5k", "."])
    def test_layouts_and_schema(self, tmp_path: Path, layout: str) -> None:
        folder = (tmp_path / layout).resolve()
        _write_fake(folder, "roxford5k", "revisited")
        ds = load_revisitop(tmp_path, "roxf", check_counts=False)
        assert ds.name == "roxford5k"
        assert ds.protocol == "revisited"
        assert ds.root.resolve() == folder
        assert (ds.num_images, ds.num_queries) == (6, 2)
        assert [p.name for p in ds.images] == [f"db_{i}.jpg" for i in range(6)]
        assert [p.name for p in ds.queries] == ["q_0.jpg", "q_1.jpg"]
        assert all(p.is_file() for p in ds.images + ds.queries)
        assert ds.bbx == [(2.0, 1.5, 20.3, 14.0), (0.0, 0.0, 10.6, 8.4)]
        assert set(ds.gnd[0]) == {"easy", "hard", "junk"}
        assert ds.gnd[0]["easy"].tolist() == [0, 1]
        assert ds.gnd[0]["junk"].dtype == np.int64
        assert ds.gnd[1]["hard"].size == 0
        assert ds.extra["title"] == "Revisited Oxford 5k"

    def test_old_protocol_expected_counts_warn(self, tmp_path: Path) -> None:
        _write_fake(tmp_path / "oxford5k", "oxford5k", "old")
        with pytest.warns(UserWarning, match=r"should list 5063 database images and 55 queries.*not verified"):
            ds = load_revisitop(tmp_path, "OXFORD5K")
        assert ds.protocol == "old"
        assert set(ds.gnd[1]) == {"ok", "junk"}
        assert ds.gnd[1]["ok"].tolist() == [3, 7]
        assert ds.queries[0] == ds.images[6]  # old protocol: queries are database images too

    def test_verified_counts_mismatch_raises(self, roxf_root: Path) -> None:
        with pytest.raises(ValueError, match=r"should list 4993 database images and 70 queries.*got 6 and 2"):
            load_revisitop(roxf_root, "roxford5k")

    def test_wrong_protocol(self, tmp_path: Path) -> None:
        _write_fake(tmp_path / "datasets" / "paris6k", "paris6k", "revisited")
        with pytest.raises(ValueError, match=r"gnd_paris6k\.pkl must hold the old protocol"):
            load_revisitop(tmp_path, "paris6k", check_counts=False)

    def test_missing_dataset_message(self, tmp_path: Path) -> None:
        info = DATASETS["rparis6k"]
        with pytest.raises(DatasetNotFoundError, match=re.escape(info.gnd_url)) as exc:
            load_revisitop(tmp_path, "rpar")
        msg = str(exc.value)
        assert "\n" not in msg  # one paragraph
        assert msg.startswith("load_revisitop(): dataset 'rparis6k' (Revisited Paris 6k)")
        for url in info.image_urls:
            assert url in msg
        assert str(tmp_path / "datasets" / "rparis6k" / "jpg") in msg
        assert f"python -m deepagg.data.download rparis6k --data-root {tmp_path}" in msg
        assert isinstance(exc.value, FileNotFoundError)
        assert exc.value.exit_code == 2
        assert exc.value.searched[0] == tmp_path / "datasets" / "rparis6k"

    def test_errors_survive_pickling(self, tmp_path: Path) -> None:
        # DataLoader workers and multiprocessing re-create exceptions from their args
        with pytest.raises(DatasetNotFoundError) as exc:
            load_revisitop(tmp_path, "roxf")
        again = pickle.loads(pickle.dumps(exc.value))
        assert type(again) is DatasetNotFoundError
        assert (str(again), again.dataset) == (str(exc.value), "roxford5k")
        err = ImageReadError("read_image(): cannot read x", path=Path("x.jpg"), reason="bad")
        again = pickle.loads(pickle.dumps(err))
        assert (type(again), again.path, again.reason) == (ImageReadError, Path("x.jpg"), "bad")
        assert str(ImageReadError("plain")) == "plain"
        err = ChecksumError("m", expected="a", actual="b")
        assert pickle.loads(pickle.dumps(err)).actual == "b"

    def test_missing_jpg_folder(self, tmp_path: Path) -> None:
        folder = tmp_path / "datasets" / "roxford5k"
        folder.mkdir(parents=True)
        (folder / "gnd_roxford5k.pkl").write_bytes(_pickle(_gnd("revisited")))
        with pytest.raises(DatasetNotFoundError, match=r"exists but the image folder .*jpg does not"):
            load_revisitop(tmp_path, "roxf")

    def test_missing_image_files(self, roxf_root: Path) -> None:
        (roxf_root / "datasets" / "roxford5k" / "jpg" / "db_4.jpg").unlink()
        with pytest.raises(DatasetNotFoundError, match=r"1 of 8 image files .* missing .*db_4\.jpg"):
            load_revisitop(roxf_root, "roxf", check_counts=False)

    def test_names(self) -> None:
        assert resolve_dataset_name("ROXF") == "roxford5k"
        assert resolve_dataset_name("rpar") == "rparis6k"
        assert DATASETS["roxford5k"].num_images == 4993
        assert DATASETS["rparis6k"].num_images == 6322
        with pytest.raises(ValueError, match=r"name must be one of roxford5k, .*; got 'holidays'"):
            resolve_dataset_name("holidays")


# ----------------------------------------------------------------------------------------------------------------
# Query crop and resize
# ----------------------------------------------------------------------------------------------------------------


class TestCrop:
    def test_hand_worked(self) -> None:
        img = torch.arange(2 * 6 * 8).reshape(2, 6, 8)
        # x: round(1.5) = 2, round(6.5) = 6 (half to even); y: round(0.4) = 0, round(4.6) = 5 -> [0:5, 2:6]
        crop = crop_query(img, (1.5, 0.4, 6.5, 4.6))
        assert crop.shape == (2, 5, 4)
        assert torch.equal(crop, img[:, 0:5, 2:6])
        assert crop[0, 0].tolist() == [2, 3, 4, 5]
        # all halves: round(2.5) = 2, round(0.5) = 0, round(5.5) = 6, round(3.5) = 4
        assert bbx_to_pixels((2.5, 0.5, 5.5, 3.5), (6, 8)) == (2, 0, 6, 4)

    def test_matches_pil_crop_of_float_box(self) -> None:
        rng = random.Random(0)
        pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
        img = pil_to_tensor(pil)
        for _ in range(60):
            x1, x2 = sorted(rng.choice([rng.uniform(0, 53), rng.randrange(0, 107) / 2]) for _ in range(2))
            y1, y2 = sorted(rng.choice([rng.uniform(0, 37), rng.randrange(0, 75) / 2]) for _ in range(2))
            if round(x2) <= round(x1) or round(y2) <= round(y1):
                continue
            ref = pil_to_tensor(pil.crop((x1, y1, x2, y2)))  # revisitop's / cirtorch's call
            assert torch.equal(crop_query(img, (x1, y1, x2, y2)), ref), (x1, y1, x2, y2)
            assert crop_query(pil, (x1, y1, x2, y2)).size == (ref.shape[2], ref.shape[1])

    def test_clipped_to_image(self) -> None:
        img = torch.zeros(3, 6, 8)
        assert crop_query(img, (-3.2, 2.0, 30.0, 5.0)).shape == (3, 3, 8)

    @pytest.mark.parametrize(
        ("bbx", "match"),
        [
            ((5.0, 1.0, 2.0, 4.0), r"with x2 > x1 and y2 > y1; got \(5\.0, 1\.0, 2\.0, 4\.0\).*not \(x, y, w, h\)"),
            ((1.0, 2.0, 3.0), r"must be 4 finite numbers"),
            ((1.0, float("nan"), 3.0, 4.0), r"must be 4 finite numbers"),
            (("a", 1, 2, 3), r"must be 4 numbers"),
            ((100.0, 100.0, 120.0, 130.0), r"bbx of query 'all_souls_1' must overlap the image \(W=8, H=6\)"),
            ((2.6, 1.0, 3.4, 3.0), r"at least one pixel after rounding"),
        ],
    )
    def test_bbx_errors(self, bbx: Any, match: str) -> None:
        with pytest.raises(BoundingBoxError, match=match):
            crop_query(torch.zeros(3, 6, 8), bbx, query="all_souls_1")

    def test_image_errors(self) -> None:
        with pytest.raises(ShapeError, match=r"crop_query\(\): image must have shape \(C, H, W\)"):
            crop_query(torch.zeros(1, 3, 6, 8), (0, 0, 2, 2))
        with pytest.raises(TypeError, match=r"image must be a torch.Tensor .* or a PIL.Image.Image; got ndarray"):
            crop_query(np.zeros((3, 6, 8)), (0, 0, 2, 2))


class TestQueryResize:
    @pytest.mark.parametrize(
        ("full", "crop", "imsize", "expected"),
        [
            ((768, 1024), (300, 500), 1024, (300, 500)),  # scale 1: unchanged
            ((768, 1024), (300, 500), 512, (150, 250)),  # scale 1/2
            ((768, 1024), (333, 517), 800, (260, 403)),  # s = 403.9 -> 403; 403 / (517/333) = 259.57 -> 260
            ((1024, 768), (517, 333), 800, (403, 260)),  # portrait twin
        ],
    )
    def test_numbers(self, full: Any, crop: Any, imsize: int, expected: Any) -> None:
        assert query_resize_size(full, crop, imsize) == expected

    def test_upscale(self) -> None:
        # s = 1024 * 200 / 400 = 512: cirtorch's thumbnail never enlarges, upscale=True does
        assert query_resize_size((300, 400), (100, 200), 1024) == (100, 200)
        assert query_resize_size((300, 400), (100, 200), 1024, upscale=True) == (256, 512)

    def test_matches_pillow_thumbnail(self) -> None:
        rng = random.Random(1)
        for _ in range(150):
            full = (rng.randint(50, 1200), rng.randint(50, 1200))
            crop = (rng.randint(1, full[0]), rng.randint(1, full[1]))
            imsize = rng.choice([224, 362, 512, 800, 1024])
            if imsize * max(crop) / max(full) < 1:
                continue
            img = Image.new("L", (crop[1], crop[0]))
            img.thumbnail((imsize * max(crop) / max(full),) * 2)  # cirtorch's imresize on the crop
            assert query_resize_size(full, crop, imsize) == (img.height, img.width), (full, crop, imsize)

    def test_errors(self) -> None:
        with pytest.raises(ValueError, match=r"query_resize_size\(\): imsize must be a positive int; got 0"):
            query_resize_size((10, 10), (5, 5), 0)
        with pytest.raises(ValueError, match=r"crop_hw must be \(H, W\) with positive ints; got \(0, 5\)"):
            query_resize_size((10, 10), (0, 5), 100)


# ----------------------------------------------------------------------------------------------------------------
# Unreadable images
# ----------------------------------------------------------------------------------------------------------------


class TestUnreadable:
    def test_database_reported_and_skipped(self, roxf_root: Path) -> None:
        ds = load_revisitop(roxf_root, "roxf", check_counts=False)
        ds.images[3].write_bytes(b"this is not a jpeg")
        good = ds.images[4].read_bytes()
        ds.images[4].write_bytes(good[: len(good) * 3 // 4])
        with pytest.warns(
            UserWarning, match=r"skipped 2 unreadable database image\(s\) of 6.*" + re.escape(str(ds.images[3]))
        ):
            images, failures = read_images_skipping(ds.images)
        assert [f.index for f in failures] == [3, 4]
        assert failures[0].path == ds.images[3]
        assert "cannot identify image file" in failures[0].reason
        assert failures[1].reason
        assert images[3] is None
        assert images[4] is None
        ok = images[0]
        assert ok is not None
        assert ok.dtype == torch.uint8
        assert ok.shape == (3, H, W)

    def test_query_unreadable_is_error(self, roxf_root: Path) -> None:
        ds = load_revisitop(roxf_root, "roxf", check_counts=False)
        ds.queries[0].write_bytes(b"\xff\xd8 broken")
        with pytest.raises(ImageReadError, match=r"cannot read query 0 " + re.escape(str(ds.queries[0]))) as exc:
            read_query(ds, 0)
        assert isinstance(exc.value, OSError)
        assert exc.value.path == ds.queries[0]

    def test_read_query_crops(self, roxf_root: Path) -> None:
        ds = load_revisitop(roxf_root, "roxf", check_counts=False)
        x0, y0, x1, y1 = bbx_to_pixels(ds.bbx[0], (H, W))  # (2, 2, 20, 14)
        assert (x0, y0, x1, y1) == (2, 2, 20, 14)
        assert read_query(ds, 0).shape == (3, y1 - y0, x1 - x0)
        with pytest.raises(IndexError, match=r"index must be in \[0, 2\); got 2"):
            read_query(ds, 2)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ImageReadError, match=r"cannot read image .*nope\.jpg: FileNotFoundError"):
            read_image(tmp_path / "nope.jpg")


# ----------------------------------------------------------------------------------------------------------------
# Downloader against a loopback HTTP server
# ----------------------------------------------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    drop_after: dict[str, int]  # one-shot: close the connection after this many body bytes
    fail_first: dict[str, int]  # answer 503 this many times
    ignore_range: bool
    max_requests: int
    log: list[dict[str, Any]]
    lock: threading.Lock
    url: str


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _record(self, status: int) -> None:
        with self.server.lock:
            self.server.log.append({"path": self.path, "range": self.headers.get("Range"), "status": status})

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            too_many = len(srv.log) >= srv.max_requests
        if too_many:
            self._record(500)
            self.send_error(500, "too many requests in this test")
            return
        if srv.fail_first.get(self.path, 0) > 0:
            srv.fail_first[self.path] -= 1
            self._record(503)
            self.send_error(503, "Service Unavailable")
            return
        data = srv.files.get(self.path)
        if data is None:
            self._record(404)
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m is not None
            start = int(m.group(1))
            if start >= len(data):
                self._record(416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        drop = srv.drop_after.pop(self.path, None)
        self.wfile.write(body if drop is None else body[:drop])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Any:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.drop_after, srv.fail_first = {}, {}, {}
    srv.ignore_range, srv.max_requests, srv.log, srv.lock = False, 30, [], threading.Lock()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


PAYLOAD = np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"progress": False, "chunk": 8192, "backoff": 0.0, "timeout": 10}


class TestDownload:
    def test_full_with_checksum(self, server: _Server, tmp_path: Path) -> None:
        server.files["/blob.bin"] = PAYLOAD
        dest = download(f"{server.url}/blob.bin", tmp_path / "sub" / "blob.bin", sha256=PAYLOAD_SHA.upper(), chunk=8192)
        assert dest.read_bytes() == PAYLOAD
        assert not (tmp_path / "sub" / "blob.bin.part").exists()
        assert server.log == [{"path": "/blob.bin", "range": None, "status": 200}]
        assert sha256_file(dest) == PAYLOAD_SHA
        download(f"{server.url}/blob.bin", dest, sha256=PAYLOAD_SHA, **FAST)  # present and verified: no request
        assert len(server.log) == 1

    def test_interrupted_resumes_with_range(self, server: _Server, tmp_path: Path) -> None:
        server.files["/blob.bin"] = PAYLOAD
        server.drop_after["/blob.bin"] = 100_000
        dest = download(f"{server.url}/blob.bin", tmp_path / "blob.bin", sha256=PAYLOAD_SHA, retries=2, **FAST)
        assert dest.read_bytes() == PAYLOAD
        assert [e["status"] for e in server.log] == [200, 206]
        assert server.log[1]["range"] == "bytes=100000-"

    def test_resume_across_calls(self, server: _Server, tmp_path: Path) -> None:
        server.files["/blob.bin"] = PAYLOAD
        server.drop_after["/blob.bin"] = 123_456
        dest = tmp_path / "blob.bin"
        with pytest.raises(
            DownloadError, match=r"failed after 1 attempt\(s\): connection closed after 123456 of 300000"
        ):
            download(f"{server.url}/blob.bin", dest, retries=0, **FAST)
        assert not dest.exists()
        assert (tmp_path / "blob.bin.part").stat().st_size == 123_456
        download(f"{server.url}/blob.bin", dest, sha256=PAYLOAD_SHA, retries=0, **FAST)
        assert dest.read_bytes() == PAYLOAD
        assert server.log[-1] == {"path": "/blob.bin", "range": "bytes=123456-", "status": 206}

    def test_checksum_mismatch(self, server: _Server, tmp_path: Path) -> None:
        server.files["/blob.bin"] = PAYLOAD
        dest = tmp_path / "blob.bin"
        wrong = "0" * 64
        with pytest.raises(ChecksumError, match=rf"sha256 of .*/blob\.bin must be {wrong}; got {PAYLOAD_SHA}") as exc:
            download(f"{server.url}/blob.bin", dest, sha256=wrong, **FAST)
        assert (exc.value.expected, exc.value.actual) == (wrong, PAYLOAD_SHA)
        assert not dest.exists()
        assert not (tmp_path / "blob.bin.part").exists()

    def test_server_ignoring_range_restarts_cleanly(self, server: _Server, tmp_path: Path) -> None:
        server.files["/blob.bin"] = PAYLOAD
        server.ignore_range = True
        server.drop_after["/blob.bin"] = 50_000
        (tmp_path / "blob.bin.part").write_bytes(b"stale bytes from another file" * 100)
        dest = download(f"{server.url}/blob.bin", tmp_path / "blob.bin", sha256=PAYLOAD_SHA, retries=1, **FAST)
        assert dest.read_bytes() == PAYLOAD
        assert [e["status"] for e in server.log] == [200, 200]
        assert server.log[1]["range"] == "bytes=50000-"  # asked to resume, got the whole file, rewrote it

    def test_part_longer_than_file_restarts(self, server: _Server, tmp_path: Path) -> None:
        server.files["/blob.bin"] = PAYLOAD[:1000]
        (tmp_path / "blob.bin.part").write_bytes(b"x" * 5000)
        dest = download(f"{server.url}/blob.bin", tmp_path / "blob.bin", retries=0, **FAST)  # restart is free
        assert dest.read_bytes() == PAYLOAD[:1000]
        assert [e["status"] for e in server.log] == [416, 200]

    def test_complete_part_file(self, server: _Server, tmp_path: Path) -> None:
        server.files["/blob.bin"] = PAYLOAD[:1000]
        (tmp_path / "blob.bin.part").write_bytes(PAYLOAD[:1000])
        dest = download(f"{server.url}/blob.bin", tmp_path / "blob.bin", retries=0, **FAST)
        assert dest.read_bytes() == PAYLOAD[:1000]
        assert [e["status"] for e in server.log] == [416]

    def test_retries_then_fails(self, server: _Server, tmp_path: Path) -> None:
        server.files["/blob.bin"] = PAYLOAD[:1000]
        server.fail_first["/blob.bin"] = 1
        download(f"{server.url}/blob.bin", tmp_path / "a.bin", retries=1, **FAST)
        assert [e["status"] for e in server.log] == [503, 200]
        with pytest.raises(DownloadError, match=r"/missing\.bin: HTTP 404 Not Found"):
            download(f"{server.url}/missing.bin", tmp_path / "b.bin", retries=3, **FAST)
        assert len(server.log) == 3  # a 404 is not retried
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(DownloadError, match=r"failed after 3 attempt\(s\): URLError"):
            download(f"http://127.0.0.1:{port}/x", tmp_path / "c.bin", retries=2, **FAST)

    def test_argument_errors(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"download\(\): sha256 must be 64 hex digits; got 'abc'"):
            download("http://127.0.0.1:9/x", tmp_path / "x", sha256="abc")
        with pytest.raises(ValueError, match=r"download\(\): retries must be >= 0; got -1"):
            download("http://127.0.0.1:9/x", tmp_path / "x", retries=-1)
        with pytest.raises(ValueError, match=r"download\(\): timeout must be > 0; got 0"):
            download("http://127.0.0.1:9/x", tmp_path / "x", timeout=0)


def _tgz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


class TestExtract:
    def test_served_tgz(self, server: _Server, tmp_path: Path) -> None:
        server.files["/a.tgz"] = _tgz({"paris/eiffel/p1.jpg": b"one", "p2.jpg": b"two"})
        archive = download(f"{server.url}/a.tgz", tmp_path / "a.tgz", **FAST)
        out = extract(archive, tmp_path / "out")
        assert (out / "paris" / "eiffel" / "p1.jpg").read_bytes() == b"one"
        assert (out / "p2.jpg").read_bytes() == b"two"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tgz", "out"]  # no temporary folder left

    def test_zip(self, tmp_path: Path) -> None:
        with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
            zf.writestr("d/x.txt", "hi")
        assert (extract(tmp_path / "a.zip", tmp_path / "out") / "d" / "x.txt").read_text() == "hi"

    @pytest.mark.parametrize(
        ("members", "links", "match"),
        [
            ({"ok.jpg": b"1", "../evil": b"2"}, None, r"must be relative paths .* has '\.\./evil'"),
            ({"/etc/evil": b"2"}, None, r"has '/etc/evil'"),
            ({"ok.jpg": b"1"}, {"link.jpg": "/etc/passwd"}, r"must be regular files or folders; .* 'link\.jpg'"),
        ],
    )
    def test_unsafe_members_refused(self, tmp_path: Path, members: Any, links: Any, match: str) -> None:
        (tmp_path / "a.tgz").write_bytes(_tgz(members, links))
        with pytest.raises(ArchiveError, match=match):
            extract(tmp_path / "a.tgz", tmp_path / "x" / "out")
        assert sorted(p.name for p in (tmp_path / "x").iterdir()) == []  # nothing extracted, no temporary folder
        assert not (tmp_path / "evil").exists()

    def test_zip_traversal_refused(self, tmp_path: Path) -> None:
        with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
            zf.writestr("../evil.txt", "x")
        with pytest.raises(ArchiveError, match=r"has '\.\./evil\.txt'"):
            extract(tmp_path / "a.zip", tmp_path / "out")

    def test_bad_archives(self, tmp_path: Path) -> None:
        (tmp_path / "bad.tgz").write_bytes(b"not gzip at all" * 10)
        with pytest.raises(ArchiveError, match=r"cannot read archive .*bad\.tgz"):
            extract(tmp_path / "bad.tgz", tmp_path / "out")
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "f").write_bytes(b"")
        with pytest.raises(FileExistsError, match=r"dest_dir must not exist or be an empty folder"):
            extract(tmp_path / "bad.tgz", tmp_path / "full")


@pytest.fixture
def fake_remote(server: _Server, monkeypatch: pytest.MonkeyPatch) -> _Server:
    """Serve a tiny roxford5k (two Paris-style archives with sub-folders) and its old-protocol twin."""
    rev, old = _gnd("revisited"), _gnd("old")
    names = rev["imlist"] + rev["qimlist"]
    jpgs = {n: _jpeg((30 * i, 60, 90)) for i, n in enumerate(names)}
    server.files["/gnd_roxford5k.pkl"] = _pickle(rev)
    server.files["/gnd_oxford5k.pkl"] = _pickle(old)
    server.files["/part_1.tgz"] = _tgz({f"paris/a/{n}.jpg": jpgs[n] for n in names[:4]} | {"paris/README.txt": b"x"})
    server.files["/part_2.tgz"] = _tgz({f"paris/b/{n}.jpg": jpgs[n] for n in names[4:]})
    urls = (f"{server.url}/part_1.tgz", f"{server.url}/part_2.tgz")
    for name in ("roxford5k", "oxford5k"):
        info = dataclasses.replace(
            DATASETS[name],
            gnd_url=f"{server.url}/gnd_{name}.pkl",
            image_urls=urls,
            sha256={f"gnd_{name}.pkl": None, "part_1.tgz": None, "part_2.tgz": None},
        )
        monkeypatch.setitem(revisitop.DATASETS, name, info)
    return server


class TestDownloadDataset:
    def test_fetch_layout_record_and_rerun(self, fake_remote: _Server, tmp_path: Path) -> None:
        root = tmp_path / "data"
        with pytest.warns(UserWarning, match=r"lists 6 database images and 2 queries; expected 4993 and 70"):
            ds_dir = download_dataset("roxf", root, progress=False, retries=0, backoff=0.0)
        assert ds_dir == root / "datasets" / "roxford5k"
        assert sorted(p.name for p in (ds_dir / "jpg").iterdir()) == sorted(
            [f"db_{i}.jpg" for i in range(6)] + ["q_0.jpg", "q_1.jpg"]
        )
        assert sorted(p.name for p in ds_dir.iterdir()) == ["checksums.json", "gnd_roxford5k.pkl", "jpg"]
        record = json.loads((ds_dir / "checksums.json").read_text())["files"]
        assert set(record) == {"gnd_roxford5k.pkl", "part_1.tgz", "part_2.tgz"}
        for fname, entry in record.items():
            assert entry["sha256"] == hashlib.sha256(fake_remote.files["/" + fname]).hexdigest()
            assert entry["url"].endswith("/" + fname)
        ds = load_revisitop(root, "roxf", check_counts=False)
        assert ds.num_images == 6
        assert read_query(ds, 1).shape[0] == 3
        n_requests = len(fake_remote.log)
        assert n_requests == 3
        with pytest.warns(UserWarning, match="expected 4993"):
            download_dataset("roxford5k", root, progress=False, retries=0)
        assert len(fake_remote.log) == n_requests  # everything already there: no request

        # the old-protocol twin reuses jpg/ through a symlink: only its gnd file is fetched
        with pytest.warns(UserWarning, match="expected 5063"):
            twin = download_dataset("oxford5k", root, progress=False, retries=0)
        assert (twin / "jpg").is_symlink()
        assert [e["path"] for e in fake_remote.log[n_requests:]] == ["/gnd_oxford5k.pkl"]
        with pytest.warns(UserWarning, match="5063"):
            assert load_revisitop(root, "oxford5k").num_images == 8

    def test_recorded_checksum_is_verified_later(self, fake_remote: _Server, tmp_path: Path) -> None:
        root = tmp_path / "data"
        with pytest.warns(UserWarning, match="expected 4993"):
            ds_dir = download_dataset("roxf", root, progress=False, retries=0, backoff=0.0)
        (ds_dir / "jpg" / "db_5.jpg").unlink()
        fake_remote.files["/part_1.tgz"] = _tgz({"changed.jpg": b"?"})  # the server's file changed
        with pytest.raises(ChecksumError, match=r"sha256 of .*part_1\.tgz must be .*recorded in .*checksums\.json"):
            download_dataset("roxf", root, progress=False, retries=0, backoff=0.0)

    def test_corrupt_archive_deleted(self, fake_remote: _Server, tmp_path: Path) -> None:
        fake_remote.files["/part_2.tgz"] = b"garbage" * 20
        with pytest.raises(ArchiveError, match=r"cannot read archive .*part_2\.tgz.*deleted; run again"):
            download_dataset("roxf", tmp_path, progress=False, retries=0, backoff=0.0)
        ds_dir = tmp_path / "datasets" / "roxford5k"
        assert not (ds_dir / "_downloads" / "part_2.tgz").exists()
        assert "part_2.tgz" not in json.loads((ds_dir / "checksums.json").read_text())["files"]


class TestCLI:
    def test_404_exits_2_one_line(self, fake_remote: _Server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        del fake_remote.files["/gnd_roxford5k.pkl"]
        rc = main(["roxf", "--data-root", str(tmp_path), "--no-progress", "--retries", "0"])
        assert rc == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert re.fullmatch(
            r"python -m deepagg\.data\.download: error: download\(\): .*gnd_roxford5k\.pkl: HTTP 404 Not Found\.\n", err
        )

    def test_success_exits_0(self, fake_remote: _Server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        with pytest.warns(UserWarning, match="expected 4993"):
            rc = main(["roxford5k", "--data-root", str(tmp_path), "--no-progress", "--retries", "0"])
        assert rc == 0
        assert "roxford5k is ready in" in capsys.readouterr().out

    def test_run_as_main(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
        monkeypatch.setattr(sys, "argv", ["download", "holidays", "--data-root", str(tmp_path)])
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(REPO / "deepagg" / "data" / "download.py"), run_name="__main__")
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "name must be one of" in err

    @pytest.mark.slow
    def test_module_entry_point(self, tmp_path: Path) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "deepagg.data.download", "holidays", "--data-root", str(tmp_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1
        assert "Traceback" not in proc.stderr
        assert "name must be one of" in proc.stderr
