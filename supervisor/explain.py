"""``cnisup explain``: the network story of one pod, container or IP address
on this node, told from the journal across the kernel's view (CNI plugin
runs, their links and addresses), the CNI configuration on disk and the API
server (pod IPs, kubelet events), then a one-line verdict.

The story is built as plain data (``Story.to_json``, documented in
docs/EXPLAIN.md) and rendered for humans by ``render_human``.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cnisup.protocol.kinds import ConfigKind, JournalKind, K8sKind, KernelKind
from cnisup.supervisor.history import Filters, Journal, Stored, rfc3339
from cnisup.workers.journal.schema import normal_ip

#: Runs of one CNI command (one libcni call over the chain) follow each other
#: within this many seconds; a longer pause starts a new attempt.
ATTEMPT_GAP_S = 5.0
#: How far before the first failure configuration changes are shown.
CONFIG_WINDOW_S = 600.0
#: The API server's view of a pod's IPs may lag the CNI runs by this much.
K8S_LAG_S = 60.0
#: Characters of a plugin's stderr kept in the story.
STDERR_MAX = 500

_CONFIG_CONTENT = (ConfigKind.CONFIG_DISCOVERED, ConfigKind.CONFIG_CREATED, ConfigKind.CONFIG_MODIFIED,
                   ConfigKind.CONFIG_DELETED)


def _ns(ts: int) -> str:
    return rfc3339(ts)


def _plain(envs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events inside a story: kind, time (RFC 3339), source and their data."""
    return [{"kind": e["kind"], "time": _ns(e["ts"]), "source": e["source"], "data": e["data"]} for e in envs]


@dataclass
class Run:
    """One plugin process of an attempt, as the kernel family saw it."""

    env: dict[str, Any]  #: its cni.plugin.finished (or .started, if it never finished) envelope
    ipam: list[Run] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  #: link.*/addr.*/netns.* it caused

    @property
    def data(self) -> dict[str, Any]:
        d: dict[str, Any] = self.env["data"]
        return d

    @property
    def finished(self) -> bool:
        return bool(self.env["kind"] == KernelKind.PLUGIN_FINISHED)

    @property
    def start_ns(self) -> int:
        d = self.data
        if self.finished and isinstance(d.get("duration_ms"), int | float):
            return int(self.env["ts"] - d["duration_ms"] * 1e6)
        return int(self.env["ts"])

    @property
    def failed(self) -> bool:
        code = self.data.get("exit_code")
        return "error" in self.data or (isinstance(code, int) and code != 0)

    @property
    def key(self) -> tuple[Any, ...]:
        d = self.data
        return d.get("container_id"), d.get("command"), d.get("ifname")

    def to_json(self) -> dict[str, Any]:
        d = self.data
        out: dict[str, Any] = {"plugin": d.get("plugin"), "run_id": d.get("run_id"),
                               "started": _ns(self.start_ns), "exit_code": d.get("exit_code"),
                               "duration_ms": d.get("duration_ms"), "finished": self.finished}
        for key in ("result", "error", "output_error", "exit_reason", "truncated"):
            if key in d:
                out[key] = d[key]
        if d.get("stderr"):
            out["stderr"] = str(d["stderr"])[:STDERR_MAX]
        out["ipam"] = [r.to_json() for r in self.ipam]
        out["events"] = _plain(self.events)
        return out


