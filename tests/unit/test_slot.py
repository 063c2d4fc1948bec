"""The family slot's state machine, with a fake clock, fake processes and a
recording publisher: every transition in milliseconds, no process started."""

from __future__ import annotations

import itertools
import json
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import pytest

from cnisup.protocol import exitcodes
from cnisup.protocol.kinds import SupervisorKind as K
from cnisup.protocol.settings import Config
from cnisup.supervisor.probes import Choice
from cnisup.supervisor.slot import MOVES, IllegalMove, Slot, State, Wiring
from cnisup.workers.registry import FAMILIES, Family, WorkerInfo

KERNEL = FAMILIES["kernel"]
PRIMARY, FALLBACK = KERNEL.primary, KERNEL.fallback


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now


_pids = itertools.count(100)


@dataclass
class FakeProcess:
    worker: WorkerInfo
    incarnation: str
    started: float
    pid: int = field(default_factory=lambda: next(_pids))
    pidfd: int = -1
    status_fd: int = -1
    status_open: bool = True
    lines: list[bytes] = field(default_factory=list)
    signals: list[int] = field(default_factory=list)
    killed: bool = False
    code: int | None = None  #: set when it "exits"

    def signal(self, sig: int) -> None:
        self.signals.append(sig)

    def kill_group(self) -> None:
        self.killed = True

    def reap(self) -> int:
        assert self.code is not None, "reaped before it exited"
        return self.code

    def read_status(self) -> list[bytes]:
        out, self.lines = self.lines, []
        return out

    def say(self, kind: str, **fields: Any) -> None:
        self.lines.append(json.dumps({"t": kind, **fields}).encode())


class World:
    """One slot of the kernel family and everything it touches."""

    def __init__(self, cfg: Config | None = None, *, primary_ok: bool = True, enabled: bool = True,
                 family: Family = KERNEL) -> None:
        self.clock = FakeClock()
        self.cfg = cfg or Config.from_dict({"restart": {"initial_delay": 1.0, "jitter": 0.0, "max_delay": 8.0,
                                                        "flap_threshold": 3, "flap_window": 60.0,
                                                        "reprobe_interval": 300.0, "stable_after": 30.0}})
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.procs: list[FakeProcess] = []
        self.primary_ok, self.enabled = primary_ok, enabled
        self.idle = False
        self.spawn_error: OSError | None = None
        self.slot = Slot(family, self.cfg, Wiring(spawn=self.spawn, publish=self.publish, choose=self.choose,
                                                  clock=self.clock))

    def spawn(self, worker: WorkerInfo, incarnation: str) -> FakeProcess:
        if self.spawn_error is not None:
            raise self.spawn_error
        p = FakeProcess(worker, incarnation, self.clock.now)
        self.procs.append(p)
        return p

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))

    def choose(self, family: Family) -> Choice:
        if not self.enabled:
            return Choice(family.name, False, None, "monitors.kernel: false", {})
        if self.idle:
            return Choice(family.name, True, None, "nothing to watch", {}, idle=True)
        if self.primary_ok or family.fallback is None:
            return Choice(family.name, True, family.primary, "BPF ok" if self.primary_ok else "no server", {})
        return Choice(family.name, True, family.fallback, "ebpf unavailable: no BTF", {})

    def state(self) -> State:
        """A call, not an attribute: the state changes under the type checker's feet."""
        return self.slot.state

    @property
    def proc(self) -> FakeProcess:
        return self.procs[-1]

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]

    def last(self, kind: str) -> dict[str, Any]:
        return next(d for k, d in reversed(self.events) if k == kind)

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.slot.tick()

    def ready(self) -> None:
        self.proc.say("ready", pid=self.proc.pid)
        self.slot.on_status()

    def exit(self, code: int, *, reason: str = "") -> None:
        if reason:
            self.proc.say("exit", code=code, reason=reason)
        self.proc.code = code
        self.slot.on_exit()


def test_start_then_ready() -> None:
    w = World()
    w.slot.start()
    assert w.state() is State.STARTING and w.proc.worker is PRIMARY
    started = w.last(K.WORKER_STARTED)
    assert started["worker"] == "ebpf" and started["role"] == "primary" and started["pid"] == w.proc.pid
    w.clock.now += 1.5
    w.ready()
    assert w.state() is State.RUNNING and w.slot.ready
    assert w.last(K.WORKER_READY)["startup_s"] == 1.5


