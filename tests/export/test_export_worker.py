"""The nats export worker, run exactly as the supervisor runs it (the harness),
against a real ``nats-server -js`` on loopback, reading real journal files:
exactly once, resumption from the cursor, SIGKILLs, trimmed events, a server
that is away, and every configuration it must refuse by name."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import natsserver
import pytest
from e2e.support import worker_user
from harness import WorkerRun
from support import Dest, check_exactly_once, envelopes, read_stream, write_journal

from cnisup.protocol import exitcodes, subjects
from cnisup.protocol.kinds import ExportKind

NODE = "node-a.example.com"  # dots: an FQDN node name becomes one subject token


def config(tmp: Path, dest: Dest, servers: list[str], **nats: Any) -> dict[str, Any]:
    (tmp / "run" / "journal").mkdir(parents=True, exist_ok=True)  # the runtime-dir journal's directory
    return {"node_name": NODE, "runtime_dir": str(tmp / "run"), "journal": {"path": str(tmp / "journal.db")},
            "export": {"enabled": True, "nats": dest.nats(servers, **nats)}}


def info(run: WorkerRun, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 20.0) -> dict[str, Any]:
    """The first heartbeat whose ``info`` satisfies ``pred``."""
    seen = len(run.status)
    hb = run.wait_status(lambda s: s["t"] == "hb" and "state" in s["info"] and pred(s["info"]), timeout_s=timeout_s)
    assert len(run.status) >= seen
    got: dict[str, Any] = hb["info"]
    return got


def last_info(run: WorkerRun) -> dict[str, Any]:
    return next(s["info"] for _, s in reversed(run.status) if s["t"] == "hb" and "state" in s["info"])


def test_exports_every_event_once_unchanged_and_follows_new_ones(
        start_worker: Callable[..., WorkerRun], world_tmp: Path, nats_single: natsserver.Server, dest: Dest) -> None:
    sent = envelopes(NODE, 3000)
    write_journal(world_tmp / "journal.db", sent)
    run = start_worker("nats", config(world_tmp, dest, [nats_single.url]))
    info(run, lambda i: i["acked"] == 3000 and i["behind"] == 0)
    # New events: the journal's commit wakes the worker (inotify), no polling interval.
    more = envelopes(NODE, 200)
    t0 = time.monotonic()
    write_journal(world_tmp / "journal.db", more)
    i = info(run, lambda i: i["acked"] == 3200, timeout_s=5)
    assert time.monotonic() - t0 < 2.0
    assert i["duplicates"] == 0 and i["trimmed_total"] == 0 and i["state"] == "connected"
    assert i["subjects"] == f"{dest.prefix}.node-a_example_com.>"
    stored = read_stream([nats_single.url], dest.stream)
    check_exactly_once(stored, sent + more)
    assert {s.subject for s in stored} == {subjects.subject(dest.prefix, NODE, "cni.config.modified")}
    cursor = sqlite3.connect(f"{world_tmp}/journal.db.export")
    assert cursor.execute("SELECT stream, last_id FROM cursor").fetchall() == [(dest.stream, 3200)]


def test_a_restart_resumes_from_the_cursor_without_sending_again(
        start_worker: Callable[..., WorkerRun], world_tmp: Path, nats_single: natsserver.Server, dest: Dest) -> None:
    sent = envelopes(NODE, 500)
    write_journal(world_tmp / "journal.db", sent)
    cfg = config(world_tmp, dest, [nats_single.url])
    first = start_worker("nats", cfg)
    info(first, lambda i: i["acked"] == 500)
    assert first.stop() == 0
    more = envelopes(NODE, 50)
    write_journal(world_tmp / "journal.db", more)
    second = start_worker("nats", cfg)
    i = info(second, lambda i: i["acked"] == 50 and i["behind"] == 0)
    assert i["published"] == 50 and i["duplicates"] == 0  # nothing before the cursor went out again
    check_exactly_once(read_stream([nats_single.url], dest.stream), sent + more)


def test_sigkill_mid_batch_again_and_again_loses_nothing_and_the_server_drops_the_resends(
        start_worker: Callable[..., WorkerRun], world_tmp: Path, nats_single: natsserver.Server, dest: Dest) -> None:
    sent = envelopes(NODE, 20_000)
    write_journal(world_tmp / "journal.db", sent)
    # The cursor is saved every 2 s at most: a kill always loses some progress, so the next run resends.
    cfg = config(world_tmp, dest, [nats_single.url], commit_interval=2.0, max_in_flight=64)
    duplicates, kills = 0, 0
    while True:
        run = start_worker("nats", cfg)
        if kills == 5:
            break
        i = info(run, lambda i: i["acked"] > 0)  # mid-batch: acks flowing, a window in flight
        time.sleep(0.3)
        os.kill(run.pid, signal.SIGKILL)
        assert run.wait_exit() == -signal.SIGKILL
        duplicates += last_info(run)["duplicates"]
        kills += 1
    i = info(run, lambda i: i["behind"] == 0, timeout_s=60)
    duplicates += i["duplicates"]
    stored = read_stream([nats_single.url], dest.stream)
    check_exactly_once(stored, sent)
    assert len(stored) == 20_000
    assert duplicates > 0, "every kill lost cursor progress: the resends must have been acked as duplicates"
    print(f"{kills} SIGKILLs: {duplicates} resent events dropped by the server as duplicates, 0 stored twice")


def test_events_trimmed_before_they_were_sent_are_reported_once_with_an_exact_count(
        start_worker: Callable[..., WorkerRun], world_tmp: Path, nats_single: natsserver.Server, dest: Dest) -> None:
    journal = world_tmp / "journal.db"
    sent = envelopes(NODE, 100)
    write_journal(journal, sent)
    cfg = config(world_tmp, dest, [nats_single.url])
    run = start_worker("nats", cfg)
    info(run, lambda i: i["acked"] == 100)
    assert run.stop() == 0
    later = envelopes(NODE, 1000)  # ids 101..1100, while the export is stopped
    write_journal(journal, later)
    db = sqlite3.connect(journal)  # what retention does: the lowest ids go
    db.execute("DELETE FROM events WHERE id <= 600")
    db.commit()
    db.close()
    run = start_worker("nats", cfg)
    trimmed = run.wait_for(ExportKind.TRIMMED, timeout_s=10)
    assert trimmed.data == {"count": 500, "from_id": 101, "to_id": 600, "journal": str(journal),
                            "stream": dest.stream}
    i = info(run, lambda i: i["acked"] == 500 and i["behind"] == 0)
    assert i["trimmed_total"] == 500 and "500 trimmed unsent" in i["summary"]
    check_exactly_once(read_stream([nats_single.url], dest.stream), sent + later[500:])
    assert run.stop() == 0
    again = start_worker("nats", cfg)
    assert info(again, lambda i: i["state"] == "connected")["trimmed_total"] == 500
    assert not again.events(ExportKind.TRIMMED), "a gap is reported once, not at every start"


def test_without_nats_it_keeps_running_reports_its_lag_and_catches_up_in_order(
        start_worker: Callable[..., WorkerRun], world_tmp: Path, dest: Dest) -> None:
    if not natsserver.available():
        pytest.skip("nats-server is not installed")
    server = natsserver.Server("late", world_tmp / "late")  # its port is chosen; nothing listens yet
    sent = envelopes(NODE, 2000)
    write_journal(world_tmp / "journal.db", sent)
    run = start_worker("nats", config(world_tmp, dest, [server.url]))
    try:
        i = info(run, lambda i: i["state"] == "retrying" and i["errors"] >= 2)
        assert i["behind"] == 2000 and i["oldest_unsent_age_s"] > 0 and "connect" in (i["last_error"] or "").lower()
        info(run, lambda later: later["oldest_unsent_age_s"] >= i["oldest_unsent_age_s"] + 0.5, timeout_s=3)
        assert run.proc is not None and run.proc.poll() is None
        server.start().wait_ready()
        info(run, lambda i: i["behind"] == 0 and i["state"] == "connected", timeout_s=20)
        check_exactly_once(read_stream([server.url], dest.stream), sent)
    finally:
        server.kill()



def test_a_stream_that_refuses_gets_one_probe_per_retry_not_a_window_then_everything_in_order(
        start_worker: Callable[..., WorkerRun], world_tmp: Path, nats_single: natsserver.Server, dest: Dest) -> None:
    """A full stream that discards new messages refuses each publish, as a stream without a leader
    does after a restart: every retry sends one event first, not a window (a fleet whose servers
    restarted would otherwise flood them while they elect leaders). Counted by the server."""
    from nats.js.api import DiscardPolicy, StreamConfig

    async def stream(max_msgs: int, create: bool) -> None:
        nc = await nats.connect([nats_single.url])
        try:
            js = nc.jetstream()
            cfg = StreamConfig(name=dest.stream, subjects=[f"{dest.prefix}.>"], max_msgs=max_msgs,
                               discard=DiscardPolicy.NEW)
            await (js.add_stream(cfg) if create else js.update_stream(cfg))
        finally:
            await nc.close()

    def in_msgs() -> int:
        return int(natsserver.http_json(nats_single.http_port, "/varz")[1]["in_msgs"])

    asyncio.run(stream(100, create=True))
    sent = envelopes(NODE, 500)
    write_journal(world_tmp / "journal.db", sent)
    run = start_worker("nats", config(world_tmp, dest, [nats_single.url]))
    first = info(run, lambda i: i["errors"] >= 2 and "maximum messages" in (i["last_error"] or ""))
    before = in_msgs()
    later = info(run, lambda i: i["errors"] >= first["errors"] + 4, timeout_s=30)
    # per retry: its one event, and every third a new connection's stream lookup; a window is 400 here
    retries = later["errors"] - first["errors"] + 2  # a retry may fall between a status and a count
    assert in_msgs() - before <= 2 * retries, (in_msgs() - before, retries)
    assert later["acked"] == 100 and later["behind"] == 400
    asyncio.run(stream(-1, create=False))
    info(run, lambda i: i["behind"] == 0 and i["state"] == "connected", timeout_s=20)
    check_exactly_once(read_stream([nats_single.url], dest.stream), sent)


# -- refusals: a clear error naming the key, exit 78 (the supervisor marks the family failed) ------------

def refused(run: WorkerRun) -> str:
    assert run.wait_exit(15) == exitcodes.EX_CONFIG, run.stderr()
    exit_status = run.exit_status()
    assert exit_status is not None
    reason: str = exit_status["reason"]
    assert "\n" not in reason
    return reason


def test_a_missing_stream_with_create_stream_false_is_refused_by_name(
        start_worker: Callable[..., WorkerRun], world_tmp: Path, nats_single: natsserver.Server, dest: Dest) -> None:
    write_journal(world_tmp / "journal.db", envelopes(NODE, 3))
    run = start_worker("nats", config(world_tmp, dest, [nats_single.url], create_stream=False))
    assert refused(run) == f"export.nats.stream: stream {dest.stream!r} does not exist (create_stream: false)"


@pytest.fixture(scope="module")
def auth_server(nats_dir: Path) -> Any:
    """A server with users: node-a may publish to its own subjects only (docs/FLEET.md)."""
    if not natsserver.available():
        pytest.skip("nats-server is not installed")
    conf = """
