"""The catalogue of event kinds and the JSON Schema of each kind's ``data``.

Every kind is a constant of its family's enum below, defined once; workers
and the supervisor publish these constants, never string literals. This is
the source of ``schema/envelope.schema.json``; regenerate it with
``python -m cnisup.protocol.kinds > protocol/schema/envelope.schema.json``
(a test fails when the two differ). Fields not listed as required may be
absent; extra fields may be added without bumping the envelope version.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import Any

from cnisup.protocol.envelope import SOURCES, VERSION


class SupervisorKind(StrEnum):
    """The supervisor's own lifecycle events (``source: supervisor``)."""

    STARTED = "supervisor.started"
    READY = "supervisor.ready"
    STOPPING = "supervisor.stopping"
    STOPPED = "supervisor.stopped"
    WORKER_STARTED = "supervisor.worker.started"
    WORKER_READY = "supervisor.worker.ready"
    WORKER_EXITED = "supervisor.worker.exited"
    WORKER_RESTARTING = "supervisor.worker.restarting"
    WORKER_FALLBACK = "supervisor.worker.fallback"
    WORKER_RESTORED = "supervisor.worker.restored"
    WORKER_SWITCHED = "supervisor.worker.switched"
    WORKER_FAILED = "supervisor.worker.failed"
    WORKER_UNRESPONSIVE = "supervisor.worker.unresponsive"
    LOSS = "supervisor.loss"
    PROGRESS = "supervisor.progress"
    CONFIG_RELOADED = "supervisor.config.reloaded"
    CONFIG_RELOAD_FAILED = "supervisor.config.reload_failed"


class MonitorKind(StrEnum):
    """What any worker may say about itself."""

    WARNING = "monitor.warning"


class JournalKind(StrEnum):
    """The journal family (journal, journal-runtime)."""

    LOSS = "journal.loss"


class ExportKind(StrEnum):
    """The export family (nats)."""

    TRIMMED = "export.trimmed"


class ConfigKind(StrEnum):
    """The config family (inotify, file-poll)."""

    CONFIG_DISCOVERED = "cni.config.discovered"
    CONFIG_CREATED = "cni.config.created"
    CONFIG_MODIFIED = "cni.config.modified"
    CONFIG_DELETED = "cni.config.deleted"
    CONFIG_ACTIVE_CHANGED = "cni.config.active_changed"
    BINARY_DISCOVERED = "cni.plugin_binary.discovered"
    BINARY_CREATED = "cni.plugin_binary.created"
    BINARY_MODIFIED = "cni.plugin_binary.modified"
    BINARY_DELETED = "cni.plugin_binary.deleted"


class KernelKind(StrEnum):
    """The kernel family (ebpf, proc-poll)."""

    PLUGIN_STARTED = "cni.plugin.started"
    PLUGIN_FINISHED = "cni.plugin.finished"
    NETNS_CREATED = "netns.created"
    NETNS_ENTERED = "netns.entered"
    NETNS_DELETED = "netns.deleted"
    LINK_CREATED = "link.created"
    LINK_DELETED = "link.deleted"
    LINK_CHANGED = "link.changed"
    LINK_MOVED = "link.moved"
    ADDR_ADDED = "addr.added"
    ADDR_DELETED = "addr.deleted"


class K8sKind(StrEnum):
    """The k8s family (k8s-informer, kubectl)."""

    POD_IP_ALLOCATED = "k8s.pod.ip_allocated"
    POD_IP_CHANGED = "k8s.pod.ip_changed"
    POD_IP_RELEASED = "k8s.pod.ip_released"
    POD_EVENT = "k8s.pod.event"
    SERVICE_ADDED = "k8s.service.added"
    SERVICE_MODIFIED = "k8s.service.modified"
    SERVICE_DELETED = "k8s.service.deleted"
    ENDPOINTSLICE_ADDED = "k8s.endpointslice.added"
    ENDPOINTSLICE_MODIFIED = "k8s.endpointslice.modified"
    ENDPOINTSLICE_DELETED = "k8s.endpointslice.deleted"
    NETWORKPOLICY_ADDED = "k8s.networkpolicy.added"
    NETWORKPOLICY_MODIFIED = "k8s.networkpolicy.modified"
    NETWORKPOLICY_DELETED = "k8s.networkpolicy.deleted"
    NODE_NETWORK_CHANGED = "k8s.node.network_changed"


