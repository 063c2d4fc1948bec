"""The NATS side of the export: a publisher in its own thread, running
nats-py's asyncio loop, so the worker's main loop keeps the contract (it
blocks only in ``ctx.wait``: heartbeats and stop handling stay there).

The main loop owns the journal and the cursor. It hands the publisher
``Item``s with ``submit`` (thread-safe: ``call_soon_threadsafe``); the
publisher hands back, through a queue and a wake-up pipe:

- ``("ready", gen)``: connected, the stream is bound: send from the cursor;
- ``("acked", gen, [(item, duplicate), ...])``: acknowledged, in order;
- ``("down", gen, reason)``: whatever was in flight is unknown: rewind to the
  cursor (the server drops what it already had, by ``Nats-Msg-Id``);
- ``("fatal", key, message)``: only a configuration change helps;
- ``("stopped",)``, or ``("crashed", why)`` (a bug: the worker exits, the
  supervisor restarts it).

Each connection episode has a generation; items and acks of an older one
are dropped, so nothing sent before a failure is ever counted as acked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from cnisup.protocol.settings import Nats
from cnisup.workers import backoff
from cnisup.workers.export import connect
from cnisup.workers.export.cursor import Row

log = logging.getLogger("cnisup.nats")

#: Seconds a stopping publisher waits for the acks of what is in flight.
STOP_DRAIN_S = 2.0
#: Characters of an error kept for ``status``.
MAX_ERROR = 300
#: Seconds the stream lookup at each connection may take (no meta leader yet: ask again soon).
BIND_TIMEOUT_S = 2.0
#: Bytes of a reply we read as an ack (an ack is about 60).
MAX_REPLY_BYTES = 4096


#: ``Item.source`` of an event published straight from the bus (journal sources are 0, 1).
LIVE = -1


@dataclass(frozen=True)
class Item:
    source: int  #: index of the journal source the row came from, or LIVE
    row: Row
    subject: str
    #: The envelope's id: globally unique (a fresh incarnation per worker run), so the stream's
    #: duplicate window recognises a resend whichever node or connection it comes from.
    msg_id: str = field(init=False)

    def __post_init__(self) -> None:  # computed once: it is looked up several times per event
        object.__setattr__(self, "msg_id", f"{self.row.incarnation}-{self.row.seq}")


class Handoff:
    """Publisher thread → main loop: messages, plus a pipe that wakes ``ctx.wait``."""

    def __init__(self) -> None:
        self.q: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def put(self, *msg: Any) -> None:
        self.q.put(msg)
        with contextlib.suppress(BlockingIOError):  # a full pipe: a wake-up is pending anyway
            os.write(self._w, b"\0")

    def take(self) -> list[tuple[Any, ...]]:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 4096):
                pass
        out = []
        while True:
            try:
                out.append(self.q.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._w)


class _Down(Exception):
    """This episode is over; ``reconnect``: the connection is not to be trusted either."""

    def __init__(self, reason: str, *, reconnect: bool) -> None:
        super().__init__(reason)
        self.reconnect = reconnect


def describe(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    if isinstance(exc, _Down):
        return text[:MAX_ERROR]
    return f"{type(exc).__name__}: {text}"[:MAX_ERROR] if text else type(exc).__name__


class Publisher:
    def __init__(self, n: Nats, node: str, *, name: str) -> None:
        self.n = n
        self.node = node
        self.name = name
        self.out = Handoff()
        self.gen = 0
        self.state = "connecting"
        self.server: str | None = None
        self.last_error: str | None = None
        self.counts = {"connects": 0, "errors": 0, "ack_timeouts": 0}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[Item] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._refused: connect.Refused | None = None  #: from nats-py's error callback
        self._attempt = 0  #: failures since the last ack: the backoff step
        self._reached = False  #: the last attempt reached a server
        self._refusals = 0  #: stream errors in a row (no leader): at 3, connect and bind anew
        self._ack_bunch = max(1, n.max_in_flight // 8)
        # Up to half the cap at random: a fleet whose servers all restarted does not reconnect in step.
        self._retry = backoff.exponential(initial_s=0.1, multiplier=2.0, max_s=n.retry_max_delay,
                                          jitter_s=n.retry_max_delay / 2)

    # -- the main loop's side ---------------------------------------------------------------
    def start(self) -> None:
        started = threading.Event()

        def run() -> None:
            try:
                asyncio.run(self._main(started))
            except BaseException as exc:  # a bug: the worker must not go on without its publisher
                log.exception("NATS publisher crashed")
                self.out.put("crashed", describe(exc))
                started.set()

        self._thread = threading.Thread(target=run, name="nats-publisher", daemon=True)
        self._thread.start()
        started.wait()

    def submit(self, gen: int, items: list[Item]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._feed, gen, items)

    def stop(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop_now)

    def _stop_now(self) -> None:
        assert self._stop is not None and self._wake is not None
        self._stop.set()
        self._wake.set()

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- the publisher's loop ------------------------------------------------------------------
    def _feed(self, gen: int, items: list[Item]) -> None:
        if gen == self.gen:  # items of an episode that ended are resent from the cursor anyway
            self._queue.extend(items)
            assert self._wake is not None
            self._wake.set()

    async def _main(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake, self._stop = asyncio.Event(), asyncio.Event()
        started.set()
        nc: Client | None = None
        try:
            while not self._stop.is_set():
                try:
                    if nc is None or not nc.is_connected:
                        nc = await self._connect(nc)
                    await self._episode(nc)
                except Exception as exc:
                    # A forbidden publish or API request surfaces only in the error callback; what
                    # raised here is then just its symptom (a timeout).
                    refused = self._refused or connect.refusal(exc, self.n)
                    if refused is not None:
                        self.state, self.last_error = "failed", refused.message
                        self.out.put("fatal", refused.key, refused.message)
                        return
                    self._note_down(describe(exc))
                    if nc is not None and (not isinstance(exc, _Down) or exc.reconnect):
                        await self._close(nc)
                        nc = None
                if self._stop.is_set():
                    break
                # A server that answers but cannot serve the stream yet (after a full restart JetStream
                # elects its leaders for seconds) is asked again soon; one that is away, with backoff.
                self._attempt = min(self._attempt + 1, 3) if self._reached else self._attempt + 1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff.delay_s(self._retry, self._attempt))
        finally:
            if nc is not None:
                await self._close(nc)
            self.state = "stopped"
            self.out.put("stopped")

    def _note_down(self, reason: str) -> None:
        self.counts["errors"] += 1
        self.state, self.last_error = "retrying", reason
        log.info("NATS: %s; resending from the cursor after a backoff", reason)
        self.gen += 1  # what the main loop still sends for the old episode is dropped
        self._queue.clear()
        self.out.put("down", self.gen, reason)

    async def _connect(self, old: Client | None) -> Client:
        if old is not None:
            await self._close(old)
        self.state = "connecting"
        self._refused = None
        self._reached = False

        async def on_error(exc: Exception) -> None:
            refused = connect.refusal(exc, self.n)
            if refused is not None and "permissions violation" in str(exc).lower():
                # nats-py only reports a forbidden publish here: the publish itself just never gets an ack.
                self._refused = refused
                assert self._wake is not None
                self._wake.set()
            else:
                self.last_error = describe(exc)

        async def on_closed() -> None:
            if self._wake is not None:
                self._wake.set()

        nc = await connect.connect(self.n, name=self.name, inbox_prefix=connect.inbox_prefix(self.node),
                                   error_cb=on_error, closed_cb=on_closed)
        self._reached = True
        try:
            await connect.bind_stream(nc.jetstream(timeout=min(self.n.ack_timeout, BIND_TIMEOUT_S)), self.n,
                                      self.node)
        except BaseException:
            await self._close(nc)
            raise
        self.counts["connects"] += 1
        self.server = nc.connected_url.netloc if nc.connected_url else None
        log.info("NATS: connected to %s, stream %s", self.server, self.n.stream)
        return nc

    async def _close(self, nc: Client) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection may raise; it is gone either way
            await asyncio.wait_for(nc.close(), 2.0)

    async def _episode(self, nc: Client) -> None:
        """Publish what the main loop feeds, in order, at most max_in_flight
        unacknowledged, until stopped (returns) or anything fails (raises).

        Hand-rolled on ``nc.publish`` with a reply subject per event rather than
        nats-py's ``publish_async``: its futures never time out, a publish that
        raises leaks a slot of its window for good (2.16), and its per-event
        future, token and ack object cost about twice the CPU of this loop."""
        assert self._wake is not None and self._stop is not None
        inbox = nc.new_inbox()  # fresh per episode: a late reply to an older one cannot match
        replies = _Replies(self.n.stream)
        sub = await nc.subscribe(f"{inbox}.*", cb=replies.take, pending_msgs_limit=4 * self.n.max_in_flight + 1024)
        self.gen += 1
        self._queue.clear()
        self.state = "connected"
        self.out.put("ready", self.gen)
        loop = asyncio.get_running_loop()
        # After a failure (servers back from an outage, a stream electing its leader, a full stream)
        # one event goes first and its ack opens the window: a full window would only earn as many
        # refusals, and a fleet whose servers all restarted would send max_in_flight refused
        # publishes per node per retry to a cluster busy electing its leaders.
        window = 1 if self._attempt else self.n.max_in_flight
        inflight: collections.deque[tuple[int, float, Item]] = collections.deque()  # (number, ack deadline, item)
        acked: list[tuple[Item, bool]] = []
        stop_by: float | None = None
        try:
            while True:
                if self._refused is not None:
                    raise self._refused
                if not nc.is_connected:
                    raise _Down("connection lost", reconnect=True)
                if self._stop.is_set():
                    stop_by = stop_by or loop.time() + STOP_DRAIN_S
                    if not inflight or loop.time() >= stop_by:
                        return
                while not self._stop.is_set() and self._queue and len(inflight) < window:
                    item = self._queue.popleft()
                    number = replies.issue()
                    await nc.publish(item.subject, item.row.text.encode(), reply=f"{inbox}.{number}",
                                     headers={"Nats-Msg-Id": item.msg_id})
                    inflight.append((number, loop.time() + self.n.ack_timeout, item))
                if not inflight:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                number, deadline, _ = inflight[0]
                if number not in replies.got:
                    replies.event.clear()
                    try:
                        await asyncio.wait_for(replies.event.wait(), max(0.0, deadline - loop.time()))
                    except TimeoutError:
                        # No ack does not mean "not stored": resend (same Nats-Msg-Id) over a fresh connection.
                        self.counts["ack_timeouts"] += 1
                        raise _Down(f"no ack within {self.n.ack_timeout:g} s", reconnect=True) from None
                    continue
                while inflight and inflight[0][0] in replies.got:
                    number, _, item = inflight.popleft()
                    duplicate, error = replies.settle(number)
                    if error is not None:
                        # No stream leader (an election): keep the connection. Again and again: bind
                        # anew, which also notices a stream that was deleted.
                        self._refusals += 1
                        raise _Down(error, reconnect=self._refusals >= 3)
                    acked.append((item, duplicate))
                    window = self.n.max_in_flight
                # Acks come back one by one: hand them over in bunches (a wake-up of the main loop
                # each is most of the CPU), and once all in flight are acked.
                if len(acked) >= self._ack_bunch or not inflight:
                    self.out.put("acked", self.gen, acked)
                    acked = []
                self._attempt = self._refusals = 0
        finally:
            # Whatever ends the episode (a stop, a refusal, a timeout): what was acknowledged is stored,
            # and the cursor passes over it before the "down" rewinds to it, or every retry resends it.
            if acked:
                self.out.put("acked", self.gen, acked)
            with contextlib.suppress(Exception):  # a broken connection: the subscription is gone with it
                await sub.unsubscribe()


class _Replies:
    """The stream's replies to one episode's publishes, by the number each
    publish carried in its reply subject. Replies are untrusted: only numbers
    in flight are taken, the payload is read with a bound."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.issued = 0  #: numbers 1..issued were published
        self.settled = 0  #: numbers up to this one were settled (in order)
        self.got: dict[int, tuple[bool, str | None]] = {}  #: number -> (duplicate, error)
        self.event = asyncio.Event()

    def issue(self) -> int:
        self.issued += 1
        return self.issued

    def settle(self, number: int) -> tuple[bool, str | None]:
        self.settled = number
        return self.got.pop(number)

    async def take(self, msg: Msg) -> None:
        tail = msg.subject.rpartition(".")[2]
        # isascii: str.isdigit() also holds for digits int() refuses (superscripts).
        if not (tail.isascii() and tail.isdigit()) or len(tail) > 18 or not self.settled < int(tail) <= self.issued:
            return
        self.got[int(tail)] = self.parse(msg)
        self.event.set()

    def parse(self, msg: Msg) -> tuple[bool, str | None]:
        """(duplicate, None) for an ack by our stream, else (False, why not)."""
        if msg.headers and msg.headers.get("Status") == "503":
            return False, "no responders: the stream has no leader (an election), or no stream takes the subject"
        if len(msg.data) > MAX_REPLY_BYTES:
            return False, f"a reply of {len(msg.data)} bytes is not an ack"
        try:
            reply = json.loads(msg.data)
        except ValueError:
            return False, f"a reply that is not JSON: {msg.data[:80]!r}"
        if not isinstance(reply, dict):
            return False, "a reply that is not a JSON object"
        if isinstance(reply.get("error"), dict):
            err = reply["error"]
            return False, f"stream error {err.get('code')} ({err.get('err_code')}): {str(err.get('description'))[:200]}"
        if reply.get("stream") != self.stream:
            return False, f"acked by stream {str(reply.get('stream'))[:100]!r}, not {self.stream!r}"
        return reply.get("duplicate") is True, None
