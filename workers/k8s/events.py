"""What the k8s family reports, shared by the informer and kubectl workers.

A worker only fetches raw API objects (dicts parsed from JSON) and says
whether a batch is a full listing (``Tracker.replace``) or one watch event
(``Tracker.apply``). Everything else is here: which resources, where the
client configuration comes from, the slim projection of each object (only the
fields events carry; this is what is cached, never the full object), CNI
plugin detection from annotations, and the diff that turns two projections
into events exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cnisup.protocol.kinds import K8sKind
from cnisup.protocol.settings import Config
from cnisup.workers import backoff
from cnisup.workers.errors import CapabilityMissing, NoClusterConfig

Obj = Mapping[str, Any]
Slim = dict[str, Any]
#: ``emit(kind, data)``: where a tracker's events go (a queue, the bus).
Emit = Callable[[str, dict[str, Any]], None]

_SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


# -- settings and client configuration -------------------------------------------------------

@dataclass(frozen=True)
class Access:
    """How to reach the API server: a kubeconfig file, or the in-cluster service account."""

    mode: str  #: "kubeconfig" or "in-cluster"
    path: str  #: the kubeconfig file, or the service account dir
    origin: str  #: which rule chose it, for ``cnisup check`` and errors


def _home() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return "/nonexistent"


def locate(configured: str, environ: Mapping[str, str] | None = None) -> Access:
    """``kubernetes.kubeconfig`` if set, else in-cluster, else ``$KUBECONFIG``, else
    ``~/.kube/config``. Raises ``NoClusterConfig`` naming everything it tried when none
    is there, ``CapabilityMissing`` when the configured file is not."""
    env = os.environ if environ is None else environ
    tried = []
    if configured:
        if os.path.isfile(configured):
            return Access("kubeconfig", configured, "kubernetes.kubeconfig")
        raise CapabilityMissing(f"kubernetes.kubeconfig {configured}: "
                                f"{'not readable' if os.path.exists(configured) else 'no such file'}")
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    token = os.path.join(_SA_DIR, "token")
    if host and port and os.path.isfile(token):
        return Access("in-cluster", _SA_DIR, "KUBERNETES_SERVICE_HOST and the service account token")
    tried.append("in-cluster (KUBERNETES_SERVICE_HOST unset)" if not (host and port)
                 else f"in-cluster ({token} missing)")
    for path in filter(None, env.get("KUBECONFIG", "").split(":")):
        if os.path.isfile(path):
            return Access("kubeconfig", path, "$KUBECONFIG")
        tried.append(f"$KUBECONFIG {path} (no such file)")
    home = os.path.join(env.get("HOME") or _home(), ".kube", "config")
    if os.path.isfile(home):
        return Access("kubeconfig", home, "~/.kube/config")
    tried.append(f"{home} (no such file)")
    raise NoClusterConfig("no Kubernetes client configuration: kubernetes.kubeconfig is empty; tried "
                            + "; ".join(tried))


#: Reconnect backoff of both workers: 0.25 s doubling to 30 s, plus up to 0.5 s jitter.
_RECONNECT = backoff.exponential(initial_s=0.25, multiplier=2.0, max_s=30.0, jitter_s=0.5)


def reconnect_delay_s(attempt: int) -> float:
    """Delay before reconnect (or kubectl restart) number ``attempt`` (1-based) of an error streak."""
    return backoff.delay_s(_RECONNECT, attempt)


def pod_field_selector(cfg: Config) -> str:
    """Pods of this node only, unless ``kubernetes.pod_scope`` is cluster."""
    return f"spec.nodeName={cfg.node_name}" if cfg.kubernetes.pod_scope == "node" else ""


# -- CNI plugin detection ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Rule:
    plugin: str
    keys: frozenset[str] = frozenset()  #: exact annotation keys
    prefixes: tuple[str, ...] = ()  #: key prefixes (a domain with its slash, or a dotted prefix)
    nodes_only: bool = False


#: Specific plugins before the meta-plugin (Multus), so a Multus pod on Calico
#: says "calico" first. Exact keys and prefixes only: no guessing from values.
_RULES = (
    _Rule("calico", keys=frozenset({"cni.projectcalico.org/podIP", "cni.projectcalico.org/podIPs",
                                    "cni.projectcalico.org/containerID"})),
    _Rule("calico", keys=frozenset({"projectcalico.org/IPv4Address"}), nodes_only=True),
    _Rule("cilium", prefixes=("network.cilium.io/", "io.cilium.network."), nodes_only=True),
    _Rule("cilium", prefixes=("cilium.io/",)),
    _Rule("flannel", prefixes=("flannel.alpha.coreos.com/",), nodes_only=True),
    _Rule("weave", prefixes=("weave.works/",)),
    _Rule("antrea", prefixes=("node.antrea.io/",)),
    _Rule("kube-ovn", prefixes=("ovn.kubernetes.io/",)),
    _Rule("ovn-kubernetes", keys=frozenset({"k8s.ovn.org/pod-networks"})),
    _Rule("aws-vpc-cni", keys=frozenset({"vpc.amazonaws.com/pod-ips", "vpc.amazonaws.com/pod-eni"})),
    _Rule("multus", keys=frozenset({"k8s.v1.cni.cncf.io/network-status", "k8s.v1.cni.cncf.io/networks"})),
)


def cni_plugins(annotations: Mapping[str, Any] | None, *, node: bool = False) -> list[str]:
    """Every plugin whose annotations are present, most specific first; [] if none."""
    if not annotations:
        return []
    found: list[str] = []
    for rule in _RULES:
        if (rule.nodes_only and not node) or rule.plugin in found:
            continue
        if any(k in rule.keys or k.startswith(rule.prefixes) for k in annotations):
            found.append(rule.plugin)
    return found


def _with_plugins(slim: Slim, annotations: Mapping[str, Any] | None, *, node: bool) -> Slim:
    found = cni_plugins(annotations, node=node)
    if found:
        slim["cni_plugin"] = found[0]
        if len(found) > 1:
            slim["cni_plugins"] = found
    return slim


# -- projections -------------------------------------------------------------------------------

def _meta(obj: Obj) -> Mapping[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, Mapping) else {}


def _spec(obj: Obj, key: str = "spec") -> Mapping[str, Any]:
    s = obj.get(key)
    return s if isinstance(s, Mapping) else {}


def _strs(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def object_key(obj: Obj) -> str:
    m = _meta(obj)
    ns = m.get("namespace")
    return f"{ns}/{m.get('name')}" if ns else str(m.get("name"))


#: Pods in these phases have had their sandbox torn down: the CNI DEL ran and
#: the IPs are free again, though the API keeps showing them in status.
_DONE_PHASES = frozenset({"Succeeded", "Failed"})


def project_pod(obj: Obj) -> Slim:
    m, spec, status = _meta(obj), _spec(obj), _spec(obj, "status")
    ips = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, Mapping) and p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    if status.get("phase") in _DONE_PHASES:
        ips = []
    slim: Slim = {"namespace": m.get("namespace", ""), "name": m.get("name", ""), "uid": m.get("uid", ""),
                  "node": spec.get("nodeName") or "", "ips": [str(i) for i in ips],
                  "host_network": bool(spec.get("hostNetwork", False))}
    return _with_plugins(slim, m.get("annotations"), node=False)


def _port(p: Mapping[str, Any]) -> dict[str, Any]:
    out = {"name": p.get("name", ""), "protocol": p.get("protocol", "TCP"), "port": p.get("port")}
    if "targetPort" in p:
        out["target_port"] = p["targetPort"]
    if p.get("nodePort"):
        out["node_port"] = p["nodePort"]
    return out


def project_service(obj: Obj) -> Slim:
    m, spec, status = _meta(obj), _spec(obj), _spec(obj, "status")
    cluster_ips = _strs(spec.get("clusterIPs")) or ([str(spec["clusterIP"])] if spec.get("clusterIP") else [])
    lb = _spec(status, "loadBalancer").get("ingress") or []
    return {"namespace": m.get("namespace", ""), "name": m.get("name", ""),
            "type": spec.get("type", "ClusterIP"), "cluster_ips": cluster_ips,
            "external_ips": _strs(spec.get("externalIPs")),
            "load_balancer_ingress": [str(i.get("ip") or i.get("hostname")) for i in lb
                                      if isinstance(i, Mapping) and (i.get("ip") or i.get("hostname"))],
            "ports": [_port(p) for p in spec.get("ports") or [] if isinstance(p, Mapping)]}


def _endpoint(addresses: list[str], ready: bool, node: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"addresses": addresses, "ready": ready}
    if node:
        e["node"] = str(node)
    return e


def project_endpointslice(obj: Obj) -> Slim:
    m = _meta(obj)
    endpoints = []
    for e in obj.get("endpoints") or []:
        if isinstance(e, Mapping):
            ready = _spec(e, "conditions").get("ready")
            # API contract: an unknown (nil) ready condition means ready.
            endpoints.append(_endpoint(_strs(e.get("addresses")), ready is not False, e.get("nodeName")))
    endpoints.sort(key=lambda e: (e["addresses"], e.get("node", "")))
    labels = m.get("labels") or {}
    return {"namespace": m.get("namespace", ""), "name": m.get("name", ""),
            "service": labels.get("kubernetes.io/service-name", ""),
            "address_type": obj.get("addressType", ""), "endpoints": endpoints}


def project_endpoints(obj: Obj) -> Slim:
    """core/v1 Endpoints, only on servers without EndpointSlices: shaped like a slice."""
    m = _meta(obj)
    endpoints = []
    for subset in obj.get("subsets") or []:
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            for a in subset.get(key) or []:
                if isinstance(a, Mapping) and a.get("ip"):
                    endpoints.append(_endpoint([str(a["ip"])], ready, a.get("nodeName")))
    endpoints.sort(key=lambda e: (e["addresses"], e.get("node", "")))
    family = "IPv6" if endpoints and ":" in endpoints[0]["addresses"][0] else "IPv4"
    return {"namespace": m.get("namespace", ""), "name": m.get("name", ""), "service": m.get("name", ""),
            "address_type": family, "endpoints": endpoints, "api": "v1/Endpoints"}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def project_networkpolicy(obj: Obj) -> Slim:
    m, spec = _meta(obj), _spec(obj)
    ingress, egress = spec.get("ingress") or [], spec.get("egress") or []
    types = _strs(spec.get("policyTypes"))
    if not types:  # the API's defaulting rule, for servers that did not apply it
        types = ["Ingress", "Egress"] if egress else ["Ingress"]
    return {"namespace": m.get("namespace", ""), "name": m.get("name", ""),
            "pod_selector": dict(spec.get("podSelector") or {}), "policy_types": types,
            "ingress_rules": len(ingress), "egress_rules": len(egress),
            # the rules themselves are not carried; their digest makes a rule change a ``modified``
            "rules_sha256": _digest([ingress, egress])}


_NODE_CONDITIONS = ("NetworkUnavailable", "Ready")


def project_node(obj: Obj) -> Slim:
    m, spec, status = _meta(obj), _spec(obj), _spec(obj, "status")
    cidrs = _strs(spec.get("podCIDRs")) or ([str(spec["podCIDR"])] if spec.get("podCIDR") else [])
    conditions = {c["type"]: c.get("status", "Unknown") for c in status.get("conditions") or []
                  if isinstance(c, Mapping) and c.get("type") in _NODE_CONDITIONS}
    addresses = [{"type": a.get("type", ""), "address": a.get("address", "")}
                 for a in status.get("addresses") or [] if isinstance(a, Mapping)]
    slim: Slim = {"name": m.get("name", ""), "pod_cidrs": cidrs, "addresses": addresses,
                  "conditions": conditions}
    return _with_plugins(slim, m.get("annotations"), node=True)


# -- diffs: two projections -> events ---------------------------------------------------------

Events = list[tuple[str, dict[str, Any]]]


def diff_pod(old: Slim | None, new: Slim | None, *, initial: bool = False) -> Events:
    """IP lifecycle only: a pod without IPs is not news until it gets one."""
    out: Events = []
    had = bool(old and old["ips"])
    has = bool(new and new["ips"])
    if had and old is not None and (not has or new is None or new["uid"] != old["uid"]):
        reason = "deleted" if new is None or new["uid"] != old["uid"] else "released"
        out.append((K8sKind.POD_IP_RELEASED, {**old, "reason": reason}))
        had = False
    if has and new is not None:
        if not had:
            out.append((K8sKind.POD_IP_ALLOCATED, {**new, "initial": True} if initial else new))
        elif old is not None and old["ips"] != new["ips"]:
            out.append((K8sKind.POD_IP_CHANGED, {**new, "previous_ips": old["ips"]}))
    return out


def _changed(old: Slim, new: Slim) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _crud(added: K8sKind, modified: K8sKind, deleted: K8sKind) -> Callable[..., Events]:
    def diff(old: Slim | None, new: Slim | None, *, initial: bool = False) -> Events:
        if old is None and new is not None:
            return [(added, {**new, "initial": True} if initial else new)]
        if old is not None and new is None:
            return [(deleted, old)]
        if old is not None and new is not None and old != new:
            return [(modified, {**new, "changed": _changed(old, new)})]
        return []
    return diff


def diff_node(old: Slim | None, new: Slim | None, *, initial: bool = False) -> Events:
    if new is None:
        return [(K8sKind.NODE_NETWORK_CHANGED, {**old, "deleted": True})] if old is not None else []
    if old is None:
        return [(K8sKind.NODE_NETWORK_CHANGED, {**new, "changed": [], **({"initial": True} if initial else {})})]
    if old != new:
        return [(K8sKind.NODE_NETWORK_CHANGED, {**new, "changed": _changed(old, new)})]
    return []


# -- resources -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resource:
    plural: str
    group: str  #: "" for the core group
    version: str
    kind: str
    namespaced: bool
    project: Callable[[Obj], Slim]
    diff: Callable[..., Events]

    @property
    def path(self) -> str:
        """All-namespaces collection path."""
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        return f"{base}/{self.plural}"

    @property
    def kubectl_name(self) -> str:
        """Fully qualified, so no other group's resource of that name is picked."""
        return self.plural if not self.group else f"{self.plural}.{self.version}.{self.group}"


