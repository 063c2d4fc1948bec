"""What both kernel workers emit, built in one place so ``ebpf`` and
``proc-poll`` publish the same kinds with the same fields.

Parsers here take untrusted bytes (a plugin's stdin/stdout as captured, a
netlink request as sent) and never raise: what they cannot make sense of is
returned as an ``*_error`` field, not an exception.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# Imported here, not on first use: importing pyroute2 takes ~0.1 s, which
# would delay the first events after the worker reported ready.
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from cnisup.protocol.kinds import KernelKind

#: CNI_COMMAND values of the CNI spec (1.1 adds GC and STATUS).
CNI_COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
#: How much of an unparseable stdout/stderr goes into an event.
EXCERPT_MAX = 2048

# rtnetlink (linux/rtnetlink.h, linux/netlink.h): stable UAPI numbers.
RTM_NEWLINK, RTM_DELLINK, RTM_SETLINK = 16, 17, 19
RTM_NEWADDR, RTM_DELADDR = 20, 21
NLM_F_REQUEST, NLM_F_CREATE = 0x1, 0x400
NLMSG_HDR = struct.Struct("=IHHII")
IFF_UP = 0x1


# -- the CNI environment -------------------------------------------------------------

def parse_env_block(raw: bytes) -> dict[str, str]:
    """``KEY=VALUE\\0KEY=VALUE\\0…`` (``/proc/<pid>/environ`` or the captured
    CNI_* block) into a dict; undecodable bytes are replaced, never raised."""
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def parse_cni_args(raw: str) -> dict[str, str]:
    """``CNI_ARGS`` (``IgnoreUnknown=1;K8S_POD_NAME=web-0;…``) into a dict.
    Items without ``=`` are skipped; a later duplicate wins, as in libcni."""
    out: dict[str, str] = {}
    for item in raw.split(";"):
        key, sep, value = item.partition("=")
        key = key.strip()
        if sep and key:
            out[key] = value
    return out


def cni_identity(env: Mapping[str, str]) -> dict[str, Any]:
    """The fields of a run that come from its CNI environment; absent ones stay absent."""
    out: dict[str, Any] = {}
    for var, name in (("CNI_COMMAND", "command"), ("CNI_CONTAINERID", "container_id"),
                      ("CNI_NETNS", "netns"), ("CNI_IFNAME", "ifname")):
        if var in env:
            out[name] = env[var]
    if "CNI_ARGS" in env:
        out["cni_args"] = parse_cni_args(env["CNI_ARGS"])
    return out


# -- the network config on stdin, the result on stdout --------------------------------

def _json_object(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 at byte {exc.start}"
    if not text.strip():
        return None, "empty"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    if not isinstance(value, dict):
        return None, f"JSON {type(value).__name__}, not an object"
    return value, None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def parse_netconf(raw: bytes, *, truncated: bool = False) -> dict[str, Any]:
    """What the network config on a plugin's stdin says: ``network``,
    ``cni_version``, ``type``; else ``stdin_error``."""
    conf, err = _json_object(raw)
    if conf is None:
        return {"stdin_error": ("truncated capture: " if truncated else "") + str(err)}
    out: dict[str, Any] = {}
    for key, name in (("name", "network"), ("cniVersion", "cni_version"), ("type", "type")):
        if (v := _str(conf.get(key))) is not None:
            out[name] = v
    return out


def _interfaces(raw: Any) -> list[dict[str, Any]]:
    out = []
    for i in raw if isinstance(raw, list) else []:
        if isinstance(i, dict):
            out.append({k: i[k] for k in ("name", "mac", "sandbox") if isinstance(i.get(k), str)})
    return out


def _ips(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    raw_ips = result.get("ips")
    for ip in raw_ips if isinstance(raw_ips, list) else []:
        if isinstance(ip, dict) and isinstance(ip.get("address"), str):
            item: dict[str, Any] = {"address": ip["address"]}
            if isinstance(ip.get("gateway"), str):
                item["gateway"] = ip["gateway"]
            if isinstance(ip.get("interface"), int) and not isinstance(ip.get("interface"), bool):
                item["interface"] = ip["interface"]
            out.append(item)
    for legacy in ("ip4", "ip6"):  # CNI 0.2.0 results
        v = result.get(legacy)
        if isinstance(v, dict) and isinstance(v.get("ip"), str):
            item = {"address": v["ip"]}
            if isinstance(v.get("gateway"), str):
                item["gateway"] = v["gateway"]
            out.append(item)
    return out


def parse_cni_output(raw: bytes, *, truncated: bool = False) -> dict[str, Any]:
    """A plugin's stdout into ``result`` (success), ``error`` (the CNI error
    object) or ``output_error`` plus an excerpt; empty output gives nothing
    (DEL prints nothing on success)."""
    if not raw.strip():
        return {}
    obj, err = _json_object(raw)
    if obj is None:
        return {"output_error": ("truncated capture: " if truncated else "") + str(err),
                "stdout": raw[:EXCERPT_MAX].decode(errors="replace")}
    if "code" in obj and ("msg" in obj or "details" in obj):
        error: dict[str, Any] = {}
        if isinstance(obj["code"], int) and not isinstance(obj["code"], bool):
            error["code"] = obj["code"]
        for k in ("msg", "details"):
            if isinstance(obj.get(k), str):
                error[k] = obj[k]
        return {"error": error}
    result: dict[str, Any] = {}
    if (v := _str(obj.get("cniVersion"))) is not None:
        result["cni_version"] = v
    if "interfaces" in obj:
        result["interfaces"] = _interfaces(obj["interfaces"])
    ips = _ips(obj)
    if ips or "ips" in obj:
        result["ips"] = ips
    if isinstance(obj.get("supportedVersions"), list):
        result["supported_versions"] = [v for v in obj["supportedVersions"] if isinstance(v, str)]
    return {"result": result}


# -- runs -------------------------------------------------------------------------

@dataclass
class Run:
    """One CNI plugin process, from exec (or first sighting) to exit."""

    run_id: str
    pid: int
    path: str
    start_ns: int  #: wall clock
    ppid: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    parent_run: str | None = None
    stdin: bytearray = field(default_factory=bytearray)
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    truncated: set[str] = field(default_factory=set)  #: "stdin", "stdout", "env", "events"
    stdin_done: bool = False
    started_sent: bool = False

    @property
    def plugin(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def identity(self) -> dict[str, Any]:
        """Fields shared by every event about this run."""
        out: dict[str, Any] = {"run_id": self.run_id, "pid": self.pid, "plugin": self.plugin,
                               "path": self.path}
        if self.ppid is not None:
            out["ppid"] = self.ppid
        out.update(cni_identity(self.env))
        if self.parent_run is not None:
            out["parent_run"] = self.parent_run
        if self.stdin:
            out.update(parse_netconf(bytes(self.stdin), truncated="stdin" in self.truncated))
        return out

    def attribution(self) -> dict[str, Any]:
        """What a netns/link/addr event says about the run that caused it."""
        out: dict[str, Any] = {"run_id": self.run_id, "plugin": self.plugin}
        if "CNI_CONTAINERID" in self.env:
            out["container_id"] = self.env["CNI_CONTAINERID"]
        return out

    def started_data(self) -> dict[str, Any]:
        return self.identity()

    def finished_data(self, *, end_ns: int, exit_code: int | None, approximate: bool = False,
                      reason: str | None = None) -> dict[str, Any]:
        out = self.identity()
        if exit_code is not None:
            out["exit_code"] = exit_code
        out["duration_ms"] = round(max(0, end_ns - self.start_ns) / 1e6, 3)
        if approximate:
            out["duration_approximate"] = True
        if reason:
            out["exit_reason"] = reason
        out.update(parse_cni_output(bytes(self.stdout), truncated="stdout" in self.truncated))
        if self.stderr:
            out["stderr"] = bytes(self.stderr[:EXCERPT_MAX]).decode(errors="replace")
        if self.truncated:
            out["truncated"] = sorted(self.truncated)
        return out


def run_id(pid: int, start_boot_ns: int) -> str:
    """Unique per boot: the pid and when (boot-time ns) the run started."""
    return f"{pid}-{start_boot_ns}"


# -- rtnetlink requests ----------------------------------------------------------------

@dataclass
class NetlinkChange:
    kind: KernelKind  #: link.created, addr.added, …
    data: dict[str, Any]


def iter_nlmsgs(buf: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, flags, message) for each complete message; stops at the first
    malformed header (a truncated capture ends there)."""
    off = 0
    while off + NLMSG_HDR.size <= len(buf):
        length, mtype, flags, _, _ = NLMSG_HDR.unpack_from(buf, off)
        if length < NLMSG_HDR.size or off + length > len(buf):
            return
        yield mtype, flags, buf[off:off + length]
        off += (length + 3) & ~3


