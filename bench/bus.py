"""Comparison 5: the bus itself. A publisher built on the workers' own
``Bus`` connects to the supervisor's private socket exactly like a worker,
and an external raw SUB socket measures what arrives and when."""

from __future__ import annotations

import shutil
import threading
import time
from typing import Any

from cnisup.protocol import envelope
from cnisup.workers.bus import Bus

from .common import Instance, Listener, percentile, rss_bytes, world_dir

PAYLOAD = {"family": "config", "worker": "inotify", "code": "bench", "message": "x" * 120}


class _Counter(threading.Thread):
    def __init__(self, listener: Listener) -> None:
        super().__init__(daemon=True)
        self.listener = listener
        self.received = 0
        self.latencies_ms: list[float] = []
        self.last_seq = 0
        self.holes = 0
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            got = self.listener.recv(0.2)
            if got is None:
                continue
            at, env = got
            if env["source"] != "file-poll":
                continue
            self.received += 1
            if env["seq"] != self.last_seq + 1:
                self.holes += env["seq"] - self.last_seq - 1
            self.last_seq = env["seq"]
            self.latencies_ms.append((at - env["ts"] / 1e9) * 1000)


def _paced(bus: Bus, rate: int, seconds: float) -> float:
    """Publish at ``rate`` events/s for ``seconds``; returns the rate achieved."""
    n = int(rate * seconds)
    t0 = time.monotonic()
    for i in range(n):
        due = t0 + i / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        bus.publish("monitor.warning", PAYLOAD)
    return n / (time.monotonic() - t0)


def run(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    base = world_dir("cnisup-bench-bus-")
    inst = Instance(base, config={"monitors": {"kernel": False, "k8s": False, "config": False}})
    listener = Listener(inst.endpoint)
    inst.start()
    steps: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the control socket answers: sockets are bound
            try:
                inst.status()
                break
            except Exception:
                time.sleep(0.1)
        time.sleep(0.3)  # our subscription reaches the XPUB
        assert inst.proc is not None
        sup_rss_idle = rss_bytes(inst.proc.pid)
        # Latency at a normal rate (1k events/s).
        bus = Bus(inst.bus_endpoint, envelope.Stamp("file-poll", "bench", envelope.new_incarnation()))
        bus.wait_ready(10)
        counter = _Counter(listener)
        counter.start()
        _paced(bus, 1000, 1.0 if quick else 10.0)
        time.sleep(0.5)
        lat = list(counter.latencies_ms)
        # Step the rate up until events are lost (or the publisher cannot go faster).
        rates = [2_000, 5_000, 10_000, 20_000, 40_000, 80_000, 160_000]
        loss_at = None
        max_achieved = 0.0
        for rate in rates:
            before_rx, before_holes, before_drop = counter.received, counter.holes, bus.dropped
            achieved = _paced(bus, rate, 0.5 if quick else 3.0)
            time.sleep(0.5 if quick else 1.0)
            lost = (counter.holes - before_holes) + (bus.dropped - before_drop)
            steps.append({"rate": rate, "achieved": achieved, "received": counter.received - before_rx,
                          "lost": lost, "worker_drops": bus.dropped - before_drop})
            max_achieved = max(max_achieved, achieved)
            if lost and loss_at is None:
                loss_at = achieved
                break
            if achieved < rate * 0.8:
                break  # the single publisher is the limit now
        counter.stop = True
        counter.join(2)
        sup_rss_busy = rss_bytes(inst.proc.pid)
        bus.close(0)
    finally:
        inst.stop()
        listener.close()
        shutil.rmtree(base, ignore_errors=True)
    name = "bus: worker -> proxy -> subscriber"
    rows: list[dict[str, Any]] = [
        {"name": name, "metric": "latency p50 at 1k events/s", "primary": percentile(lat, 50), "fallback": None,
         "ratio": None, "unit": "ms"},
        {"name": name, "metric": "latency p99 at 1k events/s", "primary": percentile(lat, 99), "fallback": None,
         "ratio": None, "unit": "ms"},
        {"name": name, "metric": "rate at which loss starts", "primary": loss_at, "fallback": None, "ratio": None,
         "unit": "events/s", "note": None if loss_at else f"no loss up to {max_achieved:.0f} events/s "
                                                            "(one Python publisher's limit)"},
        {"name": name, "metric": "supervisor RSS idle / after load", "primary": sup_rss_idle,
         "fallback": sup_rss_busy, "ratio": sup_rss_busy / sup_rss_idle, "unit": "bytes"},
    ]
    return rows, {"steps": steps, "latencies_ms": lat}
