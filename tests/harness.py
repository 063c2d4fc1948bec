"""Run ONE real worker process exactly as the supervisor starts it, and watch
what it publishes.

The harness plays the supervisor's part of the contract: it binds a real
``zmq.XSUB`` on an ``ipc://`` socket and sends the subscribe-all (the worker's
XPUB waits for it before it is ready), passes the ``WorkerSpec`` in
``CNISUP_WORKER_SPEC`` and a status pipe in ``CNISUP_STATUS_FD``, and runs
``python -m cnisup.workers <name>`` in its own session. Every envelope is
decoded with the protocol's own decoder, checked against the JSON Schema and
for sequence holes; problems are collected in ``problems``.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from cnisup.protocol import envelope, validation
from cnisup.protocol.settings import Config
from cnisup.workers.privileges import Identity
from cnisup.workers.registry import WORKERS
from cnisup.workers.spec import SPEC_ENV, STATUS_FD_ENV, WorkerSpec

_PASS_ENV = ("PATH", "LANG", "LC_ALL", "PYTHONPATH")


def world_dir(prefix: str = "cnisup-test-") -> Path:
    """A temp dir an unprivileged worker (nobody) can traverse."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    return d


@dataclass(frozen=True)
class Received:
    at: float  #: time.monotonic() when the harness read it
    env: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.env["kind"])

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.env["data"])


def matches(r: Received, kind: str | None, match: dict[str, Any]) -> bool:
    if kind is not None and r.kind != kind:
        return False
    return all(r.env["data"].get(k, _MISSING) == v for k, v in match.items())


_MISSING = object()


