"""Comparison 7: the journal. A publisher built on the workers' own ``Bus``
drives a real ``cnisup start`` (journal family on) at stepped rates up to one
Python publisher's limit; what the journal stored is counted in its file.
Then a journal of one million events (a node's realistic mix: pods' CNI runs
with their links and addresses, pod IPs, config changes) answers ``explain
pod`` and ``history --pod``: latency in process (query + story) and through
the command line."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

from cnisup.protocol import envelope
from cnisup.supervisor import explain
from cnisup.supervisor.history import Filters, Journal
from cnisup.workers.bus import Bus
from cnisup.workers.journal.store import Store

from .common import CNISUP, Instance, cpu_seconds_fine, paced, percentile, rss_bytes, world_dir

PAYLOAD = {"family": "config", "worker": "inotify", "code": "bench", "message": "x" * 300}


def _stored(db: Path, incarnation: str) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(con.execute("SELECT count(*) FROM events WHERE incarnation = ?", (incarnation,)).fetchone()[0])
    finally:
        con.close()


#: Seconds without a new stored event after which what is missing is lost (the journal
#: commits every 0.2 s while it has events).
SETTLED_S = 2.0


def _wait_stored(db: Path, incarnation: str, want: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    got, grew_at = 0, time.monotonic()
    while time.monotonic() < deadline:
        now_got = _stored(db, incarnation)
        if now_got >= want:
            return now_got
        if now_got > got:
            got, grew_at = now_got, time.monotonic()
        elif time.monotonic() - grew_at > SETTLED_S:
            break  # the rest was lost (and recorded as journal.loss)
        time.sleep(0.2)
    return got


def _writer(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    base = world_dir("cnisup-bench-journal-")
    jdir = base / "journal"
    jdir.mkdir()
    if os.geteuid() == 0:  # the workers' user writes it
        nobody = pwd.getpwnam("cnisup" if _exists("cnisup") else "nobody")
        os.chown(jdir, nobody.pw_uid, nobody.pw_gid)
    db = jdir / "journal.db"
    inst = Instance(base, config={"monitors": {"kernel": False, "k8s": False, "config": False},
                                  "journal": {"enabled": True, "path": str(db)}})
    inst.start()
    steps: list[dict[str, Any]] = []
    try:
        worker = inst.wait_running("journal")
        pid = worker["pid"]
        bus = Bus(inst.bus_endpoint, envelope.Stamp("file-poll", "bench", envelope.new_incarnation()))
        bus.wait_ready(10)
        inc = bus.stamp.incarnation
        published = 0
        seconds = 0.5 if quick else 6.0
        for rate in (2_000, 5_000, 10_000, 20_000, 40_000, 80_000):
            cpu0 = cpu_seconds_fine(pid)
            n, achieved = paced(bus, rate, seconds, PAYLOAD)
            published += n
            stored = _wait_stored(db, inc, published, 20)
            cpu = cpu_seconds_fine(pid) - cpu0
            steps.append({"rate": rate, "achieved": achieved, "published": n, "stored_total": stored,
                          "lost_total": published - stored - bus.dropped, "worker_cpu_s": cpu,
                          "cpu_ms_per_1000": cpu / n * 1e6 if n else None})
            if published - stored or achieved < rate * 0.8:
                break
        rss = rss_bytes(pid)
        bus.close(0)
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        rows = int(con.execute("SELECT count(*) FROM events").fetchone()[0])
        con.close()
        size = sum(p.stat().st_size for p in jdir.iterdir() if p.name.startswith("journal.db"))
    finally:
        inst.stop()
        shutil.rmtree(base, ignore_errors=True)
    clean = [s for s in steps if s["lost_total"] == 0]
    best = max((s["achieved"] for s in clean), default=None)
    name = "journal: bus -> SQLite"
    cpu_1k = [s["cpu_ms_per_1000"] for s in clean if s["cpu_ms_per_1000"]]
    return [
        {"name": name, "metric": "sustained write rate with zero loss", "primary": best, "fallback": None,
         "ratio": None, "unit": "events/s",
         "note": "bounded by one Python publisher" if clean and clean[-1] is steps[-1] else None},
        {"name": name, "metric": "journal worker CPU per 1,000 events", "primary": min(cpu_1k) if cpu_1k else None,
         "fallback": None, "ratio": None, "unit": "ms"},
        {"name": name, "metric": "journal worker RSS after the run", "primary": rss, "fallback": None,
         "ratio": None, "unit": "bytes"},
        {"name": name, "metric": "bytes per event on disk (~430-byte envelopes)", "primary": size / max(rows, 1),
         "fallback": None, "ratio": None, "unit": "bytes"},
    ], {"steps": steps}


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def synthetic(db: Path, events: int, *, pods: int) -> dict[str, Any]:
    """A realistic million: per pod an ADD chain (bridge + its host-local run,
    with a veth, an address and a few link changes each), k8s IP events, a DEL
    for half of them; config changes now and then."""
    store = Store(str(db), max_bytes=1 << 40, max_age_s=365 * 86400)
    rnd = random.Random(7)
    ebpf = envelope.Stamp("ebpf", "node-a", envelope.new_incarnation())
    k8s = envelope.Stamp("k8s-informer", "node-a", envelope.new_incarnation())
    cfg = envelope.Stamp("inotify", "node-a", envelope.new_incarnation())
    t = time.time_ns() - 86400 * 10**9
    batch: list[tuple[dict[str, Any], str]] = []
    written = 0
    names: list[str] = []

    def put(env: dict[str, Any]) -> None:
        batch.append((env, envelope.encode(env)[1].decode()))

    p = 0
    while written + len(batch) < events:
        name = f"app-{p % pods}-{p // pods}"
        names.append(name)
        cid = f"{rnd.getrandbits(128):032x}{rnd.getrandbits(128):032x}"
        args = {"K8S_POD_NAMESPACE": f"ns{p % 40}", "K8S_POD_NAME": name, "K8S_POD_UID": f"uid-{p}"}
        ip = f"10.{(p >> 16) & 255}.{(p >> 8) & 255}.{p & 255}"
        for command in ("ADD", "DEL") if p % 2 else ("ADD",):
            t += 1_000_000
            run = f"{1000 + p}-{t}"
            common = {"run_id": run, "pid": 1000 + p, "plugin": "bridge", "path": "/usr/lib/cni/bridge",
                      "command": command, "container_id": cid, "netns": f"/var/run/netns/cni-{p}", "ifname": "eth0",
                      "cni_args": args, "network": "mynet", "cni_version": "1.0.0", "type": "bridge"}
            put(ebpf.build("cni.plugin.started", common, t))
            for i in range(8 if command == "ADD" else 3):
                kind = ("link.created", "link.changed", "addr.added")[i % 3]
                put(ebpf.build(kind, {"ifindex": 100 + i, "name": "eth0", "kind": "veth", "peer": f"veth{p:x}",
                                      "address": ip if kind == "addr.added" else None, "prefixlen": 24,
                                      "family": "inet", "pid": 1000 + p, "comm": "bridge", "run_id": run,
                                      "plugin": "bridge", "container_id": cid}, t + i))
            ipam = {**common, "run_id": f"{2000 + p}-{t}", "plugin": "host-local", "parent_run": run,
                    "exit_code": 0, "duration_ms": 3.1}
            if command == "ADD":
                ipam["result"] = {"cni_version": "1.0.0", "ips": [{"address": f"{ip}/16", "gateway": "10.0.0.1"}]}
            put(ebpf.build("cni.plugin.finished", ipam, t + 20))
            done = {**common, "exit_code": 0, "duration_ms": 21.4}
            if command == "ADD":
                done["result"] = {"cni_version": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": common["netns"]}],
                                  "ips": [{"address": f"{ip}/16", "gateway": "10.0.0.1", "interface": 0}]}
            put(ebpf.build("cni.plugin.finished", done, t + 25))
            pod = {"namespace": args["K8S_POD_NAMESPACE"], "name": name, "uid": args["K8S_POD_UID"], "node": "node-a",
                   "ips": [ip], "host_network": False}
            put(k8s.build("k8s.pod.ip_allocated" if command == "ADD" else "k8s.pod.ip_released",
                          pod if command == "ADD" else {**pod, "reason": "deleted"}, t + 40))
        if p % 500 == 0:
            put(cfg.build("cni.config.modified", {"path": "/etc/cni/net.d/10-bridge.conflist", "dir": "/etc/cni/net.d",
                                                  "valid": True, "network": "mynet", "sha256": "0" * 64}, t + 50))
        p += 1
        if len(batch) >= 20_000:
            written += store.write(batch)
            batch = []
    written += store.write(batch)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return {"events": written, "pods": p, "names": names}


def _queries(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    base = world_dir("cnisup-bench-journal-q-")
    db = base / "journal.db"
    n = 20_000 if quick else 1_000_000
    try:
        t0 = time.monotonic()
        made = synthetic(db, n, pods=2_000 if quick else 20_000)
        build_s = time.monotonic() - t0
        rnd = random.Random(11)
        sample = rnd.sample(made["names"], 30 if quick else 100)
        ns_of = {name: f"ns{i % 40}" for i, name in enumerate(made["names"])}
        explain_ms, history_ms = [], []
        with Journal([str(db)]) as j:
            for name in sample:
                t = time.perf_counter()
                story = explain.explain_pod(j, ns_of[name], name)
                explain_ms.append((time.perf_counter() - t) * 1000)
                assert story.attempts, name
                t = time.perf_counter()
                rows = j.query(Filters(pod=(ns_of[name], name)))
                history_ms.append((time.perf_counter() - t) * 1000)
                assert rows
        cli_ms = []
        for name in sample[:3 if quick else 10]:  # an interpreter start each
            t = time.perf_counter()
            subprocess.run([CNISUP, "explain", "pod", f"{ns_of[name]}/{name}", "--journal", str(db)],
                           capture_output=True, check=True)
            cli_ms.append((time.perf_counter() - t) * 1000)
        size = db.stat().st_size
    finally:
        shutil.rmtree(base, ignore_errors=True)
    name = f"journal: queries on {made['events']:,} events"
    return [
        {"name": name, "metric": "explain pod, in process, p50", "primary": percentile(explain_ms, 50),
         "fallback": None, "ratio": None, "unit": "ms"},
        {"name": name, "metric": "explain pod, in process, p99", "primary": percentile(explain_ms, 99),
         "fallback": None, "ratio": None, "unit": "ms"},
        {"name": name, "metric": "history --pod, in process, p50", "primary": percentile(history_ms, 50),
         "fallback": None, "ratio": None, "unit": "ms"},
        {"name": name, "metric": "cnisup explain pod (command, with interpreter start), p50",
         "primary": percentile(cli_ms, 50), "fallback": None, "ratio": None, "unit": "ms"},
        {"name": name, "metric": "file size", "primary": size, "fallback": None, "ratio": None, "unit": "bytes"},
        {"name": name, "metric": "bytes per event on disk (realistic mix)", "primary": size / made["events"],
         "fallback": None, "ratio": None, "unit": "bytes"},
    ], {"explain_ms": explain_ms, "history_ms": history_ms, "cli_ms": cli_ms, "build_s": build_s}


def run(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows_w, details_w = _writer(quick)
    rows_q, details_q = _queries(quick)
    return rows_w + rows_q, {"writer": details_w, "queries": details_q}
