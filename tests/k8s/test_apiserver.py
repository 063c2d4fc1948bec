"""The emulator against the unmodified clients: if these pass, the workers'
tests exercise the real protocol, not a private dialect."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch

from . import objects as o
from .apiserver import ApiServer


def _api(kubeconfig: Path) -> client.CoreV1Api:
    conf = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=conf, persist_config=False)
    return client.CoreV1Api(client.ApiClient(conf))


def _kubectl(kubeconfig: Path, cache: Path, *args: str, timeout_s: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache), *args],
                          capture_output=True, text=True, timeout=timeout_s)


def test_client_list_pagination_and_selectors(api: ApiServer, kubeconfig: Path) -> None:
    for i in range(7):
        api.put("pods", o.pod(f"p{i}", "n1" if i % 2 else "n2", [f"10.0.0.{i}"], ns="a" if i < 4 else "b"))
    core = _api(kubeconfig)
    first = core.list_pod_for_all_namespaces(limit=3)
    assert len(first.items) == 3 and first.metadata._continue and first.metadata.remaining_item_count == 4
    names = [p.metadata.name for p in first.items]
    token = first.metadata._continue
    while token:
        page = core.list_pod_for_all_namespaces(limit=3, _continue=token)
        assert page.metadata.resource_version == first.metadata.resource_version  # one snapshot
        names += [p.metadata.name for p in page.items]
        token = page.metadata._continue
    assert sorted(names) == [f"p{i}" for i in range(7)]
    on_n1 = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    assert sorted(p.metadata.name for p in on_n1.items) == ["p1", "p3", "p5"]
    assert [p.metadata.name for p in core.list_namespaced_pod("b", label_selector="app in (p4,p6)").items] == \
        ["p4", "p6"]
    with pytest.raises(client.ApiException) as err:
        core.list_pod_for_all_namespaces(field_selector="status.phase=Running")
    assert err.value.status == 400
    api.compact()
    with pytest.raises(client.ApiException) as err:  # a continue token from before the compaction
        core.list_pod_for_all_namespaces(limit=3, _continue=first.metadata._continue)
    assert err.value.status == 410


def test_client_watch_bookmarks_selector_moves_and_410(api: ApiServer, kubeconfig: Path) -> None:
    api.put("pods", o.pod("a", "n1", ["10.0.0.1"]))
    core = _api(kubeconfig)
    rv = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1").metadata.resource_version
    got: list[tuple[str, Any]] = []

    def changes() -> None:
        api.wait_watches("pods")
        api.put("pods", o.pod("a", "n2", ["10.0.0.1"]))  # moves out of the selector
        api.put("pods", o.pod("b", "n1", ["10.0.0.2"]))
        api.delete("pods", "b")

    threading.Thread(target=changes, daemon=True).start()
    w = watch.Watch()
    for ev in w.stream(core.list_pod_for_all_namespaces, field_selector="spec.nodeName=n1", resource_version=rv,
                       allow_watch_bookmarks=True, timeout_seconds=3):
        got.append((ev["type"], ev["object"].metadata.name if ev["type"] != "BOOKMARK" else None))
        if got.count(("BOOKMARK", None)) >= 1 and len(got) >= 4:
            w.stop()
    assert got[:3] == [("DELETED", "a"), ("ADDED", "b"), ("DELETED", "b")]
    assert ("BOOKMARK", None) in got
    api.compact()
    # 410 as kube-apiserver sends it to a watch: an ERROR event with a Status
    with pytest.raises(client.ApiException) as err:
        for _ in watch.Watch().stream(core.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=2):
            pass
    assert err.value.status == 410
    api.gone_as_http = True
    with pytest.raises(client.ApiException) as err:
        core.list_pod_for_all_namespaces(watch=True, resource_version=rv, _preload_content=False)
    assert err.value.status == 410


def test_kubectl_get_and_watch(api: ApiServer, kubeconfig: Path, k8s_tmp: Path) -> None:
    api.put("pods", o.pod("a", "n1", ["10.0.0.1"]))
    api.put("networkpolicies", o.networkpolicy("deny", {"app": "a"}))
    cache = k8s_tmp / "kubectl-cache"
    out = _kubectl(kubeconfig, cache, "get", "pods", "-A", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert [p["metadata"]["name"] for p in json.loads(out.stdout)["items"]] == ["a"]
    out = _kubectl(kubeconfig, cache, "get", "netpol", "-n", "default", "-o", "name")
    assert out.stdout.strip() == "networkpolicy.networking.k8s.io/deny", out.stderr
    out = _kubectl(kubeconfig, cache, "get", "endpointslices.v1.discovery.k8s.io", "-A", "-o", "json")
    assert out.returncode == 0 and json.loads(out.stdout)["items"] == [], out.stderr
    proc = subprocess.Popen(["kubectl", "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache), "get", "pods",
                             "-A", "--watch", "--output-watch-events", "-o", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        api.wait_watches("pods")
        api.put("pods", o.pod("a", "n1", ["10.0.0.9"]))
        api.delete("pods", "a")
        api.expire_watches("pods")  # kubectl ends its watch on the ERROR event
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    dec, docs, pos = json.JSONDecoder(), [], 0
    while pos < len(stdout.rstrip()):
        doc, pos = dec.raw_decode(stdout, pos)
        docs.append(doc)
        while pos < len(stdout) and stdout[pos].isspace():
            pos += 1
    assert [(d["type"], d["object"]["status"].get("podIP")) for d in docs[:3]] == \
        [("ADDED", "10.0.0.1"), ("MODIFIED", "10.0.0.9"), ("DELETED", "10.0.0.9")]
    # kubectl prints the ERROR event itself, then ends
    assert [(d["type"], d["object"]["code"]) for d in docs[3:]] == [("ERROR", 410)], stderr
    assert proc.returncode is not None


def test_kubectl_forbidden_and_no_endpointslices(k8s_tmp: Path) -> None:
    server = ApiServer(endpointslices=False).start()
    try:
        kc = server.write_kubeconfig(k8s_tmp / "kc-old")
        server.forbidden.add("services")
        out = _kubectl(kc, k8s_tmp / "cache-old", "get", "services", "-A", "-o", "json")
        assert out.returncode == 1 and "Forbidden" in out.stderr
        out = _kubectl(kc, k8s_tmp / "cache-old", "api-resources", "--api-group=discovery.k8s.io", "-o", "name")
        assert out.returncode == 0 and "endpointslices" not in out.stdout
    finally:
        server.stop()


def test_watch_ends_cleanly_at_timeout_seconds(api: ApiServer, kubeconfig: Path) -> None:
    core = _api(kubeconfig)
    rv = core.list_node().metadata.resource_version
    t0 = time.monotonic()
    got = [ev["type"] for ev in watch.Watch().stream(core.list_node, resource_version=rv, timeout_seconds=1)]
    assert got == [] and 0.9 < time.monotonic() - t0 < 3  # no bookmarks asked for, none sent
