"""Can this process connect to an endpoint? ZeroMQ's connect is asynchronous
and silent: a socket that is missing, or that we may not open, shows only as
nothing arriving, ever. One plain connect (AF_UNIX for ipc://, TCP for tcp://)
answers at once, with the errno."""

from __future__ import annotations

import errno
import socket


def unreachable(endpoint: str, timeout_s: float = 2.0) -> OSError | None:
    """Why ``endpoint`` cannot be connected to now; None when it can (or when
    its transport is not one we can try)."""
    try:
        if endpoint.startswith("ipc://"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(timeout_s)
                s.connect(endpoint[len("ipc://"):])
        elif endpoint.startswith("tcp://"):
            host, _, port = endpoint[len("tcp://"):].rpartition(":")
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return exc
    except ValueError as exc:  # a port that is not a number
        return OSError(errno.EINVAL, str(exc))
    return None


def describe(endpoint: str, exc: OSError) -> str:
    """``cannot connect to ipc:///run/x.sock: Permission denied (EACCES)``."""
    name = errno.errorcode.get(exc.errno or 0, "timeout" if isinstance(exc, TimeoutError) else "?")
    return f"cannot connect to {endpoint}: {exc.strerror or exc} ({name})"
