"""The benchmark's own smoke test: quick mode runs and writes valid results.
No timing thresholds here: the numbers are the benchmark's to report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


#: Quick mode's comparisons in two groups run side by side: its numbers mean nothing anyway (its
#: point is the code path and the output), and one run after the other is the suite's largest test.
#: The kernel comparison and start-up (which loads BPF too) share a group: the overhead rounds are
#: voided while tracing programs not their own are loaded.
GROUPS = ("kernel,startup,k8s", "config,bus,journal,export")


@pytest.mark.slow
@pytest.mark.timeout(420)  # about a minute on a quiet 2-core VM; slower beside other test runs
def test_quick_mode_writes_valid_results(tmp_path: Path) -> None:
    listed = subprocess.run([sys.executable, "-c", "from bench.run import COMPARISONS; print(*COMPARISONS)"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert sorted(",".join(GROUPS).split(",")) == sorted(listed)  # every comparison, once
    runs = []
    try:
        for i, only in enumerate(GROUPS):
            out, docs, err = tmp_path / f"results-{i}.json", tmp_path / f"docs-{i}", tmp_path / f"stderr-{i}"
            with err.open("w") as err_file:  # a file: a pipe nobody reads yet could fill and stall the run
                runs.append((out, docs, err, subprocess.Popen(
                    [sys.executable, "-m", "bench.run", "--quick", "--only", only, "--out", str(out), "--docs",
                     str(docs)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err_file)))
        results: dict[str, Any] = {}
        pngs: list[Path] = []
        for out, docs, err, proc in runs:
            assert proc.wait(timeout=390) == 0, err.read_text()[-3000:]
            part = json.loads(out.read_text())
            results = {**part, "comparisons": results.get("comparisons", []) + part["comparisons"]}
            md = (docs / "BENCHMARKS.md").read_text()
            assert "| comparison | metric |" in md
            pngs += docs.glob("*.png")
    finally:
        for *_, proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert set(results) >= {"machine", "date", "comparisons"}
    assert results["machine"]["cores"] >= 1 and results["quick"] is True
    names = {c["name"] for c in results["comparisons"]}
    for family in ("kernel family", "config family", "k8s family", "bus", "start-up"):
        assert any(n.startswith(family) for n in names), (family, names)
    kernel = [c for c in results["comparisons"] if c["name"].startswith("kernel")]
    if not any(c["metric"].startswith("skipped") for c in kernel):  # root, BCC and the plugins were there
        metrics = {(c["name"], c["metric"]) for c in kernel}
        assert {n for n, _ in metrics} == {"kernel family: ebpf vs proc-poll, pod churn",
                                           "kernel family: ebpf vs `ps aux` every 5 s (seed baseline)",
                                           "kernel overhead on unrelated work (syscall loops, thread CPU time)",
                                           "kernel family: fields of cni.plugin.finished filled in the churn "
                                           "(ebpf, lean)"}
        idle = {c["metric"] for c in results["comparisons"] if c["name"] == "idle and footprint: every cnisup process"}
        assert {"CPU per idle hour: supervisor", "CPU per idle hour: ebpf", "CPU per idle hour: all"} <= idle
        assert any(m.startswith("kernel.capture lean") for _, m in metrics), metrics
        for c in kernel:
            if c["unit"] == "fraction":
                assert 0.0 <= c["primary"] <= 1.0 and (c["fallback"] is None or 0.0 <= c["fallback"] <= 1.0), c
        startup = {c["metric"] for c in results["comparisons"] if c["name"] == "start-up"}
        assert any(m.startswith("BPF compile + load") for m in startup), startup
    k8s = [c for c in results["comparisons"] if c["name"].startswith("k8s family")]
    if not any(c["metric"].startswith("skipped") for c in k8s):
        assert {c["metric"] for c in k8s} >= {"RSS with 100 pods, 10 services, 10 slices",  # quick mode's sizes
                                              "RSS with 300 pods, 30 services, 30 slices"}
        assert any("-> subscriber" in c["metric"] for c in k8s)
    for c in results["comparisons"]:
        assert set(c) >= {"name", "metric", "primary", "fallback", "ratio", "unit"}
        if c["fallback"] is not None and c["primary"]:
            assert math.isclose(c["ratio"], c["fallback"] / c["primary"], rel_tol=1e-9)
    by_metric = {c["metric"]: c for c in results["comparisons"] if c["name"].startswith("config family")}
    # Every change reported once and the identical rewrites not at all, by both workers.
    assert by_metric["events emitted / expected"]["primary"] == 1.0
    assert by_metric["events emitted / expected"]["fallback"] == 1.0
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pngs) >= 4
