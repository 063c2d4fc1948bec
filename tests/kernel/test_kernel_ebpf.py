"""The ebpf worker as a real process (the harness plays the supervisor), on
real reference-plugin runs in real network namespaces. Every assertion about
a run compares the event with what the plugin itself printed."""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cni import delete_link, netns, run_chain, run_plugin
from harness import WorkerRun
from kernel_support import (
    cpu_s,
    latest_info,
    needs_plugins,
    needs_root,
    rss_kib,
    start_module_worker,
    stop_module_worker,
)

from cnisup.workers.kernel import ebpf as ebpf_worker
from cnisup.workers.kernel import features
from cnisup.workers.privileges import Identity

pytestmark = [needs_root, needs_plugins, pytest.mark.root]

MEASUREMENTS = Path(__file__).resolve().parents[2] / "build" / "measurements" / "kernel-ebpf.json"


@pytest.fixture(scope="module")
def ebpf(bin_dir: Path, kernel_tmp: Path) -> Iterator[WorkerRun]:
    t0 = time.monotonic()
    run = start_module_worker("ebpf", bin_dir, kernel_tmp)
    record("startup_s", round(time.monotonic() - t0, 3))
    record("bpf_compile_load_s", latest_info(run)["load_s"])
    yield run
    stop_module_worker(run)


def record(key: str, value: Any) -> None:
    MEASUREMENTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(MEASUREMENTS.read_text()) if MEASUREMENTS.exists() else {}
    data[key] = value
    MEASUREMENTS.write_text(json.dumps(data, indent=1))


def cid() -> str:
    return uuid.uuid4().hex


def pod_args(name: str) -> str:
    return f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_UID={uuid.uuid4()}"


def one(run: WorkerRun, kind: str, since: int, **match: Any) -> dict[str, Any]:
    return run.wait_for(kind, since=since, timeout_s=10, **match).data


def bridge_conf(tmp: Path, bridge: str, subnet: str, **ipam: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": f"net-{bridge}", "type": "bridge", "bridge": bridge,
            "isGateway": True, "ipam": {"type": "host-local", "subnet": subnet,
                                        "dataDir": str(tmp / f"ipam-{bridge}"), **ipam}}


def test_bridge_add_then_del(ebpf: WorkerRun, bin_dir: Path, kernel_tmp: Path) -> None:
    since = ebpf.mark()
    container, bridge = cid(), f"cbr{uuid.uuid4().hex[:6]}"
    conf = bridge_conf(kernel_tmp, bridge, "10.201.0.0/24")
    try:
        with netns() as ns:
            ns_inode = os.stat(ns).st_ino
            add = run_plugin(bin_dir, conf, command="ADD", container_id=container, netns=ns,
                             cni_args=pod_args("web-0"))
            assert add.exit_code == 0, add.stderr
            bridge_index = socket.if_nametoindex(bridge)
            dele = run_plugin(bin_dir, conf, command="DEL", container_id=container, netns=ns,
                              cni_args=pod_args("web-0"))
            assert dele.exit_code == 0, dele.stderr
    finally:
        delete_link(bridge)
    result = add.json

    created = one(ebpf, "netns.created", since, comm="ip", via="unshare")
    assert "run_id" not in created  # ip netns add is no CNI run
    # The inode is read from /proc after the fact: absent if `ip` was already gone.
    assert created.get("inode", ns_inode) == ns_inode

    started = one(ebpf, "cni.plugin.started", since, plugin="bridge", command="ADD", container_id=container)
    assert started["path"] == str(bin_dir / "bridge") and started["ppid"] == os.getpid()
    assert started["netns"] == ns and started["ifname"] == "eth0" and started["network"] == conf["name"]
    assert started["cni_args"]["K8S_POD_NAME"] == "web-0"
    assert started["cni_args"]["K8S_POD_NAMESPACE"] == "default"
    run_id = started["run_id"]

    ipam = one(ebpf, "cni.plugin.started", since, plugin="host-local", container_id=container, command="ADD")
    assert ipam["parent_run"] == run_id and ipam["ppid"] == started["pid"]
    ipam_done = one(ebpf, "cni.plugin.finished", since, run_id=ipam["run_id"])
    assert ipam_done["exit_code"] == 0
    assert [i["address"] for i in ipam_done["result"]["ips"]] == [i["address"] for i in result["ips"]]

    finished = one(ebpf, "cni.plugin.finished", since, run_id=run_id)
    assert finished["exit_code"] == add.exit_code == 0 and finished["duration_ms"] > 0
    assert finished["cni_args"]["K8S_POD_NAME"] == "web-0" and finished["container_id"] == container
    assert finished["result"]["ips"] == [{k: v for k, v in ip.items() if k in ("address", "gateway", "interface")}
                                         for ip in result["ips"]]
    assert finished["result"]["interfaces"] == result["interfaces"]
    assert "truncated" not in finished and "error" not in finished

    # What the kernel was told, attributed to the run.
    by_run = {"run_id": run_id, "container_id": container, "plugin": "bridge"}
    assert one(ebpf, "link.created", since, name=bridge, **by_run)["kind"] == "bridge"
    host_veth = next(i["name"] for i in result["interfaces"] if i["name"] not in (bridge, "eth0"))
    veth = one(ebpf, "link.created", since, name="eth0", **by_run)
    assert veth["kind"] == "veth" and veth["peer"] == host_veth and veth["comm"] == "bridge"
    one(ebpf, "link.changed", since, master=bridge_index, **by_run)
    ip = ipaddress.ip_interface(result["ips"][0]["address"])
    addr = one(ebpf, "addr.added", since, address=str(ip.ip), **by_run)
    assert addr["prefixlen"] == ip.network.prefixlen and addr["family"] == "inet"
    entered = one(ebpf, "netns.entered", since, **by_run)
    assert entered["pid"] == started["pid"]

    del_started = one(ebpf, "cni.plugin.started", since, plugin="bridge", command="DEL", container_id=container)
    del_done = one(ebpf, "cni.plugin.finished", since, run_id=del_started["run_id"])
    assert del_done["exit_code"] == 0 and "result" not in del_done  # DEL prints nothing
    one(ebpf, "link.deleted", since, run_id=del_started["run_id"])


