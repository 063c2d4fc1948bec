"""One monitor family's slot: which worker runs it, its process, and every
decision about its life (start, readiness, heartbeats, exits, restarts,
fallback, re-probe, replacement on reload, stop).

The slot's state is an enum and changes only through ``_change``, which
checks the move against ``MOVES`` and publishes the event that goes with it
(supervisord's ``change_state`` / ``_assertInState``). Everything the slot
needs from outside is injected (``Wiring``: spawn, publish, choose, clock),
so the whole lifecycle runs in unit tests with a fake clock and fake
processes. The supervisor only feeds it: status lines and exits as its fds
become readable, ``tick`` at the deadline it returned, ``reconfigure`` on a
reload, ``stop`` on shutdown.
"""

from __future__ import annotations

import enum
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cnisup.protocol import envelope, exitcodes
from cnisup.protocol.kinds import SupervisorKind as K
from cnisup.protocol.settings import Config
from cnisup.supervisor import policy
from cnisup.supervisor.probes import Choice
from cnisup.workers.registry import Family, WorkerInfo
from cnisup.workers.spec import StatusError, parse_status

log = logging.getLogger("cnisup.supervisor")


class State(enum.StrEnum):
    STOPPED = "stopped"  #: nothing runs and nothing is scheduled (before start, after a stop)
    STARTING = "starting"  #: the process runs; it has not reached the bus yet
    RUNNING = "running"  #: ready: its events flow
    BACKOFF = "backoff"  #: it crashed (or could not be executed); a restart is scheduled
    STOPPING = "stopping"  #: SIGTERM sent; waiting for the exit (then stopped, or the replacement starts)
    FAILED = "failed"  #: configuration error (78): not retried until a reload
    UNAVAILABLE = "unavailable"  #: neither worker can run here; re-probed later
    IDLE = "idle"  #: nothing to watch here (no cluster configuration); re-probed later
    DISABLED = "disabled"  #: turned off in the configuration (monitors.<family>, journal.enabled)


S = State
_START = frozenset({S.STARTING, S.BACKOFF})  #: a start either runs or fails to exec
#: Every legal move. A move not listed is a bug, and raises.
_QUIET = frozenset({S.DISABLED, S.IDLE})  #: a start may find nothing to run
MOVES: dict[State, frozenset[State]] = {
    S.STOPPED: _START | _QUIET,
    S.DISABLED: _START | _QUIET,
    S.IDLE: _START | _QUIET,
    S.STARTING: _START | {S.RUNNING, S.STOPPING, S.FAILED, S.UNAVAILABLE},
    S.RUNNING: _START | {S.STOPPING, S.FAILED, S.UNAVAILABLE},
    S.BACKOFF: _START | {S.STOPPED, S.DISABLED},
    S.STOPPING: _START | {S.STOPPED, S.DISABLED},
    S.FAILED: _START | _QUIET,
    S.UNAVAILABLE: _START | _QUIET,
}
#: Nothing runs and nothing will without help: ``supervisor.ready`` calls these degraded.
DOWN = frozenset({S.FAILED, S.UNAVAILABLE})
#: Nothing runs by design (switched off, or nothing to watch here): not degraded either.
QUIET = _QUIET


#: How the log names a worker ("Using eBPF monitor for the kernel family").
_DISPLAY = {"ebpf": "eBPF monitor", "inotify": "inotify monitor", "k8s-informer": "Kubernetes informer",
            "journal": "the journal", "journal-runtime": "the runtime-dir journal"}


class IllegalMove(RuntimeError):
    """A state change that ``MOVES`` does not allow: a bug in the slot."""


