"""Resumable, checksummed download of the revisitop benchmarks (for machines with internet; never automatic).

Nothing in ``deepagg`` calls this module implicitly: :func:`deepagg.data.revisitop.load_revisitop` only reads
``data_root`` and, when the data are missing, says to run::

    python -m deepagg.data.download roxford5k --data-root DIR     # also rparis6k, oxford5k, paris6k, roxf, rpar

which writes revisitop's layout ``DIR/datasets/<name>/{gnd_<name>.pkl, jpg/*.jpg, checksums.json}``.

* :func:`download` fetches one URL with ``urllib.request`` into ``<dest>.part``, resuming an interrupted
  transfer with an HTTP ``Range`` request (a server that ignores ``Range`` and answers 200 restarts the file from
  byte 0), retries connection errors a bounded number of times with exponential backoff, checks the sha256 when
  one is given and moves the file into place with ``os.replace`` (so ``dest`` is either absent or complete).
* :func:`extract` unpacks ``.tgz``/``.tar.gz``/``.tar``/``.zip`` into a temporary sibling folder and renames it,
  refusing absolute member paths, ``..`` components and link or device members.
* :func:`download_dataset` fetches a benchmark's gnd pickle and image archives, flattens the ``.jpg`` files into
  ``jpg/`` (reusing the sibling benchmark's ``jpg/`` when present, e.g. ``oxford5k`` for ``roxford5k``) and checks
  that every image the gnd lists is there. Checksums are verified when known (:data:`~deepagg.data.revisitop.DATASETS`
  or a ``checksums.json`` written by an earlier download); otherwise the sha256 of each downloaded file is recorded
  in ``checksums.json`` next to the data on the first download.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import ssl
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from deepagg._io import atomic_write, sha256_file
from deepagg.data.dataset import read_gnd_file
from deepagg.data.revisitop import DatasetInfo, get_dataset_info

__all__ = [
    "ArchiveError",
    "ChecksumError",
    "DownloadError",
    "download",
    "download_dataset",
    "extract",
    "main",
    "sha256_file",
]

_USER_AGENT = "deepagg-downloader/0.1 (+python urllib)"
_PROG = "python -m deepagg.data.download"
_IMAGE_EXTS = {".jpg", ".jpeg"}


class DownloadError(OSError):
    """A transfer failed for good (HTTP error, or connection errors after every retry)."""


class ChecksumError(ValueError):
    """A downloaded file's sha256 differs from the expected one.

    Attributes:
        expected: The expected hex digest.
        actual: The digest of what was downloaded.
    """

    def __init__(self, message: str, expected: str | None = None, actual: str | None = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class ArchiveError(ValueError):
    """An archive is unreadable, of an unknown type, or has a member that would escape the target folder."""


class _Interrupted(Exception):
    """The connection ended before the announced Content-Length: retry (and resume)."""


class _Restart(Exception):
    """The partial file cannot be continued (server refused the range): start again from byte 0."""


_RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` or ``bytes */TOTAL`` into ``(start, total)`` (None where absent)."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if m is None:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)


def _fetch_once(url: str, part: Path, *, resume: bool, chunk: int, progress: bool, timeout: float) -> None:
    """One HTTP request: continue ``part`` (Range) or rewrite it; raise on short reads."""
    offset = part.stat().st_size if resume and part.is_file() else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    opener = urllib.request.build_opener()  # reads *_proxy / no_proxy from the environment now
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            _, total = _content_range(err.headers.get("Content-Range"))
            err.close()
            if total == offset:
                return  # the part file already holds the whole resource
            raise _Restart(f"the server refused to resume at byte {offset}") from None
        raise
    with resp:
        status = resp.status
        length = resp.headers.get("Content-Length")
        announced = int(length) if length is not None and length.isdigit() else None
        if offset and status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                raise _Restart(f"asked for byte {offset}, the server sent from {start}")
            mode = "ab"
        elif status in (200, 206):
            # 200: the server ignored Range (or there was nothing to resume): rewrite the file from byte 0
            offset, mode = 0, "wb"
            total = announced
            if status == 206:
                start, total = _content_range(resp.headers.get("Content-Range"))
                if start not in (None, 0):
                    raise _Restart(f"asked for the whole file, the server sent from byte {start}")
        else:
            raise DownloadError(f"download(): {url}: unexpected HTTP status {status}.")
        bar = _progress_bar(total, offset, part.name.removesuffix(".part"), progress)
        got = 0
        try:
            with part.open(mode) as fh:
                while buf := resp.read(chunk):
                    fh.write(buf)
                    got += len(buf)
                    if bar is not None:
                        bar.update(len(buf))
        finally:
            if bar is not None:
                bar.close()
        if announced is not None and got < announced:
            raise _Interrupted(f"connection closed after {offset + got} of {offset + announced} bytes")


def _download(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    resume: bool,
    chunk: int,
    progress: bool,
    timeout: float,
    retries: int,
    backoff: float,
) -> str | None:
    """Body of :func:`download`; returns the sha256 of ``dest`` when it was computed (None if skipped)."""
    fn = "download"
    if chunk <= 0:
        raise ValueError(f"{fn}(): chunk must be > 0; got {chunk}.")
    if timeout <= 0:
        raise ValueError(f"{fn}(): timeout must be > 0; got {timeout}.")
    if retries < 0:
        raise ValueError(f"{fn}(): retries must be >= 0; got {retries}.")
    expected = sha256.lower() if sha256 is not None else None
    if expected is not None and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ValueError(f"{fn}(): sha256 must be 64 hex digits; got {sha256!r}.")
    if dest.is_file():
        if expected is None:
            return None  # already there and nothing to check it against
        if sha256_file(dest, chunk=chunk) == expected:
            return expected
        # a wrong file at dest: fetch again; os.replace below overwrites it only once the new one is verified
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if not resume and part.exists():
        part.unlink()
    attempt, restarted = 0, False
    while True:
        try:
            _fetch_once(url, part, resume=resume, chunk=chunk, progress=progress, timeout=timeout)
            break
        except _Restart as err:
            part.unlink(missing_ok=True)
            if not restarted:  # one clean restart from byte 0 is free; further ones count as attempts
                restarted = True
                continue
            reason = f"cannot resume ({err})"
            delay = 0.0
        except urllib.error.HTTPError as err:
            err.close()
            if err.code not in _RETRYABLE_HTTP:
                raise DownloadError(f"{fn}(): {url}: HTTP {err.code} {err.reason}.") from None
            reason, delay = f"HTTP {err.code} {err.reason}", backoff * 2**attempt
        except (
            urllib.error.URLError,
            http.client.HTTPException,
            ConnectionError,
            TimeoutError,
            ssl.SSLError,
            _Interrupted,
        ) as err:
            if isinstance(err, _Interrupted):
                reason = str(err)
            else:
                why = err.reason if isinstance(err, urllib.error.URLError) else err
                reason = f"{type(err).__name__}: {why}"
            delay = backoff * 2**attempt
        if attempt >= retries:
            kept = f"; the partial file {part} is kept, run again to resume" if part.is_file() and resume else ""
            raise DownloadError(f"{fn}(): {url} failed after {attempt + 1} attempt(s): {reason}{kept}.")
        attempt += 1
        if delay > 0:
            time.sleep(min(delay, 30.0))
    actual = sha256_file(part, chunk=chunk)
    if expected is not None and actual != expected:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"{fn}(): sha256 of {url} must be {expected}; got {actual}. The downloaded file was deleted.",
            expected=expected,
            actual=actual,
        )
    os.replace(part, dest)
    return actual


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    resume: bool = True,
    chunk: int = 1 << 20,
    progress: bool = True,
    timeout: float = 60,
    retries: int = 3,
    backoff: float = 1.0,
) -> Path:
    """Download ``url`` to ``dest`` (HTTP/HTTPS), resumable and checksummed; ``dest`` appears only when complete.

    Bytes go to ``<dest>.part``. When that file exists and ``resume`` is True, the request asks for the rest with
    ``Range: bytes=<size>-``: a 206 answer is appended; a 200 answer (server ignores ``Range``) rewrites the part
    file from byte 0; a 416 answer restarts from 0 unless the part file is already complete (one such restart is
    free, further ones count as retries). A connection that
    ends before the announced ``Content-Length``, a timeout, a refused connection or HTTP 408/429/5xx is retried
    up to ``retries`` times with backoff ``backoff * 2**attempt`` seconds (at most 30 s), resuming each time. Other
    HTTP errors (404, 403, ...) fail at once. At the end the sha256 is checked (when given) and the part file is
    moved to ``dest`` with ``os.replace``. An existing ``dest`` is kept if its sha256 matches (or none is given).

    Args:
        url: ``http://`` or ``https://`` URL.
        dest: Target file.
        sha256: Expected hex digest, or None to skip the check.
        resume: Continue an existing ``<dest>.part`` (False deletes it first).
        chunk: Bytes per read/write.
        progress: Show a tqdm progress bar when tqdm is installed.
        timeout: Socket timeout in seconds for connecting and for each read.
        retries: Retries after the first attempt (bounded, >= 0).
        backoff: Base delay in seconds between retries.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``chunk``, ``timeout``, ``retries`` or ``sha256`` is invalid.
        ChecksumError: If the sha256 differs (the part file is deleted, ``dest`` is not created).
        DownloadError: On an HTTP error, or when all retries failed (the part file is kept for resuming).

    Example:
        >>> download("http://example.invalid/f", "f", chunk=0)
        Traceback (most recent call last):
        ...
        ValueError: download(): chunk must be > 0; got 0.
    """
    dest = Path(dest)
    _download(
        url,
        dest,
        sha256=sha256,
        resume=resume,
        chunk=chunk,
        progress=progress,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
    )
    return dest


def _check_member(name: str, archive: Path) -> None:
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in PurePosixPath(norm).parts:
        raise ArchiveError(
            f"extract(): archive members must be relative paths inside the archive; {archive} has {name!r}. "
            f"Refusing to extract it."
        )


def extract(archive: str | Path, dest_dir: str | Path) -> Path:
    """Extract a ``.tgz``/``.tar.gz``/``.tar``/``.zip`` archive into ``dest_dir``, atomically and safely.

    Every member is checked first: absolute paths, ``..`` components and (tar) link or device members are refused.
    The archive is unpacked into a temporary folder next to ``dest_dir`` which is then renamed to ``dest_dir``, so
    ``dest_dir`` either does not exist or holds the whole archive.

    Args:
        archive: The archive file; the type comes from its suffix.
        dest_dir: Target folder; must not exist or be empty.

    Returns:
        ``dest_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ArchiveError: If the suffix is unknown, the archive is unreadable, or a member is unsafe.
        FileExistsError: If ``dest_dir`` exists and is not empty.

    Example:
        >>> try:
        ...     extract("data.rar", "out")
        ... except ArchiveError as err:
        ...     print(err)
        extract(): archive must end with .tgz, .tar.gz, .tar or .zip; got 'data.rar'.
    """
    archive, dest = Path(archive), Path(dest_dir)
    lower = archive.name.lower()
    if lower.endswith((".tgz", ".tar.gz", ".tar")):
        kind = "tar"
    elif lower.endswith(".zip"):
        kind = "zip"
    else:
        raise ArchiveError(f"extract(): archive must end with .tgz, .tar.gz, .tar or .zip; got {archive.name!r}.")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"extract(): dest_dir must not exist or be an empty folder; {dest} is not.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extracting", dir=dest.parent))
    try:
        try:
            if kind == "tar":
                with tarfile.open(archive, "r:*") as tf:
                    members = tf.getmembers()
                    for m in members:
                        _check_member(m.name, archive)
                        if not (m.isfile() or m.isdir()):
                            raise ArchiveError(
                                f"extract(): archive members must be regular files or folders; {archive} has "
                                f"{m.name!r} (a link or device). Refusing to extract it."
                            )
                    if hasattr(tarfile, "data_filter"):
                        tf.extractall(tmp, members=members, filter="data")
                    else:  # pragma: no cover - Python without PEP 706 filters; members were checked above
                        tf.extractall(tmp, members=members)
            else:
                with zipfile.ZipFile(archive) as zf:
                    for info in zf.infolist():
                        _check_member(info.filename, archive)
                    zf.extractall(tmp)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as err:
            why = " ".join(str(err).split())  # tarfile's message spans several lines
            raise ArchiveError(f"extract(): cannot read archive {archive}: {type(err).__name__}: {why}") from err
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _read_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"files": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        warnings.warn(f"download_dataset(): ignoring unreadable {path}.", UserWarning, stacklevel=3)
        return {"files": {}}
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return {"files": {}}
    return data


def _write_record(path: Path, record: dict[str, Any]) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _fetch_recorded(
    info: DatasetInfo, url: str, dest: Path, record: dict[str, Any], record_path: Path, **kw: Any
) -> None:
    """Download one file of a benchmark, verifying a known sha256 and recording a new one."""
    fname = url.rsplit("/", 1)[-1]
    known = info.sha256.get(fname)
    recorded = record["files"].get(fname, {}).get("sha256")
    expected = known or recorded
    try:
        digest = _download(url, dest, sha256=expected, **kw)
    except ChecksumError as err:
        if known is None and recorded is not None:
            raise ChecksumError(
                f"{err} The expected value was recorded in {record_path} by an earlier download; delete that entry if "
                f"the server's file changed legitimately.",
                expected=err.expected,
                actual=err.actual,
            ) from None
        raise
    if recorded is None:
        digest = digest or sha256_file(dest)
        record["files"][fname] = {"url": url, "sha256": digest, "bytes": dest.stat().st_size}
        _write_record(record_path, record)


def _needed_images(gnd_path: Path) -> list[str]:
    data = read_gnd_file(gnd_path)
    return [f"{n}.jpg" for n in [*data["qimlist"], *data["imlist"]]]


def _all_present(folder: Path, names: Sequence[str]) -> bool:
    return folder.is_dir() and all((folder / n).is_file() for n in names)


def download_dataset(
    name: str,
    data_root: str | Path,
    *,
    keep_archives: bool = False,
    progress: bool = True,
    timeout: float = 60,
    retries: int = 3,
    backoff: float = 1.0,
) -> Path:
    """Fetch one benchmark into ``<data_root>/datasets/<name>/`` (revisitop's layout) and check it.

    Steps: download ``gnd_<name>.pkl``; unless every image it lists is already in ``jpg/``, reuse the sibling
    benchmark's ``jpg/`` through a relative symlink when it is complete (``oxford5k`` <-> ``roxford5k``,
    ``paris6k`` <-> ``rparis6k``), or else download each image archive into ``_downloads/`` (resumable), extract it
    (:func:`extract`) and move every ``.jpg`` in it, flat, into a staging folder that becomes ``jpg/`` at the
    end (merged into an existing incomplete ``jpg/``: files of the same name are replaced, others are kept). Then every query and database image listed in the gnd file must exist; the counts are compared with the
    expected ones (a ``UserWarning`` if they differ). ``checksums.json`` in the dataset folder records the sha256 of
    every file downloaded (verified against on later downloads). Safe to re-run: finished steps are skipped.

    Args:
        name: ``roxford5k``, ``rparis6k``, ``oxford5k``, ``paris6k`` or an alias (``roxf``, ``rpar``).
        data_root: The data folder (created if needed).
        keep_archives: Keep the downloaded archives in ``_downloads/`` (deleted by default once extracted).
        progress: tqdm progress bars when tqdm is installed.
        timeout: Socket timeout in seconds.
        retries: Retries per file on connection errors.
        backoff: Base retry delay in seconds.

    Returns:
        The dataset folder ``<data_root>/datasets/<name>``.

    Raises:
        ValueError: If the name is unknown.
        DownloadError: If a transfer fails, or images listed in the gnd file are missing after extraction.
        ChecksumError: If a file's sha256 differs from the known or recorded one.
        ArchiveError: If an archive is corrupt (it is deleted so that a re-run fetches it again) or unsafe.

    Example:
        >>> download_dataset("nope", "/tmp")
        Traceback (most recent call last):
        ...
        ValueError: resolve_dataset_name(): name must be one of roxford5k, rparis6k, oxford5k, paris6k, roxf, rpar, oxf, par; got 'nope'.
    """  # noqa: E501
    fn = "download_dataset"
    info = get_dataset_info(name)
    root = Path(data_root).expanduser()
    ds_dir = root / "datasets" / info.name
    ds_dir.mkdir(parents=True, exist_ok=True)
    record_path = ds_dir / "checksums.json"
    record = _read_record(record_path)
    kw: dict[str, Any] = {
        "resume": True,
        "chunk": 1 << 20,
        "progress": progress,
        "timeout": timeout,
        "retries": retries,
        "backoff": backoff,
    }

    gnd_path = ds_dir / info.gnd_file
    _fetch_recorded(info, info.gnd_url, gnd_path, record, record_path, **kw)
    needed = _needed_images(gnd_path)
    jpg = ds_dir / "jpg"

    if not _all_present(jpg, needed) and info.shares_images_with and not jpg.exists() and not jpg.is_symlink():
        sibling = root / "datasets" / info.shares_images_with / "jpg"
        if not sibling.is_symlink() and _all_present(sibling, needed):
            with contextlib.suppress(OSError):  # no symlinks on this file system: download instead
                jpg.symlink_to(Path("..") / info.shares_images_with / "jpg", target_is_directory=True)

    if not _all_present(jpg, needed):
        downloads = ds_dir / "_downloads"
        staging = ds_dir / ".jpg.staging"
        shutil.rmtree(staging, ignore_errors=True)  # left over by an interrupted run
        staging.mkdir()
        archives = []
        for url in info.image_urls:
            fname = url.rsplit("/", 1)[-1]
            archive = downloads / fname
            _fetch_recorded(info, url, archive, record, record_path, **kw)
            archives.append(archive)
            unpacked = ds_dir / f".extract-{fname}"
            shutil.rmtree(unpacked, ignore_errors=True)
            try:
                extract(archive, unpacked)
            except ArchiveError as err:
                archive.unlink(missing_ok=True)
                record["files"].pop(fname, None)
                _write_record(record_path, record)
                raise ArchiveError(f"{err} The archive was deleted; run again to download it afresh.") from err
            for path in sorted(unpacked.rglob("*")):
                if path.is_file() and path.suffix.lower() in _IMAGE_EXTS:
                    os.replace(path, staging / path.name)
            shutil.rmtree(unpacked)
        if jpg.is_symlink() or jpg.is_file():
            jpg.unlink()
        if jpg.is_dir():  # an incomplete jpg/ of the user's: merge into it, never delete their files
            for path in staging.iterdir():
                os.replace(path, jpg / path.name)
            staging.rmdir()
        else:
            os.replace(staging, jpg)
        if not keep_archives:
            for archive in archives:
                archive.unlink(missing_ok=True)
            if downloads.is_dir() and not any(downloads.iterdir()):
                downloads.rmdir()

    missing = [n for n in needed if not (jpg / n).is_file()]
    if missing:
        raise DownloadError(
            f"{fn}(): {len(missing)} of {len(needed)} images listed in {gnd_path} are missing from {jpg} after "
            f"extraction (e.g. {', '.join(missing[:3])}); the archives may be incomplete or of another version."
        )
    data = read_gnd_file(gnd_path)
    counts = (len(data["imlist"]), len(data["qimlist"]))
    if counts != (info.num_images, info.num_queries):
        warnings.warn(
            f"{fn}(): {gnd_path} lists {counts[0]} database images and {counts[1]} queries; expected "
            f"{info.num_images} and {info.num_queries} for {info.title}.",
            UserWarning,
            stacklevel=2,
        )
    return ds_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m deepagg.data.download NAME [NAME ...] --data-root DIR``.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on any failure (one-line message on stderr, no traceback), 130 on Ctrl-C.

    Example:
        >>> main(["nope", "--data-root", "/tmp"])
        2
    """
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Download ROxford5k/RParis6k (revisited) or Oxford5k/Paris6k (old protocol) into "
        "DATA_ROOT/datasets/<name>/ (resumable, checksummed).",
    )
    parser.add_argument("names", nargs="+", metavar="NAME", help="roxford5k, rparis6k, oxford5k, paris6k, roxf, rpar")
    parser.add_argument("--data-root", required=True, type=Path, help="the folder to put datasets/<name>/ in")
    parser.add_argument("--keep-archives", action="store_true", help="keep the downloaded .tgz files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds (default 60)")
    parser.add_argument("--retries", type=int, default=3, help="retries per file on connection errors (default 3)")
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            path = download_dataset(
                name,
                args.data_root,
                keep_archives=args.keep_archives,
                progress=not args.no_progress,
                timeout=args.timeout,
                retries=args.retries,
            )
            print(f"{_PROG}: {name} is ready in {path}")
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    except Exception as err:
        print(f"{_PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
