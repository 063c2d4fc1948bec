"""Export family, its one worker: the journal, from a persisted cursor, into
NATS JetStream.

Each stored envelope goes out unchanged to ``<subject_prefix>.<node>.<kind>``
with ``Nats-Msg-Id`` = its ``id``, at most ``max_in_flight`` unacknowledged,
in journal order; the cursor advances only over what the stream
acknowledged, so a restart, a SIGKILL or a lost connection resends from the
cursor and the stream's duplicate window drops what it already had. Events
the journal trimmed before they were sent are counted exactly and reported
(``export.trimmed``, ``status``), never skipped silently.

The main loop (this module) owns the journal sources and the cursors and
keeps the worker contract: it blocks only in ``ctx.wait``, on the
publisher's wake-up pipe and an inotify watch of the journal's directory (a
commit writes its WAL file), so an idle export costs nothing and a new
event goes out as soon as the journal commits it. The publisher
(``engine``) runs nats-py in a thread of its own. When NATS is away it keeps
retrying with backoff and ``status`` shows the lag; there is no fallback.
"""

from __future__ import annotations

import collections
import heapq
import os
import select
import time
from typing import Any

from inotify_simple import INotify
from inotify_simple import flags as inflags

from cnisup.protocol import subjects
from cnisup.protocol.kinds import ExportKind
from cnisup.workers.base import Worker, WorkerContext
from cnisup.workers.errors import WorkerConfigError
from cnisup.workers.export.cursor import Row, Source, Trimmed
from cnisup.workers.export.engine import LIVE, STOP_DRAIN_S, Item, Publisher
from cnisup.workers.export.live import Live

#: Seconds between looks at the journal when nothing woke us (a missed inotify event, a
#: journal directory that appeared later): the safety net, not the mechanism.
SAFETY_POLL_S = 30.0
#: Seconds between those looks while a journal's directory cannot be watched.
UNWATCHED_POLL_S = 1.0
#: Seconds between the first write of a journal commit seen and the read: its other writes land meanwhile.
SETTLE_S = 0.002
#: Refill the window once this fraction of it is free: fewer, larger journal reads.
REFILL_FRACTION = 0.25


class JournalWatch:
    """Wakes the loop when a journal file (or its WAL) is written or created."""

    def __init__(self, paths: list[str]) -> None:
        self.inotify = INotify()
        self.names = {os.path.basename(p) + suffix for p in paths for suffix in ("", "-wal")}
        self.dirs = sorted({os.path.dirname(p) for p in paths})
        self.watched: set[str] = set()
        self.add()

    @property
    def fd(self) -> int:
        return int(self.inotify.fileno())

    @property
    def complete(self) -> bool:
        return len(self.watched) == len(self.dirs)

    def add(self) -> None:
        for d in self.dirs:
            if d not in self.watched:
                try:
                    self.inotify.add_watch(d, inflags.MODIFY | inflags.CREATE | inflags.MOVED_TO)
                except OSError:
                    continue  # not there yet: polled until it is
                self.watched.add(d)

    def changed(self) -> bool:
        """Drain the events; True if one was about a journal file."""
        return any(ev.name in self.names for ev in self.inotify.read(timeout=0))

    def close(self) -> None:
        self.inotify.close()