def test_every_state_is_in_the_move_table_and_illegal_moves_raise() -> None:
    assert set(MOVES) == set(State)
    w = World()
    w.slot.start()
    w.ready()
    with pytest.raises(IllegalMove):
        w.slot._change(State.DISABLED)  # a running worker is never just dropped
    assert w.state() is State.RUNNING


def test_crash_backs_off_then_restarts_with_a_new_incarnation() -> None:
    w = World()
    w.slot.start()
    w.ready()
    first = w.proc.incarnation
    w.clock.now += 5
    w.exit(70, reason="boom")
    assert w.state() is State.BACKOFF
    assert w.kinds()[-2:] == [K.WORKER_EXITED, K.WORKER_RESTARTING]
    assert w.last(K.WORKER_EXITED)["reason"] == "exit 70: boom"
    assert w.last(K.WORKER_RESTARTING) == {"family": "kernel", "worker": "ebpf", "attempt": 1, "delay_s": 1.0,
                                           "reason": "exit 70: boom"}
    assert w.slot.next_deadline() == pytest.approx(w.clock.now + 1.0, abs=0.01)
    w.advance(0.5)
    assert w.state() is State.BACKOFF and len(w.procs) == 1
    w.advance(0.6)
    assert w.state() is State.STARTING and len(w.procs) == 2 and w.proc.incarnation != first
    assert w.slot.restarts == 1


def test_crash_loop_of_the_primary_flaps_into_the_fallback() -> None:
    w = World()
    w.slot.start()
    for delay in (1.0, 2.0):
        w.exit(1)
        assert w.state() is State.BACKOFF
        assert w.last(K.WORKER_RESTARTING)["delay_s"] == delay
        w.advance(delay + 0.01)
    w.exit(1)
    assert w.state() is State.STARTING and w.proc.worker is FALLBACK
    fb = w.last(K.WORKER_FALLBACK)
    assert fb["from"] == "ebpf" and fb["to"] == "proc-poll" and "flapping: 3 crashes" in fb["reason"]


def test_exit_77_starts_the_fallback_at_once_then_reprobe_restores_the_primary() -> None:
    w = World()
    w.slot.start()
    w.exit(exitcodes.EX_NOPERM, reason="no BTF here")
    assert w.state() is State.STARTING and w.proc.worker is FALLBACK
    assert w.slot.fallback_reason == "ebpf: no BTF here"
    w.ready()
    w.clock.now += 299
    w.proc.say("hb", sent=3, dropped=0, rss=1, info={})
    w.slot.on_status()
    w.slot.tick()
    assert w.state() is State.RUNNING  # not yet
    w.advance(1.01)
    assert w.state() is State.STOPPING and w.proc.signals == [signal.SIGTERM]
    w.exit(0)
    assert w.kinds()[-2:] == [K.WORKER_RESTORED, K.WORKER_STARTED]
    assert w.state() is State.STARTING and w.proc.worker is PRIMARY and w.slot.fallback_reason is None


def test_reprobe_that_still_fails_keeps_the_fallback() -> None:
    w = World(primary_ok=False)
    w.slot.start()
    assert w.proc.worker is FALLBACK and w.kinds()[0] == K.WORKER_FALLBACK
    w.ready()
    w.proc.say("hb", sent=0, dropped=0, rss=None, info={})
    w.clock.now += 300.01
    w.proc.say("hb", sent=0, dropped=0, rss=None, info={})
    w.slot.on_status()
    w.slot.tick()
    assert w.state() is State.RUNNING and w.slot.reprobe_at == pytest.approx(w.clock.now + 300)


def test_configuration_error_is_not_retried() -> None:
    w = World()
    w.slot.start()
    w.exit(exitcodes.EX_CONFIG, reason="cni.bin_dirs[0]: nope")
    assert w.state() is State.FAILED
    failed = w.last(K.WORKER_FAILED)
    assert failed["retry_in_s"] is None and "cni.bin_dirs[0]" in failed["reason"]
    assert w.slot.next_deadline() is None
    w.advance(10_000)
    assert len(w.procs) == 1


