"""``kernel.capture: full``: every CNI plugin run, seen by always-on syscall
tracepoints (the ebpf worker's program when asked for request payloads).

What it traces: the tracepoints listed in ``features`` (exec/fork/exit,
execve's environment, fds 0/1/2 of plugin processes, their NETLINK_ROUTE
requests, and CLONE_NEWNET unshare/clone/setns from any process); the BPF
side is ``cnirun.bpf.c``. Reading order: options → the BPF program →
attach → decode → loop.

* Optional tracepoints that are missing are compiled out (``-DHAVE_*``),
  named in ``cnisup check`` and in ``status`` (``info.degraded``).
* No BCC, no headers, no tracefs, no root, or a program the kernel refuses:
  ``CapabilityMissing`` (exit 77) and the supervisor starts proc-poll.
* Events come from one ring buffer in the order the kernel produced them, and
  are published in that order; a run's ``cni.plugin.started`` waits until its
  stdin (the network config) was read to EOF, at most ``START_DELAY_S``, or
  until the run does something that is reported.
* Kernel-side losses (ring buffer full) are counted in BPF (``lost``) and
  reported as ``monitor.warning`` code ``ringbuf_loss`` and
  ``info.kernel_dropped`` / ``info.kernel_runs_lost``; the runs concerned
  say ``truncated: ["events"]`` (or ``["env"]``).
* The program is compiled and attached in the constructor, before the worker
  reports ready: "ready" means "capturing".
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cnisup.protocol.kinds import KernelKind as K
from cnisup.workers.base import WorkerContext
from cnisup.workers.errors import CapabilityMissing
from cnisup.workers.kernel import events, features, netwatch
from cnisup.workers.kernel.ebpf import MAX_BIN_DIRS, PATH_MAX, RingConsumer, alive_since, compile_program, fill_bin_dirs

BPF_SOURCE = Path(__file__).with_name("cnirun.bpf.c")

# Defined here once; the BPF program gets them as -D flags (``_constants``).
EV_ENV, EV_EXEC, EV_EXIT, EV_STDIN, EV_STDOUT, EV_STDERR = 1, 2, 3, 4, 5, 6
EV_NETLINK, EV_NETNS_NEW, EV_NETNS_ENTER = 7, 8, 9
F_TRUNCATED, F_HAVE_CODE, F_LOST, F_MULTI_IOV = 1, 2, 4, 8
VIA_UNSHARE, VIA_CLONE = 0, 1  #: EV_NETNS_NEW code

#: 4 MiB: at 4 KiB per chunk this holds ~1000 captures, far more than a
#: burst of plugin runs produces before the consumer wakes.
RINGBUF_PAGES = 1024
#: A run whose plugin never reads stdin to EOF is announced after this long.
START_DELAY_S = 0.2
#: How often the loss counter and vanished runs are looked at.
HOUSEKEEPING_S = 1.0
#: An execve's CNI_* block whose exec never completed is forgotten after this long.
ENV_TTL_S = 10.0


def build_flags(optional: list[str], *, group_dead: bool, ringbuf_pages: int = RINGBUF_PAGES) -> list[str]:
    """The cflags of the BPF program: what it and this decoder must agree on
    (defined once, here), and the build switches of what the host has."""
    names = ("EV_ENV", "EV_EXEC", "EV_EXIT", "EV_STDIN", "EV_STDOUT", "EV_STDERR", "EV_NETLINK", "EV_NETNS_NEW",
             "EV_NETNS_ENTER", "F_TRUNCATED", "F_HAVE_CODE", "F_LOST", "F_MULTI_IOV", "VIA_UNSHARE", "VIA_CLONE",
             )
    values = globals()
    flags = [f"-D{n}={values[n]}" for n in names]
    flags += [f"-DPATH_MAX_={PATH_MAX}", f"-DMAX_BIN_DIRS={MAX_BIN_DIRS}", f"-DRINGBUF_PAGES={ringbuf_pages}"]
    flags += [f"-DHAVE_{s}=1" for s in optional]
    return [*flags, "-DHAVE_GROUP_DEAD=1"] if group_dead else flags


class FullCapture(RingConsumer):
    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        self.bin_dirs = ctx.config.cni.bin_dirs
        self.runs: dict[int, events.Run] = {}
        self.envs: dict[int, tuple[float, bytes, bool]] = {}
        self.finishing: list[tuple[int, int, int | None, str | None]] = []
        self.created_at: dict[int, float] = {}
        self.counts.update(runs_started=0, runs_finished=0, netlink_events=0, netns_events=0, bad_netlink=0)
        self._warnings: list[tuple[str, str]] = []  #: (code, message), published once the bus is up
        # Loaded before the worker reports ready, so "ready" means "capturing".
        self.bpf = self._load()
        self._table = self.bpf["events"]

    # -- the BPF program -------------------------------------------------------------
    def _load(self) -> Any:
        host = features.check(capture="full")  # what the probe saw: the build switches come from it
        if not host.ok:
            raise CapabilityMissing(host.reason)
        cflags = build_flags(host.enabled_optional, group_dead=host.group_dead)
        bpf, load_s = compile_program(BPF_SOURCE, cflags)
        bpf.free_bcc_memory()  # clang/LLVM state, not needed once loaded
        missing = [f"{s}: no {features.OPTIONAL[s][1]}" for s in features.OPTIONAL
                   if s not in host.enabled_optional]
        self.ctx.set_info(load_s=round(load_s, 3), bcc=host.details.get("bcc"),
                          headers=host.details.get("headers"), attached=sorted(host.enabled_optional),
                          degraded=missing, kernel_dropped=0, kernel_runs_lost=0)
        self.ctx.log.info("BPF program compiled and loaded in %.2f s%s", load_s,
                          f"; degraded: {'; '.join(missing)}" if missing else "")
        self._warnings += [("tracepoint_missing", m) for m in missing]
        self._warnings += fill_bin_dirs(bpf, self.bin_dirs)
        return bpf

    # -- the loop ------------------------------------------------------------------
    def run(self) -> None:
        ctx, bpf = self.ctx, self.bpf
        for code, message in self._warnings:
            ctx.warn(code, message)
        self._table.open_ring_buffer(self._on_event)
        ring_fd = self._table.map_fd  # readable when records are waiting (the kernel's epoll on the ring)
        next_housekeeping = time.monotonic() + HOUSEKEEPING_S
        while not ctx.stopping:
            if ctx.wait([ring_fd], timeout_s=min(next_housekeeping, self._next_start()) - time.monotonic()):
                bpf.ring_buffer_consume()
            self._flush()
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_S
                self._check_loss()
                self._reap_vanished()
            ctx.set_info(runs_active=len(self.runs), **self.counts)
        bpf.ring_buffer_consume()
        self._flush()

    def _next_start(self) -> float:
        """When the next run still waiting for its stdin is announced anyway."""
        return min((self.created_at[k] + START_DELAY_S for k, r in self.runs.items() if not r.started_sent),
                   default=float("inf"))

    # -- decoding --------------------------------------------------------------------
    def _handle(self, e: Any, payload: bytes) -> None:
        t = int(e.type)
        if t == EV_ENV:
            self.envs[int(e.tid)] = (time.monotonic(), payload, bool(e.flags & F_TRUNCATED))
        elif t == EV_EXEC:
            self._on_exec(e, payload)
        elif t in (EV_STDIN, EV_STDOUT, EV_STDERR):
            self._on_stream(t, e, payload)
        elif t == EV_EXIT:
            run = self.runs.get(int(e.run))
            if run is None:
                return
            if e.flags & F_LOST:
                run.truncated.add("events")
            if e.flags & F_TRUNCATED:
                run.truncated.add("stdout")
            code = int(e.code) & 0xFF if e.flags & F_HAVE_CODE else None
            reason = None if code is not None else "no exit_group: killed by a signal or exited by its last thread"
            # One ring buffer keeps the kernel's order: everything the run wrote is already in.
            self.finishing.append((int(e.run), self._wall(e.ts), code, reason))
            self._flush()
        elif t == EV_NETLINK:
            self._on_netlink(e, payload)
        elif t in (EV_NETNS_NEW, EV_NETNS_ENTER):
            self._on_netns(t, e)

    def _on_exec(self, e: Any, payload: bytes) -> None:
        env_raw, env_truncated = b"", False
        if (pending := self.envs.pop(int(e.tid), None)) is not None:
            _, env_raw, env_truncated = pending
        pid, key = int(e.pid), int(e.run)
        run = events.Run(
            run_id=events.run_id(pid, key), pid=pid, path=payload.decode(errors="replace"),
            start_ns=self._wall(e.ts), ppid=int(e.ppid) or None, env=events.parse_env_block(env_raw),
            parent_run=events.run_id(int(e.parent_pid), int(e.parent_run)) if e.parent_run else None)
        if env_truncated or e.flags & F_TRUNCATED:  # cut, or lost to a full ring buffer
            run.truncated.add("env")
        self.runs[key] = run
        self.created_at[key] = time.monotonic()

    def _on_stream(self, t: int, e: Any, payload: bytes) -> None:
        run = self.runs.get(int(e.run))
        if run is None:
            return
        name = {EV_STDIN: "stdin", EV_STDOUT: "stdout", EV_STDERR: "stderr"}[t]
        getattr(run, name).extend(payload)
        if e.flags & F_TRUNCATED:
            run.truncated.add(name)
        if t == EV_STDIN and (not payload or e.flags & F_TRUNCATED):
            run.stdin_done = True
            self._announce(run)

    def _attribution(self, e: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": int(e.pid), "comm": bytes(e.comm).decode(errors="replace")}
        run = self.runs.get(int(e.run)) if e.run else None
        if run is not None:
            self._announce(run)  # started always comes before what the run did
            out.update(run.attribution())
        return out

    def _on_netlink(self, e: Any, payload: bytes) -> None:
        changes, problems = events.parse_rtnetlink(payload)
        attribution = self._attribution(e)
        for change in changes:
            data = {**change.data, **attribution}
            for key in ("target_netns", "peer_netns"):
                if isinstance(data.get(key), str) and data[key].startswith("fd:"):
                    data[key] = _resolve_fd(int(e.pid), int(data[key][3:])) or data[key]
            if e.flags & (F_TRUNCATED | F_MULTI_IOV):
                data["truncated"] = True
            self.counts["netlink_events"] += 1
            self.ctx.publish(change.kind, data, ts=self._wall(e.ts))
        for p in problems:
            self.counts["bad_netlink"] += 1
            self.ctx.warn("bad_netlink", f"pid {int(e.pid)}: {p}")

    def _on_netns(self, t: int, e: Any) -> None:
        data = self._attribution(e)
        if t == EV_NETNS_NEW:
            via = "clone" if e.code == VIA_CLONE else "unshare"
            data["via"] = via
            holder = int(e.aux) if via == "clone" else int(e.pid)
            if via == "clone":
                data["child_pid"] = holder
            # The thread that unshared, not its process: runtimes unshare on a thread.
            ns = _readlink(f"/proc/{holder}/task/{holder if via == 'clone' else int(e.tid)}/ns/net")
            kind = K.NETNS_CREATED
        else:
            data["fd"] = int(e.aux)
            ns = _resolve_fd(int(e.pid), int(e.aux))
            if ns is None and _readlink(f"/proc/{int(e.pid)}/fd/{int(e.aux)}") is not None:
                return  # setns(fd, 0) into some other kind of namespace, or the fd is already reused
            kind = K.NETNS_ENTERED
        if ns is not None:
            data["netns"] = ns
            if (inode := _ns_inode(ns)) is not None:
                data["inode"] = inode
        self.counts["netns_events"] += 1
        self.ctx.publish(kind, data, ts=self._wall(e.ts))

    # -- runs ------------------------------------------------------------------------
    def _announce(self, run: events.Run) -> None:
        if not run.started_sent:
            run.started_sent = True
            self.counts["runs_started"] += 1
            self.ctx.publish(K.PLUGIN_STARTED, run.started_data(), ts=run.start_ns)

    def _flush(self) -> None:
        for key, end_ns, code, reason in self.finishing:
            run = self.runs.pop(key, None)
            self.created_at.pop(key, None)
            if run is None:
                continue
            self._announce(run)
            self.counts["runs_finished"] += 1
            self.ctx.publish(K.PLUGIN_FINISHED,
                             run.finished_data(end_ns=end_ns, exit_code=code, reason=reason), ts=end_ns)
        self.finishing.clear()
        now = time.monotonic()
        for key, run in self.runs.items():
            if not run.started_sent and (run.stdin_done or now - self.created_at[key] >= START_DELAY_S):
                self._announce(run)

    def _reap_vanished(self) -> None:
        """Runs whose exit event was lost: their process is gone, or is another one."""
        now = time.monotonic()
        dead = [key for key, run in self.runs.items()
                if now - self.created_at[key] >= 2 * HOUSEKEEPING_S and not alive_since(run.pid, key)]
        if dead:
            # An exit that happened before the check is in the ring buffer by now.
            self.bpf.ring_buffer_consume()
        for key in dead:
            if (run := self.runs.get(key)) is None:
                continue  # its exit event was just read
            run.truncated.add("events")
            self.finishing.append((key, time.time_ns(), None, "exit not captured (kernel events lost)"))
        for tid, (at, _, _) in list(self.envs.items()):
            if now - at > ENV_TTL_S:
                del self.envs[tid]  # its execve failed
        self._flush()


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _resolve_fd(pid: int, fd: int) -> str | None:
    """The network namespace an fd of ``pid`` refers to (``net:[4026532…]``
    or the bind mount's path); None once the process or the fd is gone, or
    when the fd is now something else (closed and reused: a pipe, a socket)."""
    target = _readlink(f"/proc/{pid}/fd/{fd}")
    if target is None:
        return None
    if target.startswith("net:["):
        return target
    return target if target.startswith("/") and netwatch.path_is_nsfs(target) else None


def _ns_inode(ns: str) -> int | None:
    if ns.startswith("net:[") and ns.endswith("]"):
        try:
            return int(ns[5:-1])
        except ValueError:
            return None
    try:
        return os.stat(ns).st_ino
    except OSError:
        return None