@dataclass
class Attempt:
    """One CNI command (ADD, DEL, CHECK) over a container's chain."""

    runs: list[Run]
    config: dict[str, Any] | None = None  #: the conflist active when it started

    @property
    def first(self) -> dict[str, Any]:
        return self.runs[0].data

    @property
    def command(self) -> str:
        return str(self.first.get("command") or "?")

    @property
    def start_ns(self) -> int:
        return self.runs[0].start_ns

    @property
    def failed_run(self) -> Run | None:
        return next((r for r in self.runs if r.failed), None)

    @property
    def exit_code(self) -> int | None:
        failed = self.failed_run
        if failed is not None:
            code = failed.data.get("exit_code")
            return code if isinstance(code, int) else None
        return 0 if all(r.finished for r in self.runs) else None

    def ips(self) -> list[str]:
        """The addresses of the chain's final result (each plugin passes its prevResult on)."""
        for run in reversed(self.runs):
            result = run.data.get("result")
            if isinstance(result, dict) and result.get("ips"):
                return [str(i.get("address")) for i in result["ips"] if isinstance(i, dict)]
        return []

    def to_json(self) -> dict[str, Any]:
        f = self.first
        return {"command": self.command, "container_id": f.get("container_id"), "netns": f.get("netns"),
                "ifname": f.get("ifname"), "network": f.get("network"), "started": _ns(self.start_ns),
                "exit_code": self.exit_code, "config": self.config,
                "plugins": [r.to_json() for r in self.runs]}


@dataclass
class Story:
    subject: dict[str, Any]
    attempts: list[Attempt] = field(default_factory=list)
    k8s: list[dict[str, Any]] = field(default_factory=list)  #: k8s.pod.* envelopes
    config_changes: list[dict[str, Any]] = field(default_factory=list)  #: cni.config.* envelopes
    losses: list[dict[str, Any]] = field(default_factory=list)  #: journal.loss envelopes in the window
    verdict: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "verdict": self.verdict,
                "attempts": [a.to_json() for a in self.attempts], "k8s": _plain(self.k8s),
                "config_changes": _plain(self.config_changes), "losses": _plain(self.losses)}


# -- building --------------------------------------------------------------------------------


def _attempts(envs: list[dict[str, Any]], run_events: list[dict[str, Any]]) -> list[Attempt]:
    """Plugin runs -> attempts: top-level runs grouped by (container, command,
    ifname) and time; delegated (IPAM) runs under their parent; each run's
    link/addr/netns events under it."""
    runs: dict[str, Run] = {}
    for env in envs:  # a finished event replaces the started one of the same run
        rid = env["data"].get("run_id")
        if isinstance(rid, str) and (rid not in runs or env["kind"] == KernelKind.PLUGIN_FINISHED):
            runs[rid] = Run(env)
    for env in run_events:
        run = runs.get(env["data"].get("run_id"))
        if run is not None:
            run.events.append(env)
    top: list[Run] = []
    for run in sorted(runs.values(), key=lambda r: r.start_ns):
        parent = runs.get(run.data.get("parent_run") or "")
        (parent.ipam if parent is not None else top).append(run)
    attempts: list[Attempt] = []
    for run in top:
        last = attempts[-1].runs[-1] if attempts else None
        if (last is not None and last.key == run.key and not last.failed
                and run.start_ns - int(last.env["ts"]) <= ATTEMPT_GAP_S * 1e9):
            attempts[-1].runs.append(run)
        else:
            attempts.append(Attempt([run]))
    return attempts


def _active_config(journal: Journal, at_ns: int) -> dict[str, Any] | None:
    """The conflist a runtime would have loaded at ``at_ns``: the last
    ``active_changed`` before it, with the last content event of that file."""
    active = journal.query(Filters(kinds=[ConfigKind.CONFIG_ACTIVE_CHANGED], until_ns=at_ns, limit=1))
    if not active:
        return None
    data = active[0].envelope["data"]
    path = data.get("path")
    out: dict[str, Any] = {"path": path, "network": data.get("network"), "active_since": _ns(active[0].ts)}
    if isinstance(path, str):
        content = journal.query(Filters(kinds=["cni.config."], path=path, until_ns=at_ns, limit=1))
        if content:
            env = content[0].envelope
            out.update(last_change=env["kind"].rsplit(".", 1)[-1], changed_at=_ns(env["ts"]),
                       sha256=env["data"].get("sha256"), plugins=env["data"].get("plugins"),
                       valid=env["data"].get("valid"))
    return out


