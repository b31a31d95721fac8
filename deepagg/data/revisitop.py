"""ROxford5k / RParis6k (revisited protocol) and Oxford5k / Paris6k (old protocol) read from ``data_root``.

The files are the ones revisitop and cirtorch distribute (anchors.md section 4): a ground-truth pickle
``gnd_<name>.pkl`` and a flat folder ``jpg/`` with every image of the collection. They are looked up under
``data_root`` in this order (the first folder holding the gnd pickle wins):

1. ``<data_root>/datasets/<name>/`` (revisitop's layout, and what :mod:`deepagg.data.download` writes);
2. ``<data_root>/test/<name>/`` (cirtorch's layout);
3. ``<data_root>/<name>/``;
4. ``<data_root>/`` itself (when it already is the dataset folder).

Nothing here downloads anything. When the data are missing, :func:`load_revisitop` raises
:class:`DatasetNotFoundError`, whose one-paragraph message says which files to fetch, from where, where to put
them, and the command ``python -m deepagg.data.download <name> --data-root <data_root>`` that does it.

Queries are cropped to their ``bbx`` before any processing (:func:`crop_query`, the revisited protocol makes
this mandatory, anchors.md 4.2 and 6.3), and cirtorch resizes the crop with the scale the full image would get
(:func:`query_resize_size`).

Unreadable images (policy): a *database* image that cannot be decoded is reported (path and reason, as a
``UserWarning`` and in the returned failure list) and skipped by :func:`read_images_skipping`, which keeps its
slot as ``None`` so that ground-truth indices stay valid; give such an image a zero descriptor (it then scores 0
against every query) rather than removing it, which would shift every index after it. A *query* that cannot be
read is an error (:class:`ImageReadError`): dropping a query would change the benchmark.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from deepagg._checks import check_shape
from deepagg.data.dataset import RetrievalDataset, load_gnd

__all__ = [
    "ALIASES",
    "DATASETS",
    "BoundingBoxError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageFailure",
    "ImageReadError",
    "bbx_to_pixels",
    "candidate_dirs",
    "crop_query",
    "find_dataset_dir",
    "get_dataset_info",
    "load_revisitop",
    "query_resize_size",
    "read_image",
    "read_images_skipping",
    "read_query",
    "resolve_dataset_name",
]

_CLI = "python -m deepagg.data.download"


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about one benchmark: where its files come from and how big it is.

    Attributes:
        name: Canonical name, also the folder name and the gnd file stem (``gnd_<name>.pkl``).
        title: Human-readable name.
        protocol: ``"revisited"`` (easy/hard/junk) or ``"old"`` (ok/junk).
        gnd_url: URL of the ground-truth pickle.
        image_urls: URLs of the image archives (.tgz); every ``.jpg`` inside goes flat into ``jpg/``.
        num_images: Number of database images (``len(imlist)``) of the official gnd file.
        num_queries: Number of queries (``len(qimlist)``).
        counts_verified: True when the counts come from a checked source (anchors.md 4.1); then a mismatch is an
            error in :func:`load_revisitop`. False means "expected" values, checked softly (a warning).
        sha256: File name -> sha256 hex digest, or None where unknown. Known digests are verified on download;
            unknown ones are computed on the first download and recorded in ``checksums.json`` next to the data,
            and later downloads of the same file are verified against that record.
        shares_images_with: The other benchmark built on the same images (its ``jpg/`` can be reused).
    """

    name: str
    title: str
    protocol: str
    gnd_url: str
    image_urls: tuple[str, ...]
    num_images: int
    num_queries: int
    counts_verified: bool
    sha256: dict[str, str | None] = field(default_factory=dict)
    shares_images_with: str | None = None

    @property
    def gnd_file(self) -> str:
        """File name of the ground-truth pickle."""
        return f"gnd_{self.name}.pkl"

    def urls(self) -> list[str]:
        """Every URL of this benchmark, ground truth first."""
        return [self.gnd_url, *self.image_urls]


