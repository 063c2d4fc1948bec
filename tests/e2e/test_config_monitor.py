"""The config family end to end: ``cnisup start`` with the inotify worker and
with the file-poll fallback, an independent raw SUB socket, real files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import Cnisup, Events

CONFLIST = {"cniVersion": "1.0.0", "name": "podnet",
            "plugins": [{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
                        {"type": "portmap", "capabilities": {"portMappings": True}}]}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["inotify", "file-poll"])
def monitor(request: pytest.FixtureRequest, base: Path) -> Iterator[tuple[Cnisup, Events]]:
    worker = request.param
    # Something on disk before start, to be "discovered".
    c = Cnisup(base, use_inotify=worker == "inotify")
    (c.conf_dir / "50-old.conflist").write_text(json.dumps(CONFLIST))
    (c.bin_dir / "bridge").write_bytes(b"\x7fELF fake bridge")
    (c.bin_dir / "bridge").chmod(0o755)
    ev = c.subscribe()
    c.start()
    ev.wait("supervisor.worker.ready", worker=worker)
    c.wait_worker(worker=worker, state="running")
    ev.worker = worker  # type: ignore[attr-defined]
    try:
        yield c, ev
    finally:
        assert c.stop() == 0


def only(ev: Events, kind: str, quiet_s: float = 1.0) -> list[dict[str, Any]]:
    return [e for e in ev.drain(quiet_s) if e["kind"] == kind]


def test_discovered_created_modified_deleted(monitor: tuple[Cnisup, Events]) -> None:
    c, ev = monitor
    old = c.conf_dir / "50-old.conflist"
    d = ev.wait("cni.config.discovered", path=str(old))
    assert d["source"] == ev.worker  # type: ignore[attr-defined]
    assert d["data"]["network"] == "podnet" and d["data"]["plugins"] == ["bridge", "portmap"]
    assert d["data"]["cni_version"] == "1.0.0" and d["data"]["valid"] is True
    assert d["data"]["sha256"] == sha(old.read_bytes()) and d["data"]["size"] == old.stat().st_size
    # Files held until they are quiet are reported by due time, ties by path: the binary may come first.
    b = ev.received_or_wait("cni.plugin_binary.discovered", name="bridge")
    assert b["data"]["sha256"] == sha(b"\x7fELF fake bridge") and b["data"]["executable"] is True
    act = ev.wait("cni.config.active_changed")
    assert act["data"] == {**act["data"], "path": str(old), "previous": None, "initial": True}

    new = c.conf_dir / "20-new.conf"
    body = json.dumps({"cniVersion": "0.4.0", "name": "single", "type": "ptp"}).encode()
    t0 = time.monotonic()
    new.write_bytes(body)
    created = ev.wait("cni.config.created", path=str(new))
    latency_ms = (time.monotonic() - t0) * 1000
    assert created["data"]["plugins"] == ["ptp"] and created["data"]["sha256"] == sha(body)
    if ev.worker == "inotify":  # type: ignore[attr-defined]
        assert latency_ms < 1000, f"inotify took {latency_ms:.0f} ms"
    act = ev.wait("cni.config.active_changed", path=str(new))
    assert act["data"]["previous"] == str(old) and act["data"]["initial"] is False

    body2 = json.dumps({"cniVersion": "0.4.0", "name": "single2", "type": "ptp"}).encode()
    new.write_bytes(body2)
    mod = ev.wait("cni.config.modified", path=str(new))
    assert mod["data"]["previous_sha256"] == sha(body) and mod["data"]["sha256"] == sha(body2)
    assert mod["data"]["network"] == "single2"

    new.unlink()
    gone = ev.wait("cni.config.deleted", path=str(new))
    assert gone["data"]["previous_sha256"] == sha(body2)
    act = ev.wait("cni.config.active_changed", path=str(old))
    assert act["data"]["previous"] == str(new)


def test_touch_and_identical_rewrite_emit_nothing(monitor: tuple[Cnisup, Events]) -> None:
    c, ev = monitor
    old = c.conf_dir / "50-old.conflist"
    ev.wait("cni.config.active_changed")
    content = old.read_bytes()
    os.utime(old)
    old.write_bytes(content)
    tmp = c.conf_dir / ".tmp-rewrite"
    tmp.write_bytes(content)
    os.rename(tmp, old)  # atomic replace with the same bytes
    os.utime(c.bin_dir / "bridge")
    quiet = [e for e in ev.drain(2.0) if e["kind"].startswith("cni.")]
    assert quiet == []


def test_atomic_replace_is_one_modified(monitor: tuple[Cnisup, Events]) -> None:
    c, ev = monitor
    old = c.conf_dir / "50-old.conflist"
    ev.wait("cni.config.active_changed")
    body = json.dumps({**CONFLIST, "name": "replaced"}).encode()
    tmp = c.conf_dir / "50-old.conflist.tmp"  # as CNI installers do
    tmp.write_bytes(body)
    os.rename(tmp, old)
    mod = ev.wait("cni.config.modified", path=str(old))
    assert mod["data"]["sha256"] == sha(body) and mod["data"]["network"] == "replaced"
    rest = [e for e in ev.drain(1.5) if e["kind"].startswith("cni.config.")]
    assert rest == [], rest  # no deleted/created noise, no second modified
    # A matching temp name renamed over the target: still one modified.
    body2 = json.dumps({**CONFLIST, "name": "replaced2"}).encode()
    tmp2 = c.conf_dir / "tmp-9f3a.conflist"
    tmp2.write_bytes(body2)
    os.rename(tmp2, old)
    mod = ev.wait("cni.config.modified", path=str(old))
    assert mod["data"]["network"] == "replaced2"
    rest = [e for e in ev.drain(1.5) if e["kind"].startswith("cni.config.")]
    assert not [e for e in rest if e["data"].get("path") in (str(old), str(tmp2))], rest


def test_half_written_file_is_reported_with_final_content(monitor: tuple[Cnisup, Events]) -> None:
    c, ev = monitor
    ev.wait("cni.config.active_changed")
    target = c.conf_dir / "30-slow.conflist"
    body = json.dumps({**CONFLIST, "name": "slow"}).encode()
    with open(target, "wb") as f:
        f.write(body[: len(body) // 2])
        f.flush()
        time.sleep(0.5)
        f.write(body[len(body) // 2:])
    events = [e for e in ev.drain(2.5) if e["kind"] in ("cni.config.created", "cni.config.modified")
              and e["data"]["path"] == str(target)]
    assert events, "the file was never reported"
    assert events[-1]["data"]["sha256"] == sha(body) and events[-1]["data"]["valid"] is True
    if ev.worker == "inotify":  # type: ignore[attr-defined]
        assert len(events) == 1 and events[0]["kind"] == "cni.config.created"


def test_active_config_follows_libcni_order(monitor: tuple[Cnisup, Events]) -> None:
    c, ev = monitor
    old = c.conf_dir / "50-old.conflist"
    ev.wait("cni.config.active_changed", path=str(old))
    early = c.conf_dir / "10-early.conflist"
    early.write_text("{ not json")  # invalid: not active
    ev.wait("cni.config.created", path=str(early), valid=False)
    assert not only(ev, "cni.config.active_changed", 1.0)
    early.write_text(json.dumps({**CONFLIST, "name": "early"}))
    act = ev.wait("cni.config.active_changed", path=str(early))
    assert act["data"]["previous"] == str(old) and act["data"]["network"] == "early"
    # A file in the second conf dir never becomes active.
    c.conf_dir2.mkdir()
    (c.conf_dir2 / "00-first.conflist").write_text(json.dumps(CONFLIST))
    ev.wait("cni.config.created", path=str(c.conf_dir2 / "00-first.conflist"))
    assert not only(ev, "cni.config.active_changed", 1.0)


def test_conf_dir_created_later_and_recreated(monitor: tuple[Cnisup, Events]) -> None:
    c, ev = monitor
    ev.wait("cni.config.active_changed")
    deep = c.conf_dir2 / "x.conf"  # conf_dir2 does not exist at start
    c.conf_dir2.mkdir()
    deep.write_text('{"name":"late","type":"macvlan"}')
    ev.wait("cni.config.created", path=str(deep))
    old = c.conf_dir / "50-old.conflist"
    shutil.rmtree(c.conf_dir)
    ev.wait("cni.config.deleted", path=str(old))
    ev.wait("cni.config.active_changed", path=None)
    c.conf_dir.mkdir()
    again = c.conf_dir / "05-again.conflist"
    again.write_text(json.dumps(CONFLIST))
    ev.wait("cni.config.created", path=str(again))
    ev.wait("cni.config.active_changed", path=str(again))


def test_plugin_binaries(monitor: tuple[Cnisup, Events]) -> None:
    c, ev = monitor
    ev.wait("cni.plugin_binary.discovered", name="bridge")
    ptp = c.bin_dir / "ptp"
    shutil.copyfile("/bin/true", ptp)
    ptp.chmod(0o755)
    created = ev.wait("cni.plugin_binary.created", name="ptp")
    assert created["data"]["sha256"] == sha(Path("/bin/true").read_bytes())
    tmp = c.bin_dir / ".ptp.new"
    tmp.write_bytes(b"new build")
    tmp.chmod(0o755)
    os.rename(tmp, ptp)
    mod = ev.wait("cni.plugin_binary.modified", name="ptp")
    assert mod["data"]["sha256"] == sha(b"new build")
    ptp.unlink()
    ev.wait("cni.plugin_binary.deleted", name="ptp")


def test_bad_input_is_reported_and_the_worker_survives(monitor: tuple[Cnisup, Events]) -> None:
    c, ev = monitor
    ev.wait("cni.config.active_changed")
    pid = c.worker()["pid"]
    cases = {
        "a-invalid.conf": b'{"name": "x", "type": ',
        "b-garbage.conflist": os.urandom(4096),
        "c-noplugins.conflist": b'{"name": "x", "plugins": []}',
        "d-list.json": b"[1, 2, 3]",
    }
    for name, data in cases.items():
        (c.conf_dir / name).write_bytes(data)
    big = c.conf_dir / "e-huge.conf"
    with open(big, "wb") as f:
        f.truncate(100 * 1024 * 1024)  # 100 MB, sparse
    loop = c.conf_dir / "f-loop.conf"
    os.symlink(loop.name, loop)
    dangling = c.conf_dir / "g-dangling.conf"
    os.symlink("/nonexistent/cni.conf", dangling)
    fifo = c.conf_dir / "h-fifo.conf"
    os.mkfifo(fifo)
    want = {str(c.conf_dir / n) for n in cases} | {str(p) for p in (big, loop, dangling, fifo)}
    got: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 15
    while set(got) != want and time.monotonic() < deadline:
        for e in ev.drain(0.5):  # in whatever order the worker saw them
            if e["kind"] == "cni.config.created":
                got[e["data"]["path"]] = e["data"]
    assert set(got) == want
    for path, reported in got.items():
        assert reported["valid"] is False and reported["error"], (path, reported)
    huge = got[str(big)]
    assert "too large" in huge["error"] and "sha256" not in huge and huge["size"] == 100 * 1024 * 1024
    assert "loop" in got[str(loop)]["error"].lower() or "symbolic" in got[str(loop)]["error"].lower()
    w = c.worker()
    assert w["pid"] == pid and w["state"] == "running" and w["restarts"] == 0
    (c.conf_dir / "z-fine.conf").write_text('{"name":"fine","type":"bridge"}')
    ev.wait("cni.config.created", path=str(c.conf_dir / "z-fine.conf"), valid=True)


@pytest.mark.root
def test_unreadable_file_is_reported(monitor: tuple[Cnisup, Events]) -> None:
    c, ev = monitor
    ev.wait("cni.config.active_changed")
    secret = c.conf_dir / "00-secret.conflist"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)  # root-only; workers run as nobody
    os.write(fd, json.dumps(CONFLIST).encode())
    os.close(fd)
    e = ev.wait("cni.config.created", path=str(secret))
    assert e["data"]["valid"] is False and "ermission" in e["data"]["error"]
    assert "sha256" not in e["data"]
