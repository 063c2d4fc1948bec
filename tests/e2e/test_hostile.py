"""What someone else can send a running ``cnisup start``, or leave for it to
read: control requests, a worker's status lines, the lock and the runtime dir,
configuration files at start and at reload. None of it may take the
supervisor down; every refusal is one line (exit 78 at start)."""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import zmq

from .support import CNISUP, Cnisup, worker_user

#: A "billion laughs" of about 400 bytes: nine aliases per level, seven levels (9**7 strings).
YAML_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True))

#: (file content, what the one error line must name)
BROKEN_FILES: list[tuple[bytes, str]] = [
    (YAML_BOMB.encode(), "anchors and aliases"),
    (b"node_name: " + b"[" * 60_000, "nested more than"),
    (b"cni:\n  conf_dirs:\n" + b"".join(b"  " * (i + 2) + b"- \n" for i in range(200)), "nested more than"),
    (b"node_name: caf\xe9\n", "not UTF-8 at byte 14"),
    (b"# " + b"x" * (100 << 10) + b"\n", "larger than"),
    (b"node_name: \x00\n", "character"),
    (b"restart:\n  flap_threshold: " + b"9" * 5000 + b"\n", "digits"),
    (b"node_name: 2024-13-45\n", "month"),
    (b"fallback:\n  file_poll_interval: '" + b"x" * 50_000 + b"'\n", "fallback.file_poll_interval"),
]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CNISUP, *args], capture_output=True, text=True, timeout=timeout, errors="replace",
                          env={**os.environ, **(env or {})})


def one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    """The error, one bounded line (log lines before it, such as a warning about
    the workers' user, are not part of it)."""
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and not re.match(r"\d{4}-\d\d-\d\d ", ln)]
    assert len(lines) == 1, out.stderr[:3000]
    assert len(lines[0]) < 400, lines[0][:500]
    return lines[0]


# -- configuration at start ----------------------------------------------------------------

@pytest.mark.parametrize(("content", "named"), BROKEN_FILES, ids=lambda x: repr(x)[:24] if isinstance(x, bytes) else x)
def test_broken_config_file_exits_78_with_one_line(tmp_path: Path, content: bytes, named: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    out = run("start", "--config", str(cfg))
    assert out.returncode == 78, out.stderr[:3000]
    line = one_error_line(out)
    assert named in line and "configuration error" in line


def test_env_and_flags_are_checked_like_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"runtime_dir: {tmp_path}/run\n")
    bad_node = os.fsdecode(b"node-\xff")
    cases: list[tuple[list[str], dict[str, str], str]] = [
        ([], {"NODE_NAME": bad_node}, "$NODE_NAME: not UTF-8 at byte 5"),
        ([], {"NODE_NAME": "n" * 5000}, "$NODE_NAME: 5000 bytes"),
        ([], {"LOG_LEVEL": "loud"}, "$LOG_LEVEL: must be one of"),
        ([], {"KUBECONFIG": "/k" * 5000}, "$KUBECONFIG"),
        (["--log-level", "x" * 10_000], {}, "--log-level: must be one of"),
        (["--preset", "staging"], {}, "--preset: must be one of"),
    ]
    for flags, env, named in cases:
        out = run("start", "--config", str(cfg), *flags, env=env)
        assert out.returncode == 78, (flags, env.keys(), out.stderr[:2000])
        assert named in one_error_line(out), (named, out.stderr)
    out = run("start", "--config", str(tmp_path))  # a directory
    assert out.returncode == 78 and "Is a directory" in one_error_line(out)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # nobody ever writes to it: reading it must not block start-up
    out = run("start", "--config", str(fifo), timeout=10)
    assert out.returncode == 78 and "not a regular file" in one_error_line(out)
    assert not (tmp_path / "run").exists()


# -- a running supervisor --------------------------------------------------------------------

