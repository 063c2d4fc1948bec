"""The control socket: a ROUTER answering one JSON request with one JSON reply.

Request: ``{"cmd": "<name>", ...}``; reply: ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. Each command is one function below whose
docstring is its help; errors are mapped to replies in ``handle`` only.
Only read-only commands are exposed here; stop and reload come from signals.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from cnisup.protocol.control import request

__all__ = ["COMMANDS", "handle", "request", "serve_one"]


#: Events one replay request may ask for.
MAX_REPLAY = 1000


class Status(Protocol):
    def status(self) -> dict[str, Any]: ...
    def replay(self, incarnation: str, from_seq: int, to_seq: int) -> dict[str, Any]: ...
    def progress(self) -> list[dict[str, Any]]: ...


def cmd_status(sup: Status, req: dict[str, Any]) -> dict[str, Any]:
    """status: each worker's state, pid, source, incarnation, restarts, last
    exit, fallback reason, events sent and dropped; the supervisor's own."""
    return sup.status()


def cmd_replay(sup: Status, req: dict[str, Any]) -> dict[str, Any]:
    """replay: the supervisor's own recent events as published, by seq:
    {"incarnation", "from_seq", "to_seq"} -> {"envelopes": [payload text], "missing": [seq]}.
    The journal fills the gap of what it could not hear (before it listened)."""
    inc, first, last = req.get("incarnation"), req.get("from_seq"), req.get("to_seq")
    if not isinstance(inc, str) or not all(isinstance(n, int) and not isinstance(n, bool) for n in (first, last)):
        raise ValueError('expected {"incarnation": str, "from_seq": int, "to_seq": int}')
    assert isinstance(first, int) and isinstance(last, int)
    if not 1 <= first <= last or last - first >= MAX_REPLAY:
        raise ValueError(f"from_seq..to_seq must be 1 <= from <= to, at most {MAX_REPLAY} events")
    return sup.replay(inc, first, last)


def cmd_progress(sup: Status, req: dict[str, Any]) -> dict[str, Any]:
    """progress: every live incarnation's last seq (and per kind kseq), as in
    supervisor.progress: a new subscriber's starting point for loss detection."""
    return {"incarnations": sup.progress()}


def cmd_help(sup: Status, req: dict[str, Any]) -> dict[str, Any]:
    """help: the commands this socket answers."""
    return {"commands": {name: (fn.__doc__ or "").split("\n")[0] for name, fn in COMMANDS.items()}}


COMMANDS: dict[str, Callable[[Status, dict[str, Any]], dict[str, Any]]] = {
    "status": cmd_status,
    "replay": cmd_replay,
    "progress": cmd_progress,
    "help": cmd_help,
}


def handle(sup: Status, raw: bytes) -> dict[str, Any]:
    try:
        req = json.loads(raw)
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            raise ValueError('expected {"cmd": "<name>"}')
        fn = COMMANDS.get(req["cmd"])
        if fn is None:
            raise ValueError(f"unknown command {req['cmd']!r}; try help")
        return {"ok": True, **fn(sup, req)}
    except (ValueError, json.JSONDecodeError) as exc:
        return {"ok": False, "error": str(exc)}


def serve_one(sup: Status, sock: zmq.Socket[Any]) -> None:
    """Answer one request waiting on the ROUTER socket (REQ or DEALER peers)."""
    frames = sock.recv_multipart(zmq.NOBLOCK)
    ident, body = frames[0], frames[-1]
    envelope = frames[1:-1]  # REQ adds an empty delimiter; keep what came
    reply = json.dumps(handle(sup, body), default=str).encode()
    sock.send_multipart([ident, *envelope, reply], zmq.NOBLOCK)
