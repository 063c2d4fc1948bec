"""Event lines for humans: the compact form of ``tail -o compact`` and
``history`` (one line per finished CNI plugin run, a delegated IPAM run folded
into its parent's line, one short line for anything else), the long form of
``tail``, and the story of ``explain``.

Colour only on a terminal and never with ``NO_COLOR`` set (no-color.org).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections import OrderedDict
from typing import Any, TextIO

import click

from cnisup.protocol.kinds import JournalKind, KernelKind, MonitorKind

#: Delegated runs waiting for their parent's line (a parent that never finishes is forgotten).
MAX_PENDING_CHILDREN = 1024
#: Characters of a message shown in a compact line.
MESSAGE_MAX = 160


def use_color(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


class Clock:
    """Time of day for events of today (local time), the full RFC 3339 time otherwise."""

    def __init__(self) -> None:
        self.today = datetime.datetime.now().astimezone().date()

    def __call__(self, ts_ns: int) -> str:
        dt = datetime.datetime.fromtimestamp(ts_ns / 1e9).astimezone()
        if dt.date() == self.today:
            return dt.strftime("%H:%M:%S.") + f"{dt.microsecond // 1000:03d}"
        return dt.isoformat(timespec="milliseconds")


def _who(d: dict[str, Any]) -> str:
    args: dict[str, Any] = d["cni_args"] if isinstance(d.get("cni_args"), dict) else {}
    if args.get("K8S_POD_NAME"):
        return f"{args.get('K8S_POD_NAMESPACE', '?')}/{args['K8S_POD_NAME']}"
    cid = d.get("container_id")
    return f"ctr:{str(cid)[:12]}" if cid else "-"


def _short(text: Any, limit: int = MESSAGE_MAX) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 1] + "…"


def _ips(d: dict[str, Any]) -> str:
    result = d.get("result")
    if isinstance(result, dict) and isinstance(result.get("ips"), list):
        return ",".join(str(i.get("address")) for i in result["ips"] if isinstance(i, dict))
    return ""


def run_failed(d: dict[str, Any]) -> bool:
    code = d.get("exit_code")
    return "error" in d or (isinstance(code, int) and code != 0)


def _error(d: dict[str, Any]) -> str:
    err = d.get("error")
    if isinstance(err, dict):
        code = f"code {err['code']} " if err.get("code") is not None else ""
        return code + _short(err.get("msg") or err.get("details") or "")
    return _short(d.get("output_error") or d.get("exit_reason") or f"exit {d.get('exit_code')}")


def _summary(env: dict[str, Any]) -> str:
    """The short line of any kind but a plugin run."""
    kind, d = env["kind"], env["data"]
    if kind.startswith("cni.config.") or kind.startswith("cni.plugin_binary."):
        parts = [str(d.get("path"))]
        if d.get("network"):
            parts.append(f"network {d['network']}")
        if d.get("valid") is False:
            parts.append(f"INVALID: {_short(d.get('error'))}")
        if kind.endswith("active_changed"):
            parts.append(f"(was {d.get('previous')})")
        return " ".join(parts)
    if kind == "k8s.pod.event":
        return f"{d.get('namespace')}/{d.get('name')} {d.get('reason')}: {_short(d.get('message'))}"
    if kind.startswith("k8s.pod."):
        extra = f" ({d['reason']})" if d.get("reason") else ""
        return f"{d.get('namespace')}/{d.get('name')} {','.join(d.get('ips') or [])}{extra}"
    if kind.startswith("k8s."):
        name = f"{d['namespace']}/{d.get('name')}" if d.get("namespace") else str(d.get("name"))
        return name + (f" changed {','.join(d['changed'])}" if d.get("changed") else "")
    if kind.startswith(("link.", "addr.", "netns.")):
        by = f" by {d['plugin']}" if d.get("plugin") else (f" by {d['comm']}" if d.get("comm") else "")
        if kind.startswith("addr."):
            return f"{d.get('address')}/{d.get('prefixlen')} ifindex {d.get('ifindex')}{by}"
        if kind.startswith("link."):
            peer = f" peer {d['peer']}" if d.get("peer") else ""
            return f"{d.get('name') or d.get('ifindex')} {d.get('kind') or ''}{peer}{by}".replace("  ", " ")
        where = d.get("netns") or (f"fd {d.get('fd')}" if "fd" in d else "?")
        return f"{where}{by}"
    if kind == MonitorKind.WARNING:
        return f"{d.get('worker')} {d.get('code')}: {_short(d.get('message'))}"
    if kind == JournalKind.LOSS:
        return f"{d.get('lost')} event(s) of {d.get('source')} lost: {d.get('reason')}"
    if kind.startswith("supervisor.worker."):
        what = d.get("reason") or (f"pid {d['pid']}" if d.get("pid") else "")
        return f"{d.get('family')} {d.get('worker') or ''} {_short(what)}".replace("  ", " ")
    return _short(json.dumps(d, separators=(",", ":"), default=str))


class Compact:
    """Events in, compact lines out (``feed``); delegated runs wait for their parent."""

    def __init__(self, *, color: bool) -> None:
        self.color = color
        self.clock = Clock()
        self._children: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def _paint(self, text: str, **style: Any) -> str:
        return click.style(text, **style) if self.color else text

    def feed(self, env: dict[str, Any]) -> list[str]:
        kind, d = env["kind"], env["data"]
        if kind == KernelKind.PLUGIN_STARTED:
            return []
        if kind == KernelKind.PLUGIN_FINISHED:
            parent = d.get("parent_run")
            if isinstance(parent, str) and parent:
                self._children.setdefault(parent, []).append(d)
                while len(self._children) > MAX_PENDING_CHILDREN:
                    self._children.popitem(last=False)
                return []
            return [self._run(env)]
        line = f"{self.clock(env['ts'])} {kind:28} {_summary(env)}"
        if kind in (MonitorKind.WARNING, JournalKind.LOSS) or d.get("valid") is False or d.get("type") == "Warning":
            return [self._paint(line, fg="yellow")]
        return [line]

    def _run(self, env: dict[str, Any]) -> str:
        d = env["data"]
        children = self._children.pop(str(d.get("run_id")), [])
        plugin = str(d.get("plugin"))
        if children:
            plugin += "(" + ",".join(str(c.get("plugin")) for c in children) + ")"
        failed = run_failed(d) or any(run_failed(c) for c in children)
        status = self._paint("failed", fg="red", bold=True) if failed else self._paint("ok    ", fg="green")
        duration = f"{d['duration_ms']:.1f}ms" if isinstance(d.get("duration_ms"), int | float) else "?"
        if failed:
            failing = d if run_failed(d) else next(c for c in children if run_failed(c))
            tail = self._paint(_error(failing), fg="red")
        else:
            tail = _ips(d) or next((ips for c in children if (ips := _ips(c))), "")
        return (f"{self.clock(env['ts'])} {d.get('command') or '?'!s:5} {status} {_who(d):28} "
                f"{d.get('ifname') or '-'!s:6} {plugin:22} {duration:>9} {tail}").rstrip()


class Printer:
    """One output mode of ``tail``/``history`` (``compact``, ``long``, ``json``) on stdout."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.color = use_color(sys.stdout)
        self.compact = Compact(color=self.color)
        self.clock = Clock()
        self.seen = 0

    def __call__(self, env: dict[str, Any], text: str | None = None) -> None:
        """``text``: the envelope exactly as published, printed as is with ``json``."""
        self.seen += 1
        if self.output == "json":
            click.echo(text if text is not None else json.dumps(env, separators=(",", ":"), ensure_ascii=False))
        elif self.output == "compact":
            for line in self.compact.feed(env):
                click.echo(line, color=self.color)
        else:
            click.echo(long_line(env, self.clock))


