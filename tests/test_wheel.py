"""The package works from its wheel, outside the checkout (issue 12 item 3).

The wheel is built offline (``python -m build --wheel --no-isolation``, into a tmp dir) and installed with
``--no-deps --no-index`` into a temporary venv. That venv sees the test interpreter's site-packages through a
``.pth`` file for the dependencies (torch, hydra, ...), but not the checkout: an editable install's own ``.pth``
in those site-packages is not processed there (only the site-packages folder itself is added to ``sys.path``),
and every command runs from a tmp dir with no ``PYTHON*`` variables. The end-to-end test needs the Debian
packages of the clutter benchmark, as ``tests/test_eval_app.py::test_end_to_end_on_clutter_tiny`` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest

from lightning_apps.paths import CONF_DIR, ConfigDirNotFoundError, find_conf_dir

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Installed:
    """A temporary venv holding only the wheel; its dependencies come from the test interpreter."""

    python: Path
    site_packages: Path
    env: dict[str, str]
    cwd: Path  # outside the checkout

    def run(self, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.python), *args], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )


def _check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of the working tree, built without network into a tmp dir (no build/ or dist/ in the repo)."""
    pytest.importorskip("build", reason="needs the `build` package (the test extra)")
    pytest.importorskip("hatchling", reason="needs `hatchling` (the test extra)")
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO)]
    _check(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600))
    (whl,) = out.glob("deepagg-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("venv")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        PYTHONNOUSERSITE="1",
        PYTHONUNBUFFERED="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        VIRTUAL_ENV=str(env_dir),
        PATH=f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    cwd = root / "cwd"
    cwd.mkdir()
    # pip of the test interpreter installs into the new venv (no ensurepip); before the .pth below exists, so
    # that pip sees only the new venv's (empty) site-packages.
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    _check(subprocess.run(pip, cwd=cwd, env=env, capture_output=True, text=True, timeout=600))
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(
        _check(subprocess.run([python, "-c", purelib], cwd=cwd, env=env, capture_output=True, text=True)).strip()
    )
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # the test interpreter's
    (site / "_deepagg_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    return Installed(python=python, site_packages=site, env=env, cwd=cwd)


# ------------------------------------------------------------------------------------------------- CONF_DIR


def test_checkout_conf_dir_is_the_repository_conf() -> None:
    assert CONF_DIR == REPO / "conf"
    assert (CONF_DIR / "eval.yaml").is_file()


def test_packaged_conf_dir_wins(tmp_path: Path) -> None:
    (tmp_path / "lightning_apps" / "conf").mkdir(parents=True)
    (tmp_path / "conf").mkdir()
    assert find_conf_dir(tmp_path / "lightning_apps") == tmp_path / "lightning_apps" / "conf"


def test_missing_conf_dir_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "lightning_apps").mkdir()
    with pytest.raises(ConfigDirNotFoundError, match=r"no Hydra config folder; looked for .*lightning_apps/conf"):
        find_conf_dir(tmp_path / "lightning_apps")


# ---------------------------------------------------------------------------------------------------- wheel


def test_imports_come_from_the_wheel(installed: Installed) -> None:
    # find_spec locates deepagg without importing it (torch); lightning_apps.paths imports only pathlib
    code = (
        "import importlib.util as u, lightning_apps.paths as p; "
        "print(u.find_spec('deepagg').origin, u.find_spec('lightning_apps').origin, p.CONF_DIR)"
    )
    files = [Path(f) for f in _check(installed.run(["-c", code])).split()]
    assert all(f.is_relative_to(installed.site_packages) for f in files), files
    assert files[2] == installed.site_packages / "lightning_apps" / "conf"


def test_packaged_conf_equals_the_repository_conf(installed: Installed) -> None:
    packaged = installed.site_packages / "lightning_apps" / "conf"
    assert (packaged / "eval.yaml").is_file()

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    want, got = tree(REPO / "conf"), tree(packaged)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []


@pytest.mark.debian
def test_eval_and_summarize_from_the_wheel_on_clutter_tiny(installed: Installed, debian_packages: None) -> None:
    """``python -m lightning_apps.eval`` and ``.summarize`` of the installed wheel, run outside the checkout."""
    data, out = installed.cwd / "data", installed.cwd / "out"
    args = [
        "mode=single",
        "+dataset=clutter_tiny",
        "backbone=mobilenet_v2",
        "backbone.pretrained=false",  # the packaging is under test, not the weights (no `weights` packages needed)
        "imsize=128",
        "whiten=none",
        "num_vis_queries=0",
        "trainer.enable_progress_bar=false",
        f"data_root={data}",
        f"output_dir={out}",
    ]
    _check(installed.run(["-m", "lightning_apps.eval", *args]))
    assert (data / "clutter_tiny").is_dir()  # built by the installed deepagg under data_root
    for name in ("results.json", "results.md", "per_query_ap.csv", "config.yaml"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["dataset"] == "clutter_tiny"
    assert "clutter_tiny" in (out / "results.md").read_text()

    table = _check(installed.run(["-m", "lightning_apps.summarize", str(out)])).splitlines()
    assert table[0].startswith("| dataset | backbone |")
    assert table[2].startswith("| clutter_tiny | mobilenet_v2 |")
