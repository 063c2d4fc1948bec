"""The export's pure parts: the subject layout, the configuration it refuses,
and the parsers of what NATS sends (untrusted: fuzzed, never a crash)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from cnisup.protocol import envelope, subjects
from cnisup.protocol.settings import Config, ConfigError
from cnisup.supervisor import fleet
from cnisup.workers.export.engine import _Replies


def test_node_names_become_one_token_and_subjects_split_back() -> None:
    assert subjects.node_token("ip-10-0-0-1.ec2.internal") == "ip-10-0-0-1_ec2_internal"
    assert subjects.node_token("a b*c>d") == "a_b_c_d" and subjects.node_token("") == "_"
    subj = subjects.subject("cnisup", "node-a.example.com", "cni.plugin.finished")
    assert subj == "cnisup.node-a_example_com.cni.plugin.finished"
    assert subjects.split("cnisup", subj) == ("node-a_example_com", "cni.plugin.finished")
    assert subjects.split("cnisup", "other.node.kind.x") is None
    assert subjects.split("cnisup", "cnisup.node") is None


@pytest.mark.parametrize(("pattern", "subject", "hit"), [
    ("cnisup.>", "cnisup.a.b", True), ("cnisup.>", "cnisup", False), ("cnisup.*.cni.>", "cnisup.n.cni.x", True),
    ("cnisup.*.cni.>", "cnisup.n.k8s.x", False), ("a.*", "a.b.c", False), ("a.b", "a.b", True),
    ("a.>.c", "a.b.c", False),
])
def test_wildcards_match_as_nats_matches_them(pattern: str, subject: str, hit: bool) -> None:
    assert subjects.matches(pattern, subject) is hit


def test_the_server_filter_is_as_narrow_as_one_consumer_filter_can_be() -> None:
    assert fleet.subject_filter("cnisup", None, ()) == "cnisup.*.>"
    assert fleet.subject_filter("cnisup", "n.example", ("cni.plugin.",)) == "cnisup.n_example.cni.plugin.>"
    assert fleet.subject_filter("cnisup", None, ("cni.plugin.finished",)) == "cnisup.*.cni.plugin.finished"
    assert fleet.subject_filter("cnisup", None, ("cni.plugin",)) == "cnisup.*.cni.plugin.>"
    # prefixes are whole tokens (kinds.matches): a part of one matches nothing, as on the server
    assert fleet.subject_filter("cnisup", None, ("cni.plug",)) == "cnisup.*.cni.plug.>"
    # two of them: the server cannot filter, Match does
    assert fleet.subject_filter("cnisup", None, ("cni.", "k8s.")) == "cnisup.*.>"


def _export(nats: dict[str, Any], enabled: bool = True) -> dict[str, Any]:
    return {"export": {"enabled": enabled, "nats": nats}}


@pytest.mark.parametrize(("raw", "key"), [
    (_export({}), "export.nats.servers"),
    (_export({"servers": ["127.0.0.1:4222"]}), "export.nats.servers[0]"),
    (_export({"servers": ["nats://user:secret@h:4222"]}), "export.nats.servers[0]"),
    (_export({"servers": ["nats://h:1"], "credentials_file": "/c", "user_password_file": "/p"}),
     "export.nats.user_password_file"),
    (_export({"servers": ["nats://h:1"], "nkey_seed_file": "relative.nk"}), "export.nats.nkey_seed_file"),
    (_export({"servers": ["nats://h:1"], "tls": {"cert": "/c.pem"}}), "export.nats.tls.key"),
    (_export({"servers": ["nats://h:1"], "subject_prefix": "a.>"}), "export.nats.subject_prefix"),
    (_export({"servers": ["nats://h:1"], "stream": "a.b"}), "export.nats.stream"),
    (_export({"servers": ["nats://h:1"], "duplicate_window": "8d"}), "export.nats.duplicate_window"),
    ({**_export({"servers": ["nats://h:1"]}), "journal": {"enabled": False}}, "export.enabled"),
])
def test_a_configuration_that_cannot_work_is_refused_by_its_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        Config.from_dict(raw)
    assert err.value.key == key


def test_tls_is_required_by_any_tls_setting_or_url() -> None:
    assert not Config.from_dict(_export({"servers": ["nats://h:1"]})).export.nats.tls_required
    assert Config.from_dict(_export({"servers": ["tls://h:1"]})).export.nats.tls_required
    assert Config.from_dict(_export({"servers": ["nats://h:1"], "tls": {"ca": "/ca.pem"}})).export.nats.tls_required
    assert Config.from_dict({}).export.enabled is False  # nodes without NATS are not degraded


def _msg(subject: str, data: bytes, headers: dict[str, str] | None = None) -> Msg:
    return Msg(_client=None, subject=subject, data=data, headers=headers)  # type: ignore[arg-type]


def _reply(r: _Replies, number: int, data: bytes, headers: dict[str, str] | None = None) -> None:
    asyncio.run(r.take(_msg(f"_INBOX_n.abc.{number}", data, headers)))


def test_acks_errors_and_strangers_among_the_replies() -> None:
    r = _Replies("CNISUP")
    for _ in range(6):
        r.issue()
    _reply(r, 1, b'{"stream":"CNISUP","seq":7}')
    _reply(r, 2, b'{"stream":"CNISUP","seq":7,"duplicate":true}')
    _reply(r, 3, b'{"error":{"code":503,"err_code":10077,"description":"no leader"}}')
    _reply(r, 4, b"", {"Status": "503"})
    _reply(r, 5, b'{"stream":"OTHER","seq":1}')
    _reply(r, 6, b"[1, 2")
    _reply(r, 7, b'{"stream":"CNISUP","seq":8}')  # never issued: ignored
    asyncio.run(r.take(_msg("_INBOX_n.abc.\u00b9", b"{}")))  # a digit to str.isdigit(), not to int()
    assert r.settle(1) == (False, None) and r.settle(2) == (True, None)
    assert r.settle(3)[1] == "stream error 503 (10077): no leader"
    assert "no responders" in (r.settle(4)[1] or "")
    assert "not 'CNISUP'" in (r.settle(5)[1] or "") and "not JSON" in (r.settle(6)[1] or "")
    assert 7 not in r.got
    _reply(r, 2, b'{"stream":"CNISUP","seq":7}')  # already settled: ignored
    assert 2 not in r.got


@settings(max_examples=300, deadline=None)
@given(tail=st.text(max_size=25), data=st.binary(max_size=300),
       status=st.one_of(st.none(), st.text(max_size=5)))
def test_no_reply_crashes_the_publisher(tail: str, data: bytes, status: str | None) -> None:
    r = _Replies("CNISUP")
    r.issue()
    asyncio.run(r.take(_msg(f"_INBOX.x.{tail}", data, None if status is None else {"Status": status})))
    assert set(r.got) <= {1}
    if 1 in r.got:
        duplicate, error = r.got[1]
        assert isinstance(duplicate, bool) and (error is None or len(error) < 400)


@settings(max_examples=300, deadline=None)
@given(subject=st.text(max_size=60), data=st.binary(max_size=400))
def test_no_message_from_the_stream_crashes_a_fleet_reader(subject: str, data: bytes) -> None:
    try:
        env, text = fleet.parse("cnisup", subject, data)
    except envelope.ProtocolError:
        return
    assert env["kind"] == subject.split(".", 2)[2] and json.loads(text) == env


def test_a_stored_envelope_reads_back_as_itself() -> None:
    env = envelope.Stamp("inotify", "n", envelope.new_incarnation()).build("cni.config.deleted", {"path": "/x",
                                                                                                   "dir": "/"})
    text = json.dumps(env, separators=(",", ":"))
    assert fleet.parse("cnisup", "cnisup.n.cni.config.deleted", text.encode()) == (env, text)
    with pytest.raises(envelope.ProtocolError, match="differs from kind"):
        fleet.parse("cnisup", "cnisup.n.link.created", text.encode())
    with pytest.raises(envelope.ProtocolError, match="bytes"):
        fleet.parse("cnisup", "cnisup.n.cni.config.deleted", b" " * (fleet.MAX_MESSAGE_BYTES + 1))