def long_line(env: dict[str, Any], clock: Clock) -> str:
    """The long form: every field of the data."""
    parts = []
    for key, value in env["data"].items():
        if isinstance(value, str) and len(value) == 64 and key.endswith("sha256"):
            value = value[:12]
        parts.append(f"{key}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}")
    return f"{clock(env['ts'])} {env['source']:12} {env['kind']:34} {' '.join(parts)}"


def _t(text: str, clock: Clock) -> str:
    return clock(int(datetime.datetime.fromisoformat(text).timestamp() * 1e9))


def story_lines(story: dict[str, Any], *, color: bool) -> list[str]:
    """``explain pod|container``: the story in time order, then the verdict."""
    clock = Clock()
    paint = (lambda s, **kw: click.style(s, **kw)) if color else (lambda s, **kw: s)
    subject = story["subject"]
    if subject["kind"] == "pod":
        head = f"pod {subject['namespace']}/{subject['name']}"
        if subject.get("uids"):
            head += f" (uid {', '.join(subject['uids'])})"
    else:
        head = f"container {subject['container_id']}" + (f" (pod {', '.join(subject['pods'])})"
                                                         if subject.get("pods") else "")
    if subject.get("containers"):
        head += f"; containers {', '.join(c[:12] for c in subject['containers'])}"
    items: list[tuple[str, list[str]]] = []  # (rfc3339 time, lines)
    for c in story["config_changes"]:
        what, d = c["kind"].rsplit(".", 1)[-1], c["data"]
        net = f" (network {d['network']})" if d.get("network") else ""
        bad = paint(f" INVALID: {d.get('error')}", fg="yellow") if d.get("valid") is False else ""
        items.append((c["time"], [f"config  {d.get('path')} {what}{net}{bad}"]))
    for k in story["k8s"]:
        d = k["data"]
        if k["kind"] == "k8s.pod.event":
            line = f"k8s     {d.get('type', '')} {d.get('reason')}: {_short(d.get('message'), 400)}"
            items.append((k["time"], [paint(line, fg="yellow") if d.get("type") == "Warning" else line]))
        else:
            items.append((k["time"], [f"k8s     {k['kind'].rsplit('.', 1)[-1]} {','.join(d.get('ips') or [])}"
                                      + (f" ({d['reason']})" if d.get("reason") else "")]))
    for a in story["attempts"]:
        lines = [f"{a['command']:7} container {str(a.get('container_id'))[:12]} {a.get('ifname')} network "
                 f"{a.get('network')} netns {a.get('netns')}"]
        cfg = a.get("config")
        if cfg:
            changed = _t(cfg["changed_at"], clock) if cfg.get("changed_at") else "?"
            lines.append(f"          conflist {cfg.get('path')} (network {cfg.get('network')}, "
                         f"last {cfg.get('last_change', '?')} {changed})")
        for p in a["plugins"]:
            lines += _plugin_lines(p, paint, indent="          ")
        items.append((a["started"], lines))
    for loss in story["losses"]:
        d = loss["data"]
        items.append((loss["time"], [paint(f"journal {d.get('lost')} event(s) of {d.get('source')} lost: "
                                           f"{d.get('reason')}", fg="yellow")]))
    out = [head]
    for when, lines in sorted(items, key=lambda x: x[0]):
        out.append(f"{_t(when, clock)}  {lines[0]}")
        out += [f"{'':14}{line}" for line in lines[1:]]
    v = story["verdict"]
    style = {"failed": "red", "networked": "green", "torn_down": "cyan"}.get(v["state"])
    out.append(paint(f"verdict: {v['state']}: {v['summary']}", fg=style, bold=True) if style
               else f"verdict: {v['state']}: {v['summary']}")
    return out


