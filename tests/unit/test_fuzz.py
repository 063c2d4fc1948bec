"""Fuzzing the parsers of what someone else sends: the control request parser
(any member of the socket's group), the status-message parser (workers are the
unprivileged, exposed half), the envelope decoder (what any process with the
workers' uid puts on the bus, read by the journal and the export's live path)
and the configuration loader (file, environment).
Structured inputs (JSON / YAML built from random values) and raw bytes; each
parser may refuse, but only with its own error, as one bounded line."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnisup.protocol import envelope
from cnisup.protocol.settings import ConfigError, field_docs
from cnisup.protocol.untrusted import MAX_ERROR, UntrustedInputError
from cnisup.supervisor import config, control
from cnisup.workers.spec import StatusError, parse_status

#: A few seconds per test on a 2-core machine: bytes are cheap, structures and config loads are not.
EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXAMPLE_CONFIG = (Path(__file__).resolve().parents[2] / "config_example.yaml").read_bytes()

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=30)
_KEYS = sorted({part for key in field_docs() for part in key.split(".")} | {"preset", "t", "cmd"})
#: Dicts whose keys are mostly real ones, so the fuzzer gets past "unknown key".
keyed = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), inner, max_size=6),
                     max_leaves=40)


def _one_line(exc: Exception) -> None:
    text = str(exc)
    assert "\n" not in text and len(text) <= MAX_ERROR, text[:500]


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """``seed`` with a random slice replaced by random bytes (byte-level fuzzing around a valid input)."""
    return st.tuples(st.integers(0, len(seed)), st.integers(0, 64), st.binary(max_size=64)).map(
        lambda t: seed[: t[0]] + t[2] + seed[t[0] + t[1]:])


# -- the control request parser -----------------------------------------------------------------

class _Sup:
    def status(self) -> dict[str, Any]:
        return {"supervisor": {}, "workers": []}

    def replay(self, incarnation: str, from_seq: int, to_seq: int) -> dict[str, Any]:
        return {"envelopes": [], "missing": list(range(from_seq, to_seq + 1))}

    def progress(self) -> list[dict[str, Any]]:
        return []


def _control(raw: bytes) -> None:
    reply = control.handle(_Sup(), raw)
    assert isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert "\n" not in reply["error"] and len(reply["error"]) <= MAX_ERROR
    json.dumps(reply)


@EXAMPLES
@given(st.binary(max_size=512) | _mutations(b'{"cmd": "status"}'))
def test_control_request_bytes(raw: bytes) -> None:
    _control(raw)


@FEWER
@given(json_values | st.fixed_dictionaries({"cmd": st.sampled_from(["status", "help"]) | st.text()},
                                           optional={"x": json_values}))
def test_control_request_structured(value: Any) -> None:
    _control(json.dumps(value).encode())


# -- the status-message parser -------------------------------------------------------------------

def _status(raw: bytes) -> None:
    try:
        msg = parse_status(raw)
    except StatusError as exc:
        _one_line(exc)
        return
    assert msg["t"] in ("ready", "hb", "exit")


@EXAMPLES
@given(st.binary(max_size=512) | _mutations(b'{"t":"hb","sent":1,"dropped":0,"rss":2,"info":{"a":[1]}}'))
def test_status_line_bytes(raw: bytes) -> None:
    _status(raw)


@FEWER
@given(json_values | st.fixed_dictionaries(
    {"t": st.sampled_from(["ready", "hb", "exit"]) | st.text(max_size=5)},
    optional={k: json_values for k in ("pid", "sent", "dropped", "rss", "info", "code", "reason")}))
def test_status_line_structured(value: Any) -> None:
    _status(json.dumps(value).encode())


# -- the configuration loader ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d) / "c.yaml"


def _load(path: Path, data: bytes, environ: dict[str, str] | None = None) -> None:
    path.write_bytes(data)
    try:
        config.load(path, environ=environ or {})
    except ConfigError as exc:
        _one_line(exc)


@EXAMPLES
@given(data=st.binary(max_size=1024) | _mutations(EXAMPLE_CONFIG))
def test_config_bytes(cfg_file: Path, data: bytes) -> None:
    _load(cfg_file, data)


@FEWER
@given(value=keyed, flow=st.booleans())
def test_config_structured(cfg_file: Path, value: Any, flow: bool) -> None:
    _load(cfg_file, yaml.safe_dump(value, default_flow_style=flow).encode())


@FEWER
@given(env=st.dictionaries(st.sampled_from(["LOG_LEVEL", "NODE_NAME", "KUBECONFIG"]),
                           st.binary(max_size=300).map(os.fsdecode)),
       preset=st.none() | st.text(max_size=20), level=st.none() | st.text(max_size=20))
def test_config_environment_and_flags(cfg_file: Path, env: dict[str, str], preset: str | None,
                                      level: str | None) -> None:
    cfg_file.write_bytes(b"node_name: n\n")
    try:
        config.load(cfg_file, preset=preset, log_level=level, environ=env)
    except ConfigError as exc:
        _one_line(exc)


# -- the envelope decoder (the bus) ---------------------------------------------------------------

_ENVELOPE = json.dumps(envelope.Stamp("file-poll", "node", "0" * 32).build(
    "monitor.warning", {"family": "config", "worker": "file-poll", "code": "x", "message": "y"})).encode()


@EXAMPLES
@given(st.lists(st.binary(max_size=64), max_size=3) | _mutations(_ENVELOPE).map(lambda b: [b"monitor.warning", b]))
def test_envelope_frames_bytes(frames: list[bytes]) -> None:
    try:
        env = envelope.decode(frames)
    except envelope.ProtocolError as exc:
        _one_line(exc)
        return
    assert isinstance(env["seq"], int) and env["kind"] == frames[0].decode()


@FEWER
@given(json_values)
def test_envelope_frames_structured(value: Any) -> None:
    try:
        envelope.decode([b"monitor.warning", json.dumps(value).encode()])
    except envelope.ProtocolError as exc:
        _one_line(exc)


def test_the_fuzzed_parsers_raise_their_own_errors() -> None:
    """What the fuzzers above rely on: a refusal is the parser's own exception type."""
    with pytest.raises(UntrustedInputError):
        control.parse_request(b"[" * 100_000)
    with pytest.raises(StatusError):
        parse_status(b"[]")


@pytest.mark.parametrize("brackets_in_strings", [0, 200])
def test_json_depth_is_bounded_exactly_whatever_brackets_the_strings_hold(brackets_in_strings: int) -> None:
    """load_json skips its depth walk when the text holds no more brackets than levels allowed;
    brackets inside strings only send it the long way, and the bound stays exact both ways."""
    from cnisup.protocol.untrusted import load_json

    def nested(levels: int) -> bytes:
        inner = json.dumps("[{" * brackets_in_strings)
        return ("[" * levels + inner + "]" * levels).encode()

    assert load_json(nested(8), what="x", max_bytes=1 << 20, max_depth=8) is not None
    with pytest.raises(UntrustedInputError, match="nested more than 8 levels deep"):
        load_json(nested(9), what="x", max_bytes=1 << 20, max_depth=8)
    with pytest.raises(UntrustedInputError, match="not UTF-8 at byte 1"):
        load_json(b'"\xff"', what="x", max_bytes=1 << 20, max_depth=8)
