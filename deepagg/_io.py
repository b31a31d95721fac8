"""File helpers shared by the library and the apps: content digests and atomic writes.

Every file deepagg writes (weight caches, feature maps, downloads' bookkeeping, reports) goes through
:func:`atomic_write`, so a crash or Ctrl-C leaves either the old file or the complete new one, never a part.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "sha256_file"]


def sha256_file(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """Lowercase hex sha256 of a file's bytes, read in ``chunk``-byte blocks.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = Path(d, "f").write_bytes(b"abc")
        ...     sha256_file(Path(d, "f"))[:16]
        'ba7816bf8f01cfea'
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_umask() -> int:
    """The process umask (read once at import by setting and restoring it; there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, fsync: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success move it onto ``path`` with :func:`os.replace`.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is untouched.
    The parent folder is created if needed. The file gets the permissions a plain ``open`` would give
    (``0o666`` minus the umask), not ``mkstemp``'s owner-only ``0o600``.

    Args:
        path: The destination.
        mode: ``"wb"`` or ``"w"``.
        fsync: Flush the data to disk before the rename (for caches that must survive a power cut).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with atomic_write(Path(d, "a.txt"), "w") as fh:
        ...         _ = fh.write("done")
        ...     Path(d, "a.txt").read_text()
        'done'
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}-", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
