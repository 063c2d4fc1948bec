"""The journal file, from its one writer's side: batched transactions in WAL
mode, retention by size and age in small steps, and a full disk survived.

Crash safety is SQLite's: with ``journal_mode=WAL`` and ``synchronous=NORMAL``
a committed transaction survives the process being killed at any moment (a
power loss may take the last few), and the file is never corrupt; what a
SIGKILL loses is the batch not yet committed (``journal.batch_events`` /
``journal.batch_interval``).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cnisup.workers.journal import schema

#: Rows deleted per retention statement: short transactions, the writer never stalls long.
TRIM_STEP = 2000
#: Retention deletes down to this fraction of max_bytes, so it does not run at every commit.
TRIM_TO = 0.9
#: SQLite pages released to the file system per incremental_vacuum step.
VACUUM_PAGES = 2048


class DiskFull(Exception):
    """The file system is full (or the file cannot grow): nothing of the batch was written."""


@dataclass
class Trimmed:
    by_age: int = 0
    by_size: int = 0

    @property
    def total(self) -> int:
        return self.by_age + self.by_size


def _is_full(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "full" in text or getattr(exc, "sqlite_errorcode", None) == 13  # SQLITE_FULL


class Store:
    def __init__(self, path: str, *, max_bytes: int, max_age_s: float) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        # The file holds events any member of the cnisup group may read, nobody else.
        old_umask = os.umask(0o027)
        try:
            # isolation_level=None: transactions are ours (BEGIN ... COMMIT), not the module's guesses.
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        finally:
            os.umask(old_umask)
        self.db.execute("PRAGMA busy_timeout = 5000")
        self.db.executescript(schema.CREATE)  # first: auto_vacuum only takes on an empty file
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        # The WAL is truncated back to this after a checkpoint: the file's size stays bounded.
        self.db.execute(f"PRAGMA journal_size_limit = {min(max_bytes // 4, 64 << 20)}")
        self.page_size = int(self.db.execute("PRAGMA page_size").fetchone()[0])

    def close(self) -> None:
        self.db.close()

    # -- writing ---------------------------------------------------------------------------------
    def last_seqs(self) -> dict[str, int]:
        """The last seq recorded per incarnation (for hole detection across restarts)."""
        return dict(self.db.execute("SELECT incarnation, last_seq FROM incarnations").fetchall())

    def write(self, batch: Iterable[tuple[dict[str, Any], str]]) -> int:
        """One transaction: each (envelope, payload text). Returns the rows
        added (a duplicate incarnation+seq is ignored). ``DiskFull`` leaves
        nothing written."""
        rows: list[dict[str, Any]] = []
        ips: list[tuple[str, int, str]] = []
        last: dict[str, tuple[str, int, int]] = {}
        for env, text in batch:
            values, found = schema.row(env, text)
            rows.append(values)
            inc, seq = env["incarnation"], env["seq"]
            ips += [(inc, seq, ip) for ip in found]
            if seq > last.get(inc, ("", 0, 0))[1]:
                last[inc] = (env["source"], seq, env["ts"])
        try:
            self.db.execute("BEGIN IMMEDIATE")
            before = self.db.total_changes
            self.db.executemany(schema.INSERT_EVENT, rows)
            added = self.db.total_changes - before
            if ips:  # rare (plugin results, addresses, pod IPs): found by the unique (incarnation, seq)
                self.db.executemany(schema.INSERT_IP, ips)
            self.db.executemany(schema.UPSERT_INCARNATION, [(i, *v) for i, v in last.items()])
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if _is_full(exc):
                raise DiskFull(str(exc)) from exc
            raise
        return added

    # -- retention -------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages - free) * self.page_size

    def _delete_oldest(self, where: str, params: tuple[Any, ...], limit: int = TRIM_STEP) -> int:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            ids = [r[0] for r in self.db.execute(
                f"SELECT id FROM events WHERE {where} ORDER BY id LIMIT {limit}", params)]
            if ids:
                marks = ",".join("?" * len(ids))
                self.db.execute(f"DELETE FROM event_ips WHERE event IN ({marks})", ids)
                self.db.execute(f"DELETE FROM events WHERE id IN ({marks})", ids)
            self.db.execute("DELETE FROM incarnations WHERE last_ts < ?",
                            (time.time_ns() - int(self.max_age_s * 1e9),))
            self.db.execute("COMMIT")
        except sqlite3.Error:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        return len(ids)

    def trim(self, *, now_ns: int | None = None, target_bytes: int | None = None) -> Trimmed:
        """Delete what is older than max_age, then the oldest until the file
        uses at most TRIM_TO of max_bytes (or ``target_bytes``); give the
        freed pages back to the file system. Small steps, one short
        transaction each."""
        out = Trimmed()
        cutoff = (now_ns or time.time_ns()) - int(self.max_age_s * 1e9)
        while n := self._delete_oldest("ts < ?", (cutoff,)):
            out.by_age += n
        limit = self.max_bytes if target_bytes is None else target_bytes
        if self.used_bytes() > limit:
            goal = limit * TRIM_TO
            while (used := self.used_bytes()) > goal:
                # Two subqueries, each answered from an end of the b-tree (min and max in one
                # SELECT scan the whole table).
                span = self.db.execute("SELECT (SELECT max(id) FROM events) - (SELECT min(id) FROM events) + 1"
                                       ).fetchone()[0] or 1
                per_row = used / span  # ids are dense but for trims: cheap and close enough
                n = self._delete_oldest("1", (), min(TRIM_STEP, max(1, int((used - goal) / per_row) + 1)))
                if not n:
                    break
                out.by_size += n
        while self.db.execute("PRAGMA freelist_count").fetchone()[0] > (0 if out.total else VACUUM_PAGES):
            self.db.execute(f"PRAGMA incremental_vacuum({VACUUM_PAGES})")
        return out

    def file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(self.path + suffix).st_size
            except OSError:
                pass
        return total

    def oldest_ts(self) -> int | None:
        value = self.db.execute("SELECT min(ts) FROM events").fetchone()[0]
        return None if value is None else int(value)

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM events").fetchone()[0])
