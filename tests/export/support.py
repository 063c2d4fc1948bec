"""What the export tests share: journals of real envelopes (the journal's own
``Store``), and a consumer that reads a whole stream back with nats-py."""

from __future__ import annotations

import asyncio
import collections
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cnisup.protocol import envelope
from cnisup.protocol.kinds import ConfigKind
from cnisup.workers.journal.store import Store


@dataclass(frozen=True)
class Dest:
    """A stream and subject prefix of one test."""

    stream: str
    prefix: str

    def nats(self, servers: list[str], **over: Any) -> dict[str, Any]:
        """``export.nats`` for a test: its stream and prefix, short timeouts."""
        return {"servers": servers, "stream": self.stream, "subject_prefix": self.prefix, "ack_timeout": 2.0,
                "connect_timeout": 1.0, "retry_max_delay": 1.0, "duplicate_window": 300.0,
                "max_bytes": "64MiB", **over}



def envelopes(node: str, n: int, *, kind: str = ConfigKind.CONFIG_MODIFIED,
              stamp: envelope.Stamp | None = None) -> list[dict[str, Any]]:
    """``n`` valid envelopes of one incarnation (seq 1..n, or on from ``stamp``)."""
    st = stamp or envelope.Stamp(source="inotify", node=node, incarnation=envelope.new_incarnation())
    return [st.build(kind, {"path": f"/etc/cni/net.d/{i}.conflist", "dir": "/etc/cni/net.d", "valid": True})
            for i in range(n)]


def write_journal(path: Path, envs: list[dict[str, Any]], *, max_bytes: int = 256 << 20) -> None:
    """Append envelopes to a journal file, in batches as the journal writer does."""
    store = Store(str(path), max_bytes=max_bytes, max_age_s=7 * 86400)
    try:
        for i in range(0, len(envs), 500):
            store.write((e, json.dumps(e, separators=(",", ":"))) for e in envs[i:i + 500])
    finally:
        store.close()
    path.chmod(0o666)  # the worker may run as another user and needs to open it (and its WAL) read-only
    for suffix in ("-wal", "-shm"):
        if (p := Path(f"{path}{suffix}")).exists():
            p.chmod(0o666)


@dataclass(frozen=True)
class Stored:
    seq: int  #: stream sequence
    subject: str
    msg_id: str | None
    text: str

    @property
    def env(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.text)
        return value


#: Seconds a read waits for the replica serving it to deliver what the stream's leader holds.
CATCH_UP_S = 60.0


async def _leader_count(js: JetStreamContext, stream: str, subject: str, deadline: float) -> int:
    """How many messages on ``subject`` the stream's leader holds. A member that restarted and has
    not heard from the leader yet answers stream info too, with its own state and no leader named:
    only the leader's answer counts (a single server names no cluster)."""
    while True:
        si = await js.stream_info(stream, subjects_filter=None if subject == ">" else subject)
        if si.cluster is None or si.cluster.leader:
            return si.state.messages if subject == ">" else sum((si.state.subjects or {}).values())
        if time.monotonic() > deadline:
            raise AssertionError(f"stream {stream}: no answer from its leader within {CATCH_UP_S:g} s")
        await asyncio.sleep(0.1)


async def _read(servers: list[str], stream: str, subject: str, opts: dict[str, Any]) -> list[Stored]:
    nc = await nats.connect(servers, max_reconnect_attempts=1, reconnect_time_wait=0, **opts)
    try:
        js = nc.jetstream(timeout=10)
        deadline = time.monotonic() + CATCH_UP_S
        # The end is what the stream's leader holds. The consumer's own count cannot say: an ephemeral
        # consumer is R1 on any replica of the stream and counts and delivers from that replica's
        # store, which after a member restarted can still be catching up. Counted before the consumer
        # exists, so what the read must deliver is the first `held` messages of the stream (in order,
        # whatever is added meanwhile comes after them).
        held = await _leader_count(js, stream, subject, deadline)
        out: list[Stored] = []
        if held == 0:
            return out
        sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0))
        while len(out) < held:
            try:
                msgs = await sub.fetch(1000, timeout=2)
            except nats.errors.TimeoutError:
                if time.monotonic() < deadline:
                    # Its replica is behind the leader: it delivers the rest once it caught up.
                    print(f"read_stream: {len(out)} of {held} delivered, waiting")
                    continue
                ci = await sub.consumer_info()
                raise AssertionError(
                    f"stream {stream}: the consumer on {ci.cluster.leader if ci.cluster else '?'} delivered "
                    f"{len(out)} messages, up to sequence {out[-1].seq if out else 0}; the leader holds {held}: "
                    f"no catch-up in {CATCH_UP_S:g} s") from None
            for m in msgs:
                assert m.metadata.sequence is not None
                out.append(Stored(m.metadata.sequence.stream, m.subject, (m.headers or {}).get("Nats-Msg-Id"),
                                  m.data.decode()))
        return out
    finally:
        await nc.close()


def read_stream(servers: list[str], stream: str = "CNISUP", subject: str = ">", **opts: Any) -> list[Stored]:
    """Every message of the stream (matching ``subject``), in stream order: at least all that its
    leader held when the read started. Retried while a cluster that lost a member elects new
    leaders (requests time out meanwhile)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return asyncio.run(_read(servers, stream, subject, opts))
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            print(f"read_stream: {exc!r}, retrying")
            if time.monotonic() > deadline:
                raise


def check_exactly_once(stored: list[Stored], sent: list[dict[str, Any]]) -> None:
    """Every sent envelope in the stream once, unchanged, with its id as Nats-Msg-Id, in seq
    order per incarnation, on ``<prefix>.<node>.<kind>``."""
    ids = [s.msg_id for s in stored]
    dups = [i for i, c in collections.Counter(ids).items() if c > 1]
    assert not dups, f"{len(dups)} duplicates in the stream, e.g. {dups[:3]}"
    by_id = {s.msg_id: s for s in stored}
    missing = [e["id"] for e in sent if e["id"] not in by_id]
    assert not missing, f"{len(missing)} of {len(sent)} events never reached the stream, e.g. {missing[:3]}"
    for e in sent:
        s = by_id[e["id"]]
        assert s.env == e and s.subject.endswith(f".{e['kind']}"), (s, e)
    last: dict[str, int] = {}
    for s in stored:
        env = s.env
        assert env["seq"] > last.get(env["incarnation"], 0), f"out of order: {env['id']} after seq {last}"
        last[env["incarnation"]] = env["seq"]


def journal_of(runtime_dir: Path) -> list[dict[str, Any]]:
    """Every envelope the journal of a ``cnisup start`` (development preset) holds, in order."""
    db = sqlite3.connect(f"file:{runtime_dir}/journal/journal.db?mode=ro", uri=True)
    try:
        return [json.loads(t) for (t,) in db.execute("SELECT envelope FROM events ORDER BY id")]
    finally:
        db.close()
