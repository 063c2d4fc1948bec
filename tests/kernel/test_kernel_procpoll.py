"""The proc-poll fallback as a real process: what a /proc scan catches of
the same real plugin runs, and how much of a fast loop it misses."""

from __future__ import annotations

import ipaddress
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cni import delete_link, netns, run_plugin
from harness import WorkerRun
from kernel_support import needs_plugins, needs_root, start_module_worker, stop_module_worker

pytestmark = [needs_root, needs_plugins, pytest.mark.root]

POLL_S = 0.3
MEASUREMENTS = Path(__file__).resolve().parents[2] / "build" / "measurements" / "kernel-proc-poll.json"


@pytest.fixture(scope="module")
def procpoll(bin_dir: Path, kernel_tmp: Path) -> Iterator[WorkerRun]:
    run = start_module_worker("proc-poll", bin_dir, kernel_tmp, process_poll_interval=POLL_S)
    yield run
    stop_module_worker(run)


def test_slow_run_links_addrs_and_netns(procpoll: WorkerRun, bin_dir: Path, kernel_tmp: Path) -> None:
    """A plugin that takes longer than a scan (a wrapper script that waits,
    then execs the real bridge plugin) is caught, with its CNI environment."""
    slow = bin_dir / "slow-bridge"
    slow.write_text(f"#!/bin/sh\nsleep {4 * POLL_S}\nexec {bin_dir}/bridge\n")
    slow.chmod(0o755)
    bridge, container = f"pbr{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    conf = {"cniVersion": "1.0.0", "name": "slow-net", "type": "slow-bridge", "bridge": bridge, "isGateway": True,
            "ipam": {"type": "host-local", "subnet": "10.205.0.0/24", "dataDir": str(kernel_tmp / "ipam-pp")}}
    since = procpoll.mark()
    try:
        with netns() as ns:
            add = run_plugin(bin_dir, conf, command="ADD", container_id=container, netns=ns,
                             cni_args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=slow-0")
            assert add.exit_code == 0, add.stderr
            bridge_index = socket.if_nametoindex(bridge)
            created = procpoll.wait_for("netns.created", since=since, path=ns, timeout_s=5).data
            assert created["inode"] > 0
            started = procpoll.wait_for("cni.plugin.started", since=since, container_id=container).data
            assert started["path"] == str(slow) and started["command"] == "ADD" and started["netns"] == ns
            assert started["cni_args"]["K8S_POD_NAME"] == "slow-0" and started["ifname"] == "eth0"
            finished = procpoll.wait_for("cni.plugin.finished", since=since, run_id=started["run_id"]).data
            assert finished["duration_approximate"] is True and "exit_code" not in finished
            assert finished["duration_ms"] >= 4 * POLL_S * 1000 * 0.9
            assert "result" not in finished and "network" not in finished  # no stdin/stdout from /proc
            link = procpoll.wait_for("link.created", since=since, name=bridge, timeout_s=5).data
            assert link["kind"] == "bridge" and link["ifindex"] == bridge_index and "pid" not in link
            gw = ipaddress.ip_interface(add.json["ips"][0]["gateway"] + "/24")
            addr = procpoll.wait_for("addr.added", since=since, address=str(gw.ip), timeout_s=5).data
            assert addr["ifname"] == bridge and addr["prefixlen"] == 24
            host_veth = next(i["name"] for i in add.json["interfaces"] if i["name"] not in (bridge, "eth0"))
            veth = procpoll.wait_for("link.created", since=since, name=host_veth, timeout_s=5).data
            assert veth["master"] == bridge_index and veth["master_name"] == bridge
            run_plugin(bin_dir, {**conf, "type": "bridge"}, command="DEL", container_id=container, netns=ns)
            procpoll.wait_for("link.deleted", since=since, name=host_veth, timeout_s=5)
    finally:
        delete_link(bridge)
    procpoll.wait_for("netns.deleted", since=since, path=ns, timeout_s=5)
    procpoll.wait_for("link.deleted", since=since, name=bridge, timeout_s=5)


def test_capture_rate_of_fast_runs(procpoll: WorkerRun, bin_dir: Path) -> None:
    """Runs of a few milliseconds, back to back: proc-poll sees only those
    alive at a scan. The rate is recorded, and must be below the eBPF's 100 %."""
    n, prefix = 100, uuid.uuid4().hex[:8]
    conf = {"cniVersion": "1.0.0", "name": "lo-net", "type": "loopback"}
    since = procpoll.mark()
    t0 = time.monotonic()
    with netns() as ns:
        for i in range(n):
            assert run_plugin(bin_dir, conf, command="ADD", container_id=f"{prefix}-{i}", netns=ns).exit_code == 0
    loop_s = time.monotonic() - t0
    procpoll.pump(3 * POLL_S)
    seen = [r.data for r in procpoll.events("cni.plugin.started", since=since)
            if r.data.get("container_id", "").startswith(prefix)]
    for d in seen:
        assert d["plugin"] == "loopback" and d["command"] == "ADD"
    rate = len(seen) / n
    MEASUREMENTS.parent.mkdir(parents=True, exist_ok=True)
    MEASUREMENTS.write_text(json.dumps({"runs": n, "loop_s": round(loop_s, 2), "poll_interval_s": POLL_S,
                                        "captured": len(seen), "capture_rate": rate}, indent=1))
    assert rate < 1.0


def test_failed_add_is_seen_without_its_error(procpoll: WorkerRun, bin_dir: Path, kernel_tmp: Path) -> None:
    """proc-poll sees a slow failing ADD run, but not why it failed: no
    exit code, no stdout. This is what the ebpf worker adds."""
    slow = bin_dir / "slow-ptp"
    slow.write_text(f"#!/bin/sh\nsleep {4 * POLL_S}\nexec {bin_dir}/ptp\n")
    slow.chmod(0o755)
    conf = {"cniVersion": "1.0.0", "name": "bad-net", "type": "slow-ptp",
            "ipam": {"type": "host-local", "subnet": "10.206.0.0/24", "rangeStart": "10.206.0.9",
                     "rangeEnd": "10.206.0.9", "dataDir": str(kernel_tmp / "ipam-pp-bad")}}
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    since = procpoll.mark()
    with netns() as ns1, netns() as ns2:
        assert run_plugin(bin_dir, conf, command="ADD", container_id=first, netns=ns1).exit_code == 0
        bad = run_plugin(bin_dir, conf, command="ADD", container_id=second, netns=ns2,
                         cni_args="K8S_POD_NAME=stuck-0")
        assert bad.exit_code != 0
        run_plugin(bin_dir, {**conf, "type": "ptp"}, command="DEL", container_id=first, netns=ns1)
    started = procpoll.wait_for("cni.plugin.started", since=since, container_id=second).data
    assert started["cni_args"] == {"K8S_POD_NAME": "stuck-0"} and started["netns"] == ns2
    finished = procpoll.wait_for("cni.plugin.finished", since=since, run_id=started["run_id"]).data
    assert "exit_code" not in finished and "error" not in finished and finished["duration_approximate"]