def test_ptp_chain(ebpf: WorkerRun, bin_dir: Path, kernel_tmp: Path) -> None:
    since = ebpf.mark()
    container = cid()
    conflist = {"cniVersion": "1.0.0", "name": "ptp-chain", "plugins": [
        {"type": "ptp", "ipMasq": False, "ipam": {"type": "host-local", "subnet": "10.202.0.0/24",
                                                  "dataDir": str(kernel_tmp / "ipam-ptp")}},
        {"type": "tuning", "mtu": 1400},
    ]}
    with netns() as ns:
        adds = run_chain(bin_dir, conflist, command="ADD", container_id=container, netns=ns,
                         cni_args=pod_args("chain-0"))
        assert [o.exit_code for o in adds] == [0, 0], [o.stderr for o in adds]
        dels = run_chain(bin_dir, conflist, command="DEL", container_id=container, netns=ns)
        assert [o.exit_code for o in dels] == [0, 0], [o.stderr for o in dels]
    ptp = one(ebpf, "cni.plugin.started", since, plugin="ptp", command="ADD", container_id=container)
    assert ptp["network"] == "ptp-chain" and ptp["cni_args"]["K8S_POD_NAME"] == "chain-0"
    ptp_done = one(ebpf, "cni.plugin.finished", since, run_id=ptp["run_id"])
    assert ptp_done["result"]["ips"][0]["address"] == adds[0].json["ips"][0]["address"]
    one(ebpf, "cni.plugin.finished", since, plugin="host-local", parent_run=ptp["run_id"], exit_code=0)
    tuning = one(ebpf, "cni.plugin.finished", since, plugin="tuning", command="ADD", container_id=container)
    assert tuning["exit_code"] == 0 and tuning["result"]["interfaces"] == adds[1].json["interfaces"]
    # tuning sets the MTU it was given: the request carries it.
    one(ebpf, "link.changed", since, run_id=tuning["run_id"], mtu=1400)
    ip = ipaddress.ip_interface(adds[0].json["ips"][0]["address"])
    one(ebpf, "addr.added", since, run_id=ptp["run_id"], address=str(ip.ip), prefixlen=ip.network.prefixlen)
    for plugin in ("tuning", "ptp"):  # DEL runs in reverse
        one(ebpf, "cni.plugin.finished", since, plugin=plugin, command="DEL", container_id=container, exit_code=0)


