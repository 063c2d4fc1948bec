"""The supervisor's proxy against real ZeroMQ sockets: each private endpoint
keeps the queue it was bound with."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import zmq

from cnisup.protocol import envelope
from cnisup.supervisor.proxy import Proxy, ProxySettings
from cnisup.workers.bus import Bus


def _sub(ctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 100)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


def _drain(sock: zmq.Socket[Any]) -> int:
    n = 0
    while sock.poll(300):
        sock.recv_multipart()
        n += 1
    return n


def test_a_live_subscriber_that_does_not_read_is_held_to_its_small_queue_the_journal_gets_all(tmp_path: Path) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    settings = ProxySettings(bus_endpoint=f"ipc://{tmp_path}/bus.sock", public_endpoints=[], hwm=100_000,
                             worker_gid=None, consumer_endpoint=f"ipc://{tmp_path}/events.sock", consumer_hwm=100_000,
                             live_endpoint=f"ipc://{tmp_path}/live.sock", live_hwm=500)
    proxy = Proxy(settings, ctx)
    proxy.start()
    journal, live = _sub(ctx, settings.consumer_endpoint or ""), _sub(ctx, settings.live_endpoint or "")
    bus = Bus(settings.bus_endpoint, envelope.Stamp("inotify", "n", "i"), context=ctx, sndhwm=100_000)
    try:
        bus.wait_ready(5)
        time.sleep(0.3)  # both subscriptions reached the XPUB
        n = 20_000
        got = 0
        for i in range(n):  # the journal reads as it goes; the live subscriber is stuck
            bus.publish("monitor.warning", {"family": "f", "worker": "w", "code": "c", "message": "x" * 100})
            if i % 100 == 0:
                while journal.poll(0):
                    journal.recv_multipart()
                    got += 1
        assert proxy.flush(n, 10)
        got += _drain(journal)
        held = _drain(live)
        assert got == n
        # its queues (500 at the proxy, 100 in its socket) and what the ipc socket's kernel buffer holds
        assert 0 < held < n // 4, held
    finally:
        bus.close(0)
        journal.close(0)
        live.close(0)
        proxy.stop()
        ctx.term()
