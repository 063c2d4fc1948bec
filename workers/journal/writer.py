"""Journal family: the one writer of the journal file.

It subscribes to the proxy's private consumer endpoint (every event, as
subscribers see them) and writes them in batched transactions (``store``).
It never slows the bus: its queue is the XPUB's for this one subscriber
(``journal.queue`` events); beyond that the proxy drops, and the journal sees
the holes in each incarnation's ``seq`` and records them as ``journal.loss``
events (published like any event, so subscribers see them too). The
supervisor's own events from before the journal listened are fetched with
the control socket's ``replay``. A full disk: the batch is kept (bounded by
the same queue size), the oldest events are trimmed to make room, the
writes are retried with backoff, and it is reported once.

Ready means listening: ``prepare`` waits until the journal's own
subscription came back up through the proxy, and the supervisor starts the
other families after that.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections import OrderedDict
from typing import Any

import zmq

from cnisup.protocol import control, envelope
from cnisup.protocol.kinds import JournalKind
from cnisup.workers import backoff
from cnisup.workers.base import Worker, WorkerContext
from cnisup.workers.errors import CapabilityMissing
from cnisup.workers.journal.store import DiskFull, Store

#: A topic no event has (kinds never start with NUL): its subscription coming
#: back through the proxy proves this journal is attached.
HANDSHAKE = b"\x00journal-handshake-"
#: Messages read per wake-up before the loop looks at its deadlines again.
READ_BURST = 5000
#: Seconds between retention passes while events arrive.
TRIM_EVERY_S = 30.0
#: Incarnations whose last seq is remembered in memory (the file keeps them all).
MAX_INCARNATIONS = 10_000
#: On stop: the stream counts as drained after this long without a message ...
DRAIN_QUIET_MS = 100
#: ... or after this long in any case.
DRAIN_MAX_S = 1.0
#: Milliseconds a replay request to the supervisor may take.
REPLAY_TIMEOUT_MS = 2000
_DISK_RETRY = backoff.exponential(initial_s=1.0, multiplier=2.0, max_s=30.0, jitter_s=0.2)


class JournalWorker(Worker):
    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        self.j = ctx.config.journal
        self.path, max_bytes = self.where()
        try:
            self.store = Store(self.path, max_bytes=max_bytes, max_age_s=self.j.max_age)
        except sqlite3.Error as exc:  # unwritable, or not a database: the family's fallback takes over
            raise CapabilityMissing(f"cannot open the journal {self.path}: {exc}") from exc
        self.last: OrderedDict[str, int] = OrderedDict(self.store.last_seqs())
        self.pending: list[tuple[dict[str, Any], str]] = []
        self.first_pending = 0.0
        self.retry_at: float | None = None
        self.disk_attempt = 0
        self.next_trim = 0.0
        self.written_since_trim = False
        self.counts = {"written": 0, "duplicates": 0, "holes": 0, "lost": 0, "trimmed": 0, "replayed": 0,
                       "bad_messages": 0}
        self.sub: zmq.Socket[Any] | None = None

    def where(self) -> tuple[str, int]:
        """The file and its size cap."""
        return self.ctx.config.journal_path, self.j.max_bytes

    # -- listening ------------------------------------------------------------------------
    def prepare(self) -> None:
        cfg = self.ctx.config
        sub: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, self.j.queue)
        sub.setsockopt(zmq.LINGER, 0)
        topic = HANDSHAKE + self.ctx.bus.stamp.incarnation.encode()
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.connect(cfg.consumer_endpoint)
        self.ctx.bus.wait_subscription(topic, cfg.workers.ready_timeout)
        self.sub = sub
        self.ctx.log.info("journal %s: %d events; listening", self.path, self.store.count())

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        ctx, sub = self.ctx, self.sub
        assert sub is not None
        fd: int = sub.getsockopt(zmq.FD)  # type: ignore[assignment]
        self.next_trim = time.monotonic()
        ctx.describe(lambda: {"path": self.path, "pending": len(self.pending), "disk_full": self.retry_at is not None,
                              "file_bytes": self.store.file_bytes(), **self.counts})
        try:
            while not ctx.stopping:
                ctx.wait([fd], timeout_s=self._next_deadline() - time.monotonic())
                self._receive()
                now = time.monotonic()
                due = len(self.pending) >= self.j.batch_events or now >= self.first_pending + self.j.batch_interval
                if self.pending and due and (self.retry_at is None or now >= self.retry_at):
                    self._commit()
                if now >= self.next_trim and self.retry_at is None:
                    self._trim()
            self._drain()
            if self.pending:
                self._commit()
        finally:
            sub.close(linger=0)
            self.store.close()

    def _drain(self) -> None:
        """On stop (we are stopped last): take what is still on its way, until
        the stream has been quiet for DRAIN_QUIET_MS, DRAIN_MAX_S at most."""
        assert self.sub is not None
        deadline = time.monotonic() + DRAIN_MAX_S
        while time.monotonic() < deadline:
            self._receive()
            if not self.sub.poll(DRAIN_QUIET_MS):
                return

    def _next_deadline(self) -> float:
        times = [self.next_trim]
        if self.pending:
            times.append(self.retry_at if self.retry_at is not None else self.first_pending + self.j.batch_interval)
        return min(times)

    def _receive(self) -> None:
        """Read what is queued (a burst at most), noting holes per incarnation."""
        sub = self.sub
        assert sub is not None
        for _ in range(READ_BURST):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                env = envelope.decode(frames)
            except envelope.ProtocolError as exc:
                self.counts["bad_messages"] += 1
                self.ctx.log.warning("not an event: %s", exc)
                continue
            self._take(env, frames[1].decode())

    def _take(self, env: dict[str, Any], text: str) -> None:
        inc, seq = env["incarnation"], env["seq"]
        last = self.last.get(inc)
        if last is None and seq > 1:
            self._hole(env, 1, seq - 1, "before the journal listened")
        elif last is not None and seq > last + 1:
            self._hole(env, last + 1, seq - 1, "lost on the way to the journal")
        self.last[inc] = seq if last is None else max(last, seq)
        self.last.move_to_end(inc)
        while len(self.last) > MAX_INCARNATIONS:
            self.last.popitem(last=False)
        self._queue(env, text)

    def _queue(self, env: dict[str, Any], text: str) -> None:
        if not self.pending:
            self.first_pending = time.monotonic()
        self.pending.append((env, text))
        if len(self.pending) > self.j.queue:  # only while the disk is full: the oldest go
            dropped, self.pending = self.pending[:-self.j.queue], self.pending[-self.j.queue:]
            self._lost_while_full(dropped)

    # -- holes -------------------------------------------------------------------------------
    def _hole(self, env: dict[str, Any], first: int, last: int, why: str) -> None:
        if env["source"] == "supervisor":
            first = self._replay(env["incarnation"], first, last)
            if first > last:
                return
        self.counts["holes"] += 1
        self._loss(env["source"], env["incarnation"], first, last, why)

    def _replay(self, incarnation: str, first: int, last: int) -> int:
        """Ask the supervisor for its own events ``first..last``; the first seq still missing."""
        while first <= last:
            upto = min(last, first + 999)
            try:
                reply = control.request(self.ctx.config.control.endpoint, "replay", timeout_ms=REPLAY_TIMEOUT_MS,
                                        incarnation=incarnation, from_seq=first, to_seq=upto)
            except (TimeoutError, ConnectionError, zmq.ZMQError, ValueError) as exc:
                self.ctx.log.warning("replay of supervisor events %d..%d failed: %s", first, upto, exc)
                return first
            texts = reply.get("envelopes") if reply.get("ok") else None
            if not isinstance(texts, list):
                return first
            got = sorted((e["seq"], e, t) for t in texts if isinstance(t, str)
                         and (e := self._parse(t)) is not None and e["incarnation"] == incarnation)
            seqs = [s for s, _, _ in got]
            if seqs != list(range(first, first + len(seqs))):  # only a contiguous start fills the hole
                return first
            for _, e, t in got:
                self._queue(e, t)
            self.counts["replayed"] += len(got)
            first += len(got)
            if first <= upto:
                return first
        return first

    def _parse(self, text: str) -> dict[str, Any] | None:
        try:
            return envelope.decode_payload(text)
        except envelope.ProtocolError:
            return None

    def _loss(self, source: str, incarnation: str, first: int, last: int, why: str) -> None:
        lost = last - first + 1
        self.counts["lost"] += lost
        self.ctx.log.warning("%d event(s) of %s %s lost: %s", lost, source, incarnation, why)
        self.ctx.publish(JournalKind.LOSS, {"source": source, "incarnation": incarnation, "from_seq": first,
                                            "to_seq": last, "lost": lost, "reason": why})

    def _lost_while_full(self, dropped: list[tuple[dict[str, Any], str]]) -> None:
        ranges: dict[str, tuple[str, int, int]] = {}
        for env, _ in dropped:
            src, lo, hi = ranges.get(env["incarnation"], (env["source"], env["seq"], env["seq"]))
            ranges[env["incarnation"]] = (src, min(lo, env["seq"]), max(hi, env["seq"]))
        for inc, (src, lo, hi) in ranges.items():
            self._loss(src, inc, lo, hi, "the disk was full")

    # -- writing -----------------------------------------------------------------------------
    def _commit(self) -> None:
        batch, self.pending = self.pending, []
        try:
            added = self.store.write(batch)
        except DiskFull as exc:
            self.pending = batch + self.pending
            self._disk_full(str(exc))
            return
        self.counts["written"] += added
        if added and not self.written_since_trim:
            self.written_since_trim = True
            self.next_trim = min(self.next_trim, time.monotonic() + TRIM_EVERY_S)
        self.counts["duplicates"] += len(batch) - added
        if self.retry_at is not None:
            self.retry_at, self.disk_attempt = None, 0
            self.ctx.warn("journal_disk_recovered", f"{self.path}: writing again", path=self.path)

    def _disk_full(self, message: str) -> None:
        if self.disk_attempt == 0:
            self.ctx.warn("journal_disk_full", f"{self.path}: {message}; holding up to {self.j.queue} events "
                                               "and retrying", path=self.path)
            # Make room inside the file: freed pages are reused without the file growing.
            used = self.store.used_bytes()
            try:
                self.counts["trimmed"] += self.store.trim(target_bytes=int(used * 0.9)).total
            except sqlite3.Error as exc:
                self.ctx.log.warning("trim on a full disk failed: %s", exc)
        self.disk_attempt += 1
        self.retry_at = time.monotonic() + backoff.delay_s(_DISK_RETRY, self.disk_attempt)

    def _trim(self) -> None:
        now = time.monotonic()
        try:
            trimmed = self.store.trim()
            oldest = self.store.oldest_ts()
        except sqlite3.Error as exc:
            self.ctx.log.warning("retention failed: %s", exc)
            self.next_trim = now + TRIM_EVERY_S
            return
        # While events arrive, every TRIM_EVERY_S; idle, only when the oldest
        # event ages out (an idle journal does not wake up for nothing).
        ages_out = math.inf if oldest is None else now + (oldest / 1e9 + self.j.max_age - time.time())
        self.next_trim = max(now + TRIM_EVERY_S, ages_out) if not self.written_since_trim else now + TRIM_EVERY_S
        self.written_since_trim = False
        self.counts["trimmed"] += trimmed.total
        if trimmed.total:
            self.ctx.log.info("retention: deleted %d events older than %g s and %d over %d bytes",
                              trimmed.by_age, self.j.max_age, trimmed.by_size, self.store.max_bytes)


class RuntimeJournalWorker(JournalWorker):
    """The fallback: a smaller journal in the runtime dir (memory on most
    hosts, gone at reboot) when journal.path cannot be used."""

    def where(self) -> tuple[str, int]:
        return self.ctx.config.journal_fallback_path, self.j.fallback_max_bytes
