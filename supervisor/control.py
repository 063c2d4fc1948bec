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

from cnisup.protocol import reach
from cnisup.protocol.untrusted import UntrustedInputError, load_json, one_line

#: Bytes of one request: a command name and a few fields. Anything bigger is refused with a reply.
MAX_REQUEST = 64 << 10
#: Bytes of any one frame libzmq accepts at all; a bigger one drops that peer's connection
#: before it is buffered whole.
MAX_FRAME = 1 << 20
#: Nesting of a request: {"cmd": ..., "field": [...]}.
MAX_REQUEST_DEPTH = 4
#: Routing frames between the peer's identity and the body (REQ adds one empty delimiter).
MAX_ROUTING_FRAMES = 4


class Status(Protocol):
    def status(self) -> dict[str, Any]: ...


def cmd_status(sup: Status, req: dict[str, Any]) -> dict[str, Any]:
    """status: each worker's state, pid, source, incarnation, restarts, last
    exit, fallback reason, events sent and dropped; the supervisor's own."""
    return sup.status()


def cmd_help(sup: Status, req: dict[str, Any]) -> dict[str, Any]:
    """help: the commands this socket answers."""
    return {"commands": {name: (fn.__doc__ or "").split("\n")[0] for name, fn in COMMANDS.items()}}


COMMANDS: dict[str, Callable[[Status, dict[str, Any]], dict[str, Any]]] = {
    "status": cmd_status,
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
    except UntrustedInputError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, **COMMANDS[req["cmd"]](sup, req)}


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


def request(endpoint: str, cmd: str, *, timeout_ms: int = 3000, **fields: Any) -> dict[str, Any]:
    """Client side, used by ``cnisup status``; any program can do the same.
    ``ConnectionError`` when the socket cannot be reached at all (missing, no
    permission), ``TimeoutError`` when nobody answers."""
    if (exc := reach.unreachable(endpoint)) is not None:
        raise ConnectionError(f"{reach.describe(endpoint, exc)} (is cnisup start running with this config?)")
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(json.dumps({"cmd": cmd, **fields}).encode())
        if not sock.poll(timeout_ms):
            raise TimeoutError(f"no answer from {endpoint} within {timeout_ms} ms "
                               "(is cnisup start running with this config?)")
        reply: dict[str, Any] = json.loads(sock.recv())
        return reply
    finally:
        sock.close(linger=0)