def _losses(journal: Journal, since_ns: int | None, until_ns: int | None) -> list[dict[str, Any]]:
    return [s.envelope for s in journal.query(Filters(kinds=[JournalKind.LOSS], since_ns=since_ns,
                                                      until_ns=until_ns))]


def _story(journal: Journal, subject: dict[str, Any], events: list[Stored]) -> Story:
    envs = [s.envelope for s in events]
    plugin_envs = [e for e in envs if e["kind"] in (KernelKind.PLUGIN_STARTED, KernelKind.PLUGIN_FINISHED)]
    run_ids = sorted({str(e["data"]["run_id"]) for e in plugin_envs if e["data"].get("run_id")})
    caused = [s.envelope for s in journal.runs(run_ids)]
    run_events = [e for e in caused if e["kind"].startswith(("link.", "addr.", "netns."))]
    story = Story(subject, attempts=_attempts(plugin_envs, run_events),
                  k8s=[e for e in envs if e["kind"].startswith("k8s.pod.")])
    subject["containers"] = sorted({str(e["data"]["container_id"]) for e in plugin_envs
                                    if e["data"].get("container_id")})
    for attempt in story.attempts:
        attempt.config = _active_config(journal, attempt.start_ns)
    failures = [a for a in story.attempts if a.failed_run is not None]
    if failures:
        first = failures[0].start_ns
        story.config_changes = [s.envelope for s in journal.query(Filters(
            kinds=["cni.config."], since_ns=first - int(CONFIG_WINDOW_S * 1e9), until_ns=first))]
    times = [e["ts"] for e in envs]
    if times:
        story.losses = _losses(journal, min(times), max(times))
    story.verdict = verdict(story)
    return story


def explain_pod(journal: Journal, namespace: str, name: str) -> Story:
    events = journal.query(Filters(pod=(namespace, name)))
    uids = sorted({u for s in events if (u := _pod_uid(s.envelope))})
    return _story(journal, {"kind": "pod", "namespace": namespace, "name": name, "uids": uids}, events)


def explain_container(journal: Journal, container: str) -> Story:
    events = journal.query(Filters(container=container))
    pods = sorted({f"{a['K8S_POD_NAMESPACE']}/{a['K8S_POD_NAME']}" for s in events
                   if isinstance(a := s.envelope["data"].get("cni_args"), dict)
                   and a.get("K8S_POD_NAMESPACE") and a.get("K8S_POD_NAME")})
    return _story(journal, {"kind": "container", "container_id": container, "pods": pods}, events)


def _pod_uid(env: dict[str, Any]) -> str | None:
    d = env["data"]
    if env["kind"].startswith("k8s.pod.") and d.get("uid"):
        return str(d["uid"])
    args = d.get("cni_args")
    if isinstance(args, dict) and args.get("K8S_POD_UID"):
        return str(args["K8S_POD_UID"])
    return None


# -- the verdict ---------------------------------------------------------------------------------


def _clock(ts_ns: int) -> str:
    """03:12:04 today, the full time otherwise (local, with the zone)."""
    dt = datetime.datetime.fromtimestamp(ts_ns / 1e9).astimezone()
    if dt.date() == datetime.datetime.now().astimezone().date():
        return dt.strftime("%H:%M:%S")
    return dt.isoformat(timespec="seconds")


def _error_of(run: Run) -> dict[str, Any]:
    d = run.data
    err: dict[str, Any] = d["error"] if isinstance(d.get("error"), dict) else {}
    failed_ipam = next((r for r in run.ipam if r.failed), None)
    out = {"plugin": d.get("plugin"), "code": err.get("code"), "msg": err.get("msg") or d.get("output_error")
           or d.get("exit_reason") or (f"exit {d.get('exit_code')}" if d.get("exit_code") is not None else None)}
    if err.get("details"):
        out["details"] = err["details"]
    if failed_ipam is not None:
        out["ipam"] = failed_ipam.data.get("plugin")
    return out