class Process(Protocol):
    """What a slot needs of a started worker process (``spawn.Child``)."""

    @property
    def pid(self) -> int: ...
    @property
    def started(self) -> float: ...
    @property
    def pidfd(self) -> int: ...  #: readable once it exited
    @property
    def status_fd(self) -> int: ...  #: its status pipe
    @property
    def status_open(self) -> bool: ...  #: False once the worker closed its end
    def signal(self, sig: int) -> None: ...
    def kill_group(self) -> None: ...
    def reap(self) -> int: ...
    def read_status(self) -> list[bytes]: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def time(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


@dataclass(frozen=True)
class Wiring:
    """What a slot uses of the outside world."""

    spawn: Callable[[WorkerInfo, str], Process]  #: (worker, incarnation) -> a started process; OSError
    publish: Callable[[str, dict[str, Any]], None]  #: a supervisor event
    choose: Callable[[Family], Choice]  #: probe the host (for the current configuration)
    clock: Clock


@dataclass(frozen=True)
class _Replacement:
    """Start ``worker`` (None: disable the family) once the current process has exited."""

    worker: WorkerInfo | None
    reason: str
    kind: str | None  #: the event that announces the switch (None: the same worker, restarted)


class Slot:
    def __init__(self, family: Family, cfg: Config, wiring: Wiring) -> None:
        self.family = family
        self.cfg = cfg
        self.w = wiring
        self.state = S.STOPPED
        self.worker: WorkerInfo | None = None
        self.reason = ""  #: why this worker was chosen
        self.child: Process | None = None
        self.incarnation: str | None = None
        self.restarts = 0
        self.last_exit: dict[str, Any] | None = None
        self.fallback_reason: str | None = None
        self._histories: dict[str, policy.History] = {}
        self.stopping = False  #: the supervisor is stopping: nothing is started again
        # From the worker's status channel.
        self.last_heartbeat = 0.0
        self.sent = self.dropped = self._reported_dropped = 0
        self.dropped_total = 0  #: over all incarnations
        self.sent_total_ended = 0  #: events of the incarnations that ended
        #: where the current incarnation stands (its last heartbeat): incarnation, source, seq, kseq
        self.progress: dict[str, Any] | None = None
        #: the final progress of incarnations that ended since ``take_progress`` was last called
        self._ended: list[dict[str, Any]] = []
        self.rss: int | None = None
        self.info: dict[str, Any] = {}
        self._exit_reason: str | None = None  #: what the worker said before exiting
        # Timers (monotonic seconds) and pending actions.
        self.restart_at: float | None = None
        self.reprobe_at: float | None = None
        self._stop_deadline: float | None = None
        self._kill_reason: str | None = None
        self._replacement: _Replacement | None = None
        self._announced: WorkerInfo | None = None  #: the worker last named in the log

    # -- the one way the state changes --------------------------------------------------
    def _change(self, to: State, kind: str | None = None, **data: Any) -> None:
        if to not in MOVES[self.state]:
            raise IllegalMove(f"{self.family.name}: {self.state} -> {to}")
        self.state = to
        if kind is not None:
            self._event(kind, **data)

    def _event(self, kind: str, **data: Any) -> None:
        self.w.publish(kind, {"family": self.family.name, "worker": self.worker.name if self.worker else None,
                              **data})

    @property
    def ready(self) -> bool:
        return self.state is S.RUNNING

    @property
    def on_fallback(self) -> bool:
        """The family runs, but on its fallback: degraded."""
        return self.worker is not None and self.worker is self.family.fallback

    @property
    def sent_total(self) -> int:
        """Events the worker processes of this slot said they published."""
        return self.sent_total_ended + self.sent

    # -- starting -----------------------------------------------------------------------
    def start(self) -> None:
        """Probe, choose a worker and start it (or note that the family is off)."""
        choice = self.w.choose(self.family)
        if choice.idle:
            self._idle(choice.reason)
            return
        if not choice.enabled or choice.worker is None:
            self.worker, self.reason = None, choice.reason
            if self.state is not S.DISABLED:
                log.info("monitor family %s disabled (%s)", self.family.name, choice.reason)
                self._change(S.DISABLED)
            return
        fallback = self.family.fallback
        if fallback is not None and choice.worker is fallback and (self.family.prefer_key is None
                                                      or self.cfg.lookup(self.family.prefer_key)):
            self.fallback_reason = choice.reason
            self.reprobe_at = self.w.clock.monotonic() + self.cfg.restart.reprobe_interval
            self._event(K.WORKER_FALLBACK, **{"from": self.family.primary.name, "to": fallback.name,
                                              "reason": choice.reason})
        self._spawn(choice.worker, choice.reason)

    def _idle(self, reason: str) -> None:
        """Nothing to watch here: say so once, at info, and look again later."""
        self.worker, self.reason = None, reason
        self.reprobe_at = self.w.clock.monotonic() + self.cfg.restart.reprobe_interval
        if self.state is not S.IDLE:
            log.info("monitor family %s is idle: %s; looking again every %g s", self.family.name, reason,
                     self.cfg.restart.reprobe_interval)
        self._change(S.IDLE)

    def _spawn(self, worker: WorkerInfo, reason: str) -> None:
        now = self.w.clock.monotonic()
        self.worker, self.reason = worker, reason
        self.restart_at = self._stop_deadline = None
        self.sent_total_ended += self.sent
        self.sent = self.dropped = self._reported_dropped = 0
        self.progress = None
        self._exit_reason = self._kill_reason = None
        self.info = {}
        incarnation = envelope.new_incarnation()
        if worker is not self._announced:  # once per choice, not at every restart
            self._announced = worker
            if worker is self.family.primary:
                log.info("Using %s for the %s family", _DISPLAY.get(worker.name, worker.name), self.family.name)
            else:
                log.info("Using %s for the %s family: %s", _DISPLAY.get(worker.name, worker.name),
                         self.family.name, reason)
        try:
            child = self.w.spawn(worker, incarnation)
        except OSError as exc:
            log.error("cannot start %s: %s", worker.name, exc)
            self.child = None
            self.restart_at = now + self.cfg.restart.max_delay
            self._change(S.BACKOFF, K.WORKER_FAILED, reason=f"cannot exec: {exc}",
                         retry_in_s=self.cfg.restart.max_delay)
            return
        self.child, self.incarnation, self.last_heartbeat = child, incarnation, now
        self._change(S.STARTING, K.WORKER_STARTED, role=worker.role, pid=child.pid, incarnation=incarnation,
                     reason=reason, restarts=self.restarts, privileged=worker.privileged)

    # -- what the worker says -----------------------------------------------------------
    def on_status(self) -> None:
        """The status pipe is readable: take every complete line."""
        if self.child is None:
            return
        try:
            lines = self.child.read_status()
            for line in lines:
                self._on_message(parse_status(line))
        except StatusError as exc:
            self._kill(f"broke the status protocol: {exc}")

    def _on_message(self, msg: dict[str, Any]) -> None:
        now = self.w.clock.monotonic()
        kind = msg["t"]
        if kind == "ready" and self.state is S.STARTING:
            assert self.child is not None
            self.last_heartbeat = now
            self._change(S.RUNNING, K.WORKER_READY, pid=self.child.pid, incarnation=self.incarnation,
                         startup_s=round(now - self.child.started, 3))
        elif kind == "hb":
            self.last_heartbeat = now
            self.sent, self.rss, self.info = msg["sent"], msg["rss"], msg["info"]
            if msg["seq"] is not None and self.worker is not None and self.incarnation is not None:
                self.progress = {"incarnation": self.incarnation, "source": self.worker.name, "seq": msg["seq"],
                                 "kseq": msg["kseq"]}
            if msg["dropped"] > self.dropped:
                self.dropped_total += msg["dropped"] - self.dropped
                self.dropped = msg["dropped"]
            if self.dropped > self._reported_dropped:
                self._event(K.LOSS, incarnation=self.incarnation, where="worker-bus",
                            dropped=self.dropped - self._reported_dropped, dropped_incarnation=self.dropped,
                            dropped_total=self.dropped_total)
                self._reported_dropped = self.dropped
        elif kind == "exit":
            self._exit_reason = msg["reason"]

    # -- exits --------------------------------------------------------------------------
    def on_exit(self) -> None:
        """The process ended (its pidfd is readable): reap it and decide what next."""
        child, worker = self.child, self.worker
        assert child is not None and worker is not None
        self.on_status()  # its last words (an exit reason) count
        code = child.reap()
        self.child, self._stop_deadline = None, None
        sig = signal.Signals(-code).name if code < 0 else None
        exit_code = None if code < 0 else code
        ran_for = self.w.clock.monotonic() - child.started
        reason = self._record_exit(child.pid, worker, exit_code, sig, ran_for)
        if self.progress is not None:
            self._ended.append({**self.progress, "ended": True})
            self.progress = None
        replacement, self._replacement = self._replacement, None
        if replacement is not None and not self.stopping:
            self._replace_now(worker, replacement)
            return
        decision = policy.decide(self.cfg.restart, self._history(), code=exit_code, signal_name=sig,
                                 ran_for_s=ran_for, now=self.w.clock.monotonic(),
                                 can_fall_back=worker is self.family.primary and self.family.fallback is not None,
                                 stopping=self.stopping)
        self._follow(decision, worker, exit_code, reason)

    def _record_exit(self, pid: int, worker: WorkerInfo, exit_code: int | None, sig: str | None,
                     ran_for: float) -> str:
        """Log, remember and publish an exit; return its reason."""
        reason = policy.describe_exit(exit_code, sig)
        if self._exit_reason:
            reason += f": {self._exit_reason}"
        if self._kill_reason:
            reason = f"{self._kill_reason} ({reason})"
        self.last_exit = {"code": exit_code, "signal": sig, "reason": reason, "ran_for_s": round(ran_for, 3),
                          "at": self.w.clock.time(), "incarnation": self.incarnation}
        expected = self.stopping or self._replacement is not None
        log.log(logging.INFO if expected else logging.WARNING, "%s (pid %d) exited after %.1f s: %s",
                worker.name, pid, ran_for, reason)
        self._event(K.WORKER_EXITED, pid=pid, incarnation=self.incarnation, exit_code=exit_code, signal=sig,
                    reason=reason, ran_for_s=round(ran_for, 3), killed_by_supervisor=self._kill_reason)
        return reason

    def _follow(self, decision: policy.Decision, worker: WorkerInfo, exit_code: int | None, reason: str) -> None:
        """Carry out the policy's decision about an exit."""
        now = self.w.clock.monotonic()
        if decision.action is policy.Action.NOTHING:
            self._change(S.STOPPED)
        elif decision.action is policy.Action.RESTART:
            self.restart_at = now + decision.delay_s
            self.restarts += 1
            self._change(S.BACKOFF, K.WORKER_RESTARTING, attempt=decision.attempt,
                         delay_s=round(decision.delay_s, 3), reason=reason)
        elif decision.action is policy.Action.FALLBACK:
            fallback = self.family.fallback
            assert fallback is not None  # the policy falls back only when there is a fallback
            self.fallback_reason = f"{worker.name}: {decision.reason}"
            if exit_code == exitcodes.EX_NOPERM and self._exit_reason:
                self.fallback_reason = f"{worker.name}: {self._exit_reason}"
            self.reprobe_at = now + self.cfg.restart.reprobe_interval
            self.restarts += 1
            self._event(K.WORKER_FALLBACK, **{"from": worker.name, "to": fallback.name,
                                              "reason": self.fallback_reason})
            self._spawn(fallback, self.fallback_reason)
        else:  # GIVE_UP
            config_error = exit_code == exitcodes.EX_CONFIG
            retry = None if config_error else self.cfg.restart.reprobe_interval
            if retry is not None:  # maybe the host changes: look again later, not in a hot loop
                self.reprobe_at = now + retry
            self._change(S.FAILED if config_error else S.UNAVAILABLE, K.WORKER_FAILED, exit_code=exit_code,
                         reason=reason, retry_in_s=retry)

    def _replace_now(self, old: WorkerInfo, r: _Replacement) -> None:
        if r.worker is None:
            self.worker, self.reason = None, r.reason
            self._change(S.DISABLED)
            return
        if r.kind is not None:
            self._event(r.kind, **{"from": old.name, "to": r.worker.name, "reason": r.reason})
        if r.worker is self.family.primary:
            self.fallback_reason, self.reprobe_at = None, None
        self._spawn(r.worker, r.reason)

    def _history(self) -> policy.History:
        assert self.worker is not None
        return self._histories.setdefault(self.worker.name, policy.History())

    # -- timers -------------------------------------------------------------------------
    def tick(self) -> float | None:
        """Do what is due; return when to be called again (monotonic), None: only on an event."""
        now = self.w.clock.monotonic()
        c, workers = self.child, self.cfg.workers
        if c is not None and self._kill_reason is None:
            if self._stop_deadline is not None:  # being stopped: only the grace period counts
                if now >= self._stop_deadline:
                    self._kill_reason = f"did not stop within {workers.stop_grace:g} s"
                    c.kill_group()
            elif self.state is S.STARTING and now - c.started > workers.ready_timeout:
                self._kill(f"not ready within {workers.ready_timeout:g} s")
            elif self.state is S.RUNNING and now - self.last_heartbeat > workers.heartbeat_timeout:
                age = now - self.last_heartbeat
                self._event(K.WORKER_UNRESPONSIVE, pid=c.pid, incarnation=self.incarnation,
                            heartbeat_age_s=round(age, 3))
                self._kill(f"no heartbeat for {age:.1f} s")
            elif (self.state is S.RUNNING and self.worker is self.family.fallback
                  and self.reprobe_at is not None and now >= self.reprobe_at and not self.stopping):
                self._reprobe()
        elif c is None and not self.stopping:
            if self.restart_at is not None and now >= self.restart_at and self.worker is not None:
                self._spawn(self.worker, f"restart after {self.last_exit and self.last_exit['reason']}")
            elif self.reprobe_at is not None and now >= self.reprobe_at and self.state in (S.UNAVAILABLE, S.IDLE):
                self.reprobe_at = None
                self.start()
        return self.next_deadline()

    def next_deadline(self) -> float | None:
        c, workers = self.child, self.cfg.workers
        times: list[float] = []
        if c is not None and self._kill_reason is None:
            if self._stop_deadline is not None:
                times.append(self._stop_deadline)
            elif self.state is S.STARTING:
                times.append(c.started + workers.ready_timeout)
            elif self.state is S.RUNNING:
                times.append(self.last_heartbeat + workers.heartbeat_timeout)
                if self.worker is self.family.fallback and self.reprobe_at is not None:
                    times.append(self.reprobe_at)
        elif c is None and not self.stopping:
            if self.restart_at is not None:
                times.append(self.restart_at)
            elif self.reprobe_at is not None and self.state in (S.UNAVAILABLE, S.IDLE):
                times.append(self.reprobe_at)
        # A hair past the deadline, so the comparison in ``tick`` holds on a coarse clock.
        return min(times) + 1e-3 if times else None

    def _kill(self, reason: str) -> None:
        assert self.child is not None and self.worker is not None
        log.warning("%s (pid %d): %s; killing it", self.worker.name, self.child.pid, reason)
        self._kill_reason = reason
        self.child.kill_group()

    def _reprobe(self) -> None:
        """The fallback has run for reprobe_interval: try the primary again."""
        choice = self.w.choose(self.family)
        if choice.worker is self.family.primary:
            log.info("%s: primary %s probes fine again; switching back", self.family.name, choice.worker.name)
            self._histories.clear()
            self.reprobe_at = None
            self._replace(choice.worker, f"re-probe: {choice.reason}", K.WORKER_RESTORED)
        else:
            self.reprobe_at = self.w.clock.monotonic() + self.cfg.restart.reprobe_interval

    def _replace(self, worker: WorkerInfo | None, reason: str, kind: str | None) -> None:
        """Stop the current process; start ``worker`` once it has exited."""
        assert self.child is not None
        self._replacement = _Replacement(worker, reason, kind)
        if self.state is not S.STOPPING:  # already on its way out: the new plan is enough
            self._terminate()

    def _terminate(self) -> None:
        assert self.child is not None
        self._stop_deadline = self.w.clock.monotonic() + self.cfg.workers.stop_grace
        self._change(S.STOPPING)
        self.child.signal(signal.SIGTERM)

    # -- reload and stop ----------------------------------------------------------------
    def reload_reason(self, changed: list[str]) -> str | None:
        """Why a reload that changed the keys ``changed`` (re)starts this family's
        worker; None when it does not (nothing the worker reads changed)."""
        if self.state in DOWN or self.state is S.IDLE:
            return f"retried on reload (was {self.state})"  # SIGHUP is the operator's "try again"
        mine = self.family.affected_by(changed)
        if not mine:
            return None
        more = f" and {len(mine) - 3} more" if len(mine) > 3 else ""
        return f"{', '.join(mine[:3])}{more} changed"

    def reconfigure(self, cfg: Config, reason: str | None) -> bool:
        """A reload: adopt ``cfg`` (the supervisor's side of it, such as the restart
        policy, applies at once); when ``reason`` says something the worker reads
        changed, choose again and restart the worker with the new settings (or
        start one, or disable the family). Otherwise the worker keeps running.
        Returns whether a worker was stopped or started."""
        self.cfg = cfg
        if reason is None:
            return False
        self._histories.clear()
        if self.child is not None:
            choice = self.w.choose(self.family)
            target = choice.worker if choice.enabled else None
            why = f"configuration reloaded: {reason}"
            if target is self.worker:
                self._replace(target, why, None)
            else:
                self._replace(target, f"{why}; {choice.reason}", K.WORKER_SWITCHED)
            return True
        self.restart_at = self.reprobe_at = None
        self.start()
        return self.child is not None

    def stop(self) -> None:
        """The supervisor stops: SIGTERM now, SIGKILL of the group after stop_grace."""
        self.stopping = True
        self.restart_at = self.reprobe_at = None
        if self.child is not None:
            self._terminate()
        elif self.state is S.BACKOFF:
            self._change(S.STOPPED)

    def kill(self) -> None:
        """Last resort on the way out (an exception in the supervisor): SIGKILL and reap."""
        if self.child is not None:
            self.child.kill_group()
            self.child.reap()
            self.child = None

    def take_progress(self) -> list[dict[str, Any]]:
        """Where this slot's incarnations stand: the live one, and those that
        ended since the last call (each reported once)."""
        ended, self._ended = self._ended, []
        return ended + ([self.progress] if self.progress is not None else [])

    def peek_progress(self) -> list[dict[str, Any]]:
        return self._ended + ([self.progress] if self.progress is not None else [])

    # -- status ---------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        now = self.w.clock.monotonic()
        c, worker = self.child, self.worker
        return {
            "family": self.family.name,
            "worker": worker.name if worker else None,
            "source": worker.name if worker else None,
            "role": worker.role if worker else None,
            "state": str(self.state),
            "reason": self.reason,
            "pid": c.pid if c else None,
            "incarnation": self.incarnation,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "fallback_reason": self.fallback_reason,
            "degraded": self.on_fallback,
            "events_sent": self.sent,
            "events_dropped": self.dropped,
            "events_dropped_total": self.dropped_total,
            "rss_bytes": self.rss,
            "uptime_s": round(now - c.started, 3) if c else None,
            "heartbeat_age_s": round(now - self.last_heartbeat, 3) if c and self.ready else None,
            "next_restart_in_s": round(self.restart_at - now, 3) if self.restart_at else None,
            "next_reprobe_in_s": round(self.reprobe_at - now, 3) if self.reprobe_at else None,
            "info": self.info,
        }
