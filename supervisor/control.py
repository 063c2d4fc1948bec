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
from cnisup.protocol.untrusted import UntrustedInputError, load_json, one_line

__all__ = ["COMMANDS", "handle", "request", "serve_one"]

#: Bytes of one request: a command name and a few fields. Anything bigger is refused with a reply.
MAX_REQUEST = 64 << 10
#: Bytes of any one frame libzmq accepts at all; a bigger one drops that peer's connection
#: before it is buffered whole.
MAX_FRAME = 1 << 20
#: Nesting of a request: {"cmd": ..., "field": [...]}.
MAX_REQUEST_DEPTH = 4
#: Routing frames between the peer's identity and the body (REQ adds one empty delimiter).
MAX_ROUTING_FRAMES = 4
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


def parse_request(raw: bytes) -> dict[str, Any]:
    """One request from any member of the socket's group: bounded, checked,
    never trusted. Raises ``UntrustedInputError`` with a one-line reason."""
    req = load_json(raw, what="request", max_bytes=MAX_REQUEST, max_depth=MAX_REQUEST_DEPTH)
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        raise UntrustedInputError('expected {"cmd": "<name>"}')
    if req["cmd"] not in COMMANDS:
        raise UntrustedInputError(f"unknown command {req['cmd'][:40]!r}; try help")
    return req


def handle(sup: Status, raw: bytes) -> dict[str, Any]:
    try:
        req = parse_request(raw)
        return {"ok": True, **COMMANDS[req["cmd"]](sup, req)}
    except (UntrustedInputError, ValueError) as exc:  # ValueError: a command's own check of its fields
        return {"ok": False, "error": one_line(str(exc))}


def configure(sock: zmq.Socket[Any]) -> None:
    """Limits of the control ROUTER socket, set before it is bound."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)


def serve_one(sup: Status, sock: zmq.Socket[Any]) -> None:
    """Answer one request waiting on the ROUTER socket (REQ or DEALER peers)."""
    frames = sock.recv_multipart(zmq.NOBLOCK)
    ident, body = frames[0], frames[-1]
    envelope = frames[1:-1]  # REQ adds an empty delimiter; keep what came
    if len(envelope) > MAX_ROUTING_FRAMES:
        envelope = [b""]
        reply = {"ok": False, "error": one_line(f"a request of {len(frames) - 1} frames; send one "
                                                "(REQ adds one empty delimiter)")}
    else:
        reply = handle(sup, body)
    sock.send_multipart([ident, *envelope, json.dumps(reply, default=str).encode()], zmq.NOBLOCK)