def verdict(story: Story) -> dict[str, Any]:
    adds = [a for a in story.attempts if a.command == "ADD"]
    dels = [a for a in story.attempts if a.command == "DEL"]
    last_add = adds[-1] if adds else None
    k8s_ips = next((e["data"].get("ips") for e in reversed(story.k8s)
                    if e["kind"] in (K8sKind.POD_IP_ALLOCATED, K8sKind.POD_IP_CHANGED)), None)
    released = next((e for e in reversed(story.k8s) if e["kind"] == K8sKind.POD_IP_RELEASED), None)
    out: dict[str, Any] = {"state": "unknown", "summary": "", "ips": [], "error": None}
    if last_add is None:
        if k8s_ips:
            out.update(state="networked", ips=list(k8s_ips), summary=f"the API server reports IPs "
                       f"{', '.join(k8s_ips)}; no CNI run of it is in the journal")
        else:
            out["summary"] = "no CNI run, pod IP or kubelet event of it is in the journal"
        if released is not None:
            out.update(state="torn_down", summary=f"IPs released at {_clock(released['ts'])} "
                       f"({released['data'].get('reason')})")
        return out
    failed = last_add.failed_run
    if failed is not None:
        err = _error_of(failed)
        where = f"{err['plugin']}" + (f" (IPAM {err['ipam']})" if err.get("ipam") else "")
        code = f"code {err['code']} " if err.get("code") is not None else ""
        summary = f"ADD failed at {_clock(last_add.start_ns)} in {where}: {code}\"{err['msg']}\""
        cfg = last_add.config
        if cfg and cfg.get("path"):
            summary += f"; conflist {cfg['path']}" + (f" (network {cfg['network']})" if cfg.get("network") else "")
            if cfg.get("changed_at") and cfg.get("last_change") in ("modified", "created"):
                summary += f" was {cfg['last_change']} at {_clock_iso(cfg['changed_at'])}"
        out.update(state="failed", summary=summary, error={k: err.get(k) for k in ("plugin", "code", "msg")})
        return out
    ips = last_add.ips() or list(k8s_ips or [])
    later_del = next((d for d in dels if d.start_ns > last_add.start_ns), None)
    if later_del is not None:
        out.update(state="torn_down", ips=ips, summary=f"networked at {_clock(last_add.start_ns)} "
                   f"({', '.join(ips) or 'no IP'}), torn down by DEL at {_clock(later_del.start_ns)}")
        return out
    link = _veth(last_add)
    chain = [str(r.data.get("plugin")) for r in last_add.runs]
    out.update(state="networked", ips=ips, interface=last_add.first.get("ifname"), chain=chain,
               summary=f"networked at {_clock(last_add.start_ns)}: {', '.join(ips) or 'no IP'} on "
                       f"{last_add.first.get('ifname')}" + (f" (veth peer {link})" if link else "")
                       + f" by {' -> '.join(chain)}")
    if link:
        out["veth_peer"] = link
    return out


def _clock_iso(text: str) -> str:
    return _clock(int(datetime.datetime.fromisoformat(text).timestamp() * 1e9))


def _veth(attempt: Attempt) -> str | None:
    for run in attempt.runs:
        for e in run.events:
            d = e["data"]
            if e["kind"] == KernelKind.LINK_CREATED and d.get("kind") == "veth" and d.get("peer"):
                return str(d["peer"]) if d.get("name") == attempt.first.get("ifname") else str(d.get("name"))
    return None


# -- an IP address ---------------------------------------------------------------------------------


@dataclass
class Holding:
    holder: dict[str, Any]  #: pod and/or container_id
    start_ns: int
    end_ns: int | None
    evidence: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"holder": self.holder, "from": _ns(self.start_ns),
                "until": None if self.end_ns is None else _ns(self.end_ns), "evidence": self.evidence}