authorization {
  users = [
    { user: "node-a", password: "right", permissions: {
        publish: { allow: ["ta.node-a_example_com.>", "$JS.API.STREAM.INFO.TA", "$JS.API.STREAM.CREATE.TA"] }
        subscribe: { allow: ["_INBOX_node-a_example_com.>"] } } }
    { user: "node-b", password: "right", permissions: {
        publish: { allow: ["ta.node-b.>", "$JS.API.STREAM.INFO.TA", "$JS.API.STREAM.CREATE.TA"] }
        subscribe: { allow: ["_INBOX_node-a_example_com.>"] } } }
  ]
}
"""
    server = natsserver.single(nats_dir / "auth", extra_conf=conf)
    yield server
    server.kill()


def secret(tmp: Path, text: str) -> str:
    """A secret file as an operator makes it: readable by the workers' user only."""
    path = tmp / "nats.pass"
    path.write_text(text)
    path.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(path, worker_user().pw_uid, -1)
    return str(path)


def test_wrong_credentials_are_refused_by_name_and_right_ones_export(
        start_worker: Callable[..., WorkerRun], world_tmp: Path, auth_server: natsserver.Server) -> None:
    write_journal(world_tmp / "journal.db", envelopes(NODE, 10))
    dest = Dest("TA", "ta")
    wrong = start_worker("nats", config(world_tmp, dest, [auth_server.url],
                                        user_password_file=secret(world_tmp, "node-a:wrong\n")))
    assert refused(wrong) == ("export.nats.user_password_file: the server refused these credentials "
                              "(Authorization Violation)")
    none = start_worker("nats", config(world_tmp, dest, [auth_server.url]))
    assert refused(none).startswith("export.nats: the server requires authentication")
    right = start_worker("nats", config(world_tmp, dest, [auth_server.url],
                                        user_password_file=secret(world_tmp, "node-a:right\n")))
    info(right, lambda i: i["acked"] == 10)


