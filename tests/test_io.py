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


def test_atomic_write_gives_plain_open_permissions(tmp_path: Path) -> None:
    import os
    import stat

    from deepagg._io import _UMASK, atomic_write

    with atomic_write(tmp_path / "a.bin") as fh:
        fh.write(b"x")
    with open(tmp_path / "b.bin", "wb") as fh:
        fh.write(b"x")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "b.bin").st_mode) == 0o666 & ~_UMASK
