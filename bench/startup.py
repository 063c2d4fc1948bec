"""Comparison 6: ``cnisup start`` until every worker is ready, with the
config family alone and with the kernel family alone (root: the ebpf worker
compiles and loads its BPF program before it is ready); and how long the
configuration loader takes over hostile or maximal files."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from .common import CNISUP, Instance, Listener, world_dir

#: A "billion laughs" (9**7 strings once expanded): refused, never expanded.
_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True))


def _config_rows(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The loader alone (in this process) on the largest file it reads in its most
    expensive shape, one flow list of 64 KiB (accepted); and the whole ``cnisup
    start`` (interpreter start-up included) refusing a YAML bomb and a deeply
    nested value with exit 78."""
    from cnisup.supervisor import config

    n = 1 if quick else 7
    base = world_dir("cnisup-bench-config-")
    flow = base / "flow.yaml"
    flow.write_text("cni:\n  bin_dirs: [" + ",".join(["/a"] * ((config.MAX_CONFIG_BYTES - 32) // 3)) + "]\n")
    hostile = {"YAML bomb": _BOMB, "60,000 nested [": "node_name: " + "[" * 60_000}
    details: dict[str, Any] = {}
    try:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            config.load(flow, environ={})
            times.append(time.perf_counter() - t0)
        details["64 KiB flow list"] = times
        rows = [{"name": "start-up", "metric": "configuration loader: a 64 KiB flow list (accepted), median",
                 "primary": statistics.median(times), "fallback": None, "ratio": None, "unit": "s", "runs": n}]
        for label, text in hostile.items():
            path = base / "hostile.yaml"
            path.write_text(text)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                out = subprocess.run([CNISUP, "start", "--config", str(path)], capture_output=True, timeout=60,
                                     check=False)
                times.append(time.perf_counter() - t0)
                assert out.returncode == 78, out.stderr
            details[label] = times
            rows.append({"name": "start-up", "metric": f"cnisup start refusing a {label} (exit 78), median",
                         "primary": statistics.median(times), "fallback": None, "ratio": None, "unit": "s",
                         "runs": n})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows, details


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
    n = 1 if quick else 7
    prim = [_once(True)["to_ready_s"] for _ in range(n)]
    fb = [_once(False)["to_ready_s"] for _ in range(n)]
    p, f = statistics.median(prim), statistics.median(fb)
    rows = [{"name": "start-up", "metric": "cnisup start to supervisor.ready (config family), median",
             "primary": p, "fallback": f, "ratio": f / p, "unit": "s", "runs": n}]
    details: dict[str, Any] = {"primary_s": prim, "fallback_s": fb}
    if os.geteuid() == 0 and Path("/usr/lib/cni").is_dir():
        k = 1 if quick else 5
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
    config_rows, details["config_loader_s"] = _config_rows(quick)
    return rows + config_rows, details
