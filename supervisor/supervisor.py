"""The supervisor loop (the arbiter): one process per monitor family, exits
learned from pidfds, heartbeats and readiness from each worker's status pipe,
restarts and fallbacks decided by ``policy``, lifecycle events published on
the bus, status answered on the control socket.

Everything runs in this one thread except the proxy. Signal handlers only
queue a command ("stop", "reload") that the loop carries out.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
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
from cnisup.supervisor import __version__, control, policy, probes
from cnisup.supervisor.config import Config, ConfigError, load
from cnisup.supervisor.proxy import INPROC_BUS, Proxy, ProxySettings
from cnisup.supervisor.spawn import spawn
from cnisup.supervisor.watcher import (
    BACKOFF,
    DISABLED,
    FAILED,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPING,
    UNAVAILABLE,
    Watcher,
)
from cnisup.workers.bus import Bus
from cnisup.workers.registry import FAMILIES, PLANNED_FAMILIES, WorkerInfo
from cnisup.workers.spec import IdentitySpec, WorkerSpec

log = logging.getLogger("cnisup.supervisor")

#: Longest the loop sleeps; timers (restarts, heartbeat checks) are this precise.
TICK_S = 0.1
#: Keys whose change needs a restart of ``cnisup start`` itself.
RESTART_ONLY_KEYS = ("runtime_dir", "publish", "control")


class StartError(Exception):
    """cnisup start cannot run (lock held, runtime dir unusable, bind failed)."""


def _settings(cfg: Config) -> policy.RestartSettings:
    r = cfg.restart
    return policy.RestartSettings(
        initial_delay_s=r.initial_delay, multiplier=r.multiplier, max_delay_s=r.max_delay,
        jitter_s=r.jitter, stable_after_s=r.stable_after, flap_threshold=r.flap_threshold,
        flap_window_s=r.flap_window, reprobe_interval_s=r.reprobe_interval)


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
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.commands: deque[str] = deque()
        self.stopping = False
        self.announced_ready = False
        self.watchers = {name: Watcher(fam) for name, fam in FAMILIES.items()}
        self.identity = self._identity()
        self._lock_fd: int | None = None
        self._wd_interval = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6
        self._wd_last = 0.0

    # -- setup -----------------------------------------------------------------
    def _identity(self) -> IdentitySpec:
        ident = probes.worker_identity(self.cfg)
        if ident["note"]:
            log.warning("%s", ident["note"])
        if os.geteuid() == 0:
            return IdentitySpec(ident["uid"], ident["gid"], (), True)
        # Without root nothing can be shed but capabilities; see privileges.drop_to.
        return IdentitySpec(os.getuid(), os.getgid(), tuple(os.getgroups()), False)

    def _lock(self) -> None:
        try:
            os.makedirs(self.cfg.runtime_dir, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise StartError(f"cannot create runtime_dir {self.cfg.runtime_dir}: {exc.strerror} "
                             "(run as root, or use --preset development)") from exc
        fd = os.open(self.cfg.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartError(f"another cnisup instance (pid {holder}) holds {self.cfg.lock_path}; "
                             "refusing to start a second one") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    # -- the bus ----------------------------------------------------------------
    def publish(self, kind: str, **data: Any) -> None:
        self.bus.publish(kind, data)

    def _worker_event(self, kind: str, w: Watcher, **data: Any) -> None:
        base = {"family": w.family.name, "worker": w.worker.name if w.worker else None}
        self.publish(kind, **base, **data)

    # -- running ----------------------------------------------------------------
    def run(self) -> int:
        self._lock()
        self.ctx: zmq.Context[Any] = zmq.Context()
        gid = self.identity.gid if os.geteuid() == 0 else None
        curve = self.cfg.publish.curve
        self.proxy = Proxy(ProxySettings(
            bus_endpoint=self.cfg.bus_endpoint, public_endpoints=self.cfg.publish.endpoints,
            hwm=self.cfg.publish.hwm, worker_gid=gid,
            worker_uid=self.identity.uid if os.geteuid() == 0 else None,
            curve_secret_file=curve.server_secret_key_file,
            curve_authorized_dir=curve.authorized_keys_dir), self.ctx)
        try:
            self.proxy.start()
        except Exception as exc:
            raise StartError(str(exc)) from exc
        stamp = envelope.Stamp("supervisor", self.cfg.node_name, self.incarnation)
        self.bus = Bus(INPROC_BUS, stamp, context=self.ctx, sndhwm=self.cfg.workers.bus_hwm)
        self.bus.wait_ready(5.0)
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        try:
            self.control.bind(self.cfg.control.endpoint)
        except zmq.ZMQError as exc:
            raise StartError(f"cannot bind control.endpoint {self.cfg.control.endpoint}: {exc}") from exc
        if self.cfg.control.endpoint.startswith("ipc://"):
            path = self.cfg.control.endpoint[len("ipc://"):]
            os.chmod(path, 0o660)
            if gid is not None:
                os.chown(path, 0, gid)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake = wake_r
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for sig, cmd in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"), (signal.SIGHUP, "reload")):
            signal.signal(sig, self._enqueue(cmd))
        log.info("cnisup %s supervising on node %s; events at %s; control at %s", __version__,
                 self.cfg.node_name, ", ".join(self.cfg.publish.endpoints), self.cfg.control.endpoint)
        self.publish("supervisor.started", pid=os.getpid(), version=__version__,
                     config_path=self.config_path, preset=self.cfg.preset,
                     endpoints=self.cfg.publish.endpoints)
        for name in PLANNED_FAMILIES:
            if getattr(self.cfg.monitors, name):
                log.info("monitor family %s: no worker for it in this version; skipped", name)
        now = time.monotonic()
        for w in self.watchers.values():
            self._select_and_start(w, now)
        self._maybe_announce_ready()  # nothing to wait for when every family is off
        try:
            self._loop()
        finally:
            self._shutdown()
            wake_w.close()
            wake_r.close()
        return exitcodes.OK

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
            now = time.monotonic()
            self._tick(now)
            if self.stopping and not any(w.child for w in self.watchers.values()):
                return
            poller = zmq.Poller()
            poller.register(self._wake.fileno(), zmq.POLLIN)
            poller.register(self.control, zmq.POLLIN)
            fds: dict[int, tuple[Watcher, str]] = {}
            for w in self.watchers.values():
                if w.child:
                    poller.register(w.child.pidfd, zmq.POLLIN)
                    poller.register(w.child.status_fd, zmq.POLLIN)
                    fds[w.child.pidfd] = (w, "exit")
                    fds[w.child.status_fd] = (w, "status")
            exited: list[Watcher] = []
            for item, _ in poller.poll(int(TICK_S * 1000)):
                if item == self._wake.fileno():  # pyzmq hands back fds, not objects
                    try:
                        self._wake.recv(4096)
                    except BlockingIOError:
                        pass
                elif item is self.control:
                    self._serve_control()
                else:
                    w, what = fds[item]  # type: ignore[index]
                    if what == "status":
                        self._read_status(w)
                    else:
                        exited.append(w)
            # Exits last, so the worker's final status lines (its exit reason) count.
            for w in exited:
                self._on_exit(w, time.monotonic())

    def _serve_control(self) -> None:
        try:
            while self.control.poll(0):
                control.serve_one(self, self.control)
        except zmq.ZMQError as exc:
            log.warning("control socket: %s", exc)

    # -- choosing and starting workers -------------------------------------------
    def _select_and_start(self, w: Watcher, now: float, *, skip_primary: bool = False) -> None:
        choice = probes.choose(self.cfg, w.family, skip_primary=skip_primary)
        if not choice.enabled or choice.worker is None:
            w.state, w.worker, w.reason = DISABLED, None, choice.reason
            log.info("monitor family %s disabled (%s)", w.family.name, choice.reason)
            return
        if choice.worker is w.family.fallback and getattr(self.cfg, w.family.prefer_key):
            w.fallback_reason = choice.reason
            w.reprobe_at = now + self.cfg.restart.reprobe_interval
            self._worker_event("supervisor.worker.fallback", w, **{
                "from": w.family.primary.name, "to": w.family.fallback.name, "reason": choice.reason})
        self._start(w, choice.worker, choice.reason, now)

    def _spec(self, worker: WorkerInfo, incarnation: str) -> WorkerSpec:
        c = self.cfg
        return WorkerSpec(
            name=worker.name, family=worker.family, role=worker.role, incarnation=incarnation,
            node=c.node_name, supervisor_pid=os.getpid(), bus_endpoint=c.bus_endpoint,
            log_level=c.log_level, heartbeat_interval_s=c.workers.heartbeat_interval,
            ready_timeout_s=c.workers.ready_timeout, sndhwm=c.workers.bus_hwm,
            identity=None if worker.privileged else self.identity, config=c.to_dict())

    def _start(self, w: Watcher, worker: WorkerInfo, reason: str, now: float) -> None:
        if w.worker is not worker:
            w.worker = worker
        w.reason = reason
        w.restart_at = w.stop_deadline = None
        w.ready, w.sent, w.dropped, w.reported_dropped = False, 0, 0, 0
        w.exit_reason = w.kill_reason = None
        w.info = {}
        incarnation = envelope.new_incarnation()
        log.debug("Using %s monitor for the %s family (%s)", worker.name, w.family.name, reason)
        try:
            child = spawn(self._spec(worker, incarnation))
        except OSError as exc:
            log.error("cannot start %s: %s", worker.name, exc)
            w.state, w.child = FAILED, None
            self._worker_event("supervisor.worker.failed", w, reason=f"cannot exec: {exc}")
            w.restart_at = now + self.cfg.restart.max_delay
            return
        w.child, w.incarnation, w.state = child, incarnation, STARTING
        w.last_heartbeat = now
        self._worker_event("supervisor.worker.started", w, role=worker.role, pid=child.pid,
                           incarnation=incarnation, reason=reason, restarts=w.restarts,
                           privileged=worker.privileged)

    # -- what workers tell us ---------------------------------------------------
    def _read_status(self, w: Watcher) -> None:
        child = w.child
        if child is None:
            return
        try:
            chunk = os.read(child.status_fd, 65536)
        except BlockingIOError:
            return
        child.buffer += chunk
        *lines, child.buffer = child.buffer.split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: garbled status line %r", w.worker and w.worker.name, line[:80])
                continue
            self._on_status(w, msg, time.monotonic())

    def _on_status(self, w: Watcher, msg: dict[str, Any], now: float) -> None:
        kind = msg.get("t")
        if kind == "ready" and not w.ready:
            w.ready, w.state, w.last_heartbeat = True, RUNNING, now
            assert w.child is not None
            self._worker_event("supervisor.worker.ready", w, pid=w.child.pid, incarnation=w.incarnation,
                               startup_s=round(now - w.child.started, 3))
            self._maybe_announce_ready()
        elif kind == "hb":
            w.last_heartbeat = now
            w.sent, w.rss, w.info = int(msg.get("sent", 0)), msg.get("rss"), msg.get("info") or {}
            dropped = int(msg.get("dropped", 0))
            if dropped > w.dropped:
                w.dropped_total += dropped - w.dropped
                w.dropped = dropped
            if w.dropped > w.reported_dropped:
                self._worker_event("supervisor.loss", w, incarnation=w.incarnation, where="worker-bus",
                                   dropped=w.dropped - w.reported_dropped, dropped_incarnation=w.dropped,
                                   dropped_total=w.dropped_total)
                w.reported_dropped = w.dropped
        elif kind == "exit":
            w.exit_reason = str(msg.get("reason", ""))

    def _maybe_announce_ready(self, *, deadline_passed: bool = False) -> None:
        """Once every enabled family's worker is ready (or failed for good), or
        ready_timeout after start in any case, so a crash-looping worker cannot
        keep systemd waiting: which families lag is in ``degraded``."""
        if self.announced_ready:
            return
        active = [w for w in self.watchers.values() if w.state not in (DISABLED, FAILED, UNAVAILABLE)]
        lagging = [w.family.name for w in active if not w.ready]
        if lagging and not deadline_passed:
            return
        self.announced_ready = True
        self.publish("supervisor.ready", workers={w.family.name: w.worker.name
                                                  for w in active if w.worker and w.ready},
                     degraded=lagging + [w.family.name for w in self.watchers.values()
                                         if w.state in (FAILED, UNAVAILABLE)])
        sd_notify("READY=1")

    # -- exits and the policy ---------------------------------------------------
    def _on_exit(self, w: Watcher, now: float) -> None:
        child, worker = w.child, w.worker
        assert child is not None and worker is not None
        self._read_status(w)
        code = child.reap()
        w.child, w.stop_deadline = None, None
        sig = signal.Signals(-code).name if code < 0 else None
        exit_code = None if code < 0 else code
        ran_for = now - child.started
        reason = policy.describe_exit(exit_code, sig)
        if w.exit_reason:
            reason += f": {w.exit_reason}"
        if w.kill_reason:
            reason = f"{w.kill_reason} ({reason})"
        w.last_exit = {"code": exit_code, "signal": sig, "reason": reason, "ran_for_s": round(ran_for, 3),
                       "at": time.time(), "incarnation": w.incarnation}
        log.log(logging.INFO if self.stopping or w.replace_with else logging.WARNING,
                "%s (pid %d) exited after %.1f s: %s", worker.name, child.pid, ran_for, reason)
        self._worker_event("supervisor.worker.exited", w, pid=child.pid, incarnation=w.incarnation,
                           exit_code=exit_code, signal=sig, reason=reason, ran_for_s=round(ran_for, 3),
                           killed_by_supervisor=w.kill_reason)
        w.ready = False
        if w.replace_with is not None and not self.stopping:
            target, why, kind = w.replace_with
            w.replace_with = None
            if target is None:
                w.state, w.worker, w.reason = DISABLED, None, why
                return
            self._worker_event(kind, w, **{"from": worker.name, "to": target.name, "reason": why})
            if target is w.family.primary:
                w.fallback_reason, w.reprobe_at = None, None
            self._start(w, target, why, now)
            return
        w.replace_with = None
        decision = policy.decide(
            _settings(self.cfg), w.history(), code=exit_code, signal_name=sig, ran_for_s=ran_for,
            now=now, is_primary=worker is w.family.primary, stopping=self.stopping)
        if decision.action is policy.Action.NOTHING:
            w.state = STOPPED
        elif decision.action is policy.Action.RESTART:
            w.state, w.restart_at = BACKOFF, now + decision.delay_s
            w.restarts += 1
            self._worker_event("supervisor.worker.restarting", w, attempt=decision.attempt,
                               delay_s=round(decision.delay_s, 3), reason=reason)
        elif decision.action is policy.Action.FALLBACK:
            fb = w.family.fallback
            w.fallback_reason = f"{worker.name}: {decision.reason}"
            if exit_code == exitcodes.EX_NOPERM and w.exit_reason:
                w.fallback_reason = f"{worker.name}: {w.exit_reason}"
            w.reprobe_at = now + self.cfg.restart.reprobe_interval
            w.restarts += 1
            self._worker_event("supervisor.worker.fallback", w, **{
                "from": worker.name, "to": fb.name, "reason": w.fallback_reason})
            self._start(w, fb, w.fallback_reason, now)
        else:  # GIVE_UP
            config_error = exit_code == exitcodes.EX_CONFIG
            w.state = FAILED if config_error else UNAVAILABLE
            if not config_error:  # maybe the host changes: look again later, not in a hot loop
                w.reprobe_at = now + self.cfg.restart.reprobe_interval
            self._worker_event("supervisor.worker.failed", w, exit_code=exit_code, reason=reason,
                               retry_in_s=None if config_error else self.cfg.restart.reprobe_interval)
            self._maybe_announce_ready()

    # -- timers ------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        if self._wd_interval and now - self._wd_last >= self._wd_interval:
            self._wd_last = now
            sd_notify("WATCHDOG=1")
        if not self.announced_ready and now - self.started > self.cfg.workers.ready_timeout:
            self._maybe_announce_ready(deadline_passed=True)
        hb_timeout = self.cfg.workers.heartbeat_timeout
        for w in self.watchers.values():
            c = w.child
            if c is not None:
                if w.stop_deadline is not None:  # being stopped: only the grace period counts
                    if now >= w.stop_deadline and w.kill_reason is None:
                        w.kill_reason = f"did not stop within {self.cfg.workers.stop_grace:g} s"
                        c.kill_group()
                elif w.kill_reason is None and not w.ready and \
                        now - c.started > self.cfg.workers.ready_timeout:
                    self._kill(w, f"not ready within {self.cfg.workers.ready_timeout:g} s")
                elif w.kill_reason is None and w.ready and now - w.last_heartbeat > hb_timeout:
                    age = now - w.last_heartbeat
                    self._worker_event("supervisor.worker.unresponsive", w, pid=c.pid,
                                       incarnation=w.incarnation, heartbeat_age_s=round(age, 3))
                    self._kill(w, f"no heartbeat for {age:.1f} s")
                continue
            if self.stopping:
                continue
            if w.restart_at is not None and now >= w.restart_at and w.worker is not None:
                self._start(w, w.worker, f"restart after {w.last_exit and w.last_exit['reason']}", now)
            elif w.reprobe_at is not None and now >= w.reprobe_at and w.state in (UNAVAILABLE,):
                w.reprobe_at = None
                self._select_and_start(w, now)
        for w in self.watchers.values():
            if (not self.stopping and w.reprobe_at is not None and now >= w.reprobe_at
                    and w.child is not None and w.worker is w.family.fallback and w.ready):
                self._reprobe(w, now)

    def _kill(self, w: Watcher, reason: str) -> None:
        assert w.child is not None
        log.warning("%s (pid %d): %s; killing it", w.worker and w.worker.name, w.child.pid, reason)
        w.kill_reason = reason
        w.child.kill_group()

    def _reprobe(self, w: Watcher, now: float) -> None:
        """The fallback has run for reprobe_interval: try the primary again."""
        choice = probes.choose(self.cfg, w.family)
        if choice.worker is w.family.primary:
            log.info("%s: primary %s probes fine again; switching back", w.family.name, choice.worker.name)
            w.history().reset()
            w.histories.pop(w.family.primary.name, None)
            self._replace(w, choice.worker, f"re-probe: {choice.reason}", "supervisor.worker.restored")
            w.reprobe_at = None
        else:
            w.reprobe_at = now + self.cfg.restart.reprobe_interval

    def _replace(self, w: Watcher, target: WorkerInfo | None, reason: str, kind: str) -> None:
        """Stop the current child; start ``target`` once it has exited."""
        w.replace_with = (target, reason, kind)
        if w.child is not None:
            w.state = STOPPING
            w.stop_deadline = time.monotonic() + self.cfg.workers.stop_grace
            w.child.signal(signal.SIGTERM)

    # -- reload and stop -----------------------------------------------------------
    def _reload(self) -> None:
        try:
            new = load(self._load_args["path"], preset=self._load_args["preset"],
                       log_level=self._load_args["log_level"])
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.publish("supervisor.config.reload_failed", key=exc.key, error=str(exc))
            return
        old_flat, new_flat = _flatten(self.cfg.to_dict()), _flatten(new.to_dict())
        changed = sorted(k for k in set(old_flat) | set(new_flat) if old_flat.get(k) != new_flat.get(k))
        ignored = [k for k in changed if k.split(".")[0] in RESTART_ONLY_KEYS]
        for key in RESTART_ONLY_KEYS:
            setattr(new, key, getattr(self.cfg, key))
        if ignored:
            log.warning("reload: %s need a restart of cnisup start; not applied", ", ".join(ignored))
        applied = [k for k in changed if k not in ignored]
        self.cfg = new
        logging.getLogger().setLevel(new.log_level.upper())
        self.publish("supervisor.config.reloaded", changed=applied, ignored=ignored)
        log.info("configuration reloaded; changed: %s", ", ".join(applied) or "nothing")
        if not applied:
            return
        now = time.monotonic()
        for w in self.watchers.values():
            w.histories.clear()
            choice = probes.choose(self.cfg, w.family)
            target = choice.worker if choice.enabled else None
            if w.child is not None:
                self._replace(w, target, f"configuration reloaded: {choice.reason}",
                              "supervisor.worker.switched")
            else:
                w.restart_at = w.reprobe_at = None
                self._select_and_start(w, now)

    def _begin_stop(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping (%s)", why)
        sd_notify("STOPPING=1")
        self.publish("supervisor.stopping", reason=why)
        deadline = time.monotonic() + self.cfg.workers.stop_grace
        for w in self.watchers.values():
            w.restart_at = w.reprobe_at = None
            if w.child is not None:
                w.state, w.stop_deadline = STOPPING, deadline
                w.child.signal(signal.SIGTERM)

    def _shutdown(self) -> None:
        for w in self.watchers.values():  # only on an exception path
            if w.child is not None:
                w.child.kill_group()
                w.child.reap()
                w.child = None
        self.publish("supervisor.stopped", uptime_s=round(time.monotonic() - self.started, 3))
        self.control.close(linger=0)
        self.bus.close(linger_ms=1000)
        time.sleep(0.05)  # let the proxy forward the last events before it stops
        self.proxy.stop()
        self.ctx.term()
        if self.cfg.control.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.cfg.control.endpoint[len("ipc://"):])
            except OSError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    # -- status -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = [w.view(now) for w in self.watchers.values()]
        for name in PLANNED_FAMILIES:
            enabled = getattr(self.cfg.monitors, name)
            workers.append({"family": name, "worker": None, "source": None,
                            "state": UNAVAILABLE if enabled else DISABLED,
                            "reason": "no worker for this family in this version" if enabled
                            else f"monitors.{name}: false"})
        return {
            "supervisor": {
                "pid": os.getpid(), "version": __version__, "node": self.cfg.node_name,
                "incarnation": self.incarnation, "started_at": self.started_wall,
                "uptime_s": round(now - self.started, 3), "state": "stopping" if self.stopping else "running",
                "config_path": self.config_path, "preset": self.cfg.preset,
                "endpoints": self.cfg.publish.endpoints, "events_sent": self.bus.sent,
                "events_dropped": self.bus.dropped, "proxy": self.proxy.statistics(),
                "rss_bytes": _rss(),
            },
            "workers": workers,
        }


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