class NatsExportWorker(Worker):
    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        self.n = cfg.export.nats
        self.node = cfg.node_name
        paths = [cfg.journal_path, cfg.journal_fallback_path]
        self.sources = [Source(p, self.n.stream) for p in paths]
        self.watch = JournalWatch(paths)
        self.publisher = Publisher(self.n, self.node, name=f"cnisup-export {self.node}")
        self.live = Live(cfg.live_endpoint, self.n.subject_prefix, self.node, self.n.max_in_flight) \
            if self.n.live else None
        #: journal rows handed out (sent, or sent live before they were read), in journal order
        self.inflight: collections.deque[Item] = collections.deque()
        self.done: set[str] = set()  #: ids of ``inflight`` acknowledged, not yet passed by the cursor
        self.gen: int | None = None  #: the publisher's episode we send in; None: not connected
        self.more = True  #: the journals may hold more than the last read took
        self.read_at: float | None = None  #: a commit was seen: read the journals at this time
        self.poll_at = 0.0  #: the safety poll is due
        self.stopped = False
        self.next_commit = 0.0
        self.counts = {"published": 0, "acked": 0, "duplicates": 0, "journal_resets": 0}
        self._live_pending = False  #: the live subscription may hold more than the last read took
        self._live_items: list[Item] = []  #: live events held for live_linger
        self._live_at = 0.0  #: when they go to the publisher

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        ctx = self.ctx
        ctx.describe(self.info)
        ctx.log.info("exporting %s to stream %s on %s as %s", ", ".join(s.path for s in self.sources), self.n.stream,
                     ", ".join(self.n.servers), subjects.node_filter(self.n.subject_prefix, self.node))
        self.publisher.start()
        try:
            fds = [self.publisher.out.fd, self.watch.fd]
            live_fds = fds + ([self.live.fd] if self.live else [])
            while not ctx.stopping:
                # While live events linger, more of them need not wake us: they are read at its end.
                ready = ctx.wait(fds if self._live_items else live_fds, timeout_s=self._timeout())
                now = time.monotonic()
                if self.watch.fd in ready and self.watch.changed() and self.read_at is None:
                    # A commit writes the WAL in many writes, each an inotify event: read once it settled.
                    self.read_at = now + SETTLE_S
                news = self._messages()
                self._live()
                due = self.read_at is not None and now >= self.read_at
                poll = now >= self.poll_at
                if due or poll:
                    self.more, self.read_at = True, None
                    self.poll_at = now + (SAFETY_POLL_S if self.watch.complete else UNWATCHED_POLL_S)
                # Acks alone bring nothing new to read unless the last read stopped at a full window.
                if self.more and (due or poll or news):
                    self._send(force=due or poll)
                self._commit()
            self._finish()
        finally:
            self.publisher.stop()
            self.publisher.join(1.0)
            for src in self.sources:
                src.commit()
                src.close()
            self.watch.close()
            if self.live:
                self.live.close()

    def _timeout(self) -> float:
        if self._live_pending:
            return 0.0
        if not self.watch.complete:
            self.watch.add()
        times = [self.poll_at] + ([self.read_at] if self.read_at is not None else [])
        if self._live_items:
            times.append(self._live_at)
        if self.next_commit and any(s.pos is not None and (s.pos, s.trimmed_total) != s.saved for s in self.sources):
            times.append(self.next_commit)
        return max(0.0, min(times) - time.monotonic())

    def _finish(self) -> None:
        """Stopping: let the publisher wait for what is in flight, keep its acks."""
        self.publisher.stop()
        deadline = time.monotonic() + STOP_DRAIN_S + 1.0
        while not self.stopped and (left := deadline - time.monotonic()) > 0:
            # Not ctx.wait: the stop is already asked (it would return at once); this wait is bounded.
            select.select([self.publisher.out.fd], [], [], min(left, self.ctx.config.workers.heartbeat_interval / 2))
            self.ctx.heartbeat()
            self._messages()

    # -- the publisher's news ------------------------------------------------------------------
    def _messages(self) -> bool:
        """Take what the publisher said; True when the window has room again (acks, a new episode)."""
        news = False
        for msg in self.publisher.out.take():
            what = msg[0]
            if what == "ready":
                self.gen, news, self.more = msg[1], True, True
            elif what == "down":
                self._rewind()
            elif what == "acked" and msg[1] == self.gen:
                news = True
                for item, duplicate in msg[2]:
                    self.counts["acked"] += 1
                    self.counts["duplicates"] += duplicate
                    if item.source != LIVE:
                        self.done.add(item.msg_id)
                    elif self.live is not None and self.live.acked(item.msg_id):
                        self.done.add(item.msg_id)  # its journal row was read meanwhile
                self._advance()
            elif what == "fatal":
                raise WorkerConfigError(msg[1], msg[2])
            elif what == "stopped":
                self.stopped = True
                if not self.ctx.stopping:
                    raise RuntimeError("the NATS publisher ended unasked")
            elif what == "crashed":
                raise RuntimeError(f"the NATS publisher crashed: {msg[1]}")
        return news

    def _advance(self) -> None:
        """Move the cursors over the acknowledged head of what was handed out, in journal order."""
        while self.inflight and self.inflight[0].msg_id in self.done:
            item = self.inflight.popleft()
            self.done.discard(item.msg_id)
            self.sources[item.source].acked(item.row)

    def _live(self) -> None:
        """Publish what arrived on the bus and continues what the publisher has (``live``)."""
        if self.live is None:
            return
        items = self.live.take(self.gen is not None)
        self._live_pending = self.live.pending()
        if items and not self._live_items:
            # Held, so that a busy bus goes to the publisher in bunches (export.nats.live_linger).
            self._live_at = time.monotonic() + self.n.live_linger
        self._live_items += items
        if self._live_items and (time.monotonic() >= self._live_at or len(self._live_items) >= self.n.batch):
            self._flush_live()

    def _flush_live(self) -> None:
        """Hand the lingering live events to the publisher. Before anything the journal path
        sends: they were counted as handed over (``Live.handed``), so what follows them in
        their incarnation must not overtake them."""
        items, self._live_items = self._live_items, []
        if items and self.gen is not None:
            self.counts["published"] += len(items)
            self.publisher.submit(self.gen, items)

    def _rewind(self) -> None:
        self.gen = None
        self.inflight.clear()
        self.done.clear()
        self._live_items = []
        if self.live is not None:
            self.live.forget()
        for src in self.sources:
            src.rewind()

    # -- the journal ------------------------------------------------------------------------------
    def _send(self, *, force: bool) -> None:
        """Top up the window from the journals, oldest event first."""
        room = self.n.max_in_flight - len(self.inflight)
        if self.gen is None or room <= 0 or (not force and self.inflight
                                             and room < self.n.max_in_flight * REFILL_FRACTION):
            return
        heads: list[list[tuple[int, int, Row]]] = []
        for i, src in enumerate(self.sources):
            if not src.open():
                continue
            if (reason := src.check()) is not None:
                self.counts["journal_resets"] += 1
                self.ctx.warn("export_journal_replaced", reason, path=src.path)
            if src.pos is None:  # a journal that has never held an event: where it starts is not known yet
                continue
            rows, trimmed = src.rows(min(room, self.n.batch))
            if trimmed is not None:
                self._trimmed(src, trimmed)
            heads.append([(r.ts, i, r) for r in rows])
        items: list[Item] = []
        send: list[Item] = []
        for _, i, row in heapq.merge(*heads):  # the primary and the runtime-dir journal, by time
            if len(items) == room:
                break
            self.sources[i].take(row)
            item = Item(i, row, subjects.subject(self.n.subject_prefix, self.node, row.kind))
            items.append(item)
            went_live = None if self.live is None else self.live.read(item.msg_id)
            if went_live is None:
                send.append(item)
                if self.live is not None:
                    self.live.handed(row)
            elif went_live:
                self.done.add(item.msg_id)
        self.more = len(items) == room or any(len(h) == min(room, self.n.batch) for h in heads)
        if items:
            self.inflight.extend(items)
            self._advance()
            if not self.next_commit:
                self.next_commit = time.monotonic() + self.n.commit_interval
        if send:
            self._flush_live()
            self.counts["published"] += len(send)
            self.publisher.submit(self.gen, send)

    def _trimmed(self, src: Source, t: Trimmed) -> None:
        message = (f"{t.count} event(s) (journal ids {t.from_id}..{t.to_id} of {src.path}) were deleted by the "
                   f"journal's retention before they were exported; they never reach stream {self.n.stream}")
        self.ctx.log.warning("%s", message)
        self.ctx.publish(ExportKind.TRIMMED, {"count": t.count, "from_id": t.from_id, "to_id": t.to_id,
                                              "journal": src.path, "stream": self.n.stream})
        src.commit()  # reported once, even if we are killed next

    def _commit(self) -> None:
        if self.next_commit and time.monotonic() >= self.next_commit:
            for src in self.sources:
                src.commit()
            self.next_commit = 0.0
            if any(s.pos is not None and (s.pos, s.trimmed_total) != s.saved for s in self.sources):
                self.next_commit = time.monotonic() + self.n.commit_interval

    # -- status ---------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        for src in self.sources:  # the lag is known before the first connection, too
            if src.open() and src.pos is None:
                src.check()
        now = time.time_ns()
        behind, oldest = 0, None
        for src in self.sources:
            n, age = src.lag(now)
            behind += n
            if age is not None:
                oldest = age if oldest is None else max(oldest, age)
        p = self.publisher
        state = p.state
        summary = (f"{state}{' to ' + p.server if p.server and state == 'connected' else ''}, stream "
                   f"{self.n.stream}: {behind} behind"
                   + (f" (oldest {oldest:.1f}s)" if oldest is not None else "")
                   + f", {self.counts['duplicates']} duplicates dropped, {sum(s.trimmed_total for s in self.sources)}"
                     " trimmed unsent" + (f"; last error: {p.last_error}" if p.last_error and state != "connected"
                                          else ""))
        return {"summary": summary, "state": state, "server": p.server, "stream": self.n.stream,
                "subjects": subjects.node_filter(self.n.subject_prefix, self.node),
                "behind": behind, "oldest_unsent_age_s": None if oldest is None else round(oldest, 3),
                "in_flight": len(self.inflight), **self.counts, **(self.live.counts if self.live else {}),
                "trimmed_total": sum(s.trimmed_total for s in self.sources), **p.counts,
                "last_error": p.last_error,
                "cursors": {s.path: s.pos.last_id for s in self.sources if s.pos is not None}}
