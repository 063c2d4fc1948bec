"""Comparison 8: the export to NATS JetStream, on loopback nats-servers this
module starts (one server for R1, a three-server cluster for R3).

- throughput: a journal pre-filled with N events, drained by a real ``cnisup
  start`` (journal + export) into R1 and into R3; the export worker's CPU per
  1,000 events and its RSS;
- lag: a publisher on the workers' own ``Bus`` at 1,000 events/s; an
  ordered JetStream consumer (a thread of this process) takes each event's
  arrival minus its ``ts``: bus -> export (live) -> stream -> consumer by
  default, and with ``export.nats.live: false`` bus -> journal commit (0.2 s
  batches) -> export -> stream -> consumer;
- catch-up (not in quick mode), the same publisher at 1,000 events/s
  meanwhile: the node cut off from NATS for 60 s (a TCP relay per server
  that this benchmark closes and reopens; the cluster stays up), from the
  moment it is reachable again to the export being back at the live head
  (timed from the stream: the newest event of this node younger than 0.5 s);
  and every server of the R3 cluster down for 60 s, from their restart and
  from the stream accepting writes again (JetStream 2.9 needs seconds to
  elect its leaders).

Goals (issue 12): >= 10,000 events/s into R3; lag p99 < 50 ms at 1,000/s; a
60 s outage at 1,000/s caught up within 10 s."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import pwd
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cnisup.protocol import control, envelope, subjects
from cnisup.protocol.settings import Nats
from cnisup.workers.bus import Bus
from cnisup.workers.journal.store import Store
from tests.export import natsserver

from .common import Instance, cpu_seconds_fine, paced, percentile, world_dir

NAME = "export: journal -> JetStream"
#: The export is "at the live head" when its oldest unsent event is younger than this (seconds).
HEAD_S = 0.5
PAYLOAD = {"family": "config", "worker": "inotify", "code": "bench", "message": "x" * 300}


def _owned_journal_dir(base: Path) -> Path:
    d = base / "journal"
    d.mkdir()
    if os.geteuid() == 0:  # the workers' user writes the journal and the cursor
        try:
            pw = pwd.getpwnam("cnisup")
        except KeyError:
            pw = pwd.getpwnam("nobody")
        os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


def _instance(base: Path, servers: list[str], *, replicas: int, live: bool = True) -> Instance:
    return Instance(base, config={
        "monitors": {"kernel": False, "k8s": False, "config": False},
        "journal": {"enabled": True, "path": str(base / "journal" / "journal.db")},
        "export": {"enabled": True, "nats": {"servers": servers, "replicas": replicas, "max_bytes": "1GiB",
                                             "live": live}}})


def _export(inst: Instance) -> dict[str, Any]:
    """The export's status, asked in process: a ``cnisup status`` process per look would take
    a good part of a core from what is measured."""
    reply = control.request(f"ipc://{inst.base}/run/control.sock", "status", timeout_ms=5000)
    worker: dict[str, Any] = next(w for w in reply["workers"] if w["family"] == "export")
    return worker


def _wait_caught_up(inst: Instance, timeout_s: float, *, least_acked: int = 0) -> float:
    """Seconds until the export is at the head of the journal: its oldest unsent event (if any)
    younger than HEAD_S. With events still arriving, "0 behind" is a matter of luck at the moment
    of the look; being less than a batch interval and a round trip behind is not."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        info = _export(inst).get("info") or {}
        age = info.get("oldest_unsent_age_s")
        if info.get("state") == "connected" and info.get("acked", 0) >= least_acked and (age is None or age < HEAD_S):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise TimeoutError(f"export not caught up within {timeout_s} s: {_export(inst)}")


def _prefill(path: Path, n: int) -> None:
    st = envelope.Stamp("file-poll", "bench", envelope.new_incarnation())
    store = Store(str(path), max_bytes=1 << 40, max_age_s=86400)
    try:
        for i in range(0, n, 2000):
            batch = [st.build("monitor.warning", PAYLOAD) for _ in range(min(2000, n - i))]
            store.write((e, json.dumps(e, separators=(",", ":"))) for e in batch)
    finally:
        store.close()
    for p in path.parent.iterdir():
        if os.geteuid() == 0:
            os.chown(p, path.parent.stat().st_uid, path.parent.stat().st_gid)