class WorkerRun:
    def __init__(self, name: str, config: dict[str, Any], *, tmp: Path,
                 identity: Identity | None = None, heartbeat_interval_s: float = 1.0,
                 log_level: str = "info", env: dict[str, str] | None = None, bus_mode: int = 0o666) -> None:
        assert name in WORKERS, name
        self.name = name
        self.tmp = tmp
        # The partial ``config`` of a test, over the contract's defaults and built
        # with the same builder the supervisor uses.
        raw = {"node_name": "test-node", "log_level": log_level, **config}
        raw["workers"] = {"heartbeat_interval": heartbeat_interval_s, "ready_timeout": 10.0,
                          "bus_hwm": 10_000, **config.get("workers", {})}
        self.config = Config.from_dict(raw)
        self.spec = WorkerSpec(
            name=name, incarnation=envelope.new_incarnation(), supervisor_pid=os.getpid(),
            bus_endpoint=f"ipc://{tmp}/bus-{os.getpid()}-{id(self)}.sock",
            identity=identity, config=self.config.to_dict())
        self.extra_env = env or {}
        self.bus_mode = bus_mode
        self.received: list[Received] = []
        self.status: list[tuple[float, dict[str, Any]]] = []
        self.problems: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = tmp / f"{name}-{id(self)}.stderr"
        self._last_seq: dict[str, int] = {}
        self._status_buf = b""
        self._status_fd = -1
        self._sock: zmq.Socket[Any] | None = None
        self._poller = zmq.Poller()

    # -- lifecycle ------------------------------------------------------------------
    def start(self, *, ready_timeout_s: float = 10.0) -> WorkerRun:
        sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.XSUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.spec.bus_endpoint)
        # The worker may run as nobody: it must be allowed to connect (unless a test says otherwise).
        os.chmod(self.spec.bus_endpoint.removeprefix("ipc://"), self.bus_mode)
        sock.send(b"\x01")  # subscribe to everything; replayed to every new pipe
        self._sock = sock
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read_fd, False)
        self._status_fd = read_fd
        env = {k: v for k, v in os.environ.items() if k in _PASS_ENV} | self.extra_env
        env[SPEC_ENV] = self.spec.to_env()
        env[STATUS_FD_ENV] = str(write_fd)
        with open(self.stderr_path, "wb") as err:
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "cnisup.workers", self.name],
                    env=env, pass_fds=(write_fd,), start_new_session=True,
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd="/", close_fds=True)
            finally:
                os.close(write_fd)
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(read_fd, zmq.POLLIN)
        self.wait_status(lambda s: s["t"] in ("ready", "exit"), timeout_s=ready_timeout_s)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_exit(self, timeout_s: float = 10.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not exit within {timeout_s} s\n{self.stderr()}")
            self.pump(0.05)
        self.pump(0.05)  # what was sent before the exit
        return self.proc.returncode

    def stop(self, timeout_s: float = 5.0) -> int:
        """SIGTERM, as the supervisor's stop; the exit code (0 when all went well)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait_exit(timeout_s)
        except AssertionError:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._status_fd >= 0:
            os.close(self._status_fd)
            self._status_fd = -1

    def stderr(self) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {self.name} stderr ---\n{text[-4000:]}"

    # -- reading ----------------------------------------------------------------------
    def pump(self, timeout_s: float) -> None:
        """Read whatever the worker sent, waiting up to ``timeout_s`` for the first."""
        ready = dict(self._poller.poll(max(0, int(timeout_s * 1000))))
        if self._sock is not None and self._sock in ready:
            while True:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._take(frames, time.monotonic())
        if self._status_fd in ready:
            self._read_status()

    def _take(self, frames: list[bytes], at: float) -> None:
        env = envelope.decode(frames)
        for error in validation.validator(env).iter_errors(env):
            self.problems.append(f"schema: {env['kind']}: {error.message}")
        last = self._last_seq.get(env["incarnation"], 0)
        if env["seq"] != last + 1:
            self.problems.append(f"seq {env['seq']} after {last} in {env['incarnation']}")
        self._last_seq[env["incarnation"]] = env["seq"]
        self.received.append(Received(at, env))

    def _read_status(self) -> None:
        try:
            chunk = os.read(self._status_fd, 65536)
        except BlockingIOError:
            return
        if not chunk:  # the worker is gone: stop polling a closed pipe
            self._poller.unregister(self._status_fd)
            return
        self._status_buf += chunk
        *lines, self._status_buf = self._status_buf.split(b"\n")
        now = time.monotonic()
        self.status.extend((now, json.loads(line)) for line in lines if line)

    def mark(self) -> int:
        """Index of the next event: pass as ``since`` to look only at what follows."""
        self.pump(0)
        return len(self.received)

    def events(self, kind: str | None = None, *, since: int = 0, until: int | None = None,
               **match: Any) -> list[Received]:
        return [r for r in self.received[since:until] if matches(r, kind, match)]

    def wait_for(self, kind: str, *, since: int = 0, timeout_s: float = 5.0, **match: Any) -> Received:
        """The first event at index >= ``since`` of ``kind`` whose data has ``match``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for r in self.received[since:]:
                if matches(r, kind, match):
                    return r
            left = deadline - time.monotonic()
            if left <= 0:
                got = "\n".join(f"  {r.kind} {json.dumps(r.data)[:300]}" for r in self.received[since:])
                raise AssertionError(
                    f"no {kind} {match} within {timeout_s} s from {self.name}; got:\n{got}\n{self.stderr()}")
            self.pump(min(left, 0.1))

    def index(self, r: Received) -> int:
        return next(i for i, x in enumerate(self.received) if x is r)

    def wait_status(self, pred: Callable[[dict[str, Any]], bool], *, timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            for _, s in self.status[seen:]:
                if pred(s):
                    return s
            seen = len(self.status)
            if time.monotonic() > deadline:
                raise AssertionError(f"no such status line from {self.name} within {timeout_s} s: "
                                     f"{self.status[-3:]}\n{self.stderr()}")
            self.pump(0.05)

    def exit_status(self) -> dict[str, Any] | None:
        return next((s for _, s in reversed(self.status) if s["t"] == "exit"), None)

    def heartbeat_gaps(self, *, more: int = 0, timeout_s: float = 5.0) -> list[float]:
        """Seconds between the heartbeats received, after waiting for ``more`` of them."""
        def beats() -> list[float]:
            return [t for t, s in self.status if s["t"] == "hb"]
        want, deadline = len(beats()) + more, time.monotonic() + timeout_s
        while len(beats()) < want and time.monotonic() < deadline:
            self.pump(0.05)
        return [b - a for a, b in itertools.pairwise(beats())]
