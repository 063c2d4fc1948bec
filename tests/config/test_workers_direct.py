"""The config family's two workers, each run as a real process by the harness
(no supervisor): the same scenarios, the same expected events, for both.

Absence of an event is shown with a barrier: after the action, a new file is
created in the same dir and its event awaited; a worker handles one dir in
order, so an event for the action would have come first.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import WorkerRun

from cnisup.workers.privileges import Identity

WORKERS = ("inotify", "file-poll")
POLL_S = 0.3  #: file-poll interval in these tests
#: inotify's own safety-net rescan stays far out, so these tests exercise events
INOTIFY_POLL_S = 30.0
#: a file written now is held ~1 s by file-poll (it may still be being written)
WAIT_S = 5.0
#: After start-up's news, the one trailing beat comes within BUSY_BEAT_S (1 s); then the grid.
BUSY_SETTLE_S = 1.5

Start = Callable[..., WorkerRun]


def nobody() -> Identity:
    pw = pwd.getpwnam("nobody")
    return Identity(uid=pw.pw_uid, gid=pw.pw_gid)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def conflist(name: str, *types: str) -> bytes:
    doc = {"cniVersion": "1.0.0", "name": name, "plugins": [{"type": t} for t in types]}
    return json.dumps(doc, indent=2).encode()


def write(path: Path, data: bytes, *, old: bool = False, mode: int | None = None) -> bytes:
    """A plain write (open, write, close). ``old``: as if it had been there for an hour."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644 if mode is None else mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    if mode is not None:
        os.chmod(path, mode)
    if old:
        past = time.time() - 3600
        os.utime(path, (past, past), follow_symlinks=False)
    return data


class Node:
    """Conf and bin dirs of one test, and the worker that watches them."""

    def __init__(self, worker: str, tmp: Path, start: Start, identity: Identity | None) -> None:
        self.worker, self.tmp, self._start, self.identity = worker, tmp, start, identity
        self.conf = tmp / "net.d"
        self.conf2 = tmp / "conf.d"
        self.bin = tmp / "bin"
        self.barriers = 0
        self.run: WorkerRun | None = None

    def make_dirs(self) -> Node:
        for d in (self.conf, self.conf2, self.bin):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def config(self, **cni: Any) -> dict[str, Any]:
        interval = POLL_S if self.worker == "file-poll" else INOTIFY_POLL_S
        return {"cni": {"conf_dirs": [str(self.conf), str(self.conf2)], "bin_dirs": [str(self.bin)],
                        "max_config_size": 1 << 20, "max_binary_size": 1 << 20, **cni},
                "fallback": {"file_poll_interval": interval}}

    def start(self, *, identity: Any = "default", **cni: Any) -> WorkerRun:
        ident = self.identity if identity == "default" else identity
        self.run = self._start(self.worker, self.config(**cni), identity=ident)
        self.run.wait_for("cni.config.active_changed", initial=True)
        return self.run

    def barrier(self, d: Path) -> int:
        """Create a new file in ``d``, wait for its event; return its index."""
        assert self.run is not None
        self.barriers += 1
        path = d / f"zz-barrier-{self.barriers}.conf"
        write(path, b"barrier, not JSON")
        r = self.run.wait_for("cni.config.created" if d != self.bin else "cni.plugin_binary.created",
                              path=str(path), timeout_s=WAIT_S)
        return self.run.index(r)


@pytest.fixture(params=WORKERS)
def node(request: pytest.FixtureRequest, world_tmp: Path, start_worker: Start) -> Node:
    # As root, run the worker as it runs in production: nobody, no capabilities.
    return Node(request.param, world_tmp, start_worker, nobody() if os.geteuid() == 0 else None).make_dirs()


def assert_heartbeats(run: WorkerRun) -> None:
    """The worker never blocked (a FIFO, a big file) longer than it may."""
    gaps = run.heartbeat_gaps(more=2)
    assert len(gaps) >= 2 and max(gaps) < run.config.workers.heartbeat_interval * 1.5, gaps


