"""The journal file itself: real SQLite files, the writer's store and the
readers' queries, no processes."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from cnisup.protocol import envelope
from cnisup.supervisor.history import Filters, Journal, JournalError, Match, parse_time
from cnisup.workers.journal.schema import keys
from cnisup.workers.journal.store import Store

DAY_NS = 86400 * 10**9


def stamp(source: str = "ebpf") -> envelope.Stamp:
    return envelope.Stamp(source, "node-a", envelope.new_incarnation())


def text(env: dict[str, Any]) -> str:
    return envelope.encode(env)[1].decode()


def plugin(st: envelope.Stamp, *, ts: int, command: str = "ADD", pod: str = "web-0", ns: str = "default",
           container: str = "c0ffee", ip: str | None = None, error: dict[str, Any] | None = None,
           code: int = 0, plugin_name: str = "bridge", parent: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "run_id": f"{100 + st.seq}-{ts}", "pid": 100 + st.seq, "plugin": plugin_name,
        "path": f"/usr/lib/cni/{plugin_name}", "command": command, "container_id": container,
        "netns": "/var/run/netns/x", "ifname": "eth0",
        "cni_args": {"K8S_POD_NAMESPACE": ns, "K8S_POD_NAME": pod, "K8S_POD_UID": f"uid-{pod}"},
        "network": "mynet", "exit_code": code, "duration_ms": 12.5}
    if ip:
        data["result"] = {"cni_version": "1.0.0", "ips": [{"address": f"{ip}/24", "gateway": "10.22.0.1"}]}
    if error:
        data["error"] = error
    if parent:
        data["parent_run"] = parent
    return st.build("cni.plugin.finished", data, ts)


def write(store: Store, envs: list[dict[str, Any]]) -> int:
    return store.write([(e, text(e)) for e in envs])


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


def test_write_then_read_back_exactly_as_published(db: Path) -> None:
    store = Store(str(db), max_bytes=1 << 30, max_age_s=7 * 86400)
    st = stamp()
    now = time.time_ns()
    envs = [plugin(st, ts=now + i, ip=f"10.22.0.{i + 2}", pod=f"web-{i}", container=f"c{i}") for i in range(5)]
    assert write(store, envs) == 5
    assert write(store, envs[:2]) == 0  # the same incarnation+seq twice is one event
    assert store.last_seqs() == {st.incarnation: 5}
    store.close()
    assert oct(db.stat().st_mode & 0o777) == oct(0o640)
    with Journal([str(db)]) as j:
        rows = j.query(Filters())
        assert [json.loads(r.text) for r in rows] == envs
        assert [r.text for r in rows] == [text(e) for e in envs]
        assert len(j.query(Filters(pod=("default", "web-3")))) == 1
        assert [r.envelope["data"]["pod"] if "pod" in r.envelope["data"] else r.envelope["seq"]
                for r in j.query(Filters(ip="10.22.0.4"))] == [3]
        assert len(j.query(Filters(container="c"))) == 5 and len(j.query(Filters(container="c2"))) == 1
        assert [r.envelope["seq"] for r in j.query(Filters(limit=2))] == [4, 5]
        assert j.query(Filters(kinds=["cni.config."])) == []
        assert len(j.query(Filters(kinds=["cni.plugin"]))) == 5


def test_a_kind_prefix_is_whole_tokens_in_sql_and_in_match(db: Path) -> None:
    store = Store(str(db), max_bytes=1 << 30, max_age_s=7 * 86400)
    st, now = stamp(), time.time_ns()
    binary = st.build("cni.plugin_binary.created", {"path": "/opt/cni/bin/bridge", "dir": "/opt/cni/bin",
                                                    "name": "bridge"}, now + 9)
    envs = [plugin(st, ts=now), binary]
    write(store, envs)
    store.close()
    with Journal([str(db)]) as j:
        for prefix, want in (("cni.plugin", ["cni.plugin.finished"]), ("cni.plugin.", ["cni.plugin.finished"]),
                             ("cni.plugin_binary", ["cni.plugin_binary.created"]), ("cni.plug", []),
                             ("cni", ["cni.plugin.finished", "cni.plugin_binary.created"]),
                             ("cni.plugin.finished", ["cni.plugin.finished"])):
            f = Filters(kinds=[prefix])
            assert [r.envelope["kind"] for r in j.query(f)] == want, prefix
            assert [e["kind"] for e in envs if Match(f)(e)] == want, prefix


def test_failed_and_pod_container_links(db: Path) -> None:
    store = Store(str(db), max_bytes=1 << 30, max_age_s=7 * 86400)
    st, now = stamp(), time.time_ns()
    ok = plugin(st, ts=now, ip="10.22.0.2")
    bad = plugin(st, ts=now + 1, pod="web-1", container="dead", code=1,
                 error={"code": 999, "msg": "no IP addresses available in range set: 10.22.0.2-10.22.0.3"})
    # a link event of web-0's container carries no pod keys, only its container
    link = st.build("link.created", {"ifindex": 7, "name": "eth0", "kind": "veth", "container_id": "c0ffee",
                                     "run_id": ok["data"]["run_id"]}, now + 2)
    write(store, [ok, bad, link])
    store.close()
    with Journal([str(db)]) as j:
        assert [r.envelope["data"]["pod"] if False else r.envelope["seq"] for r in j.query(Filters(failed=True))] == [2]
        assert [r.envelope["seq"] for r in j.query(Filters(pod=("default", "web-0")))] == [1, 3]
    assert keys(bad).failed and not keys(ok).failed and keys(ok).ips == {"10.22.0.2"}


def test_retention_by_age(db: Path) -> None:
    store = Store(str(db), max_bytes=1 << 30, max_age_s=3600)
    st, now = stamp(), time.time_ns()
    old = [plugin(st, ts=now - DAY_NS + i) for i in range(3000)]
    new = [plugin(st, ts=now + i) for i in range(10)]
    write(store, old + new)
    trimmed = store.trim()
    assert trimmed.by_age == 3000 and trimmed.by_size == 0 and store.count() == 10
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert store.db.execute("SELECT count(*) FROM event_ips").fetchone()[0] == 0


def test_retention_by_size_keeps_the_file_under_the_cap(db: Path) -> None:
    cap = 2 << 20
    store = Store(str(db), max_bytes=cap, max_age_s=7 * 86400)
    st, now = stamp(), time.time_ns()
    for batch in range(20):
        write(store, [plugin(st, ts=now + batch * 1000 + i, ip="10.22.0.9", pod=f"p{i}") for i in range(500)])
        store.trim()
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert store.used_bytes() <= cap
    assert os.stat(db).st_size <= cap * 1.1  # freed pages were given back (incremental vacuum)
    kept = store.count()
    assert 0 < kept < 10_000
    newest = store.db.execute("SELECT max(seq) FROM events").fetchone()[0]
    oldest = store.db.execute("SELECT min(seq) FROM events").fetchone()[0]
    assert newest == 10_000 and newest - oldest + 1 == kept  # the oldest went first
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_readers_refuse_what_is_not_a_journal(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="no journal"):
        Journal([str(tmp_path / "missing.db")])
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(JournalError):
        Journal([str(other)])
    (tmp_path / "junk.db").write_bytes(b"not sqlite" * 100)
    with pytest.raises(JournalError):
        Journal([str(tmp_path / "junk.db")])


def test_two_files_are_read_as_one_in_time_order(tmp_path: Path) -> None:
    a, b = Store(str(tmp_path / "a.db"), max_bytes=1 << 30, max_age_s=1e6), \
        Store(str(tmp_path / "b.db"), max_bytes=1 << 30, max_age_s=1e6)
    st, now = stamp(), time.time_ns()
    envs = [plugin(st, ts=now + i) for i in range(6)]
    write(a, envs[0::2])
    write(b, envs[1::2])
    with Journal([str(tmp_path / "a.db"), str(tmp_path / "b.db")]) as j:
        assert [r.envelope["seq"] for r in j.query(Filters())] == [1, 2, 3, 4, 5, 6]
        assert [r.envelope["seq"] for r in j.query(Filters(limit=3))] == [4, 5, 6]


def test_times_operators_type() -> None:
    now = 1_800_000_000.0
    assert parse_time("-10m", now=now) == int((now - 600) * 1e9)
    assert parse_time("2h", now=now) == int((now - 7200) * 1e9)
    assert parse_time("2026-12-01T03:12:00Z") == int(1796094720 * 1e9)
    assert parse_time("2026-12-01T03:12:00+01:00") == int((1796094720 - 3600) * 1e9)
    clock = parse_time("03:12", now=now)
    assert time.strftime("%H:%M", time.localtime(clock / 1e9)) == "03:12"
    for bad in ("yesterday", "25:00", "-10 parsecs", ""):
        with pytest.raises(ValueError):
            parse_time(bad, now=now)


def test_live_matching_follows_a_pods_containers() -> None:
    st, now = stamp(), time.time_ns()
    m = Match(Filters(pod=("default", "web-0")))
    ok = plugin(st, ts=now)
    link = st.build("link.created", {"ifindex": 7, "container_id": "c0ffee"}, now + 1)
    other = st.build("link.created", {"ifindex": 8, "container_id": "other"}, now + 2)
    assert [m(e) for e in (ok, link, other)] == [True, True, False]
