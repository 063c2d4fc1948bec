"""The publisher against real ZeroMQ sockets: handshake and drop counting."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from cnisup.protocol import envelope
from cnisup.workers.bus import Bus, BusNotReady


def test_ready_only_after_the_proxy_subscribes(tmp_path: Path) -> None:
    ctx: zmq.Context[Any] = zmq.Context.instance()
    ep = f"ipc://{tmp_path}/bus.sock"
    bus = Bus(ep, envelope.Stamp("inotify", "n", "i"), context=ctx)
    with pytest.raises(BusNotReady):
        bus.wait_ready(0.2)  # nobody there yet
    xsub = ctx.socket(zmq.XSUB)
    xsub.bind(ep)
    xsub.send(b"\x01")
    time.sleep(0.2)
    xsub.poll(100)  # libzmq attaches the pipe (and replays the subscription) when the socket is used
    bus.wait_ready(5)
    bus.publish("monitor.warning", {"family": "f", "worker": "w", "code": "c", "message": "m"})
    assert xsub.poll(5000)
    env = envelope.decode(xsub.recv_multipart())
    assert env["seq"] == 1
    bus.close(0)
    xsub.close(0)


def test_never_blocks_and_counts_drops_at_the_high_water_mark(tmp_path: Path) -> None:
    ctx: zmq.Context[Any] = zmq.Context.instance()
    ep = f"ipc://{tmp_path}/bus.sock"
    xsub = ctx.socket(zmq.XSUB)
    xsub.setsockopt(zmq.RCVHWM, 10)
    xsub.bind(ep)
    xsub.send(b"\x01")
    bus = Bus(ep, envelope.Stamp("inotify", "n", "i"), context=ctx, sndhwm=10)
    time.sleep(0.1)
    xsub.poll(100)
    bus.wait_ready(5)
    n = 20_000
    data = {"family": "f", "worker": "w", "code": "c", "message": "x" * 200}
    t0 = time.monotonic()
    for _ in range(n):  # the peer never reads
        bus.publish("monitor.warning", data)
    assert time.monotonic() - t0 < 30  # it returned: nothing blocked
    assert bus.dropped > 0 and bus.sent + bus.dropped == n
    got = []
    while xsub.poll(200):
        got.append(envelope.decode(xsub.recv_multipart())["seq"])
    assert len(got) == bus.sent
    assert got[-1] == n or n - got[-1] <= bus.dropped  # holes account for exactly the drops
    assert n - len(got) == bus.dropped
    bus.close(0)
    xsub.close(0)
