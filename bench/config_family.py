"""Comparison 3: the config family, inotify vs file-poll, under the same
change workload and the same idle period."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .common import Instance, Listener, cpu_seconds_fine, percentile, row, world_dir

CONF = {"cniVersion": "1.0.0", "name": "bench", "plugins": [{"type": "bridge"}, {"type": "portmap"}]}
OPS = ("create", "replace", "touch", "delete")
EXPECT = {"create": "cni.config.created", "replace": "cni.config.modified", "delete": "cni.config.deleted"}


def ops_plan(per_op: int) -> list[tuple[str, int]]:
    return [(op, i) for i in range(per_op) for op in OPS]


class _Collector(threading.Thread):
    """Receives while the workload runs, so arrival times are real."""

    def __init__(self, listener: Listener, expected: int) -> None:
        super().__init__(daemon=True)
        self.listener, self.expected = listener, expected
        self.got: list[tuple[float, dict[str, Any]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        quiet_after_done = 0.0
        seen = 0
        while True:
            got = self.listener.recv(0.5)
            if got is not None:
                self.got.append(got)
                if got[1]["kind"] in EXPECT.values():
                    seen += 1
                continue
            if self.done.is_set():
                quiet_after_done += 0.5
                if seen >= self.expected and quiet_after_done >= 1.5:
                    return


def _strace_count(pid: int, seconds: float) -> int | None:
    """Syscalls of ``pid`` (all threads) over ``seconds``, by strace -c."""
    out = Path(f"/tmp/cnisup-bench-strace-{pid}.txt")
    try:
        p = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return None
    time.sleep(seconds)
    p.send_signal(signal.SIGINT)
    p.wait(10)
    text = out.read_text() if out.exists() else ""
    out.unlink(missing_ok=True)
    # "100.00  0.000157  0  204  [errors]  total": calls is the fourth column.
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[-1] == "total" and len(fields) >= 5:
            return int(fields[3])
    return None


def _one(worker: str, *, changes: int, interval_s: float, idle_s: float) -> dict[str, Any]:
    base = world_dir(f"cnisup-bench-{worker}-")
    conf, bins = base / "net.d", base / "bin"
    for d in (conf, bins):
        d.mkdir()
        d.chmod(0o755)
    per_op = changes // len(OPS)
    (conf / "00-active.conflist").write_text(json.dumps(CONF))
    for op in ("replace", "touch", "delete"):
        for i in range(per_op):
            (conf / f"50-{op}-{i:04}.conflist").write_text(json.dumps({**CONF, "name": f"{op}{i}"}))
    for name in ("bridge", "ptp", "host-local", "portmap"):
        shutil.copyfile(f"/usr/lib/cni/{name}" if os.path.exists(f"/usr/lib/cni/{name}") else "/bin/true",
                        bins / name)
    inst = Instance(base, config={
        "monitors": {"kernel": False, "k8s": False, "config": True}, "use_inotify": worker == "inotify",
        "cni": {"conf_dirs": [str(conf)], "bin_dirs": [str(bins)]},
        "fallback": {"file_poll_interval": interval_s}})
    listener = Listener(inst.endpoint)
    inst.start()
    try:
        w = inst.wait_running("config")
        pid = w["pid"]
        time.sleep(min(2.0, interval_s))  # past the start-up scan
        while listener.recv(0.2):
            pass
        cpu0 = cpu_seconds_fine(pid)
        syscalls = _strace_count(pid, idle_s)
        idle_cpu = cpu_seconds_fine(pid) - cpu0
        collector = _Collector(listener, expected=len([op for op, _ in ops_plan(per_op) if op in EXPECT]))
        collector.start()
        # The workload: distinct files per operation so polling cannot merge them.
        plan = ops_plan(per_op)
        gap = interval_s / max(1, len(plan))
        sent: dict[tuple[str, str], float] = {}
        for op, i in plan:
            if op == "create":
                path = conf / f"60-create-{i:04}.conflist"
                path.write_text(json.dumps({**CONF, "name": f"new{i}"}))
            elif op == "replace":
                path = conf / f"50-replace-{i:04}.conflist"
                tmp = conf / f".50-replace-{i:04}.tmp"
                tmp.write_text(json.dumps({**CONF, "name": f"replaced{i}"}))
                os.rename(tmp, path)
            elif op == "touch":
                path = conf / f"50-touch-{i:04}.conflist"
                path.write_text(path.read_text())  # same bytes: must emit nothing
            else:
                path = conf / f"50-delete-{i:04}.conflist"
                path.unlink()
            if op in EXPECT:
                sent[(EXPECT[op], str(path))] = time.time()
            time.sleep(gap)
        collector.done.set()
        collector.join(2 * interval_s + 15)
        latencies: list[float] = []
        counts: dict[str, int] = {}
        unexpected = 0
        pending = dict(sent)
        for at, env in collector.got:
            if not env["kind"].startswith("cni.config."):
                continue
            counts[env["kind"]] = counts.get(env["kind"], 0) + 1
            key = (env["kind"], env["data"].get("path", ""))
            if key in pending:
                latencies.append((at - pending.pop(key)) * 1000)
            else:
                unexpected += 1
        return {
            "worker": worker, "latencies_ms": latencies, "expected": len(sent), "matched": len(latencies),
            "unexpected": unexpected, "counts": counts, "idle_s": idle_s,
            "syscalls_per_hour": syscalls * 3600 / idle_s if syscalls is not None else None,
            "idle_cpu_s_per_hour": idle_cpu * 3600 / idle_s,
            "rss_bytes": next(x for x in inst.status()["workers"] if x["family"] == "config").get("rss_bytes"),
        }
    finally:
        inst.stop()
        listener.close()
        shutil.rmtree(base, ignore_errors=True)


def run(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    interval = 1.0 if quick else 30.0
    changes = 10 if quick else 200
    idle = 1.0 if quick else 60.0
    res = {w: _one(w, changes=changes, interval_s=interval, idle_s=idle) for w in ("inotify", "file-poll")}
    ino, fp = res["inotify"], res["file-poll"]
    name = "config family: inotify vs file-poll"
    rows = [
        row(name, "detection latency p50", percentile(ino["latencies_ms"], 50), percentile(fp["latencies_ms"], 50),
            "ms", file_poll_interval_s=interval),
        row(name, "detection latency p99", percentile(ino["latencies_ms"], 99), percentile(fp["latencies_ms"], 99),
            "ms", file_poll_interval_s=interval),
        row(name, "syscalls per idle hour", ino["syscalls_per_hour"] or 0.0, fp["syscalls_per_hour"] or 0.0,
            "syscalls/h", idle_measured_s=idle),
        row(name, "CPU per idle hour", ino["idle_cpu_s_per_hour"], fp["idle_cpu_s_per_hour"], "s/h"),
        row(name, "events emitted / expected", (ino["matched"] + ino["unexpected"]) / ino["expected"],
            (fp["matched"] + fp["unexpected"]) / fp["expected"], "ratio",
            expected=ino["expected"], note="1.0 = every change once, no touch reported"),
    ]
    return rows, res
