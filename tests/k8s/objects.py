"""Builders of API objects as a real server stores them (the fields the
workers read, plus the usual noise that must not cause events)."""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def pod(name: str, node: str, ips: list[str] | None = None, *, ns: str = "default",
        annotations: dict[str, str] | None = None, host_network: bool = False, phase: str = "Running",
        labels: dict[str, str] | None = None) -> Obj:
    status: Obj = {"phase": phase, "hostIP": "192.168.0.10", "conditions": [{"type": "Ready", "status": "True"}]}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    meta: Obj = {"name": name, "namespace": ns, "labels": labels or {"app": name}}
    if annotations:
        meta["annotations"] = annotations
    return {"metadata": meta,
            "spec": {"nodeName": node, "hostNetwork": host_network,
                     "containers": [{"name": "c", "image": "registry.example/app:1"}]},
            "status": status}


def service(name: str, cluster_ip: str, *, ns: str = "default", type_: str = "ClusterIP",
            ports: list[Obj] | None = None, external_ips: list[str] | None = None,
            lb: list[str] | None = None) -> Obj:
    spec: Obj = {"type": type_, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": ports or [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
                 "selector": {"app": name}}
    if external_ips:
        spec["externalIPs"] = external_ips
    status: Obj = {"loadBalancer": {"ingress": [{"ip": i} for i in lb]} if lb else {}}
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec, "status": status}


def endpointslice(name: str, service_name: str, endpoints: list[tuple[str, bool, str]], *,
                  ns: str = "default") -> Obj:
    return {"metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready, "serving": ready},
                           "nodeName": node} for ip, ready, node in endpoints],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def endpoints(name: str, ready: list[tuple[str, str]], not_ready: list[tuple[str, str]] | None = None, *,
              ns: str = "default") -> Obj:
    subset: Obj = {"addresses": [{"ip": ip, "nodeName": n} for ip, n in ready],
                   "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
    if not_ready:
        subset["notReadyAddresses"] = [{"ip": ip, "nodeName": n} for ip, n in not_ready]
    return {"metadata": {"name": name, "namespace": ns}, "subsets": [subset]}


def networkpolicy(name: str, selector: dict[str, str], *, ns: str = "default",
                  types: list[str] | None = None, ingress: list[Obj] | None = None) -> Obj:
    spec: Obj = {"podSelector": {"matchLabels": selector}, "ingress": ingress or []}
    if types:
        spec["policyTypes"] = types
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def node(name: str, cidr: str, ip: str, *, ready: str = "True", net_unavailable: str = "False",
         annotations: dict[str, str] | None = None, heartbeat: str = "2025-01-01T00:00:00Z") -> Obj:
    return {"metadata": {"name": name, "annotations": annotations or {}},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
                       "conditions": [
                           {"type": "NetworkUnavailable", "status": net_unavailable, "reason": "RouteCreated"},
                           {"type": "Ready", "status": ready, "lastHeartbeatTime": heartbeat},
                           {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": heartbeat}]}}


def event(name: str, pod: str, reason: str, *, host: str, message: str = "", ns: str = "default",
          count: int = 1, type_: str = "Warning", uid: str = "", first: str = "2025-01-01T00:00:00Z",
          last: str | None = None) -> Obj:
    """A core/v1 Event as the kubelet records one about a pod."""
    about: Obj = {"kind": "Pod", "namespace": ns, "name": pod, "apiVersion": "v1"}
    if uid:
        about["uid"] = uid
    return {"metadata": {"name": name, "namespace": ns}, "involvedObject": about, "reason": reason,
            "message": message, "type": type_, "count": count, "firstTimestamp": first,
            "lastTimestamp": last or first, "source": {"component": "kubelet", "host": host},
            "reportingComponent": "kubelet", "reportingInstance": host}


#: What the kubelet records when the CNI ADD fails (containerd + the bridge plugin, IPAM exhausted).
SANDBOX_ERROR = ('Failed to create pod sandbox: rpc error: code = Unknown desc = failed to setup network for '
                 'sandbox "3f1e0c": plugin type="bridge" failed (add): failed to allocate for range 0: '
                 'no IP addresses available in range set: 10.22.0.2-10.22.0.254')
