"""The answering commands as an operator runs them: a journal file made with
the writer's own store, read by the real command line (no cnisup running)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import time
from pathlib import Path

from e2e.support import CNISUP

from cnisup.protocol import envelope, kinds
from cnisup.workers.journal.store import Store


def journal(tmp_path: Path) -> Path:
    db = tmp_path / "journal.db"
    store = Store(str(db), max_bytes=1 << 30, max_age_s=86400)
    st = envelope.Stamp("ebpf", "node-a", envelope.new_incarnation())
    now = time.time_ns()
    args = {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-1"}
    bad = st.build("cni.plugin.finished", {
        "run_id": "9-1", "pid": 9, "plugin": "bridge", "path": "/usr/lib/cni/bridge", "command": "ADD",
        "container_id": "abc123", "ifname": "eth0", "cni_args": args, "exit_code": 1, "duration_ms": 5.0,
        "error": {"code": 11, "msg": "no IP addresses available"}}, now)
    good = st.build("cni.plugin.finished", {
        "run_id": "10-2", "pid": 10, "plugin": "bridge", "path": "/usr/lib/cni/bridge", "command": "ADD",
        "container_id": "def456", "ifname": "eth0", "cni_args": {**args, "K8S_POD_NAME": "web-2"}, "exit_code": 0,
        "duration_ms": 4.0, "result": {"ips": [{"address": "10.22.0.7/24"}]}}, now + 1)
    store.write([(e, envelope.encode(e)[1].decode()) for e in (bad, good)])
    store.close()
    return db


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CNISUP, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def on_a_terminal(*args: str, env: dict[str, str]) -> str:
    """What the command prints on a pseudo-terminal."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(CNISUP, [CNISUP, *args], {**os.environ, **env})
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    return out.decode(errors="replace")


def test_history_compact_lines_and_exact_json(tmp_path: Path) -> None:
    db = journal(tmp_path)
    out = run("history", "--journal", str(db), env={"NO_COLOR": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and "\x1b[" not in out.stdout
    assert "ADD" in lines[0] and "failed" in lines[0] and "default/web-1" in lines[0] \
        and "code 11 no IP addresses available" in lines[0]
    assert "ok" in lines[1] and "10.22.0.7/24" in lines[1]
    as_json = run("history", "--journal", str(db), "-o", "json", "--failed").stdout.splitlines()
    assert len(as_json) == 1 and json.loads(as_json[0])["data"]["error"]["code"] == 11


def test_colour_on_a_terminal_only_and_never_with_no_color(tmp_path: Path) -> None:
    db = journal(tmp_path)
    coloured = on_a_terminal("history", "--journal", str(db), env={"NO_COLOR": ""})
    assert "\x1b[31m" in coloured  # failed in red
    assert "\x1b[" not in on_a_terminal("history", "--journal", str(db), env={"NO_COLOR": "1"})


def test_a_missing_journal_says_so_and_exits_1(tmp_path: Path) -> None:
    out = run("history", "--journal", str(tmp_path / "nope.db"))
    assert out.returncode == 1 and "no journal at" in out.stderr
    out = run("explain", "pod", "not-a-pod")
    assert out.returncode == 2 and "NAMESPACE/NAME" in out.stderr
    out = run("history", "--since", "yesterday-ish", "--journal", str(tmp_path / "nope.db"))
    assert out.returncode == 2 and "RFC 3339" in out.stderr


def test_kinds_lists_every_kind_with_its_fields() -> None:
    out = run("kinds")
    assert out.returncode == 0
    for kind in kinds.KINDS:
        assert f"\n{kind}\n" in f"\n{out.stdout}"
    assert "* exit_code" not in out.stdout.split("cni.plugin.finished")[1].split("\ncni.")[0]
    described = json.loads(run("kinds", "--json").stdout)
    assert set(described) == set(kinds.KINDS)
    assert described["cni.plugin.finished"]["data"]["properties"]["error"]["properties"]["code"] == {"type": "integer"}


def test_explain_container_reads_a_copied_journal(tmp_path: Path) -> None:
    db = journal(tmp_path)
    story = json.loads(run("explain", "container", "abc", "--json", "--journal", str(db)).stdout)
    assert story["verdict"]["state"] == "failed" and story["verdict"]["error"]["code"] == 11
    assert story["subject"]["pods"] == ["default/web-1"]
