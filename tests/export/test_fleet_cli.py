"""``cnisup fleet history / tail / explain pod`` against a real nats-server,
over a stream two real export workers filled from two nodes' journals: the
same filters and output as the local commands, the same pod story as the
local ``explain`` on the node's own journal, and untrusted messages skipped."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import nats
import natsserver
import pytest
import yaml
from e2e.support import CNISUP
from harness import WorkerRun, world_dir
from support import Dest, write_journal

from cnisup.protocol import envelope
from cnisup.protocol.kinds import ConfigKind, K8sKind, KernelKind

CID = "1234abcd" * 8
CONF = "/etc/cni/net.d/10-mynet.conflist"


def stamp(source: str, node: str) -> envelope.Stamp:
    return envelope.Stamp(source=source, node=node, incarnation=envelope.new_incarnation())


def pod_story(node: str, pod: str, *, cid: str, fail: bool, t0: int) -> list[dict[str, Any]]:
    """What a node's workers publish for one pod: the conflist, a bridge ADD (failed or not) with
    its veth, and the API server's IPs (a real kernel/config/k8s run, in envelopes)."""
    cfg, kernel, k8s = stamp("inotify", node), stamp("ebpf", node), stamp("k8s-informer", node)
    run = {"run_id": f"{t0}-1", "pid": 4242, "plugin": "bridge", "path": "/opt/cni/bin/bridge", "command": "ADD",
           "container_id": cid, "netns": "/var/run/netns/cni-1", "ifname": "eth0", "network": "mynet",
           "cni_args": {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": pod, "K8S_POD_UID": f"uid-{pod}"}}
    finished = {**run, "duration_ms": 23.4, "exit_code": 1 if fail else 0}
    if fail:
        finished["error"] = {"code": 999, "msg": "no IP addresses available in range set"}
    else:
        finished["result"] = {"cni_version": "1.0.0", "ips": [{"address": "10.22.0.5/24", "interface": 1}]}
    out = [cfg.build(ConfigKind.CONFIG_MODIFIED, {"path": CONF, "dir": "/etc/cni/net.d", "valid": True,
                                                  "network": "mynet", "plugins": ["bridge"]}, ts=t0),
           kernel.build(KernelKind.PLUGIN_STARTED, run, ts=t0 + 1_000_000_000),
           kernel.build(KernelKind.LINK_CREATED, {"run_id": run["run_id"], "name": "eth0", "kind": "veth",
                                                  "peer": "veth8d97466c", "container_id": cid},
                        ts=t0 + 1_010_000_000),
           kernel.build(KernelKind.PLUGIN_FINISHED, finished, ts=t0 + 1_023_400_000)]
    if not fail:
        out.append(k8s.build(K8sKind.POD_IP_ALLOCATED, {"namespace": "default", "name": pod, "uid": f"uid-{pod}",
                                                        "node": node, "ips": ["10.22.0.5"], "host_network": False},
                             ts=t0 + 2_000_000_000))
    return out


@pytest.fixture(scope="module")
def fleet(nats_single: natsserver.Server) -> Iterator[dict[str, Any]]:
    """Two nodes' journals exported into one stream by two real export workers."""
    d = world_dir("cnisup-fleet-cli-")
    dest = Dest("CLI", "cli")
    t0 = 1_790_000_000 * 10**9
    nodes = {"node-p": pod_story("node-p", "web-1", cid=CID, fail=True, t0=t0),
             "node-q.example.com": pod_story("node-q.example.com", "api-1", cid="feed" * 16, fail=False, t0=t0 + 10**9)}
    runs = []
    for name, envs in nodes.items():
        nd = d / name
        (nd / "run" / "journal").mkdir(parents=True)
        write_journal(nd / "journal.db", envs)
        run = WorkerRun("nats", {"node_name": name, "runtime_dir": str(nd / "run"),
                                 "journal": {"path": str(nd / "journal.db")},
                                 "export": {"enabled": True, "nats": dest.nats([nats_single.url])}}, tmp=nd)
        runs.append(run.start())
    try:
        for run, envs in zip(runs, nodes.values(), strict=True):
            want = len(envs)
            run.wait_status(lambda s: s["t"] == "hb" and s["info"].get("acked") == want, timeout_s=20)  # noqa: B023
    finally:
        for run in runs:
            run.stop()
            run.close()
    config = d / "cnisup.yaml"
    config.write_text(yaml.safe_dump({"export": {"nats": {"servers": [nats_single.url], "stream": dest.stream,
                                                          "subject_prefix": dest.prefix}}}))
    yield {"config": config, "dir": d, "nodes": nodes, "url": nats_single.url, "dest": dest}


def cnisup(fleet: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CNISUP, *args, "--config", str(fleet["config"])], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "NO_COLOR": "1"})


