"""Shared pytest fixtures: ``--device`` / ``--dtype`` options (kornia style)."""

from __future__ import annotations

import pytest
import torch

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", action="store", default="cpu", help="cpu, cuda or all")
    parser.addoption("--dtype", action="store", default="float32", help="float16,float32,float64, or all")


def _devices(config: pytest.Config) -> list[str]:
    opt = config.getoption("--device")
    if opt == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return opt.split(",")


def _dtypes(config: pytest.Config) -> list[str]:
    opt = config.getoption("--dtype")
    if opt == "all":
        return ["float16", "bfloat16", "float32", "float64"]
    return opt.split(",")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", [torch.device(d) for d in _devices(metafunc.config)], ids=str)
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", [_DTYPES[d] for d in _dtypes(metafunc.config)], ids=str)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def debian_packages() -> None:
    """The Debian packages the ``clutter`` builder needs, fetched (or cached); skips without ``apt-get``.

    Session-scoped, so that module-scoped fixtures (a dataset built once per test module) can use it.

    With ``DEEPAGG_REQUIRE_DEBIAN`` set (CI), or wherever ``apt-get`` exists, a failure to fetch is an error.
    """
    import os
    import shutil

    from deepagg.data.sources import DebianSourceError, fetch_debs

    try:
        fetch_debs(["tuxpaint-stamps-default"])
    except DebianSourceError as exc:
        if not os.environ.get("DEEPAGG_REQUIRE_DEBIAN") and shutil.which("apt-get") is None:
            pytest.skip(f"needs apt-get: {exc}")
        raise
