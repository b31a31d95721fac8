"""deepagg._io: one digest and one atomic-write helper for every file deepagg writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from deepagg._io import atomic_write, sha256_file


def test_sha256_matches_hashlib_across_chunk_boundaries(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "out.txt"
    with atomic_write(dest, "w") as fh:
        fh.write("old")

    def crash() -> None:
        with atomic_write(dest, "w") as fh:
            fh.write("half of the new")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        crash()
    assert dest.read_text() == "old"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out.txt"]
