"""Where the apps find their Hydra configs, in an installed wheel and in a checkout alike.

The repository's top-level ``conf/`` is the only copy in the source tree; the wheel ships it as
``lightning_apps/conf/`` (``[tool.hatch.build.targets.wheel.force-include]`` in ``pyproject.toml``). Nothing
else the apps read at run time lives in the checkout: datasets, features and weights are under
``$DEEPAGG_DATA`` / ``$DEEPAGG_CACHE`` (default ``~/.cache/deepagg``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONF_DIR", "ConfigDirNotFoundError", "find_conf_dir"]


class ConfigDirNotFoundError(FileNotFoundError):
    """Neither the packaged ``lightning_apps/conf`` nor a checkout's ``conf/`` exists."""


def find_conf_dir(package_dir: Path | None = None) -> Path:
    """The Hydra config folder: the packaged ``lightning_apps/conf`` if present, else the checkout's ``conf/``.

    Args:
        package_dir: The ``lightning_apps`` package folder; ``None`` means this module's folder.

    Returns:
        An absolute path to the folder that holds ``eval.yaml`` (usable as Hydra's ``config_path``).

    Raises:
        ConfigDirNotFoundError: If neither folder exists (a broken install, or a copy of the package without
            its configs).

    Example:
        >>> (find_conf_dir() / "eval.yaml").is_file()
        True
    """
    pkg = Path(__file__).resolve().parent if package_dir is None else Path(package_dir).resolve()
    packaged, checkout = pkg / "conf", pkg.parent / "conf"
    for candidate in (packaged, checkout):
        if candidate.is_dir():
            return candidate
    raise ConfigDirNotFoundError(
        f"lightning_apps: no Hydra config folder; looked for {packaged} (installed wheel) and {checkout} "
        "(repository checkout). Reinstall the package (pip install 'deepagg[apps]') or run from a checkout."
    )


#: The Hydra config folder of this installation (see :func:`find_conf_dir`).
CONF_DIR: Path = find_conf_dir()
