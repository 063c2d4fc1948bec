"""One family's slot: which worker runs it now, its child process, and what
the supervisor knows about it (restarts, last exit, heartbeats, counters)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cnisup.supervisor.policy import History
from cnisup.supervisor.spawn import Child
from cnisup.workers.registry import Family, WorkerInfo

# States a family can be in (status and events use these words).
STARTING, RUNNING, BACKOFF, STOPPING, STOPPED = "starting", "running", "backoff", "stopping", "stopped"
FAILED, UNAVAILABLE, DISABLED = "failed", "unavailable", "disabled"


@dataclass
class Watcher:
    family: Family
    worker: WorkerInfo | None = None
    state: str = STOPPED
    reason: str = ""  #: why this worker was chosen
    child: Child | None = None
    incarnation: str | None = None
    restarts: int = 0
    last_exit: dict[str, Any] | None = None
    fallback_reason: str | None = None
    histories: dict[str, History] = field(default_factory=dict)
    # Filled from the worker's status channel.
    ready: bool = False
    last_heartbeat: float = 0.0
    sent: int = 0
    dropped: int = 0
    reported_dropped: int = 0
    dropped_total: int = 0  #: over all incarnations
    rss: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    exit_reason: str | None = None  #: what the worker said before exiting
    # Timers (monotonic seconds) and pending actions.
    restart_at: float | None = None
    reprobe_at: float | None = None
    stop_deadline: float | None = None
    kill_reason: str | None = None
    #: set while the current child is being stopped to start another worker
    #: (or none, for a disabled family) afterwards: (worker, reason, event kind)
    replace_with: tuple[WorkerInfo | None, str, str] | None = None

    def history(self) -> History:
        assert self.worker is not None
        return self.histories.setdefault(self.worker.name, History())

    def view(self, now: float) -> dict[str, Any]:
        c = self.child
        return {
            "family": self.family.name,
            "worker": self.worker.name if self.worker else None,
            "source": self.worker.name if self.worker else None,
            "role": self.worker.role if self.worker else None,
            "state": self.state,
            "reason": self.reason,
            "pid": c.pid if c else None,
            "incarnation": self.incarnation,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "fallback_reason": self.fallback_reason,
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
