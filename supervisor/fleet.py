"""``cnisup fleet``: every node's events, read back from the NATS JetStream
stream the export family fills (docs/FLEET.md).

``history`` reads with a pull consumer (explicit batches, no acks: faster
than a push consumer for a read that ends) from the start, or from
``--since`` by the stream's time; ``tail`` follows with an ordered consumer.
The server filters by subject (node, and a kind prefix that ends on a token
boundary); everything else is the local commands' own ``Match``, so the
filters mean exactly what they mean for ``history`` and ``tail``.
``explain pod`` finds the pod's node in the stream, loads that node's events
into a journal of the journal's own layout (a temporary file) and tells the
story with the local ``explain``, unchanged.

Messages from the stream are untrusted: a message that is too large, not an
envelope, or whose kind differs from its subject is reported on stderr and
skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import click

from cnisup.protocol import envelope, subjects
from cnisup.protocol.kinds import KINDS
from cnisup.protocol.settings import Config, Nats
from cnisup.supervisor import answers, render
from cnisup.supervisor import explain as explaining
from cnisup.supervisor.history import Filters, Journal, Match

#: Exit code when the stream cannot be read (no server, refused, no stream).
EX_NO_STREAM = 1
#: Bytes of one message we accept as an envelope (the journal keeps far smaller ones).
MAX_MESSAGE_BYTES = 1 << 20
#: Messages per pull request.
FETCH_BATCH = 1000
#: Seconds one request to the servers may take.
REQUEST_TIMEOUT_S = 10.0
#: Seconds ``history`` waits for the server that serves its read to catch up with the stream's leader.
CATCH_UP_S = 60.0
#: Seconds between looks at a lagging server's progress.
CATCH_UP_POLL_S = 1.0
#: ``err_code`` of the JetStream API's "no message found".
NO_MESSAGE = 10037
#: The kinds ``explain pod`` needs to find a pod's node.
POD_KINDS = ("k8s.pod.", "cni.plugin.")


class StreamError(Exception):
    """The stream cannot be read; one line for the user."""


def _settings(cfg: Config, servers: tuple[str, ...], creds: str | None, stream: str | None) -> Nats:
    n = cfg.export.nats
    if servers:
        n = dataclasses.replace(n, servers=list(servers))
    if creds:
        n = dataclasses.replace(n, credentials_file=creds, nkey_seed_file="", user_password_file="")
    if stream:
        n = dataclasses.replace(n, stream=stream)
    if not n.servers:
        raise click.UsageError("no NATS server: set export.nats.servers in the configuration, or pass --server")
    return n


def subject_filter(prefix: str, node: str | None, kinds: tuple[str, ...]) -> str:
    """The narrowest subject filter the server can apply (one per consumer on 2.9)."""
    head = f"{prefix}.{subjects.node_token(node) if node else '*'}"
    if len(kinds) == 1 and (kind := kinds[0].rstrip(".")):  # whole tokens, as kinds.matches takes them
        return f"{head}.{kind}" if kind in KINDS else f"{head}.{kind}.>"
    return f"{head}.>"


def parse(prefix: str, subject: str, data: bytes) -> tuple[dict[str, Any], str]:
    """An envelope from one message; ProtocolError if it is not one."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise envelope.ProtocolError(f"{len(data)} bytes, more than an event")
    where = subjects.split(prefix, subject)
    if where is None:
        raise envelope.ProtocolError(f"subject {subject[:120]!r} is not under {prefix}.")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise envelope.ProtocolError(f"not UTF-8: {exc}") from None
    return envelope.decode([where[1].encode(), data]), text


