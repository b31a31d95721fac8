"""Root conftest: names available to the doctests in deepagg/ (run with --doctest-modules)."""

from __future__ import annotations

from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict[str, Any]) -> None:
    doctest_namespace["torch"] = torch
    torch.manual_seed(0)
