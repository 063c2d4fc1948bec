"""Comparison 6: ``cnisup start`` until every worker is ready, with the
config family alone and with the kernel family alone (root: the ebpf worker
compiles and loads its BPF program before it is ready)."""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from .common import Instance, Listener, world_dir


def _once(use_primary: bool, family: str = "config") -> dict[str, Any]:
    base = world_dir("cnisup-bench-start-")
    conf = base / "net.d"
    conf.mkdir()
    conf.chmod(0o755)
    bins = ["/usr/lib/cni"] if family == "kernel" else []
    inst = Instance(base, config={"monitors": {"kernel": family == "kernel", "k8s": False,
                                               "config": family == "config"},
                                  "use_inotify": use_primary, "use_ebpf": use_primary,
                                  "cni": {"conf_dirs": [str(conf)], "bin_dirs": bins}})
    listener = Listener(inst.endpoint)
    t0 = time.time()
    inst.start()
    try:
        at, _ = listener.until(lambda e: e["kind"] == "supervisor.ready", 90)
        w = next(w for w in inst.status()["workers"] if w["family"] == family)
        return {"to_ready_s": at - t0, "worker": w.get("worker"), "load_s": (w.get("info") or {}).get("load_s")}
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
    details: dict[str, Any] = {"primary_s": prim, "fallback_s": fb}
    if os.geteuid() == 0 and Path("/usr/lib/cni").is_dir():
        k = 2 if quick else 5
        ebpf = [_once(True, "kernel") for _ in range(k)]
        poll = [_once(False, "kernel") for _ in range(k)]
        details.update(kernel_primary_s=[r["to_ready_s"] for r in ebpf],
                       kernel_fallback_s=[r["to_ready_s"] for r in poll],
                       kernel_workers=[r["worker"] for r in ebpf + poll])
        if all(r["worker"] == "ebpf" for r in ebpf):
            p, f = statistics.median(details["kernel_primary_s"]), statistics.median(details["kernel_fallback_s"])
            rows.append({"name": "start-up", "metric": "cnisup start to supervisor.ready (kernel family), median",
                         "primary": p, "fallback": f, "ratio": f / p, "unit": "s", "runs": k})
            loads = [float(r["load_s"]) for r in ebpf if r["load_s"] is not None]
            details["bpf_load_s"] = loads
            rows.append({"name": "start-up", "metric": "BPF compile + load (ebpf worker's info.load_s), median",
                         "primary": statistics.median(loads) if loads else None, "fallback": None,
                         "ratio": None, "unit": "s", "runs": k})
        else:
            rows.append({"name": "start-up", "metric": "kernel family skipped: ebpf did not run",
                         "primary": None, "fallback": None, "ratio": None, "unit": "-"})
    return rows, details