S: dict[str, Any] = {"type": "string"}
INT: dict[str, Any] = {"type": "integer"}
N: dict[str, Any] = {"type": "number"}
B: dict[str, Any] = {"type": "boolean"}
NS: dict[str, Any] = {"type": ["string", "null"]}
NI: dict[str, Any] = {"type": ["integer", "null"]}
NN: dict[str, Any] = {"type": ["number", "null"]}
SHA: dict[str, Any] = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
STRS: dict[str, Any] = {"type": "array", "items": S}


def obj(required: list[str], props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


_W = {"family": S, "worker": NS}
_SWITCH = obj(["family", "from", "to", "reason"], {**_W, "from": S, "to": S, "reason": S})
_CFG = {"path": S, "dir": S, "size": INT, "mtime_ns": INT, "sha256": SHA, "valid": B, "error": S,
        "network": S, "cni_version": S, "plugins": STRS}
_BIN = {"path": S, "dir": S, "name": S, "size": INT, "mtime_ns": INT, "sha256": SHA, "executable": B,
        "error": S}

# Kernel family: a CNI run's identity, and what an event caused by a process says.
_RUN_REQ = ["run_id", "pid", "plugin", "path"]
_RUN = {"run_id": S, "pid": INT, "ppid": INT, "plugin": S, "path": S,
        "command": S, "container_id": S,
        "netns": S, "ifname": S, "cni_args": {"type": "object", "additionalProperties": S},
        "network": S, "cni_version": S, "type": S, "stdin_error": S, "parent_run": S,
        "truncated": STRS}
_BY = {"pid": INT, "comm": S, "run_id": S, "plugin": S, "container_id": S}
# netns and dump: where a change was confirmed (kernel.capture lean's listeners).
_LINK = {**_BY, "ifindex": INT, "name": S, "kind": S, "peer": S, "peer_netns": S, "peer_ifindex": INT,
         "target_netns": S, "master": INT, "master_name": S, "mtu": INT, "up": B, "mac": S, "truncated": B,
         "netns": S, "dump": B}
_ADDR = {**_BY, "address": S, "prefixlen": INT, "family": {"enum": ["inet", "inet6"]}, "ifindex": INT,
         "ifname": S, "label": S, "truncated": B, "netns": S, "dump": B}

# k8s family: slim projections of the objects (workers/k8s/events.py).
_CNI = {"cni_plugin": S, "cni_plugins": STRS}
_POD_REQ = ["namespace", "name", "uid", "node", "ips", "host_network"]
_POD = {"namespace": S, "name": S, "uid": S, "node": S, "ips": STRS, "host_network": B, **_CNI, "initial": B}
_POD_EVENT_REQ = ["namespace", "name", "uid", "reason", "message", "type", "count", "first_timestamp",
                  "last_timestamp", "component", "host", "event"]
_POD_EVENT = {**{k: S for k in _POD_EVENT_REQ}, "count": {"type": "integer", "minimum": 0}, "initial": B}
_PORT = obj(["protocol", "port"], {"name": S, "protocol": S, "port": INT,
                                   "target_port": {"type": ["integer", "string"]}, "node_port": INT})
_SVC_REQ = ["namespace", "name", "type", "cluster_ips", "external_ips", "load_balancer_ingress", "ports"]
_SVC = {"namespace": S, "name": S, "type": S, "cluster_ips": STRS, "external_ips": STRS,
        "load_balancer_ingress": STRS, "ports": {"type": "array", "items": _PORT}, "initial": B, "changed": STRS}
_EPS_REQ = ["namespace", "name", "service", "address_type", "endpoints"]
_EPS = {"namespace": S, "name": S, "service": S, "address_type": S, "api": S, "initial": B, "changed": STRS,
        "endpoints": {"type": "array", "items": obj(["addresses", "ready"],
                                                    {"addresses": STRS, "ready": B, "node": S})}}
_NP_REQ = ["namespace", "name", "pod_selector", "policy_types"]
_NP = {"namespace": S, "name": S, "pod_selector": {"type": "object"}, "policy_types": STRS,
       "ingress_rules": INT, "egress_rules": INT, "rules_sha256": S, "initial": B, "changed": STRS}
_NODE = {"name": S, "pod_cidrs": STRS, "addresses": {"type": "array", "items": obj(["type", "address"], {
             "type": S, "address": S})},
         "conditions": {"type": "object", "additionalProperties": S}, **_CNI,
         "changed": STRS, "initial": B, "deleted": B}

#: kind -> (one-line meaning, JSON Schema of data)
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    SupervisorKind.STARTED: ("the supervisor is up; its sockets are bound", obj(
        ["pid", "version", "endpoints"],
        {"pid": INT, "version": S, "config_path": NS, "preset": S, "endpoints": STRS})),
    SupervisorKind.READY: ("every enabled family's worker reported ready once (or ready_timeout passed)", obj(
        ["workers", "degraded"], {"workers": {"type": "object", "additionalProperties": S},
                                  "degraded": STRS, "fallback": STRS})),
    SupervisorKind.STOPPING: ("a stop was asked; workers get SIGTERM", obj(["reason"], {"reason": S})),
    SupervisorKind.STOPPED: ("last event of a supervisor incarnation", obj(["uptime_s"], {"uptime_s": N})),
    SupervisorKind.WORKER_STARTED: ("a worker process was started: a new incarnation begins", obj(
        ["family", "worker", "role", "pid", "incarnation", "reason", "restarts"],
        {**_W, "role": {"enum": ["primary", "fallback"]}, "pid": INT, "incarnation": S, "reason": S,
         "restarts": INT, "privileged": B})),
    SupervisorKind.WORKER_READY: ("the worker reached the bus; its events flow from now", obj(
        ["family", "worker", "pid", "incarnation"],
        {**_W, "pid": INT, "incarnation": S, "startup_s": N})),
    SupervisorKind.WORKER_EXITED: ("a worker process ended (any reason)", obj(
        ["family", "worker", "pid", "incarnation", "exit_code", "signal", "reason", "ran_for_s"],
        {**_W, "pid": INT, "incarnation": S, "exit_code": NI, "signal": NS, "reason": S, "ran_for_s": N,
         "killed_by_supervisor": NS})),
    SupervisorKind.WORKER_RESTARTING: ("a crashed worker will be restarted after delay_s", obj(
        ["family", "worker", "attempt", "delay_s", "reason"],
        {**_W, "attempt": INT, "delay_s": N, "reason": S})),
    SupervisorKind.WORKER_FALLBACK: ("the family switches from its primary to its fallback", _SWITCH),
    SupervisorKind.WORKER_RESTORED: ("the primary probes fine again and replaces the fallback", _SWITCH),
    SupervisorKind.WORKER_SWITCHED: ("a reload changed which worker runs the family", _SWITCH),
    SupervisorKind.WORKER_FAILED: ("nothing runs this family (78, or both workers 77)", obj(
        ["family", "worker", "reason"], {**_W, "exit_code": NI, "reason": S, "retry_in_s": NN})),
    SupervisorKind.WORKER_UNRESPONSIVE: ("no heartbeat: the worker is killed and restarted", obj(
        ["family", "worker", "pid", "heartbeat_age_s"],
        {**_W, "pid": INT, "incarnation": S, "heartbeat_age_s": N})),
    SupervisorKind.LOSS: ("events were dropped (bus high-water mark, ring buffer)", obj(
        ["family", "worker", "incarnation", "where", "dropped", "dropped_total"],
        {**_W, "incarnation": S, "where": S, "dropped": INT, "dropped_incarnation": INT, "dropped_total": INT})),
    SupervisorKind.PROGRESS: ("where each incarnation stands: its last seq, and per kind its last kseq", obj(
        ["incarnations"], {"incarnations": {"type": "array", "items": obj(
            ["incarnation", "source", "seq", "kseq"],
            {"incarnation": S, "source": S, "seq": INT, "kseq": {"type": "object", "additionalProperties": INT},
             "ended": B})}})),
    SupervisorKind.CONFIG_RELOADED: ("SIGHUP: the configuration was re-read; only the workers that read a "
                                     "changed key were restarted", obj(
        ["changed", "ignored"], {"changed": STRS, "ignored": STRS,
                                 "restarted": {"type": "object", "additionalProperties": S}})),
    SupervisorKind.CONFIG_RELOAD_FAILED: ("SIGHUP: the new file is invalid; nothing changed", obj(
        ["key", "error"], {"key": S, "error": S})),
    JournalKind.LOSS: ("events the journal never received (seq holes) or could not keep (a full disk)", obj(
        ["source", "incarnation", "from_seq", "to_seq", "lost", "reason"],
        {"source": S, "incarnation": S, "from_seq": INT, "to_seq": INT, "lost": INT, "reason": S})),
    ExportKind.TRIMMED: ("the journal deleted events before the export sent them (an outage longer than its "
                         "retention): they never reach the stream", obj(
        ["count", "from_id", "to_id", "journal"],
        {"count": INT, "from_id": INT, "to_id": INT, "journal": S, "stream": S})),
    MonitorKind.WARNING: ("a worker survived a problem (limits, overflow, unreadable input)", obj(
        ["family", "worker", "code", "message"],
        {"family": S, "worker": S, "code": S, "message": S, "path": S, "resource": S})),
    ConfigKind.CONFIG_DISCOVERED: ("a CNI config file present when the worker started",
                              obj(["path", "dir", "valid"], _CFG)),
    ConfigKind.CONFIG_CREATED: ("a new CNI config file", obj(["path", "dir", "valid"], _CFG)),
    ConfigKind.CONFIG_MODIFIED: ("a CNI config file's content changed", obj(
        ["path", "dir", "valid"], {**_CFG, "previous_sha256": SHA})),
    ConfigKind.CONFIG_DELETED: ("a CNI config file is gone", obj(
        ["path", "dir"], {"path": S, "dir": S, "previous_sha256": SHA, "network": S})),
    ConfigKind.CONFIG_ACTIVE_CHANGED: ("the config a runtime would load changed", obj(
        ["path", "previous", "initial"], {"path": NS, "previous": NS, "network": S, "initial": B})),
    ConfigKind.BINARY_DISCOVERED: ("a plugin binary present at start", obj(["path", "dir", "name"], _BIN)),
    ConfigKind.BINARY_CREATED: ("a new plugin binary", obj(["path", "dir", "name"], _BIN)),
    ConfigKind.BINARY_MODIFIED: ("a plugin binary's content changed", obj(
        ["path", "dir", "name"], {**_BIN, "previous_sha256": SHA})),
    ConfigKind.BINARY_DELETED: ("a plugin binary is gone", obj(
        ["path", "dir", "name"], {"path": S, "dir": S, "name": S, "previous_sha256": SHA})),
    KernelKind.PLUGIN_STARTED: ("a CNI plugin process started (exec of a binary in cni.bin_dirs)",
                           obj(_RUN_REQ, _RUN)),
    KernelKind.PLUGIN_FINISHED: ("a CNI plugin process ended: exit code, duration, parsed stdout", obj(
        [*_RUN_REQ, "duration_ms"],
        {**_RUN, "exit_code": INT, "duration_ms": N, "duration_approximate": B, "exit_reason": S,
         "result": obj([], {"cni_version": S, "supported_versions": STRS,
                            "interfaces": {"type": "array", "items": obj([], {"name": S, "mac": S, "sandbox": S})},
                            "ips": {"type": "array", "items": obj(["address"], {
                                "address": S, "gateway": S, "interface": INT})}}),
         "error": obj([], {"code": INT, "msg": S, "details": S}),
         "output_error": S, "stdout": S, "stderr": S, "output_since_ms": N,
         "result_source": {"enum": ["cache"]}})),
    KernelKind.NETNS_CREATED: ("a network namespace was created (unshare/clone, or newly seen)",
                      obj([], {**_BY, "via": S, "child_pid": INT, "netns": S, "inode": INT, "path": S})),
    KernelKind.NETNS_ENTERED: ("a process joined a network namespace (setns)",
                      obj(["pid"], {**_BY, "fd": INT, "netns": S, "inode": INT, "via": S})),
    KernelKind.NETNS_DELETED: ("a network namespace is gone (proc-poll only)",
                      obj([], {"netns": S, "inode": INT, "path": S})),
    KernelKind.LINK_CREATED: ("a network interface was created (requested, or newly seen)", obj([], _LINK)),
    KernelKind.LINK_DELETED: ("a network interface was deleted", obj([], _LINK)),
    KernelKind.LINK_CHANGED: ("an interface's settings changed (master, up/down, mtu, name)", obj([], _LINK)),
    KernelKind.LINK_MOVED: ("an interface was moved to another network namespace", obj([], _LINK)),
    KernelKind.ADDR_ADDED: ("an IP address was added to an interface", obj(
        ["address", "prefixlen", "family"], _ADDR)),
    KernelKind.ADDR_DELETED: ("an IP address was removed from an interface", obj(
        ["address", "prefixlen", "family"], _ADDR)),
    K8sKind.POD_IP_ALLOCATED: ("a pod (of this node) got its first IPs", obj(_POD_REQ, _POD)),
    K8sKind.POD_IP_CHANGED: ("a pod's IPs changed", obj([*_POD_REQ, "previous_ips"],
                                                      {**_POD, "previous_ips": STRS})),
    K8sKind.POD_IP_RELEASED: ("a pod's IPs are gone: pod deleted, finished, or IPs removed", obj(
        [*_POD_REQ, "reason"], {**_POD, "reason": {"enum": ["deleted", "released"]}})),
    K8sKind.POD_EVENT: ("the API server recorded a network-relevant Event (new, or repeated) on a pod of this node",
                        obj(_POD_EVENT_REQ, _POD_EVENT)),
    K8sKind.SERVICE_ADDED: ("a Service appeared", obj(_SVC_REQ, _SVC)),
    K8sKind.SERVICE_MODIFIED: ("a Service's type, IPs or ports changed", obj([*_SVC_REQ, "changed"], _SVC)),
    K8sKind.SERVICE_DELETED: ("a Service is gone", obj(_SVC_REQ, _SVC)),
    K8sKind.ENDPOINTSLICE_ADDED: ("an EndpointSlice appeared", obj(_EPS_REQ, _EPS)),
    K8sKind.ENDPOINTSLICE_MODIFIED: ("an EndpointSlice's endpoints changed", obj([*_EPS_REQ, "changed"], _EPS)),
    K8sKind.ENDPOINTSLICE_DELETED: ("an EndpointSlice is gone", obj(_EPS_REQ, _EPS)),
    K8sKind.NETWORKPOLICY_ADDED: ("a NetworkPolicy appeared", obj(_NP_REQ, _NP)),
    K8sKind.NETWORKPOLICY_MODIFIED: ("a NetworkPolicy's selector, types or rules changed", obj(
        [*_NP_REQ, "changed"], _NP)),
    K8sKind.NETWORKPOLICY_DELETED: ("a NetworkPolicy is gone", obj(_NP_REQ, _NP)),
    K8sKind.NODE_NETWORK_CHANGED: ("a node's pod CIDRs, addresses, network conditions or CNI changed", obj(
        ["name", "pod_cidrs", "addresses", "conditions"], _NODE)),
}