def _request(endpoint: str, frames: list[bytes], *, dealer: bool = False) -> dict[str, Any]:
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER if dealer else zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        assert sock.poll(5000), f"no reply to {frames[0][:20]!r}..."
        reply: dict[str, Any] = json.loads(sock.recv_multipart()[-1])
        return reply
    finally:
        sock.close(linger=0)


def test_control_socket_survives_hostile_requests(cnisup: Cnisup) -> None:
    cnisup.start()
    w = cnisup.wait_worker(worker="inotify", state="running")
    endpoint = f"ipc://{cnisup.runtime_dir}/control.sock"
    hostile = {
        b"[" * 100_000: "at most 65536",  # the reproduction: RecursionError killed the supervisor
        b"[" * 60_000: "nested more than",
        b'{"cmd": ' * 5000: "nested more than",
        b"\xff\xfe{}": "not UTF-8 at byte 0",
        b"": "not JSON",
        b"[]": "expected",
        b'{"cmd": 1}': "expected",
        b'{"cmd": "' + b"x" * 1000 + b'"}': "unknown command",
        b'{"cmd": "status", "x": ' + b"1" * 5000 + b"}": "a number of more than 4300 digits",
    }
    for body, error in hostile.items():
        reply = _request(endpoint, [body])
        assert reply["ok"] is False and error in reply["error"], (body[:30], reply)
        assert len(reply["error"]) <= 300 and "\n" not in reply["error"]
    # A DEALER that sends a pile of routing frames gets an answer, not a crash.
    reply = _request(endpoint, [b""] * 50 + [b'{"cmd": "status"}'], dealer=True)
    assert reply["ok"] is False and "frames" in reply["error"]
    assert cnisup.proc is not None and cnisup.proc.poll() is None
    assert cnisup.worker()["pid"] == w["pid"]  # still answering, nothing restarted
    assert cnisup.stop() == 0


SITECUSTOMIZE = """\
    # Test hook: the first inotify worker to start writes a JSON list on its status pipe.
    import os
    if "CNISUP_STATUS_FD" in os.environ and '"name":"inotify"' in os.environ.get("CNISUP_WORKER_SPEC", ""):
        try:
            os.close(os.open(os.path.join(os.path.dirname(__file__), "sent"), os.O_CREAT | os.O_EXCL, 0o644))
        except OSError:
            pass  # sent once already: from now on a well-behaved worker
        else:
            os.write(int(os.environ["CNISUP_STATUS_FD"]), b"[]\\n")
"""