def test_failed_add_is_complete(ebpf: WorkerRun, bin_dir: Path, kernel_tmp: Path) -> None:
    """An exhausted IPAM range: the ADD that fails says why, like the plugin did."""
    since = ebpf.mark()
    bridge = f"fbr{uuid.uuid4().hex[:6]}"
    conf = bridge_conf(kernel_tmp, bridge, "10.203.0.0/24", rangeStart="10.203.0.10", rangeEnd="10.203.0.10")
    first, second = cid(), cid()
    try:
        with netns() as ns1, netns() as ns2:
            ok = run_plugin(bin_dir, conf, command="ADD", container_id=first, netns=ns1)
            assert ok.exit_code == 0, ok.stderr
            bad = run_plugin(bin_dir, conf, command="ADD", container_id=second, netns=ns2,
                             cni_args=pod_args("stuck-0"))
            assert bad.exit_code != 0
            run_plugin(bin_dir, conf, command="DEL", container_id=first, netns=ns1)
    finally:
        delete_link(bridge)
    printed = bad.json
    started = one(ebpf, "cni.plugin.started", since, plugin="bridge", command="ADD", container_id=second)
    failed = one(ebpf, "cni.plugin.finished", since, run_id=started["run_id"])
    assert failed["exit_code"] == bad.exit_code
    assert failed["error"]["code"] == printed["code"] and failed["error"]["msg"] == printed["msg"]
    assert failed["cni_args"]["K8S_POD_NAME"] == "stuck-0" and failed["network"] == conf["name"]
    assert failed["netns"] == ns2 and "result" not in failed
    ipam = one(ebpf, "cni.plugin.finished", since, plugin="host-local", parent_run=started["run_id"])
    assert ipam["exit_code"] != 0 and "no IP addresses available" in ipam["error"]["msg"]


@pytest.mark.timeout(300)  # 400 plugin execs: seconds alone, much longer on a host busy with other tests
def test_200_runs_back_to_back_no_loss(ebpf: WorkerRun, bin_dir: Path) -> None:
    n = int(os.environ.get("CNISUP_TEST_RUNS", "200"))
    prefix = uuid.uuid4().hex[:8]
    since = ebpf.mark()
    cpu0, t0 = cpu_s(ebpf.pid), time.monotonic()
    rss_peak: dict[str, int] = {}
    conf = {"cniVersion": "1.0.0", "name": "lo-net", "type": "loopback"}
    with netns() as ns:
        for i in range(n):
            for command in ("ADD", "DEL"):
                out = run_plugin(bin_dir, conf, command=command, container_id=f"{prefix}-{i}", netns=ns)
                assert out.exit_code == 0, out.stderr
            if i % 50 == 0:
                ebpf.pump(0)
                rss_peak = max(rss_peak, rss_kib(ebpf.pid), key=lambda r: r.get("VmRSS", 0))
    loop_s = time.monotonic() - t0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done = [r for r in ebpf.events("cni.plugin.finished", since=since)
                if r.data.get("container_id", "").startswith(prefix)]
        if len(done) >= 2 * n:
            break
        ebpf.pump(0.2)
    cpu_used = cpu_s(ebpf.pid) - cpu0
    wall = time.monotonic() - t0
    mine = [r.data for r in ebpf.received[since:] if r.data.get("container_id", "").startswith(prefix)]
    for kind in ("cni.plugin.started", "cni.plugin.finished"):
        for command in ("ADD", "DEL"):
            got = [r.data for r in ebpf.events(kind, since=since, command=command)
                   if r.data.get("container_id", "").startswith(prefix)]
            assert len(got) == n, f"{kind} {command}: {len(got)} of {n}"
    assert all(r.data["exit_code"] == 0 for r in ebpf.events("cni.plugin.finished", since=since)
               if r.data.get("container_id", "").startswith(prefix))
    info = latest_info(ebpf)
    assert info["kernel_dropped"] == 0 and info["decode_errors"] == 0
    assert not ebpf.events("monitor.warning", since=since, code="ringbuf_loss")
    record("loop_runs", 2 * n)
    record("loop_wall_s", round(loop_s, 2))
    record("loop_worker_cpu_s", round(cpu_used, 3))
    record("loop_worker_cpu_pct_of_core", round(100 * cpu_used / wall, 1))
    record("loop_worker_rss_kib", rss_peak)
    assert len(mine) >= 4 * n


