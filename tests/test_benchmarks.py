"""Smoke run of every benchmark (tiny sizes): each must run, agree with its reference and report its rows."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import run as bench_run


def test_benchmarks_quick(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    rows = bench_run.main(["--quick", "--json", str(out)])
    names = {r["bench"] for r in rows}
    assert names == {"diffusion", "embedding", "heat", "metrics", "pooling", "qe"}
    for r in rows:
        assert r["ours_ms"] > 0
        assert r["ref_ms"] > 0
        assert r["max_abs_diff"] < 1e-4
    payload = json.loads(out.read_text())
    assert payload["meta"]["quick"] is True
    assert len(payload["rows"]) == len(rows)
    assert "| bench | case |" in capsys.readouterr().out
