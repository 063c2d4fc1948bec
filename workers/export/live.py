"""The export's live path: events straight from the bus, published before
the journal commits them.

The journal path alone waits for the journal's transaction (up to
``journal.batch_interval``, 0.2 s) and then for the read of the committed
rows. Here the export also subscribes to the proxy's private XPUB, as the
journal does but on an endpoint of its own whose queue is small
(``LIVE_QUEUE``: a stuck export holds little in the supervisor), and
publishes an event the moment it arrives,
but only when it continues what was already handed to the publisher for its
incarnation (its ``seq`` is the next one). So the stream keeps per-incarnation
order, and any gap (the export was away or behind, the bus dropped for this
subscriber, the window is full) leaves everything to the journal path until
its reads reach the head again; then the next event goes live again by
itself. The journal still backs every event: when its row is read, it is not
sent again, and the cursor passes over it once the live publish was
acknowledged. A lost connection forgets all of this: the journal path resends
from the cursor (the duplicate window drops what the stream had).
"""

from __future__ import annotations

import collections
import time
from typing import Any

import zmq

from cnisup.protocol import envelope, subjects
from cnisup.protocol.settings import LIVE_QUEUE
from cnisup.workers.export.cursor import Row
from cnisup.workers.export.engine import LIVE, Item

#: Messages read per wake-up before the loop looks at its deadlines again.
READ_BURST = 2_000
#: Incarnations whose next seq is remembered.
MAX_INCARNATIONS = 10_000
#: Seconds an acknowledged live event waits for its journal row before it is forgotten (the
#: journal lost it, or will store it late: then the journal path sends it again, and the
#: stream's duplicate window drops it).
FORGET_S = 30.0


class Live:
    def __init__(self, endpoint: str, prefix: str, node: str, window: int) -> None:
        sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, LIVE_QUEUE)  # beyond (and the proxy's as much): the journal path
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)
        self.sock = sock
        self.prefix, self.node = prefix, node
        self.window = window  #: live events whose journal rows were not read yet, at most
        #: incarnation -> the seq that would continue what went to the publisher
        self.next_seq: collections.OrderedDict[str, int] = collections.OrderedDict()
        #: published live, journal row not read yet: msg id -> when acknowledged (None: not yet)
        self.sent: collections.OrderedDict[str, float | None] = collections.OrderedDict()
        #: journal rows read while their live publish was unacknowledged
        self.awaited: set[str] = set()
        self.counts = {"live": 0, "live_skipped": 0, "live_bad_messages": 0}

    @property
    def fd(self) -> int:
        fd: int = self.sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        return fd

    def pending(self) -> bool:
        """More is queued than the last ``take`` read: its fd (edge-triggered) will not say so."""
        events: int = self.sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
        return bool(events & zmq.POLLIN)

    def handed(self, row: Row) -> None:
        """``row`` went to the publisher (from either path): its successor may go live."""
        inc = row.incarnation
        self.next_seq[inc] = max(self.next_seq.get(inc, 0), row.seq + 1)
        self.next_seq.move_to_end(inc)
        while len(self.next_seq) > MAX_INCARNATIONS:
            self.next_seq.popitem(last=False)

    def take(self, connected: bool) -> list[Item]:
        """What arrived; the events that may go out now. (Disconnected: nothing.)
        Edge-triggered like every ZeroMQ fd: read until empty or a burst."""
        out: list[Item] = []
        self._forget_old()
        for _ in range(READ_BURST):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                env = envelope.decode(frames)
            except envelope.ProtocolError:
                self.counts["live_bad_messages"] += 1  # the journal reports it; its row (if any) is sent from there
                continue
            inc, seq = env["incarnation"], env["seq"]
            nxt = self.next_seq.get(inc)
            if not connected or len(self.sent) >= self.window or seq != (1 if nxt is None else nxt):
                self.counts["live_skipped"] += 1
                continue
            row = Row(0, env["ts"], env["kind"], inc, seq, frames[1].decode())
            item = Item(LIVE, row, subjects.subject(self.prefix, self.node, row.kind))
            self.sent[item.msg_id] = None
            self.handed(row)
            out.append(item)
        self.counts["live"] += len(out)
        return out

    def read(self, msg_id: str) -> bool | None:
        """The journal row of ``msg_id`` was read: None if it did not go live (send it),
        else whether that publish is already acknowledged (if not: ``acked`` says when)."""
        if msg_id not in self.sent:
            return None
        if self.sent.pop(msg_id) is not None:
            return True
        self.awaited.add(msg_id)
        return False

    def acked(self, msg_id: str) -> bool:
        """A live publish was acknowledged; True if its journal row is waiting for that."""
        if msg_id in self.awaited:
            self.awaited.discard(msg_id)
            return True
        if msg_id in self.sent:
            self.sent[msg_id] = time.monotonic()
        return False

    def _forget_old(self) -> None:
        limit = time.monotonic() - FORGET_S
        while self.sent and (at := next(iter(self.sent.values()))) is not None and at < limit:
            self.sent.popitem(last=False)

    def forget(self) -> None:
        """The connection was lost: everything is resent from the cursor by the journal path."""
        self.next_seq.clear()
        self.sent.clear()
        self.awaited.clear()

    def close(self) -> None:
        self.sock.close(linger=0)