def test_idle_cost(ebpf: WorkerRun) -> None:
    ebpf.pump(0.5)
    cpu0, t0 = cpu_s(ebpf.pid), time.monotonic()
    time.sleep(3.0)
    pct = 100 * (cpu_s(ebpf.pid) - cpu0) / (time.monotonic() - t0)
    record("idle_worker_cpu_pct_of_core", round(pct, 2))
    record("idle_worker_rss_kib", rss_kib(ebpf.pid))
    assert pct < 5.0  # design budget: well under 1 %; loose here for noisy CI hosts


def test_unrelated_netlink_spam_is_not_attributed(ebpf: WorkerRun) -> None:
    since = ebpf.mark()
    cpu0, t0 = cpu_s(ebpf.pid), time.monotonic()
    script = ("for i in $(seq 1 60); do ip link add cnisupspam type veth peer name cnisupspam1 && "
              "ip addr add 10.204.0.1/24 dev cnisupspam && ip link set cnisupspam up && "
              "ip link del cnisupspam; done")
    subprocess.run(["sh", "-c", script], check=True)
    spam_s = time.monotonic() - t0
    ebpf.pump(1.0)
    cpu_used = cpu_s(ebpf.pid) - cpu0
    attributed = [r for r in ebpf.received[since:] if r.kind.startswith(("cni.", "link.", "addr."))]
    assert attributed == [], [(r.kind, r.data) for r in attributed[:5]]
    record("netlink_spam_worker_cpu_pct_of_core", round(100 * cpu_used / (time.monotonic() - t0), 2))
    record("netlink_spam_s", round(spam_s, 2))
    assert cpu_used < 0.5 * spam_s + 0.2