def about(run: WorkerRun, path: Path, since: int, until: int | None = None) -> list[str]:
    """Kinds of the file events about ``path`` in [since, until)."""
    return [r.kind for r in run.events(since=since, until=until)
            if r.data.get("path") == str(path) and r.kind != "cni.config.active_changed"]


# -- start -----------------------------------------------------------------------


@pytest.mark.parametrize("who", ["nobody", "self"])
def test_discovered_at_start_then_initial_active(node: Node, who: str) -> None:
    if who == "nobody" and os.geteuid() != 0:
        pytest.skip("running as another user needs root")
    a = write(node.conf / "10-a.conflist", conflist("net-a", "bridge", "portmap"), old=True)
    b = write(node.conf / "20-b.conf", json.dumps({"cniVersion": "0.4.0", "name": "net-b",
                                                   "type": "macvlan"}).encode(), old=True)
    c = write(node.conf2 / "50-c.json", json.dumps({"type": "ptp"}).encode(), old=True)
    write(node.conf / "readme.txt", b"not a config", old=True)
    (node.conf / "sub.conf").mkdir()  # a subdirectory: not an entry
    write(node.conf / "sub.conf" / "30-deep.conf", conflist("deep", "x"), old=True)
    br = write(node.bin / "bridge", b"\x7fELF bridge", mode=0o755, old=True)
    (node.tmp / "lib").mkdir()
    lo = write(node.tmp / "lib" / "loopback", b"\x7fELF loopback", mode=0o755, old=True)
    (node.bin / "loopback").symlink_to(node.tmp / "lib" / "loopback")

    run = node.start(identity=nobody() if who == "nobody" else None)

    active = run.wait_for("cni.config.active_changed")
    before = run.received[:run.index(active)]
    configs = {r.data["path"]: r.data for r in before if r.kind == "cni.config.discovered"}
    assert configs == {
        str(node.conf / "10-a.conflist"): {
            "path": str(node.conf / "10-a.conflist"), "dir": str(node.conf), "size": len(a),
            "mtime_ns": os.stat(node.conf / "10-a.conflist").st_mtime_ns, "sha256": sha(a), "valid": True,
            "network": "net-a", "cni_version": "1.0.0", "plugins": ["bridge", "portmap"]},
        str(node.conf / "20-b.conf"): {
            "path": str(node.conf / "20-b.conf"), "dir": str(node.conf), "size": len(b),
            "mtime_ns": os.stat(node.conf / "20-b.conf").st_mtime_ns, "sha256": sha(b), "valid": True,
            "network": "net-b", "cni_version": "0.4.0", "plugins": ["macvlan"]},
        str(node.conf2 / "50-c.json"): {
            "path": str(node.conf2 / "50-c.json"), "dir": str(node.conf2), "size": len(c),
            "mtime_ns": os.stat(node.conf2 / "50-c.json").st_mtime_ns, "sha256": sha(c), "valid": True,
            "plugins": ["ptp"]},
    }
    bins = {r.data["name"]: r.data for r in before if r.kind == "cni.plugin_binary.discovered"}
    assert set(bins) == {"bridge", "loopback"}
    assert bins["bridge"]["sha256"] == sha(br) and bins["bridge"]["executable"] is True
    assert bins["loopback"]["sha256"] == sha(lo) and bins["loopback"]["size"] == len(lo)
    assert [r.kind for r in before] == sorted(r.kind for r in before)  # nothing but discovered
    assert active.data == {"path": str(node.conf / "10-a.conflist"), "previous": None,
                           "network": "net-a", "initial": True}
    hb = run.wait_status(lambda s: s["t"] == "hb" and s["info"].get("files_known") == 5)
    key = "watched_dirs" if node.worker == "inotify" else "polled_dirs"
    assert set(hb["info"][key]) == {str(node.conf), str(node.conf2), str(node.bin)}
    if node.worker == "inotify":
        assert hb["info"]["max_user_watches"] > 0 and hb["info"]["max_user_instances"] > 0


# -- changes ------------------------------------------------------------------------


