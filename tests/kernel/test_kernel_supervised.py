"""The kernel family through the real supervisor: ``cnisup check`` names the
kernel features, ``cnisup start`` runs ebpf (or proc-poll when told so) and a
raw subscriber receives the run."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cni import netns, run_plugin
from e2e.support import CNISUP, Cnisup
from harness import world_dir
from kernel_support import needs_plugins, needs_root

from cnisup.workers.kernel import btf, features

pytestmark = [needs_root, needs_plugins, pytest.mark.root]


@pytest.fixture
def base(bin_dir: Path) -> Iterator[Path]:
    d = world_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def kernel_only(base: Path, bin_dir: Path, **over: object) -> Cnisup:
    c = Cnisup(base, monitors={"kernel": True, "config": False, "k8s": False}, **over)
    c.config["cni"]["bin_dirs"] = [str(bin_dir)]
    c.write_config()
    return c


def test_check_names_kernel_features(base: Path, bin_dir: Path) -> None:
    c = kernel_only(base, bin_dir)
    out = subprocess.run([CNISUP, "check", "--json", "--config", str(c.config_path)],
                         capture_output=True, text=True, timeout=60, check=True)
    kernel = next(f for f in json.loads(out.stdout)["families"] if f["family"] == "kernel")
    assert kernel["worker"] == "ebpf"
    probe = kernel["probes"]["ebpf"]
    assert probe["ok"] and probe["tracefs"] and probe["headers"].startswith("/")
    assert probe["capture"] == "lean" and probe["tax"].startswith("none measurable")
    assert probe["tracepoints_required"] == {tp: "ok" for tp in features.LEAN_REQUIRED}
    assert probe["tracepoints_optional"]["syscalls:sys_enter_write"] == "ok"
    assert probe["btf_offsets"] == len(btf.OFFSETS)
    assert kernel["probes"]["proc-poll"]["ok"]
    text = subprocess.run([CNISUP, "check", "--config", str(c.config_path)], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    assert "sched:sched_process_exec" in text and "[kernel] -> ebpf" in text
    # full: the tax is said where it is chosen.
    c.config["kernel"] = {"capture": "full"}
    c.write_config()
    text = subprocess.run([CNISUP, "check", "--config", str(c.config_path)], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    assert "capture: full" in text and f"tax: {features.TAX['full']}" in text
    assert "'syscalls:sys_enter_sendto': 'ok'" in text


@pytest.mark.parametrize("use_ebpf", [True, False])
def test_start_runs_the_kernel_worker(base: Path, bin_dir: Path, use_ebpf: bool) -> None:
    c = kernel_only(base, bin_dir, use_ebpf=use_ebpf, fallback={"process_poll_interval": 0.3})
    worker = "ebpf" if use_ebpf else "proc-poll"
    ev = c.subscribe()
    c.start()
    try:
        # Ready means capturing: the ebpf worker loads its program before it says so.
        started = ev.wait("supervisor.worker.ready", timeout_s=60, worker=worker)
        assert started["data"]["family"] == "kernel"
        container = uuid.uuid4().hex
        script = bin_dir / "slow-loopback"
        script.write_text(f"#!/bin/sh\nsleep 1\nexec {bin_dir}/loopback\n")
        script.chmod(0o755)
        with netns() as ns:
            out = run_plugin(bin_dir, {"cniVersion": "1.0.0", "name": "lo", "type": "slow-loopback"},
                             command="ADD", container_id=container, netns=ns)
            assert out.exit_code == 0, out.stderr
        done = ev.wait("cni.plugin.finished", timeout_s=10, container_id=container)
        assert done["source"] == worker and done["data"]["plugin"] == "slow-loopback"
        if use_ebpf:
            assert done["data"]["exit_code"] == 0 and done["data"]["result"]["interfaces"][0]["name"] == "lo"
            status = c.wait_worker("kernel", worker="ebpf", state="running")
            assert status["info"]["kernel_dropped"] == 0 and status["info"]["load_s"] > 0
            assert status["info"]["capture"] == "lean" and status["info"]["tax"] == features.TAX["lean"]
            text = subprocess.run([CNISUP, "status", "--config", str(c.config_path)], capture_output=True,
                                  text=True, timeout=30, check=True).stdout
            assert f"capture lean: {features.TAX['lean']}" in text
        # The supervisor probed the kernel family without BCC: no libbcc, no LLVM in its memory.
        sup = json.loads(subprocess.run([CNISUP, "status", "--json", "--config", str(c.config_path)],
                                        capture_output=True, text=True, timeout=30, check=True).stdout)
        maps = Path(f"/proc/{sup['supervisor']['pid']}/maps").read_text()
        assert "libbcc" not in maps and "LLVM" not in maps
    finally:
        assert c.stop() == 0