def lines_json(out: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_history_filters_by_node_kind_pod_and_failure_and_prints_the_envelopes_as_published(
        fleet: dict[str, Any]) -> None:
    p, q = fleet["nodes"]["node-p"], fleet["nodes"]["node-q.example.com"]
    assert lines_json(cnisup(fleet, "fleet", "history", "-o", "json")) == p + q
    assert lines_json(cnisup(fleet, "fleet", "history", "-o", "json", "--node", "node-q.example.com")) == q
    assert lines_json(cnisup(fleet, "fleet", "history", "-o", "json", "--kind", "cni.plugin.")) == \
        [e for e in p + q if e["kind"].startswith("cni.plugin.")]
    # a pod's events include its container's (the veth its run made), as with the local history
    assert lines_json(cnisup(fleet, "fleet", "history", "-o", "json", "--pod", "default/web-1")) == p[1:]
    assert lines_json(cnisup(fleet, "fleet", "history", "-o", "json", "--failed")) == [p[3]]
    assert lines_json(cnisup(fleet, "fleet", "history", "-o", "json", "--limit", "2")) == q[-2:]
    exact = cnisup(fleet, "fleet", "history", "-o", "json", "--node", "node-p", "--kind", KernelKind.PLUGIN_FINISHED)
    assert exact.stdout == json.dumps(p[3], separators=(",", ":")) + "\n"  # byte for byte as stored
    compact = cnisup(fleet, "fleet", "history", "--node", "node-p", "--kind", "cni.plugin.")
    assert compact.returncode == 0 and "ADD" in compact.stdout and "failed default/web-1" in compact.stdout
    assert "code 999" in compact.stdout


def test_tail_from_a_time_with_a_count(fleet: dict[str, Any]) -> None:
    out = cnisup(fleet, "fleet", "tail", "--since", "2026-09-22T00:00:00Z", "--count", "3", "--json",
                 "--node", "node-p", "--timeout", "10")
    assert lines_json(out) == fleet["nodes"]["node-p"][:3]


def test_explain_pod_finds_the_node_and_tells_the_same_story_as_explain_on_that_node(
        fleet: dict[str, Any]) -> None:
    for node, pod in (("node-p", "web-1"), ("node-q.example.com", "api-1")):
        remote = cnisup(fleet, "fleet", "explain", "pod", f"default/{pod}", "--json")
        assert remote.returncode == 0, remote.stderr
        story = json.loads(remote.stdout)
        assert story.pop("node") == node and story.pop("also_seen_on") == []
        journal = fleet["dir"] / node / "journal.db"
        local = subprocess.run([CNISUP, "explain", "pod", f"default/{pod}", "--json", "--journal", str(journal)],
                               capture_output=True, text=True, timeout=60)
        assert story == json.loads(local.stdout)
    human = cnisup(fleet, "fleet", "explain", "pod", "default/web-1")
    assert human.stdout.splitlines()[0] == "node node-p"
    assert "verdict: failed: ADD failed" in human.stdout and 'code 999 "no IP addresses available' in human.stdout


def test_untrusted_messages_are_skipped_with_a_line_and_the_rest_is_read(fleet: dict[str, Any]) -> None:
    dest: Dest = fleet["dest"]

    async def publish() -> None:
        nc = await nats.connect(fleet["url"])
        js = nc.jetstream()
        for subject, data in ((f"{dest.prefix}.evil.cni.config.modified", b"{not json"),
                              (f"{dest.prefix}.evil.cni.config.modified", b'{"kind": "link.created"}'),
                              (f"{dest.prefix}.evil.link.created", json.dumps(fleet["nodes"]["node-p"][0]).encode()),
                              (f"{dest.prefix}.evil.x.y", b"\xff" * 100)):
            await js.publish(subject, data)
        await nc.close()

    asyncio.run(publish())
    out = cnisup(fleet, "fleet", "history", "-o", "json", "--node", "evil")
    assert out.returncode == 0 and out.stdout == ""
    skipped = out.stderr.splitlines()
    assert len(skipped) == 4 and all(line.startswith("! skipped message ") for line in skipped), skipped
    assert "differs from kind" in skipped[2]
    ok = cnisup(fleet, "fleet", "history", "-o", "json", "--node", "node-p")
    assert lines_json(ok) == fleet["nodes"]["node-p"]


def test_errors_are_one_line_and_exit_1(fleet: dict[str, Any]) -> None:
    no_stream = cnisup(fleet, "fleet", "history", "--stream", "NOPE")
    assert no_stream.returncode == 1
    assert no_stream.stderr == "cnisup: export.nats.stream: no stream 'NOPE' on the server\n"
    away = cnisup(fleet, "fleet", "history", "--server", "nats://127.0.0.1:1")
    assert away.returncode == 1 and away.stderr.startswith("cnisup: cannot reach NATS at nats://127.0.0.1:1: ")
    assert len(away.stderr.splitlines()) == 1

