"""Real photos and photographic object cut-outs for the embedded ``clutter`` benchmark.

Everything comes from Debian packages fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a
cache directory (never installed, never committed), plus, optionally, the handful of colour photos bundled
with scikit-image and scikit-learn (located with :func:`importlib.util.find_spec`, never imported).

Cache layout (``cache_dir``, default ``$DEEPAGG_CACHE/debian`` or ``~/.cache/deepagg/debian``)::

    debs/<package>_<version>_<arch>.deb     downloaded once, reused
    extracted/<package>/                    dpkg -x output; complete when present (made by a rename)
    extracted/<package>/.deepagg-deb.json   which .deb it came from (name, size, sha256)
    apt-lists/ apt-cache/                   private apt state, only made if the system has no package lists

Which files are used is decided by explicit allow-lists below (:data:`STAMP_OBJECTS`, :data:`SCENE_FILES`):
a curated list is deterministic and honest, where an "is it a photo" heuristic would silently change with a
package update. Each list entry was looked at by eye; the reasons for leaving files out are in the comments.
The packages (:data:`PACKAGES`, Debian 12 "bookworm") are about 410 MB of .deb files and 700 MB unpacked:
``tuxpaint-stamps-default`` (the objects: 44 photographic cut-outs, after merging mirrored / duplicate
stamps) and ``mate-backgrounds``, ``lomiri-wallpapers-16.04``, ``lomiri-wallpapers-20.04``,
``plasma-workspace-wallpapers``, ``darknet``, ``opencv-doc`` (61 real colour photos: the wallpapers of 1800 px
and more are the objects' homes, the others paste backgrounds, occluders and distractors).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from deepagg._io import sha256_file

__all__ = [
    "PACKAGES",
    "PYTHON_PHOTOS",
    "SCENE_FILES",
    "STAMP_OBJECTS",
    "STAMP_PACKAGE",
    "STAMP_ROOT",
    "DebianSourceError",
    "SourceFile",
    "deb_record",
    "default_cache_dir",
    "fetch_debs",
    "python_photos",
    "scene_photos",
    "sha256_file",
    "stamp_objects",
]

_CACHE_ENV = "DEEPAGG_CACHE"
_STAMP = ".deepagg-deb.json"


class DebianSourceError(RuntimeError):
    """A Debian package needed by the benchmark builder could not be downloaded or unpacked."""


@dataclass(frozen=True)
class SourceFile:
    """One source image and where it comes from (its sha256 is taken by the builder when it is used).

    Attributes:
        package: Debian package, or ``python:<module>`` for a Python package's bundled data.
        relpath: Path inside the package's extracted tree (or inside the Python package).
        path: Absolute path on this machine.
    """

    package: str
    relpath: str
    path: Path

    @property
    def key(self) -> str:
        """``package:relpath``, the file's stable name in manifests."""
        return f"{self.package}:{self.relpath}"


def default_cache_dir() -> Path:
    """The Debian cache: ``$DEEPAGG_CACHE/debian`` if the variable is set, else ``~/.cache/deepagg/debian``.

    Returns:
        The (not necessarily existing) cache directory.
    """
    env = os.environ.get(_CACHE_ENV)
    base = Path(env).expanduser() if env else Path("~/.cache/deepagg").expanduser()
    return base / "debian"


# --------------------------------------------------------------------------------------------- apt / dpkg


_NOT_FOUND = (
    re.compile(r"Unable to locate package (\S+)"),
    re.compile(r"Package '?([^' ]+)'? has no installation candidate"),
    re.compile(r"Can't select candidate version from package (\S+)"),
    re.compile(r"Can't select version .* of package '?([^' ]+)'?"),
)


def _not_found(output: str) -> list[str]:
    names: list[str] = []
    for pattern in _NOT_FOUND:
        names.extend(m.group(1) for m in pattern.finditer(output))
    return sorted(set(names))


def _private_apt_options(cache: Path) -> list[str]:
    lists = cache / "apt-lists"
    apt_cache = cache / "apt-cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (apt_cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    return ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={apt_cache}"]


def _has_private_lists(cache: Path) -> bool:
    lists = cache / "apt-lists"
    return lists.is_dir() and any("Packages" in p.name for p in lists.iterdir())


