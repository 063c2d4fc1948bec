"""The one publisher: every event a worker (or the supervisor) emits goes
through ``Bus.publish``.

The socket is an XPUB that *connects* to the supervisor's XSUB. XPUB rather
than PUB for two reasons:

* slow-joiner safety: the proxy's XSUB subscribes to everything, and XSUB
  replays its subscriptions to every new pipe, so receiving that subscription
  proves the path to the proxy is up. ``wait_ready`` blocks on it; nothing is
  published before, so nothing is silently lost to the handshake.
* backpressure accounting: with ``XPUB_NODROP`` a full pipe makes a
  non-blocking send fail with EAGAIN instead of dropping silently, so every
  drop is counted here (a plain PUB drops without telling anyone).
"""

from __future__ import annotations

import collections
import time
from typing import Any

import zmq

from cnisup.protocol import envelope


class BusNotReady(RuntimeError):
    """The proxy's subscription did not arrive in time."""


class Bus:
    def __init__(
        self,
        endpoint: str,
        stamp: envelope.Stamp,
        *,
        sndhwm: int = 10_000,
        context: zmq.Context[Any] | None = None,
        linger_ms: int = 2_000,
        keep: int = 0,
    ) -> None:
        self._ctx = context or zmq.Context.instance()
        self.stamp = stamp
        self.sent = 0
        self.dropped = 0
        #: the last ``keep`` payloads sent, by seq (the supervisor replays its own to the journal)
        self.recent: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._keep = keep
        self.sock: zmq.Socket[Any] = self._ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.XPUB_NODROP, 1)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.sock.connect(endpoint)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the proxy's subscribe-all arrives (the XPUB handshake)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise BusNotReady(f"no subscription from the proxy within {timeout_s:.1f} s")
            if self.sock.poll(left_ms) and self.sock.recv() == b"\x01":
                return

    def wait_subscription(self, topic: bytes, timeout_s: float) -> None:
        """Block until a subscriber's subscription to ``topic`` comes back up
        through the proxy: proof that a SUB socket is attached to the proxy's
        XPUB (the proxy passes each new subscription to every publisher)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise BusNotReady(f"our own subscription did not come back within {timeout_s:.1f} s")
            if self.sock.poll(left_ms) and self.sock.recv() == b"\x01" + topic:
                return

    def drain(self) -> None:
        """Discard subscription messages forwarded from external subscribers, so
        they do not pile up in the receive queue."""
        try:
            while True:
                self.sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass

    def publish(self, kind: str, data: dict[str, Any], ts: int | None = None) -> bool:
        """Send one event without ever blocking; count it as dropped at the
        high-water mark. Returns whether it was queued."""
        env = self.stamp.build(kind, data, ts)
        frames = envelope.encode(env)
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        if self._keep:
            self.recent[env["seq"]] = frames[1]
            if len(self.recent) > self._keep:
                self.recent.popitem(last=False)
        return True

    def close(self, linger_ms: int | None = None) -> None:
        self.sock.close(linger=linger_ms)
