"""What the supervisor tells a worker at exec time (JSON in an environment
variable), and the worker-to-supervisor status channel (JSON lines on a pipe).

The worker's settings travel as ``Config.to_dict()`` and are rebuilt on the
worker's side with the same builder (``Config.from_dict``), so both sides of
the process boundary hold the same typed, checked configuration.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from cnisup.protocol.untrusted import UntrustedInputError, load_json, nested_within
from cnisup.workers.privileges import Identity

SPEC_ENV = "CNISUP_WORKER_SPEC"
STATUS_FD_ENV = "CNISUP_STATUS_FD"


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    incarnation: str
    supervisor_pid: int
    bus_endpoint: str
    identity: Identity | None  #: None: keep the supervisor's privileges
    config: dict[str, Any] = field(default_factory=dict)  #: ``Config.to_dict()``

    def to_env(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_env(cls) -> WorkerSpec:
        raw = json.loads(os.environ[SPEC_ENV])
        ident = raw.pop("identity")
        if ident is not None:
            ident["groups"] = tuple(ident["groups"])
            ident = Identity(**ident)
        return cls(identity=ident, **raw)


# -- the status channel: worker -> supervisor ------------------------------------------

#: Bytes of one status line; a worker sends a few hundred. More is not a status line.
MAX_STATUS_LINE = 256 << 10
#: Nesting of a heartbeat's ``info`` (shown by ``cnisup status``).
MAX_INFO_DEPTH = 8
#: Characters of an exit reason kept.
MAX_REASON = 2000
#: Kinds one worker may count in a heartbeat's ``kseq``.
MAX_KINDS = 256


class StatusError(UntrustedInputError):
    """A status line that breaks the protocol: the worker is not to be trusted."""


def status_line(kind: str, **fields: Any) -> bytes:
    return (json.dumps({"t": kind, **fields}, separators=(",", ":")) + "\n").encode()


def _count(msg: dict[str, Any], key: str) -> int:
    value = msg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StatusError(f"{key!r} is {value!r}, not a count")
    return value


def parse_status(line: bytes) -> dict[str, Any]:
    """One status line, checked for size, shape and types (workers are the
    unprivileged, exposed half of the design). Returns a normalized message:
    ``{"t": "ready", "pid"}``, ``{"t": "hb", "sent", "dropped", "rss", "info"}``
    or ``{"t": "exit", "code", "reason"}``. Raises ``StatusError``."""
    try:
        msg = load_json(line, what="a status line", max_bytes=MAX_STATUS_LINE, max_depth=MAX_INFO_DEPTH + 1)
    except UntrustedInputError as exc:
        raise StatusError(str(exc)) from None
    if not isinstance(msg, dict):
        raise StatusError(f"a status line is a JSON object, not {type(msg).__name__}")
    kind = msg.get("t")
    if kind == "ready":
        return {"t": "ready", "pid": _count(msg, "pid")}
    if kind == "hb":
        rss, info = msg.get("rss"), msg.get("info", {})
        if rss is not None:
            rss = _count(msg, "rss")
        if not isinstance(info, dict) or not nested_within(info, MAX_INFO_DEPTH):
            raise StatusError(f"'info' is not an object nested at most {MAX_INFO_DEPTH} deep")
        kseq = msg.get("kseq", {})
        if not isinstance(kseq, dict) or len(kseq) > MAX_KINDS or not all(
                isinstance(k, str) and len(k) <= 128 and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in kseq.items()):
            raise StatusError(f"'kseq' is not a map of at most {MAX_KINDS} kinds to counts")
        return {"t": "hb", "sent": _count(msg, "sent"), "dropped": _count(msg, "dropped"), "rss": rss,
                "info": info, "seq": _count(msg, "seq") if "seq" in msg else None, "kseq": kseq}
    if kind == "exit":
        reason = msg.get("reason", "")
        if not isinstance(reason, str):
            raise StatusError(f"'reason' is {type(reason).__name__}, not a string")
        return {"t": "exit", "code": _count(msg, "code"), "reason": reason[:MAX_REASON]}
    raise StatusError(f"unknown status message type {str(kind)[:40]!r}")
