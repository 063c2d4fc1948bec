from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from cnisup.protocol import envelope, kinds, validation
from cnisup.protocol.subscriber import GapDetector

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "protocol" / "schema" / "envelope.schema.json"


def test_committed_schema_is_generated_from_the_catalogue() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == kinds.envelope_schema()
    jsonschema.Draft202012Validator.check_schema(kinds.envelope_schema())


def test_roundtrip_and_ids() -> None:
    st = envelope.Stamp("inotify", "node-1", envelope.new_incarnation())
    a = st.build("cni.config.deleted", {"path": "/x.conf", "dir": "/"})
    b = st.build("cni.config.deleted", {"path": "/y.conf", "dir": "/"})
    assert (a["seq"], b["seq"]) == (1, 2) and a["id"] != b["id"]
    frames = envelope.encode(a)
    assert frames[0] == b"cni.config.deleted"
    assert envelope.decode(frames) == a
    validation.validate(a)


@pytest.mark.parametrize("frames", [
    [b"a.b"],
    [b"a.b", b"not json"],
    [b"a.b", b"[1]"],
    [b"a.c", json.dumps({f: 1 for f in envelope.ENVELOPE_FIELDS} | {"kind": "a.b"}).encode()],
    [b"a.b", json.dumps({"kind": "a.b"}).encode()],
    [b"\xff", b"{}"],
])
def test_decode_rejects_garbage(frames: list[bytes]) -> None:
    with pytest.raises(envelope.ProtocolError):
        envelope.decode(frames)


def test_schema_rejects_wrong_data() -> None:
    st = envelope.Stamp("supervisor", "n", "i")
    bad = st.build("supervisor.worker.fallback", {"family": "config", "from": "inotify"})
    with pytest.raises(jsonschema.ValidationError):
        validation.validate(bad)
    with pytest.raises(envelope.ProtocolError):
        st.build("Not A Kind", {})


def test_gap_detector() -> None:
    g = GapDetector()
    def mk(inc: str, seq: int) -> dict[str, Any]:
        return {"source": "s", "incarnation": inc, "seq": seq}

    assert g.observe(mk("a", 5)) is None  # joined late: not a gap
    assert g.observe(mk("a", 6)) is None
    gap = g.observe(mk("a", 9))
    assert gap is not None and (gap.expected, gap.got, gap.lost) == (7, 9, 2)
    assert g.observe(mk("b", 1)) is None  # a new incarnation starts its own count


def test_every_kind_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    for kind in kinds.KINDS:
        assert f"| `{kind}` |" in doc, f"{kind} missing from docs/PROTOCOL.md"


def test_every_kind_is_a_family_constant_and_every_constant_is_described() -> None:
    constants = {k for enum in (kinds.SupervisorKind, kinds.MonitorKind, kinds.JournalKind, kinds.ExportKind,
                                kinds.ConfigKind,
                                kinds.KernelKind, kinds.K8sKind) for k in enum}
    assert set(kinds.KINDS) == constants
    assert all(envelope.valid_kind(k) for k in constants)


def test_a_misspelt_kind_does_not_validate() -> None:
    env = envelope.Stamp("ebpf", "n", envelope.new_incarnation()).build("cni.plugin.startd", {})
    with pytest.raises(jsonschema.ValidationError):
        validation.validate(env)
