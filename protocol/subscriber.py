"""A subscriber helper: connect to cnisup's public endpoints, decode
envelopes, and detect sequence gaps (lost events) per incarnation.

Gap detection is only meaningful for a subscription that receives *every*
event of a source (no topic prefix filter): a worker numbers all its events in
one sequence, so a prefix filter leaves holes that are not losses. Filter on
the client side when you need loss detection and a subset.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import zmq

from . import envelope


@dataclass(frozen=True)
class Gap:
    """Events ``expected`` .. ``got - 1`` of ``incarnation`` never arrived."""

    source: str
    incarnation: str
    expected: int
    got: int

    @property
    def lost(self) -> int:
        return self.got - self.expected


class GapDetector:
    """Remembers the last seq per incarnation (a bounded number of them)."""

    def __init__(self, *, max_incarnations: int = 4096) -> None:
        self._last: OrderedDict[str, int] = OrderedDict()
        self._max = max_incarnations

    def observe(self, env: dict[str, Any]) -> Gap | None:
        inc, seq = env["incarnation"], env["seq"]
        last = self._last.get(inc)
        self._last[inc] = seq if last is None else max(last, seq)
        self._last.move_to_end(inc)
        while len(self._last) > self._max:
            self._last.popitem(last=False)
        if last is not None and seq > last + 1:
            return Gap(env["source"], inc, last + 1, seq)
        return None


@dataclass(frozen=True)
class CurveClient:
    """Keys for a CURVE-secured tcp endpoint (Z85 text, as in zmq.auth cert files)."""

    server_public: bytes
    public: bytes
    secret: bytes


class Subscriber:
    """A SUB socket on one or more endpoints; ``recv`` returns (envelope, gap)."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        topics: list[str] | None = None,
        curve: CurveClient | None = None,
        context: zmq.Context[Any] | None = None,
        rcvhwm: int = 100_000,
    ) -> None:
        self._ctx = context or zmq.Context.instance()
        self.socket: zmq.Socket[Any] = self._ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.socket.curve_serverkey = curve.server_public
            self.socket.curve_publickey = curve.public
            self.socket.curve_secretkey = curve.secret
        for prefix in topics or [""]:
            self.socket.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        for ep in endpoints:
            self.socket.connect(ep)
        self.gaps = GapDetector()
        self.detect_gaps = not topics or topics == [""]

    def recv(self, timeout_ms: int | None = None) -> tuple[dict[str, Any], Gap | None] | None:
        """Next envelope, or None on timeout. Raises ProtocolError on a bad message."""
        if timeout_ms is not None and not self.socket.poll(timeout_ms):
            return None
        env = envelope.decode(self.socket.recv_multipart())
        gap = self.gaps.observe(env) if self.detect_gaps else None
        return env, gap

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
