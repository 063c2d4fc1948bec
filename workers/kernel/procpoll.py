"""Kernel family, fallback worker: scan ``/proc`` every
``fallback.process_poll_interval`` seconds.

* A process whose executable (or script, ``argv[0..1]``) is directly in a
  ``cni.bin_dirs`` entry is a plugin run: ``cni.plugin.started`` with what
  ``/proc/<pid>/environ`` and ``stat`` give; ``cni.plugin.finished`` once it is
  gone (``exit_code`` unknown, ``duration_approximate``). No stdin, stdout or
  netlink: ``network``, ``result`` and ``error`` are absent.
* Network namespaces: ``/var/run/netns`` and every ``/proc/<pid>/ns/net`` →
  ``netns.created`` / ``netns.deleted`` by difference.
* Host interfaces and addresses (pyroute2 dumps of this worker's own netns)
  → ``link.*`` / ``addr.*`` by difference, with no process attribution.

What it misses, by design: anything that starts and ends between two scans
(most plugin runs take milliseconds), every change inside other network
namespaces, and the order of changes within one interval.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from cnisup.protocol.kinds import KernelKind as K
from cnisup.workers.base import Worker, WorkerContext
from cnisup.workers.kernel import events

NETNS_DIRS = ("/var/run/netns", "/run/netns")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: str) -> tuple[int, int] | None:
    """(ppid, start time in boot-time ns) from /proc/<pid>/stat."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    try:
        fields = raw.rsplit(b")", 1)[1].split()
        return int(fields[1]), int(fields[19]) * 1_000_000_000 // _CLK_TCK
    except (IndexError, ValueError):
        return None


