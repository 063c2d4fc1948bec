"""Build, encode and decode event envelopes: the one place that knows the layout.

A message on the bus is two frames ``[topic, payload]``: the topic is the event
kind (UTF-8), the payload one UTF-8 JSON object (the envelope). See
``docs/PROTOCOL.md`` for the contract and ``schema/envelope.schema.json``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

#: Envelope version. A breaking change to the envelope or to an existing
#: kind's fields bumps it; adding kinds or optional fields does not.
VERSION = 1

SOURCES = frozenset(
    {"ebpf", "proc-poll", "inotify", "file-poll", "k8s-informer", "kubectl", "journal", "journal-runtime",
     "nats", "supervisor"}
)

_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
ENVELOPE_FIELDS = ("v", "id", "kind", "source", "node", "ts", "incarnation", "seq", "data")


class ProtocolError(ValueError):
    """A message that does not follow the wire protocol."""


def new_incarnation() -> str:
    """A fresh id for one run of a worker (or of the supervisor)."""
    return uuid.uuid4().hex


def now_ns() -> int:
    return time.time_ns()


def valid_kind(kind: str) -> bool:
    return bool(_KIND_RE.match(kind))


@dataclass
class Stamp:
    """Who is publishing: fixed for one incarnation; ``seq`` counts up by one per event."""

    source: str
    node: str
    incarnation: str
    seq: int = 0

    def build(self, kind: str, data: dict[str, Any], ts: int | None = None) -> dict[str, Any]:
        """Return the next envelope; consumes one sequence number even if it is
        later dropped, so a dropped event shows up as a hole."""
        if not valid_kind(kind):
            raise ProtocolError(f"invalid event kind {kind!r}")
        self.seq += 1
        return {
            "v": VERSION,
            "id": f"{self.incarnation}-{self.seq}",
            "kind": kind,
            "source": self.source,
            "node": self.node,
            "ts": now_ns() if ts is None else int(ts),
            "incarnation": self.incarnation,
            "seq": self.seq,
            "data": data,
        }


def encode(envelope: dict[str, Any]) -> list[bytes]:
    """Two frames: topic and compact JSON payload."""
    payload = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False, default=str)
    return [envelope["kind"].encode(), payload.encode()]


def decode(frames: list[bytes]) -> dict[str, Any]:
    """Parse and check a two-frame message; raise ProtocolError on anything off."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    try:
        topic = frames[0].decode()
        env = json.loads(frames[1].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"undecodable message: {exc}") from exc
    if not isinstance(env, dict):
        raise ProtocolError("payload is not a JSON object")
    missing = [f for f in ENVELOPE_FIELDS if f not in env]
    if missing:
        raise ProtocolError(f"envelope lacks {', '.join(missing)}")
    if env["kind"] != topic:
        raise ProtocolError(f"topic {topic!r} differs from kind {env['kind']!r}")
    if not isinstance(env["seq"], int) or env["seq"] < 1:
        raise ProtocolError(f"bad seq {env['seq']!r}")
    if not isinstance(env["ts"], int) or not isinstance(env["data"], dict):
        raise ProtocolError("bad ts or data")
    return env