K = K8sKind
PODS = Resource("pods", "", "v1", "Pod", True, project_pod, diff_pod)
SERVICES = Resource("services", "", "v1", "Service", True, project_service,
                    _crud(K.SERVICE_ADDED, K.SERVICE_MODIFIED, K.SERVICE_DELETED))
_SLICES = _crud(K.ENDPOINTSLICE_ADDED, K.ENDPOINTSLICE_MODIFIED, K.ENDPOINTSLICE_DELETED)
ENDPOINTSLICES = Resource("endpointslices", "discovery.k8s.io", "v1", "EndpointSlice", True,
                          project_endpointslice, _SLICES)
ENDPOINTS = Resource("endpoints", "", "v1", "Endpoints", True, project_endpoints, _SLICES)
NETWORKPOLICIES = Resource("networkpolicies", "networking.k8s.io", "v1", "NetworkPolicy", True,
                           project_networkpolicy,
                           _crud(K.NETWORKPOLICY_ADDED, K.NETWORKPOLICY_MODIFIED, K.NETWORKPOLICY_DELETED))
NODES = Resource("nodes", "", "v1", "Node", False, project_node, diff_node)


def resources(*, endpointslices: bool) -> tuple[Resource, ...]:
    return (PODS, SERVICES, ENDPOINTSLICES if endpointslices else ENDPOINTS, NETWORKPOLICIES, NODES)


