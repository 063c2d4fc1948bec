"""Helpers of the k8s tests that run one worker through the ``harness``:
who it runs as, its configuration, waiting for its status, and recording a
measurement in ``build/measurements/k8s.json``."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path
from typing import Any

from harness import WorkerRun

from cnisup.workers.privileges import Identity

MEASUREMENTS = Path(__file__).resolve().parents[2] / "build" / "measurements" / "k8s.json"


def record(key: str, value: Any) -> None:
    MEASUREMENTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(MEASUREMENTS.read_text()) if MEASUREMENTS.exists() else {}
    data[key] = value
    MEASUREMENTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def identity() -> Identity | None:
    """nobody when the tests run as root (as the supervisor would drop to), else ourselves."""
    if os.geteuid() != 0:
        return None
    nobody = pwd.getpwnam("nobody")
    return Identity(nobody.pw_uid, nobody.pw_gid)


def config(kubeconfig: Path | str, scope: str = "node", read_timeout_s: float = 30.0) -> dict[str, Any]:
    return {"kubernetes": {"kubeconfig": str(kubeconfig), "pod_scope": scope, "read_timeout": read_timeout_s}}


def settled(run: WorkerRun, resource: str, cached: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """The worker's status once ``resource`` has ``cached`` objects and it is idle."""
    def ok(s: dict[str, Any]) -> bool:
        r = (s.get("info") or {}).get("resources", {}).get(resource, {})
        return bool(s["t"] == "hb" and r.get("cached") == cached and r.get("state", "watching") == "watching")
    return run.wait_status(ok, timeout_s=timeout_s)


def rss_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "RssAnon")}
