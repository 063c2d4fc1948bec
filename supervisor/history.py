"""Reading the journal: ``cnisup history``, ``explain`` and ``tail --since``.

Readers open the file read-only and never block the writer (WAL); they work
while cnisup is stopped or crashed, which is when people look. The primary
journal and the runtime-dir fallback are read together, merged by time.
"""

from __future__ import annotations

import datetime
import heapq
import os
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cnisup.protocol import kinds
from cnisup.protocol.settings import Config
from cnisup.workers.journal import schema
from cnisup.workers.journal.schema import normal_ip

_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?$")
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class JournalError(Exception):
    """The journal cannot be read (missing, unreadable, another layout)."""


def parse_time(text: str, *, now: float | None = None) -> int:
    """RFC 3339 (``2026-12-01T03:12:00Z``), a clock time today in local time
    (``03:12``, ``03:12:05``) or a relative time (``-10m``, ``2h``: ago) ->
    ns since the epoch. ValueError with the accepted forms otherwise."""
    now = time.time() if now is None else now
    t = text.strip()
    if m := _RELATIVE.match(t):
        return int((now - float(m.group(1)) * _UNITS[m.group(2)]) * 1e9)
    if m := _CLOCK.match(t):
        hour, minute, sec = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        frac = int((m.group(4) or "0").ljust(9, "0"))
        today = datetime.datetime.fromtimestamp(now).astimezone()
        try:
            at = today.replace(hour=hour, minute=minute, second=sec, microsecond=0)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        return int(at.timestamp()) * 1_000_000_000 + frac
    try:
        dt = datetime.datetime.fromisoformat(t.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use RFC 3339 (2026-12-01T03:12:00Z), a clock time today "
                         "(03:12) or a relative time (-10m, 2h)") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local time, as a clock time is
    return int(dt.timestamp() * 1e9)


def rfc3339(ts_ns: int) -> str:
    """``2026-12-01T03:12:04.123456+00:00``: always with the zone (local)."""
    dt = datetime.datetime.fromtimestamp(ts_ns / 1e9).astimezone()
    return dt.isoformat(timespec="microseconds")


@dataclass
class Filters:
    since_ns: int | None = None
    until_ns: int | None = None
    kinds: Sequence[str] = ()  #: prefixes of whole tokens (``cni.plugin``, ``k8s.pod.``): :func:`kinds.matches`
    pod: tuple[str, str] | None = None  #: (namespace, name)
    namespace: str | None = None
    container: str | None = None  #: a container id or a prefix of one
    ip: str | None = None
    path: str | None = None
    failed: bool = False
    limit: int | None = None  #: the newest N


@dataclass(order=True)
class Stored:
    """One event as stored: its envelope text exactly as published."""

    ts: int
    id: int
    text: str = field(compare=False)
    source_file: str = field(compare=False, default="")

    @property
    def envelope(self) -> dict[str, Any]:
        return schema.envelope(self.text)


def journal_files(cfg: Config) -> list[str]:
    """The journal files that exist: the configured one and the runtime-dir fallback."""
    return [p for p in (cfg.journal_path, cfg.journal_fallback_path) if os.path.exists(p)]


