"""The journal's SQLite layout, shared by its writer (this family) and its
readers (``cnisup history``, ``explain``, ``tail --since``).

One row per event: the envelope exactly as published, plus the keys the
questions need, extracted once at write time (``keys``), and one row per IP
address an event carries. Indexes exist only for the queries that exist.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from cnisup.protocol.kinds import ConfigKind, KernelKind

#: Bumped when the layout changes; a reader refuses a file of another version.
VERSION = 1

#: Executed by the writer when it creates the file (auto_vacuum can only be set then).
CREATE = f"""
PRAGMA auto_vacuum = INCREMENTAL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('schema_version', '{VERSION}');
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,          -- insertion order: retention deletes the lowest
    ts INTEGER NOT NULL,             -- envelope ts, ns since the epoch
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    node TEXT NOT NULL,
    incarnation TEXT NOT NULL,
    seq INTEGER NOT NULL,
    pod_ns TEXT, pod_name TEXT, pod_uid TEXT,
    container_id TEXT, netns TEXT, run_id TEXT,
    path TEXT,
    failed INTEGER NOT NULL DEFAULT 0,
    envelope TEXT NOT NULL           -- exactly as published
);
CREATE UNIQUE INDEX IF NOT EXISTS events_incarnation_seq ON events (incarnation, seq);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_kind_ts ON events (kind, ts);
CREATE INDEX IF NOT EXISTS events_pod ON events (pod_ns, pod_name, ts) WHERE pod_name IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_container ON events (container_id, ts) WHERE container_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_run ON events (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_path ON events (path, ts) WHERE path IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_failed ON events (ts) WHERE failed = 1;
CREATE TABLE IF NOT EXISTS event_ips (event INTEGER NOT NULL, ip TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS event_ips_ip ON event_ips (ip, event);
CREATE INDEX IF NOT EXISTS event_ips_event ON event_ips (event);
-- the last seq recorded per incarnation: holes are seen across restarts of the journal
CREATE TABLE IF NOT EXISTS incarnations (
    incarnation TEXT PRIMARY KEY, source TEXT NOT NULL, last_seq INTEGER NOT NULL, last_ts INTEGER NOT NULL
);
"""

INSERT_EVENT = """
INSERT OR IGNORE INTO events (ts, kind, source, node, incarnation, seq, pod_ns, pod_name, pod_uid,
                              container_id, netns, run_id, path, failed, envelope)
VALUES (:ts, :kind, :source, :node, :incarnation, :seq, :pod_ns, :pod_name, :pod_uid,
        :container_id, :netns, :run_id, :path, :failed, :envelope)
"""
#: The IPs of an event just inserted, found by its (incarnation, seq); a duplicate event adds none.
INSERT_IP = """
INSERT INTO event_ips (event, ip)
SELECT id, ?3 FROM events WHERE incarnation = ?1 AND seq = ?2
  AND NOT EXISTS (SELECT 1 FROM event_ips WHERE event = events.id AND ip = ?3)
"""
UPSERT_INCARNATION = """
INSERT INTO incarnations (incarnation, source, last_seq, last_ts) VALUES (?, ?, ?, ?)
ON CONFLICT (incarnation) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq), last_ts = excluded.last_ts
"""


@dataclass
class Keys:
    """What a stored event is found by."""

    pod_ns: str | None = None
    pod_name: str | None = None
    pod_uid: str | None = None
    container_id: str | None = None
    netns: str | None = None
    run_id: str | None = None
    path: str | None = None
    failed: bool = False
    ips: set[str] = field(default_factory=set)


def normal_ip(text: Any) -> str | None:
    """``10.22.0.5/24`` or ``10.22.0.5`` -> ``10.22.0.5``; None if not an address."""
    if not isinstance(text, str):
        return None
    try:
        return str(ipaddress.ip_interface(text.strip()).ip)
    except ValueError:
        return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _plugin_keys(data: dict[str, Any], k: Keys) -> None:
    args = data.get("cni_args")
    if isinstance(args, dict):
        k.pod_ns, k.pod_name = _str(args.get("K8S_POD_NAMESPACE")), _str(args.get("K8S_POD_NAME"))
        k.pod_uid = _str(args.get("K8S_POD_UID"))
    k.container_id, k.netns = _str(data.get("container_id")), _str(data.get("netns"))
    k.run_id = _str(data.get("run_id"))
    result = data.get("result")
    if isinstance(result, dict) and isinstance(result.get("ips"), list):
        k.ips |= {ip for i in result["ips"] if isinstance(i, dict) and (ip := normal_ip(i.get("address")))}
    code = data.get("exit_code")
    k.failed = "error" in data or (isinstance(code, int) and code != 0)


def keys(env: dict[str, Any]) -> Keys:
    """The keys of one envelope (untrusted in shape: anything missing is None)."""
    kind, data = env.get("kind"), env.get("data")
    k = Keys()
    if not isinstance(data, dict):
        return k
    if kind in (KernelKind.PLUGIN_STARTED, KernelKind.PLUGIN_FINISHED):
        _plugin_keys(data, k)
    elif isinstance(kind, str) and kind.startswith(("link.", "addr.", "netns.")):
        k.run_id, k.container_id = _str(data.get("run_id")), _str(data.get("container_id"))
        k.netns = _str(data.get("netns"))
        if (ip := normal_ip(data.get("address"))) is not None:
            k.ips.add(ip)
    elif isinstance(kind, str) and kind.startswith("k8s.pod."):
        k.pod_ns, k.pod_name, k.pod_uid = _str(data.get("namespace")), _str(data.get("name")), _str(data.get("uid"))
        for key in ("ips", "previous_ips"):
            if isinstance(data.get(key), list):
                k.ips |= {ip for i in data[key] if (ip := normal_ip(i))}
        k.failed = data.get("type") == "Warning"
    elif kind in (ConfigKind.CONFIG_DISCOVERED, ConfigKind.CONFIG_CREATED, ConfigKind.CONFIG_MODIFIED,
                  ConfigKind.CONFIG_DELETED, ConfigKind.BINARY_DISCOVERED, ConfigKind.BINARY_CREATED,
                  ConfigKind.BINARY_MODIFIED, ConfigKind.BINARY_DELETED, ConfigKind.CONFIG_ACTIVE_CHANGED):
        k.path = _str(data.get("path"))
        k.failed = data.get("valid") is False
    return k


def row(env: dict[str, Any], text: str) -> tuple[dict[str, Any], set[str]]:
    """The ``events`` row of an envelope (``text``: the payload as published) and its IPs."""
    k = keys(env)
    return ({"ts": env["ts"], "kind": env["kind"], "source": env["source"], "node": env["node"],
             "incarnation": env["incarnation"], "seq": env["seq"], "pod_ns": k.pod_ns, "pod_name": k.pod_name,
             "pod_uid": k.pod_uid, "container_id": k.container_id, "netns": k.netns, "run_id": k.run_id,
             "path": k.path, "failed": int(k.failed), "envelope": text}, k.ips)


def envelope(text: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(text)
    return value