def test_credentials_that_may_not_publish_to_our_subjects_are_refused(
        start_worker: Callable[..., WorkerRun], world_tmp: Path, auth_server: natsserver.Server) -> None:
    """node-b's credentials on node-a: the server refuses the publishes asynchronously (only nats-py's
    error callback hears it); the worker must not retry that forever."""
    write_journal(world_tmp / "journal.db", envelopes(NODE, 10))
    nats_cfg = config(world_tmp, Dest("TA", "ta"), [auth_server.url],
                      user_password_file=secret(world_tmp, "node-b:right\n"))
    reason = refused(start_worker("nats", nats_cfg))
    assert reason.startswith("export.nats.user_password_file: these credentials are not allowed to do this"), reason
    assert "permissions violation" in reason


@pytest.fixture(scope="module")
def certs(nats_dir: Path) -> dict[str, Path]:
    """A CA with a server certificate for 127.0.0.1, and another CA that signed nothing of it."""
    d = nats_dir / "certs"
    d.mkdir()

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    for ca in ("ca", "other-ca"):
        ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=server", "-keyout", "server.key", "-out", "server.csr")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "server.ext", "-out", "server.pem")
    for f in d.iterdir():
        f.chmod(0o644)
    return {name: d / name for name in ("ca.pem", "other-ca.pem", "server.pem", "server.key")}