class Reader:
    """One connection to the stream for one command."""

    def __init__(self, n: Nats) -> None:
        self.n = n
        self.bad = 0

    async def __aenter__(self) -> Reader:
        from cnisup.workers.export import connect

        async def quiet(exc: Exception) -> None:  # nats-py prints a traceback per error otherwise
            pass

        try:
            self.nc = await connect.connect(self.n, name="cnisup fleet", inbox_prefix="_INBOX", error_cb=quiet)
        except connect.Refused as exc:
            raise StreamError(str(exc)) from None
        except Exception as exc:
            raise StreamError(f"cannot reach NATS at {', '.join(self.n.servers)}: {type(exc).__name__}: "
                              f"{str(exc)[:200]}") from None
        self.js = self.nc.jetstream(timeout=REQUEST_TIMEOUT_S)
        return self

    async def __aexit__(self, *exc: object) -> None:
        import asyncio

        try:
            await asyncio.wait_for(self.nc.close(), 2.0)
        except Exception:  # a broken connection is gone either way
            pass

    def _config(self, since_ns: int | None, *, new: bool = False) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        if since_ns is not None:
            start = datetime.datetime.fromtimestamp(since_ns / 1e9, tz=datetime.UTC)
            return ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_TIME,
                                  opt_start_time=start, inactive_threshold=30.0)
        return ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30.0,
                              deliver_policy=DeliverPolicy.NEW if new else DeliverPolicy.ALL)

    def _take(self, subject: str, data: bytes, seq: int | None) -> tuple[dict[str, Any], str] | None:
        try:
            return parse(self.n.subject_prefix, subject, data)
        except envelope.ProtocolError as exc:
            self.bad += 1
            click.echo(f"! skipped message {seq} on {subject[:120]}: {str(exc)[:200]}", err=True)
            return None

    async def _leader_last_seq(self) -> int:
        """The last sequence the stream's leader holds. A member that restarted and has not heard
        from the leader yet answers stream info too, with its own (older) state and no leader named:
        only the leader's answer is taken (a server outside a cluster names none)."""
        import asyncio

        for _ in range(int(REQUEST_TIMEOUT_S / 0.1)):
            si = await self.js.stream_info(self.n.stream)
            if si.cluster is None or si.cluster.leader:
                return si.state.last_seq
            await asyncio.sleep(0.1)
        raise StreamError(f"stream {self.n.stream!r}: no leader answered within {REQUEST_TIMEOUT_S:g} s")

    async def _leader_has(self, subject: str, after: int, end: int) -> bool:
        """Whether the stream's leader (the only server that answers this) holds a message on
        ``subject`` with a sequence in ``after + 1 .. end``."""
        import nats.js.errors

        if after >= end:
            return False
        try:
            m = await self.js.get_msg(self.n.stream, seq=after + 1, subject=subject, next=True)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == NO_MESSAGE:
                return False
            raise
        return m.seq is not None and m.seq <= end

    async def history(self, subject: str, since_ns: int | None) -> AsyncIterator[tuple[dict[str, Any], str]]:
        """Every message on ``subject`` (from ``since_ns``), in stream order, to the end the stream's
        leader holds now.

        The consumer is R1 on any replica of the stream and counts and delivers from that server's
        store. A member that restarted may still be catching up: its "nothing pending" ends
        the read early. So the end is the leader's, and when the consumer says nothing is pending
        before it, the leader is asked whether a message on the subject lies between: if one does,
        the read waits for the server to catch up (a note on stderr), and fails rather than print a
        history with a hole if it delivers nothing for ``CATCH_UP_S``."""
        import asyncio

        import nats.errors
        import nats.js.errors

        try:
            end = await self._leader_last_seq()
            sub = await self.js.pull_subscribe(subject, stream=self.n.stream, config=self._config(since_ns))
            ci = await sub.consumer_info()
        except nats.js.errors.NotFoundError:
            raise StreamError(f"export.nats.stream: no stream {self.n.stream!r} on the server") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise StreamError(f"stream {self.n.stream!r}: {type(exc).__name__}: {str(exc)[:200]}") from None
        pending = ci.num_pending
        at = ci.delivered.stream_seq if ci.delivered else 0  # the last sequence the consumer passed
        noted, stalled_since = False, None  # the server is behind; since when it delivered nothing
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not pending:
                    try:
                        behind = await self._leader_has(subject, at, end)
                    except (nats.errors.Error, TimeoutError) as exc:
                        raise StreamError(f"stream {self.n.stream!r}: {type(exc).__name__}: {str(exc)[:200]}"
                                          ) from None
                    if not behind:
                        return
                    if not noted:
                        noted = True
                        click.echo(f"cnisup: the server serving this read is behind the leader of stream "
                                   f"{self.n.stream!r} (a member catching up?): waiting for it", err=True)
                    stalled_since = stalled_since or loop.time()
                    if loop.time() - stalled_since > CATCH_UP_S:
                        raise StreamError(f"stream {self.n.stream!r}: the server serving this read holds less "
                                          f"than the stream's leader (read up to sequence {at} of {end}) and "
                                          f"delivered nothing more for {CATCH_UP_S:g} s; try again")
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=REQUEST_TIMEOUT_S if pending else CATCH_UP_POLL_S)
                except (nats.errors.TimeoutError, TimeoutError):
                    if not pending:
                        continue  # still catching up: ask the leader again
                    raise StreamError(f"stream {self.n.stream!r}: no messages within {REQUEST_TIMEOUT_S:g} s"
                                      ) from None
                stalled_since = None
                for m in msgs:
                    meta = m.metadata
                    pending = meta.num_pending
                    seq = meta.sequence.stream if meta.sequence else None
                    at = seq if seq is not None else at
                    got = self._take(m.subject, m.data, seq)
                    if got is not None:
                        yield got
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the ephemeral consumer expires on its own (inactive_threshold)
                pass

    async def follow(self, subject: str, since_ns: int | None,
                     timeout_s: float | None) -> AsyncIterator[tuple[dict[str, Any], str]]:
        """New messages (or from ``since_ns``) as they come; ends after ``timeout_s`` without one."""
        import nats.errors

        try:
            sub = await self.js.subscribe(subject, stream=self.n.stream, ordered_consumer=True,
                                          config=self._config(since_ns, new=since_ns is None))
        except nats.errors.Error as exc:
            raise StreamError(f"stream {self.n.stream!r}: {type(exc).__name__}: {str(exc)[:200]}") from None
        try:
            while True:
                try:
                    m = await sub.next_msg(timeout=timeout_s if timeout_s else 3600.0)
                except nats.errors.TimeoutError:
                    if timeout_s:
                        return
                    continue
                got = self._take(m.subject, m.data, None)
                if got is not None:
                    yield got
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass


def _run(coro: Any) -> Any:
    import asyncio  # here: every other command starts faster without it

    try:
        return asyncio.run(coro)
    except StreamError as exc:
        click.echo(f"cnisup: {exc}", err=True)
        sys.exit(EX_NO_STREAM)
    except KeyboardInterrupt:
        return None


def connection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed((
        click.option("--server", "servers", multiple=True, metavar="URL",
                     help="NATS server (repeatable); default: export.nats.servers."),
        click.option("--creds", type=click.Path(exists=True, dir_okay=False),
                     help="Credentials file instead of the configuration's authentication."),
        click.option("--stream", help="Stream name; default: export.nats.stream."),
        click.option("--node", help="Only this node's events."),
    )):
        f = option(f)
    return f


async def _node_events(r: Reader, prefix: str, node: str | None, kinds: tuple[str, ...],
                       since: int | None) -> AsyncIterator[tuple[dict[str, Any], str]]:
    async for got in r.history(subject_filter(prefix, node, kinds), since):
        yield got


async def find_pod_nodes(r: Reader, namespace: str, name: str, since: int | None) -> dict[str, int]:
    """Nodes that saw the pod (its CNI runs, its IPs), with the time each saw it last."""
    from cnisup.workers.journal.schema import keys

    seen: dict[str, int] = {}
    for kind in POD_KINDS:
        async for env, _ in _node_events(r, r.n.subject_prefix, None, (kind,), since):
            k = keys(env)
            if (k.pod_ns, k.pod_name) != (namespace, name):
                continue
            # The API server says where a pod runs (a cluster-scoped node reports every pod).
            node = env["data"].get("node") if env["kind"].startswith("k8s.pod.") else env["node"]
            if isinstance(node, str) and node:
                seen[node] = max(seen.get(node, 0), env["ts"])
    return seen