# -- the per-resource cache ----------------------------------------------------------------------

class Tracker:
    """The slim projections of one resource's objects, and the events their changes make.

    Not thread-safe: one tracker per watching thread (or per kubectl stream)."""

    def __init__(self, resource: Resource, emit: Emit) -> None:
        self.resource = resource
        self._emit = emit
        self.cache: dict[str, Slim] = {}
        self.synced = False  #: a first full listing was applied

    def _put(self, key: str, new: Slim | None, *, initial: bool) -> None:
        old = self.cache.get(key)
        if new is None:
            self.cache.pop(key, None)
        else:
            self.cache[key] = new
        for kind, data in self.resource.diff(old, new, initial=initial):
            self._emit(kind, data)

    def apply(self, event_type: str, obj: Obj) -> None:
        """One watch event (ADDED, MODIFIED or DELETED)."""
        key = object_key(obj)
        if event_type == "DELETED":
            self._put(key, None, initial=False)
        else:
            self._put(key, self.resource.project(obj), initial=False)

    def replace(self, objs: Iterable[Obj]) -> None:
        """A full listing: emits what changed since the cache, including deletions
        of objects that vanished, and nothing for unchanged objects. The first
        listing of a worker's life marks its events ``initial``."""
        self.replace_projected((object_key(o), self.resource.project(o)) for o in objs)

    def replace_projected(self, items: Iterable[tuple[str, Slim]]) -> None:
        """``replace`` for a listing already reduced to (key, projection) pairs."""
        initial = not self.synced
        seen = set()
        for key, slim in items:
            seen.add(key)
            self._put(key, slim, initial=initial)
        for key in [k for k in self.cache if k not in seen]:
            self._put(key, None, initial=False)
        self.synced = True