class _StreamFill(threading.Thread):
    """Watches the (fresh) stream fill up, asking the server every 20 ms: the rate is
    (messages - those at the first look that saw any) / the time between, independent
    of the worker's own status (refreshed about once a second). API timeouts while an
    R3 stream is created or elects its leader are looked past."""

    def __init__(self, servers: list[str], n: int, timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.servers, self.n, self.timeout_s = servers, n, timeout_s
        self.rate: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.rate = asyncio.run(self._watch())
        except Exception as exc:  # reported by the caller
            self.error = f"{type(exc).__name__}: {exc}"

    async def _watch(self) -> float:
        import nats

        nc = await nats.connect(self.servers, error_cb=_quiet)
        js, t0 = nc.jetstream(), time.monotonic()
        first: tuple[float, int] | None = None
        try:
            while time.monotonic() - t0 < self.timeout_s:
                try:
                    have = (await js.stream_info(Nats().stream)).state.messages
                except nats.js.errors.NotFoundError:
                    have = 0  # not created yet
                except (nats.errors.TimeoutError, nats.js.errors.APIError):
                    await asyncio.sleep(0.02)  # an R3 stream being created or electing its leader
                    continue
                now = time.monotonic()
                if have and first is None:
                    first = (now, have)
                if first is not None and have >= self.n:
                    # All of them at the first look (a short quick-mode drain): a lower bound,
                    # timed from before the instance started.
                    return (have - first[1]) / (now - first[0]) if have > first[1] else have / (now - t0)
                await asyncio.sleep(0.02)
            raise TimeoutError(f"the stream did not reach {self.n} messages within {self.timeout_s} s")
        finally:
            await nc.close()


def _throughput(servers: list[str], replicas: int, n: int) -> dict[str, Any]:
    base = world_dir("cnisup-bench-export-")
    jdir = _owned_journal_dir(base)
    _prefill(jdir / "journal.db", n)
    inst = _instance(base, servers, replicas=replicas)
    fill = _StreamFill(servers, n, 300)
    fill.start()
    inst.start()
    try:
        worker = inst.wait_running("export")
        cpu0 = cpu_seconds_fine(worker["pid"])
        fill.join()
        if fill.rate is None:
            raise RuntimeError(f"export throughput not measured: {fill.error}")
        _wait_caught_up(inst, 60, least_acked=n)
        cpu = cpu_seconds_fine(worker["pid"]) - cpu0
        w = _export(inst)
        return {"events": n, "seconds": n / fill.rate, "rate": fill.rate, "cpu_ms_per_1000": cpu / n * 1e6,
                "rss": w["rss_bytes"], "duplicates": w["info"]["duplicates"]}
    finally:
        inst.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _quiet(exc: Exception) -> None:
    """nats-py's default error callback prints a traceback per failed attempt."""


class _Consumer(threading.Thread):
    """An ordered JetStream consumer: arrival time minus each event's ts."""

    def __init__(self, servers: list[str], subject: str) -> None:
        super().__init__(daemon=True)
        self.servers, self.subject = servers, subject
        self.lag_ms: list[float] = []
        self.ready = threading.Event()
        self.stop = False

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import nats
        from nats.js.api import DeliverPolicy

        nc = await nats.connect(self.servers, error_cb=_quiet)
        sub = await nc.jetstream().subscribe(self.subject, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
        self.ready.set()
        while not self.stop:
            try:
                m = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            env = json.loads(m.data)
            if env["kind"] == "monitor.warning":
                self.lag_ms.append((time.time_ns() - env["ts"]) / 1e6)
        await nc.close()


def _lag(servers: list[str], seconds: float, live: bool) -> dict[str, Any]:
    base = world_dir("cnisup-bench-export-")
    _owned_journal_dir(base)
    inst = _instance(base, servers, replicas=3, live=live)
    inst.start()
    consumer = _Consumer(servers, "cnisup.bench.monitor.>")
    try:
        worker = inst.wait_running("export")
        _wait_caught_up(inst, 60)
        consumer.start()
        consumer.ready.wait(10)
        bus = Bus(inst.bus_endpoint, envelope.Stamp("file-poll", "bench", envelope.new_incarnation()))
        bus.wait_ready(10)
        cpu0 = cpu_seconds_fine(worker["pid"])
        paced(bus, 1000, seconds, PAYLOAD)
        _wait_caught_up(inst, 60)
        cpu = cpu_seconds_fine(worker["pid"]) - cpu0
        time.sleep(0.5)
        bus.close(0)
        lat = consumer.lag_ms
        return {"live": live, "received": len(lat), "p50_ms": percentile(lat, 50),
                "p99_ms": percentile(lat, 99), "max_ms": max(lat) if lat else None,
                "cpu_ms_per_1000": cpu / max(len(lat), 1) * 1e6}
    finally:
        consumer.stop = True
        inst.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _connect(servers: list[str]) -> Any:
    """A nats-py connection, tried every 0.1 s until a server answers (they may be restarting)."""
    import nats

    while True:
        try:
            return await nats.connect(servers, max_reconnect_attempts=1, reconnect_time_wait=0, connect_timeout=1,
                                      error_cb=_quiet)
        except Exception:
            await asyncio.sleep(0.1)


def _writable(servers: list[str], since: float) -> float:
    """Seconds from ``since`` until the stream stores a message again (a probe subject of its own):
    after a full restart JetStream 2.9 answers long before its stream has a leader."""

    async def probe() -> float:
        nc = await _connect(servers)
        try:
            while True:
                try:
                    await nc.jetstream().publish("cnisup.bench-probe.probe", b"{}", timeout=1.0)
                    return time.monotonic() - since
                except Exception:
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    return asyncio.run(probe())


class _Relay:
    """One TCP relay per server, in a thread: the node reaches NATS only through them, so
    ``cut`` takes NATS away from this node alone (listeners and connections closed) while
    the cluster stays up, and ``restore`` gives it back on the same ports."""

    def __init__(self, urls: list[str]) -> None:
        self.targets = [(u.hostname or "127.0.0.1", u.port or 4222) for u in map(urlsplit, urls)]
        self.ports = [_free_port() for _ in self.targets]
        self.loop = asyncio.new_event_loop()
        self.listeners: list[asyncio.Server] = []
        self.writers: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.restore()

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.ports]

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def restore(self) -> None:
        async def listen() -> None:
            for port, target in zip(self.ports, self.targets, strict=True):
                self.listeners.append(await asyncio.start_server(
                    functools.partial(self._relay, target=target), "127.0.0.1", port, reuse_address=True))
        self._call(listen())

    def cut(self) -> None:
        async def close() -> None:
            for listener in self.listeners:
                listener.close()
            self.listeners = []
            for w in list(self.writers):
                w.close()
            self.writers.clear()
        self._call(close())

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     target: tuple[str, int]) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self.writers -= {writer, up_w}

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _at_head(servers: list[str], since: float, timeout_s: float) -> float:
    """Seconds from ``since`` until the newest event of this benchmark's node in the stream is
    younger than HEAD_S: the export is back at the live head. Timed from the stream itself every
    50 ms (the worker's status is refreshed about once a second: too coarse for a 10 s goal)."""
    subject = subjects.subject(Nats().subject_prefix, "bench", "monitor.warning")

    async def watch() -> float:
        nc = await _connect(servers)
        try:
            js = nc.jetstream(timeout=1.0)
            while time.monotonic() - since < timeout_s:
                try:
                    last = await js.get_last_msg(Nats().stream, subject)
                    if time.time_ns() - json.loads(last.data or b"{}")["ts"] < HEAD_S * 1e9:
                        return time.monotonic() - since
                except Exception:  # no leader yet, a timeout: look again
                    pass
                await asyncio.sleep(0.05)
        finally:
            await nc.close()
        raise TimeoutError(f"not back at the live head within {timeout_s} s")

    return asyncio.run(watch())


