"""Loss at the edges of a stream, seen by subscribers of a real ``cnisup
start``: before a subscriber's first event, at the end of a burst, and for a
subscriber of a topic prefix."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import world_dir

from cnisup.protocol.subscriber import Subscriber

from .support import CNISUP, Cnisup


@pytest.fixture
def base() -> Iterator[Path]:
    d = world_dir()
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def config_only(base: Path, **over: object) -> Cnisup:
    return Cnisup(base, monitors={"kernel": False, "config": True, "k8s": False}, **over)


def test_tail_connected_before_start_misses_none_of_the_supervisors_first_events(base: Path) -> None:
    c = config_only(base, journal={"enabled": False})
    (c.runtime_dir).mkdir(parents=True, exist_ok=True)
    tail = subprocess.Popen([CNISUP, "tail", "--config", str(c.config_path), "-o", "json", "--timeout", "6", "--wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # tail runs, retrying its connection to a socket that does not exist yet
    c.start()
    try:
        out, err = tail.communicate(timeout=60)
    finally:
        assert c.stop() == 0
    envs = [json.loads(line) for line in out.splitlines()]
    sup = [e["seq"] for e in envs if e["source"] == "supervisor"]
    assert sup[:3] == [1, 2, 3], (sup, err)  # supervisor.started included, whether live or recovered
    assert sup == sorted(set(sup))
    assert envs[0]["kind"] == "supervisor.started" or "recovered" in err


def _settled_seq(c: Cnisup, family: str = "config") -> int:
    """The worker's last seq once it stopped publishing (from cnisup status)."""
    last, same = -1, 0
    while same < 3:
        w = c.worker(family)
        seq = int(w["events_sent"]) + int(w["events_dropped"])
        same = same + 1 if seq == last else 0
        last = seq
        time.sleep(0.3)
    return last


def test_a_slow_subscriber_learns_of_loss_at_the_end_of_a_burst(base: Path) -> None:
    c = config_only(base, publish={"hwm": 20, "progress_interval": 1.0}, journal={"enabled": False},
                    workers={"heartbeat_interval": 0.2, "heartbeat_timeout": 3.0})
    c.start()
    sub = Subscriber([c.endpoint], rcvhwm=10)
    try:
        c.wait_worker("config", state="running")
        time.sleep(1.0)
        for i in range(500):  # a burst this subscriber does not read in time; nothing comes after it
            (c.conf_dir / f"b{i:04}.conf").write_text(json.dumps({"name": f"n{i}", "type": "bridge"}))
        last = _settled_seq(c)
        got, holes, lost = [], 0, 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not lost:
            r = sub.recv(200)
            if r is not None:
                got.append(r[0])
                holes += r[1].lost if r[1] is not None else 0
            lost += sum(g.lost for g in sub.losses() if g.source in ("inotify", "file-poll"))
        seqs = [e["seq"] for e in got if e["source"] in ("inotify", "file-poll")]
        assert len(seqs) < last, "the test needs this subscriber to lose events"
        assert lost > 0, "the loss at the end of the stream was not told"
        # every event it did not get is accounted for: holes seen on the way, or told by progress
        # (``last`` is from the status a moment earlier: the worker may have said a little more since)
        assert len(seqs) + holes + lost >= last - (seqs[0] - 1), (len(seqs), holes, lost, last)
    finally:
        sub.close()
        assert c.stop() == 0


def test_a_topic_prefix_subscriber_detects_loss_per_kind(base: Path) -> None:
    c = config_only(base, publish={"hwm": 20, "progress_interval": 1.0}, journal={"enabled": False})
    c.start()
    sub = Subscriber([c.endpoint], topics=["cni.config.created"], rcvhwm=5)
    try:
        c.wait_worker("config", state="running")
        time.sleep(0.5)
        for i in range(300):
            (c.conf_dir / f"p{i:04}.conf").write_text(json.dumps({"name": f"n{i}", "type": "bridge"}))
        time.sleep(3.0)
        kinds, lost = set(), 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not lost:
            r = sub.recv(200)
            if r is not None:
                kinds.add(r[0]["kind"])
                lost += r[1].lost if r[1] is not None else 0
            lost += sum(g.lost for g in sub.losses() if g.kind == "cni.config.created")
        assert kinds <= {"cni.config.created"}  # progress and worker.started are used, not handed out
        assert lost > 0
    finally:
        sub.close()
        assert c.stop() == 0
