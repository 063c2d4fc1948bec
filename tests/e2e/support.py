"""End-to-end support: run the real ``cnisup start`` as a subprocess and
listen with an independent raw pyzmq SUB socket (no cnisup client code), so
the tests exercise the wire contract as any other subscriber would."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
import zmq

from cnisup.protocol import validation

CNISUP = str(Path(sys.executable).with_name("cnisup"))


def worker_user() -> pwd.struct_passwd:
    """Who unprivileged workers run as: workers.user (cnisup) if it exists, else nobody."""
    try:
        return pwd.getpwnam("cnisup")
    except KeyError:
        return pwd.getpwnam("nobody")


class Events:
    """A raw SUB socket; every envelope is checked against the JSON Schema and
    for sequence holes, which fail the test unless ``allow_gaps``."""

    def __init__(self, endpoint: str, *, topics: tuple[str, ...] = ("",), rcvhwm: int = 0) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        for t in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.sock.connect(endpoint)
        self.seen: list[dict[str, Any]] = []
        self.last_seq: dict[str, int] = {}
        self.gaps: list[tuple[str, int, int]] = []
        self.allow_gaps = topics != ("",)

    def _recv(self, timeout_s: float) -> dict[str, Any] | None:
        if not self.sock.poll(max(0, int(timeout_s * 1000))):
            return None
        topic, payload = self.sock.recv_multipart()
        env: dict[str, Any] = json.loads(payload)
        assert env["kind"] == topic.decode()
        validation.validate(env)
        last = self.last_seq.get(env["incarnation"])
        if last is not None and env["seq"] != last + 1:
            self.gaps.append((env["incarnation"], last, env["seq"]))
            assert self.allow_gaps, f"sequence hole in {env['source']}: {last} -> {env['seq']}"
        self.last_seq[env["incarnation"]] = env["seq"]
        self.seen.append(env)
        return env

    def drain(self, quiet_s: float = 0.3) -> list[dict[str, Any]]:
        out = []
        while (env := self._recv(quiet_s)) is not None:
            out.append(env)
        return out

    def wait(self, kind: str, timeout_s: float = 10.0, *, where: Callable[[dict[str, Any]], bool] | None = None,
             **data: Any) -> dict[str, Any]:
        """The next event of ``kind`` whose data has the given items."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            env = self._recv(left)
            if env is None:
                break
            if env["kind"] == kind and all(env["data"].get(k) == v for k, v in data.items()) \
                    and (where is None or where(env)):
                return env
        recent = [(e["kind"], e["data"].get("path") or e["data"].get("reason")) for e in self.seen[-8:]]
        raise AssertionError(f"no {kind} {data} within {timeout_s} s; last seen: {recent}")

    def received_or_wait(self, kind: str, timeout_s: float = 10.0, **data: Any) -> dict[str, Any]:
        """An event of ``kind`` with the given data items already received (while waiting for
        another), else the next one: for events whose relative order is not part of the contract."""
        for env in self.seen:
            if env["kind"] == kind and all(env["data"].get(k) == v for k, v in data.items()):
                return env
        return self.wait(kind, timeout_s, **data)

    def collect(self, duration_s: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + duration_s
        out = []
        while (left := deadline - time.monotonic()) > 0:
            env = self._recv(left)
            if env is not None:
                out.append(env)
        return out

    def close(self) -> None:
        self.sock.close(linger=0)


class Cnisup:
    """One ``cnisup start`` with its own runtime dir, config and conf dirs."""

    def __init__(self, base: Path, **overrides: Any) -> None:
        self.base = base
        self.conf_dir = base / "net.d"
        self.conf_dir2 = base / "conf.d"
        self.bin_dir = base / "bin"
        for d in (self.conf_dir, self.bin_dir):
            d.mkdir(exist_ok=True)
            d.chmod(0o755)
        self.runtime_dir = base / "run"
        self.config: dict[str, Any] = {
            "preset": "development",
            "node_name": "test-node",
            "runtime_dir": str(self.runtime_dir),
            "log_level": "debug",
            "monitors": {"kernel": False, "config": True, "k8s": False},
            "cni": {"conf_dirs": [str(self.conf_dir), str(self.conf_dir2)], "bin_dirs": [str(self.bin_dir)]},
            "workers": {"heartbeat_interval": 0.5, "heartbeat_timeout": 3.0, "stop_grace": 2.0},
            "restart": {"initial_delay": 0.2, "max_delay": 2.0, "jitter": 0.05, "stable_after": 5.0,
                        "flap_threshold": 4, "flap_window": 20.0, "reprobe_interval": 60.0},
            "fallback": {"file_poll_interval": 0.5},
        }
        _deep_update(self.config, overrides)
        self.config_path = base / "cnisup.yaml"
        self.write_config()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = base / "cnisup.log"

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.runtime_dir}/events.sock"

    def subscribe(self, **kw: Any) -> Events:
        return Events(self.endpoint, **kw)

    def start(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([CNISUP, "start", "--config", str(self.config_path), *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        return self.proc

    def status(self) -> dict[str, Any]:
        out = subprocess.run([CNISUP, "status", "--json", "--config", str(self.config_path)],
                             capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        reply: dict[str, Any] = json.loads(out.stdout)
        return reply

    def worker(self, family: str = "config") -> dict[str, Any]:
        return next(w for w in self.status()["workers"] if w["family"] == family)

    def wait_worker(self, family: str = "config", timeout_s: float = 15.0, **want: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        w: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                w = self.worker(family)
            except (AssertionError, subprocess.TimeoutExpired, StopIteration):
                time.sleep(0.1)
                continue
            if all(w.get(k) == v for k, v in want.items()):
                return w
            time.sleep(0.1)
        raise AssertionError(f"worker never reached {want}; last {w}; log:\n{self.read_log()[-3000:]}")

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
        return code


def _deep_update(d: dict[str, Any], u: dict[str, Any]) -> None:
    for k, v in u.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            _deep_update(d[k], v)
        else:
            d[k] = v


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc, no ps)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int) -> bool:
    state = proc_state(pid)
    return state is not None and state != "Z"


def iter_worker_pids(status: dict[str, Any]) -> Iterator[int]:
    for w in status["workers"]:
        if w.get("pid"):
            yield w["pid"]
