"""Comparison 6: ``cnisup start`` until every worker is ready."""

from __future__ import annotations

import shutil
import statistics
import time
from typing import Any

from .common import Instance, Listener, world_dir


def _once(use_inotify: bool) -> dict[str, float]:
    base = world_dir("cnisup-bench-start-")
    conf = base / "net.d"
    conf.mkdir()
    conf.chmod(0o755)
    inst = Instance(base, config={"monitors": {"kernel": False, "k8s": False, "config": True},
                                  "use_inotify": use_inotify, "cni": {"conf_dirs": [str(conf)], "bin_dirs": []}})
    listener = Listener(inst.endpoint)
    t0 = time.time()
    inst.start()
    try:
        at, _ = listener.until(lambda e: e["kind"] == "supervisor.ready", 30)
        worker_ready = next(w for w in inst.status()["workers"] if w["family"] == "config")
        return {"to_ready_s": at - t0, "worker_uptime_s": worker_ready.get("uptime_s") or 0.0}
    finally:
        inst.stop()
        listener.close()
        shutil.rmtree(base, ignore_errors=True)
        time.sleep(0.2)


def run(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    n = 3 if quick else 7
    prim = [_once(True)["to_ready_s"] for _ in range(n)]
    fb = [_once(False)["to_ready_s"] for _ in range(n)]
    p, f = statistics.median(prim), statistics.median(fb)
    rows = [{"name": "start-up", "metric": "cnisup start to supervisor.ready (config family), median",
             "primary": p, "fallback": f, "ratio": f / p, "unit": "s", "runs": n}]
    return rows, {"primary_s": prim, "fallback_s": fb}