def test_created_modified_deleted(node: Node) -> None:
    run = node.start()
    path = node.conf / "10-net.conflist"
    v1 = write(path, conflist("net1", "bridge"))
    written = time.monotonic()
    created = run.wait_for("cni.config.created", path=str(path), timeout_s=WAIT_S)
    assert created.data["sha256"] == sha(v1) and created.data["network"] == "net1"
    run.wait_for("cni.config.active_changed", path=str(path), previous=None, network="net1", initial=False)

    mark = run.mark()
    v2 = write(path, conflist("net2", "bridge", "firewall"))
    written = time.monotonic()
    modified = run.wait_for("cni.config.modified", since=mark, path=str(path), timeout_s=WAIT_S)
    latency_s = modified.at - written
    assert modified.data["sha256"] == sha(v2) and modified.data["previous_sha256"] == sha(v1)
    assert modified.data["plugins"] == ["bridge", "firewall"] and modified.data["size"] == len(v2)
    if node.worker == "inotify":  # IN_CLOSE_WRITE of a known file is read at once
        assert latency_s < 0.25, f"inotify took {latency_s * 1000:.0f} ms"

    mark = run.mark()
    path.unlink()
    deleted = run.wait_for("cni.config.deleted", since=mark, path=str(path), timeout_s=WAIT_S)
    assert deleted.data == {"path": str(path), "dir": str(node.conf), "previous_sha256": sha(v2),
                            "network": "net2"}
    run.wait_for("cni.config.active_changed", since=mark, path=None, previous=str(path))
    assert about(run, path, 0) == ["cni.config.created", "cni.config.modified", "cni.config.deleted"]
    # The active file's content changed, not which file is active: one event each way.
    assert [r.data["path"] for r in run.events("cni.config.active_changed")] == [None, str(path), None]


def test_touch_and_identical_rewrite_emit_nothing(node: Node) -> None:
    a = write(node.conf / "10-a.conflist", conflist("a", "bridge"), old=True)
    write(node.conf / "20-b.conflist", conflist("b", "bridge"), old=True)
    tool = write(node.bin / "tool", b"\x7fELF tool", mode=0o755, old=True)
    run = node.start()
    mark = run.mark()
    os.utime(node.conf / "10-a.conflist")  # touch
    write(node.conf / "20-b.conflist", conflist("b", "bridge"))  # same bytes again
    os.utime(node.bin / "tool")
    write(node.bin / "tool", tool, mode=0o755)
    end = max(node.barrier(node.conf), node.barrier(node.bin))
    assert about(run, node.conf / "10-a.conflist", mark, end) == []
    assert about(run, node.conf / "20-b.conflist", mark, end) == []
    assert about(run, node.bin / "tool", mark, end) == []
    assert a  # the file was there all along


def test_atomic_replace_is_one_modified(node: Node) -> None:
    target = node.conf / "10-a.conflist"
    v1 = write(target, conflist("a", "bridge"), old=True)
    plugin = node.bin / "bridge"
    write(plugin, b"\x7fELF old", mode=0o755, old=True)
    run = node.start()
    mark = run.mark()
    # As CNI installers do: a temp file (here with a name that matches) renamed over the target.
    tmp_conf = node.conf / "tmp-1234.conflist"
    tmp_bin = node.bin / ".bridge.tmp"
    v2 = write(tmp_conf, conflist("a", "bridge", "portmap"))
    new_bin = write(tmp_bin, b"\x7fELF new", mode=0o755)
    time.sleep(0.01)  # renamed a moment later, within the settle delay, not in the same event batch
    os.rename(tmp_conf, target)
    os.rename(tmp_bin, plugin)
    got = run.wait_for("cni.config.modified", since=mark, path=str(target), timeout_s=WAIT_S)
    assert got.data["sha256"] == sha(v2) and got.data["previous_sha256"] == sha(v1)
    run.wait_for("cni.plugin_binary.modified", since=mark, path=str(plugin), sha256=sha(new_bin))
    end = max(node.barrier(node.conf), node.barrier(node.bin))
    assert about(run, target, mark, end) == ["cni.config.modified"]
    assert about(run, plugin, mark, end) == ["cni.plugin_binary.modified"]
    assert about(run, tmp_conf, mark, end) == []
    assert about(run, tmp_bin, mark, end) == []
    assert run.events("cni.config.active_changed", since=mark, until=end) == []


