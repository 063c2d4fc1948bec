"""What one node's informer asks of the API server: at start, per hour, and
when a watch falls out of the server's history (410). The hour is counted
against the emulator with watches shortened 600x from then on (a 300-600 s
watch lasts 0.5-1 s, bookmarks come every 0.1 s instead of 60 s), so six
seconds are one hour of reconnects; written to
``build/measurements/k8s.json``."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import WorkerRun

from cnisup.protocol.settings import Config
from cnisup.workers.k8s import events, informer

from . import objects as o
from .apiserver import ApiServer, Request
from .support import config, record

NODE = "test-node"
#: Emulated seconds per real second.
SCALE = 600
HOUR_S = 3600 / SCALE
#: The informer's server-side watch duration is random in [300, 600] s.
WATCH_MIN_S, WATCH_MAX_S = 300, 600


def _kind(r: Request) -> str:
    if r.method != "GET" or not r.path.rstrip("/").split("/")[-1].islower():
        return "other"
    if r.path.rstrip("/") == "/apis/discovery.k8s.io/v1":
        return "discovery"
    return "watch" if r.watch else "list"


def _open_all(api: ApiServer, n: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while api.open_watches() < n:
        assert time.monotonic() < deadline, f"{api.open_watches()} of {n} watches open after {timeout_s} s"
        time.sleep(0.02)


def _seed(api: ApiServer) -> None:
    api.put("nodes", o.node(NODE, "10.244.1.0/24", "192.168.0.10"))
    for i in range(20):
        api.put("pods", o.pod(f"p{i}", NODE if i % 4 == 0 else f"node-{i % 4}", [f"10.244.{i % 4}.{i}"]))
    api.put("services", o.service("web", "10.96.0.10"))


def test_requests_per_node_at_start_and_per_hour(run_worker: Callable[[str, dict[str, Any]], WorkerRun],
                                                 k8s_tmp: Path) -> None:
    api = ApiServer(bookmark_interval_s=60).start()
    try:
        _seed(api)
        watched = events.resources(endpointslices=True)
        run = run_worker("k8s-informer", config(api.write_kubeconfig(k8s_tmp / "kc")))
        _open_all(api, len(watched))
        time.sleep(0.5)  # anything more it would ask at start
        start = api.log()
        t0 = time.monotonic()
        api.set_time_scale(1 / SCALE, 60 / SCALE)
        time.sleep(HOUR_S)
        hour = [r for r in api.log()[len(start):] if r.at - t0 <= HOUR_S]
    finally:
        api.stop()
    at_start, per_hour = Counter(_kind(r) for r in start), Counter(_kind(r) for r in hour)
    lists = [r for r in start if _kind(r) == "list"]
    lists_from_etcd = sum(r.served_from == "etcd" for r in lists)
    result = {
        "watches_per_node": len(watched),
        "at_start": {"requests": len(start), **at_start,
                     "lists_from_etcd": lists_from_etcd,
                     "list_resource_versions": sorted({r.query.get("resourceVersion", "(unset)") for r in lists})},
        "per_hour": {"requests": len(hour), **per_hour},
    }
    record("requests_per_node", result)
    print(result)
    assert run.exit_status() is None
    # Discovery (EndpointSlices or Endpoints), then one LIST and one WATCH per watched collection.
    assert at_start == {"discovery": 1, "list": len(watched), "watch": len(watched)}, start
    # Every LIST is served from the watch cache (resourceVersion=0), as client-go's reflector asks.
    assert [r.query.get("resourceVersion") for r in lists] == ["0"] * len(watched)
    assert not lists_from_etcd
    # An hour: no relist without a 410; each watch reopened every 300-600 s.
    assert per_hour["list"] == 0
    low, high = len(watched) * 3600 / WATCH_MAX_S, len(watched) * 3600 / WATCH_MIN_S
    assert 0.7 * low <= per_hour["watch"] <= 1.2 * high, (per_hour, low, high)


def _wait_lists(api: ApiServer, since: int, n: int, timeout_s: float = 10.0) -> list[Request]:
    deadline = time.monotonic() + timeout_s
    while len(got := api.log("pods", watch=False)[since:]) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} pod lists after {timeout_s} s"
        time.sleep(0.02)
    return got


def test_relist_after_410_as_client_gos_reflector(run_worker: Callable[[str, dict[str, Any]], WorkerRun],
                                                  api: ApiServer, kubeconfig: Path) -> None:
    api.put("pods", o.pod("web", NODE, ["10.244.1.5"]))
    run = run_worker("k8s-informer", config(kubeconfig))
    run.wait_for("k8s.pod.ip_allocated", name="web")
    api.wait_watches("pods")
    # The watch falls out of the server's window, but the last resourceVersion can still be
    # listed: relist at it, from the watch cache (no limit: a paginated list at an RV is etcd's).
    seen = api.put("pods", o.pod("web", NODE, ["10.244.1.6"]))["metadata"]["resourceVersion"]
    run.wait_for("k8s.pod.ip_changed", name="web")
    mark = len(api.log("pods", watch=False))
    api.expire_watches("pods")
    relist = _wait_lists(api, mark, 1)
    assert [(r.query.get("resourceVersion"), "limit" in r.query, r.served_from) for r in relist] == \
        [(seen, False, "cache")]
    # Compacted past it: that LIST is 410 too, then a consistent read (etcd, in pages).
    api.wait_watches("pods")
    api.hang_watches("pods")
    api.put("pods", o.pod("late", NODE, ["10.244.1.7"]))
    api.compact()
    mark = len(api.log("pods", watch=False))
    since = run.mark()
    api.expire_watches("pods")
    run.wait_for("k8s.pod.ip_allocated", since=since, name="late")
    relist = _wait_lists(api, mark, 2)
    assert [(r.query.get("resourceVersion"), r.query.get("limit"), r.served_from) for r in relist] == \
        [(seen, None, "gone"), (None, "500", "etcd")]
    # Back to normal: the next 410 relists at the new resourceVersion again.
    api.wait_watches("pods")
    mark = len(api.log("pods", watch=False))
    api.expire_watches("pods")
    assert [r.served_from for r in _wait_lists(api, mark, 1)] == ["cache"]
    assert [d["name"] for r in run.events("k8s.pod.ip_allocated") for d in [r.data]] == ["web", "late"]


def test_without_a_watch_cache_lists_keep_their_pages(run_worker: Callable[[str, dict[str, Any]], WorkerRun],
                                                      api: ApiServer, kubeconfig: Path) -> None:
    """A server that paginates a resourceVersion=0 list has no watch cache: a relist at a
    resourceVersion keeps the limit too (client-go's paginatedResult), rather than asking
    etcd for everything in one response."""
    api.watch_cache = False
    api.put_many("pods", [o.pod(f"p{i:03d}", NODE, [f"10.244.{i // 250}.{i % 250 + 1}"]) for i in range(600)])
    run = run_worker("k8s-informer", config(kubeconfig))
    api.wait_watches("pods")
    first = api.log("pods", watch=False)
    assert [(r.query.get("resourceVersion"), r.query["limit"], bool(r.query.get("continue"))) for r in first] == \
        [("0", "500", False), (None, "500", True)]
    since = run.mark()
    api.put("pods", o.pod("p000", NODE, ["10.244.9.9"]))
    run.wait_for("k8s.pod.ip_changed", since=since, name="p000")
    api.expire_watches("pods")
    relist = _wait_lists(api, len(first), 2)
    assert [(r.query.get("resourceVersion"), r.query["limit"]) for r in relist] == [(relist[0].query.get(
        "resourceVersion"), "500"), (None, "500")] and relist[0].query.get("resourceVersion") not in (None, "0")
    assert len(run.events("k8s.pod.ip_allocated")) == 600


def test_a_list_response_over_the_bound_is_refused(api: ApiServer, kubeconfig: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-cluster rv=0 list comes in one response: it is read up to a bound, not held whole."""
    api.put_many("pods", [o.pod(f"p{i}", f"node-{i % 3}", [f"10.0.0.{i + 1}"]) for i in range(50)])
    cfg = Config.from_dict({"node_name": NODE, "kubernetes": {"kubeconfig": str(kubeconfig), "pod_scope": "cluster"}})
    inf = informer.Informer(conf=informer.client_configuration(events.locate(str(kubeconfig))),
                            resource=events.PODS, cfg=cfg, out=informer.Outbox(), stop=threading.Event())
    monkeypatch.setattr(informer, "MAX_RESPONSE_BYTES", 4096)
    with pytest.raises(informer.Problem, match="list pods: a response over 4096 bytes") as err:
        inf._list()
    assert err.value.code == "k8s_bad_response" and not inf.tracker.cache
    monkeypatch.setattr(informer, "MAX_RESPONSE_BYTES", 1 << 20)
    inf._list()
    assert len(inf.tracker.cache) == 50
