"""scripts/gpu_check.sh, the prepared device run: valid bash, and without CUDA it records the environment and stops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def test_syntax() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_without_cuda_it_stops_after_the_environment(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert "no CUDA device here; nothing else to check" in res.stdout
    text = (tmp_path / "env.txt").read_text()
    assert f"torch {torch.__version__}" in text
    assert "device: none (no CUDA)" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env.txt"]  # no step ran