_OXF_IMAGES = ("https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",)
_PAR_IMAGES = (
    "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
    "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz",
)
_REVISITOP_GND = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{0}/gnd_{0}.pkl"
_CIRTORCH_GND = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/{0}/gnd_{0}.pkl"


def _sha_table(gnd_name: str, image_urls: tuple[str, ...]) -> dict[str, str | None]:
    return {f"gnd_{gnd_name}.pkl": None, **{u.rsplit("/", 1)[-1]: None for u in image_urls}}


#: The known benchmarks. Counts of ROxf/RPar are from anchors.md 4.1 (database images exclude the 70 queries);
#: Oxford5k 5063/55 and Paris6k 6392/55 are the commonly quoted sizes of cirtorch's gnd files, not checked here.
DATASETS: dict[str, DatasetInfo] = {
    "roxford5k": DatasetInfo(
        name="roxford5k",
        title="Revisited Oxford 5k",
        protocol="revisited",
        gnd_url=_REVISITOP_GND.format("roxford5k"),
        image_urls=_OXF_IMAGES,
        num_images=4993,
        num_queries=70,
        counts_verified=True,
        sha256=_sha_table("roxford5k", _OXF_IMAGES),
        shares_images_with="oxford5k",
    ),
    "rparis6k": DatasetInfo(
        name="rparis6k",
        title="Revisited Paris 6k",
        protocol="revisited",
        gnd_url=_REVISITOP_GND.format("rparis6k"),
        image_urls=_PAR_IMAGES,
        num_images=6322,
        num_queries=70,
        counts_verified=True,
        sha256=_sha_table("rparis6k", _PAR_IMAGES),
        shares_images_with="paris6k",
    ),
    "oxford5k": DatasetInfo(
        name="oxford5k",
        title="Oxford 5k (old protocol)",
        protocol="old",
        gnd_url=_CIRTORCH_GND.format("oxford5k"),
        image_urls=_OXF_IMAGES,
        num_images=5063,
        num_queries=55,
        counts_verified=False,
        sha256=_sha_table("oxford5k", _OXF_IMAGES),
        shares_images_with="roxford5k",
    ),
    "paris6k": DatasetInfo(
        name="paris6k",
        title="Paris 6k (old protocol)",
        protocol="old",
        gnd_url=_CIRTORCH_GND.format("paris6k"),
        image_urls=_PAR_IMAGES,
        num_images=6392,
        num_queries=55,
        counts_verified=False,
        sha256=_sha_table("paris6k", _PAR_IMAGES),
        shares_images_with="rparis6k",
    ),
}

#: Short names accepted everywhere a dataset name is (``+dataset=roxf``).
ALIASES: dict[str, str] = {"roxf": "roxford5k", "rpar": "rparis6k", "oxf": "oxford5k", "par": "paris6k"}


class DatasetNotFoundError(FileNotFoundError):
    """A benchmark's files are not under ``data_root``; the message says what to download and where to put it.

    Attributes:
        dataset: Canonical dataset name.
        searched: The folders that were looked at.
        urls: The download URLs.
        exit_code: The exit status command-line front ends use for it (2: a usage/data error, no traceback).
    """

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        dataset: str = "",
        searched: Sequence[Path] = (),
        urls: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.dataset = dataset
        self.searched = list(searched)
        self.urls = list(urls)

    def __str__(self) -> str:
        return str(self.args[0])


class ImageReadError(OSError):
    """An image file could not be read or decoded.

    Attributes:
        path: The file.
        reason: Why (the underlying error's message).
    """

    def __init__(self, message: str, *, path: Path | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])