def test_worker_writing_garbage_on_its_status_pipe_is_killed_and_restarted(cnisup: Cnisup) -> None:
    """A worker is the unprivileged, exposed half: what it says is checked, and a
    worker that breaks the status protocol is killed and restarted with that reason."""
    hook = cnisup.base / "hook"
    hook.mkdir(mode=0o755)
    (hook / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    ev = cnisup.subscribe()
    cnisup.start(env={"PYTHONPATH": str(hook)})
    exited = ev.wait("supervisor.worker.exited", worker="inotify")
    assert "broke the status protocol" in exited["data"]["killed_by_supervisor"]
    assert "JSON object, not list" in exited["data"]["killed_by_supervisor"]
    assert exited["data"]["signal"] == "SIGKILL"
    ev.wait("supervisor.worker.restarting", worker="inotify")
    ready = ev.wait("supervisor.worker.ready", worker="inotify")
    assert (hook / "sent").exists()
    w = cnisup.wait_worker(worker="inotify", state="running")
    assert w["incarnation"] == ready["data"]["incarnation"] and w["restarts"] == 1
    assert cnisup.proc is not None and cnisup.proc.poll() is None
    assert cnisup.stop() == 0


def test_sighup_with_a_broken_file_keeps_the_running_config(cnisup: Cnisup) -> None:
    ev = cnisup.subscribe()
    cnisup.start()
    w = cnisup.wait_worker(worker="inotify", state="running")
    good = cnisup.config_path.read_bytes()
    assert cnisup.proc is not None
    for content, named in BROKEN_FILES:
        cnisup.config_path.write_bytes(content)
        cnisup.proc.send_signal(signal.SIGHUP)
        failed = ev.wait("supervisor.config.reload_failed")
        assert named in failed["data"]["error"] and len(failed["data"]["error"]) <= 300, failed["data"]
        assert cnisup.proc.poll() is None, cnisup.read_log()[-3000:]
    cnisup.config_path.write_bytes(good)
    assert cnisup.worker()["pid"] == w["pid"]  # nothing was restarted: the running config holds
    assert not [e for e in ev.seen if e["kind"] == "supervisor.config.reloaded"]
    log = cnisup.read_log()
    assert "Traceback" not in log and max(len(line) for line in log.splitlines()) < 1000
    assert cnisup.stop() == 0


# -- the lock and the runtime dir (root: another user plays the attacker) ----------------------

def _as(user: pwd.struct_passwd, code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["python3", "-c", code], user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")


@pytest.mark.root
def test_another_user_cannot_hold_the_lock(cnisup: Cnisup) -> None:
    cnisup.start()
    cnisup.wait_worker(worker="inotify", state="running")
    assert cnisup.stop() == 0
    lock = cnisup.runtime_dir / "cnisup.lock"
    assert lock.stat().st_mode & 0o777 == 0o600
    holder = _as(worker_user(), textwrap.dedent(f"""\
        import fcntl, os, sys, time
        try:
            fd = os.open({str(lock)!r}, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            print("refused", exc.errno, flush=True)
            sys.exit(0)
        print("holding", flush=True)
        time.sleep(30)
        """))
    try:
        assert holder.stdout is not None
        said = holder.stdout.readline().strip()
        assert said.startswith("refused"), said
        cnisup.start()  # nobody else holds it: the next start works
        cnisup.wait_worker(worker="inotify", state="running")
        assert cnisup.stop() == 0
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.root
@pytest.mark.parametrize("plant", ["dir-of-another-user", "symlink-in-our-dir", "dir-writable-by-all",
                                   "dir-is-a-symlink"])
def test_runtime_dir_that_others_control_is_refused(base: Path, plant: str) -> None:
    """Exit 78 and one line naming the path (and its owner); the file a planted
    symlink points at is left as it was."""
    other = worker_user()
    victim = base / "victim"
    victim.write_text("precious\n")
    run_dir = base / "run"
    if plant == "dir-is-a-symlink":
        elsewhere = base / "elsewhere"
        elsewhere.mkdir(mode=0o755)
        run_dir.symlink_to(elsewhere)
    else:
        run_dir.mkdir(mode=0o755)
        (run_dir / "cnisup.lock").symlink_to(victim)
        if plant == "dir-of-another-user":
            os.chown(run_dir, other.pw_uid, other.pw_gid)
            os.lchown(run_dir / "cnisup.lock", other.pw_uid, other.pw_gid)
        elif plant == "dir-writable-by-all":
            run_dir.chmod(0o777)
    c = Cnisup(base)
    out = run("start", "--config", str(c.config_path))
    assert out.returncode == 78, out.stderr
    line = one_error_line(out)
    assert str(run_dir) in line and "refusing" in line, line
    if plant == "dir-of-another-user":
        assert f"owned by {other.pw_name}" in line
    assert victim.read_text() == "precious\n"
    assert not (run_dir / "control.sock").exists()


def test_runtime_dir_is_created_private_to_us(cnisup: Cnisup) -> None:
    cnisup.start()
    cnisup.wait_worker(worker="inotify", state="running")
    st = cnisup.runtime_dir.stat()
    assert st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o755
    assert (cnisup.runtime_dir / "cnisup.lock").stat().st_mode & 0o777 == 0o600
    assert cnisup.stop() == 0

