"""Comparison 4: the k8s family, k8s-informer vs kubectl, against the test
API-server emulator (``tests/k8s/apiserver.py``: the real list/watch
protocol) holding 1,000 and then 5,000 pods of this node plus services and
EndpointSlices. For each size, each worker in turn under ``cnisup start``:
memory once its cache holds everything (the worker plus, for kubectl, its
``kubectl`` children), the CPU it took to get there, then the latency of
pod IP changes from the API change to an external subscriber."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from tests.k8s import objects as o
from tests.k8s.apiserver import ApiServer

from .common import Instance, Listener, percentile, row, tree_cpu_seconds, tree_rss_bytes, world_dir

NODE = "bench"  #: Instance's node_name
WORKERS = ("k8s-informer", "kubectl")
LATENCY_POD = "bench-latency"
#: One Service (and one EndpointSlice of ENDPOINTS_PER_SLICE endpoints) per this many pods.
PODS_PER_SERVICE = 10
ENDPOINTS_PER_SLICE = 10


def _ip(i: int) -> str:
    return f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}"


def _populate(api: ApiServer, start: int, stop: int) -> None:
    """Pods ``start..stop-1`` of this node, and their services and slices."""
    api.put_many("pods", [o.pod(f"p{i:05d}", NODE, [_ip(i)], ns=f"ns{i % 20}",
                                annotations={"cni.projectcalico.org/podIP": f"{_ip(i)}/32"})
                          for i in range(start, stop)])
    for s in range(start // PODS_PER_SERVICE, stop // PODS_PER_SERVICE):
        name = f"svc{s:04d}"
        api.put("services", o.service(name, f"10.96.{s // 256}.{s % 256}", ns=f"ns{s % 20}"))
        api.put("endpointslices", o.endpointslice(
            f"{name}-x", name, [(_ip(s * PODS_PER_SERVICE + k), True, NODE) for k in range(ENDPOINTS_PER_SLICE)],
            ns=f"ns{s % 20}"))


def _expected(pods: int) -> dict[str, int]:
    return {"pods": pods + 1, "services": pods // PODS_PER_SERVICE,
            "endpointslices": pods // PODS_PER_SERVICE, "nodes": 1}


def _settled(inst: Instance, expected: dict[str, int], timeout_s: float) -> dict[str, Any]:
    """The worker's status once its cache holds every object."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = next(w for w in inst.status()["workers"] if w["family"] == "k8s")
            res = (last.get("info") or {}).get("resources") or {}
            if all((res.get(r) or {}).get("cached") == n for r, n in expected.items()):
                return last
        except Exception:  # status not answering yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"k8s worker did not settle: {last}")


def _one(worker: str, api: ApiServer, base: Path, pods: int, changes: int) -> dict[str, Any]:
    inst = Instance(base, config={
        "monitors": {"kernel": False, "config": False, "k8s": True}, "use_k8s_informer": worker == "k8s-informer",
        "kubernetes": {"kubeconfig": str(base.parent / "kubeconfig"), "pod_scope": "node"}})
    listener = Listener(inst.endpoint)
    t0 = time.monotonic()
    inst.start()
    try:
        w = _settled(inst, _expected(pods), timeout_s=120)
        settle_s = time.monotonic() - t0
        if w["worker"] != worker:
            raise RuntimeError(f"expected {worker}, cnisup runs {w['worker']}: {w.get('fallback_reason')}")
        pid = int(w["pid"])
        cpu = tree_cpu_seconds(pid)
        time.sleep(1.0)  # past the last initial publish
        rss, kids = tree_rss_bytes(pid)
        while listener.recv(0.3):  # the initial state, already received
            pass
        api.wait_watches("pods")
        latencies: list[float] = []
        for i in range(changes):
            ip = f"10.250.{i // 256}.{i % 256}"
            sent = time.time()
            api.put("pods", o.pod(LATENCY_POD, NODE, [ip]))
            at, _ = listener.until(lambda e, ip=ip: e["kind"] == "k8s.pod.ip_changed"
                                   and e["data"].get("name") == LATENCY_POD and e["data"].get("ips") == [ip], 10)
            latencies.append((at - sent) * 1000)
            time.sleep(0.01)
        return {"worker": worker, "pods": pods, "rss": rss, "processes": 1 + kids, "cpu_to_settle_s": cpu,
                "settle_s": settle_s, "latencies_ms": latencies}
    finally:
        inst.stop()
        listener.close()


def run(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    name = "k8s family: k8s-informer vs kubectl"
    if shutil.which("kubectl") is None:
        return [{"name": name, "metric": "skipped: no kubectl (Debian's kubernetes-client)", "primary": None,
                 "fallback": None, "ratio": None, "unit": "-"}], {}
    # Quick mode (the suite's smoke run) is about the code path: the emulator fills 5,000 pods slowly.
    sizes = (100, 300) if quick else (1000, 5000)
    changes = 10 if quick else 200
    base = world_dir("cnisup-bench-k8s-")
    api = ApiServer(bookmark_interval_s=1.0).start()
    res: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        api.write_kubeconfig(base / "kubeconfig")
        api.put("nodes", o.node(NODE, "10.64.0.0/16", "192.168.0.10"))
        api.put("pods", o.pod(LATENCY_POD, NODE, ["10.250.255.254"]))
        done = 0
        for pods in sizes:
            _populate(api, done, pods)
            done = pods
            # Forget the history: the emulator scans it on every change for every watch, which
            # would put milliseconds of its own into the latency. Workers start after this. One
            # change after it: the emulator expires continue tokens at the compaction point itself.
            api.compact()
            api.put("nodes", o.node(NODE, "10.64.0.0/16", "192.168.0.10"))
            res[str(pods)] = {}
            for worker in WORKERS:
                d = base / f"{worker}-{pods}"
                d.mkdir()
                d.chmod(0o755)
                res[str(pods)][worker] = _one(worker, api, d, pods, changes)
    finally:
        api.stop()
        shutil.rmtree(base, ignore_errors=True)
    rows: list[dict[str, Any]] = []
    for pods in sizes:
        i, k = res[str(pods)]["k8s-informer"], res[str(pods)]["kubectl"]
        svc = pods // PODS_PER_SERVICE
        rows.append(row(name, f"RSS with {pods:,} pods, {svc} services, {svc} slices", i["rss"], k["rss"], "bytes",
                        note=f"after the initial list; kubectl: the worker and its {k['processes'] - 1} "
                             "kubectl processes, RSS summed (shared pages count per process)" if pods == sizes[0]
                        else None))
        rows.append(row(name, f"CPU from start to cache filled, {pods:,} pods", i["cpu_to_settle_s"],
                        k["cpu_to_settle_s"], "s"))
    big_i, big_k = res[str(sizes[-1])]["k8s-informer"], res[str(sizes[-1])]["kubectl"]
    for p in (50, 99):
        rows.append(row(name, f"pod IP change -> subscriber p{p} ({sizes[-1]:,} pods)",
                        percentile(big_i["latencies_ms"], p), percentile(big_k["latencies_ms"], p), "ms",
                        changes=changes))
    return rows, res
