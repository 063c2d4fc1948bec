"""The bus in the middle: workers' XPUB sockets connect to our XSUB (private
ipc), subscribers connect to our XPUB (public endpoints). The forwarding is
libzmq's steerable proxy in its own thread, so a slow supervisor loop never
delays an event; the main thread talks to it only over an inproc PAIR.

The XSUB subscribes to everything, and libzmq replays that subscription to
every worker that connects: that is the handshake workers wait for before
they call themselves ready. A subscriber that does not read loses only its
own messages (XPUB drops per pipe at ``publish.hwm``); it sees that as
sequence gaps.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from cnisup.protocol.settings import LIVE_QUEUE
from cnisup.supervisor.runtime import Refused, secure_socket

log = logging.getLogger("cnisup.proxy")

INPROC_BUS = "inproc://cnisup-bus"
#: Milliseconds queued events still try to reach subscribers after the proxy stops.
XPUB_LINGER_MS = 500
_CONTROL = "inproc://cnisup-proxy-control"


@dataclass(frozen=True)
class ProxySettings:
    bus_endpoint: str  #: private ipc XSUB for workers
    public_endpoints: list[str]
    hwm: int
    worker_gid: int | None  #: group that may subscribe on ipc endpoints (None: ours)
    #: the only user besides root that may reach the private bus (None: ours). Not
    #: the group: subscribers are in the workers' group and must not inject events.
    worker_uid: int | None = None
    curve_secret_file: str = ""
    curve_authorized_dir: str = ""
    #: private ipc XPUB for the journal (same stream as subscribers see), and its queue
    consumer_endpoint: str | None = None
    consumer_hwm: int = 100_000
    #: the same for the export's live path, with a smaller queue: it need not carry everything
    live_endpoint: str | None = None
    live_hwm: int = LIVE_QUEUE
    #: a second endpoint of the same XSUB for the workers that keep our uid (None: none)
    privileged_bus_endpoint: str | None = None


class ProxyError(RuntimeError):
    pass


def _ipc_path(ep: str) -> str | None:
    return ep[len("ipc://"):] if ep.startswith("ipc://") else None


class Proxy:
    def __init__(self, settings: ProxySettings, context: zmq.Context[Any]) -> None:
        self.settings = settings
        self.ctx = context
        self._thread = threading.Thread(target=self._run, name="cnisup-proxy", daemon=True)
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._control: zmq.Socket[Any] | None = None
        self._auth: ThreadAuthenticator | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        self._control = self.ctx.socket(zmq.PAIR)
        self._control.bind(_CONTROL)
        self._thread.start()
        if not self._bound.wait(timeout_s):
            raise ProxyError("the proxy did not bind its sockets in time")
        if isinstance(self._error, ProxyError | zmq.ZMQError | OSError | Refused):  # a socket that cannot be bound
            raise ProxyError(str(self._error)) from self._error
        if self._error is not None:
            raise self._error  # a bug: with its traceback

    def _bind(self) -> tuple[zmq.Socket[Any], zmq.Socket[Any], zmq.Socket[Any]]:
        s = self.settings
        xsub = self.ctx.socket(zmq.XSUB)
        xpub = self.ctx.socket(zmq.XPUB)
        control = self.ctx.socket(zmq.PAIR)
        for sock in (xsub, xpub, control):
            sock.setsockopt(zmq.LINGER, 0)
        xsub.setsockopt(zmq.RCVHWM, 0)
        xpub.setsockopt(zmq.SNDHWM, s.hwm)
        control.connect(_CONTROL)
        self._bind_private(xsub)
        if s.consumer_endpoint:
            self._bind_consumer(xpub, s.consumer_endpoint, s.consumer_hwm)
        if s.live_endpoint:
            self._bind_consumer(xpub, s.live_endpoint, s.live_hwm)
        if s.curve_secret_file:
            self._curve_server(xpub)
        self._bind_public(xpub)
        return xsub, xpub, control

    def _bind_private(self, xsub: zmq.Socket[Any]) -> None:
        """The workers' side: only the workers' user (and root) may connect."""
        s = self.settings
        # Its dir (the supervisor made it: ours, 0711) is traversable; the socket's own
        # mode decides who connects. (Handing the dir to the workers' user would need
        # CAP_DAC_OVERRIDE to bind in it.)
        # Two owners, two sockets of one XSUB: the workers' user owns one; workers that
        # keep our uid (root without CAP_DAC_OVERRIDE under the unit) own the other.
        priv = _ipc_path(s.bus_endpoint)
        xsub.bind(s.bus_endpoint)
        if priv:
            secure_socket(priv, 0o600, uid=-1 if s.worker_uid is None else s.worker_uid)
        if s.privileged_bus_endpoint:
            xsub.bind(s.privileged_bus_endpoint)
            if (root_path := _ipc_path(s.privileged_bus_endpoint)) is not None:
                secure_socket(root_path, 0o600)
        xsub.bind(INPROC_BUS)
        xsub.send(b"\x01")  # subscribe to everything; replayed to each new worker

    def _bind_consumer(self, xpub: zmq.Socket[Any], endpoint: str, hwm: int) -> None:
        """A private side of the XPUB (the journal's, the export's live path's): the
        workers' user only, a queue of its own (a listener keeps the options it was
        bound with), no CURVE."""
        s = self.settings
        xpub.setsockopt(zmq.SNDHWM, hwm)
        xpub.bind(endpoint)
        xpub.setsockopt(zmq.SNDHWM, s.hwm)
        path = _ipc_path(endpoint)
        if path:
            os.chmod(path, 0o600)
            if s.worker_uid is not None:
                os.chown(path, s.worker_uid, -1)

    def _curve_server(self, xpub: zmq.Socket[Any]) -> None:
        s = self.settings
        self._auth = ThreadAuthenticator(self.ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=s.curve_authorized_dir)
        public, secret = zmq.auth.load_certificate(s.curve_secret_file)
        if secret is None:
            raise ProxyError(f"{s.curve_secret_file} holds no secret key")
        xpub.curve_secretkey = secret
        xpub.curve_publickey = public
        xpub.curve_server = True

    def _bind_public(self, xpub: zmq.Socket[Any]) -> None:
        """The subscribers' side: ipc endpoints for members of the workers' group."""
        s = self.settings
        for ep in s.public_endpoints:
            path = _ipc_path(ep)
            if path:
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            try:
                xpub.bind(ep)
            except zmq.ZMQError as exc:
                raise ProxyError(f"cannot bind {ep}: {exc}") from exc
            if path:
                secure_socket(path, 0o660, gid=-1 if s.worker_gid is None else s.worker_gid)

    def _run(self) -> None:
        try:
            xsub, xpub, control = self._bind()
        except BaseException as exc:
            self._error = exc
            self._bound.set()
            return
        self._bound.set()
        try:
            zmq.proxy_steerable(xsub, xpub, None, control)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.ETERM, zmq.ENOTSOCK):
                log.error("proxy stopped: %s", exc)
        finally:
            xsub.close(linger=0)
            control.close(linger=0)
            # What is queued for subscribers (the last supervisor events) still goes
            # out, for a bounded time: a subscriber that does not read holds nobody up long.
            xpub.close(linger=XPUB_LINGER_MS)

    def statistics(self) -> dict[str, int]:
        """Messages and bytes through the proxy (libzmq's STATISTICS command);
        a multipart message counts once."""
        if self._control is None or not self._thread.is_alive():
            return {}
        self._control.send(b"STATISTICS")
        if not self._control.poll(1000):
            return {}
        frames = self._control.recv_multipart()
        # frontend (XSUB) in/out, then backend (XPUB) in/out; counts, then bytes.
        names = ("from_workers", "from_workers_bytes", "to_workers", "to_workers_bytes",
                 "from_subscribers", "from_subscribers_bytes", "to_subscribers",
                 "to_subscribers_bytes")
        return {n: struct.unpack("=Q", f)[0] for n, f in zip(names, frames, strict=False)}

    def flush(self, published: int, timeout_s: float) -> bool:
        """Wait until the proxy has taken in at least ``published`` messages and
        passed on everything it took in; False if that did not happen in time.
        (The proxy has no "drain, then stop" command: its counters tell.)"""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.statistics()
            if st.get("from_workers", 0) >= published and st.get("to_subscribers", 0) >= st.get("from_workers", 0):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)

    def stop(self) -> None:
        if self._control is not None and self._thread.is_alive():
            self._control.send(b"TERMINATE")
            self._thread.join(timeout=5)
        if self._control is not None:
            self._control.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        for ep in [self.settings.bus_endpoint, self.settings.privileged_bus_endpoint or "",
                   self.settings.consumer_endpoint or "", self.settings.live_endpoint or "",
                   *self.settings.public_endpoints]:
            path = _ipc_path(ep)
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass
