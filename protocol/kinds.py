"""The catalogue of event kinds and the JSON Schema of each kind's ``data``.

This is the source of ``schema/envelope.schema.json``; regenerate it with
``python -m cnisup.protocol.kinds > protocol/schema/envelope.schema.json``
(a test fails when the two differ). Fields not listed as required may be
absent; extra fields may be added without bumping the envelope version.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from cnisup.protocol.envelope import SOURCES, VERSION

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
_LINK = {**_BY, "ifindex": INT, "name": S, "kind": S, "peer": S, "peer_netns": S, "target_netns": S,
         "master": INT, "master_name": S, "mtu": INT, "up": B, "mac": S, "truncated": B}
_ADDR = {**_BY, "address": S, "prefixlen": INT, "family": {"enum": ["inet", "inet6"]}, "ifindex": INT,
         "ifname": S, "label": S, "truncated": B}

# k8s family: slim projections of the objects (workers/k8s/events.py).
_CNI = {"cni_plugin": S, "cni_plugins": STRS}
_POD_REQ = ["namespace", "name", "uid", "node", "ips", "host_network"]
_POD = {"namespace": S, "name": S, "uid": S, "node": S, "ips": STRS, "host_network": B, **_CNI, "initial": B}
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
    "supervisor.started": ("the supervisor is up; its sockets are bound", obj(
        ["pid", "version", "endpoints"],
        {"pid": INT, "version": S, "config_path": NS, "preset": S, "endpoints": STRS})),
    "supervisor.ready": ("every enabled family's worker reported ready once (or ready_timeout passed)", obj(
        ["workers", "degraded"], {"workers": {"type": "object", "additionalProperties": S},
                                  "degraded": STRS})),
    "supervisor.stopping": ("a stop was asked; workers get SIGTERM", obj(["reason"], {"reason": S})),
    "supervisor.stopped": ("last event of a supervisor incarnation", obj(["uptime_s"], {"uptime_s": N})),
    "supervisor.worker.started": ("a worker process was started: a new incarnation begins", obj(
        ["family", "worker", "role", "pid", "incarnation", "reason", "restarts"],
        {**_W, "role": {"enum": ["primary", "fallback"]}, "pid": INT, "incarnation": S, "reason": S,
         "restarts": INT, "privileged": B})),
    "supervisor.worker.ready": ("the worker reached the bus; its events flow from now", obj(
        ["family", "worker", "pid", "incarnation"],
        {**_W, "pid": INT, "incarnation": S, "startup_s": N})),
    "supervisor.worker.exited": ("a worker process ended (any reason)", obj(
        ["family", "worker", "pid", "incarnation", "exit_code", "signal", "reason", "ran_for_s"],
        {**_W, "pid": INT, "incarnation": S, "exit_code": NI, "signal": NS, "reason": S, "ran_for_s": N,
         "killed_by_supervisor": NS})),
    "supervisor.worker.restarting": ("a crashed worker will be restarted after delay_s", obj(
        ["family", "worker", "attempt", "delay_s", "reason"],
        {**_W, "attempt": INT, "delay_s": N, "reason": S})),
    "supervisor.worker.fallback": ("the family switches from its primary to its fallback", _SWITCH),
    "supervisor.worker.restored": ("the primary probes fine again and replaces the fallback", _SWITCH),
    "supervisor.worker.switched": ("a reload changed which worker runs the family", _SWITCH),
    "supervisor.worker.failed": ("nothing runs this family (78, or both workers 77)", obj(
        ["family", "worker", "reason"], {**_W, "exit_code": NI, "reason": S, "retry_in_s": NN})),
    "supervisor.worker.unresponsive": ("no heartbeat: the worker is killed and restarted", obj(
        ["family", "worker", "pid", "heartbeat_age_s"],
        {**_W, "pid": INT, "incarnation": S, "heartbeat_age_s": N})),
    "supervisor.loss": ("events were dropped (bus high-water mark, ring buffer)", obj(
        ["family", "worker", "incarnation", "where", "dropped", "dropped_total"],
        {**_W, "incarnation": S, "where": S, "dropped": INT, "dropped_incarnation": INT, "dropped_total": INT})),
    "supervisor.config.reloaded": ("SIGHUP: the configuration was re-read", obj(
        ["changed", "ignored"], {"changed": STRS, "ignored": STRS})),
    "supervisor.config.reload_failed": ("SIGHUP: the new file is invalid; nothing changed", obj(
        ["key", "error"], {"key": S, "error": S})),
    "monitor.warning": ("a worker survived a problem (limits, overflow, unreadable input)", obj(
        ["family", "worker", "code", "message"],
        {"family": S, "worker": S, "code": S, "message": S, "path": S, "resource": S})),
    "cni.config.discovered": ("a CNI config file present when the worker started",
                              obj(["path", "dir", "valid"], _CFG)),
    "cni.config.created": ("a new CNI config file", obj(["path", "dir", "valid"], _CFG)),
    "cni.config.modified": ("a CNI config file's content changed", obj(
        ["path", "dir", "valid"], {**_CFG, "previous_sha256": SHA})),
    "cni.config.deleted": ("a CNI config file is gone", obj(
        ["path", "dir"], {"path": S, "dir": S, "previous_sha256": SHA, "network": S})),
    "cni.config.active_changed": ("the config a runtime would load changed", obj(
        ["path", "previous", "initial"], {"path": NS, "previous": NS, "network": S, "initial": B})),
    "cni.plugin_binary.discovered": ("a plugin binary present at start", obj(["path", "dir", "name"], _BIN)),
    "cni.plugin_binary.created": ("a new plugin binary", obj(["path", "dir", "name"], _BIN)),
    "cni.plugin_binary.modified": ("a plugin binary's content changed", obj(
        ["path", "dir", "name"], {**_BIN, "previous_sha256": SHA})),
    "cni.plugin_binary.deleted": ("a plugin binary is gone", obj(
        ["path", "dir", "name"], {"path": S, "dir": S, "name": S, "previous_sha256": SHA})),
    "cni.plugin.started": ("a CNI plugin process started (exec of a binary in cni.bin_dirs)",
                           obj(_RUN_REQ, _RUN)),
    "cni.plugin.finished": ("a CNI plugin process ended: exit code, duration, parsed stdout", obj(
        [*_RUN_REQ, "duration_ms"],
        {**_RUN, "exit_code": INT, "duration_ms": N, "duration_approximate": B, "exit_reason": S,
         "result": obj([], {"cni_version": S, "supported_versions": STRS,
                            "interfaces": {"type": "array", "items": obj([], {"name": S, "mac": S, "sandbox": S})},
                            "ips": {"type": "array", "items": obj(["address"], {
                                "address": S, "gateway": S, "interface": INT})}}),
         "error": obj([], {"code": INT, "msg": S, "details": S}),
         "output_error": S, "stdout": S, "stderr": S})),
    "netns.created": ("a network namespace was created (unshare/clone, or newly seen)",
                      obj([], {**_BY, "via": S, "child_pid": INT, "netns": S, "inode": INT, "path": S})),
    "netns.entered": ("a process joined a network namespace (setns)",
                      obj(["pid"], {**_BY, "fd": INT, "netns": S, "inode": INT})),
    "netns.deleted": ("a network namespace is gone (proc-poll only)",
                      obj([], {"netns": S, "inode": INT, "path": S})),
    "link.created": ("a network interface was created (requested, or newly seen)", obj([], _LINK)),
    "link.deleted": ("a network interface was deleted", obj([], _LINK)),
    "link.changed": ("an interface's settings changed (master, up/down, mtu, name)", obj([], _LINK)),
    "link.moved": ("an interface was moved to another network namespace", obj([], _LINK)),
    "addr.added": ("an IP address was added to an interface", obj(
        ["address", "prefixlen", "family"], _ADDR)),
    "addr.deleted": ("an IP address was removed from an interface", obj(
        ["address", "prefixlen", "family"], _ADDR)),
    "k8s.pod.ip_allocated": ("a pod (of this node) got its first IPs", obj(_POD_REQ, _POD)),
    "k8s.pod.ip_changed": ("a pod's IPs changed", obj([*_POD_REQ, "previous_ips"],
                                                      {**_POD, "previous_ips": STRS})),
    "k8s.pod.ip_released": ("a pod's IPs are gone: pod deleted, finished, or IPs removed", obj(
        [*_POD_REQ, "reason"], {**_POD, "reason": {"enum": ["deleted", "released"]}})),
    "k8s.service.added": ("a Service appeared", obj(_SVC_REQ, _SVC)),
    "k8s.service.modified": ("a Service's type, IPs or ports changed", obj([*_SVC_REQ, "changed"], _SVC)),
    "k8s.service.deleted": ("a Service is gone", obj(_SVC_REQ, _SVC)),
    "k8s.endpointslice.added": ("an EndpointSlice appeared", obj(_EPS_REQ, _EPS)),
    "k8s.endpointslice.modified": ("an EndpointSlice's endpoints changed", obj([*_EPS_REQ, "changed"], _EPS)),
    "k8s.endpointslice.deleted": ("an EndpointSlice is gone", obj(_EPS_REQ, _EPS)),
    "k8s.networkpolicy.added": ("a NetworkPolicy appeared", obj(_NP_REQ, _NP)),
    "k8s.networkpolicy.modified": ("a NetworkPolicy's selector, types or rules changed", obj(
        [*_NP_REQ, "changed"], _NP)),
    "k8s.networkpolicy.deleted": ("a NetworkPolicy is gone", obj(_NP_REQ, _NP)),
    "k8s.node.network_changed": ("a node's pod CIDRs, addresses, network conditions or CNI changed", obj(
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
            "kind": {"type": "string", "pattern": r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"},
            "source": {"enum": sorted(SOURCES)},
            "node": {"type": "string"},
            "ts": {"type": "integer", "minimum": 0, "description": "nanoseconds since the Unix epoch"},
            "incarnation": {"type": "string", "minLength": 1},
            "seq": {"type": "integer", "minimum": 1},
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
