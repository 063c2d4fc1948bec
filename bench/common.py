"""Shared pieces of the benchmark: a ``cnisup start`` under test, a raw
subscriber that timestamps arrivals, and per-process resource readings."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
import zmq

CNISUP = str(Path(sys.executable).with_name("cnisup"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def world_dir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    return d


def cpu_seconds(pid: int, *, children: bool = True) -> float:
    """utime+stime (and reaped children's) of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def cpu_seconds_fine(pid: int) -> float:
    """Like ``cpu_seconds`` (reaped children included), but the process's own
    time from its threads' ``schedstat`` in nanoseconds rather than clock
    ticks of 10 ms: an idle worker uses a few ticks a minute. (The time of a
    thread that has ended is not counted; the workers' threads live as long
    as they do.)"""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    children = (int(fields[13]) + int(fields[14])) / CLK_TCK
    ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return ns / 1e9 + children


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren, …), from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    out: list[int] = []
    frontier = [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def tree_rss_bytes(pid: int) -> tuple[int, int]:
    """(RSS of ``pid`` plus its live descendants, number of descendants).
    Shared pages count once per process, as ``ps`` shows them."""
    total, kids = rss_bytes(pid), 0
    for child in descendants(pid):
        try:
            total += rss_bytes(child)
            kids += 1
        except OSError:
            continue
    return total, kids


def tree_cpu_seconds(pid: int) -> float:
    """CPU of ``pid`` with its reaped children, plus its live descendants'."""
    total = cpu_seconds(pid)
    for child in descendants(pid):
        try:
            total += cpu_seconds(child)
        except OSError:
            continue
    return total


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "kernel": platform.release(),
            "os": _os_release(), "python": platform.python_version(), "zmq": zmq.zmq_version()}


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "?"


class Listener:
    """A raw SUB socket that records (arrival time, envelope)."""

    def __init__(self, endpoint: str, rcvhwm: int = 0) -> None:
        self.sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)

    def recv(self, timeout_s: float) -> tuple[float, dict[str, Any]] | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        _, payload = self.sock.recv_multipart()
        return time.time(), json.loads(payload)

    def until(self, pred: Any, timeout_s: float) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            got = self.recv(left)
            if got and pred(got[1]):
                return got
        raise TimeoutError("expected event did not arrive")

    def close(self) -> None:
        self.sock.close(linger=0)


@dataclass
class Instance:
    """One ``cnisup start`` with its own runtime dir."""

    base: Path
    config: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.base}/run/events.sock"

    @property
    def bus_endpoint(self) -> str:
        return f"ipc://{self.base}/run/private/bus.sock"

    def start(self) -> None:
        # The journal only where a comparison asks for it: the others measure their family alone.
        cfg = {"preset": "production", "runtime_dir": str(self.base / "run"), "log_level": "warning",
               "node_name": "bench", "journal": {"enabled": False}, **self.config}
        path = self.base / "cnisup.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.log = open(self.base / "cnisup.log", "ab")  # noqa: SIM115 - closed in stop()
        self.started_at = time.time()
        self.proc = subprocess.Popen([CNISUP, "start", "--config", str(path)], stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def status(self) -> dict[str, Any]:
        out = subprocess.run([CNISUP, "status", "--json", "--config", str(self.base / "cnisup.yaml")],
                             capture_output=True, text=True, timeout=10)
        reply: dict[str, Any] = json.loads(out.stdout)
        return reply

    def wait_running(self, family: str, timeout_s: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                w: dict[str, Any] = next(w for w in self.status()["workers"] if w["family"] == family)
                if w["state"] == "running":
                    return w
            except (json.JSONDecodeError, StopIteration, subprocess.TimeoutExpired):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{family} worker not running: {(self.base / 'cnisup.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def row(name: str, metric: str, primary: float, fallback: float, unit: str, **extra: Any) -> dict[str, Any]:
    """One comparison row; ratio is fallback / primary (how much better the primary is)."""
    ratio = fallback / primary if primary else float("inf") if fallback else float("nan")
    return {"name": name, "metric": metric, "primary": primary, "fallback": fallback,
            "ratio": ratio, "unit": unit, **extra}


def paced(bus: Any, rate: int, seconds: float, payload: dict[str, Any]) -> tuple[int, float]:
    """Publish ``monitor.warning`` events on a workers' ``Bus`` at ``rate`` per second;
    (events published, the rate achieved)."""
    n = int(rate * seconds)
    t0 = time.monotonic()
    for i in range(n):
        due = t0 + i / rate
        if due > (now := time.monotonic()):
            time.sleep(due - now)
        bus.publish("monitor.warning", payload)
    return n, n / (time.monotonic() - t0)
