"""The parsers of captured bytes (CNI JSON, CNI_ARGS, rtnetlink requests):
known inputs give the expected fields; any input never raises (hypothesis)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from cnisup.protocol import validation
from cnisup.workers.kernel import btf, events, features, netwatch

FAST = settings(max_examples=300, deadline=None)


def test_cni_args() -> None:
    assert events.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0;junk;=x;A=b=c") == {
        "IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "web-0", "A": "b=c"}
    assert events.parse_cni_args("") == {}


def test_env_block() -> None:
    env = events.parse_env_block(b"CNI_COMMAND=ADD\0CNI_ARGS=K8S_POD_NAME=a\0noequals\0\xff=\xfe\0")
    assert env["CNI_COMMAND"] == "ADD" and env["CNI_ARGS"] == "K8S_POD_NAME=a"
    assert events.cni_identity(env)["cni_args"] == {"K8S_POD_NAME": "a"}


def test_result_error_and_garbage() -> None:
    result = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "mac": "aa", "sandbox": "/x"}],
              "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 0}]}
    assert events.parse_cni_output(json.dumps(result).encode())["result"] == {
        "cni_version": "1.0.0", "interfaces": result["interfaces"], "ips": result["ips"]}
    err = events.parse_cni_output(b'{"code": 11, "msg": "no IP addresses available", "details": "d"}')
    assert err == {"error": {"code": 11, "msg": "no IP addresses available", "details": "d"}}
    legacy = events.parse_cni_output(b'{"ip4": {"ip": "10.1.0.5/16", "gateway": "10.1.0.1"}}')
    assert legacy["result"]["ips"] == [{"address": "10.1.0.5/16", "gateway": "10.1.0.1"}]
    bad = events.parse_cni_output(b'{"cniVersion": "1.0.0", "ips": [', truncated=True)
    assert bad["output_error"].startswith("truncated capture: invalid JSON")
    assert events.parse_cni_output(b"") == {}
    assert events.parse_netconf(b"\xff\xfe")["stdin_error"].startswith("not UTF-8")
    assert events.parse_netconf(b'{"name": "n", "cniVersion": "1.0.0", "type": "ptp"}') == {
        "network": "n", "cni_version": "1.0.0", "type": "ptp"}


def _veth_request() -> bytes:
    m = ifinfmsg()
    m["header"]["type"] = events.RTM_NEWLINK
    m["header"]["flags"] = events.NLM_F_REQUEST | events.NLM_F_CREATE
    m["attrs"] = [["IFLA_IFNAME", "eth0"], ["IFLA_LINKINFO", {"attrs": [
        ["IFLA_INFO_KIND", "veth"],
        ["IFLA_INFO_DATA", {"attrs": [["VETH_INFO_PEER", {"attrs": [["IFLA_IFNAME", "veth1234"],
                                                                     ["IFLA_NET_NS_FD", 7]]}]]}]]}]]
    m.encode()
    return bytes(m.data[:m["header"]["length"]])


def _addr_request() -> bytes:
    a = ifaddrmsg()
    a["header"]["type"] = events.RTM_NEWADDR
    a["header"]["flags"] = events.NLM_F_REQUEST | events.NLM_F_CREATE
    a["family"], a["prefixlen"], a["index"] = 2, 24, 3
    a["attrs"] = [["IFA_LOCAL", "10.9.0.2"], ["IFA_ADDRESS", "10.9.0.2"]]
    a.encode()
    return bytes(a.data[:a["header"]["length"]])


def test_rtnetlink_requests() -> None:
    changes, problems = events.parse_rtnetlink(_veth_request() + _addr_request())
    assert problems == []
    assert [c.kind for c in changes] == ["link.created", "addr.added"]
    assert changes[0].data == {"name": "eth0", "kind": "veth", "peer": "veth1234", "peer_netns": "fd:7"}
    assert changes[1].data == {"address": "10.9.0.2", "prefixlen": 24, "family": "inet", "ifindex": 3}


def test_truncated_netlink_is_reported() -> None:
    raw = _veth_request()
    changes, problems = events.parse_rtnetlink(raw[:-10])
    assert changes == [] and problems and "trailing" in problems[0]


def _valid(kind: str, data: dict[str, object]) -> None:
    validation.validate({"v": 1, "id": "x-1", "kind": kind, "source": "ebpf", "node": "n", "ts": 1,
                         "incarnation": "x", "seq": 1, "data": data})


@FAST
@given(st.binary(max_size=600))
def test_fuzz_netlink_bytes_never_raise(raw: bytes) -> None:
    changes, problems = events.parse_rtnetlink(raw)
    assert isinstance(problems, list)
    for c in changes:
        _valid(c.kind, c.data)


@FAST
@given(st.integers(16, 21), st.integers(0, 0xFFFF), st.binary(max_size=300), st.integers(-8, 8))
def test_fuzz_netlink_headers_with_garbage_bodies(mtype: int, flags: int, body: bytes, skew: int) -> None:
    """Well-formed headers of the interesting types around random bodies: the
    attribute parser sees the garbage, and still nothing raises."""
    length = max(0, 16 + len(body) + skew)
    raw = struct.pack("=IHHII", length, mtype, flags | events.NLM_F_REQUEST, 1, 0) + body
    changes, _ = events.parse_rtnetlink(raw)
    for c in changes:
        _valid(c.kind, c.data)


@FAST
@given(st.binary(max_size=len(_veth_request())), st.integers(0, 200))
def test_fuzz_mutated_real_request(noise: bytes, at: int) -> None:
    raw = bytearray(_veth_request())
    raw[at % len(raw):at % len(raw) + len(noise)] = noise
    changes, _ = events.parse_rtnetlink(bytes(raw))
    for c in changes:
        _valid(c.kind, c.data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
cni_like = st.fixed_dictionaries({}, optional={
    "cniVersion": json_values, "code": json_values, "msg": json_values, "details": json_values,
    "interfaces": json_values, "ips": json_values, "ip4": json_values, "supportedVersions": json_values,
    "name": json_values, "type": json_values})


@FAST
@given(cni_like, st.booleans())
def test_fuzz_cni_json_never_raises(doc: dict[str, object], truncated: bool) -> None:
    raw = json.dumps(doc).encode()
    out = events.parse_cni_output(raw, truncated=truncated)
    conf = events.parse_netconf(raw)
    run = events.Run(run_id="1-2", pid=1, path="/opt/cni/bin/x", start_ns=0)
    run.stdout.extend(raw)
    run.stdin.extend(raw)
    _valid("cni.plugin.finished", run.finished_data(end_ns=5, exit_code=1))
    assert isinstance(out, dict) and isinstance(conf, dict)


@FAST
@given(st.binary(max_size=400), st.text(max_size=200))
def test_fuzz_raw_output_and_args_never_raise(raw: bytes, args: str) -> None:
    events.parse_cni_output(raw)
    events.parse_netconf(raw)
    events.parse_env_block(raw)
    assert all(isinstance(v, str) for v in events.parse_cni_args(args).values())


def _fake_tracefs(root: Path, tracepoints: list[str]) -> str:
    for tp in tracepoints:
        category, _, name = tp.partition(":")
        (root / "events" / category / name).mkdir(parents=True)
    return str(root)


def test_probe_degrades_per_attach_point(tmp_path: Path) -> None:
    """full: a kernel without clone3 and setns tracepoints is still usable,
    and the probe names what is lost; without sched_process_exec: not usable."""
    absent = {"syscalls:sys_enter_clone3", "syscalls:sys_exit_clone3", "syscalls:sys_enter_setns"}
    everything = list(features.REQUIRED) + [tp for tps, _ in features.OPTIONAL.values() for tp in tps]
    tfs = _fake_tracefs(tmp_path / "a", [tp for tp in everything if tp not in absent])
    host = features.check(capture="full", tracefs_dir=tfs, privileges=False)
    assert "sys_enter_clone3" not in host.enabled_optional and "sys_enter_setns" not in host.enabled_optional
    assert "sys_enter_sendto" in host.enabled_optional
    assert host.details["tracepoints_optional"]["syscalls:sys_enter_setns"] == "missing: no netns.entered"
    if host.ok:  # with BCC and headers: usable, degraded
        assert "degraded" in host.reason and "netns.entered" in host.reason
    tfs = _fake_tracefs(tmp_path / "b", [tp for tp in everything if tp != "sched:sched_process_exec"])
    host = features.check(capture="full", tracefs_dir=tfs, privileges=False)
    assert not host.ok and "sched:sched_process_exec" in host.reason


def test_lean_probe_needs_no_syscall_tracepoint(tmp_path: Path) -> None:
    """lean: the sched/task tracepoints are all it needs; without the write
    tracepoint it runs without stdout/stderr and says so; without BTF it cannot run."""
    tfs = _fake_tracefs(tmp_path / "t", list(features.LEAN_REQUIRED))
    host = features.check(capture="lean", tracefs_dir=tfs, privileges=False)
    assert host.enabled_optional == [] and host.group_dead is False
    assert host.details["tracepoints_optional"]["syscalls:sys_enter_write"].startswith("missing: no plugin stdout")
    if host.ok:
        assert "degraded" in host.reason and "stdout" in host.reason
    (tmp_path / "vmlinux").write_bytes(b"\0" * 64)
    host = features.check(capture="lean", tracefs_dir=tfs, privileges=False, btf_path=str(tmp_path / "vmlinux"))
    assert not host.ok and "kernel BTF: bad magic" in host.reason



def test_probe_does_not_import_bcc() -> None:
    """The supervisor runs this probe: importing BCC would map libbcc and LLVM into it."""
    code = ("import sys; from cnisup.workers.kernel import features; features.check(); "
            "print(sorted(m for m in sys.modules if m == 'bcc' or m.startswith('bcc.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _btf(types: list[bytes], strings: bytes) -> bytes:
    body = b"".join(types)
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(body), len(body), len(strings)) + body + strings


def test_btf_reader_anonymous_members_and_bitfields() -> None:
    """A hand-made BTF: struct outer { int a; union { int x; struct { int y; int z; }; }; int bf:3; }."""
    strings = b"\0int\0outer\0a\0x\0y\0z\0bf\0"
    at = {n: strings.index(n.encode() + b"\0") for n in ("int", "outer", "a", "x", "y", "z", "bf")}

    def hdr(name: int, kind: int, vlen: int, size: int, kflag: int = 0) -> bytes:
        return struct.pack("<III", name, kflag << 31 | kind << 24 | vlen, size)

    def member(name: int, tid: int, off: int) -> bytes:
        return struct.pack("<III", name, tid, off)

    types = [
        hdr(at["int"], btf.INT, 0, 4) + struct.pack("<I", 32),                       # 1: int
        hdr(0, btf.STRUCT, 2, 8) + member(at["y"], 1, 0) + member(at["z"], 1, 32),  # 2: struct { y; z; }
        hdr(0, btf.UNION, 2, 8) + member(at["x"], 1, 0) + member(0, 2, 0),          # 3: union { x; struct; }
        hdr(at["outer"], btf.STRUCT, 3, 20, kflag=1) + member(at["a"], 1, 0) + member(0, 3, 64)
        + member(at["bf"], 1, 3 << 24 | 128),                                        # 4: outer
    ]
    b = btf.BTF(_btf(types, strings))
    assert b.offset("outer.a") == 0 and b.offset("outer.x") == 8 and b.offset("outer.z") == 12
    with pytest.raises(btf.BTFError, match="bitfield"):
        b.offset("outer.bf")
    with pytest.raises(btf.BTFError, match=r"lacks outer\.nope"):
        b.offset("outer.nope")
    with pytest.raises(btf.BTFError, match="no struct"):
        b.offset("inner.y")


@pytest.mark.skipif(not Path(btf.BTF_PATH).exists(), reason="this kernel has no BTF")
def test_btf_offsets_of_the_running_kernel() -> None:
    offsets = btf.offsets()
    assert set(offsets) == set(btf.OFFSETS)
    # Layout facts that hold on every kernel: pid and tgid are adjacent, fd follows max_fds.
    assert offsets["OFF_TASK_TGID"] == offsets["OFF_TASK_PID"] + 4
    assert offsets["OFF_FDT_MAX_FDS"] == 0 and offsets["OFF_FDT_FD"] == 8


def _rtm(mtype: int, flags: int, pid: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, 0, pid) + body


def _nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def test_netlink_notifications() -> None:
    link = _rtm(netwatch.RTM_NEWLINK, 0, 0, struct.pack("=BxHiII", 0, 1, 7, 1, 0)
                + _nla(netwatch.IFLA_IFNAME, b"eth0\0") + _nla(netwatch.IFLA_MTU, struct.pack("=I", 1400))
                + _nla(netwatch.IFLA_LINK, struct.pack("=I", 9))
                + _nla(netwatch.IFLA_LINK_NETNSID, struct.pack("=i", 0))
                + _nla(netwatch.IFLA_LINKINFO, _nla(netwatch.IFLA_INFO_KIND, b"veth\0")))
    addr = _rtm(netwatch.RTM_NEWADDR, 0, 4242, struct.pack("=BBBBi", 2, 24, 0, 0, 7)
                + _nla(netwatch.IFA_LOCAL, bytes([10, 9, 0, 2])))
    bridge_port = _rtm(netwatch.RTM_NEWLINK, 0, 0, struct.pack("=BxHiII", 7, 1, 8, 1, 0))
    done = _rtm(netwatch.NLMSG_DONE, netwatch.NLM_F_MULTI, 0, b"\0" * 4)
    changes, finished = netwatch.parse(link + addr + bridge_port + done)
    assert [c.kind for c in changes] == ["link", "addr"] and finished == [0]
    assert changes[0].data == {"ifindex": 7, "name": "eth0", "kind": "veth", "mtu": 1400, "up": True}
    assert changes[0].link == 9 and changes[0].link_netnsid == 0
    assert changes[1].data == {"address": "10.9.0.2", "prefixlen": 24, "family": "inet", "ifindex": 7}
    assert changes[1].nl_pid == 4242 and not changes[1].deleted


@FAST
@given(st.binary(max_size=600))
def test_fuzz_netlink_notifications_never_raise(raw: bytes) -> None:
    changes, _ = netwatch.parse(raw)
    for c in changes:
        assert isinstance(c.data["ifindex"], int)


@FAST
@given(st.sampled_from([16, 17, 20, 21]), st.binary(max_size=200), st.integers(-8, 8))
def test_fuzz_notification_bodies_never_raise(mtype: int, body: bytes, skew: int) -> None:
    raw = struct.pack("=IHHII", max(0, 16 + len(body) + skew), mtype, 0, 0, 0) + body
    netwatch.parse(raw)