def test_both_workers_missing_capabilities_is_unavailable_and_reprobed() -> None:
    w = World()
    w.slot.start()
    w.exit(exitcodes.EX_NOPERM)
    w.exit(exitcodes.EX_NOPERM)
    assert w.state() is State.UNAVAILABLE and w.last(K.WORKER_FAILED)["retry_in_s"] == 300.0
    w.advance(300.01)
    assert w.state() is State.STARTING and len(w.procs) == 3 and w.proc.worker is PRIMARY


def test_reload_that_disables_the_family_stops_it() -> None:
    w = World()
    w.slot.start()
    w.ready()
    w.enabled = False
    w.slot.reconfigure(w.cfg, w.slot.reload_reason(["monitors.kernel"]))
    assert w.state() is State.STOPPING and w.proc.signals == [signal.SIGTERM]
    w.exit(0)
    assert w.state() is State.DISABLED and w.slot.worker is None and w.slot.next_deadline() is None


def test_reload_that_enables_a_disabled_family_starts_it() -> None:
    w = World(enabled=False)
    w.slot.start()
    assert w.state() is State.DISABLED and w.procs == []
    assert w.slot.reload_reason(["monitors.config"]) is None
    w.enabled = True
    w.slot.reconfigure(w.cfg, w.slot.reload_reason(["monitors.kernel"]))
    assert w.state() is State.STARTING


def test_reload_restarts_the_same_worker_when_a_key_it_reads_changed() -> None:
    w = World()
    w.slot.start()
    w.ready()
    new = Config.from_dict({"fallback": {"process_poll_interval": 1.0}})
    reason = w.slot.reload_reason(["fallback.process_poll_interval"])
    assert reason == "fallback.process_poll_interval changed"
    assert w.slot.reconfigure(new, reason) is True
    assert w.state() is State.STOPPING and w.proc.signals == [signal.SIGTERM]
    w.exit(0)
    assert K.WORKER_SWITCHED not in w.kinds()  # the same worker: not a switch
    started = w.last(K.WORKER_STARTED)
    assert started["worker"] == "ebpf" and started["reason"] == f"configuration reloaded: {reason}"
    assert w.state() is State.STARTING and w.slot.cfg is new and len(w.procs) == 2


def test_reload_that_changes_nothing_the_worker_reads_leaves_it_running() -> None:
    w = World()
    w.slot.start()
    w.ready()
    before = list(w.events)
    changed = ["cni.conf_dirs", "fallback.file_poll_interval", "kubernetes.read_timeout", "restart.max_delay",
               "workers.heartbeat_timeout"]
    assert w.slot.reload_reason(changed) is None
    new = Config.from_dict({"restart": {"max_delay": 1.0}})
    assert w.slot.reconfigure(new, None) is False
    assert w.state() is State.RUNNING and w.proc.signals == [] and len(w.procs) == 1 and w.events == before
    assert w.slot.cfg is new  # the supervisor's side (the restart policy) applies at once
    w.exit(70)
    assert w.last(K.WORKER_RESTARTING)["delay_s"] <= 1.0


def test_which_keys_restart_which_family() -> None:
    w = World()
    w.slot.start()
    w.ready()
    assert w.slot.reload_reason(["cni.bin_dirs"]) == "cni.bin_dirs changed"
    assert w.slot.reload_reason(["node_name"]) == "node_name changed"  # in every envelope
    assert w.slot.reload_reason(["use_ebpf", "log_level", "monitors.kernel", "workers.bus_hwm"]) == \
        "use_ebpf, log_level, monitors.kernel and 1 more changed"
    config_family = FAMILIES["config"]
    assert config_family.affected_by(["cni.conf_dirs", "cni.max_config_size", "use_ebpf"]) == \
        ["cni.conf_dirs", "cni.max_config_size"]
    assert FAMILIES["k8s"].affected_by(["kubernetes.pod_scope", "cni.bin_dirs"]) == ["kubernetes.pod_scope"]
    undeclared = Family("x", PRIMARY, FALLBACK, "monitors.kernel", "use_ebpf")  # reads nothing declared: all count
    assert undeclared.affected_by(["restart.jitter"]) == ["restart.jitter"]


