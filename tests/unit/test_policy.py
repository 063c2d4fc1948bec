"""The restart policy is pure: test it without processes or clocks."""

from __future__ import annotations

from cnisup.protocol.settings import Restart
from cnisup.supervisor.policy import Action, Decision, History, decide, delay_for

S = Restart(initial_delay=0.5, multiplier=2.0, max_delay=8.0, jitter=0.0, stable_after=30.0,
            flap_threshold=3, flap_window=60.0)


def crash(h: History, now: float, *, ran_for: float = 1.0, primary: bool = False, code: int | None = 1,
          sig: str | None = None, stopping: bool = False) -> Decision:
    return decide(S, h, code=code, signal_name=sig, ran_for_s=ran_for, now=now,
                  can_fall_back=primary, stopping=stopping)


def test_delays_grow_exponentially_and_are_capped() -> None:
    assert [delay_for(S, n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_jitter_is_bounded_and_varies() -> None:
    s = Restart(initial_delay=1.0, jitter=0.5, max_delay=100)
    samples = [delay_for(s, 3) for _ in range(200)]
    assert all(4.0 <= d <= 4.5 for d in samples)
    assert len(set(samples)) > 100


def test_crash_loop_backs_off() -> None:
    h = History()
    delays = [crash(h, now=float(i * 100)).delay_s for i in range(4)]  # spaced: no flapping window
    assert delays == [0.5, 1.0, 2.0, 4.0]


def test_stable_run_starts_a_fresh_episode() -> None:
    h = History()
    crash(h, 0.0)
    crash(h, 1.0)
    d = crash(h, 100.0, ran_for=31.0)
    assert d.action is Action.RESTART and d.attempt == 1 and d.delay_s == 0.5


def test_flapping_primary_goes_to_fallback_but_fallback_keeps_restarting() -> None:
    h = History()
    assert crash(h, 0.0, primary=True).action is Action.RESTART
    assert crash(h, 1.0, primary=True).action is Action.RESTART
    d = crash(h, 2.0, primary=True)
    assert d.action is Action.FALLBACK and "flapping" in d.reason
    fb = History()
    assert all(crash(fb, float(i)).action is Action.RESTART for i in range(10))


def test_crashes_outside_the_window_do_not_flap() -> None:
    h = History()
    for t in (0.0, 61.0, 122.0, 183.0):
        assert crash(h, t, primary=True).action is Action.RESTART


def test_exit_codes() -> None:
    assert crash(History(), 0, code=77, primary=True).action is Action.FALLBACK
    assert crash(History(), 0, code=77, primary=False).action is Action.GIVE_UP
    assert crash(History(), 0, code=78, primary=True).action is Action.GIVE_UP
    assert crash(History(), 0, code=None, sig="SIGKILL").action is Action.RESTART
    assert crash(History(), 0, code=0).action is Action.RESTART  # unasked exit 0 is a crash
    assert crash(History(), 0, code=1, stopping=True).action is Action.NOTHING
