"""Backoff delays from tenacity's wait strategies, for loops that are not a
``tenacity.Retrying`` (the supervisor's restart policy, watch reconnects):
they know the attempt number and need the delay, not a retrying call."""

from __future__ import annotations

import tenacity
from tenacity.wait import wait_base


def exponential(*, initial_s: float, multiplier: float, max_s: float, jitter_s: float) -> wait_base:
    """initial * multiplier**(n-1), capped at ``max_s``, plus 0..jitter seconds."""
    return (tenacity.wait_exponential(multiplier=initial_s, exp_base=multiplier, max=max_s)
            + tenacity.wait_random(0, jitter_s))


def delay_s(wait: wait_base, attempt: int) -> float:
    """The delay ``wait`` gives before attempt number ``attempt`` (1-based)."""
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    return float(wait(state))
