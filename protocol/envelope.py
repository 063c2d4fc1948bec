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
from dataclasses import dataclass, field
from typing import Any

from .untrusted import UntrustedInputError, load_json

#: Envelope version. A breaking change to the envelope or to an existing
#: kind's fields bumps it; adding kinds or optional fields does not.
VERSION = 1

SOURCES = frozenset(
    {"ebpf", "proc-poll", "inotify", "file-poll", "k8s-informer", "kubectl", "journal", "journal-runtime",
     "nats", "supervisor"}
)

_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
ENVELOPE_FIELDS = ("v", "id", "kind", "source", "node", "ts", "incarnation", "seq", "data")
#: Optional fields (a consumer must not require them): ``kseq`` counts per kind.
OPTIONAL_FIELDS = ("kseq",)
#: Bounds a subscriber applies to a payload: far above any event cnisup sends
#: (a kernel event with captured output is under 200 KiB, nested under 10 deep).
MAX_PAYLOAD = 16 << 20
MAX_PAYLOAD_DEPTH = 64


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
    """Who is publishing: fixed for one incarnation; ``seq`` counts up by one
    per event, ``kseq`` by one per event of the same kind (so a subscriber to
    a topic prefix, which sees only some kinds, can still tell loss)."""

    source: str
    node: str
    incarnation: str
    seq: int = 0
    kseqs: dict[str, int] = field(default_factory=dict)

    def build(self, kind: str, data: dict[str, Any], ts: int | None = None) -> dict[str, Any]:
        """Return the next envelope; consumes one sequence number even if it is
        later dropped, so a dropped event shows up as a hole."""
        if not valid_kind(kind):
            raise ProtocolError(f"invalid event kind {kind!r}")
        self.seq += 1
        kseq = self.kseqs[kind] = self.kseqs.get(kind, 0) + 1
        return {
            "v": VERSION,
            "id": f"{self.incarnation}-{self.seq}",
            "kind": kind,
            "source": self.source,
            "node": self.node,
            "ts": now_ns() if ts is None else int(ts),
            "incarnation": self.incarnation,
            "seq": self.seq,
            "kseq": kseq,
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
        env = load_json(frames[1], what="payload", max_bytes=MAX_PAYLOAD, max_depth=MAX_PAYLOAD_DEPTH)
    except (UnicodeDecodeError, UntrustedInputError) as exc:
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
    if "kseq" in env and (not isinstance(env["kseq"], int) or env["kseq"] < 1):
        raise ProtocolError(f"bad kseq {env['kseq']!r}")
    if not isinstance(env["ts"], int) or not isinstance(env["data"], dict):
        raise ProtocolError("bad ts or data")
    return env


def decode_payload(text: str) -> dict[str, Any]:
    """An envelope from its payload alone (a stored or replayed one: the topic
    is its kind); ProtocolError like ``decode``."""
    try:
        kind = json.loads(text)["kind"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"not an envelope: {exc}") from exc
    if not isinstance(kind, str):
        raise ProtocolError("kind is not a string")
    return decode([kind.encode(), text.encode()])
