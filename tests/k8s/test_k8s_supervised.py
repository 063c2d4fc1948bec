"""The k8s family end to end: ``cnisup start`` with the informer and with the
kubectl fallback (the same tests, parametrized), the API-server emulator, and
an independent raw SUB socket. Workers run as nobody when the tests run as root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.support import CNISUP, Cnisup, Events, children_of, pid_alive

from cnisup.workers.k8s import events

from . import objects as o
from .apiserver import ApiServer

NODE = "test-node"
WORKERS = ["k8s-informer", "kubectl"]
#: Short so that a hung stream is noticed within seconds (informer: read
#: timeout; kubectl: each run is capped at 2-3 times this).
READ_TIMEOUT_S = 2.0


def k8s_cnisup(base: Path, worker: str, kubeconfig: Path | str, **over: Any) -> Cnisup:
    return Cnisup(base, monitors={"kernel": False, "config": False, "k8s": True},
                  use_k8s_informer=worker == "k8s-informer",
                  kubernetes={"kubeconfig": str(kubeconfig), "pod_scope": "node", "read_timeout": READ_TIMEOUT_S},
                  **over)


class Cluster:
    """One emulator, one ``cnisup start``, one subscriber."""

    def __init__(self, api: ApiServer, c: Cnisup, ev: Events, worker: str) -> None:
        self.api, self.c, self.ev, self.worker = api, c, ev, worker

    def wait(self, kind: str, timeout_s: float = 10.0, **data: Any) -> dict[str, Any]:
        return self.ev.wait(kind, timeout_s, **data)

    def seen_or_wait(self, kind: str, timeout_s: float = 10.0, **data: Any) -> dict[str, Any]:
        """Like ``wait``, but an event already received counts (initial events come in any order)."""
        for e in self.ev.seen:
            if e["kind"] == kind and all(e["data"].get(k) == v for k, v in data.items()):
                return e
        return self.wait(kind, timeout_s, **data)

    def k8s_events(self, since: int = 0) -> list[tuple[str, dict[str, Any]]]:
        return [(e["kind"], e["data"]) for e in self.ev.seen[since:] if e["kind"].startswith("k8s.")]

    def mark(self) -> int:
        return len(self.ev.seen)

    def quiet(self, s: float = 1.0) -> None:
        self.ev.collect(s)


def _seed(api: ApiServer) -> None:
    api.put("pods", o.pod("web", NODE, ["10.244.1.5"], annotations={"cni.projectcalico.org/podIP": "10.244.1.5/32"}))
    api.put("pods", o.pod("db", NODE, ["10.244.1.6"]))
    api.put("pods", o.pod("elsewhere", "node-2", ["10.244.2.9"]))
    api.put("services", o.service("web", "10.96.0.10"))
    api.put("endpointslices", o.endpointslice("web-abc", "web", [("10.244.1.5", True, NODE)]))
    api.put("networkpolicies", o.networkpolicy("deny-all", {}))
    api.put("nodes", o.node(NODE, "10.244.1.0/24", "192.168.0.10",
                            annotations={"flannel.alpha.coreos.com/public-ip": "192.168.0.10"}))
    # The kubelet's record of a failed sandbox, here and on another node (not ours).
    api.put("events", o.event("db.1", "db", "FailedCreatePodSandBox", host=NODE, message="earlier failure"))
    api.put("events", o.event("elsewhere.1", "elsewhere", "FailedCreatePodSandBox", host="node-2"))


def start_cluster(api: ApiServer, base: Path, kubeconfig: Path, worker: str, **over: Any) -> Cluster:
    c = k8s_cnisup(base, worker, kubeconfig, **over)
    ev = c.subscribe()
    c.start()
    ev.wait("supervisor.worker.ready", 15, worker=worker)
    return Cluster(api, c, ev, worker)


@pytest.fixture(params=WORKERS)
def cluster(request: pytest.FixtureRequest, api: ApiServer, k8s_tmp: Path, kubeconfig: Path) -> Iterator[Cluster]:
    _seed(api)
    cl = start_cluster(api, k8s_tmp, kubeconfig, request.param)
    # the initial state, before any test acts
    for kind in ("k8s.node.network_changed", "k8s.pod.ip_allocated", "k8s.service.added",
                 "k8s.endpointslice.added", "k8s.networkpolicy.added", "k8s.pod.event"):
        cl.seen_or_wait(kind)
    for plural in ("pods", "services", "endpointslices", "networkpolicies", "nodes"):
        api.wait_watches(plural)
    api.wait_watches("events", len(events.EVENTS))
    cl.quiet(0.3)
    yield cl
    try:
        assert cl.c.stop() == 0
    finally:
        cl.ev.close()


def test_initial_state_then_each_event(cluster: Cluster) -> None:
    api, worker = cluster.api, cluster.worker
    initial = cluster.k8s_events()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for k, d in initial:
        by_kind.setdefault(k, []).append(d)
    assert sorted(d["name"] for d in by_kind["k8s.pod.ip_allocated"]) == ["db", "web"]  # not "elsewhere"
    web = next(d for d in by_kind["k8s.pod.ip_allocated"] if d["name"] == "web")
    assert web["initial"] is True and web["cni_plugin"] == "calico" and web["ips"] == ["10.244.1.5"]
    assert web["node"] == NODE and web["host_network"] is False and web["uid"]
    assert "cni_plugin" not in next(d for d in by_kind["k8s.pod.ip_allocated"] if d["name"] == "db")
    assert by_kind["k8s.service.added"][0]["cluster_ips"] == ["10.96.0.10"]
    assert by_kind["k8s.endpointslice.added"][0]["endpoints"] == [
        {"addresses": ["10.244.1.5"], "ready": True, "node": NODE}]
    assert by_kind["k8s.networkpolicy.added"][0]["policy_types"] == ["Ingress"]
    node = by_kind["k8s.node.network_changed"][0]
    assert node["pod_cidrs"] == ["10.244.1.0/24"] and node["cni_plugin"] == "flannel"
    assert all(e["source"] == worker for e in cluster.ev.seen if e["kind"].startswith("k8s."))
    resources = cluster.c.worker("k8s")["info"]["resources"]  # what `cnisup status` shows
    assert resources["pods"]["cached"] == 2 and resources["nodes"]["cached"] == 1

    mark = cluster.mark()
    # a pod's life on this node: scheduled without IP, IP allocated, changed, deleted
    api.put("pods", o.pod("new", NODE, None))
    api.put("pods", o.pod("new", NODE, ["10.244.1.7"], annotations={"k8s.v1.cni.cncf.io/network-status": "[]"}))
    alloc = cluster.wait("k8s.pod.ip_allocated", name="new")
    assert alloc["data"]["cni_plugin"] == "multus" and "initial" not in alloc["data"]
    api.put("pods", o.pod("new", NODE, ["10.244.1.8"]))
    changed = cluster.wait("k8s.pod.ip_changed", name="new")
    assert changed["data"]["previous_ips"] == ["10.244.1.7"] and changed["data"]["ips"] == ["10.244.1.8"]
    api.delete("pods", "new")
    released = cluster.wait("k8s.pod.ip_released", name="new")
    assert released["data"]["reason"] == "deleted" and released["data"]["ips"] == ["10.244.1.8"]
    # a pod on another node: nothing; a pod bound to this node later: allocated
    api.put("pods", o.pod("roamer", "node-2", ["10.244.2.20"]))
    api.put("pods", o.pod("roamer", NODE, ["10.244.1.20"]))
    assert cluster.wait("k8s.pod.ip_allocated", name="roamer")["data"]["ips"] == ["10.244.1.20"]
    # services: noise is not a modification; a port change is
    noisy = o.service("web", "10.96.0.10")
    noisy["metadata"]["annotations"] = {"touched": "1"}
    api.put("services", noisy)
    api.put("services", o.service("web", "10.96.0.10", type_="LoadBalancer", lb=["203.0.113.7"]))
    mod = cluster.wait("k8s.service.modified", name="web")
    assert mod["data"]["changed"] == ["load_balancer_ingress", "type"]
    assert mod["data"]["load_balancer_ingress"] == ["203.0.113.7"]
    api.put("endpointslices", o.endpointslice("web-abc", "web", [("10.244.1.5", False, NODE)]))
    eps = cluster.wait("k8s.endpointslice.modified", name="web-abc")
    assert eps["data"]["endpoints"][0]["ready"] is False and eps["data"]["service"] == "web"
    api.put("networkpolicies", o.networkpolicy("deny-all", {"app": "web"}, types=["Ingress", "Egress"]))
    np = cluster.wait("k8s.networkpolicy.modified", name="deny-all")
    assert np["data"]["pod_selector"] == {"matchLabels": {"app": "web"}}
    api.put("nodes", o.node(NODE, "10.244.1.0/24", "192.168.0.10", heartbeat="2025-02-02T00:00:00Z",
                            annotations={"flannel.alpha.coreos.com/public-ip": "192.168.0.10"}))  # heartbeat only
    api.put("nodes", o.node(NODE, "10.244.1.0/24", "192.168.0.10", ready="False",
                            annotations={"flannel.alpha.coreos.com/public-ip": "192.168.0.10"}))
    nc = cluster.wait("k8s.node.network_changed", name=NODE)
    assert nc["data"]["changed"] == ["conditions"] and nc["data"]["conditions"]["Ready"] == "False"
    for plural, name in (("services", "web"), ("endpointslices", "web-abc"), ("networkpolicies", "deny-all")):
        api.delete(plural, name)
        cluster.wait(f"k8s.{plural.rstrip('s').replace('networkpolicie', 'networkpolicy')}.deleted", name=name)
    cluster.quiet(1.0)
    got = [(k, d["name"]) for k, d in cluster.k8s_events(mark)]
    assert got == [
        ("k8s.pod.ip_allocated", "new"), ("k8s.pod.ip_changed", "new"), ("k8s.pod.ip_released", "new"),
        ("k8s.pod.ip_allocated", "roamer"), ("k8s.service.modified", "web"),
        ("k8s.endpointslice.modified", "web-abc"), ("k8s.networkpolicy.modified", "deny-all"),
        ("k8s.node.network_changed", NODE), ("k8s.service.deleted", "web"),
        ("k8s.endpointslice.deleted", "web-abc"), ("k8s.networkpolicy.deleted", "deny-all")]


def test_network_events_of_this_nodes_pods(cluster: Cluster) -> None:
    api = cluster.api
    initial = [d for k, d in cluster.k8s_events() if k == "k8s.pod.event"]
    assert [(d["name"], d["message"], d.get("initial")) for d in initial] == [("db", "earlier failure", True)]
    mark = cluster.mark()
    # A pod scheduled here whose sandbox cannot be networked, and one on another node.
    uid = api.put("pods", o.pod("stuck", NODE, None))["metadata"]["uid"]
    api.put("pods", o.pod("stuck-elsewhere", "node-2", None))
    failed = o.event("stuck.17a", "stuck", "FailedCreatePodSandBox", host=NODE, message=o.SANDBOX_ERROR, uid=uid,
                     first="2025-01-01T03:12:04Z")
    api.put("events", o.event("stuck-elsewhere.1", "stuck-elsewhere", "FailedCreatePodSandBox", host="node-2"))
    api.put("events", failed)
    got = cluster.wait("k8s.pod.event", name="stuck")
    assert got["data"] == {"namespace": "default", "name": "stuck", "uid": uid, "reason": "FailedCreatePodSandBox",
                           "message": o.SANDBOX_ERROR, "type": "Warning", "count": 1,
                           "first_timestamp": "2025-01-01T03:12:04Z", "last_timestamp": "2025-01-01T03:12:04Z",
                           "component": "kubelet", "host": NODE, "event": "default/stuck.17a"}
    assert got["source"] == cluster.worker
    # The kubelet's next attempt fails the same way: the same Event, count 2.
    repeat = {**failed, "count": 2, "lastTimestamp": "2025-01-01T03:12:19Z"}
    api.put("events", repeat)
    assert cluster.wait("k8s.pod.event", name="stuck", count=2)["data"]["last_timestamp"] == "2025-01-01T03:12:19Z"
    # An edit that is not a repeat, its expiry, a reason that is not about the network: nothing.
    api.put("events", {**repeat, "message": "edited"})
    api.delete("events", "stuck.17a")
    api.put("events", o.event("stuck.18b", "stuck", "Pulled", host=NODE, type_="Normal"))
    cluster.quiet(1.0)
    assert [(d["name"], d["count"]) for k, d in cluster.k8s_events(mark) if k == "k8s.pod.event"] == \
        [("stuck", 1), ("stuck", 2)]
    # Selected on the server, one watch per reason: never every Event of the cluster.
    selectors = {r.query.get("fieldSelector") for r in api.log("events")}
    assert selectors == {f"involvedObject.kind=Pod,reason={r}" for r in events.NETWORK_EVENT_REASONS}


@pytest.mark.parametrize("gone", ["error-event", "http-410"])
def test_410_relist_reports_missed_changes_exactly_once(cluster: Cluster, gone: str) -> None:
    api = cluster.api
    lists_before = len(api.log("pods", watch=False))
    api.hang_watches("pods")  # the worker hears nothing from now on
    api.delete("pods", "web")  # deleted during the gap
    api.put("pods", o.pod("db", NODE, ["10.244.1.66"]))  # changed during the gap
    api.put("pods", o.pod("late", NODE, ["10.244.1.77"]))  # created during the gap
    api.compact()
    mark = cluster.mark()
    if gone == "error-event":
        api.expire_watches("pods")
    else:
        api.gone_as_http = True
        api.drop_watches("pods")  # the reconnect from the old resourceVersion gets HTTP 410
    cluster.wait("k8s.pod.ip_allocated", timeout_s=15, name="late")
    cluster.quiet(1.5)
    pods = sorted((k, d["name"]) for k, d in cluster.k8s_events(mark) if k.startswith("k8s.pod."))
    assert pods == [("k8s.pod.ip_allocated", "late"), ("k8s.pod.ip_changed", "db"),
                    ("k8s.pod.ip_released", "web")]
    assert not [k for k, _ in cluster.k8s_events(mark) if not k.startswith("k8s.pod.")]
    assert len(api.log("pods", watch=False)) > lists_before  # it relisted


def test_dropped_connection_resumes(cluster: Cluster) -> None:
    api = cluster.api
    # A change of another resource that makes no event: the pods watch learns the
    # newer resourceVersion only from a bookmark (sent every second here).
    beat = api.put("nodes", o.node(NODE, "10.244.1.0/24", "192.168.0.10", heartbeat="2025-03-03T00:00:00Z",
                                   annotations={"flannel.alpha.coreos.com/public-ip": "192.168.0.10"}))
    time.sleep(1.5)
    lists_before = len(api.log("pods", watch=False))
    watches_before = len(api.log("pods", watch=True))
    mark = cluster.mark()
    assert api.drop_watches("pods") >= 1
    api.put("pods", o.pod("after-drop", NODE, ["10.244.1.90"]))
    cluster.wait("k8s.pod.ip_allocated", name="after-drop")
    cluster.quiet(1.0)
    assert [(k, d["name"]) for k, d in cluster.k8s_events(mark)] == [("k8s.pod.ip_allocated", "after-drop")]
    new_watches = api.log("pods", watch=True)[watches_before:]
    assert new_watches
    if cluster.worker == "k8s-informer":  # resumed from its resourceVersion: no relist
        assert len(api.log("pods", watch=False)) == lists_before
        assert int(new_watches[0].query["resourceVersion"]) >= int(beat["metadata"]["resourceVersion"])
        assert new_watches[0].query["allowWatchBookmarks"] == "true"
        assert new_watches[0].user_agent.startswith("cnisup/")


def test_hung_stream_is_noticed_and_reopened(cluster: Cluster) -> None:
    api = cluster.api
    mark = cluster.mark()
    api.hang_watches("pods")
    api.put("pods", o.pod("after-hang", NODE, ["10.244.1.91"]))
    t0 = time.monotonic()
    cluster.wait("k8s.pod.ip_allocated", timeout_s=4 * READ_TIMEOUT_S + 5, name="after-hang")
    took = time.monotonic() - t0
    assert took >= READ_TIMEOUT_S * 0.8  # it was the timeout, not luck
    if cluster.worker == "k8s-informer":
        assert took < READ_TIMEOUT_S + 3
        warn = next(e for e in cluster.ev.seen[mark:] if e["kind"] == "monitor.warning")
        assert warn["data"]["code"] == "k8s_watch_timeout" and warn["data"]["resource"] == "pods"
    cluster.quiet(0.5)
    assert [(k, d["name"]) for k, d in cluster.k8s_events(mark)] == [("k8s.pod.ip_allocated", "after-hang")]


def test_garbage_from_the_server_is_reported_not_fatal(cluster: Cluster) -> None:
    api = cluster.api
    pid = cluster.c.worker("k8s")["pid"]
    mark = cluster.mark()
    api.garbage["pods"] = "watch"
    api.put("pods", o.pod("g1", NODE, ["10.244.1.92"]))  # delivered, then the garbage follows
    cluster.wait("k8s.pod.ip_allocated", name="g1")
    if cluster.worker == "k8s-informer":
        warn = cluster.wait("monitor.warning", code="k8s_bad_response")
        assert warn["data"]["resource"] == "pods"
    api.put("pods", o.pod("g2", NODE, ["10.244.1.93"]))
    cluster.wait("k8s.pod.ip_allocated", name="g2")
    api.garbage["pods"] = "list"  # a truncated list on the next (re)list
    api.hang_watches("pods")
    api.put("pods", o.pod("g3", NODE, ["10.244.1.94"]))
    api.compact()
    api.drop_watches("pods")  # reconnect from before the compaction: 410, relist, garbage, relist
    cluster.wait("k8s.pod.ip_allocated", timeout_s=15, name="g3")
    cluster.quiet(0.5)
    if cluster.worker == "k8s-informer":
        bad = [e["data"]["message"] for e in cluster.ev.seen[mark:]
               if e["kind"] == "monitor.warning" and e["data"]["code"] == "k8s_bad_response"]
        assert len(bad) == 2 and "not a watch event" in bad[0] and "list pods: not JSON" in bad[1], bad
    assert cluster.c.worker("k8s")["pid"] == pid  # never crashed
    assert [d["name"] for k, d in cluster.k8s_events(mark)] == ["g1", "g2", "g3"]


def test_forbidden_resource_is_reported_others_work(api: ApiServer, k8s_tmp: Path, kubeconfig: Path,
                                                    worker: str) -> None:
    _seed(api)
    api.forbidden.add("services")
    cl = start_cluster(api, k8s_tmp, kubeconfig, worker)
    try:
        warn = cl.wait("monitor.warning", code="k8s_forbidden")
        assert warn["data"]["resource"] == "services" and "forbidden" in warn["data"]["message"]
        cl.seen_or_wait("k8s.pod.ip_allocated", name="web")
        cl.seen_or_wait("k8s.networkpolicy.added", name="deny-all")
        api.forbidden.clear()  # RBAC fixed: picked up on a retry
        cl.wait("k8s.service.added", timeout_s=15, name="web")
        cl.quiet(0.5)
        warns = [e for e in cl.ev.seen if e["kind"] == "monitor.warning" and e["data"]["code"] == "k8s_forbidden"]
        assert len(warns) == 1  # once per streak, not per retry
    finally:
        assert cl.c.stop() == 0


@pytest.fixture(params=WORKERS)
def worker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_server_without_endpointslices_uses_endpoints(k8s_tmp: Path, worker: str) -> None:
    server = ApiServer(endpointslices=False).start()
    try:
        server.put("endpoints", o.endpoints("web", [("10.244.1.5", NODE)]))
        kc = server.write_kubeconfig(k8s_tmp / "kc-old")
        cl = start_cluster(server, k8s_tmp, kc, worker)
        added = cl.wait("k8s.endpointslice.added", name="web")
        assert added["data"]["api"] == "v1/Endpoints" and added["data"]["service"] == "web"
        assert not server.log("endpointslices")
        assert cl.c.stop() == 0
    finally:
        server.stop()


def test_no_kubeconfig_exit_77_then_fallback_fails_and_is_reported(k8s_tmp: Path) -> None:
    c = k8s_cnisup(k8s_tmp, "k8s-informer", k8s_tmp / "missing-kubeconfig",
                   restart={"reprobe_interval": 60.0})
    out = subprocess.run([CNISUP, "check", "--json", "--config", str(c.config_path)], capture_output=True,
                         text=True, timeout=30)
    fam = next(f for f in json.loads(out.stdout)["families"] if f["family"] == "k8s")
    assert fam["worker"] == "kubectl" and "missing-kubeconfig: no such file" in fam["reason"]
    assert "no such file" in fam["probes"]["kubectl"]["reason"]
    ev = c.subscribe()
    c.start()  # an explicit kubernetes.kubeconfig wins over $KUBECONFIG and in-cluster
    try:
        failed = ev.wait("supervisor.worker.failed", 15, family="k8s")
        assert failed["data"]["worker"] == "kubectl" and failed["data"]["exit_code"] == 77
        assert "no such file" in failed["data"]["reason"] and failed["data"]["retry_in_s"] == 60.0
        ev.collect(3.0)  # no hot loop: nothing is restarted
        assert len([e for e in ev.seen if e["kind"] == "supervisor.worker.started"
                    and e["data"]["family"] == "k8s"]) <= 1
        assert c.worker("k8s")["state"] == "unavailable"
    finally:
        assert c.stop() == 0


HOSTILE_KUBECONFIGS = {
    "deep": "[" * 5000 + "]" * 5000,
    "aliases": "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n",
    "not-yaml": "[\n",
    "binary": "\udcff\udcfe",
}


@pytest.mark.parametrize("content", HOSTILE_KUBECONFIGS.values(), ids=HOSTILE_KUBECONFIGS.keys())
def test_a_hostile_kubeconfig_is_one_line_for_check_and_the_workers(k8s_tmp: Path, content: str) -> None:
    """The kubeconfig is a file someone else wrote: ``check`` names its problem in one
    line for both workers and exits 1 (no traceback, no recursion); the supervisor
    starts the fallback, whose probe refuses it with exit 77: re-probed, not restarted
    in a loop (a fixed kubeconfig is picked up without a reload)."""
    kc = k8s_tmp / "kubeconfig"
    kc.write_bytes(content.encode("utf-8", "surrogateescape"))
    c = k8s_cnisup(k8s_tmp, "k8s-informer", kc)
    out = subprocess.run([CNISUP, "check", "--json", "--config", str(c.config_path)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    fam = next(f for f in json.loads(out.stdout)["families"] if f["family"] == "k8s")
    for worker in ("k8s-informer", "kubectl"):
        why = fam["probes"][worker]["reason"]
        assert why.startswith(f"{kc} (kubernetes.kubeconfig): ") and len(why) <= 300, why
    from cnisup.supervisor import config
    from cnisup.workers.k8s import probes
    audit = probes.rbac(config.load(c.config_path))  # run only when a worker can: here, straight
    assert not audit.ok and audit.reason.startswith(f"not checked: ValueError: {kc} ") and len(audit.reason) <= 400
    ev = c.subscribe()
    c.start()
    try:
        failed = ev.wait("supervisor.worker.failed", 15, family="k8s")
        assert failed["data"]["worker"] == "kubectl" and failed["data"]["exit_code"] == 77, failed["data"]
        assert "kubernetes.kubeconfig" in failed["data"]["reason"] and len(failed["data"]["reason"]) <= 400
        ev.collect(2.0)
        assert len([e for e in ev.seen if e["kind"] == "supervisor.worker.started"
                    and e["data"]["family"] == "k8s"]) == 1
    finally:
        assert c.stop() == 0
    assert "Traceback" not in c.log_path.read_text()


def test_a_node_without_kubernetes_is_idle_and_says_so_once_at_info(k8s_tmp: Path) -> None:
    """No kubernetes.kubeconfig, no in-cluster service, no $KUBECONFIG, no
    ~/.kube/config: not a fault (no ERROR, no WARNING, no exit 77), and not a
    reason to hold supervisor.ready back either."""
    c = k8s_cnisup(k8s_tmp, "k8s-informer", "", restart={"reprobe_interval": 1.0})
    env = {"KUBECONFIG": "", "KUBERNETES_SERVICE_HOST": "", "HOME": str(k8s_tmp)}
    out = subprocess.run([CNISUP, "check", "--config", str(c.config_path)], capture_output=True, text=True,
                         timeout=30, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr  # idle is not "cannot run"
    assert "[k8s] -> idle: no Kubernetes client configuration" in out.stdout
    ev = c.subscribe()
    c.start(env=env)
    try:
        ready = ev.wait("supervisor.ready", 15)
        assert ready["data"]["degraded"] == [] and "k8s" not in ready["data"]["workers"]
        ev.collect(2.5)  # a few re-probes (every second here)
        w = c.worker("k8s")
        assert w["state"] == "idle" and w["pid"] is None and "no Kubernetes client configuration" in w["reason"]
        assert not [e for e in ev.seen if e["data"].get("family") == "k8s"]
    finally:
        assert c.stop() == 0
    log = c.read_log().splitlines()
    assert len([ln for ln in log if "k8s is idle" in ln]) == 1
    assert next(ln for ln in log if "k8s is idle" in ln).split()[2] == "INFO"
    assert not [ln for ln in log if ("WARNING" in ln or "ERROR" in ln) and ("k8s" in ln or "exit 77" in ln)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")
def test_kubectl_children_run_as_nobody_and_die_with_the_worker(api: ApiServer, k8s_tmp: Path,
                                                               kubeconfig: Path) -> None:
    _seed(api)
    cl = start_cluster(api, k8s_tmp, kubeconfig, "kubectl")
    try:
        cl.wait("k8s.pod.ip_allocated", name="web")
        pid = cl.c.worker("k8s")["pid"]
        kids = children_of(pid)
        assert len(kids) == len(events.resources(endpointslices=True))  # one kubectl per watch
        for k in kids:
            with open(f"/proc/{k}/status") as f:
                uid = next(line.split()[1] for line in f if line.startswith("Uid:"))
            assert uid == "65534"
        os.kill(pid, signal.SIGKILL)  # the supervisor kills the worker's process group
        cl.wait("supervisor.worker.ready", worker="kubectl")
        deadline = time.monotonic() + 3
        while any(pid_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(k) for k in kids)
        pid2 = cl.c.worker("k8s")["pid"]
        kids2 = children_of(pid2)
        assert cl.c.stop() == 0  # a clean stop terminates them too
        assert not any(pid_alive(k) for k in kids2)
    finally:
        if cl.c.proc and cl.c.proc.poll() is None:
            cl.c.stop()
