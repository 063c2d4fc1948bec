"""Helpers of the kernel family tests: markers, one long-lived worker per
module (compiling the BPF program takes ~1.5 s), and process measurements."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cni import have_plugins
from harness import WorkerRun

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")
needs_plugins = pytest.mark.skipif(not have_plugins(), reason="Debian's containernetworking-plugins is not installed")


def worker_config(bin_dir: Path, **fallback: Any) -> dict[str, Any]:
    return {"node_name": "test-node", "cni": {"bin_dirs": [str(bin_dir)], "conf_dirs": ["/nonexistent"]},
            "fallback": {"process_poll_interval": 5.0, **fallback}}


def start_module_worker(name: str, bin_dir: Path, tmp: Path, **fallback: Any) -> WorkerRun:
    run = WorkerRun(name, worker_config(bin_dir, **fallback), tmp=tmp, heartbeat_interval_s=0.5)
    run.start(ready_timeout_s=60)
    # Ready once the first heartbeat with worker details arrived (BPF loaded).
    run.wait_status(lambda s: s["t"] == "exit" or (s["t"] == "hb" and "runs_active" in s.get("info", {})),
                    timeout_s=60)
    assert run.exit_status() is None, run.stderr()
    return run


def stop_module_worker(run: WorkerRun) -> None:
    """Stop a module-scoped worker: clean exit 0 and no protocol problems."""
    try:
        assert run.stop() == 0, run.stderr()
        assert not run.problems, run.problems[:5]
    finally:
        run.close()


def latest_info(run: WorkerRun) -> dict[str, Any]:
    run.pump(0)
    beats = [s for _, s in run.status if s["t"] == "hb"]
    info: dict[str, Any] = beats[-1]["info"] if beats else {}
    return info


def cpu_s(pid: int) -> float:
    """CPU time of all threads (ZeroMQ's I/O thread included), in ns
    precision from schedstat rather than clock ticks."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total / 1e9


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out
