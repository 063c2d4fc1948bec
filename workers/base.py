"""The run loop every worker shares: stop flag, heartbeat, status channel.

A worker subclasses ``Worker`` and implements ``run``; it calls
``ctx.heartbeat()`` from its main loop (at least once per
``heartbeat_interval_s``), publishes with ``ctx.publish`` and returns when
``ctx.stopping`` is set. ``ctx.wait(t)`` is the interruptible sleep.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import resource
import select
import time
from typing import Any

from cnisup.workers.bus import Bus
from cnisup.workers.spec import WorkerSpec, status_line

_PAGE = resource.getpagesize()


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class WorkerContext:
    def __init__(self, spec: WorkerSpec, bus: Bus, status_fd: int, stop_fd: int) -> None:
        self.spec = spec
        self.config = spec.config
        self.bus = bus
        self.log = logging.getLogger(f"cnisup.{spec.name}")
        self.stop_fd = stop_fd  #: readable once SIGTERM arrived; poll it beside your own fds
        self._status_fd = status_fd
        self._stopping = False
        self._last_beat = 0.0
        self._info: dict[str, Any] = {}

    # -- the bus -----------------------------------------------------------
    def publish(self, kind: str, data: dict[str, Any], ts: int | None = None) -> None:
        self.bus.publish(kind, data, ts)

    def warn(self, code: str, message: str, **fields: Any) -> None:
        """A problem the worker survived: logged and published as ``monitor.warning``."""
        self.log.warning("%s: %s", code, message)
        self.publish("monitor.warning", {
            "family": self.spec.family, "worker": self.spec.name,
            "code": code, "message": message, **fields,
        })

    # -- liveness ----------------------------------------------------------
    def set_info(self, **info: Any) -> None:
        """Worker-specific details shown by ``cnisup status``."""
        self._info.update(info)

    def heartbeat(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < self.spec.heartbeat_interval_s / 2:
            return
        self._last_beat = now
        self.bus.drain()
        self.status("hb", sent=self.bus.sent, dropped=self.bus.dropped,
                    rss=rss_bytes(), info=self._info)

    def status(self, kind: str, **fields: Any) -> None:
        """One line to the supervisor; never blocks (a full pipe loses a beat)."""
        try:
            os.write(self._status_fd, status_line(kind, **fields))
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EPIPE):
                raise

    # -- stopping ----------------------------------------------------------
    @property
    def stopping(self) -> bool:
        if not self._stopping:
            r, _, _ = select.select([self.stop_fd], [], [], 0)
            self._stopping = bool(r)
        return self._stopping

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, heartbeating; True as soon as a stop is asked."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.heartbeat()
            left = deadline - time.monotonic()
            if left <= 0:
                return self.stopping
            step = min(left, self.spec.heartbeat_interval_s / 2)
            r, _, _ = select.select([self.stop_fd], [], [], step)
            if r:
                self._stopping = True
                return True


class Worker(abc.ABC):
    """One monitor. ``run`` returns when ``ctx.stopping``; it raises
    ``CapabilityMissing`` (exit 77) or ``WorkerConfigError`` (exit 78)."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    @abc.abstractmethod
    def run(self) -> None: ...
