"""Answers from the journal, end to end: a real ``cnisup start`` (eBPF kernel
monitor, inotify config monitor, the informer against the API-server
emulator, the journal), real CNI plugin runs in real network namespaces with
the CNI_ARGS a kubelet passes, then ``cnisup history`` and ``cnisup explain``
asserted field by field against what the plugins printed."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from cni import Outcome, have_plugins, install_plugins, netns, run_chain
from e2e.support import CNISUP, Cnisup
from harness import world_dir
from k8s import objects as o
from k8s.apiserver import ApiServer

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)"),
              pytest.mark.skipif(not have_plugins(), reason="Debian's containernetworking-plugins is not installed")]

NODE = "test-node"
SUBNET = "10.22.0.0/24"


def conflist(bridge: str, ipam_dir: Path, range_end: str) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "mynet", "plugins": [{
        "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
        "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                 "ranges": [[{"subnet": SUBNET, "rangeStart": "10.22.0.2", "rangeEnd": range_end}]]}}]}


def cnisup(args: list[str], c: Cnisup) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CNISUP, *args, "--config", str(c.config_path)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "NO_COLOR": "1"})


def explain(c: Cnisup, *what: str) -> dict[str, Any]:
    out = cnisup(["explain", *what, "--json"], c)
    assert out.returncode == 0, out.stderr
    story: dict[str, Any] = json.loads(out.stdout)
    return story


class Node:
    """A node: cnisup, the API server, a bridge network, pods."""

    def __init__(self, base: Path, api: ApiServer, stack: ExitStack) -> None:
        self.base, self.api, self.stack = base, api, stack
        self.bin = base / "cnibin"
        install_plugins(self.bin)
        self.bridge = f"cnit{uuid.uuid4().hex[:6]}"
        self.ipam = base / "ipam"
        self.c = Cnisup(base, monitors={"kernel": True, "config": True, "k8s": True},
                        kubernetes={"kubeconfig": str(api.write_kubeconfig(base / "kubeconfig")),
                                    "pod_scope": "node", "read_timeout": 10.0})
        self.c.config["cni"]["bin_dirs"] = [str(self.bin)]
        self.c.write_config()
        self.conf_path = self.c.conf_dir / "10-mynet.conflist"
        self.conf = conflist(self.bridge, self.ipam, "10.22.0.4")
        self.write_conf()
        self.containers: dict[str, str] = {}
        self.netns: dict[str, str] = {}

    def write_conf(self) -> None:
        self.conf_path.write_text(json.dumps(self.conf))

    def add(self, pod: str) -> list[Outcome]:
        cid = uuid.uuid4().hex + uuid.uuid4().hex
        ns = self.stack.enter_context(netns())
        self.containers[pod], self.netns[pod] = cid, ns
        return run_chain(self.bin, self.conf, command="ADD", container_id=cid, netns=ns,
                         cni_args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};"
                                  f"K8S_POD_INFRA_CONTAINER_ID={cid};K8S_POD_UID=uid-{pod}")

    def delete(self, pod: str) -> list[Outcome]:
        return run_chain(self.bin, self.conf, command="DEL", container_id=self.containers[pod],
                         netns=self.netns[pod],
                         cni_args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}")


@pytest.fixture
def node() -> Iterator[Node]:
    base = world_dir("cnisup-journal-")
    api = ApiServer(bookmark_interval_s=1.0).start()
    with ExitStack() as stack:
        n = Node(base, api, stack)
        ev = n.c.subscribe()
        n.c.start()
        try:
            ev.wait("supervisor.ready", 60)
            yield n
        finally:
            ev.close()
            assert n.c.stop() == 0, n.c.read_log()[-3000:]
            subprocess.run(["ip", "link", "del", n.bridge], capture_output=True, check=False)
    api.stop()
    shutil.rmtree(base, ignore_errors=True)


def wait_history(c: Cnisup, args: list[str], want: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """``history -o json`` once it has at least ``want`` events (the journal commits in batches)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = cnisup(["history", "-o", "json", *args], c)
        assert out.returncode == 0, out.stderr
        envs = [json.loads(line) for line in out.stdout.splitlines()]
        if len(envs) >= want or time.monotonic() > deadline:
            return envs
        time.sleep(0.2)


