"""Scale, memory and latency of the k8s workers (measured, written to
``build/measurements/k8s.json``), and what a worker does on its own when it
cannot run. Workers are started one at a time, as the supervisor would, by
the ``harness``; latency goes through ``cnisup start`` and a raw SUB socket."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from e2e.support import children_of

from . import objects as o
from .apiserver import ApiServer
from .support import config, record, rss_kib, settled
from .test_k8s_supervised import NODE, start_cluster

PODS = 5000


@pytest.mark.parametrize("worker", ["k8s-informer", "kubectl"])
def test_no_kubeconfig_exits_77_with_the_reason(run_worker: Any, k8s_tmp: Path, worker: str) -> None:
    run = run_worker(worker, config(k8s_tmp / "nope"))
    assert run.wait_exit() == 77
    exit_status = run.exit_status()
    assert exit_status is not None and "nope: no such file" in exit_status["reason"]


def test_memory_is_the_nodes_not_the_clusters(run_worker: Any, api: ApiServer, kubeconfig: Path) -> None:
    """5,000 pods on other nodes cost a node-scoped informer nothing; cached
    cluster-wide they cost slim projections only, whether the watch cache
    answers the list whole (resourceVersion=0) or a server without one in
    pages of 500. The kubectl fallback's processes for the same resources,
    same run."""
    result: dict[str, Any] = {"pods": PODS}
    empty = run_worker("k8s-informer", config(kubeconfig))
    settled(empty, "pods", 0)
    result["informer_no_pods_kib"] = rss_kib(empty.pid)
    assert empty.stop() == 0

    api.put_many("pods", [o.pod(f"p{i:05d}", f"node-{i % 50}", [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"],
                                annotations={"cni.projectcalico.org/podIP": "x"}, ns=f"ns{i % 20}")
                          for i in range(PODS)])
    scoped = run_worker("k8s-informer", config(kubeconfig))
    settled(scoped, "pods", 0)
    result["informer_node_scoped_5000_elsewhere_kib"] = rss_kib(scoped.pid)
    assert not scoped.events("k8s.pod.ip_allocated")
    assert scoped.stop() == 0
    growth = result["informer_node_scoped_5000_elsewhere_kib"]["RssAnon"] - result["informer_no_pods_kib"]["RssAnon"]
    assert growth < 4096, f"node-scoped informer grew {growth} KiB with 5,000 pods elsewhere"

    for cache in (True, False):
        api.watch_cache = cache
        lists_before = len(api.log("pods", watch=False))
        t0 = time.monotonic()
        cluster = run_worker("k8s-informer", config(kubeconfig, "cluster"))
        settled(cluster, "pods", PODS, timeout_s=60)
        key = "watch_cache" if cache else "paged"
        result[f"informer_list_5000_{key}_s"] = round(time.monotonic() - t0, 2)
        result[f"informer_cluster_5000_cached_{key}_kib"] = rss_kib(cluster.pid)
        pages = api.log("pods", watch=False)[lists_before:]
        assert all(p.query["limit"] == "500" and p.query.get("resourceVersion", "0") == "0" for p in pages)
        if cache:  # the watch cache ignores limit
            assert [p.served_from for p in pages] == ["cache"]
        else:
            assert [bool(p.query.get("continue")) for p in pages] == [False] + [True] * (PODS // 500 - 1)
        allocated = cluster.events("k8s.pod.ip_allocated")
        assert len(allocated) == PODS and len({r.data["name"] for r in allocated}) == PODS
        assert all(r.data["initial"] and r.data["cni_plugin"] == "calico" for r in allocated)
        assert cluster.stop() == 0
    api.watch_cache = True

    t0 = time.monotonic()
    kubectl = run_worker("kubectl", config(kubeconfig, "cluster"))
    settled(kubectl, "pods", PODS, timeout_s=60)
    result["kubectl_list_5000_s"] = round(time.monotonic() - t0, 2)
    kids = children_of(kubectl.pid)
    per_kid = [rss_kib(k)["VmRSS"] for k in kids]
    result["kubectl_children_rssanon_kib"] = sum(rss_kib(k)["RssAnon"] for k in kids)
    result["kubectl_worker_kib"] = rss_kib(kubectl.pid)
    result["kubectl_children"] = len(kids)
    result["kubectl_children_vmrss_kib"] = sum(per_kid)
    result["kubectl_total_vmrss_kib"] = sum(per_kid) + result["kubectl_worker_kib"]["VmRSS"]
    assert len(kubectl.events("k8s.pod.ip_allocated")) == PODS
    assert kubectl.stop() == 0
    record("memory", result)
    print(json.dumps(result, indent=1))


@pytest.mark.parametrize("worker", ["k8s-informer", "kubectl"])
def test_event_latency_api_change_to_subscriber(api: ApiServer, k8s_tmp: Path, kubeconfig: Path,
                                                worker: str) -> None:
    api.put("pods", o.pod("lat", NODE, ["10.244.1.1"]))
    cl = start_cluster(api, k8s_tmp, kubeconfig, worker)
    try:
        cl.seen_or_wait("k8s.pod.ip_allocated", name="lat")
        api.wait_watches("pods")
        lat = []
        for i in range(2, 52):
            ip = f"10.244.1.{i}"
            t0 = time.monotonic()
            api.put("pods", o.pod("lat", NODE, [ip]))
            cl.wait("k8s.pod.ip_changed", name="lat", ips=[ip])
            lat.append((time.monotonic() - t0) * 1000)
        lat.sort()
        stats = {"n": len(lat), "p50_ms": round(statistics.median(lat), 2),
                 "p99_ms": round(lat[int(len(lat) * 0.99) - 1], 2), "max_ms": round(lat[-1], 2)}
        record(f"latency_{worker}", stats)
        print(worker, stats)
        assert stats["p50_ms"] < 50
    finally:
        assert cl.c.stop() == 0
