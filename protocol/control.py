"""The client side of the control socket (a ROUTER answering one JSON request
with one JSON reply): ``cnisup status``, the journal's replay requests, and
any other program use this or do the same."""

from __future__ import annotations

import json
from typing import Any

import zmq

from cnisup.protocol import reach


def request(endpoint: str, cmd: str, *, timeout_ms: int = 3000, **fields: Any) -> dict[str, Any]:
    """Send ``{"cmd": cmd, **fields}``; the reply (``{"ok": true, ...}`` or
    ``{"ok": false, "error": ...}``). ``ConnectionError`` when the socket cannot
    be reached at all (missing, no permission), ``TimeoutError`` when nobody answers."""
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