def fleet_group(load: answers.Load, config_options: answers.Decorator) -> click.Group:
    @click.group("fleet")
    def fleet() -> None:
        """Every node's events, from the NATS JetStream stream the export family fills."""

    @fleet.command("history")
    @config_options
    @connection_options
    @click.option("--since", type=answers.TIME, help="From this time: RFC 3339, 03:12 (today) or -10m.")
    @click.option("--until", type=answers.TIME, help="Up to this time (same forms).")
    @answers.filter_options
    @click.option("--ip", type=answers.IP, help="Events that carry this IP address.")
    @click.option("--path", metavar="FILE", help="Events about this file (a CNI config or plugin binary).")
    @click.option("-o", "--output", type=click.Choice(["compact", "long", "json"]), default="compact",
                  show_default=True, help="json: the envelopes exactly as published, one per line.")
    @click.option("--limit", type=click.IntRange(min=1), help="Only the newest N matching events.")
    def history(config_path: str | None, preset: str | None, servers: tuple[str, ...], creds: str | None,
                stream: str | None, node: str | None, since: int | None, until: int | None,
                kinds: tuple[str, ...], pod: tuple[str, str] | None, namespace: str | None,
                container: str | None, failed: bool, ip: str | None, path: str | None, output: str,
                limit: int | None) -> None:
        """Events of every node (or --node), in stream order."""
        n = _settings(load(config_path, preset), servers, creds, stream)
        match = Match(Filters(since_ns=since, until_ns=until, kinds=kinds, pod=pod, namespace=namespace,
                              container=container, ip=ip, path=path, failed=failed))
        out = render.Printer(output)

        async def run() -> None:
            kept: collections.deque[tuple[dict[str, Any], str]] = collections.deque(maxlen=limit)
            async with Reader(n) as r:
                async for env, text in _node_events(r, n.subject_prefix, node, kinds, since):
                    if match(env):
                        kept.append((env, text))
                        if limit is None:
                            out(*kept.popleft())
            for env, text in kept:
                out(env, text)

        _run(run())

    @fleet.command("tail")
    @config_options
    @connection_options
    @answers.filter_options
    @click.option("-o", "--output", type=click.Choice(["long", "compact", "json"]), default="long",
                  show_default=True, help="compact: one line per finished CNI plugin run; json: one envelope per line.")
    @click.option("--json", "as_json", is_flag=True, help="Same as -o json.")
    @click.option("--since", type=answers.TIME, help="Start at this time in the stream, then go on live.")
    @click.option("--count", type=int, default=0, help="Exit after this many events (0: never).")
    @click.option("--timeout", type=float, default=0.0, help="Exit after this many seconds without events (0: never).")
    def tail(config_path: str | None, preset: str | None, servers: tuple[str, ...], creds: str | None,
             stream: str | None, node: str | None, kinds: tuple[str, ...], pod: tuple[str, str] | None,
             namespace: str | None, container: str | None, failed: bool, output: str, as_json: bool,
             since: int | None, count: int, timeout: float) -> None:
        """Follow every node's events (or --node's) as the stream receives them."""
        n = _settings(load(config_path, preset), servers, creds, stream)
        match = Match(Filters(kinds=kinds, pod=pod, namespace=namespace, container=container, failed=failed))
        out = render.Printer("json" if as_json else output)

        async def run() -> None:
            async with Reader(n) as r:
                subject = subject_filter(n.subject_prefix, node, kinds)
                async for env, text in r.follow(subject, since, timeout or None):
                    if match(env):
                        out(env, text)
                        if count and out.seen >= count:
                            return

        _run(run())

    @fleet.group("explain")
    def explain() -> None:
        """The network story of a pod, from the events of the node it ran on."""

    @explain.command("pod")
    @click.argument("pod", type=answers.POD)
    @click.option("--json", "as_json", is_flag=True, help="One JSON document (see docs/EXPLAIN.md), plus node.")
    @click.option("--since", type=answers.TIME, help="Only events from this time (a faster read of a busy stream).")
    @config_options
    @connection_options
    def explain_pod(pod: tuple[str, str], as_json: bool, since: int | None, config_path: str | None,
                    preset: str | None, servers: tuple[str, ...], creds: str | None, stream: str | None,
                    node: str | None) -> None:
        """NAMESPACE/NAME: finds its node in the stream and tells the same story as `cnisup explain pod`."""
        n = _settings(load(config_path, preset), servers, creds, stream)

        async def run() -> tuple[str | None, dict[str, int], dict[str, Any]]:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="cnisup-fleet-") as tmp:
                async with Reader(n) as r:
                    seen = {node: 0} if node else await find_pod_nodes(r, *pod, since)
                    where = max(seen, key=lambda k: seen[k]) if seen else None
                    path = Path(tmp) / "journal.db"
                    await load_journal(r, n.subject_prefix, where, since, path)
                with Journal([str(path)]) as journal:
                    return where, seen, explaining.explain_pod(journal, *pod).to_json()

        result = _run(run())
        if result is None:
            return
        where, seen, story = result
        others = sorted(set(seen) - {where})
        if as_json:
            click.echo(json.dumps({"node": where, "also_seen_on": others, **story}, indent=2, default=str))
            return
        color = render.use_color(sys.stdout)
        head = f"node {where}" if where else f"no node of stream {n.stream} saw pod {pod[0]}/{pod[1]}"
        click.echo(head + (f" (also seen on {', '.join(others)})" if others else ""))
        for line in render.story_lines(story, color=color):
            click.echo(line, color=color)

    return fleet


async def load_journal(r: Reader, prefix: str, node: str | None, since: int | None, path: Path) -> int:
    """One node's events into a journal file of the journal's own layout (empty without a node)."""
    from cnisup.workers.journal.store import Store

    store = Store(str(path), max_bytes=1 << 62, max_age_s=1e12)
    count = 0
    try:
        batch: list[tuple[dict[str, Any], str]] = []
        if node is not None:
            async for got in r.history(subjects.node_filter(prefix, node), since):
                batch.append(got)
                if len(batch) >= FETCH_BATCH:
                    count += store.write(batch)
                    batch = []
        count += store.write(batch)
    finally:
        store.close()
    return count
