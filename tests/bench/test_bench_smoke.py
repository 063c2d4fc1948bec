"""The benchmark's own smoke test: quick mode runs and writes valid results.
No timing thresholds here: the numbers are the benchmark's to report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_mode_writes_valid_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    docs = tmp_path / "docs"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out), "--docs", str(docs)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) >= {"machine", "date", "comparisons"}
    assert results["machine"]["cores"] >= 1 and results["quick"] is True
    names = {c["name"] for c in results["comparisons"]}
    assert any(n.startswith("config family") for n in names) and any(n.startswith("bus") for n in names)
    for c in results["comparisons"]:
        assert set(c) >= {"name", "metric", "primary", "fallback", "ratio", "unit"}
        if c["fallback"] is not None and c["primary"]:
            assert math.isclose(c["ratio"], c["fallback"] / c["primary"], rel_tol=1e-9)
    by_metric = {c["metric"]: c for c in results["comparisons"] if c["name"].startswith("config family")}
    # Every change reported once and the identical rewrites not at all, by both workers.
    assert by_metric["events emitted / expected"]["primary"] == 1.0
    assert by_metric["events emitted / expected"]["fallback"] == 1.0
    md = (docs / "BENCHMARKS.md").read_text()
    assert "| comparison | metric |" in md
    for png in docs.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(docs.glob("*.png"))) >= 3