def explain_ip(journal: Journal, address: str, *, at_ns: int | None = None) -> dict[str, Any]:
    """Who held ``address``, when, from which CNI run or pod."""
    ip = normal_ip(address) or address
    holdings: list[Holding] = []
    for s in journal.query(Filters(ip=ip)):
        env = s.envelope
        d = env["data"]
        if env["kind"] == KernelKind.PLUGIN_FINISHED and d.get("command") == "ADD" and not d.get("parent_run"):
            cid = d.get("container_id")
            args: dict[str, Any] = d["cni_args"] if isinstance(d.get("cni_args"), dict) else {}
            holder = {"container_id": cid}
            if args.get("K8S_POD_NAME"):
                holder["pod"] = f"{args.get('K8S_POD_NAMESPACE')}/{args['K8S_POD_NAME']}"
            if any(h.holder.get("container_id") == cid and h.end_ns is None for h in holdings):
                continue
            holdings.append(Holding(holder, env["ts"], _released(journal, str(cid), env["ts"]),
                                    [{"kind": env["kind"], "time": _ns(env["ts"]), "run_id": d.get("run_id"),
                                      "plugin": d.get("plugin")}]))
        elif env["kind"] in (K8sKind.POD_IP_ALLOCATED, K8sKind.POD_IP_CHANGED, K8sKind.POD_IP_RELEASED):
            pod = f"{d.get('namespace')}/{d.get('name')}"
            evidence = {"kind": env["kind"], "time": _ns(env["ts"])}
            # The pod's holding this event belongs to: the API server reports
            # after the CNI run, and may report a release after the DEL.
            mine = next((h for h in reversed(holdings) if h.holder.get("pod") == pod
                         and (h.end_ns is None or env["ts"] <= h.end_ns + int(K8S_LAG_S * 1e9))), None)
            releases = env["kind"] == K8sKind.POD_IP_RELEASED or ip not in (d.get("ips") or [])
            if mine is not None:
                mine.evidence.append(evidence)
                if releases and mine.end_ns is None:
                    mine.end_ns = env["ts"]
            elif not releases:
                holdings.append(Holding({"pod": pod, "uid": d.get("uid")}, env["ts"], None, [evidence]))
    holdings.sort(key=lambda h: h.start_ns)
    out: dict[str, Any] = {"subject": {"kind": "ip", "address": ip}, "holders": [h.to_json() for h in holdings]}
    if at_ns is not None:
        held = [h for h in holdings if h.start_ns <= at_ns and (h.end_ns is None or at_ns < h.end_ns)]
        out["at"] = _ns(at_ns)
        out["held_by"] = held[-1].to_json() if held else None
    out["verdict"] = _ip_verdict(ip, holdings, out.get("held_by"), at_ns)
    return out


def _released(journal: Journal, container: str, after_ns: int) -> int | None:
    """When the container's network was torn down (its first DEL after ``after_ns``)."""
    for s in journal.query(Filters(container=container, kinds=[KernelKind.PLUGIN_FINISHED], since_ns=after_ns)):
        d = s.envelope["data"]
        if d.get("command") == "DEL" and d.get("container_id") == container:
            return s.ts
    return None


def _ip_verdict(ip: str, holdings: list[Holding], held_by: dict[str, Any] | None, at_ns: int | None) -> str:
    def who(h: dict[str, Any]) -> str:
        holder = h["holder"]
        cid = holder.get("container_id")
        return str(holder.get("pod") or "") + (f" (container {str(cid)[:12]})" if cid else "")
    if at_ns is not None:
        return (f"{ip} was held by {who(held_by)} at {_clock(at_ns)}" if held_by
                else f"nobody held {ip} at {_clock(at_ns)} as far as the journal knows")
    if not holdings:
        return f"{ip} does not appear in the journal"
    last = holdings[-1].to_json()
    if holdings[-1].end_ns is None:
        return f"{ip} is held by {who(last)} since {_clock(holdings[-1].start_ns)}"
    return f"{ip} was last held by {who(last)} until {_clock(holdings[-1].end_ns)}; free since"
