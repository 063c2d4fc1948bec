"""A subscriber helper: connect to cnisup's public endpoints, decode
envelopes, and see every loss (docs/PROTOCOL.md, "Incarnations, sequence
numbers and loss").

* A hole in an incarnation's ``seq`` is loss, for a subscriber of every
  topic. A subscriber of topic prefixes sees only some kinds, so it checks
  ``kseq`` (counted per incarnation and kind) instead.
* ``supervisor.progress`` (every ``publish.progress_interval`` while events
  flow, and at the end) tells where each incarnation stands: what has not
  arrived a grace period later was lost, even at the end of a stream. The
  helper subscribes to it (and to ``supervisor.worker.started``) whatever the
  prefixes, and hands them out only if they match.
* ``supervisor.worker.started`` announces an incarnation: its events start at
  1, so a missed first event is seen too. A new subscriber seeds its starting
  point with the control socket's ``progress`` (``seed``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import zmq

from . import envelope

#: Topics the helper always needs, whatever the caller's prefixes.
PROGRESS = "supervisor.progress"
STARTED = "supervisor.worker.started"
#: Seconds after a progress event by which the events it counts must have arrived.
GRACE_S = 2.0


@dataclass(frozen=True)
class Gap:
    """Events ``expected`` .. ``got - 1`` of ``incarnation`` (of ``kind``, when
    counted per kind) never arrived."""

    source: str
    incarnation: str
    expected: int
    got: int
    kind: str | None = None

    @property
    def lost(self) -> int:
        return self.got - self.expected


Key = tuple[str, str | None]  # (incarnation, kind or None)


class GapDetector:
    """Remembers the last seq per incarnation (per incarnation and kind with
    ``by_kind``), a bounded number of them."""

    def __init__(self, *, by_kind: bool = False, max_keys: int = 16384, grace_s: float = GRACE_S) -> None:
        self.by_kind = by_kind
        self._last: OrderedDict[Key, int] = OrderedDict()
        self._fresh: OrderedDict[str, None] = OrderedDict()  #: announced incarnations: their counts start at 0
        self._expect: dict[Key, tuple[int, float, str]] = {}
        self._max = max_keys
        self.grace_s = grace_s

    def _key(self, env: dict[str, Any]) -> tuple[Key, int] | None:
        if not self.by_kind:
            return (env["incarnation"], None), env["seq"]
        if not isinstance(env.get("kseq"), int):
            return None  # a producer that does not count per kind: nothing to tell from
        return (env["incarnation"], env["kind"]), env["kseq"]

    def _remember(self, key: Key, n: int) -> None:
        self._last[key] = n
        self._last.move_to_end(key)
        while len(self._last) > self._max:
            self._last.popitem(last=False)

    def observe(self, env: dict[str, Any]) -> Gap | None:
        got = self._key(env)
        if got is None:
            return None
        key, n = got
        last = self._last.get(key)
        if last is None and env["incarnation"] in self._fresh:
            last = 0
        self._remember(key, n if last is None else max(last, n))
        if last is not None and n > last + 1:
            return Gap(env["source"], env["incarnation"], last + 1, n, key[1])
        return None

    def started(self, incarnation: str) -> None:
        """An incarnation was announced before any of its events: they start at 1."""
        self._fresh[incarnation] = None
        while len(self._fresh) > self._max:
            self._fresh.popitem(last=False)

    def _targets(self, entries: Iterable[dict[str, Any]], wanted: Any) -> Iterable[tuple[Key, int, str]]:
        for e in entries:
            inc, source = e.get("incarnation"), e.get("source", "?")
            if not isinstance(inc, str):
                continue
            if not self.by_kind and isinstance(e.get("seq"), int):
                yield (inc, None), e["seq"], source
            elif self.by_kind and isinstance(e.get("kseq"), dict):
                for kind, n in e["kseq"].items():
                    if isinstance(n, int) and wanted(kind):
                        yield (inc, kind), n, source

    def seed(self, entries: Iterable[dict[str, Any]], wanted: Any = lambda kind: True) -> None:
        """Start counting from where each incarnation stands now (the control
        socket's ``progress``): what follows must be contiguous."""
        for key, n, _ in self._targets(entries, wanted):
            self._remember(key, max(n, self._last.get(key, 0)))

    def expect(self, entries: Iterable[dict[str, Any]], now: float, wanted: Any = lambda kind: True) -> None:
        """A ``supervisor.progress``: these counts must have arrived within the grace period."""
        for key, n, source in self._targets(entries, wanted):
            self._expect[key] = (n, now + self.grace_s, source)

    def overdue(self, now: float) -> list[Gap]:
        """What a progress event promised and did not arrive in time. Only for
        what this subscriber has seen (or seeded): what came before it
        subscribed is not its loss."""
        gaps = []
        for key, (n, deadline, source) in list(self._expect.items()):
            if now < deadline:
                continue
            del self._expect[key]
            last = self._last.get(key)
            if last is None and key[0] in self._fresh:
                last = 0
            if last is not None and last < n:
                gaps.append(Gap(source, key[0], last + 1, n + 1, key[1]))
                self._remember(key, n)
        return gaps


@dataclass(frozen=True)
class CurveClient:
    """Keys for a CURVE-secured tcp endpoint (Z85 text, as in zmq.auth cert files)."""

    server_public: bytes
    public: bytes
    secret: bytes


class Subscriber:
    """A SUB socket on one or more endpoints; ``recv`` returns (envelope, gap),
    ``losses`` what progress events promised and never came."""

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
        self.prefixes = [t for t in topics or [] if t] or [""]
        for prefix in {*self.prefixes, PROGRESS, STARTED}:
            self.socket.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        for ep in endpoints:
            self.socket.connect(ep)
        self.gaps = GapDetector(by_kind=self.prefixes != [""])
        self.subscribed_at = time.time()

    def wanted(self, kind: str) -> bool:
        return any(kind.startswith(p) for p in self.prefixes)

    def seed(self, entries: list[dict[str, Any]]) -> None:
        self.gaps.seed(entries, self.wanted)

    def recv(self, timeout_ms: int | None = None) -> tuple[dict[str, Any], Gap | None] | None:
        """Next envelope the caller asked for, or None on timeout. Raises
        ProtocolError on a bad message."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            left = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if left is not None and not self.socket.poll(left):
                return None
            env = envelope.decode(self.socket.recv_multipart())
            if env["kind"] == PROGRESS and isinstance(env["data"].get("incarnations"), list):
                self.gaps.expect(env["data"]["incarnations"], time.monotonic(), self.wanted)
            elif env["kind"] == STARTED and isinstance(env["data"].get("incarnation"), str):
                self.gaps.started(env["data"]["incarnation"])
            wanted = self.wanted(env["kind"])
            gap = self.gaps.observe(env) if wanted or not self.gaps.by_kind else None
            if wanted:
                return env, gap

    def losses(self) -> list[Gap]:
        """Events a progress event counted that have not arrived in its grace period."""
        return self.gaps.overdue(time.monotonic())

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