def test_reload_retries_a_family_that_is_down_whatever_changed() -> None:
    w = World()
    w.slot.start()
    w.exit(exitcodes.EX_CONFIG, reason="bad")
    assert w.state() is State.FAILED
    reason = w.slot.reload_reason([])
    assert reason == "retried on reload (was failed)"
    w.slot.reconfigure(w.cfg, reason)
    assert w.state() is State.STARTING and len(w.procs) == 2


def test_reload_while_a_replacement_is_stopping_the_worker() -> None:
    """A second reload before the worker has exited only changes the plan."""
    w = World()
    w.slot.start()
    w.ready()
    w.slot.reconfigure(w.cfg, w.slot.reload_reason(["cni.bin_dirs"]))
    assert w.state() is State.STOPPING
    w.enabled = False
    w.slot.reconfigure(w.cfg, w.slot.reload_reason(["monitors.kernel"]))
    assert w.state() is State.STOPPING and w.proc.signals == [signal.SIGTERM]
    w.exit(0)
    assert w.state() is State.DISABLED and len(w.procs) == 1


def test_stop_during_backoff_cancels_the_restart() -> None:
    w = World()
    w.slot.start()
    w.exit(1)
    assert w.state() is State.BACKOFF
    w.slot.stop()
    assert w.state() is State.STOPPED and w.slot.next_deadline() is None
    w.advance(100)
    assert len(w.procs) == 1


def test_stop_during_start_terms_then_kills_after_the_grace() -> None:
    w = World()
    w.slot.start()
    w.slot.stop()
    assert w.state() is State.STOPPING and w.proc.signals == [signal.SIGTERM]
    grace = w.cfg.workers.stop_grace
    w.advance(grace - 0.1)
    assert not w.proc.killed
    w.advance(0.2)
    assert w.proc.killed
    w.exit(-signal.SIGKILL)
    assert w.state() is State.STOPPED
    assert w.last(K.WORKER_EXITED)["killed_by_supervisor"] == f"did not stop within {grace:g} s"
    w.advance(100)
    assert len(w.procs) == 1


def test_missed_heartbeats_kill_and_restart() -> None:
    w = World()
    w.slot.start()
    w.ready()
    timeout = w.cfg.workers.heartbeat_timeout
    assert w.slot.next_deadline() == pytest.approx(w.clock.now + timeout, abs=0.01)
    w.advance(timeout + 0.01)
    assert w.proc.killed and w.kinds()[-1] == K.WORKER_UNRESPONSIVE
    w.exit(-signal.SIGKILL)
    assert w.state() is State.BACKOFF
    assert w.last(K.WORKER_EXITED)["reason"].startswith("no heartbeat for")


def test_not_ready_in_time_is_killed() -> None:
    w = World()
    w.slot.start()
    w.advance(w.cfg.workers.ready_timeout + 0.01)
    assert w.proc.killed
    w.exit(-signal.SIGKILL)
    assert "not ready within" in w.last(K.WORKER_EXITED)["reason"]


@pytest.mark.parametrize("line", [b"[]", b"{}", b'{"t":"hb"}', b'{"t":"hb","sent":-1,"dropped":0}',
                                  b'{"t":"ready","pid":"x"}', b"\xff\xfe", b"[" * 100_000,
                                  b'{"t":"exit","code":1,"reason":[]}'])
def test_a_bad_status_line_kills_the_worker_and_says_why(line: bytes) -> None:
    w = World()
    w.slot.start()
    w.proc.lines.append(line)
    w.slot.on_status()
    assert w.proc.killed
    w.exit(-signal.SIGKILL)
    assert "broke the status protocol" in w.last(K.WORKER_EXITED)["reason"]
    assert w.state() is State.BACKOFF


def test_drops_in_heartbeats_are_reported_once_each() -> None:
    w = World()
    w.slot.start()
    w.ready()
    for dropped in (0, 5, 5, 7):
        w.proc.say("hb", sent=10, dropped=dropped, rss=1000, info={"x": 1})
        w.slot.on_status()
    losses = [d for k, d in w.events if k == K.LOSS]
    assert [x["dropped"] for x in losses] == [5, 2] and losses[-1]["dropped_total"] == 7
    view = w.slot.view()
    assert view["events_sent"] == 10 and view["events_dropped"] == 7 and view["info"] == {"x": 1}


