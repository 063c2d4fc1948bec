"""The supervisor loop (the arbiter): one slot per monitor family, fed with
what the fds say (a worker's status pipe, its pidfd, the control socket, the
signal wake-up), ticked at the next deadline any slot or timer asked for.
Every decision about a worker's life is its slot's (``slot.py``); this
module owns the sockets, the lock, signals, reload and the ready/stopped
announcements.

Everything runs in this one thread except the proxy. Signal handlers only
queue a command ("stop", "reload") that the loop carries out.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

import zmq

from cnisup.protocol import envelope, exitcodes
from cnisup.protocol.kinds import SupervisorKind as K
from cnisup.protocol.untrusted import one_line
from cnisup.supervisor import control, probes, runtime, version
from cnisup.supervisor.config import Config, ConfigError, load
from cnisup.supervisor.proxy import INPROC_BUS, Proxy, ProxyError, ProxySettings
from cnisup.supervisor.slot import DOWN, QUIET, Slot, State, SystemClock, Wiring
from cnisup.supervisor.spawn import Child, spawn
from cnisup.workers.base import rss_bytes
from cnisup.workers.bus import Bus
from cnisup.workers.privileges import Identity
from cnisup.workers.registry import FAMILIES, Family, WorkerInfo
from cnisup.workers.spec import WorkerSpec

log = logging.getLogger("cnisup.supervisor")

#: Keys whose change needs a restart of ``cnisup start`` itself (the sockets are
#: bound, and the private bus belongs to the workers' user, at start).
RESTART_ONLY_KEYS = ("runtime_dir", "publish", "control", "workers.user")
#: Seconds the last events may take through the proxy on the way out.
FLUSH_TIMEOUT_S = 1.0
#: Our own recent events kept for the journal's replay requests (supervisor events are rare).
REPLAY_KEEP = 2000
#: An unchanged supervisor.progress is repeated this many times, each after twice as long.
PROGRESS_REPEATS = 4
#: Seconds the other families wait for the journal to listen before they start anyway.
JOURNAL_FIRST_S = 5.0


class StartError(Exception):
    """cnisup start cannot run (lock held, runtime dir unusable, bind failed)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code  #: exit code of ``cnisup start``: 78 for an unsafe runtime dir


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def sd_notify(message: str) -> None:
    """systemd's notify protocol (Type=notify), without libsystemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(message.encode(), addr)
        except OSError as exc:
            log.warning("sd_notify(%s) failed: %s", message, exc)


class Supervisor:
    def __init__(self, cfg: Config, *, config_path: str | None = None,
                 preset: str | None = None, log_level: str | None = None) -> None:
        self.cfg = cfg
        self._load_args = {"path": config_path, "preset": preset, "log_level": log_level}
        self.config_path = config_path
        self.incarnation = envelope.new_incarnation()
        self.clock = SystemClock()
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.commands: deque[str] = deque()
        self.stopping = False
        self.announced_ready = False
        self.identity = self._identity()
        wiring = Wiring(spawn=self._spawn, publish=self.publish, choose=self._choose, clock=self.clock)
        self.slots = {name: Slot(fam, cfg, wiring) for name, fam in FAMILIES.items()}
        self._deferred: list[Slot] = []
        self._deferred_until = 0.0
        self.bus: Bus | None = None
        self.proxy: Proxy | None = None
        self.control: zmq.Socket[Any] | None = None
        self._lock_fd: int | None = None
        #: systemd's WatchdogSec: WATCHDOG=1 at least every half of it, and whenever the loop is
        #: awake anyway and a quarter of it passed (an idle supervisor then wakes for the
        #: workers' heartbeats only, not for the watchdog as well)
        self._wd_s = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
        self._wd_last = -math.inf
        self._progress_at = 0.0  #: when supervisor.progress may be published next
        self._progress_said: dict[str, int] = {}  #: incarnation -> seq in the last one
        self._progress_repeats = PROGRESS_REPEATS  #: repeats of an unchanged progress so far

    # -- setup -----------------------------------------------------------------
    def _identity(self) -> Identity:
        ident = probes.worker_identity(self.cfg)
        if ident["note"]:
            log.warning("%s", ident["note"])
        if os.geteuid() == 0:
            return Identity(ident["uid"], ident["gid"], (), True)
        # Without root nothing can be shed but capabilities; see privileges.drop_to.
        return Identity(os.getuid(), os.getgid(), tuple(os.getgroups()), False)

    def _lock(self) -> None:
        """The runtime dir (made safe), its private dir, and the lock in it."""
        try:
            dir_fd = runtime.ensure(self.cfg.runtime_dir)
            try:
                # The lock first: a second instance is refused before it touches anything.
                self._lock_fd = runtime.lock(dir_fd, os.path.basename(self.cfg.lock_path), self.cfg.lock_path)
                os.close(runtime.open_dir("private", mode=0o711, dir_fd=dir_fd, what="private dir",
                                          shown=os.path.join(self.cfg.runtime_dir, "private")))
            finally:
                os.close(dir_fd)
        except runtime.Refused as exc:
            raise StartError(str(exc), exitcodes.EX_CONFIG) from None
        except runtime.Held as exc:
            raise StartError(str(exc)) from None

    # -- what slots use ------------------------------------------------------------
    def publish(self, kind: str, data: dict[str, Any]) -> None:
        assert self.bus is not None, "nothing is published before run() connected the bus"
        self.bus.publish(kind, data)

    def _choose(self, family: Family) -> probes.Choice:
        return probes.choose(self.cfg, family)

    def _spawn(self, worker: WorkerInfo, incarnation: str) -> Child:
        return spawn(WorkerSpec(
            name=worker.name, incarnation=incarnation, supervisor_pid=os.getpid(),
            bus_endpoint=self.cfg.privileged_bus_endpoint if worker.privileged else self.cfg.bus_endpoint,
            identity=None if worker.privileged else self.identity,
            config=self.cfg.to_dict()))

    # -- running ----------------------------------------------------------------
    def run(self) -> int:
        self._lock()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self._open_sockets()
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake = wake_r
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for sig, cmd in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"), (signal.SIGHUP, "reload")):
            signal.signal(sig, self._enqueue(cmd))
        log.info("cnisup %s supervising on node %s; events at %s; control at %s", version(),
                 self.cfg.node_name, ", ".join(self.cfg.publish.endpoints), self.cfg.control.endpoint)
        self.publish(K.STARTED, {"pid": os.getpid(), "version": version(), "config_path": self.config_path,
                                 "preset": self.cfg.preset, "endpoints": self.cfg.publish.endpoints})
        self._prepare_dirs()
        # The journal first, so it hears the other families from their first event.
        journal = self.slots["journal"]
        journal.start()
        self._deferred = [s for s in self.slots.values() if s is not journal]
        self._deferred_until = time.monotonic() + JOURNAL_FIRST_S
        try:
            self._loop()
        finally:
            self._shutdown()
            wake_w.close()
            wake_r.close()
        return exitcodes.OK

    def _open_sockets(self) -> None:
        """The proxy (private XSUB, public XPUB), our own publisher, the control socket."""
        gid = self.identity.gid if os.geteuid() == 0 else None
        curve = self.cfg.publish.curve
        self.proxy = Proxy(ProxySettings(
            bus_endpoint=self.cfg.bus_endpoint, privileged_bus_endpoint=self.cfg.privileged_bus_endpoint,
            public_endpoints=self.cfg.publish.endpoints,
            hwm=self.cfg.publish.hwm, worker_gid=gid,
            worker_uid=self.identity.uid if os.geteuid() == 0 else None,
            curve_secret_file=curve.server_secret_key_file,
            curve_authorized_dir=curve.authorized_keys_dir,
            consumer_endpoint=self.cfg.consumer_endpoint, consumer_hwm=self.cfg.journal.queue,
            live_endpoint=self.cfg.live_endpoint), self.ctx)
        try:
            self.proxy.start()
        except ProxyError as exc:
            raise StartError(str(exc)) from exc
        stamp = envelope.Stamp("supervisor", self.cfg.node_name, self.incarnation)
        self.bus = Bus(INPROC_BUS, stamp, context=self.ctx, sndhwm=self.cfg.workers.bus_hwm, keep=REPLAY_KEEP)
        self.bus.wait_ready(5.0)
        self.control = self.ctx.socket(zmq.ROUTER)
        control.configure(self.control)
        try:
            self.control.bind(self.cfg.control.endpoint)
        except zmq.ZMQError as exc:
            raise StartError(f"cannot bind control.endpoint {self.cfg.control.endpoint}: {exc}") from exc
        if self.cfg.control.endpoint.startswith("ipc://"):
            runtime.secure_socket(self.cfg.control.endpoint[len("ipc://"):], 0o660, gid=-1 if gid is None else gid)

    def _prepare_dirs(self) -> None:
        """The journal directories inside the runtime dir (the fallback journal's,
        and the development preset's journal.path), owned by the workers' user.
        Elsewhere (/var/lib/cnisup) the package or the operator makes them."""
        inside = os.path.realpath(self.cfg.runtime_dir) + os.sep
        for path in (self.cfg.journal_fallback_path, self.cfg.journal_path):
            d = os.path.dirname(path)
            if not os.path.realpath(d).startswith(inside):
                continue
            os.makedirs(d, mode=0o750, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(d, self.identity.uid, self.identity.gid)

    def _enqueue(self, cmd: str) -> Callable[[int, FrameType | None], None]:
        """A signal handler that only queues ``cmd`` for the loop."""
        def handler(_signum: int, _frame: FrameType | None) -> None:
            self.commands.append(cmd)
        return handler

    def _loop(self) -> None:
        while True:
            while self.commands:
                cmd = self.commands.popleft()
                if cmd == "stop":
                    self._begin_stop("signal")
                elif cmd == "reload":
                    self._reload()
            deadline = self._tick()
            if self.stopping and not any(s.child for s in self.slots.values()):
                return
            journal = self.slots["journal"]
            if self.stopping and not journal.stopping and not any(s.child for s in self._monitors()):
                journal.stop()  # last: it has heard everything the others said
                continue
            self._poll(deadline)
            self._maybe_announce_ready()

    def _poll(self, deadline: float | None) -> None:
        """Wait for a signal, a control request, a status line or an exit, or the deadline."""
        assert self.control is not None
        poller = zmq.Poller()
        poller.register(self._wake.fileno(), zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        fds: dict[int, tuple[Slot, str]] = {}
        for slot in self.slots.values():
            if slot.child is not None:
                fds[slot.child.pidfd] = (slot, "exit")
                if slot.child.status_open:
                    fds[slot.child.status_fd] = (slot, "status")
        for fd in fds:
            poller.register(fd, zmq.POLLIN)
        timeout_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
        exited: list[Slot] = []
        for item, _ in poller.poll(timeout_ms):
            if item == self._wake.fileno():  # pyzmq hands back fds, not objects
                try:
                    self._wake.recv(4096)
                except BlockingIOError:
                    pass
            elif item is self.control:
                self._serve_control()
            else:
                slot, what = fds[item]  # type: ignore[index]
                if what == "status":
                    slot.on_status()
                else:
                    exited.append(slot)
        # Exits last, so the worker's final status lines (its exit reason) count.
        for slot in exited:
            slot.on_exit()

    def _tick(self) -> float | None:
        """Every slot's due work; the earliest deadline of anything (None: none)."""
        now = time.monotonic()
        if self._deferred and (self.slots["journal"].state is not State.STARTING or now >= self._deferred_until):
            for slot in self._deferred:
                slot.start()
            self._deferred = []
        deadlines = [d for s in self.slots.values() if (d := s.tick()) is not None]
        if self._deferred:
            deadlines.append(self._deferred_until)
        if self._wd_s:
            if now >= self._wd_last + self._wd_s / 4:
                self._wd_last = now
                sd_notify("WATCHDOG=1")
            deadlines.append(self._wd_last + self._wd_s / 2)
        progress = self._progress_due(now)
        if progress is not None:
            deadlines.append(progress)
        if not self.announced_ready:
            ready_at = self.started + self.cfg.workers.ready_timeout
            if now > ready_at:
                self._maybe_announce_ready(deadline_passed=True)
            else:
                deadlines.append(ready_at)
        return min(deadlines, default=None)

    def progress(self, *, take: bool = False) -> list[dict[str, Any]]:
        """Every live incarnation's last seq (and per kind its kseq), ours first."""
        assert self.bus is not None
        own = {"incarnation": self.incarnation, "source": "supervisor", "seq": self.bus.stamp.seq,
               "kseq": dict(self.bus.stamp.kseqs)}
        return [own, *(e for s in self.slots.values() for e in (s.take_progress() if take else s.peek_progress()))]

    def _progress_due(self, now: float) -> float | None:
        """Publish supervisor.progress when it is due and something was published
        since the last one; after the stream goes quiet, repeat it a few times
        at growing intervals (a subscriber that was behind may have lost the
        first one too), then say nothing. Returns when to look again."""
        if now < self._progress_at:
            return self._progress_at
        entries = self.progress()
        moved = any(self._progress_said.get(e["incarnation"]) != e["seq"] for e in entries) or any(
            e.get("ended") for e in entries)
        if moved:
            self._progress_repeats = 0
        elif self._progress_repeats >= PROGRESS_REPEATS:
            return None  # woken again by the next status line, which may bring news
        else:
            self._progress_repeats += 1
        self._publish_progress(self.cfg.publish.progress_interval * 2 ** self._progress_repeats)
        return self._progress_at

    def _publish_progress(self, next_in_s: float = 0.0) -> None:
        entries = self.progress(take=True)
        self._progress_said = {e["incarnation"]: e["seq"] for e in entries}
        self._progress_at = time.monotonic() + next_in_s
        self.publish(K.PROGRESS, {"incarnations": entries})
        assert self.bus is not None
        self._progress_said[self.incarnation] = self.bus.stamp.seq  # this event itself is not news

    def _serve_control(self) -> None:
        assert self.control is not None
        try:
            while self.control.poll(0):
                control.serve_one(self, self.control)
        except zmq.ZMQError as exc:
            log.warning("control socket: %s", exc)

    def _maybe_announce_ready(self, *, deadline_passed: bool = False) -> None:
        """Once every enabled family's worker is ready (or down for good), or
        ready_timeout after start in any case, so a crash-looping worker cannot
        keep systemd waiting: which families lag is in ``degraded``."""
        if self.announced_ready:
            return
        active = [s for s in self.slots.values() if s.state not in QUIET and s.state not in DOWN]
        lagging = [s.family.name for s in active if not s.ready]
        if lagging and not deadline_passed:
            return
        self.announced_ready = True
        down = [s.family.name for s in self.slots.values() if s.state in DOWN]
        self.publish(K.READY, {"workers": {s.family.name: s.worker.name for s in active if s.worker and s.ready},
                               "degraded": lagging + down,
                               "fallback": [s.family.name for s in active if s.on_fallback]})
        sd_notify("READY=1")

    # -- reload and stop -----------------------------------------------------------
    def _reload(self) -> None:
        try:
            new = load(self._load_args["path"], preset=self._load_args["preset"],
                       log_level=self._load_args["log_level"])
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.publish(K.CONFIG_RELOAD_FAILED, {"key": exc.key, "error": str(exc)})
            return
        except Exception as exc:  # a bug in loading must not stop a running supervisor either
            error = one_line(f"{type(exc).__name__}: {exc}")
            log.exception("reload failed, keeping the running configuration: %s", error)
            self.publish(K.CONFIG_RELOAD_FAILED, {"key": "", "error": error})
            return
        old_flat, new_flat = _flatten(self.cfg.to_dict()), _flatten(new.to_dict())
        changed = sorted(k for k in set(old_flat) | set(new_flat) if old_flat.get(k) != new_flat.get(k))
        ignored = [k for k in changed if k.split(".")[0] in RESTART_ONLY_KEYS or k in RESTART_ONLY_KEYS]
        for key in RESTART_ONLY_KEYS:
            section, _, name = key.partition(".")
            if name:
                setattr(getattr(new, section), name, getattr(getattr(self.cfg, section), name))
            else:
                setattr(new, key, getattr(self.cfg, key))
        if ignored:
            log.warning("reload: %s need a restart of cnisup start; not applied", ", ".join(ignored))
        applied = [k for k in changed if k not in ignored]
        self.cfg = new
        logging.getLogger().setLevel(new.log_level.upper())
        # Only the workers that read a changed key restart: the others never go blind.
        restarted: dict[str, str] = {}
        for name, slot in self.slots.items():
            why = slot.reload_reason(applied)
            if slot.reconfigure(new, why) and why is not None:
                restarted[name] = why
        self.publish(K.CONFIG_RELOADED, {"changed": applied, "ignored": ignored, "restarted": restarted})
        log.info("configuration reloaded; changed: %s; restarted: %s", ", ".join(applied) or "nothing",
                 ", ".join(f"{n} ({why})" for n, why in restarted.items()) or "nothing")

    def _begin_stop(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._deferred = []
        log.info("stopping (%s)", why)
        sd_notify("STOPPING=1")
        self.publish(K.STOPPING, {"reason": why})
        for slot in self._monitors():
            slot.stop()

    def _monitors(self) -> list[Slot]:
        """Every slot but the journal's."""
        return [s for s in self.slots.values() if s.family.name != "journal"]

    def _shutdown(self) -> None:
        for slot in self.slots.values():  # only on an exception path
            slot.kill()
        self._publish_progress()  # where everything stands at the end of the stream
        self.publish(K.STOPPED, {"uptime_s": round(time.monotonic() - self.started, 3)})
        assert self.bus is not None and self.proxy is not None and self.control is not None
        published = self.bus.sent + sum(s.sent_total for s in self.slots.values())
        if not self.proxy.flush(published, FLUSH_TIMEOUT_S):
            log.warning("the proxy did not forward every event within %g s of stopping", FLUSH_TIMEOUT_S)
        self.control.close(linger=0)
        self.bus.close(linger_ms=1000)
        self.proxy.stop()
        self.ctx.term()
        if self.cfg.control.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.cfg.control.endpoint[len("ipc://"):])
            except OSError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    # -- control requests ------------------------------------------------------------
    def replay(self, incarnation: str, from_seq: int, to_seq: int) -> dict[str, Any]:
        recent = self.bus.recent if self.bus is not None and incarnation == self.incarnation else {}
        seqs = range(from_seq, to_seq + 1)
        return {"envelopes": [recent[n].decode() for n in seqs if n in recent],
                "missing": [n for n in seqs if n not in recent]}

    # -- status -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "supervisor": {
                "pid": os.getpid(), "version": version(), "node": self.cfg.node_name,
                "incarnation": self.incarnation, "started_at": self.started_wall,
                "uptime_s": round(now - self.started, 3), "state": "stopping" if self.stopping else "running",
                "config_path": self.config_path, "preset": self.cfg.preset,
                "endpoints": self.cfg.publish.endpoints, "events_sent": self.bus.sent if self.bus else 0,
                "events_dropped": self.bus.dropped if self.bus else 0,
                "proxy": self.proxy.statistics() if self.proxy else {},
                "rss_bytes": rss_bytes(),
            },
            "workers": [s.view() for s in self.slots.values()],
        }
