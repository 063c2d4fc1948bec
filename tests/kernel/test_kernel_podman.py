"""The ebpf worker (lean capture) against a real container runtime: Debian's
podman with its CNI backend drives the reference plugins the way a node
does (bridge → portmap → firewall → tuning, host-local delegated; the
namespace made on a thread and pinned as /run/netns/netns-<uuid>; the full
container id; K8S_POD_NAME = the container's name). Every field is checked
against ``podman inspect`` and what podman printed. A few containers and a
failing one: CI time is short."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cni import delete_link
from harness import WorkerRun
from kernel_support import needs_plugins, needs_root, one, start_module_worker, stop_module_worker

pytestmark = [needs_root, needs_plugins, pytest.mark.root,
              pytest.mark.skipif(shutil.which("podman") is None or shutil.which("runc") is None,
                                 reason="podman and runc are not installed (scripts/setup.sh installs them)")]

CHAIN = ("bridge", "portmap", "firewall", "tuning")
PLUGINS = (*CHAIN, "host-local", "loopback")


@dataclass
class Podman:
    base: Path

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CONTAINERS_CONF": str(self.base / "containers.conf")}
        return subprocess.run(["podman", "--root", str(self.base / "root"), "--runroot", str(self.base / "run"),
                               "--storage-driver", "vfs", *args], env=env, capture_output=True, text=True,
                              timeout=120, check=check)

    def run(self, name: str, network: str) -> subprocess.CompletedProcess[str]:
        # --rootfs: no image to pull; sleep and its libc are all the container needs.
        return self("run", "-d", "--name", name, "--network", network, "--rootfs", str(self.base / "rootfs"),
                    "/bin/sleep", "300", check=False)

    def inspect(self, name: str) -> dict[str, object]:
        doc: list[dict[str, object]] = json.loads(self("inspect", name).stdout)
        return doc[0]


def _rootfs(root: Path) -> None:
    for src in ("/bin/sleep", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"):
        dst = root / src.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    for d in ("proc", "sys", "dev", "etc", "tmp"):
        (root / d).mkdir(exist_ok=True)


@pytest.fixture(scope="module")
def podman(kernel_tmp: Path) -> Iterator[Podman]:
    if os.uname().machine != "x86_64":
        pytest.skip("the rootfs is put together from x86_64 library paths")
    base = kernel_tmp / "podman"
    bin_dir = base / "bin"
    bin_dir.mkdir(parents=True)
    for p in PLUGINS:
        shutil.copy2(f"/usr/lib/cni/{p}", bin_dir / p)
    _rootfs(base / "rootfs")
    (base / "net.d").mkdir()
    # The runtime as a node runs it: CNI backend, runc, cgroupfs, lowered limits.
    (base / "containers.conf").write_text(f"""
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
events_logfile_path = "{base}/events.log"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin_dir}"]
network_config_dir = "{base}/net.d"
""")
    pm = Podman(base)
    probe = pm("info", check=False)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run here: {probe.stderr.strip()[-300:]}")
    yield pm


@pytest.fixture(scope="module")
def ebpf(podman: Podman, kernel_tmp: Path) -> Iterator[WorkerRun]:
    run = start_module_worker("ebpf", podman.base / "bin", kernel_tmp)
    yield run
    stop_module_worker(run)


def _network(pm: Podman, subnet: str) -> tuple[str, str]:
    """A podman network of its own: (name, its bridge)."""
    name = f"cnisup-{uuid.uuid4().hex[:6]}"
    pm("network", "create", "--subnet", subnet, name)
    conf = json.loads((pm.base / "net.d" / f"{name}.conflist").read_text())
    return name, next(p["bridge"] for p in conf["plugins"] if p["type"] == "bridge")


def test_podman_runs_against_podman_inspect(ebpf: WorkerRun, podman: Podman) -> None:
    since = ebpf.mark()
    net, bridge = _network(podman, "10.89.31.0/24")
    small, small_bridge = _network(podman, "10.89.32.0/30")  # one address: the second container fails
    names = [f"pm-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    filler, failing = f"pm-{uuid.uuid4().hex[:6]}-full", f"pm-{uuid.uuid4().hex[:6]}-fail"
    seen: dict[str, dict[str, object]] = {}
    try:
        for name in names:
            out = podman.run(name, net)
            assert out.returncode == 0, out.stderr
            seen[name] = podman.inspect(name)
            seen[name]["netns_inode"] = os.stat(str(_settings(seen[name])["SandboxKey"])).st_ino
        assert podman.run(filler, small).returncode == 0
        bad = podman.run(failing, small)
        assert bad.returncode != 0 and "no IP addresses available" in bad.stderr
        podman("rm", "-f", "-t", "0", *names, filler, failing)
    finally:
        podman("rm", "-f", "-t", "0", *names, filler, failing, check=False)
        podman("network", "rm", "-f", net, small, check=False)
        delete_link(bridge)
        delete_link(small_bridge)
    host = os.stat("/proc/self/ns/net").st_ino
    for name, doc in seen.items():
        cid, settings = str(doc["Id"]), _settings(doc)
        started = one(ebpf, "cni.plugin.started", since, plugin="bridge", command="ADD", container_id=cid)
        assert started["netns"] == settings["SandboxKey"] and started["ifname"] == "eth0"
        assert started["cni_args"]["K8S_POD_NAME"] == name, started["cni_args"]
        done = one(ebpf, "cni.plugin.finished", since, run_id=started["run_id"])
        ip = str(settings["Networks"][net]["IPAddress"])  # type: ignore[index]
        assert done["exit_code"] == 0 and [a["address"].split("/")[0] for a in done["result"]["ips"]] == [ip]
        one(ebpf, "addr.added", since, address=ip, run_id=started["run_id"])
        # The namespace podman made on a thread: its own inode, not the host's.
        created = one(ebpf, "netns.created", since, inode=doc["netns_inode"])
        assert created["inode"] != host
        for plugin in CHAIN[1:]:
            one(ebpf, "cni.plugin.finished", since, plugin=plugin, command="ADD", container_id=cid, exit_code=0)
        for plugin in CHAIN:
            one(ebpf, "cni.plugin.finished", since, plugin=plugin, command="DEL", container_id=cid, exit_code=0)
    ebpf.pump(1.0)
    fail = next(r.data for r in ebpf.events("cni.plugin.finished", since=since, plugin="bridge", command="ADD")
                if r.data.get("cni_args", {}).get("K8S_POD_NAME") == failing)
    assert fail["exit_code"] != 0 and fail["error"]["msg"] in bad.stderr
    assert not ebpf.events("monitor.warning", since=since, code="ringbuf_loss")


def _settings(doc: dict[str, object]) -> dict[str, object]:
    settings = doc["NetworkSettings"]
    assert isinstance(settings, dict)
    return settings