class ProcPollWorker(Worker):
    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config
        self.interval_s = cfg.fallback.process_poll_interval
        dirs = [d.rstrip("/") or "/" for d in cfg.cni.bin_dirs]
        self.bin_dirs = set(dirs) | {os.path.realpath(d) for d in dirs}
        self.boot_to_wall = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self.runs: dict[tuple[int, int], events.Run] = {}
        self.netns: dict[int, dict[str, Any]] = {}
        self.links: dict[int, dict[str, Any]] = {}
        self.addrs: dict[tuple[int, str, str, int], dict[str, Any]] = {}
        self.counts = {"scans": 0, "runs_seen": 0, "environ_unreadable": 0}
        self._ipr: Any = None

    def run(self) -> None:
        from pyroute2 import IPRoute

        ctx = self.ctx
        self._ipr = IPRoute()
        try:
            scan_at = time.monotonic()
            while not ctx.stopping:
                ctx.wait(timeout_s=scan_at - time.monotonic())
                t0 = time.monotonic()
                if t0 < scan_at or ctx.stopping:
                    continue
                self._scan(publish_state=self.counts["scans"] > 0)
                self.counts["scans"] += 1
                scan_at = t0 + self.interval_s
                ctx.set_info(interval_s=self.interval_s, runs_active=len(self.runs),
                             last_scan_ms=round((time.monotonic() - t0) * 1000, 2), **self.counts)
        finally:
            self._ipr.close()

    def _scan(self, *, publish_state: bool) -> None:
        """One pass. The first one only learns the netns/link/addr baseline;
        plugin runs already alive are reported, they are real runs."""
        procs: dict[tuple[int, int], tuple[str, int]] = {}
        ns_now: dict[int, dict[str, Any]] = {}
        for name in NETNS_DIRS:
            try:
                entries = list(os.scandir(name))
            except OSError:
                continue
            for entry in entries:
                try:
                    ino = os.stat(entry.path).st_ino
                except OSError:
                    continue
                ns_now.setdefault(ino, {"netns": f"net:[{ino}]", "inode": ino, "path": entry.path})
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            link = _readlink(f"/proc/{pid}/ns/net")
            if link and link.startswith("net:[") and link.endswith("]"):
                ino = int(link[5:-1])
                ns_now.setdefault(ino, {"netns": link, "inode": ino})
            path = self._plugin_path(pid)
            if path is None:
                continue
            st = _stat_fields(pid)
            if st is not None:
                procs[(int(pid), st[1])] = (path, st[0])
        self._diff_runs(procs)
        self._diff(self.netns, ns_now, publish_state,
                   created=K.NETNS_CREATED, deleted=K.NETNS_DELETED, changed=None)
        self.netns = ns_now
        self._scan_links(publish_state)

    def _plugin_path(self, pid: str) -> str | None:
        exe = _readlink(f"/proc/{pid}/exe")
        if exe and os.path.dirname(exe) in self.bin_dirs:
            return exe
        raw = _read(f"/proc/{pid}/cmdline")
        if not raw:
            return None
        for arg in raw.split(b"\0")[:2]:  # a script plugin: interpreter, then the script
            a = arg.decode(errors="replace")
            if a.startswith("/") and os.path.dirname(a) in self.bin_dirs:
                return a
        return None

    # -- plugin runs -----------------------------------------------------------------
    def _diff_runs(self, procs: dict[tuple[int, int], tuple[str, int]]) -> None:
        by_pid = {run.pid: run for run in self.runs.values()}
        for key in sorted(procs.keys() - self.runs.keys(), key=lambda k: k[1]):
            pid, start = key
            path, ppid = procs[key]
            environ = _read(f"/proc/{pid}/environ")
            if environ is None:
                self.counts["environ_unreadable"] += 1
            parent = by_pid.get(ppid)
            run = events.Run(run_id=events.run_id(pid, start), pid=pid, path=path,
                             start_ns=start + self.boot_to_wall, ppid=ppid,
                             env=events.parse_env_block(environ or b""),
                             parent_run=parent.run_id if parent else None)
            run.started_sent = True
            self.runs[key] = run
            by_pid[pid] = run
            self.counts["runs_seen"] += 1
            self.ctx.publish(K.PLUGIN_STARTED, run.started_data(), ts=run.start_ns)
        now = time.time_ns()
        for key in sorted(self.runs.keys() - procs.keys(), key=lambda k: k[1]):
            run = self.runs.pop(key)
            self.ctx.publish(K.PLUGIN_FINISHED, run.finished_data(
                end_ns=now, exit_code=None, approximate=True,
                reason="gone at this scan; proc-poll cannot know the exit code"), ts=now)

    # -- links and addresses -----------------------------------------------------------
    def _scan_links(self, publish_state: bool) -> None:
        try:
            links = self._ipr.get_links()
            addrs = self._ipr.get_addr()
        except Exception as exc:  # a netlink error or an unparseable dump: next scan retries
            self.ctx.warn("netlink_dump_failed", f"{type(exc).__name__}: {exc}")
            return
        links_now: dict[int, dict[str, Any]] = {}
        for m in links:
            info = m.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            links_now[int(m["index"])] = events.link_data(
                ifindex=int(m["index"]), name=m.get_attr("IFLA_IFNAME"),
                kind=kind if isinstance(kind, str) else None,
                master=m.get_attr("IFLA_MASTER"), mtu=m.get_attr("IFLA_MTU"),
                up=bool(m["flags"] & events.IFF_UP), address=m.get_attr("IFLA_ADDRESS"))
        for link in links_now.values():
            if isinstance(link.get("master"), int) and link["master"] in links_now:
                link["master_name"] = links_now[link["master"]].get("name")
        addrs_now: dict[tuple[int, str, str, int], dict[str, Any]] = {}
        for m in addrs:
            family = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}.get(m["family"])
            address = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
            if family is None or not isinstance(address, str):
                continue
            idx = int(m["index"])
            data: dict[str, Any] = {"address": address, "prefixlen": int(m["prefixlen"]),
                                    "family": family, "ifindex": idx}
            if isinstance(name := links_now.get(idx, {}).get("name"), str):
                data["ifname"] = name
            addrs_now[(idx, family, address, int(m["prefixlen"]))] = data
        self._diff(self.links, links_now, publish_state,
                   created=K.LINK_CREATED, deleted=K.LINK_DELETED, changed=K.LINK_CHANGED)
        self._diff(self.addrs, addrs_now, publish_state,
                   created=K.ADDR_ADDED, deleted=K.ADDR_DELETED, changed=None)
        self.links, self.addrs = links_now, addrs_now

    def _diff(self, before: dict[Any, dict[str, Any]], now: dict[Any, dict[str, Any]],
              publish: bool, *, created: str, deleted: str, changed: str | None) -> None:
        if not publish:
            return
        for key in now.keys() - before.keys():
            self.ctx.publish(created, now[key])
        for key in before.keys() - now.keys():
            self.ctx.publish(deleted, before[key])
        if changed is not None:
            for key in now.keys() & before.keys():
                if now[key] != before[key]:
                    self.ctx.publish(changed, now[key])


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