def _catch_up(cluster: natsserver.Cluster, outage_s: float, *, whole_cluster: bool) -> dict[str, Any]:
    """At 1,000 events/s: NATS away for ``outage_s`` (the node cut off, or every server
    stopped), then the seconds until the export is back at the live head."""
    base = world_dir("cnisup-bench-export-")
    _owned_journal_dir(base)
    relay = None if whole_cluster else _Relay(cluster.urls)
    inst = _instance(base, cluster.urls if relay is None else relay.urls, replicas=3)
    inst.start()
    try:
        inst.wait_running("export")
        _wait_caught_up(inst, 60)
        bus = Bus(inst.bus_endpoint, envelope.Stamp("file-poll", "bench", envelope.new_incarnation()))
        bus.wait_ready(10)
        stop = threading.Event()

        def publish() -> None:
            while not stop.is_set():
                paced(bus, 1000, 1.0, PAYLOAD)

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        time.sleep(2)
        cluster.stop() if relay is None else relay.cut()
        time.sleep(outage_s)
        behind = _export(inst)["info"]["behind"]
        back = time.monotonic()
        cluster.start() if relay is None else relay.restore()
        writable_s = _writable(cluster.urls, back) if relay is None else 0.0
        caught_up_s = _at_head(cluster.urls, back, 300)
        stop.set()
        publisher.join()
        bus.close(0)
        return {"outage_s": outage_s, "behind_at_restart": behind, "stream_leader_s": writable_s,
                "caught_up_s": caught_up_s, "after_leader_s": caught_up_s - writable_s}
    finally:
        inst.stop()
        if relay is not None:
            relay.close()
        shutil.rmtree(base, ignore_errors=True)


