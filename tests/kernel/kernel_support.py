"""Helpers of the kernel family tests: markers, one long-lived worker per
module (compiling the BPF program takes ~1.5 s), and process measurements."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from cni import delete_link, have_plugins, netns, run_plugin
from harness import WorkerRun

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")
needs_plugins = pytest.mark.skipif(not have_plugins(), reason="Debian's containernetworking-plugins is not installed")


def worker_config(bin_dir: Path, *, capture: str = "lean", **fallback: Any) -> dict[str, Any]:
    return {"node_name": "test-node", "cni": {"bin_dirs": [str(bin_dir)], "conf_dirs": ["/nonexistent"]},
            "kernel": {"capture": capture}, "fallback": {"process_poll_interval": 5.0, **fallback}}


def start_module_worker(name: str, bin_dir: Path, tmp: Path, *, capture: str = "lean", **fallback: Any) -> WorkerRun:
    run = WorkerRun(name, worker_config(bin_dir, capture=capture, **fallback), tmp=tmp, heartbeat_interval_s=0.5)
    run.start(ready_timeout_s=60)
    # Ready once the first heartbeat with worker details arrived (BPF loaded).
    run.wait_status(lambda s: s["t"] == "exit" or (s["t"] == "hb" and "runs_active" in s.get("info", {})),
                    timeout_s=60)
    assert run.exit_status() is None, run.stderr()
    return run


def stop_module_worker(run: WorkerRun) -> None:
    """Stop a module-scoped worker: clean exit 0 and no protocol problems."""
    try:
        assert run.stop() == 0, run.stderr()
        assert not run.problems, run.problems[:5]
    finally:
        run.close()


def latest_info(run: WorkerRun) -> dict[str, Any]:
    run.pump(0)
    beats = [s for _, s in run.status if s["t"] == "hb"]
    info: dict[str, Any] = beats[-1]["info"] if beats else {}
    return info


def cpu_s(pid: int) -> float:
    """CPU time of all threads (ZeroMQ's I/O thread included), in ns
    precision from schedstat rather than clock ticks."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total / 1e9


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


MEASUREMENTS_DIR = Path(__file__).resolve().parents[2] / "build" / "measurements"


def record(name: str, key: str, value: Any) -> None:
    """One measurement into ``build/measurements/<name>.json`` (read by nothing
    that asserts: performance claims live in ``make bench``)."""
    path = MEASUREMENTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=1))


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


def script_plugin(bin_dir: Path, name: str, text: str) -> Path:
    """A plugin that is a script in the bin dir (as some real ones are)."""
    path = bin_dir / name
    path.write_text(text)
    path.chmod(0o755)
    return path


REUSED_FD_PLUGIN = """#!/usr/bin/python3
# Makes a veth whose peer goes into CNI_NETNS through a namespace fd, then
# closes the fd and opens other files: the fd number now means something else.
import json, os, sys
from pyroute2 import IPRoute
sys.stdin.read()
fd = os.open(os.environ["CNI_NETNS"], os.O_RDONLY)
with IPRoute() as ipr:
    ipr.link("add", ifname=os.environ["CNI_ARGS"].split("=")[1], kind="veth",
             peer={"ifname": "eth7", "net_ns_fd": fd})
os.close(fd)
reused = os.open("/dev/null", os.O_RDONLY)
assert reused == fd
json.dump({"cniVersion": "1.0.0", "interfaces": [{"name": "eth7"}]}, sys.stdout)
"""


def run_fd_reuse_plugin(bin_dir: Path) -> tuple[str, str]:
    """Run ``REUSED_FD_PLUGIN`` in a fresh namespace: (the host veth's name, ``net:[inode]`` of the peer's)."""
    script_plugin(bin_dir, "fd-reuse", REUSED_FD_PLUGIN)
    host_veth = f"vr{uuid.uuid4().hex[:8]}"
    try:
        with netns() as ns:
            out = run_plugin(bin_dir, {"cniVersion": "1.0.0", "name": "fd", "type": "fd-reuse"}, command="ADD",
                             container_id=cid(), netns=ns, cni_args=f"VETH={host_veth}")
            assert out.exit_code == 0, out.stderr
            return host_veth, f"net:[{os.stat(ns).st_ino}]"
    finally:
        delete_link(host_veth)
