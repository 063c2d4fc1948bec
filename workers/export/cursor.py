"""The export's side of one journal file: the events after its cursor, and the
cursor itself, persisted beside the journal.

The cursor is the journal's ``events.id`` of the last event the stream
acknowledged, with that event's incarnation and seq (so a journal file that
was replaced, whose ids start again, is noticed). It lives in a small SQLite
file of its own next to the journal (``<journal>.export``), written in WAL
mode: a commit survives a SIGKILL at any moment. The journal itself is only
ever opened read-only.

Journal ids are dense (one writer, rows inserted in order, retention deletes
the lowest), so a jump in the ids read is exactly what was trimmed before it
was sent.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass

#: Bytes of the journal the reader maps (address space, not memory: pages come from the page cache).
MMAP_BYTES = 256 << 20

CREATE = """
CREATE TABLE IF NOT EXISTS cursor (
    stream TEXT PRIMARY KEY,     -- where the events went: another stream starts from the beginning
    last_id INTEGER NOT NULL,    -- events.id of the last acknowledged event
    incarnation TEXT,            -- and its identity, NULL when it was never read (a jump over a trim)
    seq INTEGER,
    trimmed INTEGER NOT NULL DEFAULT 0,  -- events trimmed before they were sent, ever
    trimmed_to INTEGER NOT NULL DEFAULT 0,  -- the last id of those reported (never reported twice)
    updated_ns INTEGER NOT NULL
);
"""


def cursor_path(journal_path: str) -> str:
    return journal_path + ".export"


@dataclass
class Position:
    last_id: int
    incarnation: str | None = None
    seq: int | None = None


@dataclass(frozen=True)
class Row:
    id: int
    ts: int
    kind: str
    incarnation: str
    seq: int
    text: str
    epoch: int = 0  #: the source's numbering it was read under (a replaced journal starts a new one)


@dataclass(frozen=True)
class Trimmed:
    """Events the journal deleted before they were sent: ids ``from_id..to_id``."""

    from_id: int
    to_id: int

    @property
    def count(self) -> int:
        return self.to_id - self.from_id + 1


class CursorFile:
    def __init__(self, path: str) -> None:
        self.path = path
        old_umask = os.umask(0o027)  # like the journal: the cnisup group may read it, nobody else
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        finally:
            os.umask(old_umask)
        self.db.execute("PRAGMA busy_timeout = 2000")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.executescript(CREATE)

    def load(self, stream: str) -> tuple[Position | None, int, int]:
        """The position, the trimmed count and the last trimmed id reported."""
        row = self.db.execute("SELECT last_id, incarnation, seq, trimmed, trimmed_to FROM cursor WHERE stream = ?",
                              (stream,)).fetchone()
        if row is None:
            return None, 0, 0
        return Position(row[0], row[1], row[2]), int(row[3]), int(row[4])

    def save(self, stream: str, pos: Position, trimmed: int, trimmed_to: int) -> None:
        self.db.execute("INSERT INTO cursor VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (stream) DO UPDATE SET "
                        "last_id = excluded.last_id, incarnation = excluded.incarnation, seq = excluded.seq, "
                        "trimmed = excluded.trimmed, trimmed_to = excluded.trimmed_to, "
                        "updated_ns = excluded.updated_ns",
                        (stream, pos.last_id, pos.incarnation, pos.seq, trimmed, trimmed_to, time.time_ns()))

    def close(self) -> None:
        self.db.close()


class Source:
    """One journal file, read from the cursor. ``pos`` is what the stream
    acknowledged; ``read_to`` how far rows were handed out (it runs ahead by
    the events in flight and goes back to ``pos`` on ``rewind``)."""

    def __init__(self, journal_path: str, stream: str) -> None:
        self.path = journal_path
        self.stream = stream
        self.db: sqlite3.Connection | None = None
        self.inode: tuple[int, int] | None = None
        self.cursor: CursorFile | None = None
        self.pos: Position | None = None
        self.saved: tuple[Position, int] | None = None
        self.trimmed_total = 0
        self.trimmed_to = 0
        self.read_to = 0
        self.epoch = 0

    # -- the files ---------------------------------------------------------------------------
    def open(self) -> bool:
        """Open (or reopen, when the journal file was replaced) the journal and
        the cursor; False while the journal does not exist."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._close_journal()
            return False
        inode = (st.st_dev, st.st_ino)
        if self.db is not None and inode == self.inode:
            return True
        self._close_journal()
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            db.execute("PRAGMA query_only = 1")
            # Read through a memory map rather than a pread() per page: a catch-up reads the
            # whole backlog once, at 10,000 events/s.
            db.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
            db.execute("SELECT 1 FROM events LIMIT 1")
        except sqlite3.Error:  # not created yet by its writer, or not a journal
            return False
        self.db, self.inode = db, inode
        if self.cursor is None:
            self.cursor = CursorFile(cursor_path(self.path))
            self.pos, self.trimmed_total, self.trimmed_to = self.cursor.load(self.stream)
            if self.pos is not None:
                self.saved = (Position(**vars(self.pos)), self.trimmed_total)
                self.read_to = self.pos.last_id
        return True

    def _close_journal(self) -> None:
        if self.db is not None:
            self.db.close()
        self.db = self.inode = None

    def close(self) -> None:
        self._close_journal()
        if self.cursor is not None:
            self.cursor.close()
            self.cursor = None

    def _bounds(self) -> tuple[int | None, int | None]:
        assert self.db is not None
        # Two subqueries: SQLite answers a lone min() or max() from the b-tree's ends, but
        # "SELECT min(id), max(id)" scans the whole table (half the export's CPU in a catch-up).
        lo, hi = self.db.execute("SELECT (SELECT min(id) FROM events), (SELECT max(id) FROM events)").fetchone()
        return lo, hi

    # -- where we stand ------------------------------------------------------------------------
    def check(self) -> str | None:
        """Line the cursor up with the journal before reading; why it was reset, if it was."""
        assert self.db is not None
        lo, hi = self._bounds()
        if lo is None or hi is None:
            return None
        pos = self.pos
        if pos is None:  # the first run here: everything the journal holds goes out
            self._jump(lo - 1)
            return None
        if pos.last_id < lo:
            return None  # trimmed past the cursor: ``rows`` finds the gap and reports it
        row = self.db.execute("SELECT incarnation, seq FROM events WHERE id = ?", (pos.last_id,)).fetchone()
        if row is not None and (pos.incarnation is None or (row[0], row[1]) == (pos.incarnation, pos.seq)):
            return None
        self._jump(lo - 1)  # a new journal file: send all of it; what was sent before is a duplicate
        self.trimmed_to = 0
        return (f"{self.path} no longer holds event {pos.last_id} as it was sent (ids now {lo}..{hi}): the journal "
                "was replaced; sending it from its first event")

    def _jump(self, last_id: int) -> None:
        self.pos = Position(last_id)
        self.read_to = last_id
        self.epoch += 1

    def rows(self, limit: int) -> tuple[list[Row], Trimmed | None]:
        """The next rows after ``read_to``, in id order, and the events the
        journal deleted before they were read (each reported once)."""
        assert self.db is not None and self.pos is not None
        got = [Row(r[0], r[1], r[2], r[3], r[4], r[5], self.epoch) for r in self.db.execute(
            "SELECT id, ts, kind, incarnation, seq, envelope FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (self.read_to, limit))]
        trimmed = None
        if got and got[0].id > self.read_to + 1:
            first = max(self.read_to, self.trimmed_to) + 1
            if first < got[0].id:
                trimmed = Trimmed(first, got[0].id - 1)
                self.trimmed_total += trimmed.count
                self.trimmed_to = trimmed.to_id
        return got, trimmed

    def take(self, row: Row) -> None:
        """``row`` is on its way: later reads continue after it."""
        self.read_to = row.id

    def acked(self, row: Row) -> None:
        if row.epoch == self.epoch:  # not an ack of the journal this source has replaced
            self.pos = Position(row.id, row.incarnation, row.seq)

    def rewind(self) -> None:
        """What was in flight is unknown: read again from the acknowledged position."""
        if self.pos is not None:
            self.read_to = self.pos.last_id

    def lag(self, now_ns: int) -> tuple[int, float | None]:
        """Events not yet acknowledged, and the age of the oldest, seconds."""
        if self.db is None or self.pos is None:
            return 0, None
        try:
            hi = self._bounds()[1]
            first = self.db.execute("SELECT ts FROM events WHERE id > ? ORDER BY id LIMIT 1",
                                    (self.pos.last_id,)).fetchone()
        except sqlite3.Error:
            return 0, None
        if hi is None or first is None:
            return 0, None
        return max(0, hi - self.pos.last_id), max(0.0, (now_ns - first[0]) / 1e9)

    def commit(self) -> None:
        """Persist the cursor if it moved."""
        if self.cursor is None or self.pos is None or (self.pos, self.trimmed_total) == self.saved:
            return
        self.cursor.save(self.stream, self.pos, self.trimmed_total, self.trimmed_to)
        self.saved = (Position(**vars(self.pos)), self.trimmed_total)