def _prefix_range(prefix: str) -> tuple[str, str]:
    """``x >= a AND x < b`` is the indexable form of "starts with prefix"."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _kind_clause(prefix: str) -> tuple[str, list[str]]:
    """The indexable form of :func:`kinds.matches`: the kind itself, or
    ``kind >= 'p.' AND kind < 'p/'`` ('/' follows '.')."""
    p = prefix.rstrip(".")
    return "(kind = ? OR (kind >= ? AND kind < ?))", [p, p + ".", p + "/"]


class Reader:
    """One journal file, read-only."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.exists(path):
            raise JournalError(f"no journal at {path}")
        try:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            self.db.execute("PRAGMA query_only = 1")
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read the journal {path}: {exc}") from exc
        if row is None or row[0] != str(schema.VERSION):
            raise JournalError(f"{path}: journal layout {row and row[0]}, this version reads {schema.VERSION}")

    def close(self) -> None:
        self.db.close()

    def _where(self, f: Filters) -> tuple[str, list[Any]]:
        clauses, params = ["1"], []  # type: list[str], list[Any]
        if f.since_ns is not None:
            clauses.append("ts >= ?")
            params.append(f.since_ns)
        if f.until_ns is not None:
            clauses.append("ts <= ?")
            params.append(f.until_ns)
        if f.kinds:
            ors = []
            for prefix in f.kinds:
                clause, args = _kind_clause(prefix)
                ors.append(clause)
                params += args
            clauses.append(f"({' OR '.join(ors)})")
        if f.pod is not None:
            containers = self.containers_of(*f.pod)
            marks = ",".join("?" * len(containers))
            clauses.append(f"((pod_ns = ? AND pod_name = ?) OR container_id IN ({marks}))")
            params += [*f.pod, *containers]
        if f.namespace is not None:
            clauses.append("pod_ns = ?")
            params.append(f.namespace)
        if f.container:
            lo, hi = _prefix_range(f.container)
            clauses.append("container_id >= ? AND container_id < ?")
            params += [lo, hi]
        if f.ip is not None:
            clauses.append("id IN (SELECT event FROM event_ips WHERE ip = ?)")
            params.append(normal_ip(f.ip) or f.ip)
        if f.path is not None:
            clauses.append("path = ?")
            params.append(f.path)
        if f.failed:
            clauses.append("failed = 1")
        return " AND ".join(clauses), params

    def query(self, f: Filters) -> list[Stored]:
        """Matching events, oldest first (the newest ``f.limit`` when set)."""
        where, params = self._where(f)
        try:
            if f.limit is not None:
                rows = self.db.execute(f"SELECT ts, id, envelope FROM events WHERE {where} "
                                       "ORDER BY ts DESC, id DESC LIMIT ?", [*params, f.limit]).fetchall()
                rows.reverse()
            else:
                rows = self.db.execute(f"SELECT ts, id, envelope FROM events WHERE {where} ORDER BY ts, id",
                                       params).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"{self.path}: {exc}") from exc
        return [Stored(ts, i, text, self.path) for ts, i, text in rows]

    def containers_of(self, namespace: str, name: str) -> list[str]:
        rows = self.db.execute("SELECT DISTINCT container_id FROM events WHERE pod_ns = ? AND pod_name = ? "
                               "AND container_id IS NOT NULL", (namespace, name)).fetchall()
        return [r[0] for r in rows]

    def runs(self, run_ids: Sequence[str]) -> list[Stored]:
        """Every event of these runs (link/addr/netns attributed to them)."""
        if not run_ids:
            return []
        marks = ",".join("?" * len(run_ids))
        rows = self.db.execute(f"SELECT ts, id, envelope FROM events WHERE run_id IN ({marks}) ORDER BY ts, id",
                               list(run_ids)).fetchall()
        return [Stored(ts, i, text, self.path) for ts, i, text in rows]

    def last_seqs(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT incarnation, max(seq) FROM events GROUP BY incarnation").fetchall())

    def snapshot(self, f: Filters) -> tuple[list[Stored], dict[str, int]]:
        """``query`` and ``last_seqs`` in one read transaction: the same state of the file."""
        self.db.execute("BEGIN")
        try:
            return self.query(f), self.last_seqs()
        finally:
            self.db.execute("COMMIT")

    def incarnation_after(self, incarnation: str, seq: int, upto: int) -> list[Stored]:
        rows = self.db.execute("SELECT ts, id, envelope FROM events WHERE incarnation = ? AND seq > ? AND seq <= ? "
                               "ORDER BY seq", (incarnation, seq, upto)).fetchall()
        return [Stored(ts, i, text, self.path) for ts, i, text in rows]


class Journal:
    """Every journal file of this node, read together."""

    def __init__(self, paths: Sequence[str]) -> None:
        if not paths:
            raise JournalError("no journal file found (is journal.enabled false, or did cnisup never run here?)")
        self.readers = [Reader(p) for p in paths]

    @classmethod
    def of(cls, cfg: Config) -> Journal:
        files = journal_files(cfg)
        if not files:
            raise JournalError(f"no journal at {cfg.journal_path} (nor {cfg.journal_fallback_path}); is "
                               "journal.enabled false, or did cnisup never run with this configuration?")
        return cls(files)

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, f: Filters) -> list[Stored]:
        merged = list(heapq.merge(*(r.query(f) for r in self.readers)))
        return merged[-f.limit:] if f.limit is not None and f.limit > 0 else merged

    def runs(self, run_ids: Sequence[str]) -> list[Stored]:
        return list(heapq.merge(*(r.runs(run_ids) for r in self.readers)))

    def last_seqs(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.readers:
            for inc, seq in r.last_seqs().items():
                out[inc] = max(seq, out.get(inc, 0))
        return out

    def snapshot(self, f: Filters) -> tuple[list[Stored], dict[str, int]]:
        rows: list[list[Stored]] = []
        last: dict[str, int] = {}
        for r in self.readers:
            got, seqs = r.snapshot(f)
            rows.append(got)
            for inc, seq in seqs.items():
                last[inc] = max(seq, last.get(inc, 0))
        return list(heapq.merge(*rows)), last

    def incarnation_after(self, incarnation: str, seq: int, upto: int) -> list[Stored]:
        """Events of ``incarnation`` with seq in (seq, upto], by seq."""
        rows = [x for r in self.readers for x in r.incarnation_after(incarnation, seq, upto)]
        return sorted(rows, key=lambda x: schema.envelope(x.text)["seq"])


class Match:
    """``Filters`` applied to envelopes one by one (``tail``, live): the same
    keys the journal indexes. A pod's events include those of its containers
    (learned from its plugin runs as they pass)."""

    def __init__(self, f: Filters) -> None:
        self.f = f
        self.containers: set[str] = set()

    def __call__(self, env: dict[str, Any]) -> bool:
        f, k = self.f, schema.keys(env)
        if f.since_ns is not None and env["ts"] < f.since_ns:
            return False
        if f.until_ns is not None and env["ts"] > f.until_ns:
            return False
        if f.kinds and not any(kinds.matches(env["kind"], p) for p in f.kinds):
            return False
        if f.pod is not None:
            mine = (k.pod_ns, k.pod_name) == f.pod
            if mine and k.container_id:
                self.containers.add(k.container_id)
            if not mine and k.container_id not in self.containers:
                return False
        if f.namespace is not None and k.pod_ns != f.namespace:
            return False
        if f.container and not (k.container_id or "").startswith(f.container):
            return False
        if f.ip is not None and (normal_ip(f.ip) or f.ip) not in k.ips:
            return False
        if f.path is not None and k.path != f.path:
            return False
        return not f.failed or k.failed


#: Seconds ``tail --since`` waits for the journal to commit what the live stream is ahead by.
CATCH_UP_S = 2.0


class Stitch:
    """``tail --since``: the journal up to now, then the live stream, with no
    gap and no duplicate (by incarnation and seq). Subscribe first, then
    ``replay``, then pass every live envelope through ``live``."""

    def __init__(self, journal: Journal, f: Filters) -> None:
        self.journal = journal
        self.match = Match(f)
        self.filters = f
        self.covered: dict[str, int] = {}  #: per incarnation: the journal has everything up to this seq

    def replay(self) -> list[dict[str, Any]]:
        rows, self.covered = self.journal.snapshot(self.filters)
        return [env for s in rows if self.match(env := s.envelope)]

    def live(self, env: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
        """What to show for one live envelope (events the journal had not yet
        committed first), and how many of the events in between were lost."""
        inc, seq = env["incarnation"], env["seq"]
        known = inc in self.covered
        covered = self.covered.get(inc, 0)
        if seq <= covered:
            return [], 0  # already shown from the journal
        out: list[dict[str, Any]] = []
        lost = 0
        if seq > covered + 1:
            # Committed after our snapshot (or, for an incarnation the snapshot did
            # not have yet, maybe before ``since``: ``match`` decides).
            found = self._catch_up(inc, covered, seq - 1)
            out += [e for e in found if self.match(e)]
            if known:  # of an incarnation it had never heard of, the journal may hold nothing on purpose
                lost = (seq - 1 - covered) - len(found)
        self.covered[inc] = seq
        if self.match(env):
            out.append(env)
        return out, lost

    def _catch_up(self, inc: str, after: int, upto: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + CATCH_UP_S
        while True:
            found = [s.envelope for s in self.journal.incarnation_after(inc, after, upto)]
            if len(found) >= upto - after or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)