def _link_change(mtype: int, flags: int, msg: bytes) -> NetlinkChange | None:
    m = ifinfmsg(msg)
    m.decode()
    data: dict[str, Any] = {}
    if m["index"]:
        data["ifindex"] = int(m["index"])
    if isinstance(name := m.get_attr("IFLA_IFNAME"), str):
        data["name"] = name
    if isinstance(master := m.get_attr("IFLA_MASTER"), int):
        data["master"] = master
    if isinstance(mtu := m.get_attr("IFLA_MTU"), int):
        data["mtu"] = mtu
    if m["change"] & IFF_UP:
        data["up"] = bool(m["flags"] & IFF_UP)
    target = _netns_target(m)
    if target:
        data["target_netns"] = target
    info = m.get_attr("IFLA_LINKINFO")
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND")
        if isinstance(kind, str):
            data["kind"] = kind
        idata = info.get_attr("IFLA_INFO_DATA")
        if kind == "veth" and idata is not None and hasattr(idata, "get_attr"):
            peer = idata.get_attr("VETH_INFO_PEER")
            if peer is not None:
                if isinstance(pname := peer.get_attr("IFLA_IFNAME"), str):
                    data["peer"] = pname
                if ptarget := _netns_target(peer):
                    data["peer_netns"] = ptarget
    if mtype == RTM_DELLINK:
        return NetlinkChange(KernelKind.LINK_DELETED, data)
    if mtype == RTM_NEWLINK and flags & NLM_F_CREATE:
        return NetlinkChange(KernelKind.LINK_CREATED, data)
    if "target_netns" in data:
        return NetlinkChange(KernelKind.LINK_MOVED, data)
    return NetlinkChange(KernelKind.LINK_CHANGED, data)