def test_a_worker_that_cannot_be_executed_is_retried_later() -> None:
    w = World()
    w.spawn_error = PermissionError(13, "Permission denied")
    w.slot.start()
    assert w.state() is State.BACKOFF and w.last(K.WORKER_FAILED)["reason"].startswith("cannot exec")
    w.spawn_error = None
    w.advance(w.cfg.restart.max_delay + 0.01)
    assert w.state() is State.STARTING


def test_the_log_says_once_per_family_which_worker_runs_and_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="cnisup.supervisor")
    w = World()
    w.slot.start()
    w.exit(1)
    w.advance(5)  # restarted: the same choice is not logged again
    w.exit(exitcodes.EX_NOPERM, reason="no BTF")
    using = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Using ")]
    assert using == ["Using eBPF monitor for the kernel family",
                     "Using proc-poll for the kernel family: ebpf: no BTF"]
    assert all(r.levelname == "INFO" for r in caplog.records if r.getMessage().startswith("Using "))


def test_nothing_to_watch_idles_quietly_and_looks_again(caplog: pytest.LogCaptureFixture) -> None:
    w = World()
    w.idle = True
    with caplog.at_level(logging.INFO, logger="cnisup.supervisor"):
        w.slot.start()
        assert w.state() is State.IDLE and w.procs == [] and w.events == []
        assert w.slot.next_deadline() == pytest.approx(w.clock.now + 300, abs=0.01)
        w.advance(300.01)
        assert w.state() is State.IDLE and w.procs == []
        reason = w.slot.reload_reason([])  # a reload looks again at once, and starts nothing if nothing is there
        assert reason == "retried on reload (was idle)" and w.slot.reconfigure(w.cfg, reason) is False
        assert w.state() is State.IDLE
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert said == [(logging.INFO, "monitor family kernel is idle: nothing to watch; looking again every 300 s")]
    w.idle = False
    w.advance(300.01)
    assert w.state() is State.STARTING and w.slot.worker is PRIMARY


# -- a family without a fallback (export): it waits and retries, it never falls back ---------

EXPORT = FAMILIES["export"]


def test_a_family_without_fallback_restarts_its_primary_however_often_it_crashes() -> None:
    assert EXPORT.fallback is None
    w = World(family=EXPORT)
    w.slot.start()
    assert w.proc.worker is EXPORT.primary
    for _ in range(6):  # well past flap_threshold: there is nothing to flap into
        w.exit(1)
        assert w.state() is State.BACKOFF
        w.advance(w.last(K.WORKER_RESTARTING)["delay_s"] + 0.01)
        assert w.state() is State.STARTING and w.proc.worker is EXPORT.primary
    assert K.WORKER_FALLBACK not in w.kinds()
    assert not w.slot.on_fallback and w.slot.view()["degraded"] is False


def test_a_family_without_fallback_is_unavailable_on_77_and_reprobed_later() -> None:
    w = World(family=EXPORT, primary_ok=False)
    w.slot.start()
    assert w.proc.worker is EXPORT.primary  # started anyway: only the worker can tell
    w.exit(exitcodes.EX_NOPERM, reason="nats-py is not installed")
    assert w.state() is State.UNAVAILABLE and K.WORKER_FALLBACK not in w.kinds()
    failed = w.last(K.WORKER_FAILED)
    assert "nats-py is not installed" in failed["reason"] and failed["retry_in_s"] == 300.0
    w.advance(299)
    assert w.state() is State.UNAVAILABLE and len(w.procs) == 1
    w.primary_ok = True
    w.advance(1.01)
    assert w.state() is State.STARTING and len(w.procs) == 2


def test_a_family_without_fallback_fails_on_a_configuration_error_and_stays_down() -> None:
    w = World(family=EXPORT)
    w.slot.start()
    w.ready()
    w.exit(exitcodes.EX_CONFIG, reason="export.nats.stream: stream 'X' does not exist (create_stream: false)")
    assert w.state() is State.FAILED
    assert "export.nats.stream" in w.last(K.WORKER_FAILED)["reason"]
    assert w.slot.next_deadline() is None
    w.advance(3600)
    assert w.state() is State.FAILED and len(w.procs) == 1
