"""The one dataset description every retrieval benchmark is read into (revisitop layout).

A benchmark on disk is a folder with ``jpg/<name>.jpg`` images and a ``gnd_<dataset>.pkl`` pickle holding
``{"imlist": [...], "qimlist": [...], "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [...], "hard": [...],
"junk": [...]}, ...]}`` (revisited protocol) or ``{"ok", "junk", "bbx"}`` per query (old protocol). Indices
in ``gnd`` are 0-based into ``imlist``; query ``i`` is ``qimlist[i]``, cropped to ``bbx`` before use.
ROxf/RPar, Oxford5k/Paris6k and the embedded ``clutter`` benchmark share this format and this code path.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RetrievalDataset", "load_gnd", "read_gnd_file"]


class _GndUnpickler(pickle.Unpickler):
    """Admits only the numpy globals a gnd pickle needs (arrays of indices); anything else is refused."""

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # protocol 0-2 pickles written by Python 3 (bytes of the arrays)
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"read_gnd_file(): refusing to load global {module}.{name} from a gnd pickle.")


def read_gnd_file(path: str | Path) -> dict[str, Any]:
    """Read a revisitop ``gnd_*.pkl`` with a restricted unpickler (no arbitrary code).

    Args:
        path: The pickle file.

    Returns:
        The dict with ``imlist``, ``qimlist`` and ``gnd``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a key is missing or the gnd list does not match ``qimlist``.
    """
    path = Path(path)
    with path.open("rb") as fh:
        data = _GndUnpickler(fh, encoding="latin1").load()
    for key in ("imlist", "qimlist", "gnd"):
        if key not in data:
            raise ValueError(f"read_gnd_file(): {path} has no key {key!r}; got keys {sorted(data)}.")
    if len(data["gnd"]) != len(data["qimlist"]):
        raise ValueError(
            f"read_gnd_file(): {path}: gnd must have one entry per query ({len(data['qimlist'])}); "
            f"got {len(data['gnd'])}."
        )
    return data


@dataclass
class RetrievalDataset:
    """A retrieval benchmark: database images, query images with boxes, and revisitop ground truth.

    Attributes:
        name: Dataset name (``roxford5k``, ``rparis6k``, ``oxford5k``, ``paris6k``, ``clutter``, ...).
        root: The folder that holds ``jpg/`` and the gnd pickle.
        images: Database image files; position ``j`` is database index ``j`` in ``gnd``.
        queries: Query image files (whole images; crop them to ``bbx``).
        bbx: Per query ``(x1, y1, x2, y2)`` in original pixels (0-based, float), or None for no crop.
        gnd: Per query dict: ``easy``/``hard``/``junk`` (revisited) or ``ok``/``junk`` (old protocol), each an
            int64 array.
        protocol: ``"revisited"`` (E/M/H) or ``"old"`` (ok/junk).
        fingerprint: sha256 of the gnd file (and, for built benchmarks, of the manifest): identifies the data.
        extra: Anything else the source provides (e.g. the builder's manifest).
    """

    name: str
    root: Path
    images: list[Path]
    queries: list[Path]
    bbx: list[tuple[float, float, float, float] | None]
    gnd: list[dict[str, np.ndarray]]
    protocol: str
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        """Number of database images."""
        return len(self.images)

    @property
    def num_queries(self) -> int:
        """Number of queries."""
        return len(self.queries)


def load_gnd(root: str | Path, name: str, *, image_dir: str = "jpg", ext: str = ".jpg") -> RetrievalDataset:
    """Load ``root/gnd_<name>.pkl`` and the image paths under ``root/<image_dir>/``.

    Args:
        root: Folder with the gnd pickle and the image folder.
        name: Dataset name as in the pickle's file name (``roxford5k``, ``clutter``, ...).
        image_dir: Sub-folder of the images.
        ext: Image file extension appended to the names in ``imlist``/``qimlist``.

    Returns:
        The :class:`RetrievalDataset` (image files are not opened here).

    Raises:
        FileNotFoundError: If the gnd pickle is missing.
        ValueError: If the pickle is malformed or an index is out of range.
    """
    root = Path(root)
    gnd_path = root / f"gnd_{name}.pkl"
    if not gnd_path.is_file():
        raise FileNotFoundError(f"load_gnd(): no ground-truth file {gnd_path}.")
    data = read_gnd_file(gnd_path)
    n_db = len(data["imlist"])
    revisited = all("easy" in g for g in data["gnd"]) and len(data["gnd"]) > 0
    keys = ("easy", "hard", "junk") if revisited else ("ok", "junk")
    gnd = []
    for qi, g in enumerate(data["gnd"]):
        entry = {}
        for key in keys:
            idx = np.asarray(g.get(key, []), dtype=np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= n_db):
                raise ValueError(
                    f"load_gnd(): {gnd_path}: gnd[{qi}][{key!r}] must index imlist (0..{n_db - 1}); "
                    f"got range {idx.min()}..{idx.max()}."
                )
            entry[key] = idx
        gnd.append(entry)
    bbx = [tuple(float(v) for v in g["bbx"]) if g.get("bbx") is not None else None for g in data["gnd"]]
    folder = root / image_dir
    return RetrievalDataset(
        name=name,
        root=root,
        images=[folder / f"{n}{ext}" for n in data["imlist"]],
        queries=[folder / f"{n}{ext}" for n in data["qimlist"]],
        bbx=bbx,  # type: ignore[arg-type]
        gnd=gnd,
        protocol="revisited" if revisited else "old",
        fingerprint=hashlib.sha256(gnd_path.read_bytes()).hexdigest(),
        extra={k: v for k, v in data.items() if k not in ("imlist", "qimlist", "gnd")},
    )