def _run(cmd: Sequence[str], cwd: Path | None = None) -> tuple[int, str]:
    proc = subprocess.run(list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    return proc.returncode, proc.stdout


def _cached_deb(debs_dir: Path, package: str) -> Path | None:
    found = sorted(debs_dir.glob(f"{package}_*.deb")) if debs_dir.is_dir() else []
    return found[-1] if found else None


def _apt_get() -> str:
    apt = shutil.which("apt-get")
    if apt is None:
        raise DebianSourceError(
            "fetch_debs(): apt-get is not on PATH. The clutter benchmark is built from Debian packages: run it on a "
            "Debian/Ubuntu machine that can reach a Debian mirror (apt-get download needs no root), or copy a "
            f"cache directory filled there (set {_CACHE_ENV}) to this machine."
        )
    return apt


def _download(packages: list[str], cache: Path, progress: bool) -> None:
    """``apt-get download`` the packages into ``cache/debs`` (via a private temporary folder)."""
    apt = _apt_get()
    debs_dir = cache / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    tmp = debs_dir / f".download-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        options = _private_apt_options(cache) if _has_private_lists(cache) else []
        if progress:
            print(f"fetch_debs: apt-get download {' '.join(packages)}", flush=True)
        rc, out = _run([apt, *options, "download", *packages], cwd=tmp)
        if rc != 0 and not options:
            # No (or stale) system package lists: fill a private lists directory and retry with it.
            options = _private_apt_options(cache)
            if progress:
                print(f"fetch_debs: apt-get update into {cache / 'apt-lists'}", flush=True)
            urc, uout = _run([apt, *options, "update"])
            if urc != 0:
                raise DebianSourceError(
                    f"fetch_debs(): apt-get download failed and apt-get update (private lists in "
                    f"{cache / 'apt-lists'}) failed too (exit {urc}); a machine with access to a Debian mirror is "
                    f"needed. apt-get said: {uout.strip()[-800:]}"
                )
            rc, out = _run([apt, *options, "download", *packages], cwd=tmp)
        if rc != 0:
            missing = _not_found(out)
            if missing:
                raise DebianSourceError(
                    f"fetch_debs(): Debian package(s) {', '.join(missing)} not found by apt-get (checked after "
                    f"apt-get update). Is a Debian 12 (bookworm) 'main' mirror configured in sources.list? "
                    f"apt-get said: {out.strip()[-800:]}"
                )
            raise DebianSourceError(f"fetch_debs(): apt-get download failed (exit {rc}): {out.strip()[-800:]}")
        for deb in sorted(tmp.glob("*.deb")):
            os.replace(deb, debs_dir / deb.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    still = [p for p in packages if _cached_deb(debs_dir, p) is None]
    if still:
        raise DebianSourceError(f"fetch_debs(): apt-get download produced no .deb for {', '.join(still)}.")


def _read_stamp(extracted: Path) -> dict[str, object] | None:
    try:
        stamp = json.loads((extracted / _STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _extract(deb: Path, package: str, cache: Path) -> Path:
    """``dpkg -x`` the .deb into ``cache/extracted/<package>`` unless that already holds this very .deb."""
    dest = cache / "extracted" / package
    st = deb.stat()
    stamp = _read_stamp(dest)
    if stamp and stamp.get("deb") == deb.name and stamp.get("size") == st.st_size:
        return dest
    dpkg = shutil.which("dpkg") or shutil.which("dpkg-deb")
    if dpkg is None:
        raise DebianSourceError(
            f"fetch_debs(): dpkg is not on PATH, so {deb.name} cannot be unpacked; install dpkg (Debian/Ubuntu "
            "have it) or run on a Debian machine."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{package}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        rc, out = _run([dpkg, "-x", str(deb), str(tmp)])
        if rc != 0:
            raise DebianSourceError(f"fetch_debs(): dpkg -x {deb.name} failed (exit {rc}): {out.strip()[-800:]}")
        record = {"package": package, "deb": deb.name, "size": st.st_size, "sha256": sha256_file(deb)}
        (tmp / _STAMP).write_text(json.dumps(record, indent=1, sort_keys=True))
        if dest.exists():
            old = dest.parent / f".{package}.old-{os.getpid()}"
            os.replace(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_debs(
    packages: Iterable[str], cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = False
) -> dict[str, Path]:
    """Download Debian packages (without installing them) and unpack each into the cache.

    ``apt-get download`` runs in a private folder of ``<cache_dir>/debs`` (no root needed) and the ``.deb``
    files are kept and reused. If apt-get cannot find a package (no or stale package lists), the lists are
    fetched into ``<cache_dir>/apt-lists`` with ``apt-get update -o Dir::State::Lists=... -o Dir::Cache=...``
    and the download is retried with the same options. Each package is unpacked with ``dpkg -x`` into a
    temporary folder that is then renamed to ``<cache_dir>/extracted/<package>``, so a present folder is a
    complete one.

    Args:
        packages: Debian binary package names, e.g. ``["darknet", "tuxpaint-stamps-default"]``.
        cache_dir: The cache directory; default :func:`default_cache_dir`.
        progress: Print one line per download / update.

    Returns:
        ``{package: extracted_root}``; files of the package lie under ``extracted_root`` with their installed
        paths (``usr/share/...``).

    Raises:
        DebianSourceError: If apt-get or dpkg is missing, a package is unknown to apt, or a download or
            extraction fails. The message names the package and what to do.

    Example:
        >>> roots = fetch_debs(["darknet"])  # doctest: +SKIP
        >>> sorted(p.name for p in (roots["darknet"] / "usr/share/darknet/data").glob("*.jpg"))[:2]  # doctest: +SKIP
        ['dog.jpg', 'eagle.jpg']
    """
    names = list(dict.fromkeys(packages))
    bad = [p for p in names if not re.fullmatch(r"[a-z0-9][a-z0-9+.\-]+", p)]
    if bad:
        raise ValueError(f"fetch_debs(): packages must be Debian package names; got {bad!r}.")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    debs_dir = cache / "debs"
    missing = [p for p in names if _cached_deb(debs_dir, p) is None]
    if missing:
        _download(missing, cache, progress)
    out: dict[str, Path] = {}
    for p in names:
        deb = _cached_deb(debs_dir, p)
        if deb is None:  # pragma: no cover - _download raises first
            raise DebianSourceError(f"fetch_debs(): no .deb for {p} in {debs_dir}.")
        out[p] = _extract(deb, p, cache)
    return out


def deb_record(extracted_root: Path) -> dict[str, object]:
    """The ``{package, deb, size, sha256}`` record of the .deb an extracted tree came from."""
    stamp = _read_stamp(extracted_root)
    if stamp is None:
        raise DebianSourceError(f"deb_record(): {extracted_root} was not made by fetch_debs() (no {_STAMP}).")
    return stamp


# --------------------------------------------------------------------------------------------- catalogue

STAMP_PACKAGE = "tuxpaint-stamps-default"
STAMP_ROOT = "usr/share/tuxpaint/stamps"

# Objects: photographic Tux Paint stamps (real photos cut out with an alpha mask). Each one passed the filter
# of offline-weights-and-photos.md (RGBA, long side >= 200 px, > 3000 unique opaque colours; re-checked when
# loaded) and was then chosen by eye from the 148 that pass it outside the ``cartoon`` folders: left out are
# clip art that passes the colour filter (button, feathered_hat, Santa, bunny-egg, jackolantern_mean, saturn,
# fireworks), amorphous or near-textureless cut-outs (explosion, fire, grave-c/-j, cylinder, candle), thin
# line-like ones that are mostly background at any box (syringe, thermometer, stethoscope, bassoon, spade,
# candy canes, paratrooper, final-roll-call, railroad_crossing, lobster, mantis, 747, indycar, trumpet), and
# further members of one kind where a distinct instance already is in (other guitars, gnus, the Stryker).
# Keys are the object ids; the first file is the one used, the others are the same object (a mirrored copy or
# another photo or copy of the same item) and are merged into that id, never used as a separate object.
STAMP_OBJECTS: dict[str, tuple[str, ...]] = {
    "albino_peahen": ("animals/birds/albino_peahen.png",),
    "crowned_crane": ("animals/birds/crowned_crane.png",),
    "helmeted_guineafowl": ("animals/birds/helmeted_guineafowl.png",),
    "magellanic_penguin": ("animals/birds/magellanic_penguin.png",),
    "pink_flamingo": ("animals/birds/pink_flamingo.png",),
    "brown_slug": ("animals/insects/Brown_slug.png",),
    "chimp": ("animals/mammals/apes/chimp.png",),
    "otter": ("animals/mammals/aquatic/otter.png",),
    "european_bear": ("animals/mammals/bears/european-bear.png",),
    "cow_white": ("animals/mammals/bovines/cow_white.png",),
    "gnu_baby": ("animals/mammals/bovines/gnu-baby.png", "animals/mammals/bovines/gnu-baby-stand.png"),
    "indian_blackbuck": ("animals/mammals/bovines/indian_blackbuck.png",),
    "lion": ("animals/mammals/cats/lion-2.png",),
    "tiger_sumatran": ("animals/mammals/cats/tiger_sumatran.png",),
    "pig_golden": ("animals/mammals/pig_golden2.png",),
    "rhino_black": ("animals/mammals/rhino_black.png",),
    "capybara": ("animals/mammals/rodents/capybara.png",),
    "apricot": ("food/fruit/Apricot_whole.png",),
    "cherry_stella": ("food/fruit/Cherry_Stella.png",),
    "strawberry": ("food/fruit/Strawberry2.png",),
    "cherimoya": ("food/fruit/cherimoya.png",),
    "orange_seville": ("food/fruit/orange_seville.png",),
    "ginger": ("food/spices/ginger.png",),
    "drum_tomtom": ("hobbies/music/percussion/drum_tomtom_floor.png",),
    "guitar_classical": ("hobbies/music/string/guitar_classical.png",),
    "lightbulb": ("household/Lightbulb.png",),
    "cementmixer": ("household/tools/cementmixer.png",),
    "bradley": ("military/vehicles/bradley.png", "military/vehicles/bradley_mirror.png"),
    "f22_raptor": ("military/vehicles/f22_raptor.png",),
    "fireman": ("people/fireman240a.png", "military/fireman240a.png"),
    "anemone_red": ("plants/flowers/anemone_red.png",),
    "daffodil": ("plants/flowers/daffodil.png",),
    "holm_oak": ("plants/trees/holm_oak.png",),
    "liberia_palm": ("plants/trees/liberia-palm.png",),
    "rambutan": ("plants/trees/rambutan.png",),
    "christmas_tree": ("seasonal/christmas/Christmas_Tree_photo.png",),
    "christmas_toy": ("seasonal/christmas/German_Christmas_toy.png",),
    "roast_turkey": ("seasonal/christmas/Roast_turkey.png",),
    "dumper": ("vehicles/construction/dumper.png", "vehicles/construction/dumper_mirror.png"),
    "firetruck": ("vehicles/emergency/firetruck.png",),
    "balloon": ("vehicles/flight/balloon360.png",),
    "garbagetruck": ("vehicles/garbagetruck.png",),
    "korean_bus": ("vehicles/masstransit/green_korean_bus.png",),
    "wheel_tractor": ("vehicles/wheel_tractor.png",),
}

# Scenes: real colour photographs only, chosen by eye. Left out: illustrations and renders (mate abstract/ and
# desktop/, lomiri umang/analogpattern/Fossa/Infinite-Sea/Painting-Colors, most plasma wallpapers,
# opencv Blender_Suzanne, logos, starry_night, darknet scream), grayscale photos (plasma Grey and ColdRipple,
# opencv chessboard/left01..right14/basketball/box), documents and charts (opencv text_*, sudoku, notes,
# imageText*), and the second image of opencv's two-view pairs (aero3, aloeR, ela_modified, graf3, leuvenB,
# right.jpg, rubberwhale2), which would be near-duplicate scenes. Plasma photos are taken at 2560x1600.
_PLASMA = "usr/share/wallpapers/{}/contents/images/2560x1600.jpg"
_OPENCV = "usr/share/doc/opencv-doc/examples/data/{}"
SCENE_FILES: dict[str, tuple[str, ...]] = {
    "mate-backgrounds": tuple(
        f"usr/share/backgrounds/mate/nature/{n}.jpg"
        for n in (
            "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow",
            "LadyBird", "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower",
        )
    ),
    "lomiri-wallpapers-16.04": tuple(
        f"usr/share/backgrounds/{n}.jpg"
        for n in (
            "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace",
            "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi",
            "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich",
            "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi",
            "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi",
        )
    ),
    "lomiri-wallpapers-20.04": ("usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg",),
    "plasma-workspace-wallpapers": tuple(
        _PLASMA.format(n)
        for n in (
            "BytheWater", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
            "Kite", "OneStandsOut", "Path", "summer_1am",
        )
    ),
    "darknet": tuple(
        f"usr/share/darknet/data/{n}.jpg" for n in ("dog", "eagle", "giraffe", "horses", "kite", "person")
    ),
    "opencv-doc": tuple(
        _OPENCV.format(n)
        for n in (
            "aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg", "butterfly.jpg",
            "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "left.jpg", "leuvenA.jpg",
            "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png", "smarties.png",
            "squirrel_cls.jpg", "stuff.jpg",
        )
    ),
}  # fmt: skip

# Optional colour photos bundled with Python packages (used only as extra distractors when installed, so the
# rest of a build does not depend on them; the manifest says which were used).
PYTHON_PHOTOS: dict[str, tuple[str, ...]] = {
    "skimage": ("data/astronaut.png", "data/chelsea.png", "data/coffee.png", "data/motorcycle_left.png",
                "data/rocket.jpg"),
    "sklearn": ("datasets/images/china.jpg", "datasets/images/flower.jpg"),
}  # fmt: skip

PACKAGES: tuple[str, ...] = (STAMP_PACKAGE, *SCENE_FILES)


def _checked(package: str, root: Path, relpath: str, fn: str) -> SourceFile:
    path = root / relpath
    if not path.is_file():
        raise DebianSourceError(
            f"{fn}(): {package}: expected file {relpath} is missing from {root}; the package version differs from the "
            f"one the catalogue was made for (Debian 12 bookworm). Update the allow-list in deepagg/data/sources.py."
        )
    return SourceFile(package, relpath, path)


def stamp_objects(root: Path) -> list[tuple[str, list[SourceFile]]]:
    """The object catalogue: ``[(object_id, [stamp, merged duplicates...]), ...]`` sorted by object id.

    Args:
        root: The extracted ``tuxpaint-stamps-default`` tree (from :func:`fetch_debs`).

    Returns:
        One entry per object; the first file is the one the builder pastes.

    Raises:
        DebianSourceError: If a listed stamp is missing.
    """
    return [
        (oid, [_checked(STAMP_PACKAGE, root, f"{STAMP_ROOT}/{rel}", "stamp_objects") for rel in files])
        for oid, files in sorted(STAMP_OBJECTS.items())
    ]


def scene_photos(roots: dict[str, Path]) -> list[SourceFile]:
    """All allow-listed scene photos, sorted by ``(package, relpath)``.

    Args:
        roots: ``{package: extracted_root}`` as returned by :func:`fetch_debs`, holding every package of
            :data:`SCENE_FILES`.

    Returns:
        The photos.

    Raises:
        DebianSourceError: If a package is missing from ``roots`` or a listed file is missing.
    """
    out: list[SourceFile] = []
    for package, files in sorted(SCENE_FILES.items()):
        if package not in roots:
            raise DebianSourceError(f"scene_photos(): package {package} was not fetched.")
        out.extend(_checked(package, roots[package], rel, "scene_photos") for rel in files)
    return sorted(out, key=lambda s: (s.package, s.relpath))


def python_photos() -> list[SourceFile]:
    """The optional colour photos bundled with scikit-image and scikit-learn, where those are installed.

    The packages are located with :func:`importlib.util.find_spec` and never imported.

    Returns:
        The photos found, sorted; empty if neither package is installed.
    """
    out: list[SourceFile] = []
    for module, files in sorted(PYTHON_PHOTOS.items()):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            continue
        base = Path(locations[0])
        out.extend(SourceFile(f"python:{module}", rel, base / rel) for rel in files if (base / rel).is_file())
    return out
