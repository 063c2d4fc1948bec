"""The k8s family's shared core, without processes: projections, CNI plugin
detection, and the diffs both workers emit through."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnisup.protocol import validation
from cnisup.workers.errors import CapabilityMissing
from cnisup.workers.k8s import events
from cnisup.workers.k8s.events import Tracker

from . import objects as o


def _tracker(resource: events.Resource) -> tuple[Tracker, list[tuple[str, dict[str, Any]]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    return Tracker(resource, lambda k, d: out.append((k, d))), out


def _valid(kind: str, data: dict[str, Any]) -> None:
    validation.validate({"v": 1, "id": "x-1", "kind": kind, "source": "k8s-informer", "node": "n", "ts": 1,
                         "incarnation": "x", "seq": 1, "data": data})


def _meta(annotations: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": "x", "annotations": annotations}}


#: (key, on pods, on nodes, plugin): the keys each project sets or reads, as cited in events._RULES.
ANNOTATIONS = [
    ("cni.projectcalico.org/podIP", True, False, "calico"),
    ("cni.projectcalico.org/podIPs", True, False, "calico"),
    ("cni.projectcalico.org/containerID", True, False, "calico"),
    ("projectcalico.org/IPv4Address", False, True, "calico"),
    ("projectcalico.org/IPv6Address", False, True, "calico"),
    ("projectcalico.org/IPv4VXLANTunnelAddr", False, True, "calico"),
    ("projectcalico.org/IPv4IPIPTunnelAddr", False, True, "calico"),
    ("projectcalico.org/WireguardPublicKey", False, True, "calico"),
    ("network.cilium.io/ipv4-pod-cidr", True, True, "cilium"),
    ("network.cilium.io/ipv4-cilium-host", True, True, "cilium"),
    ("io.cilium.network.ipv4-cilium-host", True, True, "cilium"),
    ("io.cilium.no-track-port", True, True, "cilium"),
    ("policy.cilium.io/proxy-visibility", True, True, "cilium"),
    ("policy.cilium.io/no-track-port", True, True, "cilium"),
    ("ipam.cilium.io/ip-pool", True, True, "cilium"),
    ("cni.cilium.io/mac-address", True, True, "cilium"),
    ("config.cilium.io/disable-source-ip-verification", True, True, "cilium"),
    ("cilium.io/bgp-virtual-router.64512", True, True, "cilium"),
    ("flannel.alpha.coreos.com/public-ip", False, True, "flannel"),
    ("flannel.alpha.coreos.com/backend-type", False, True, "flannel"),
    ("flannel.alpha.coreos.com/kube-subnet-manager", False, True, "flannel"),
    ("k8s.v1.cni.cncf.io/network-status", True, False, "multus"),
    ("k8s.v1.cni.cncf.io/networks", True, False, "multus"),
    ("k8s.v1.cni.cncf.io/networks-status", True, False, "multus"),
    ("node.antrea.io/mac-address", False, True, "antrea"),
    ("node.antrea.io/transport-addresses", False, True, "antrea"),
    ("ipam.antrea.io/ippools", True, False, "antrea"),
    ("ipam.antrea.io/pod-ips", True, False, "antrea"),
    ("ovn.kubernetes.io/ip_address", True, True, "kube-ovn"),
    ("ovn.kubernetes.io/allocated", True, True, "kube-ovn"),
    ("ovn.kubernetes.io/chassis", True, True, "kube-ovn"),
    ("k8s.ovn.org/pod-networks", True, False, "ovn-kubernetes"),
    ("k8s.ovn.org/node-subnets", False, True, "ovn-kubernetes"),
    ("k8s.ovn.org/node-primary-ifaddr", False, True, "ovn-kubernetes"),
    ("k8s.ovn.org/node-chassis-id", False, True, "ovn-kubernetes"),
    ("k8s.ovn.org/l3-gateway-config", False, True, "ovn-kubernetes"),
    ("k8s.ovn.org/host-cidrs", False, True, "ovn-kubernetes"),
    ("vpc.amazonaws.com/pod-ips", True, False, "aws-vpc-cni"),
    ("vpc.amazonaws.com/pod-eni", True, False, "aws-vpc-cni"),
    ("k8s.amazonaws.com/eniConfig", False, True, "aws-vpc-cni"),
]


@pytest.mark.parametrize(("key", "on_pod", "on_node", "plugin"), ANNOTATIONS)
def test_cni_plugin_from_each_projects_own_keys_on_pods_and_nodes(key: str, on_pod: bool, on_node: bool,
                                                                  plugin: str) -> None:
    pod = events.project_pod(o.pod("p", "n", ["10.0.0.1"], annotations={key: "v"}))
    node = events.project_node(o.node("n", "10.0.0.0/24", "192.168.0.1", annotations={key: "v"}))
    assert pod.get("cni_plugin") == (plugin if on_pod else None)
    assert node.get("cni_plugin") == (plugin if on_node else None)


def test_weave_is_known_by_its_node_condition_it_sets_no_annotation() -> None:
    weave = o.node("n", "10.32.0.0/12", "192.168.0.1")
    weave["status"]["conditions"][0]["reason"] = "WeaveIsUp"
    assert events.project_node(weave)["cni_plugin"] == "weave"
    assert "cni_plugin" not in events.project_node(o.node("n", "10.32.0.0/12", "192.168.0.1"))
    # the ConfigMap annotation Weave does set, were it copied onto a node or pod, says nothing
    peers = {"kube-peers.weave.works/peers": "{}"}
    assert "cni_plugin" not in events.project_node(o.node("n", "10.32.0.0/12", "192.168.0.1", annotations=peers))
    assert "cni_plugin" not in events.project_pod(o.pod("p", "n", ["10.0.0.1"], annotations=peers))


@pytest.mark.parametrize("annotations", [
    {}, {"cni.projectcalico.org/other": "x"}, {"notcilium.io/x": "1"}, {"cilium.iox/x": "1"},
    {"kubernetes.io/psp": "x"}, {"vpc.amazonaws.com/pod-ipsx": "x"}, {"k8s.ovn.org/node-subnets": "x"},
    {"projectcalico.org/IPv4Address": "1.2.3.4/24"}, {"node.antrea.io/mac-address": "x"},
    {"flannel.alpha.coreos.com/public-ip": "x"}, {"weave.works/ip": "x"},
])
def test_unknown_or_node_only_annotations_mean_no_plugin_on_a_pod(annotations: dict[str, str]) -> None:
    slim = events.project_pod(o.pod("p", "n", ["10.0.0.1"], annotations=annotations))
    assert "cni_plugin" not in slim and "cni_plugins" not in slim


def test_multus_on_calico_lists_both_primary_first() -> None:
    slim = events.project_pod(o.pod("p", "n", ["10.0.0.1"], annotations={
        "k8s.v1.cni.cncf.io/network-status": "[]", "cni.projectcalico.org/podIP": "10.0.0.1/32"}))
    assert slim["cni_plugin"] == "calico" and slim["cni_plugins"] == ["calico", "multus"]


def test_pod_ip_lifecycle_and_uid_change() -> None:
    t, out = _tracker(events.PODS)
    t.replace([o.pod("a", "n", None), o.pod("b", "n", ["10.0.0.2"])])
    assert [(k, d["name"], d.get("initial")) for k, d in out] == [("k8s.pod.ip_allocated", "b", True)]
    out.clear()
    a = o.pod("a", "n", ["10.0.0.1"])
    a["metadata"]["uid"] = "u1"
    t.apply("MODIFIED", a)
    a2 = o.pod("a", "n", ["10.0.0.1", "fd00::1"])
    a2["metadata"]["uid"] = "u1"
    a2["status"]["conditions"] = []  # noise
    t.apply("MODIFIED", a2)
    t.apply("MODIFIED", a2)  # no change: nothing
    done = o.pod("a", "n", ["10.0.0.1", "fd00::1"], phase="Succeeded")
    done["metadata"]["uid"] = "u1"
    t.apply("MODIFIED", done)
    reborn = o.pod("a", "n", ["10.0.0.7"])
    reborn["metadata"]["uid"] = "u2"
    t.apply("MODIFIED", reborn)
    b2 = o.pod("b", "n", ["10.0.0.9"])
    b2["metadata"]["uid"] = "other"
    t.apply("MODIFIED", b2)  # same name, new pod (recreated between two looks)
    t.apply("DELETED", reborn)
    got = [(k.rsplit(".", 1)[1], d["name"], d["ips"], d.get("reason"), d.get("previous_ips")) for k, d in out]
    assert got == [
        ("ip_allocated", "a", ["10.0.0.1"], None, None),
        ("ip_changed", "a", ["10.0.0.1", "fd00::1"], None, ["10.0.0.1"]),
        ("ip_released", "a", ["10.0.0.1", "fd00::1"], "released", None),
        ("ip_allocated", "a", ["10.0.0.7"], None, None),
        ("ip_released", "b", ["10.0.0.2"], "deleted", None),
        ("ip_allocated", "b", ["10.0.0.9"], None, None),
        ("ip_released", "a", ["10.0.0.7"], "deleted", None),
    ]
    for k, d in out:
        _valid(k, d)


def test_relist_reports_only_the_difference() -> None:
    t, out = _tracker(events.PODS)
    pods = [o.pod(f"p{i}", "n", [f"10.0.0.{i}"]) for i in range(5)]
    for i, p in enumerate(pods):
        p["metadata"]["uid"] = f"u{i}"
    t.replace(pods)
    out.clear()
    changed = o.pod("p1", "n", ["10.0.1.1"])
    changed["metadata"]["uid"] = "u1"
    t.replace([pods[0], changed, pods[3], pods[4]])  # p2 vanished, p1 changed
    assert [(k, d["name"]) for k, d in out] == [("k8s.pod.ip_changed", "p1"), ("k8s.pod.ip_released", "p2")]
    out.clear()
    t.replace([pods[0], changed, pods[3], pods[4]])
    assert out == []


def test_service_modified_only_when_a_reported_field_changes() -> None:
    t, out = _tracker(events.SERVICES)
    svc = o.service("s", "10.96.0.1")
    t.apply("ADDED", svc)
    noisy = o.service("s", "10.96.0.1")
    noisy["metadata"]["annotations"] = {"x": "y"}
    noisy["metadata"]["resourceVersion"] = "999"
    noisy["spec"]["selector"] = {"app": "other"}  # not reported: no event
    t.apply("MODIFIED", noisy)
    assert [k for k, _ in out] == ["k8s.service.added"]
    t.apply("MODIFIED", o.service("s", "10.96.0.1", type_="LoadBalancer", lb=["203.0.113.5"],
                                  ports=[{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "web",
                                          "nodePort": 30080}]))
    kind, data = out[-1]
    assert kind == "k8s.service.modified"
    assert data["changed"] == ["load_balancer_ingress", "ports", "type"]
    assert data["ports"] == [{"name": "http", "protocol": "TCP", "port": 80, "target_port": "web",
                              "node_port": 30080}]
    t.apply("DELETED", svc)
    assert out[-1][0] == "k8s.service.deleted"
    for k, d in out:
        _valid(k, d)


def test_endpointslice_endpoints_and_legacy_endpoints_same_shape() -> None:
    es = events.project_endpointslice(o.endpointslice("s-abc", "s", [("10.0.0.2", False, "n2"),
                                                                      ("10.0.0.1", True, "n1")]))
    assert es["service"] == "s" and es["address_type"] == "IPv4"
    assert es["endpoints"] == [{"addresses": ["10.0.0.1"], "ready": True, "node": "n1"},
                               {"addresses": ["10.0.0.2"], "ready": False, "node": "n2"}]
    ep = events.project_endpoints(o.endpoints("s", [("10.0.0.1", "n1")], [("10.0.0.2", "n2")]))
    assert ep["endpoints"] == es["endpoints"] and ep["service"] == "s" and ep["api"] == "v1/Endpoints"
    _valid("k8s.endpointslice.added", es)
    _valid("k8s.endpointslice.added", ep)


def test_networkpolicy_rules_change_is_modified_and_default_types() -> None:
    t, out = _tracker(events.NETWORKPOLICIES)
    t.apply("ADDED", o.networkpolicy("np", {"app": "a"}))
    assert out[-1][1]["policy_types"] == ["Ingress"]
    t.apply("MODIFIED", o.networkpolicy("np", {"app": "a"}, ingress=[{"from": [{"podSelector": {}}]}]))
    assert out[-1][0] == "k8s.networkpolicy.modified"
    assert out[-1][1]["changed"] == ["ingress_rules", "rules_sha256"]
    for k, d in out:
        _valid(k, d)


def test_node_network_changed_ignores_heartbeats() -> None:
    t, out = _tracker(events.NODES)
    flannel = {"flannel.alpha.coreos.com/backend-type": "vxlan"}
    t.replace([o.node("n1", "10.244.0.0/24", "192.168.0.1", annotations=flannel)])
    assert out[-1][1]["initial"] is True and out[-1][1]["cni_plugin"] == "flannel"
    t.apply("MODIFIED", o.node("n1", "10.244.0.0/24", "192.168.0.1", heartbeat="2025-01-02T00:00:00Z",
                               annotations={"flannel.alpha.coreos.com/backend-type": "vxlan"}))
    assert len(out) == 1
    t.apply("MODIFIED", o.node("n1", "10.244.0.0/24", "192.168.0.1", net_unavailable="True",
                               annotations={"flannel.alpha.coreos.com/backend-type": "vxlan"}))
    assert out[-1][1]["changed"] == ["conditions"]
    assert out[-1][1]["conditions"] == {"NetworkUnavailable": "True", "Ready": "True"}
    for k, d in out:
        _valid(k, d)


def test_locate_order_and_reason(tmp_path: Any) -> None:
    kc = tmp_path / "kc"
    kc.write_text("{}")
    assert events.locate(str(kc), {}).origin == "kubernetes.kubeconfig"
    assert events.locate("", {"KUBECONFIG": f"/nonexistent:{kc}"}).path == str(kc)
    with pytest.raises(CapabilityMissing, match=r"in-cluster \(KUBERNETES_SERVICE_HOST unset\).*no such file"):
        events.locate("", {"HOME": str(tmp_path)})
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("{}")
    assert events.locate("", {"HOME": str(tmp_path)}).origin == "~/.kube/config"
    with pytest.raises(CapabilityMissing, match="no such file"):
        events.locate(str(tmp_path / "missing"), {})


def test_kubectl_output_decoder_any_split_pretty_compact_and_garbage() -> None:
    from cnisup.workers.k8s.kubectl import Documents

    docs = [{"type": "ADDED", "object": {"metadata": {"name": f"p{i}", "note": "ü}\n{"}}} for i in range(3)]
    for text in ("".join(json.dumps(d, indent=4) + "\n" for d in docs),
                 "".join(json.dumps(d) + "\n" for d in docs)):
        data = text.encode()
        for cut in range(1, len(data)):
            dec = Documents()
            a, pa = dec.feed(data[:cut])
            b, pb = dec.feed(data[cut:])
            assert a + b == docs and not pa + pb and dec.pending == 0
    dec = Documents()
    got, problems = dec.feed(b'{"type": "MODIFIED", "object": {"a": 1}}\nthis is not json\n{"type": "X"}\n')
    assert got == [{"type": "MODIFIED", "object": {"a": 1}}, {"type": "X"}]
    assert len(problems) == 1 and "not JSON" in problems[0]


def _event_tracker(node: str = "n1", pods: dict[str, Any] | None = None
                   ) -> tuple[Tracker, list[tuple[str, dict[str, Any]]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    resource = events.EVENTS[0]
    return Tracker(resource, lambda k, d: out.append((k, d)), events.NodeEvents(node, pods or {})), out


def test_event_projection_core_v1_and_events_k8s_io() -> None:
    core = events.project_event(o.event("web.17a", "web", "FailedCreatePodSandBox", host="n1",
                                        message=o.SANDBOX_ERROR, uid="u1", count=3,
                                        first="2025-01-01T00:00:00Z", last="2025-01-01T00:05:00Z"))
    assert core == {"namespace": "default", "name": "web", "uid": "u1", "reason": "FailedCreatePodSandBox",
                    "message": o.SANDBOX_ERROR, "type": "Warning", "count": 3,
                    "first_timestamp": "2025-01-01T00:00:00Z", "last_timestamp": "2025-01-01T00:05:00Z",
                    "component": "kubelet", "host": "n1", "event": "default/web.17a"}
    _valid("k8s.pod.event", core)
    new_style = {"metadata": {"name": "web.18b", "namespace": "default"}, "reason": "FailedKillPod",
                 "regarding": {"kind": "Pod", "namespace": "default", "name": "web", "uid": "u1"},
                 "note": "KillPodSandbox: CNI DEL failed", "type": "Warning",
                 "eventTime": "2025-01-01T00:00:00.123456Z", "reportingController": "kubelet",
                 "reportingInstance": "n1", "series": {"count": 4, "lastObservedTime": "2025-01-01T00:09:00.5Z"}}
    ev = events.project_event(new_style)
    assert (ev["message"], ev["count"], ev["first_timestamp"], ev["last_timestamp"], ev["component"], ev["host"]) \
        == ("KillPodSandbox: CNI DEL failed", 4, "2025-01-01T00:00:00.123456Z", "2025-01-01T00:09:00.5Z",
            "kubelet", "n1")
    single = events.project_event({**new_style, "series": None})
    assert single["count"] == 1 and single["last_timestamp"] == single["first_timestamp"]
    _valid("k8s.pod.event", ev)


@pytest.mark.parametrize("garbage", [
    {}, {"metadata": None, "involvedObject": [], "count": "7", "message": 5, "source": "kubelet"},
    {"count": True, "series": {"count": -3}, "reason": ["FailedCreatePodSandBox"]},
    {"message": "x" * 100_000, "reason": "FailedCreatePodSandBox", "involvedObject": {"name": "p" * 10_000}},
])
def test_event_projection_of_garbage_is_bounded_and_valid(garbage: dict[str, Any]) -> None:
    ev = events.project_event(garbage)
    assert len(ev["message"]) <= events.MAX_EVENT_MESSAGE and len(ev["name"]) <= events.MAX_EVENT_FIELD
    assert isinstance(ev["count"], int) and ev["count"] >= 1
    _valid("k8s.pod.event", ev)


def test_events_of_this_nodes_pods_new_repeats_never_deletions() -> None:
    t, out = _event_tracker(pods={"default/cached": {"node": "n1", "uid": "u-cached"},
                                  "default/away": {"node": "n2", "uid": "u-away"}})
    mine = o.event("web.1", "web", "FailedCreatePodSandBox", host="n1", message=o.SANDBOX_ERROR)
    t.replace([mine, o.event("other.1", "other", "FailedCreatePodSandBox", host="n2")])
    assert [(d["name"], d["count"], d.get("initial")) for _, d in out] == [("web", 1, True)]
    out.clear()
    t.apply("MODIFIED", {**mine, "message": "edited, not repeated"})  # not a repeat: nothing
    t.apply("MODIFIED", {**mine, "count": 2, "lastTimestamp": "2025-01-01T00:01:00Z"})
    t.apply("MODIFIED", {**mine, "count": 2, "lastTimestamp": "2025-01-01T00:01:00Z"})  # same again: nothing
    t.apply("DELETED", mine)  # expired
    # no host (another reporter), but a pod of this node's cache: kept, uid from the cache
    t.apply("ADDED", {**o.event("cached.1", "cached", "SandboxChanged", host=""), "source": {}})
    t.apply("ADDED", {**o.event("away.1", "away", "SandboxChanged", host=""), "source": {}})
    t.apply("ADDED", o.event("web.2", "web", "Scheduled", host="n1"))  # not a network reason
    got = [(k, d["name"], d["count"], d["uid"], "initial" in d) for k, d in out]
    assert got == [("k8s.pod.event", "web", 2, "", False), ("k8s.pod.event", "cached", 1, "u-cached", False)]
    for k, d in out:
        _valid(k, d)
    assert sorted(t.cache) == ["default/cached.1"]  # only what was admitted and has not expired


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=4), max_leaves=12)
_EVENT_KEYS = st.sampled_from(["metadata", "involvedObject", "regarding", "reason", "message", "note", "type",
                               "count", "series", "firstTimestamp", "lastTimestamp", "eventTime", "source",
                               "deprecatedSource", "deprecatedCount", "reportingController", "reportingInstance"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_EVENT_KEYS | st.text(max_size=8), _JSON, max_size=10))
def test_any_event_object_projects_to_a_valid_event_or_is_refused(obj: dict[str, Any]) -> None:
    t, out = _event_tracker(pods={"default/p": {"node": "n1", "uid": "u"}})
    t.apply("ADDED", obj)
    t.apply("MODIFIED", obj)
    t.replace([obj])
    for kind, data in out:
        _valid(kind, data)