def run(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if not natsserver.available():
        return [{"name": NAME, "metric": "skipped: nats-server is not installed", "primary": None,
                 "fallback": None, "ratio": None, "unit": "-"}], {}
    base = world_dir("cnisup-bench-nats-")
    n = 2_000 if quick else 60_000
    details: dict[str, Any] = {}
    try:
        single = natsserver.single(base / "r1")
        try:
            details["r1"] = _throughput([single.url], 1, n)
        finally:
            single.kill()
        cluster = natsserver.Cluster(base / "r3").start()
        try:
            cluster.wait_ready()
            details["r3"] = _throughput(cluster.urls, 3, n)
            # Quick mode: the code path, with the default (live) only.
            details["lag"] = [_lag(cluster.urls, 2 if quick else 30, live) for live in ((True,) if quick
                                                                                       else (True, False))]
            # Quick mode skips them: 60 s each, and a full restart of R3 alone takes 4-24 s before
            # the stream takes writes.
            details["catch_up_cut"] = None if quick else _catch_up(cluster, 60, whole_cluster=False)
            details["catch_up"] = None if quick else _catch_up(cluster, 60, whole_cluster=True)
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    r1, r3, lag, cu = details["r1"], details["r3"], details["lag"], details["catch_up"]

    def one(metric: str, value: Any, unit: str, note: str | None = None) -> dict[str, Any]:
        return {"name": NAME, "metric": metric, "primary": value, "fallback": None, "ratio": None, "unit": unit,
                "note": note}

    rows = [
        one("throughput into R1 (drain of a full journal)", r1["rate"], "events/s"),
        one("throughput into R3 (goal >= 10,000)", r3["rate"], "events/s",
            "3 servers, the worker and this benchmark share 2 cores"),
        one("export worker CPU per 1,000 events (R3 drain)", r3["cpu_ms_per_1000"], "ms"),
        one("export worker RSS", r3["rss"], "bytes"),
    ]
    for lg in lag:
        label = "live: the default" if lg["live"] else "live: false, from the journal's 0.2 s commits"
        rows += [one(f"lag bus -> JetStream consumer at 1,000/s, p50 ({label})", lg["p50_ms"], "ms"),
                 one(f"lag bus -> JetStream consumer at 1,000/s, p99 ({label}; goal < 50)", lg["p99_ms"], "ms"),
                 one(f"export worker CPU per 1,000 events at 1,000/s ({label})", lg["cpu_ms_per_1000"], "ms")]
    cut = details["catch_up_cut"]
    if cu is None or cut is None:
        rows.append(one("catch-up after a 60 s outage: not run in quick mode", None, "s"))
    else:
        rows += [
            one(f"catch-up after the node was cut off from NATS for {cut['outage_s']:g} s at 1,000/s, from its "
                "return (goal 10 s)", cut["caught_up_s"], "s", f"{cut['behind_at_restart']} behind at its return"),
            one(f"catch-up after a {cu['outage_s']:g} s outage of all R3 servers at 1,000/s, from their restart "
                "(goal 10 s)", cu["caught_up_s"], "s",
                f"{cu['behind_at_restart']} behind; the stream took writes again after {cu['stream_leader_s']:.1f} s"),
            one("... of which after the stream accepted writes again", cu["after_leader_s"], "s"),
        ]
    return rows, details
