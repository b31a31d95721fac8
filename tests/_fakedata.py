"""A tiny fake benchmark in the revisitop layout, from two real photos (for the app and extraction tests)."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _photos() -> list[np.ndarray]:
    root = Path(next(iter(importlib.util.find_spec("sklearn").submodule_search_locations))) / "datasets" / "images"
    return [np.asarray(Image.open(root / n).convert("RGB")) for n in ("china.jpg", "flower.jpg")]


def make_fake_revisitop(
    data_root: Path, name: str = "roxford5k", *, seed: int = 0, flip_db: bool = False, flip_queries: bool = False
) -> Path:
    """Two real photos, five crops each as the database, the whole photos as queries (revisitop layout).

    ``seed`` moves the crops; ``flip_db`` / ``flip_queries`` mirror the database / query images, so that two fake
    datasets can share no image content, or only their queries.
    """
    root = data_root / "datasets" / name
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    imlist, qimlist, gnd = [], [], []
    for p, photo in enumerate(_photos()):
        h, w = photo.shape[:2]
        for v in range(5):
            ch, cw = int(h * 0.6), int(w * 0.6)
            y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
            crop = photo[y : y + ch, x : x + cw]
            Image.fromarray(crop[:, ::-1] if flip_db else crop).save(root / "jpg" / f"p{p}_v{v}.jpg")
            imlist.append(f"p{p}_v{v}")
        Image.fromarray(photo[:, ::-1] if flip_queries else photo).save(root / "jpg" / f"q{p}.jpg")
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


def copy_as_old_protocol(src: Path, data_root: Path, name: str = "oxford5k") -> Path:
    """A byte-identical copy of a fake revisitop dataset in cirtorch's layout (``test/<name>``, ok/junk gnd)."""
    import shutil

    root = data_root / "test" / name
    shutil.copytree(src / "jpg", root / "jpg")
    with (src / f"gnd_{src.name}.pkl").open("rb") as fh:
        data = pickle.load(fh)
    gnd = [{"bbx": g["bbx"], "ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]} for g in data["gnd"]]
    with (root / f"gnd_{name}.pkl").open("wb") as fh:
        pickle.dump({"imlist": data["imlist"], "qimlist": data["qimlist"], "gnd": gnd}, fh)
    return root


def truncate_image(path: Path) -> None:
    """Cut a JPEG in half: the header (and so the size) still reads, decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