def envelope_schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:cnisup:envelope:v{VERSION}",
        "title": f"cnisup event envelope, version {VERSION}",
        "description": "Payload frame of every cnisup message; the topic frame equals kind. "
                       "See docs/PROTOCOL.md.",
        "type": "object",
        "required": ["v", "id", "kind", "source", "node", "ts", "incarnation", "seq", "data"],
        "properties": {
            "v": {"const": VERSION},
            "id": {"type": "string", "minLength": 1},
            "kind": {"enum": sorted(KINDS)},
            "source": {"enum": sorted(SOURCES)},
            "node": {"type": "string"},
            "ts": {"type": "integer", "minimum": 0, "description": "nanoseconds since the Unix epoch"},
            "incarnation": {"type": "string", "minLength": 1},
            "seq": {"type": "integer", "minimum": 1},
            "kseq": {"type": "integer", "minimum": 1,
                     "description": "per incarnation and kind: 1, 2, 3 ... (loss detection by topic prefix)"},
            "data": {"type": "object"},
        },
        "additionalProperties": False,
        "allOf": [{"if": {"properties": {"kind": {"const": k}}},
                   "then": {"properties": {"data": schema}}, "description": doc}
                  for k, (doc, schema) in sorted(KINDS.items())],
    }


if __name__ == "__main__":
    json.dump(envelope_schema(), sys.stdout, indent=1)
    sys.stdout.write("\n")


def matches(kind: str, prefix: str) -> bool:
    """Does ``kind`` fall under ``prefix``, taken as whole dot-separated tokens?
    ``cni.plugin`` (or ``cni.plugin.``) matches ``cni.plugin.finished`` but not
    ``cni.plugin_binary.created``; a whole kind matches itself."""
    p = prefix.rstrip(".")
    return bool(p) and (kind == p or kind.startswith(p + "."))