def test_garbage_netlink_from_a_plugin_is_reported(ebpf: WorkerRun, bin_dir: Path) -> None:
    """A "plugin" (a Python script in the bin dir) sends a malformed
    RTM_NEWLINK: a monitor.warning, and the worker keeps going."""
    script = bin_dir / "garbage-plugin"
    script.write_text(
        "#!/usr/bin/python3\n"
        "import socket, struct, sys\n"
        "sys.stdin.read()\n"
        "s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)\n"
        "body = b'\\xff' * 40\n"
        "msg = struct.pack('=IHHII', 16 + len(body), 16, 0x401, 1, 0) + body\n"
        "s.sendto(msg + b'\\x01\\x02\\x03', (0, 0))\n"
        "print('not json')\n")
    script.chmod(0o755)
    since = ebpf.mark()
    p = subprocess.run([str(script)], input=b"{}", env={"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "garbage"},
                       capture_output=True, check=False)
    assert p.returncode == 0, p.stderr
    warn = one(ebpf, "monitor.warning", since, code="bad_netlink")
    assert "trailing" in warn["message"] or "netlink message" in warn["message"]
    done = one(ebpf, "cni.plugin.finished", since, plugin="garbage-plugin")
    assert done["output_error"].startswith("invalid JSON") and done["stdout"] == "not json\n"
    assert done["container_id"] == "garbage" and done["exit_code"] == 0


def test_ring_buffer_loss_is_counted_and_reported(bin_dir: Path, kernel_tmp: Path) -> None:
    """A stopped consumer and runs with 60 KB network configs overflow the
    4 MiB ring buffer: the BPF program counts the reservations it could not
    make, the worker reports them, and no run is left without an end."""
    run = start_module_worker("ebpf", bin_dir, kernel_tmp)
    try:
        since = run.mark()
        big = {"cniVersion": "1.0.0", "name": "big-net", "type": "loopback", "padding": "x" * 60_000}
        prefix = uuid.uuid4().hex[:8]
        os.kill(run.pid, signal.SIGSTOP)
        try:
            with netns() as ns:
                for i in range(120):
                    out = run_plugin(bin_dir, big, command="ADD", container_id=f"{prefix}-{i}", netns=ns)
                    assert out.exit_code == 0, out.stderr
        finally:
            os.kill(run.pid, signal.SIGCONT)
        warn = run.wait_for("monitor.warning", since=since, code="ringbuf_loss", timeout_s=15).data
        assert warn["dropped"] > 0 and warn["dropped_total"] >= warn["dropped"]
        run.wait_status(lambda s: s["t"] == "hb" and s["info"].get("kernel_dropped", 0) >= warn["dropped_total"])
        # Every run that was announced ends, complete or marked as such, within the reaping delay.
        # Runs whose start was lost are not reported, but counted: nothing goes unaccounted.
        plugin = str(bin_dir / "loopback")
        deadline = time.monotonic() + 20
        while True:
            run.pump(0.3)
            started = {r.data["run_id"] for r in run.events("cni.plugin.started", since=since, path=plugin)}
            finished = {r.data["run_id"]: r.data for r in run.events("cni.plugin.finished", since=since)}
            accounted = len(started) + latest_info(run).get("kernel_runs_lost", 0) == 120
            if (accounted and started <= finished.keys()) or time.monotonic() > deadline:
                break
        assert len(started) + latest_info(run)["kernel_runs_lost"] == 120
        assert started <= finished.keys(), f"{len(started - finished.keys())} runs never finished"
        for d in finished.values():
            complete = d.get("exit_code") == 0 and d.get("container_id", "").startswith(prefix) and "result" in d
            assert complete or d.get("truncated"), d
        record("loss_test_runs_announced", len(started))
        record("loss_test_kernel_dropped", warn["dropped_total"])
    finally:
        run.stop()
        run.close()


def test_without_privileges_exits_77_with_the_reason(bin_dir: Path, kernel_tmp: Path) -> None:
    """What a host without BPF looks like to the worker: exit 77 (the
    supervisor then starts proc-poll) and a reason naming what is missing."""
    pw = pwd.getpwnam("nobody")
    run = WorkerRun("ebpf", {"cni": {"bin_dirs": [str(bin_dir)]}}, tmp=kernel_tmp,
                    identity=Identity(uid=pw.pw_uid, gid=pw.pw_gid))
    try:
        run.start(ready_timeout_s=30)
        assert run.wait_exit(30) == 77
        status = run.exit_status()
        assert status is not None and "not root" in status["reason"]
    finally:
        run.close()


def test_latency_from_kernel_to_bus(ebpf: WorkerRun, bin_dir: Path) -> None:
    """From a plugin's exit (the event's ts, taken in the kernel) to the
    envelope arriving on the bus, one run at a time."""
    conf = {"cniVersion": "1.0.0", "name": "lo-net", "type": "loopback"}
    wall_minus_mono = time.time() - time.monotonic()
    latencies = []
    with netns() as ns:
        for i in range(40):
            container = f"lat-{uuid.uuid4().hex[:8]}-{i}"
            since = ebpf.mark()
            assert run_plugin(bin_dir, conf, command="ADD", container_id=container, netns=ns).exit_code == 0
            got = ebpf.wait_for("cni.plugin.finished", since=since, container_id=container)
            latencies.append((got.at + wall_minus_mono) * 1000 - got.env["ts"] / 1e6)
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99) - 1]
    record("finished_latency_ms", {"p50": round(p50, 2), "p99": round(p99, 2), "max": round(latencies[-1], 2)})
    assert p99 < 250  # design target 50 ms at normal rates; loose for loaded CI hosts


def test_program_loads_without_any_optional_tracepoint() -> None:
    """The build a kernel with only the required tracepoints gets: every
    optional probe compiled out, no sched_process_exit group_dead."""
    from bcc import BPF

    bpf = BPF(src_file=str(ebpf_worker.BPF_SOURCE).encode(),
              cflags=ebpf_worker.build_flags([], group_dead=False, ringbuf_pages=64))
    try:
        assert bpf.num_open_tracepoints() == len(features.REQUIRED)
    finally:
        bpf.cleanup()


CLONE_NEWNET_CHILD = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
child = libc.syscall(56, 0x40000000 | 17, 0, 0, 0, 0)  # x86_64 clone(CLONE_NEWNET | SIGCHLD)
if child == 0:
    time.sleep(0.5)  # alive while the worker reads /proc/<child>/ns/net
    os._exit(0)
print(child, os.readlink(f"/proc/{child}/ns/net"), flush=True)
os.waitpid(child, 0)
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="raw clone(2) syscall number is x86_64's")
def test_clone_with_new_netns_is_reported(ebpf: WorkerRun) -> None:
    since = ebpf.mark()
    out = subprocess.run([sys.executable, "-c", CLONE_NEWNET_CHILD], capture_output=True, text=True, check=True)
    child, ns = out.stdout.split()
    created = one(ebpf, "netns.created", since, via="clone", child_pid=int(child))
    assert created["netns"] == ns and created["comm"].startswith("python")