def test_pod_stories_from_the_journal(node: Node) -> None:
    api = node.api
    # web-0 networks, then web-1; the conflist's range shrinks; web-2's ADD fails
    first = node.add("web-0")
    assert [o.exit_code for o in first] == [0]
    ip0 = first[0].json["ips"][0]["address"]
    api.put("pods", o.pod("web-0", NODE, [ip0.split("/")[0]]))
    second = node.add("web-1")
    assert second[0].exit_code == 0
    time.sleep(0.3)
    node.conf["plugins"][0]["ipam"]["ranges"][0][0]["rangeEnd"] = "10.22.0.3"
    node.write_conf()
    time.sleep(0.5)
    failed = node.add("web-2")
    assert failed[0].exit_code != 0
    printed = failed[0].json
    # what the kubelet records about it on the API server
    kubelet_says = f'Failed to create pod sandbox: plugin type="bridge" failed (add): {printed["msg"]}'
    api.put("events", o.event("web-2.1", "web-2", "FailedCreatePodSandBox", host=NODE, message=kubelet_says,
                              uid="uid-web-2"))
    # web-0 goes away: DEL, the pod deleted; web-3 gets its address
    assert all(out.exit_code == 0 for out in node.delete("web-0"))
    api.delete("pods", "web-0")
    reused = node.add("web-3")
    assert reused[0].json["ips"][0]["address"] == ip0
    wait_history(node.c, ["--pod", "default/web-3", "--kind", "cni.plugin.finished"], 2)
    wait_history(node.c, ["--kind", "k8s.pod.ip_released"], 1)
    wait_history(node.c, ["--kind", "k8s.pod.event"], 1)

    story = explain(node.c, "pod", "default/web-2")
    v = story["verdict"]
    assert v["state"] == "failed"
    assert v["error"] == {"plugin": "bridge", "code": printed["code"], "msg": printed["msg"]}
    assert "in bridge (IPAM host-local)" in v["summary"] and f'"{printed["msg"]}"' in v["summary"]
    assert f"conflist {node.conf_path} (network mynet) was modified at" in v["summary"]
    assert story["subject"] == {"kind": "pod", "namespace": "default", "name": "web-2", "uids": ["uid-web-2"],
                                "containers": [node.containers["web-2"]]}
    add = story["attempts"][0]
    assert (add["command"], add["container_id"], add["netns"], add["ifname"]) == \
        ("ADD", node.containers["web-2"], node.netns["web-2"], "eth0")
    # The default (lean) kernel capture does not read stdin: the network is the conflist's.
    assert add["network"] is None and add["config"]["network"] == "mynet"
    assert add["exit_code"] == failed[0].exit_code
    assert datetime.datetime.fromisoformat(add["started"]).tzinfo is not None  # RFC 3339 with the zone
    bridge = add["plugins"][0]
    assert bridge["plugin"] == "bridge" and bridge["exit_code"] == failed[0].exit_code
    assert bridge["error"]["msg"] == printed["msg"] and bridge["duration_ms"] > 0
    assert [i["plugin"] for i in bridge["ipam"]] == ["host-local"] and bridge["ipam"][0]["exit_code"] != 0
    assert add["config"]["path"] == str(node.conf_path) and add["config"]["last_change"] == "modified"
    changes = [(c["kind"], c["data"]["path"]) for c in story["config_changes"]]
    assert ("cni.config.modified", str(node.conf_path)) in changes
    # the API server's view of the same failure, beside the kernel's
    (sandbox,) = [k for k in story["k8s"] if k["kind"] == "k8s.pod.event"]
    assert sandbox["data"]["reason"] == "FailedCreatePodSandBox" and sandbox["data"]["message"] == kubelet_says

    healthy = explain(node.c, "pod", "default/web-3")["verdict"]
    assert healthy["state"] == "networked" and healthy["ips"] == [ip0] and healthy["chain"] == ["bridge"]
    assert healthy["interface"] == "eth0" and healthy.get("veth_peer")

    gone = explain(node.c, "pod", "default/web-0")
    assert gone["verdict"]["state"] == "torn_down"
    assert [a["command"] for a in gone["attempts"]] == ["ADD", "DEL"]
    add0 = gone["attempts"][0]["plugins"][0]
    assert add0["result"]["ips"][0]["address"] == ip0
    kinds = {e["kind"] for e in add0["events"]}
    assert {"link.created", "addr.added"} & kinds, add0["events"]
    assert [k["kind"] for k in gone["k8s"]] == ["k8s.pod.ip_allocated", "k8s.pod.ip_released"]

    holders = explain(node.c, "ip", ip0)["holders"]
    assert [h["holder"].get("pod") for h in holders] == ["default/web-0", "default/web-3"]
    assert holders[0]["until"] is not None and holders[1]["until"] is None

    container = explain(node.c, "container", node.containers["web-1"][:16])
    assert container["verdict"]["state"] == "networked" and container["subject"]["pods"] == ["default/web-1"]

    human = cnisup(["explain", "pod", "default/web-2"], node.c)
    assert human.returncode == 0 and "\x1b[" not in human.stdout
    assert "Warning FailedCreatePodSandBox: Failed to create pod sandbox" in human.stdout
    assert human.stdout.splitlines()[-1].startswith("verdict: failed: ADD failed at ")
    failed_lines = cnisup(["history", "--failed", "--kind", "cni.plugin"], node.c).stdout.splitlines()
    assert any("failed" in line and "default/web-2" in line and "bridge(host-local)" in line
               and printed["msg"][:40] in line for line in failed_lines), failed_lines
    envs = wait_history(node.c, ["--pod", "default/web-2"], 3)
    assert {e["kind"] for e in envs} >= {"cni.plugin.started", "cni.plugin.finished", "k8s.pod.event"}
    assert all(e["data"].get("container_id") == node.containers["web-2"] for e in envs
               if not e["kind"].startswith("k8s."))
