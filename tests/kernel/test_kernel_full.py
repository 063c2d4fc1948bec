"""The ebpf worker with ``kernel.capture: full`` (always-on syscall
tracepoints): what only it sees — the network config on stdin and the
netlink requests themselves — on real reference-plugin runs. Its cost to
every other process is measured by ``make bench``, not here."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cni import delete_link, netns, run_plugin
from harness import WorkerRun
from kernel_support import (
    bridge_conf,
    cid,
    latest_info,
    needs_plugins,
    needs_root,
    one,
    pod_args,
    run_fd_reuse_plugin,
    script_plugin,
    start_module_worker,
    stop_module_worker,
)

from cnisup.workers.kernel import features, full

pytestmark = [needs_root, needs_plugins, pytest.mark.root]


@pytest.fixture(scope="module")
def ebpf_full(bin_dir: Path, kernel_tmp: Path) -> Iterator[WorkerRun]:
    run = start_module_worker("ebpf", bin_dir, kernel_tmp, capture="full")
    info = latest_info(run)
    assert info["capture"] == "full" and "read()" in info["tax"]
    yield run
    stop_module_worker(run)


def test_bridge_add_with_requests(ebpf_full: WorkerRun, bin_dir: Path, kernel_tmp: Path) -> None:
    since = ebpf_full.mark()
    container, bridge = cid(), f"fbr{uuid.uuid4().hex[:6]}"
    conf = bridge_conf(kernel_tmp, bridge, "10.207.0.0/24")
    try:
        with netns() as ns:
            add = run_plugin(bin_dir, conf, command="ADD", container_id=container, netns=ns,
                             cni_args=pod_args("web-f"))
            assert add.exit_code == 0, add.stderr
            bridge_index = socket.if_nametoindex(bridge)
            assert run_plugin(bin_dir, conf, command="DEL", container_id=container, netns=ns).exit_code == 0
    finally:
        delete_link(bridge)
    result = add.json
    created = one(ebpf_full, "netns.created", since, comm="ip", via="unshare")
    assert "run_id" not in created  # ip netns add is no CNI run
    started = one(ebpf_full, "cni.plugin.started", since, plugin="bridge", command="ADD", container_id=container)
    assert started["network"] == conf["name"] and started["type"] == "bridge" and started["netns"] == ns
    finished = one(ebpf_full, "cni.plugin.finished", since, run_id=started["run_id"])
    assert finished["exit_code"] == 0 and finished["result"]["interfaces"] == result["interfaces"]
    by_run = {"run_id": started["run_id"], "container_id": container, "plugin": "bridge"}
    host_veth = next(i["name"] for i in result["interfaces"] if i["name"] not in (bridge, "eth0"))
    veth = one(ebpf_full, "link.created", since, name="eth0", **by_run)
    assert veth["kind"] == "veth" and veth["peer"] == host_veth
    one(ebpf_full, "link.changed", since, master=bridge_index, **by_run)
    assert one(ebpf_full, "netns.entered", since, **by_run)["pid"] == started["pid"]


def test_peer_netns_of_a_reused_fd_is_not_a_wrong_file(ebpf_full: WorkerRun, bin_dir: Path) -> None:
    """The request names the peer's namespace by an fd the plugin closes and
    reuses at once: the event keeps ``fd:N`` rather than name /dev/null."""
    since = ebpf_full.mark()
    host_veth, _ = run_fd_reuse_plugin(bin_dir)
    veth = one(ebpf_full, "link.created", since, name=host_veth)
    assert veth["peer"] == "eth7"
    assert veth["peer_netns"].startswith(("net:[", "fd:", "/")) and veth["peer_netns"] != "/dev/null"


def test_garbage_netlink_from_a_plugin_is_reported(ebpf_full: WorkerRun, bin_dir: Path) -> None:
    """A "plugin" sends a malformed RTM_NEWLINK: a monitor.warning, and the worker keeps going."""
    script = script_plugin(bin_dir, "garbage-plugin", (
        "#!/usr/bin/python3\n"
        "import socket, struct, sys\n"
        "sys.stdin.read()\n"
        "s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)\n"
        "body = b'\\xff' * 40\n"
        "msg = struct.pack('=IHHII', 16 + len(body), 16, 0x401, 1, 0) + body\n"
        "s.sendto(msg + b'\\x01\\x02\\x03', (0, 0))\n"
        "print('not json')\n"))
    since = ebpf_full.mark()
    p = subprocess.run([str(script)], input=b"{}", env={"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "garbage"},
                       capture_output=True, check=False)
    assert p.returncode == 0, p.stderr
    warn = one(ebpf_full, "monitor.warning", since, code="bad_netlink")
    assert "trailing" in warn["message"] or "netlink message" in warn["message"]
    done = one(ebpf_full, "cni.plugin.finished", since, plugin="garbage-plugin")
    assert done["output_error"].startswith("invalid JSON") and done["stdout"] == "not json\n"
    assert done["container_id"] == "garbage" and done["exit_code"] == 0


def test_program_loads_without_any_optional_tracepoint() -> None:
    """The build a kernel with only the required tracepoints gets: every
    optional probe compiled out, no sched_process_exit group_dead."""
    from bcc import BPF

    bpf = BPF(src_file=str(full.BPF_SOURCE).encode(),
              cflags=[*full.build_flags([], group_dead=False, ringbuf_pages=64), f"-I{full.BPF_SOURCE.parent}"])
    try:
        assert bpf.num_open_tracepoints() == len(features.REQUIRED)
    finally:
        bpf.cleanup()
    assert os.path.exists(full.BPF_SOURCE)
