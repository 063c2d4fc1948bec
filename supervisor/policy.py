"""Restart policy: pure functions of a family's history, no I/O, no clock.

Delays come from tenacity's wait strategies (exponential + random jitter,
capped; ``workers.backoff``). ``decide`` maps an exit to what the supervisor does next.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from cnisup.protocol import exitcodes
from cnisup.protocol.settings import Restart
from cnisup.workers import backoff


def delay_for(s: Restart, attempt: int) -> float:
    """Delay before restart number ``attempt`` (1-based) of a backoff episode:
    initial * multiplier**(n-1), capped, plus 0..jitter seconds."""
    wait = backoff.exponential(initial_s=s.initial_delay, multiplier=s.multiplier, max_s=s.max_delay,
                               jitter_s=s.jitter)
    return min(backoff.delay_s(wait, attempt), s.max_delay + s.jitter)


class Action(enum.Enum):
    NOTHING = "nothing"  #: it stopped because we asked
    RESTART = "restart"  #: same worker, after ``delay_s``
    FALLBACK = "fallback"  #: start the family's fallback now
    GIVE_UP = "give_up"  #: configuration error, or nothing can run: wait for re-probe / reload


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    delay_s: float = 0.0
    attempt: int = 0


@dataclass
class History:
    """What the policy remembers about the worker currently running a family."""

    attempt: int = 0  #: consecutive crashes in the current backoff episode
    crashes: deque[float] = field(default_factory=deque)  #: monotonic times, within the window

    def reset(self) -> None:
        self.attempt = 0
        self.crashes.clear()


def describe_exit(code: int | None, signal_name: str | None) -> str:
    if signal_name:
        return f"killed by {signal_name}"
    if code == exitcodes.EX_NOPERM:
        return "exit 77 (capability or kernel feature missing)"
    if code == exitcodes.EX_CONFIG:
        return "exit 78 (configuration error)"
    return f"exit {code}"


def decide(
    s: Restart,
    history: History,
    *,
    code: int | None,
    signal_name: str | None,
    ran_for_s: float,
    now: float,
    can_fall_back: bool,
    stopping: bool,
) -> Decision:
    """What to do after a worker exit. Mutates ``history`` (the only state).
    ``can_fall_back``: the worker is a primary whose family has a fallback."""
    what = describe_exit(code, signal_name)
    if stopping:
        return Decision(Action.NOTHING, "supervisor is stopping")
    if code == exitcodes.OK and signal_name is None:
        # A worker only exits 0 when asked to; anything else is a bug: treat as crash.
        what = "exit 0 without being asked to stop"
    if code == exitcodes.EX_CONFIG:
        return Decision(Action.GIVE_UP, what)
    if code == exitcodes.EX_NOPERM:
        if can_fall_back:
            return Decision(Action.FALLBACK, what)
        return Decision(Action.GIVE_UP, what)
    # A crash.
    if ran_for_s >= s.stable_after:
        history.attempt = 0  # it had been healthy: a fresh backoff episode
    history.attempt += 1
    history.crashes.append(now)
    while history.crashes and now - history.crashes[0] > s.flap_window:
        history.crashes.popleft()
    if can_fall_back and len(history.crashes) >= s.flap_threshold:
        return Decision(Action.FALLBACK, f"flapping: {len(history.crashes)} crashes within "
                                         f"{s.flap_window:g} s (last: {what})")
    return Decision(Action.RESTART, what, delay_for(s, history.attempt), history.attempt)