class BoundingBoxError(ValueError):
    """A query's ``bbx`` is malformed, empty or outside its image."""

    def __init__(self, message: str, expected: Any = None, actual: Any = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class ImageFailure:
    """One image that could not be read: its position in the list, its path and the reason."""

    index: int
    path: Path
    reason: str


# ----------------------------------------------------------------------------------------------------------------
# Names and folders
# ----------------------------------------------------------------------------------------------------------------


def resolve_dataset_name(name: str) -> str:
    """Map a dataset name or alias (``roxf``, ``rpar``, ``oxf``, ``par``; any case) to its canonical name.

    Args:
        name: ``roxford5k``, ``rparis6k``, ``oxford5k``, ``paris6k`` or an alias.

    Returns:
        The canonical name, a key of :data:`DATASETS`.

    Raises:
        ValueError: If the name is unknown.

    Example:
        >>> resolve_dataset_name("roxf"), resolve_dataset_name("RParis6k")
        ('roxford5k', 'rparis6k')
    """
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        known = ", ".join([*DATASETS, *ALIASES])
        raise ValueError(f"resolve_dataset_name(): name must be one of {known}; got {name!r}.")
    return key


def get_dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of a dataset name or alias.

    Args:
        name: Dataset name or alias (see :func:`resolve_dataset_name`).

    Returns:
        The entry of :data:`DATASETS`.

    Raises:
        ValueError: If the name is unknown.

    Example:
        >>> info = get_dataset_info("rpar")
        >>> info.num_images, info.num_queries, len(info.image_urls)
        (6322, 70, 2)
    """
    return DATASETS[resolve_dataset_name(name)]


def candidate_dirs(data_root: str | Path, name: str) -> list[Path]:
    """The folders :func:`load_revisitop` looks in, in order (see the module docstring).

    Args:
        data_root: The user's data folder.
        name: Dataset name or alias.

    Returns:
        ``[<data_root>/datasets/<name>, <data_root>/test/<name>, <data_root>/<name>, <data_root>]``.

    Example:
        >>> [p.as_posix() for p in candidate_dirs("/data", "roxf")][:2]
        ['/data/datasets/roxford5k', '/data/test/roxford5k']
    """
    key = resolve_dataset_name(name)
    root = Path(data_root).expanduser()
    return [root / "datasets" / key, root / "test" / key, root / key, root]


def find_dataset_dir(data_root: str | Path, name: str) -> Path | None:
    """Return the first candidate folder holding ``gnd_<name>.pkl``, or None.

    Args:
        data_root: The user's data folder.
        name: Dataset name or alias.

    Returns:
        The dataset folder, or None if no candidate holds the gnd pickle.

    Example:
        >>> find_dataset_dir("/nonexistent", "roxf") is None
        True
    """
    info = get_dataset_info(name)
    for folder in candidate_dirs(data_root, info.name):
        if (folder / info.gnd_file).is_file():
            return folder
    return None


def _not_found(
    info: DatasetInfo, data_root: Path, problem: str, fn: str, folder: Path | None = None
) -> DatasetNotFoundError:
    searched = candidate_dirs(data_root, info.name)
    target = folder if folder is not None else data_root / "datasets" / info.name
    archives = " and ".join(info.image_urls)
    message = (
        f"{fn}(): dataset {info.name!r} ({info.title}) is not available: {problem} "
        f"(looked for {info.gnd_file} and jpg/ in {', '.join(str(p) for p in searched)}). "
        f"Download the ground truth {info.gnd_url} into {target}/ and the image archive(s) {archives}, "
        f"and extract every .jpg of the archive(s) flat into {target / 'jpg'}/; "
        f"or, on a machine with internet, run `{_CLI} {info.name} --data-root {data_root}`, which does both "
        f"(resumable; sha256 verified when known, else recorded in checksums.json)."
    )
    return DatasetNotFoundError(message, dataset=info.name, searched=searched, urls=info.urls())


def load_revisitop(
    data_root: str | Path, name: str, *, check_files: bool = True, check_counts: bool = True
) -> RetrievalDataset:
    """Load ROxford5k / RParis6k / Oxford5k / Paris6k from ``data_root`` (no download, ever).

    The gnd pickle is read with :func:`deepagg.data.dataset.load_gnd` (restricted unpickler). Queries are the whole
    images in ``ds.queries``; crop them with :func:`crop_query` (or read them with :func:`read_query`).

    Args:
        data_root: The folder the data were put in (see the module docstring for the accepted layouts).
        name: ``roxford5k``, ``rparis6k``, ``oxford5k``, ``paris6k`` or an alias (``roxf``, ``rpar``).
        check_files: Check that every database and query image file exists (a ``stat`` per file, no decoding).
        check_counts: Compare the numbers of images and queries with the official ones: an error where the
            counts are verified (ROxf, RPar), a ``UserWarning`` where they are only expected (Oxford5k, Paris6k).

    Returns:
        The :class:`~deepagg.data.dataset.RetrievalDataset` (images are not opened).

    Raises:
        DatasetNotFoundError: If the gnd pickle, the ``jpg/`` folder or any image is missing. Its message is one
            paragraph naming the dataset, the folders searched, the URLs, the target folder and the download command.
        ValueError: If the name is unknown, the gnd file has the wrong protocol, or (``check_counts``) a verified
            count differs.

    Example:
        >>> try:
        ...     load_revisitop("/nonexistent", "roxf")
        ... except DatasetNotFoundError as err:
        ...     print("python -m deepagg.data.download roxford5k --data-root /nonexistent" in str(err))
        True
    """
    fn = "load_revisitop"
    info = get_dataset_info(name)
    root = Path(data_root).expanduser()
    folder = find_dataset_dir(root, info.name)
    if folder is None:
        raise _not_found(info, root, f"no {info.gnd_file} found", fn)
    if not (folder / "jpg").is_dir():
        raise _not_found(
            info, root, f"{folder / info.gnd_file} exists but the image folder {folder / 'jpg'} does not", fn, folder
        )
    ds = load_gnd(folder, info.name)
    if ds.protocol != info.protocol:
        raise ValueError(
            f"{fn}(): {folder / info.gnd_file} must hold the {info.protocol} protocol "
            f"({'easy/hard/junk' if info.protocol == 'revisited' else 'ok/junk'} per query); got the {ds.protocol} one."
        )
    if check_files:
        missing = [p for p in [*ds.queries, *ds.images] if not p.is_file()]
        if missing:
            shown = ", ".join(p.name for p in missing[:3])
            raise _not_found(
                info,
                root,
                f"{len(missing)} of {ds.num_images + ds.num_queries} image files listed in "
                f"{folder / info.gnd_file} are missing from {folder / 'jpg'} (e.g. {shown})",
                fn,
                folder,
            )
    if check_counts and (ds.num_images, ds.num_queries) != (info.num_images, info.num_queries):
        msg = (
            f"{fn}(): {folder / info.gnd_file} should list {info.num_images} database images and "
            f"{info.num_queries} queries for {info.title}; got {ds.num_images} and {ds.num_queries}."
        )
        if info.counts_verified:
            raise ValueError(f"{msg} Use the official gnd file, or pass check_counts=False for a custom one.")
        warnings.warn(f"{msg} (expected counts, not verified)", UserWarning, stacklevel=2)
    ds.extra.setdefault("title", info.title)
    return ds


# ----------------------------------------------------------------------------------------------------------------
# Query crop and resize
# ----------------------------------------------------------------------------------------------------------------


def bbx_to_pixels(
    bbx: Sequence[float], size_hw: tuple[int, int], *, query: str | None = None, fn: str = "bbx_to_pixels"
) -> tuple[int, int, int, int]:
    """Integer crop box ``(x0, y0, x1, y1)`` (half-open: columns ``x0..x1-1``) of a revisitop ``bbx``.

    The convention is revisitop's Python example and cirtorch's, which call PIL's ``Image.crop(bbx)`` on the
    float box: PIL applies Python's ``round`` to each of the four coordinates (round half to even:
    ``round(1.5) == 2``, ``round(2.5) == 2``) and crops the half-open box ``[x0, x1) x [y0, y1)``. On top of that
    the box is clipped to the image (PIL would pad the outside with black; MATLAB's ``crop_qim`` clips, but keeps
    one more column and row because it treats ``x2``/``y2`` as inclusive).

    Args:
        bbx: ``(x1, y1, x2, y2)``: 0-based float corners in original-image pixels (not ``(x, y, w, h)``).
        size_hw: ``(H, W)`` of the full image.
        query: The query's name, used in error messages.
        fn: The public function name used in error messages.

    Returns:
        ``(x0, y0, x1, y1)`` ints with ``0 <= x0 < x1 <= W`` and ``0 <= y0 < y1 <= H``.

    Raises:
        BoundingBoxError: If ``bbx`` does not have 4 finite numbers, has ``x2 <= x1`` or ``y2 <= y1``, or is
            empty after rounding and clipping to the image (e.g. outside it).

    Example:
        >>> bbx_to_pixels((1.5, 0.4, 6.5, 4.6), (6, 8))
        (2, 0, 6, 5)
    """
    what = f" of query {query!r}" if query is not None else ""
    try:
        vals = tuple(float(v) for v in bbx)
    except (TypeError, ValueError):
        raise BoundingBoxError(
            f"{fn}(): bbx{what} must be 4 numbers (x1, y1, x2, y2); got {bbx!r}.",
            expected="(x1, y1, x2, y2)",
            actual=bbx,
        ) from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise BoundingBoxError(
            f"{fn}(): bbx{what} must be 4 finite numbers (x1, y1, x2, y2); got {vals}.",
            expected="(x1, y1, x2, y2)",
            actual=vals,
        )
    x1, y1, x2, y2 = vals
    if not (x2 > x1 and y2 > y1):
        raise BoundingBoxError(
            f"{fn}(): bbx{what} must be corners (x1, y1, x2, y2) with x2 > x1 and y2 > y1; got {vals}. "
            f"revisitop boxes are corners, not (x, y, w, h).",
            expected="x2 > x1 and y2 > y1",
            actual=vals,
        )
    h, w = int(size_hw[0]), int(size_hw[1])
    px = [round(v) for v in vals]  # PIL's Image.crop: int(round(v)), half to even
    x0, x1i = min(max(px[0], 0), w), min(max(px[2], 0), w)
    y0, y1i = min(max(px[1], 0), h), min(max(px[3], 0), h)
    if x1i <= x0 or y1i <= y0:
        raise BoundingBoxError(
            f"{fn}(): bbx{what} must overlap the image (W={w}, H={h}) by at least one pixel after rounding; "
            f"got {vals}, i.e. pixels x {px[0]}..{px[2]}, y {px[1]}..{px[3]} (half-open).",
            expected=f"inside (0, 0, {w}, {h})",
            actual=vals,
        )
    return x0, y0, x1i, y1i


_Img = TypeVar("_Img")


def crop_query(image: _Img, bbx: Sequence[float], *, query: str | None = None) -> _Img:
    """Crop a query image to its ``bbx`` with revisitop's/cirtorch's pixel convention.

    Args:
        image: A tensor of shape :math:`(C, H, W)` (any dtype) or a ``PIL.Image.Image``.
        bbx: ``(x1, y1, x2, y2)`` corners, 0-based floats in original pixels (``gnd[i]["bbx"]``).
        query: The query's name, used in error messages.

    Returns:
        The crop, of the same type: a tensor view of shape :math:`(C, y1 - y0, x1 - x0)` or a PIL image, with
        ``(x0, y0, x1, y1) = bbx_to_pixels(bbx, (H, W))``: each corner rounded with Python's ``round`` (half to
        even, exactly what ``PIL.Image.crop(bbx)`` does in revisitop's example and in cirtorch), half-open, clipped to
        the image. The pixels equal ``PIL.Image.crop(bbx)`` for every box inside the image.

    Raises:
        TypeError: If ``image`` is neither a tensor nor a PIL image.
        ShapeError: If the tensor is not :math:`(C, H, W)`.
        BoundingBoxError: If ``bbx`` is malformed, has ``x2 <= x1``/``y2 <= y1``, or lies outside the image.

    Example:
        >>> img = torch.arange(6 * 8).reshape(1, 6, 8)
        >>> crop = crop_query(img, (1.5, 0.4, 6.5, 4.6))  # x: round(1.5)=2, round(6.5)=6; y: 0, 5
        >>> crop.shape
        torch.Size([1, 5, 4])
        >>> crop[0, 0].tolist()
        [2, 3, 4, 5]
    """
    fn = "crop_query"
    if isinstance(image, torch.Tensor):
        check_shape(image, "C,H,W", name="image", fn=fn, hint="Pass one image, channels first.")
        x0, y0, x1, y1 = bbx_to_pixels(bbx, (image.shape[-2], image.shape[-1]), query=query, fn=fn)
        return image[:, y0:y1, x0:x1]  # type: ignore[return-value]
    from PIL import Image

    if isinstance(image, Image.Image):
        x0, y0, x1, y1 = bbx_to_pixels(bbx, (image.height, image.width), query=query, fn=fn)
        return image.crop((x0, y0, x1, y1))  # type: ignore[return-value]
    raise TypeError(
        f"{fn}(): image must be a torch.Tensor of shape (C, H, W) or a PIL.Image.Image; got {type(image).__name__}."
    )


def query_resize_size(
    full_hw: tuple[int, int], crop_hw: tuple[int, int], imsize: int, *, upscale: bool = False
) -> tuple[int, int]:
    """Size ``(h, w)`` cirtorch resizes a query crop to: the scale the *full* image gets at max side ``imsize``.

    cirtorch (``ImagesFromList``) calls ``img.thumbnail((s, s))`` on the crop with
    ``s = imsize * max(crop) / max(full)``, i.e. scale ``imsize / max(full)``. This reproduces Pillow's (>= 7)
    ``thumbnail`` arithmetic exactly: the long side becomes ``floor(s)`` (clamped to at least 1); the short side is
    ``floor`` or ``ceil`` of ``floor(s) / aspect``, whichever keeps the aspect ratio closer (``floor`` on a tie);
    and a crop that already fits in ``floor(s)`` is left alone (``thumbnail`` never enlarges). Pass
    ``upscale=True`` to resize such crops up too (for an image smaller than ``imsize``). Pillow < 7 truncated the
    short side instead, which can differ by one pixel.

    Args:
        full_hw: ``(H, W)`` of the whole query image.
        crop_hw: ``(h, w)`` of the crop (from :func:`crop_query`).
        imsize: The max side database images are resized to (1024 by convention).
        upscale: Also enlarge crops smaller than the target (cirtorch does not).

    Returns:
        ``(h, w)`` ints of the resized crop.

    Raises:
        ValueError: If a size or ``imsize`` is not a positive integer.

    Example:
        >>> query_resize_size((768, 1024), (333, 517), 800)  # s = 800 * 517 / 1024 = 403.9 -> 403 x 260
        (260, 403)
        >>> query_resize_size((768, 1024), (300, 500), 1024)  # scale 1: unchanged
        (300, 500)
    """
    fn = "query_resize_size"
    for arg, val in (("full_hw", full_hw), ("crop_hw", crop_hw)):
        if len(val) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in val):
            raise ValueError(f"{fn}(): {arg} must be (H, W) with positive ints; got {tuple(val)!r}.")
    if not isinstance(imsize, int) or isinstance(imsize, bool) or imsize <= 0:
        raise ValueError(f"{fn}(): imsize must be a positive int; got {imsize!r}.")
    h, w = crop_hw
    side = max(1, math.floor(imsize * max(h, w) / max(full_hw)))
    if not upscale and h <= side and w <= side:
        return h, w
    aspect = w / h
    if aspect <= 1.0:  # portrait or square: height is the long side (Pillow: x / y >= aspect with x = y = side)
        new_w = max(min(math.floor(side * aspect), math.ceil(side * aspect), key=lambda n: abs(aspect - n / side)), 1)
        return side, new_w
    new_h = max(
        min(math.floor(side / aspect), math.ceil(side / aspect), key=lambda n: 0 if n == 0 else abs(aspect - side / n)),
        1,
    )
    return new_h, side


# ----------------------------------------------------------------------------------------------------------------
# Reading images
# ----------------------------------------------------------------------------------------------------------------


def read_image(path: str | Path, *, what: str = "image") -> torch.Tensor:
    """Read an image file as RGB ``uint8`` of shape :math:`(3, H, W)` (PIL decoder, EXIF orientation ignored).

    Truncated files are errors (Pillow's ``LOAD_TRUNCATED_IMAGES`` is not touched).

    Args:
        path: The file.
        what: What the file is (``"query"``, ``"database image"``), used in the error message.

    Returns:
        A ``torch.uint8`` tensor of shape :math:`(3, H, W)`.

    Raises:
        ImageReadError: If the file is missing, unreadable or cannot be decoded; the message names the path and
            the reason.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as d:
        ...     Image.new("RGB", (5, 3), (255, 0, 0)).save(f"{d}/a.png")
        ...     read_image(f"{d}/a.png").shape
        torch.Size([3, 3, 5])
    """
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        reason = f"{type(err).__name__}: {err}"
        raise ImageReadError(f"read_image(): cannot read {what} {path}: {reason}", path=path, reason=reason) from err
    return pil_to_tensor(rgb)


def read_images_skipping(
    paths: Sequence[str | Path], *, what: str = "database image", warn: bool = True
) -> tuple[list[torch.Tensor | None], list[ImageFailure]]:
    """Read database images, reporting and skipping the unreadable ones (never use this for queries).

    Policy: an unreadable database image keeps its slot as ``None`` so that gnd indices stay valid; give it a zero
    descriptor (similarity 0 to every query) rather than deleting it. Failures are returned and, with ``warn``,
    reported in one ``UserWarning`` listing path and reason of each (the first 20). Queries must be read with
    :func:`read_image` / :func:`read_query`, which raise.

    Args:
        paths: Image files, in database order.
        what: What the files are, used in messages.
        warn: Emit the ``UserWarning``.

    Returns:
        ``(images, failures)``: ``images[j]`` is the :math:`(3, H_j, W_j)` uint8 tensor of ``paths[j]`` or None;
        ``failures`` lists :class:`ImageFailure` ``(index, path, reason)`` in order.

    Example:
        >>> images, failures = read_images_skipping([], warn=False)
        >>> images, failures
        ([], [])
    """
    images: list[torch.Tensor | None] = []
    failures: list[ImageFailure] = []
    for j, p in enumerate(paths):
        try:
            images.append(read_image(p, what=what))
        except ImageReadError as err:
            images.append(None)
            failures.append(ImageFailure(j, Path(p), err.reason))
    if failures and warn:
        listed = "; ".join(f"[{f.index}] {f.path}: {f.reason}" for f in failures[:20])
        more = f"; ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        warnings.warn(
            f"read_images_skipping(): skipped {len(failures)} unreadable {what}(s) of {len(paths)} "
            f"(kept as None; give them a zero descriptor): {listed}{more}",
            UserWarning,
            stacklevel=2,
        )
    return images, failures


def read_query(ds: RetrievalDataset, index: int) -> torch.Tensor:
    """Read query ``index`` of a dataset and crop it to its ``bbx`` (no crop when ``bbx`` is None).

    Args:
        ds: The dataset (e.g. from :func:`load_revisitop`).
        index: Query index, ``0 <= index < ds.num_queries``.

    Returns:
        The cropped query, ``uint8`` of shape :math:`(3, h, w)`.

    Raises:
        IndexError: If ``index`` is out of range.
        ImageReadError: If the query image cannot be read (a query is never skipped).
        BoundingBoxError: If its ``bbx`` is invalid for the image.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as d:
        ...     Image.new("RGB", (8, 6)).save(f"{d}/q.png")
        ...     gnd = [{"ok": np.zeros(0, dtype=np.int64), "junk": np.zeros(0, dtype=np.int64)}]
        ...     ds = RetrievalDataset("toy", Path(d), [], [Path(d) / "q.png"], [(1.5, 0.4, 6.5, 4.6)], gnd, "old")
        ...     read_query(ds, 0).shape
        torch.Size([3, 5, 4])
    """
    if not 0 <= index < ds.num_queries:
        raise IndexError(f"read_query(): index must be in [0, {ds.num_queries}); got {index}.")
    path = ds.queries[index]
    image = read_image(path, what=f"query {index}")
    box = ds.bbx[index]
    if box is None:
        return image
    return crop_query(image, box, query=path.stem)
