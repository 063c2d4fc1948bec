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


def _env(inc: str, seq: int, kind: str = "cni.config.created", kseq: int | None = None) -> dict[str, Any]:
    out = {"source": "inotify", "incarnation": inc, "seq": seq, "kind": kind}
    if kseq is not None:
        out["kseq"] = kseq
    return out


def test_prefix_subscribers_count_per_kind() -> None:
    g = GapDetector(by_kind=True)
    assert g.observe(_env("a", 4, "cni.config.created", 1)) is None
    assert g.observe(_env("a", 9, "cni.config.created", 2)) is None  # seq skipped other kinds: not loss
    gap = g.observe(_env("a", 12, "cni.config.created", 5))
    assert gap is not None and (gap.kind, gap.expected, gap.got, gap.lost) == ("cni.config.created", 3, 5, 2)
    assert g.observe(_env("a", 13, "cni.config.deleted", 7)) is None  # first of its kind seen: joined late


def test_progress_reveals_loss_at_the_end_of_a_stream() -> None:
    g = GapDetector(grace_s=2.0)
    for seq in (1, 2, 3):
        g.observe(_env("a", seq))
    g.expect([{"incarnation": "a", "source": "inotify", "seq": 7, "kseq": {}},
              {"incarnation": "never-seen", "source": "x", "seq": 9, "kseq": {}}], now=100.0)
    assert g.overdue(101.0) == []  # still within the grace period
    g.observe(_env("a", 4))
    (gap,) = g.overdue(102.5)
    assert (gap.incarnation, gap.expected, gap.got, gap.lost) == ("a", 5, 8, 3)
    assert g.overdue(200.0) == []  # reported once; the never-seen incarnation is not our loss


def test_an_announced_incarnation_starts_at_one_and_a_seeded_one_goes_on() -> None:
    g = GapDetector()
    g.started("b")
    gap = g.observe(_env("b", 3))
    assert gap is not None and (gap.expected, gap.lost) == (1, 2)
    g.seed([{"incarnation": "c", "source": "inotify", "seq": 10, "kseq": {}}])
    assert g.observe(_env("c", 11)) is None
    gap = g.observe(_env("c", 14))
    assert gap is not None and gap.expected == 12


def test_envelopes_count_per_kind() -> None:
    st = envelope.Stamp("inotify", "n", envelope.new_incarnation())
    envs = [st.build(k, {}) for k in ("cni.config.created", "cni.config.deleted", "cni.config.created")]
    assert [(e["seq"], e["kseq"]) for e in envs] == [(1, 1), (2, 1), (3, 2)]
    assert st.kseqs == {"cni.config.created": 2, "cni.config.deleted": 1}


def test_the_validator_of_a_kind_gives_the_whole_schemas_verdict() -> None:
    """validation.validator(env) checks only the rules of env's kind: for every kind, a fitting, an
    empty and a mistyped data, and envelopes without a usable kind, the errors are the same."""
    import jsonschema

    whole = jsonschema.Draft202012Validator(validation.envelope_schema())
    st = envelope.Stamp("inotify", "n", envelope.new_incarnation())
    cases: list[Any] = [{"kind": 5}, {}, [], "x"]
    for kind in validation.known_kinds():
        env = st.build(kind, {})
        cases += [env, {**env, "data": {"path": 3, "address": [], "name": None}}, {**env, "seq": "1"}]
    cases.append(st.build("cni.config.deleted", {"path": "/x.conf", "dir": "/"}))

    def errors(v: Any, env: Any) -> list[tuple[str, str]]:
        return sorted((e.json_path, e.message) for e in v.iter_errors(env))

    assert any(errors(whole, env) for env in cases) and any(not errors(whole, env) for env in cases)
    for env in cases:
        assert errors(validation.validator(env), env) == errors(whole, env), env
