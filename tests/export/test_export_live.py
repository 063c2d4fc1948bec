"""The export's live path (``export.nats.live``), run by a real ``cnisup
start`` against a real ``nats-server -js``: an event goes to the stream as it
reaches the bus, before the journal commits it, and its journal row, read
later, is not sent again; events that did not reach the export live (a gap:
it was away) come from the journal, in order. ``live: false`` waits for the
journal's commit."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import natsserver
import pytest
from e2e.support import Cnisup
from harness import world_dir
from support import Dest, check_exactly_once, journal_of, read_stream

from cnisup.protocol import envelope, subjects
from cnisup.workers.bus import Bus

#: The journal commits only this long after an event (or at 2,000): the live path is what
#: brings the events to the stream before then.
SLOW_COMMIT_S = 3.0
#: Seconds after which live events must be in the stream (a fraction of SLOW_COMMIT_S).
LIVE_WITHIN_S = 1.0
#: Events of the burst: more than the live window (max_in_flight, 1,024).
GAP = 5_000


@pytest.fixture
def base() -> Iterator[Path]:
    d = world_dir("cnisup-live-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def node(base: Path, server: natsserver.Server, dest: Dest, *, live: bool) -> Cnisup:
    base.chmod(0o755)
    return Cnisup(base, node_name="node-l", journal={"batch_interval": SLOW_COMMIT_S},
                  monitors={"config": False, "kernel": False, "k8s": False},
                  export={"enabled": True, "nats": dest.nats([server.url], live=live)})


def journal(c: Cnisup) -> list[dict[str, Any]]:
    held: list[dict[str, Any]] = journal_of(c.runtime_dir)
    return held


def mine(server: natsserver.Server, dest: Dest, incarnation: str) -> list[str]:
    """Ids of this test's events in the stream, in stream order."""
    stored = read_stream([server.url], dest.stream, subjects.node_filter(dest.prefix, "node-l"))
    return [s.msg_id or "" for s in stored if s.env["incarnation"] == incarnation]


def publish(c: Cnisup, n: int, start_seq: int = 1) -> tuple[Bus, str]:
    """``n`` events of a fresh incarnation on the workers' bus, as a worker sends them."""
    stamp = envelope.Stamp("file-poll", "node-l", envelope.new_incarnation())
    bus = Bus(f"ipc://{c.runtime_dir}/private/bus.sock", stamp)
    bus.wait_ready(10)
    for i in range(n):
        bus.publish("monitor.warning", {"family": "config", "worker": "file-poll", "code": "live", "message": str(i)})
    return bus, stamp.incarnation


def wait_journal(c: Cnisup, incarnation: str, n: int) -> None:
    """Until the journal committed ``n`` events of ``incarnation``."""
    deadline = time.monotonic() + 3 * SLOW_COMMIT_S
    while len([e for e in journal(c) if e["incarnation"] == incarnation]) < n:
        assert time.monotonic() < deadline, "the journal did not commit them"
        time.sleep(0.2)


def export_info(c: Cnisup) -> dict[str, Any]:
    info: dict[str, Any] = c.worker("export")["info"]
    return info


def wait_caught_up(c: Cnisup, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        info = export_info(c)
        if info.get("behind") == 0 and info.get("in_flight") == 0 and info.get("state") == "connected":
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.2)


@pytest.mark.parametrize("live", [True, False], ids=["live", "journal-only"])
def test_events_reach_the_stream_before_the_journal_commits_them_and_are_not_sent_twice(
        base: Path, nats_single: natsserver.Server, dest: Dest, live: bool) -> None:
    c = node(base, nats_single, dest, live=live)
    c.start()
    try:
        c.wait_worker("export", state="running", timeout_s=30)
        wait_caught_up(c, 3 * SLOW_COMMIT_S)  # the start-up's events, committed and sent
        # Not once restarted, although its journal stayed empty for SLOW_COMMIT_S after the start.
        assert c.worker("export")["restarts"] == 0
        sent_at = time.monotonic()
        bus, incarnation = publish(c, 50)
        early: list[str] = []
        while time.monotonic() < sent_at + LIVE_WITHIN_S and len(early) < 50:
            time.sleep(0.2)
            early = mine(nats_single, dest, incarnation)
        in_journal = [e for e in journal(c) if e["incarnation"] == incarnation]
        assert in_journal == [], "the journal committed early: this test shows nothing"
        if live:
            assert len(early) == 50, f"{len(early)} of 50 live events in the stream after {LIVE_WITHIN_S} s"
        else:
            assert early == [], "journal-only, yet events reached the stream before the journal committed them"
        wait_journal(c, incarnation, 50)
        info = wait_caught_up(c, 3 * SLOW_COMMIT_S)  # the cursor passes over them
        stored = read_stream([nats_single.url], dest.stream, subjects.node_filter(dest.prefix, "node-l"))
        check_exactly_once(stored, journal(c))
        assert info["duplicates"] == 0, info  # nothing was sent twice, not even for the server to drop
        assert (info.get("live", 0) >= 50) == live, info
        bus.close(0)
    finally:
        assert c.stop() == 0


def test_a_gap_goes_through_the_journal_in_order_then_live_resumes(
        base: Path, nats_single: natsserver.Server, dest: Dest) -> None:
    """A burst the live path cannot take (SIGSTOPped meanwhile, then over its window) reaches
    the stream from the journal; the events after it go live again; all in seq order, once."""
    c = node(base, nats_single, dest, live=True)
    c.start()
    try:
        export = c.wait_worker("export", state="running", timeout_s=30)
        wait_caught_up(c, 3 * SLOW_COMMIT_S)
        assert c.worker("export")["restarts"] == 0
        bus, incarnation = publish(c, 20)
        deadline = time.monotonic() + LIVE_WITHIN_S
        while len(mine(nats_single, dest, incarnation)) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        pid = int(export["pid"])
        os.kill(pid, signal.SIGSTOP)
        try:
            # Over its live window (export.nats.max_in_flight events whose journal rows were not
            # read yet; the journal commits seconds later): the rest is a gap for the live path.
            for i in range(GAP):
                bus.publish("monitor.warning", {"family": "config", "worker": "file-poll", "code": "gap",
                                                "message": str(i)})
            time.sleep(1.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_journal(c, incarnation, 20 + GAP)
        wait_caught_up(c, 60)
        before = export_info(c)
        for i in range(20):
            bus.publish("monitor.warning", {"family": "config", "worker": "file-poll", "code": "after",
                                            "message": str(i)})
        deadline = time.monotonic() + LIVE_WITHIN_S
        while len(mine(nats_single, dest, incarnation)) < 20 + GAP + 20:
            assert time.monotonic() < deadline, "the events after the gap did not go live"
            time.sleep(0.2)
        wait_journal(c, incarnation, 20 + GAP + 20)
        info = wait_caught_up(c, 3 * SLOW_COMMIT_S)
        assert info["live"] >= before["live"] + 20, (before, info)
        assert info["live_skipped"] > 0, info
        stored = read_stream([nats_single.url], dest.stream, subjects.node_filter(dest.prefix, "node-l"))
        check_exactly_once(stored, journal(c))
        bus.close(0)
    finally:
        assert c.stop() == 0
