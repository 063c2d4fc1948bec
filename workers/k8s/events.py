"""What the k8s family reports, shared by the informer and kubectl workers.

A worker only fetches raw API objects (dicts parsed from JSON) and says
whether a batch is a full listing (``Tracker.replace``) or one watch event
(``Tracker.apply``). Everything else is here: which resources (and with which
field selector), where the client configuration comes from, the slim
projection of each object (only the fields events carry; this is what is
cached, never the full object), CNI plugin detection from annotations, which
Kubernetes Events concern this node's pods, and the diff that turns two
projections into events exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cnisup.protocol.kinds import K8sKind
from cnisup.protocol.settings import Config
from cnisup.protocol.untrusted import UntrustedInputError, load_yaml
from cnisup.workers import backoff
from cnisup.workers.errors import CapabilityMissing, NoClusterConfig

Obj = Mapping[str, Any]
Slim = dict[str, Any]
#: ``emit(kind, data)``: where a tracker's events go (a queue, the bus).
Emit = Callable[[str, dict[str, Any]], None]
#: ``admit(projection)``: does a tracker keep (and report) this object?
Admit = Callable[[Slim], bool]

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


#: A kubeconfig with embedded certificates is a few KiB; one of a thousand contexts, a few hundred.
MAX_KUBECONFIG_BYTES = 1 << 20
#: Its sections nest four levels deep (users[].user.exec.env[]).
MAX_KUBECONFIG_DEPTH = 32


def read_kubeconfig(access: Access) -> Any:
    """The kubeconfig's YAML, read as the untrusted file it is (size, nesting, no
    aliases, UTF-8): the kubernetes client's own loader and the check's both read
    it with ``yaml.safe_load``, which recurses without bound and expands aliases.
    ``ValueError`` in one bounded line; ``OSError`` when it cannot be read."""
    with open(access.path, "rb") as f:
        data = f.read(MAX_KUBECONFIG_BYTES + 1)
    try:
        return load_yaml(data, what=f"{access.path} ({access.origin})", max_bytes=MAX_KUBECONFIG_BYTES,
                         max_depth=MAX_KUBECONFIG_DEPTH)
    except UntrustedInputError as exc:
        raise ValueError(str(exc)) from None


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
    pattern: re.Pattern[str] | None = None  #: a key pattern, where the project defines one
    pods: bool = True  #: the keys are set on pods
    nodes: bool = True  #: ... and on nodes

    def matches(self, key: str) -> bool:
        return key in self.keys or key.startswith(self.prefixes) or bool(self.pattern and self.pattern.match(key))


#: The annotation keys each project sets (or reads) on pods and nodes, from its
#: source. Specific plugins before the meta-plugin (Multus), so a Multus pod on
#: Calico says "calico" first. Exact keys and prefixes only: no guessing from values.
_RULES = (
    # projectcalico/calico libcalico-go/lib/backend/k8s/conversion/constants.go (set by the CNI plugin)
    _Rule("calico", keys=frozenset({"cni.projectcalico.org/podIP", "cni.projectcalico.org/podIPs",
                                    "cni.projectcalico.org/containerID"}), nodes=False),
    # projectcalico/calico libcalico-go/lib/backend/k8s/resources/node.go (node* constants, set by calico-node)
    _Rule("calico", keys=frozenset(f"projectcalico.org/{k}" for k in (
        "IPv4Address", "IPv6Address", "IPv4IPIPTunnelAddr", "IPv4VXLANTunnelAddr", "IPv6VXLANTunnelAddr",
        "VXLANTunnelMACAddr", "VXLANTunnelMACAddrV6", "ASNumber", "RouteReflectorClusterID", "kube-labels",
        "IPv4WireguardInterfaceAddr", "IPv6WireguardInterfaceAddr", "WireguardPublicKey",
        "WireguardPublicKeyV6")), pods=False),
    # cilium/cilium pkg/annotation/k8s.go: CiliumPrefixRegex (network.cilium.io/, policy.cilium.io/,
    # ipam.cilium.io/, cni.cilium.io/, ...) and the deprecated "io.cilium" aliases
    # (io.cilium.network.ipv4-pod-cidr on nodes, io.cilium.no-track-port on pods, ...).
    _Rule("cilium", prefixes=("io.cilium.", "io.cilium/"), pattern=re.compile(r"([A-Za-z0-9]+\.)*cilium\.io/")),
    # flannel-io/flannel pkg/subnet/kube/annotations.go, under the default --kube-annotation-prefix
    _Rule("flannel", prefixes=("flannel.alpha.coreos.com/",), pods=False),
    # Weave Net sets no annotation on pods or nodes (weaveworks/weave prog/kube-utils/annotations.go
    # keeps its peers in a ConfigMap's kube-peers.weave.works/ annotation): see _NODE_CONDITION_REASONS.
    # antrea-io/antrea pkg/agent/types/annotations.go (node.antrea.io/mac-address, transport-addresses, ...)
    _Rule("antrea", prefixes=("node.antrea.io/",), pods=False),
    # antrea-io/antrea pkg/ipam/annotations.go (ipam.antrea.io/ippools, ipam.antrea.io/pod-ips)
    _Rule("antrea", prefixes=("ipam.antrea.io/",), nodes=False),
    # kubeovn/kube-ovn pkg/util/const.go: ovn.kubernetes.io/ip_address, allocated, chassis, ... on both
    _Rule("kube-ovn", prefixes=("ovn.kubernetes.io/",)),
    # ovn-org/ovn-kubernetes go-controller/pkg/util/pod_annotation.go (OvnPodAnnotationName)
    _Rule("ovn-kubernetes", keys=frozenset({"k8s.ovn.org/pod-networks"}), nodes=False),
    # ovn-org/ovn-kubernetes go-controller/pkg/util/subnet_annotations.go (node-subnets) and
    # node_annotations.go (the rest)
    _Rule("ovn-kubernetes", keys=frozenset(f"k8s.ovn.org/{k}" for k in (
        "node-subnets", "node-primary-ifaddr", "node-chassis-id", "l3-gateway-config", "node-mgmt-port-mac-address",
        "host-cidrs", "zone-name", "node-id", "network-ids")), pods=False),
    # aws/amazon-vpc-cni-k8s pkg/ipamd/rpc_handler.go (vpccniPodIPKey); the branch ENI of security
    # groups for pods: aws/amazon-vpc-resource-controller-k8s pkg/config/type.go (ResourceNamePodENI)
    _Rule("aws-vpc-cni", keys=frozenset({"vpc.amazonaws.com/pod-ips", "vpc.amazonaws.com/pod-eni"}), nodes=False),
    # aws/amazon-vpc-cni-k8s pkg/eniconfig/eniconfig.go (defaultEniConfigAnnotationDef): custom networking only
    _Rule("aws-vpc-cni", keys=frozenset({"k8s.amazonaws.com/eniConfig"}), pods=False),
    # k8snetworkplumbingwg/network-attachment-definition-client pkg/apis/k8s.cni.cncf.io/v1/types.go
    _Rule("multus", keys=frozenset({"k8s.v1.cni.cncf.io/network-status", "k8s.v1.cni.cncf.io/networks",
                                    "k8s.v1.cni.cncf.io/networks-status"}), nodes=False),
)

#: Node condition reasons a plugin writes when it sets NetworkUnavailable=False: Weave Net's
#: only mark on a node (weaveworks/weave prog/kube-utils/nodestatus.go).
_NODE_CONDITION_REASONS = {"WeaveIsUp": "weave"}


def cni_plugins(annotations: Mapping[str, Any] | None, *, node: bool = False,
                condition_reasons: Iterable[str] = ()) -> list[str]:
    """Every plugin whose annotations are present, most specific first; [] if none."""
    found: list[str] = []
    for rule in _RULES:
        if not (rule.nodes if node else rule.pods) or rule.plugin in found:
            continue
        if annotations and any(isinstance(k, str) and rule.matches(k) for k in annotations):
            found.append(rule.plugin)
    if node:
        found += [p for p in (_NODE_CONDITION_REASONS.get(r) for r in condition_reasons) if p and p not in found]
    return found


def _with_plugins(slim: Slim, annotations: Mapping[str, Any] | None, *, node: bool,
                  condition_reasons: Iterable[str] = ()) -> Slim:
    found = cni_plugins(annotations, node=node, condition_reasons=condition_reasons)
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
    listed = [c for c in status.get("conditions") or [] if isinstance(c, Mapping)]
    conditions = {c["type"]: c.get("status", "Unknown") for c in listed if c.get("type") in _NODE_CONDITIONS}
    addresses = [{"type": a.get("type", ""), "address": a.get("address", "")}
                 for a in status.get("addresses") or [] if isinstance(a, Mapping)]
    slim: Slim = {"name": m.get("name", ""), "pod_cidrs": cidrs, "addresses": addresses,
                  "conditions": conditions}
    reasons = [str(c.get("reason")) for c in listed if c.get("type") == "NetworkUnavailable"]
    return _with_plugins(slim, m.get("annotations"), node=True, condition_reasons=reasons)


# -- Kubernetes Events about this node's pods ---------------------------------------------------

#: The kubelet's Event reasons about a pod's network (pkg/kubelet/events/event.go): the sandbox
#: (and with it the CNI ADD) failed, its teardown (CNI DEL) failed, the runtime's network is not
#: ready, the sandbox changed and is re-created, its status could not be read. One server-side
#: watch each: a field selector cannot OR two reasons.
NETWORK_EVENT_REASONS = ("FailedCreatePodSandBox", "FailedKillPod", "NetworkNotReady", "SandboxChanged",
                         "FailedPodSandBoxStatus")
#: Characters of an Event's message kept: the kubelet's sandbox errors carry the runtime's and
#: the plugin's messages (a few hundred characters); the API server does not bound core/v1 ones.
MAX_EVENT_MESSAGE = 4096
#: Characters of any other Event field kept (names are at most 253).
MAX_EVENT_FIELD = 512


def _text(value: Any, limit: int = MAX_EVENT_FIELD) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def project_event(obj: Obj) -> Slim:
    """A core/v1 Event, or one written through events.k8s.io (``regarding``, ``note``,
    ``eventTime``, ``series``, ``reportingController``/``reportingInstance``, ``deprecated*``)."""
    m = _meta(obj)
    about = _spec(obj, "involvedObject") or _spec(obj, "regarding")
    source = _spec(obj, "source") or _spec(obj, "deprecatedSource")
    series = _spec(obj, "series")
    first = _text(obj.get("firstTimestamp") or obj.get("deprecatedFirstTimestamp") or obj.get("eventTime"))
    count = _count(series.get("count")) or _count(obj.get("count")) or _count(obj.get("deprecatedCount")) or 1
    return {"namespace": _text(about.get("namespace") or m.get("namespace")), "name": _text(about.get("name")),
            "uid": _text(about.get("uid")), "reason": _text(obj.get("reason")),
            "message": _text(obj.get("message") or obj.get("note"), MAX_EVENT_MESSAGE),
            "type": _text(obj.get("type")), "count": count, "first_timestamp": first,
            "last_timestamp": _text(series.get("lastObservedTime") or obj.get("lastTimestamp")
                                    or obj.get("deprecatedLastTimestamp")) or first,
            "component": _text(source.get("component") or obj.get("reportingController")
                               or obj.get("reportingComponent")),
            "host": _text(source.get("host") or obj.get("reportingInstance")),
            "event": _text(f"{m.get('namespace', '')}/{m.get('name', '')}")}


class NodeEvents:
    """Admits an Event projection when it is about a pod of this node: reported by this
    node's kubelet (``host``), or about a pod in this node's pod cache. The pods tracker
    may run in another thread: ``dict.get`` on its cache is atomic, and the cache is
    only read here."""

    def __init__(self, node: str, pods: Mapping[str, Slim]) -> None:
        self.node = node
        self.pods = pods

    def __call__(self, slim: Slim) -> bool:
        if slim["reason"] not in NETWORK_EVENT_REASONS:  # a server that ignored the selector
            return False
        pod = self.pods.get(f"{slim['namespace']}/{slim['name']}")
        ours = pod is not None and pod.get("node") == self.node
        if slim["host"] != self.node and not ours:
            return False
        if not slim["uid"] and ours and pod is not None:
            slim["uid"] = pod.get("uid", "")
        return True


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


def diff_event(old: Slim | None, new: Slim | None, *, initial: bool = False) -> Events:
    """A new Event, or a repeat of one (its count or last timestamp moved); never its
    deletion (Events expire) nor an edit that is not a repeat."""
    if new is None:
        return []
    if old is None:
        return [(K8sKind.POD_EVENT, {**new, "initial": True} if initial else new)]
    if (old["count"], old["last_timestamp"]) != (new["count"], new["last_timestamp"]):
        return [(K8sKind.POD_EVENT, new)]
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
    selector: str = ""  #: a fixed field selector (pods: see ``field_selector``)
    name: str = ""  #: tells watches of one collection apart (status, logs); default: ``plural``

    @property
    def label(self) -> str:
        return self.name or self.plural

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
#: One watch per reason: ``involvedObject.kind`` and ``reason`` are field labels core/v1 Events
#: support (``source.host`` is not), so the server sends only these reasons' pod Events of the
#: whole cluster, and ``NodeEvents`` keeps this node's.
EVENTS = tuple(Resource("events", "", "v1", "Event", True, project_event, diff_event,
                        selector=f"involvedObject.kind=Pod,reason={reason}", name=f"events:{reason}")
               for reason in NETWORK_EVENT_REASONS)


def resources(*, endpointslices: bool) -> tuple[Resource, ...]:
    """Every collection a worker watches, in this order (pods first: Events are matched against them)."""
    return (PODS, SERVICES, ENDPOINTSLICES if endpointslices else ENDPOINTS, NETWORKPOLICIES, NODES, *EVENTS)


def field_selector(resource: Resource, cfg: Config) -> str:
    return pod_field_selector(cfg) if resource is PODS else resource.selector


# -- the per-resource cache ----------------------------------------------------------------------

class Tracker:
    """The slim projections of one resource's objects, and the events their changes make.

    ``admit`` (Events: ``NodeEvents``) keeps only the projections it accepts: any other
    object is treated as absent, so it is neither cached nor reported.

    Not thread-safe: one tracker per watching thread (or per kubectl stream)."""

    def __init__(self, resource: Resource, emit: Emit, admit: Admit | None = None) -> None:
        self.resource = resource
        self._emit = emit
        self._admit = admit
        self.cache: dict[str, Slim] = {}
        self.synced = False  #: a first full listing was applied

    def _admitted(self, slim: Slim) -> Slim | None:
        return slim if self._admit is None or self._admit(slim) else None

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
            self._put(key, self._admitted(self.resource.project(obj)), initial=False)

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
            if self._admitted(slim) is None:
                continue
            seen.add(key)
            self._put(key, slim, initial=initial)
        for key in [k for k in self.cache if k not in seen]:
            self._put(key, None, initial=False)
        self.synced = True
