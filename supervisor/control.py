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


def request(endpoint: str, cmd: str, *, timeout_ms: int = 3000, **fields: Any) -> dict[str, Any]:
    """Client side, used by ``cnisup status``; any program can do the same."""
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