def test_half_written_file_is_reported_with_its_final_content(node: Node) -> None:
    existing = node.conf / "20-b.conflist"
    write(existing, conflist("b-old", "bridge"), old=True)
    run = node.start()
    mark = run.mark()
    new = node.conf / "10-a.conflist"
    final_a, final_b = conflist("a", "bridge", "portmap"), conflist("b-new", "macvlan", "tuning")
    with open(new, "wb") as fa, open(existing, "wb") as fb:
        for f, data in ((fa, final_a), (fb, final_b)):
            f.write(data[: len(data) // 2])
            f.flush()
        time.sleep(0.5)  # the writer keeps them open, half written
        for f, data in ((fa, final_a), (fb, final_b)):
            f.write(data[len(data) // 2:])
    run.wait_for("cni.config.created", since=mark, path=str(new), sha256=sha(final_a), timeout_s=WAIT_S)
    run.wait_for("cni.config.modified", since=mark, path=str(existing), sha256=sha(final_b),
                 timeout_s=WAIT_S)
    end = node.barrier(node.conf)
    assert about(run, new, mark, end) == ["cni.config.created"]
    assert about(run, existing, mark, end) == ["cni.config.modified"]


def test_active_config_follows_the_first_valid_file_of_the_first_dir(node: Node) -> None:
    b = node.conf / "20-b.conflist"
    write(b, conflist("net-b", "bridge"), old=True)
    write(node.conf2 / "00-first-of-second-dir.conflist", conflist("other", "bridge"), old=True)
    run = node.start()
    initial = run.events("cni.config.active_changed")
    assert [r.data for r in initial] == [{"path": str(b), "previous": None, "network": "net-b",
                                          "initial": True}]
    a = node.conf / "10-a.conflist"
    mark = run.mark()
    write(a, conflist("net-a", "ptp"))
    got = run.wait_for("cni.config.active_changed", since=mark, timeout_s=WAIT_S)
    assert got.data == {"path": str(a), "previous": str(b), "network": "net-a", "initial": False}

    mark = run.mark()
    write(a, b'{"name": "net-a", "plugins": []}')  # no plugins: libcni refuses it
    got = run.wait_for("cni.config.active_changed", since=mark, timeout_s=WAIT_S)
    assert got.data == {"path": str(b), "previous": str(a), "network": "net-b", "initial": False}
    modified = run.wait_for("cni.config.modified", since=mark, path=str(a))
    assert modified.data["valid"] is False and modified.data["error"] == "'plugins' is empty"

    mark = run.mark()
    b.unlink()
    got = run.wait_for("cni.config.active_changed", since=mark, timeout_s=WAIT_S)
    assert got.data == {"path": None, "previous": str(b), "initial": False}


def test_configmap_style_symlink_swap_is_one_modified(node: Node) -> None:
    """A Kubernetes ConfigMap volume: the config is a symlink through ``..data``,
    which is swapped atomically to a new timestamped dir on update."""
    c = node.conf
    (c / "..2024_01").mkdir()
    v1 = write(c / "..2024_01" / "10-x.conflist", conflist("x1", "bridge"), old=True)
    (c / "..data").symlink_to("..2024_01")
    (c / "10-x.conflist").symlink_to("..data/10-x.conflist")
    run = node.start()
    run.wait_for("cni.config.discovered", path=str(c / "10-x.conflist"), sha256=sha(v1))
    mark = run.mark()
    (c / "..2024_02").mkdir()
    v2 = write(c / "..2024_02" / "10-x.conflist", conflist("x2", "bridge"))
    (c / "..data_tmp").symlink_to("..2024_02")
    os.rename(c / "..data_tmp", c / "..data")
    shutil.rmtree(c / "..2024_01")
    got = run.wait_for("cni.config.modified", since=mark, path=str(c / "10-x.conflist"), timeout_s=WAIT_S)
    assert got.data["sha256"] == sha(v2) and got.data["previous_sha256"] == sha(v1)
    end = node.barrier(c)
    assert about(run, c / "10-x.conflist", mark, end) == ["cni.config.modified"]
    # Nothing about ..data, ..2024_*, or the active config (the same file stays active).
    assert [r.kind for r in run.events(since=mark, until=end)] == ["cni.config.modified"]


# -- directories ----------------------------------------------------------------------


def test_dirs_that_do_not_exist_yet(node: Node) -> None:
    node.conf = node.tmp / "x" / "y" / "net.d"
    node.bin = node.tmp / "opt" / "cni" / "bin"
    run = node.start()
    assert run.events("cni.config.active_changed")[0].data["path"] is None
    mark = run.mark()
    # mkdir -p and a file at once: faster than the worker can add its watches.
    node.conf.mkdir(parents=True)
    conf = write(node.conf / "10-a.conflist", conflist("a", "bridge"))
    node.bin.mkdir(parents=True)
    plugin = write(node.bin / "bridge", b"\x7fELF", mode=0o755)
    run.wait_for("cni.config.created", since=mark, path=str(node.conf / "10-a.conflist"),
                 sha256=sha(conf), timeout_s=WAIT_S)
    run.wait_for("cni.plugin_binary.created", since=mark, path=str(node.bin / "bridge"),
                 sha256=sha(plugin), timeout_s=WAIT_S)
    run.wait_for("cni.config.active_changed", since=mark, path=str(node.conf / "10-a.conflist"))
    # ... and the new dirs are followed from now on.
    mark = run.mark()
    v2 = write(node.conf / "10-a.conflist", conflist("a", "bridge", "portmap"))
    run.wait_for("cni.config.modified", since=mark, sha256=sha(v2), timeout_s=WAIT_S)


def test_conf_dir_removed_and_recreated(node: Node) -> None:
    a = node.conf / "10-a.conflist"
    v1 = write(a, conflist("a", "bridge"), old=True)
    run = node.start()
    mark = run.mark()
    shutil.rmtree(node.conf)
    deleted = run.wait_for("cni.config.deleted", since=mark, path=str(a), timeout_s=WAIT_S)
    assert deleted.data["previous_sha256"] == sha(v1) and deleted.data["network"] == "a"
    run.wait_for("cni.config.active_changed", since=mark, path=None, previous=str(a))

    mark = run.mark()
    node.conf.mkdir()
    b = node.conf / "10-b.conflist"
    v2 = write(b, conflist("b", "bridge"))
    run.wait_for("cni.config.created", since=mark, path=str(b), sha256=sha(v2), timeout_s=WAIT_S)
    run.wait_for("cni.config.active_changed", since=mark, path=str(b), previous=None)
    mark = run.mark()
    v3 = write(b, conflist("b", "bridge", "firewall"))
    run.wait_for("cni.config.modified", since=mark, path=str(b), sha256=sha(v3), timeout_s=WAIT_S)
    assert about(run, a, 0) == ["cni.config.discovered", "cni.config.deleted"]


# -- plugin binaries ------------------------------------------------------------------


def test_plugin_binaries(node: Node) -> None:
    bridge = write(node.bin / "bridge", b"\x7fELF bridge v1", mode=0o755, old=True)
    (node.tmp / "lib").mkdir()
    hl = write(node.tmp / "lib" / "host-local", b"\x7fELF host-local", mode=0o755, old=True)
    (node.bin / "host-local").symlink_to(node.tmp / "lib" / "host-local")
    readme = write(node.bin / "README", b"docs", old=True)
    run = node.start()
    found = {r.data["name"]: r.data for r in run.events("cni.plugin_binary.discovered")}
    assert found["bridge"]["sha256"] == sha(bridge) and found["bridge"]["executable"] is True
    assert found["host-local"]["sha256"] == sha(hl) and found["host-local"]["executable"] is True
    assert found["README"] == {"path": str(node.bin / "README"), "dir": str(node.bin), "name": "README",
                               "size": len(readme), "mtime_ns": os.stat(node.bin / "README").st_mtime_ns,
                               "sha256": sha(readme), "executable": False}
    mark = run.mark()
    portmap = write(node.bin / "portmap", b"\x7fELF portmap", mode=0o755)
    bridge2 = write(node.bin / "bridge", b"\x7fELF bridge v2", mode=0o755)
    (node.bin / "README").unlink()
    with open(node.bin / "big", "wb") as f:
        f.truncate(2 << 20)  # over max_binary_size (1 MiB here), sparse
    got = run.wait_for("cni.plugin_binary.created", since=mark, name="portmap", timeout_s=WAIT_S)
    assert got.data["sha256"] == sha(portmap) and got.data["executable"] is True
    got = run.wait_for("cni.plugin_binary.modified", since=mark, name="bridge", timeout_s=WAIT_S)
    assert got.data["sha256"] == sha(bridge2) and got.data["previous_sha256"] == sha(bridge)
    got = run.wait_for("cni.plugin_binary.deleted", since=mark, name="README", timeout_s=WAIT_S)
    assert got.data == {"path": str(node.bin / "README"), "dir": str(node.bin), "name": "README",
                        "previous_sha256": sha(readme)}
    got = run.wait_for("cni.plugin_binary.created", since=mark, name="big", timeout_s=WAIT_S)
    assert "sha256" not in got.data and got.data["size"] == 2 << 20
    assert got.data["error"] == f"file too large: {2 << 20} bytes > cap {1 << 20}"

    mark = run.mark()
    os.chmod(node.bin / "bridge", 0o644)  # same bytes, but a runtime can no longer run it
    got = run.wait_for("cni.plugin_binary.modified", since=mark, name="bridge", timeout_s=WAIT_S)
    assert got.data["executable"] is False and got.data["sha256"] == sha(bridge2)
    assert_heartbeats(run)


# -- bad input ------------------------------------------------------------------------


def _rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_bad_input_is_reported_and_survived(node: Node) -> None:
    run = node.start()
    read_before = _rchar(run.pid)
    c = node.conf
    mark = run.mark()
    write(c / "10-json.conflist", b'{\n  "name": "x",\n  "plugins": [\n    {"type": }\n  ]\n}')
    write(c / "11-garbage.conf", b"\x00\xffgarbage\xfe\x01" * 10)
    with open(c / "12-huge.conf", "wb") as f:
        f.truncate(100 << 20)
    (c / "13-loop.conf").symlink_to("13-loop.conf")
    (c / "14-dangling.conf").symlink_to(node.tmp / "nowhere.conf")
    os.mkfifo(c / "15-fifo.conf")
    write(c / "16-noplugins.conflist", b'{"cniVersion": "1.0.0", "name": "x"}')
    write(c / "17-array.json", b"[1, 2]")
    write(c / "18-notype.conf", b'{"name": "x", "plugins": [{"type": "bridge"}]}')
    write(c / "19-empty.conf", b"")
    odd = os.path.join(os.fsencode(c), b"20-odd-\xff.conf")
    write(Path(os.fsdecode(odd)), json.dumps({"name": "odd", "type": "bridge"}).encode())
    expected = {
        "10-json.conflist": "invalid JSON at line 4 column 14: Expecting value",
        "11-garbage.conf": "not UTF-8 text: byte 0xff at offset 1",
        "12-huge.conf": f"file too large: {100 << 20} bytes > cap {1 << 20}",
        "13-loop.conf": "symlink loop",
        "14-dangling.conf": f"dangling symlink to {str(node.tmp / 'nowhere.conf')!r}",
        "15-fifo.conf": "not a regular file (fifo)",
        "16-noplugins.conflist": "missing 'plugins'",
        "17-array.json": "not a JSON object but an array",
        "18-notype.conf": "missing 'type' (it has 'plugins': a conflist needs the .conflist extension)",
        "19-empty.conf": "empty file",
    }
    for name, error in expected.items():
        got = run.wait_for("cni.config.created", since=mark, path=str(c / name), timeout_s=WAIT_S)
        assert got.data["valid"] is False and got.data["error"] == error, name
        assert "sha256" in got.data or name in ("12-huge.conf", "13-loop.conf", "14-dangling.conf",
                                                 "15-fifo.conf")
    got = run.wait_for("cni.config.created", since=mark, path=str(c / "20-odd-\\xff.conf"))
    assert got.data["valid"] is True and got.data["network"] == "odd"
    # Still alive and well: a good file is reported as such.
    ok = write(c / "30-ok.conflist", conflist("ok", "bridge"))
    run.wait_for("cni.config.created", since=mark, path=str(c / "30-ok.conflist"), sha256=sha(ok),
                 valid=True, timeout_s=WAIT_S)
    assert _rchar(run.pid) - read_before < 10 << 20  # the 100 MB file was never read
    assert_heartbeats(run)


@pytest.mark.root
def test_unreadable_files(node: Node) -> None:
    assert node.identity is not None  # the worker runs as nobody; the files are root's
    run = node.start()
    mark = run.mark()
    secret = node.conf / "10-secret.conflist"
    data = write(secret, conflist("secret", "bridge"), mode=0o600)
    write(node.bin / "private-plugin", b"\x7fELF", mode=0o700)
    got = run.wait_for("cni.config.created", since=mark, path=str(secret), timeout_s=WAIT_S)
    assert got.data["valid"] is False and got.data["error"] == "permission denied"
    assert "sha256" not in got.data and got.data["size"] == len(data)
    got = run.wait_for("cni.plugin_binary.created", since=mark, name="private-plugin", timeout_s=WAIT_S)
    assert got.data["error"] == "permission denied" and got.data["executable"] is True
    assert "sha256" not in got.data
    mark = run.mark()
    os.chmod(secret, 0o644)
    got = run.wait_for("cni.config.modified", since=mark, path=str(secret), timeout_s=WAIT_S)
    assert got.data["valid"] is True and got.data["sha256"] == sha(data)
    assert "previous_sha256" not in got.data


# -- inotify limits (root: they are changed system-wide, briefly) --------------------------


def _inotify_use(uid: int) -> tuple[int, int]:
    """(instances, watches) held by processes of ``uid``, from /proc/*/fdinfo."""
    instances = watches = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                if next(line for line in f if line.startswith("Uid:")).split()[1] != str(uid):
                    continue
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    lines = [line for line in f if line.startswith("inotify wd:")]
                if lines or os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                    instances += 1
                    watches += len(lines)
        except OSError:
            continue  # the process or fd went away
    return instances, watches


class _Sysctl:
    def __init__(self, name: str) -> None:
        self.path = Path("/proc/sys/fs/inotify") / name
        self.saved = self.path.read_text()

    def set(self, value: int) -> None:
        self.path.write_text(f"{value}\n")

    def restore(self) -> None:
        self.path.write_text(self.saved)


_EXHAUST = """
import ctypes, errno, os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
libc = ctypes.CDLL(None, use_errno=True)
n = 0
while libc.inotify_init1(os.O_CLOEXEC) >= 0:
    n += 1
print(n, errno.errorcode[ctypes.get_errno()], hard, flush=True)
sys.stdin.read()
"""


@pytest.mark.root
def test_inotify_exits_77_when_inotify_instances_are_exhausted(world_tmp: Path, start_worker: Start) -> None:
    ident = nobody()
    hog = subprocess.Popen([sys.executable, "-c", _EXHAUST], user=ident.uid, group=ident.gid,
                           extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None
        opened, err, fd_limit = hog.stdout.readline().split()
        limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
        assert err == "EMFILE" and int(opened) <= limit < int(fd_limit)  # the user's limit, not the fd limit
        node = Node("inotify", world_tmp, start_worker, ident).make_dirs()
        run = start_worker("inotify", node.config(), identity=ident)
        assert run.wait_exit() == 77
        exit_line = run.exit_status()
        assert exit_line is not None and exit_line["code"] == 77
        assert f"max_user_instances={limit}" in exit_line["reason"]
        assert run.events("cni.config.active_changed") == []
    finally:
        hog.kill()
        hog.wait()


@pytest.mark.root
def test_inotify_queue_overflow_rescans_and_reports_each_change_once(
        world_tmp: Path, start_worker: Start) -> None:
    node = Node("inotify", world_tmp, start_worker, nobody()).make_dirs()
    queued = _Sysctl("max_queued_events")
    try:
        queued.set(16)  # read by inotify_init1, i.e. once the worker runs
        run = node.start()
    finally:
        queued.restore()
    mark = run.mark()
    os.kill(run.pid, signal.SIGSTOP)
    try:
        names = [f"{i:03d}-net.conflist" for i in range(100)]
        for name in names:
            write(node.conf / name, conflist(name, "bridge"))
    finally:
        os.kill(run.pid, signal.SIGCONT)
    warning = run.wait_for("monitor.warning", since=mark, code="inotify_queue_overflow")
    assert "max_queued_events=16" in warning.data["message"]
    for name in names:
        run.wait_for("cni.config.created", since=mark, path=str(node.conf / name), timeout_s=WAIT_S)
    end = node.barrier(node.conf)
    created = [r.data["path"] for r in run.events("cni.config.created", since=mark, until=end)]
    assert sorted(created) == [str(node.conf / n) for n in names]  # each exactly once


@pytest.mark.root
def test_inotify_watch_limit_polls_that_dir(world_tmp: Path, start_worker: Start) -> None:
    ident = nobody()
    node = Node("inotify", world_tmp, start_worker, ident).make_dirs()
    config = node.config()
    config["fallback"]["file_poll_interval"] = POLL_S
    _, in_use = _inotify_use(ident.uid)
    watches = _Sysctl("max_user_watches")
    try:
        watches.set(in_use + 2)  # net.d and conf.d get a watch; bin does not
        run = start_worker("inotify", config, identity=ident)
        run.wait_for("cni.config.active_changed", initial=True)
        warning = run.wait_for("monitor.warning", code="inotify_watch_limit")
        assert warning.data["path"] == str(node.bin)
        assert f"max_user_watches={in_use + 2}" in warning.data["message"]
        hb = run.wait_status(lambda s: s["t"] == "hb" and s["info"].get("polled_dirs") is not None)
        assert hb["info"]["polled_dirs"] == [str(node.bin)]
        assert hb["info"]["watched_dirs"] == [str(node.conf), str(node.conf2)]
        mark = run.mark()
        plugin = write(node.bin / "bridge", b"\x7fELF", mode=0o755)
        run.wait_for("cni.plugin_binary.created", since=mark, name="bridge", sha256=sha(plugin),
                     timeout_s=WAIT_S)
        conf = write(node.conf / "10-a.conflist", conflist("a", "bridge"))  # watched dirs still are
        run.wait_for("cni.config.created", since=mark, sha256=sha(conf), timeout_s=WAIT_S)
    finally:
        watches.restore()



def test_idle_heartbeats_fall_on_one_clock_grid_shared_by_all_workers(world_tmp: Path, start_worker: Start) -> None:
    """Idle, every worker beats on multiples of heartbeat_interval / 2 of the system-wide
    monotonic clock, so the supervisor wakes once for all of them (the idle cost of the
    production preset); after news, one beat follows within a second."""
    interval, grid = 2.0, 1.0
    nodes = [Node(w, world_tmp / w, start_worker, None).make_dirs() for w in WORKERS]
    runs = [start_worker(n.worker, n.config(), heartbeat_interval_s=interval) for n in nodes]
    for run in runs:
        run.wait_for("cni.config.active_changed", initial=True)
    t0 = time.monotonic()
    deadline = t0 + 3 * grid + BUSY_SETTLE_S + 0.5
    while time.monotonic() < deadline:  # pump both often: the arrival time is the beat's time
        for run in runs:
            run.pump(0.01)
    for run in runs:
        beats = [t for t, s in run.status if s["t"] == "hb" and t > t0 + BUSY_SETTLE_S]
        assert len(beats) >= 3, (run.name, beats)
        offsets = [t % grid for t in beats]
        assert all(o < 0.2 for o in offsets), (run.name, offsets)  # just after a grid point
        assert all(grid * 0.5 < b - a <= grid * 1.5 + 0.2 for a, b in itertools.pairwise(beats)), beats