def _plugin_lines(p: dict[str, Any], paint: Any, *, indent: str) -> list[str]:
    failed = p.get("exit_code") not in (0, None) or "error" in p
    status = paint("failed", fg="red") if failed else ("ok" if p.get("finished") else "running?")
    dur = f"{p['duration_ms']:.1f} ms" if isinstance(p.get("duration_ms"), int | float) else "?"
    line = f"{indent}{p.get('plugin'):12} {status} exit {p.get('exit_code')} {dur}"
    if failed:
        line += " " + paint(_error(p), fg="red")
    elif isinstance(p.get("result"), dict) and p["result"].get("ips"):
        line += " " + _ips(p)
    lines = [line]
    for e in p.get("events", []):
        if e["kind"] in _STORY_KINDS:  # the rest (link.changed, netns.entered) is in --json
            lines.append(f"{indent}  {e['kind']:14} {_summary(e)}")
    for child in p.get("ipam", []):
        lines += _plugin_lines(child, paint, indent=indent + "  ipam ")
    return lines


#: What a run did that the human story shows.
_STORY_KINDS = frozenset({KernelKind.LINK_CREATED, KernelKind.LINK_DELETED, KernelKind.LINK_MOVED,
                          KernelKind.ADDR_ADDED, KernelKind.ADDR_DELETED, KernelKind.NETNS_CREATED})


def ip_lines(report: dict[str, Any], *, color: bool) -> list[str]:
    """``explain ip``: who held the address, when; then the verdict."""
    clock = Clock()
    out = [f"ip {report['subject']['address']}"]
    for h in report["holders"]:
        holder = h["holder"]
        who = holder.get("pod") or "-"
        if holder.get("container_id"):
            who += f" (container {str(holder['container_id'])[:12]})"
        until = _t(h["until"], clock) if h.get("until") else "now"
        out.append(f"  {_t(h['from'], clock)} -> {until}  {who}")
        out += [f"      {e['kind']} at {_t(e['time'], clock)}" for e in h["evidence"]]
    verdict = f"verdict: {report['verdict']}"
    out.append(click.style(verdict, bold=True) if color else verdict)
    return out