def _netns_target(m: Any) -> str | None:
    fd = m.get_attr("IFLA_NET_NS_FD")
    if isinstance(fd, int):
        return f"fd:{fd}"
    pid = m.get_attr("IFLA_NET_NS_PID")
    if isinstance(pid, int):
        return f"pid:{pid}"
    return None


def _addr_change(mtype: int, msg: bytes) -> NetlinkChange | None:
    m = ifaddrmsg(msg)
    m.decode()
    family = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}.get(m["family"])
    address = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
    if family is None or not isinstance(address, str):
        return None
    data = {"address": address, "prefixlen": int(m["prefixlen"]), "family": family,
            "ifindex": int(m["index"])}
    if isinstance(label := m.get_attr("IFA_LABEL"), str):
        data["label"] = label
    return NetlinkChange(KernelKind.ADDR_ADDED if mtype == RTM_NEWADDR else KernelKind.ADDR_DELETED, data)


def parse_rtnetlink(buf: bytes) -> tuple[list[NetlinkChange], list[str]]:
    """Link and address changes requested in one captured netlink send, and a
    list of problems (malformed or truncated messages). Never raises."""
    changes: list[NetlinkChange] = []
    problems: list[str] = []
    consumed = 0
    for mtype, flags, msg in iter_nlmsgs(buf):
        consumed += (len(msg) + 3) & ~3
        if not flags & NLM_F_REQUEST or mtype not in (RTM_NEWLINK, RTM_DELLINK, RTM_SETLINK,
                                                       RTM_NEWADDR, RTM_DELADDR):
            continue  # dumps and gets change nothing
        try:
            if mtype in (RTM_NEWADDR, RTM_DELADDR):
                change = _addr_change(mtype, msg)
            else:
                change = _link_change(mtype, flags, msg)
        except Exception as exc:  # pyroute2 raises many kinds on garbage
            problems.append(f"netlink message type {mtype}: {type(exc).__name__}: {exc}"[:200])
            continue
        if change is not None:
            changes.append(change)
    if consumed < len(buf):
        problems.append(f"{len(buf) - consumed} trailing byte(s) are not a complete netlink message")
    return changes, problems


# -- state snapshots (proc-poll) ------------------------------------------------------

def link_data(*, ifindex: int, name: str | None, kind: str | None = None, master: int | None = None,
              mtu: int | None = None, up: bool | None = None, address: str | None = None) -> dict[str, Any]:
    """A link as seen in a dump, with the same field names as a captured request."""
    out: dict[str, Any] = {"ifindex": ifindex}
    for k, v in (("name", name), ("kind", kind), ("master", master), ("mtu", mtu), ("up", up),
                 ("mac", address)):
        if v is not None:
            out[k] = v
    return out
