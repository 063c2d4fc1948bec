"""Connecting to NATS, for the export worker and the ``cnisup fleet`` commands:
the one place that turns ``export.nats`` into nats-py's options and tells a
configuration problem (credentials refused, a TLS mismatch, a missing
stream) from a server that is merely away.

Every connection attempt fails fast (nats-py otherwise retries a refused
connection for about two minutes, whatever ``allow_reconnect`` says); the
callers retry with their own backoff, so "away" and "refused" never mix.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.client import JetStreamContext

from cnisup.protocol import subjects
from cnisup.protocol.settings import Nats

#: Bytes of a server's INFO line we read before giving up on it (servers send ~1 KiB).
MAX_INFO_BYTES = 64 << 10
#: Characters of a server's error text kept in a message.
MAX_ERROR = 300
#: Seconds between client PINGs, and unanswered ones before the connection counts as dead:
#: a peer gone without a RST is noticed in about 10 s, not nats-py's default 4 minutes.
PING_INTERVAL_S = 5
MAX_OUTSTANDING_PINGS = 2


class Refused(Exception):
    """A problem only a configuration change fixes; names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _short(text: object) -> str:
    return str(text).replace("\n", " ")[:MAX_ERROR]


def tls_context(n: Nats) -> ssl.SSLContext | None:
    if not n.tls_required:
        return None
    try:
        ctx = ssl.create_default_context(cafile=n.tls.ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise Refused("export.nats.tls.ca", f"cannot load {n.tls.ca}: {_short(exc)}") from exc
    if n.tls.cert:
        try:
            ctx.load_cert_chain(n.tls.cert, n.tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise Refused("export.nats.tls.cert", f"cannot load {n.tls.cert} with {n.tls.key}: {_short(exc)}") from exc
    return ctx


def auth_options(n: Nats) -> dict[str, Any]:
    """nats-py's keyword arguments for the configured authentication."""
    if n.credentials_file:
        return {"user_credentials": n.credentials_file}
    if n.nkey_seed_file:
        return {"nkeys_seed": n.nkey_seed_file}
    if n.user_password_file:
        try:
            with open(n.user_password_file, encoding="utf-8") as f:
                line = f.readline(4096).strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise Refused("export.nats.user_password_file", _short(exc)) from exc
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise Refused("export.nats.user_password_file", "its first line must be user:password")
        return {"user": user, "password": password}
    return {}


async def server_info(url: str, timeout_s: float) -> dict[str, Any] | None:
    """The INFO a server sends first, read raw (None when it cannot be reached
    or sends something else): whether it will speak TLS, before anything of
    ours crosses the wire."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        return None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), timeout_s)
    except (TimeoutError, OSError):
        return None
    try:
        line = await asyncio.wait_for(reader.readuntil(b"\n"), timeout_s)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    finally:
        writer.close()
    if not line.startswith(b"INFO ") or len(line) > MAX_INFO_BYTES:
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


async def require_tls(n: Nats) -> None:
    """Refuse a server that would not speak TLS although TLS is configured:
    nats-py (2.16) connects in plaintext then, credentials and all, where a
    tls:// URL promised otherwise."""
    for url in n.servers:
        info = await server_info(url, n.connect_timeout)
        if info is not None and info.get("tls_required") is not True:
            key = "export.nats.tls" if n.tls.configured else "export.nats.servers"
            raise Refused(key, f"{url} does not offer TLS; refusing to connect in plaintext")


def refusal(exc: BaseException, n: Nats) -> Refused | None:
    """The configuration problem behind a connection error, or None when the
    server may simply be away (retry)."""
    text = _short(exc).lower()
    auth_key = n.auth_key or "export.nats"
    if isinstance(exc, Refused):
        return exc
    if "authorization violation" in text or "authentication" in text:
        if n.auth_key is None:
            return Refused("export.nats", "the server requires authentication: set credentials_file, "
                                          "nkey_seed_file or user_password_file")
        return Refused(auth_key, "the server refused these credentials (Authorization Violation)")
    if "permissions violation" in text:
        return Refused(auth_key, f"these credentials are not allowed to do this: {_short(exc)}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Refused("export.nats.tls.ca", f"the server's certificate does not verify: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        return Refused("export.nats.tls", f"TLS failed: {_short(exc)}")
    if type(exc).__module__.startswith("nkeys") or isinstance(exc, (FileNotFoundError, PermissionError)):
        return Refused(auth_key, f"cannot use it: {type(exc).__name__}: {_short(exc)}")
    return None


ErrorCallback = Callable[[Exception], Awaitable[None]]
Callback = Callable[[], Awaitable[None]]


async def connect(n: Nats, *, name: str, inbox_prefix: str, error_cb: ErrorCallback,
                  closed_cb: Callback | None = None) -> Client:
    """One fail-fast attempt over ``n.servers``. Raises ``Refused`` for a
    configuration problem, anything else when no server could be reached."""
    if n.tls_required:
        await require_tls(n)
    nc = Client()
    try:
        await nc.connect(
            n.servers, name=name, inbox_prefix=inbox_prefix, error_cb=error_cb, closed_cb=closed_cb,
            allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0,
            connect_timeout=n.connect_timeout, ping_interval=PING_INTERVAL_S,  # type: ignore[arg-type]
            max_outstanding_pings=MAX_OUTSTANDING_PINGS, tls=tls_context(n), **auth_options(n))
    except Exception as exc:
        refused = refusal(exc, n)
        if refused is not None:
            raise refused from exc
        raise
    return nc


def stream_config(n: Nats) -> StreamConfig:
    """The stream the export creates when it is absent and ``create_stream``."""
    return StreamConfig(name=n.stream, subjects=n.stream_subjects, num_replicas=n.replicas,
                        storage=StorageType.FILE, retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD,
                        max_age=n.max_age, max_bytes=n.max_bytes, duplicate_window=n.duplicate_window)


async def bind_stream(js: JetStreamContext, n: Nats, node: str) -> StreamInfo:
    """The configured stream, created when absent and allowed; Refused when it
    is missing or does not take this node's subjects."""
    try:
        info = await js.stream_info(n.stream)
    except nats.js.errors.NotFoundError:
        if not n.create_stream:
            raise Refused("export.nats.stream", f"stream {n.stream!r} does not exist (create_stream: false)"
                          ) from None
        try:
            info = await js.add_stream(stream_config(n))
        except nats.js.errors.ServiceUnavailableError:
            raise  # no meta leader yet: try again later
        except nats.js.errors.APIError as exc:  # placement, storage the server lacks, overlapping subjects
            raise Refused("export.nats.stream", f"cannot create stream {n.stream!r}: {_short(exc.description)}"
                          ) from exc
    probe = subjects.subject(n.subject_prefix, node, "x")
    if not any(subjects.matches(s, probe) for s in (info.config.subjects or [])):
        raise Refused("export.nats.subject_prefix", f"stream {n.stream!r} takes {info.config.subjects}, not "
                                                    f"{subjects.node_filter(n.subject_prefix, node)}")
    return info


def inbox_prefix(node: str) -> str:
    """Replies (acks) come to a per-node inbox, so a node's credentials need
    subscribe permission on its own inbox only (docs/FLEET.md)."""
    return f"_INBOX_{subjects.node_token(node)}"

