"""The k8s family's shared core, without processes: projections, CNI plugin
detection, and the diffs both workers emit through."""

from __future__ import annotations

import json
from typing import Any

import pytest

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


@pytest.mark.parametrize(("key", "on_node", "plugin"), [
    ("cni.projectcalico.org/podIP", False, "calico"),
    ("cni.projectcalico.org/podIPs", False, "calico"),
    ("cni.projectcalico.org/containerID", False, "calico"),
    ("projectcalico.org/IPv4Address", True, "calico"),
    ("network.cilium.io/ipv4-pod-cidr", True, "cilium"),
    ("io.cilium.network.ipv4-cilium-host", True, "cilium"),
    ("cilium.io/global-service", False, "cilium"),
    ("flannel.alpha.coreos.com/public-ip", True, "flannel"),
    ("weave.works/ip", False, "weave"),
    ("k8s.v1.cni.cncf.io/network-status", False, "multus"),
    ("k8s.v1.cni.cncf.io/networks", False, "multus"),
    ("node.antrea.io/mac-address", False, "antrea"),
    ("ovn.kubernetes.io/ip_address", False, "kube-ovn"),
    ("k8s.ovn.org/pod-networks", False, "ovn-kubernetes"),
    ("vpc.amazonaws.com/pod-ips", False, "aws-vpc-cni"),
    ("vpc.amazonaws.com/pod-eni", False, "aws-vpc-cni"),
])
def test_cni_plugin_from_each_annotation_family(key: str, on_node: bool, plugin: str) -> None:
    assert events.cni_plugins({key: "v"}, node=on_node) == [plugin]
    if on_node:  # node-only keys say nothing on a pod
        assert events.cni_plugins({key: "v"}, node=False) == []


@pytest.mark.parametrize("annotations", [
    {}, {"cni.projectcalico.org/other": "x"}, {"foo.cilium.io/x": "1"}, {"kubernetes.io/psp": "x"},
    {"vpc.amazonaws.com/pod-ipsx": "x"}, {"k8s.ovn.org/node-subnets": "x"},
    {"projectcalico.org/IPv4Address": "1.2.3.4/24"},  # a node-only key on a pod
])
def test_unknown_annotations_mean_no_plugin(annotations: dict[str, str]) -> None:
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