def test_tls_that_would_downgrade_or_does_not_verify_is_refused_and_tls_that_matches_exports(
        start_worker: Callable[..., WorkerRun], world_tmp: Path, nats_single: natsserver.Server, nats_dir: Path,
        certs: dict[str, Path], dest: Dest) -> None:
    write_journal(world_tmp / "journal.db", envelopes(NODE, 10))
    # TLS configured, the server speaks plaintext: nats-py would connect in clear; we refuse.
    plain = start_worker("nats", config(world_tmp, dest, [nats_single.url], tls={"ca": str(certs["ca.pem"])}))
    assert refused(plain) == f"export.nats.tls: {nats_single.url} does not offer TLS; refusing to connect in plaintext"
    tls_url = nats_single.url.replace("nats://", "tls://")
    assert refused(start_worker("nats", config(world_tmp, dest, [tls_url]))).startswith("export.nats.servers: ")
    server = natsserver.single(nats_dir / "tls", extra_conf=(
        f'tls {{ cert_file: "{certs["server.pem"]}", key_file: "{certs["server.key"]}", timeout: 2 }}'))
    try:
        wrong_ca = start_worker("nats", config(world_tmp, dest, [server.url], tls={"ca": str(certs["other-ca.pem"])}))
        assert refused(wrong_ca).startswith("export.nats.tls.ca: the server's certificate does not verify: ")
        good = start_worker("nats", config(world_tmp, dest, [server.url.replace("nats://", "tls://")],
                                           tls={"ca": str(certs["ca.pem"])}))
        info(good, lambda i: i["acked"] == 10)
    finally:
        server.kill()


def test_an_nkey_seed_file_authenticates(start_worker: Callable[..., WorkerRun], world_tmp: Path,
                                          nats_dir: Path, dest: Dest) -> None:
    if not natsserver.available():
        pytest.skip("nats-server is not installed")
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = world_tmp / "node.nk"
    seed_file.write_bytes(seed)
    server = natsserver.single(nats_dir / "nkey", extra_conf=f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}')
    try:
        write_journal(world_tmp / "journal.db", envelopes(NODE, 5))
        run = start_worker("nats", config(world_tmp, dest, [server.url], nkey_seed_file=str(seed_file)))
        info(run, lambda i: i["acked"] == 5)
    finally:
        server.kill()


def test_a_server_reply_that_is_not_an_ack_never_crashes_the_worker() -> None:
    """Untrusted: what a server sends first is read with a bound and parsed defensively."""
    from cnisup.workers.export.connect import MAX_INFO_BYTES, server_info

    async def serve(payload: bytes) -> dict[str, Any] | None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(payload)
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            return await server_info(f"nats://127.0.0.1:{port}", 2.0)
        finally:
            srv.close()

    for garbage in (b"INFO {not json\r\n", b"HELLO\r\n", b"INFO []\r\n", b"INFO " + b"x" * MAX_INFO_BYTES + b"\n",
                    b"", b"\xff\xfe\r\n"):
        assert asyncio.run(serve(garbage)) is None
    assert asyncio.run(serve(b'INFO {"tls_required": true}\r\n')) == {"tls_required": True}
