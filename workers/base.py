"""The contract every worker shares: one loop shape, one wait, one probe.

A worker subclasses ``Worker``, names its ``probe`` in the registry (the same
function ``cnisup check`` runs; ``python -m cnisup.workers`` runs it before
the worker is built, and exits 77 with its reason when it fails), and
implements ``run``, whose loop always has this shape::

    while not ctx.stopping:
        ready = ctx.wait(my_fds, timeout_s=until_my_next_deadline)
        ...handle the ready fds and what is due...

``ctx.wait`` is the only place a worker blocks: it sends heartbeats while it
waits, returns early when a stop is asked (``ctx.stopping`` is then true),
and otherwise returns the readable fds (empty on timeout). A worker that does
long work between waits calls ``ctx.heartbeat()`` now and then.
"""

from __future__ import annotations

import abc
import errno
import logging
import math
import os
import resource
import select
import time
from collections.abc import Callable, Iterable
from typing import Any

from cnisup.protocol.kinds import MonitorKind
from cnisup.protocol.settings import Config
from cnisup.workers.bus import Bus
from cnisup.workers.registry import WorkerInfo
from cnisup.workers.spec import status_line

_PAGE = resource.getpagesize()
_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
#: Seconds between heartbeats while a worker publishes (when idle: heartbeat_interval / 2),
#: and from the end of a burst to the heartbeat that reports it (``status`` is never staler).
BUSY_BEAT_S = 1.0


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class WorkerContext:
    def __init__(self, info: WorkerInfo, config: Config, bus: Bus, status_fd: int, stop_fd: int) -> None:
        self.info = info
        self.config = config
        self.bus = bus
        self.log = logging.getLogger(f"cnisup.{info.name}")
        self._stop_fd = stop_fd  #: readable once SIGTERM arrived
        self._status_fd = status_fd
        self._stopping = False
        self._last_beat = 0.0
        self._beat_counts = (0, 0)  #: (sent, dropped) at the last heartbeat
        self._info: dict[str, Any] = {}
        self._info_changed = False  #: set_info since the last heartbeat
        self._woke = False  #: ``wait`` returned ready fds since the last heartbeat (describe() may differ)
        self._describe: Callable[[], dict[str, Any]] | None = None

    # -- the bus -----------------------------------------------------------
    def publish(self, kind: str, data: dict[str, Any], ts: int | None = None) -> None:
        self.bus.publish(kind, data, ts)

    def warn(self, code: str, message: str, **fields: Any) -> None:
        """A problem the worker survived: logged and published as ``monitor.warning``."""
        self.log.warning("%s: %s", code, message)
        self.publish(MonitorKind.WARNING, {
            "family": self.info.family, "worker": self.info.name,
            "code": code, "message": message, **fields,
        })

    # -- liveness ----------------------------------------------------------
    def set_info(self, **info: Any) -> None:
        """Worker-specific details shown by ``cnisup status``."""
        self._info_changed |= any(self._info.get(k, self) != v for k, v in info.items())
        self._info.update(info)

    def describe(self, fn: Callable[[], dict[str, Any]]) -> None:
        """Details computed at each heartbeat (state that changes in other threads)."""
        self._describe = fn

    @property
    def _beat_every_s(self) -> float:
        return self.config.workers.heartbeat_interval / 2

    def _beat_due(self) -> float:
        """When the next heartbeat is due (monotonic seconds). With news: BUSY_BEAT_S
        after the last. Idle: on the next multiple of heartbeat_interval/2 of the
        system-wide monotonic clock at least half a period after the last, so every
        worker beats at the same instant and the supervisor wakes once for all of them;
        beats are then between 1/2 and 3/2 periods apart."""
        period = self._beat_every_s
        if self._unreported:
            return self._last_beat + min(BUSY_BEAT_S, period)
        return (math.floor((self._last_beat + period / 2) / period) + 1) * period

    def heartbeat(self, *, force: bool = False) -> None:
        """Tell the supervisor we are alive: every heartbeat_interval/2 when idle,
        at most every BUSY_BEAT_S while events flow (its counters stay fresh)."""
        now = time.monotonic()
        if not force and now < self._beat_due():
            return
        self._last_beat = now
        self._beat_counts = (self.bus.sent, self.bus.dropped)
        self._info_changed = self._woke = False
        if self._describe is not None:
            self._info.update(self._describe())
        self.bus.drain()
        stamp = self.bus.stamp
        self.status("hb", sent=self.bus.sent, dropped=self.bus.dropped, seq=stamp.seq, kseq=stamp.kseqs,
                    rss=rss_bytes(), info=self._info)

    @property
    def _unreported(self) -> bool:
        """Published, changed or handled something the last heartbeat did not report."""
        return self._woke or self._info_changed or (self.bus.sent, self.bus.dropped) != self._beat_counts

    def status(self, kind: str, **fields: Any) -> None:
        """One line to the supervisor; never blocks (a full pipe loses a beat)."""
        try:
            os.write(self._status_fd, status_line(kind, **fields))
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EPIPE):
                raise

    # -- waiting and stopping -------------------------------------------------
    @property
    def stopping(self) -> bool:
        if not self._stopping:
            r, _, _ = select.select([self._stop_fd], [], [], 0)
            self._stopping = bool(r)
        return self._stopping

    def wait(self, fds: Iterable[int] = (), timeout_s: float | None = None) -> set[int]:
        """Block until one of ``fds`` is readable (or hung up), ``timeout_s``
        passed (None: no timeout) or a stop is asked, heartbeating meanwhile.
        Returns the ready fds; empty on timeout or stop (then ``stopping``)."""
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        poller = select.poll()
        poller.register(self._stop_fd, select.POLLIN)
        watched = set(fds)
        for fd in watched:
            poller.register(fd, _READABLE)
        while True:
            self.heartbeat()
            now = time.monotonic()
            # After a burst, one more beat BUSY_BEAT_S later reports its end; then the long sleep.
            wake = self._beat_due()
            if deadline is not None:
                wake = min(wake, deadline)
            ready = {fd for fd, _ in poller.poll(max(0.0, wake - now) * 1000)}
            if self._stop_fd in ready:
                self._stopping = True
                return set()
            if ready:
                self._woke = True
                return ready & watched
            if deadline is not None and time.monotonic() >= deadline:
                return set()

    def sleep(self, seconds: float) -> bool:
        """``wait`` with no fds: True when a stop was asked."""
        self.wait((), seconds)
        return self.stopping


class Worker(abc.ABC):
    """One monitor. ``run`` returns when ``ctx.stopping``; it raises
    ``CapabilityMissing`` (exit 77) or ``WorkerConfigError`` (exit 78)."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    def prepare(self) -> None:  # noqa: B027 - optional hook, most workers have nothing to do here
        """Work that needs the bus and must be done before the worker reports
        ready (the constructor runs before the bus is up)."""

    @abc.abstractmethod
    def run(self) -> None: ...
