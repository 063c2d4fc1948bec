"""``kernel.capture: lean`` (the default): every CNI plugin run with no
syscall tracepoint in the steady state, so the node's other processes pay
nothing for it.

What it traces (``lean.bpf.c``): ``sched_process_exec/fork/exit`` and
``task_newtask``, which fire per exec, fork and exit, never per syscall.
Where each field comes from:

* the CNI environment (``command``, ``container_id``, ``netns``, ``ifname``,
  ``cni_args``): the new image's env block, read at exec from its memory;
* ``exit_code``: ``task->exit_code`` of the run's last thread (a signal:
  ``exit_reason``); ``duration_ms``: kernel timestamps of exec and exit;
* ``result``/``error``/``stderr``: ``syscalls:sys_enter_write`` attached only
  while a run is alive (``WriteCapture``), matched to the open files that
  were the run's stdout and stderr at exec; where capture started after the
  exec, ``output_since_ms`` says so, and a successful ADD whose result was
  missed takes it from libcni's result cache (``result_source: "cache"``);
* ``link.*``/``addr.*``: rtnetlink listeners inside each namespace
  (``netwatch``); an address change names its requester (``nlmsg_pid``), a
  link change is tied to the run alive in that namespace at the time;
* ``netns.*``: the new task's namespace at clone (``task_newtask``), a task
  that exits in a namespace other than its leader's or parent's (a
  namespace made by unshare on a thread), pin files and ``CNI_NETNS``.

Not knowable without syscall tracepoints, so absent: the network config on
stdin (``network``, ``cni_version``, ``type``), and ``target_netns`` and
``fd`` of a request. Kernel struct offsets come from BTF at start (``btf``),
passed to the program as ``-DOFF_*``. The loop blocks only in ``ctx.wait``
on one epoll fd (the ring buffer, the listeners, inotify, the mount table)
with a timeout to its next deadline, and none while nothing is due.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnisup.protocol.kinds import KernelKind as K
from cnisup.workers.base import WorkerContext
from cnisup.workers.errors import CapabilityMissing
from cnisup.workers.kernel import btf, events, features, netwatch
from cnisup.workers.kernel.ebpf import (
    MAX_BIN_DIRS,
    PATH_MAX,
    RingConsumer,
    alive_since,
    compile_program,
    fill_bin_dirs,
    release_compiler,
)

BPF_SOURCE = Path(__file__).with_name("lean.bpf.c")

# Defined here once; the BPF program gets them as -D flags (``build_flags``).
EV_EXEC, EV_ENV, EV_EXIT, EV_STDOUT, EV_STDERR, EV_NETNS_NEW, EV_NETNS_SEEN = 1, 2, 3, 4, 5, 6, 7
F_TRUNCATED, F_LAST, F_LOST, F_SAME_FILE = 1, 2, 4, 8
#: 4 MiB: ~1000 write captures of 4 KiB, far more than a burst of runs queues before the consumer wakes.
RINGBUF_PAGES = 1024
WRITE_TP = b"syscalls:sys_enter_write"
WRITE_FN = b"lean_write"

#: The write tracepoint stays attached this long after the last run ended:
#: detaching takes 50-300 ms (the kernel's tracepoint_synchronize_unregister
#: under event_mutex) and an attach meanwhile waits for it, so a run that
#: starts then is seen late and a short plugin's output is missed. A longer
#: hold makes that rarer (runs further apart than this, landing in the detach)
#: at the price of the tracing slow path for every syscall during the hold.
WRITE_HOLD_S = 5.0
#: A live run whose process is gone without its exit event (lost to a full
#: ring buffer) is looked for this long after its start, and again as often.
REAP_AFTER_S = 5.0
#: libcni's cache of each network's last ADD result (``<network>-<container id>-<ifname>``).
RESULT_CACHE_DIR = "/var/lib/cni/results"
#: How long a finished ADD whose result was missed waits for the runtime to cache
#: it: libcni writes it after the chain's last plugin.
RESULT_CACHE_WAIT_S = 2.0
CACHE_POLL_S = 0.05
#: Finished runs kept for attributing changes read after their exit.
RECENT_S = 2.0
#: Namespaces already reported (by cookie), at most.
SEEN_MAX = 65536


def build_flags(offsets: dict[str, int], *, group_dead: bool, ringbuf_pages: int = RINGBUF_PAGES) -> list[str]:
    """The cflags of lean.bpf.c: what it and this decoder agree on (defined
    once, here), the kernel's struct offsets from BTF, and build switches."""
    names = ("EV_EXEC", "EV_ENV", "EV_EXIT", "EV_STDOUT", "EV_STDERR", "EV_NETNS_NEW", "EV_NETNS_SEEN",
             "F_TRUNCATED", "F_LAST", "F_LOST", "F_SAME_FILE")
    values = globals()
    flags = [f"-D{n}={values[n]}" for n in names]
    flags += [f"-DPATH_MAX_={PATH_MAX}", f"-DMAX_BIN_DIRS={MAX_BIN_DIRS}", f"-DRINGBUF_PAGES={ringbuf_pages}"]
    flags += [f"-D{k}={v}" for k, v in offsets.items()]
    return [*flags, "-DHAVE_GROUP_DEAD=1"] if group_dead else flags


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def decode_exit(code: int) -> tuple[int | None, str | None]:
    """(exit status, reason) from a wait status as the kernel keeps it."""
    sig = code & 0x7F
    if sig == 0:
        return (code >> 8) & 0xFF, None
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return None, f"killed by {name} ({sig}){' (core dumped)' if code & 0x80 else ''}"


def cached_result(container_id: str, ifname: str, since_wall_ns: int,
                  cache_dir: str = RESULT_CACHE_DIR) -> dict[str, Any] | None:
    """libcni's cached ADD result for this container and interface, written
    at or after ``since_wall_ns``, parsed like a plugin's stdout; else None."""
    suffix = f"-{container_id}-{ifname}"
    try:
        names = [n for n in os.listdir(cache_dir) if n.endswith(suffix)]
    except OSError:
        return None
    for name in names:
        path = os.path.join(cache_dir, name)
        try:
            if os.stat(path).st_mtime_ns < since_wall_ns:
                continue  # an earlier ADD's
            with open(path, "rb") as f:
                doc = json.loads(f.read(1 << 20))
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(doc, dict) or doc.get("containerId") != container_id:
            continue
        parsed = events.parse_cni_output(json.dumps(doc.get("result")).encode())
        if "result" in parsed:
            return parsed
    return None


@dataclass
class LeanRun:
    run: events.Run
    exec_ns: int  #: boot time
    home_inode: int  #: the namespace the plugin was exec'd in
    comm: str
    env: bytearray = field(default_factory=bytearray)
    env_done: bool = False
    netns_inode: int | None = None  #: of CNI_NETNS
    output_since_ms: float | None = None  #: write capture started this long after the exec
    output_seen: bool = True  #: False: no write tracepoint on this kernel
    exit_ns: int | None = None
    entered: set[int] = field(default_factory=set)

    def by(self) -> dict[str, Any]:
        """What a change this run made says about it."""
        return {"pid": self.run.pid, "comm": self.comm, **self.run.attribution()}


class WriteCapture:
    """``syscalls:sys_enter_write`` attached only while runs are alive.

    Attaching (~0.4 ms) happens on the loop, as soon as a run's exec is
    read. Detaching waits until no run has been alive for ``WRITE_HOLD_S`` and
    runs in a thread (it blocks 50-100 ms). The plugin is never stopped or
    delayed: if its first write comes before the attach completes, that
    write is not seen, and the run says so (``output_since_ms``)."""

    def __init__(self, bpf: Any, *, enabled: bool) -> None:
        self.bpf = bpf
        self.enabled = enabled
        self.since_ns: int | None = None  #: boot time the tracepoint is attached since
        self.detach_at: float | None = None
        self._detacher: threading.Thread | None = None
        self._lock = threading.Lock()  #: BCC's tracepoint bookkeeping is shared with the detacher
        self.counts = {"write_attaches": 0, "write_detaches": 0, "write_attach_errors": 0}
        self.error: str | None = None  #: why the last attach failed

    def need(self) -> int | None:
        """A run is alive: make sure writes are captured; returns since when (boot ns)."""
        if not self.enabled:
            return None
        self.detach_at = None
        if self._detacher is not None:
            self._detacher.join()  # the kernel would make the attach wait for it anyway
            self._detacher = None
        if self.since_ns is None:
            try:
                with self._lock:
                    # BCC 0.26 keys attachments by tracepoint: a second attach would
                    # orphan the first, still live. since_ns guards that.
                    self.bpf.attach_tracepoint(tp=WRITE_TP, fn_name=WRITE_FN)
            except Exception as exc:  # BCC raises bare Exception; the run is reported without its output
                self.counts["write_attach_errors"] += 1
                self.error = str(exc)[:200]
                return None
            self.since_ns = boot_ns()
            self.counts["write_attaches"] += 1
        return self.since_ns

    def idle(self) -> None:
        """No run is alive any more."""
        if self.since_ns is not None and self.detach_at is None:
            self.detach_at = time.monotonic() + WRITE_HOLD_S

    def due(self) -> None:
        if self.detach_at is not None and time.monotonic() >= self.detach_at:
            self.detach_at = None
            self.since_ns = None
            self._detacher = threading.Thread(target=self._detach, name="write-detach", daemon=True)
            self._detacher.start()

    def _detach(self) -> None:
        with self._lock:
            self.bpf.detach_tracepoint(WRITE_TP)
        self.counts["write_detaches"] += 1

    def close(self) -> None:
        if self._detacher is not None:
            self._detacher.join()
        if self.since_ns is not None:
            self.since_ns = None
            self._detach()


class LeanCapture(RingConsumer):
    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        self.bin_dirs = ctx.config.cni.bin_dirs
        self.runs: dict[int, LeanRun] = {}
        self.recent: list[LeanRun] = []  #: finished within RECENT_S, for late-read changes
        self.holding: list[tuple[float, LeanRun, dict[str, Any]]] = []  #: finished ADDs waiting for the cache
        self.reported: OrderedDict[int, None] = OrderedDict()  #: netns cookies already reported
        self.counts.update(runs_started=0, runs_finished=0, netlink_events=0, netns_events=0,
                           results_from_cache=0)
        self._warnings: list[tuple[str, str]] = []
        t0 = time.monotonic()
        self.bpf = self._load()
        self._table = self.bpf["events"]
        self.epoll = select.epoll()
        self.net = netwatch.NetnsWatcher(self.epoll)
        if self.net.home is not None:
            self._report(self.net.home.cookie)  # the host's own
        self.writes = WriteCapture(self.bpf, enabled=self._write_ok)
        self._table.open_ring_buffer(self._on_event)
        self.ring_fd: int = self._table.map_fd  # readable when records wait (the ring buffer's own poll)
        self.epoll.register(self.ring_fd, select.EPOLLIN)
        # What is loaded by now (BCC, its tables, the modules) lives as long as the
        # worker: out of the collector's reach, a full collection stays short
        # instead of pausing event delivery for tens of milliseconds. Done
        # before ready: the first run's exec must be read at once (its output
        # is captured from then on).
        gc.collect()
        gc.freeze()
        ctx.set_info(start_s=round(time.monotonic() - t0, 3))

    # -- the BPF program -------------------------------------------------------------
    def _load(self) -> Any:
        host = features.check(capture="lean")  # what the probe saw: the build switches come from it
        if not host.ok:
            raise CapabilityMissing(host.reason)
        t0 = time.monotonic()
        try:
            offsets = btf.offsets()
        except btf.BTFError as exc:
            raise CapabilityMissing(f"kernel BTF: {exc}") from exc
        btf_s = time.monotonic() - t0
        bpf, load_s = compile_program(BPF_SOURCE, build_flags(offsets, group_dead=host.group_dead))
        self._write_ok = "sys_enter_write" in host.enabled_optional
        if self._write_ok:
            from bcc import BPF

            bpf.load_func(WRITE_FN, BPF.TRACEPOINT)  # loaded now: attaching later is only the attach
        release_compiler(bpf)
        missing = [f"{s}: no {features.LEAN_OPTIONAL[s][1]}" for s in features.LEAN_OPTIONAL
                   if s not in host.enabled_optional]
        self.ctx.set_info(load_s=round(load_s, 3), btf_s=round(btf_s, 3), bcc=host.details.get("bcc"),
                          headers=host.details.get("headers"), degraded=missing, kernel_dropped=0,
                          kernel_runs_lost=0)
        self.ctx.log.info("lean BPF program compiled and loaded in %.2f s (BTF offsets %.2f s)%s", load_s, btf_s,
                          f"; degraded: {'; '.join(missing)}" if missing else "")
        self._warnings += [("tracepoint_missing", m) for m in missing]
        self._warnings += fill_bin_dirs(bpf, self.bin_dirs)
        return bpf

    # -- the loop ------------------------------------------------------------------
    def run(self) -> None:
        ctx = self.ctx
        for code, message in self._warnings:
            ctx.warn(code, message)
        for lst in self.net.take_opened():
            self._netns_pinned(lst, announce=False)  # the state at start: not news
        ring_fd = self.ring_fd
        try:
            while not ctx.stopping:
                deadline = self._next_deadline()
                timeout = None if deadline is None else deadline - time.monotonic()
                if ctx.wait([self.epoll.fileno()], timeout_s=timeout):
                    self._on_ready({fd for fd, _ in self.epoll.poll(0)}, ring_fd)
                self._due()
                ctx.set_info(runs_active=len(self.runs), listeners=len(self.net.by_inode), kernel_events=self._seen,
                             write_attached=self.writes.since_ns is not None,
                             **self.counts, **self.writes.counts, **self.net.counts)
            self.bpf.ring_buffer_consume()
            self._netlink()
            for _, run, data in self.holding:
                self._publish_finished(run, data)
            self.holding.clear()
        finally:
            self.writes.close()
            self.net.close_all()
            self.epoll.close()

    def _on_ready(self, ready: set[int], ring_fd: int) -> None:
        if ring_fd in ready:
            self.bpf.ring_buffer_consume()
            self._check_loss()
        for fd in ready:
            self.net.on_ready(fd)
        for lst in self.net.take_opened():
            self._netns_pinned(lst, announce=True)
        if ready - {ring_fd, self.net.ino_fd, self.net.mi_fd}:
            self._netlink()

    def _next_deadline(self) -> float | None:
        """The earliest thing due, in monotonic seconds; None: nothing is."""
        due = [d for d in (self.writes.detach_at, self.net.pending_deadline()) if d is not None]
        if self.holding:  # looked for every CACHE_POLL_S until its deadline
            due.append(min(min(at for at, _, _ in self.holding), time.monotonic() + CACHE_POLL_S))
        if self.runs:
            due.append(min(self._reap_at(r) for r in self.runs.values()))
        if self.recent:
            due.append(self._mono(self.recent[0].exit_ns or 0) + RECENT_S)
        return min(due, default=None)

    def _mono(self, boot: int) -> float:
        return time.monotonic() - (boot_ns() - boot) / 1e9

    def _reap_at(self, r: LeanRun) -> float:
        age = (boot_ns() - r.exec_ns) / 1e9
        return time.monotonic() + (REAP_AFTER_S - age % REAP_AFTER_S)

    def _due(self) -> None:
        self.writes.due()
        self.net.expire_pending()
        now = time.monotonic()
        for item in [h for h in self.holding if h[0] <= now or self._fill_from_cache(h[1], h[2])]:
            self.holding.remove(item)
            self._publish_finished(item[1], item[2])
        cutoff = boot_ns() - int(RECENT_S * 1e9)
        self.recent = [r for r in self.recent if (r.exit_ns or 0) >= cutoff]
        self._reap_vanished()

    # -- decoding --------------------------------------------------------------------
    def _handle(self, e: Any, payload: bytes) -> None:
        t = int(e.type)
        if t == EV_EXEC:
            self._on_exec(e, payload)
        elif t == EV_ENV:
            self._on_env(e, payload)
        elif t in (EV_STDOUT, EV_STDERR):
            if (r := self.runs.get(int(e.run))) is not None:
                name = "stdout" if t == EV_STDOUT else "stderr"
                getattr(r.run, name).extend(payload)
                if e.flags & F_TRUNCATED:
                    r.run.truncated.add(name)
        elif t == EV_EXIT:
            self._on_exit(e)
        elif t == EV_NETNS_NEW:
            data: dict[str, Any] = {"pid": int(e.pid), "comm": _comm(e), "via": "clone", "child_pid": int(e.aux)}
            if (r := self.runs.get(int(e.run))) is not None:
                data.update(r.run.attribution())
            self._netns_created(int(e.cookie), int(e.code) & 0xFFFFFFFF, data, self._wall(e.ts))
        elif t == EV_NETNS_SEEN:  # code: the inode, an unsigned number in a signed field
            data = {"pid": int(e.pid), "comm": _comm(e), "via": "exit"}
            self._netns_created(int(e.cookie), int(e.code) & 0xFFFFFFFF, data, self._wall(e.ts))

    def _on_exec(self, e: Any, payload: bytes) -> None:
        pid, key = int(e.pid), int(e.run)
        run = events.Run(
            run_id=events.run_id(pid, key), pid=pid, path=payload.decode(errors="replace"),
            start_ns=self._wall(e.ts), ppid=int(e.ppid) or None,
            parent_run=events.run_id(int(e.parent_pid), int(e.parent_run)) if e.parent_run else None)
        r = LeanRun(run, key, int(e.aux), _comm(e))
        since = self.writes.need()
        if since is None:
            r.output_seen = False
            if self.writes.error is not None:  # said once per failure, not per run
                self.ctx.warn("write_capture_failed", f"stdout/stderr of plugin runs are not captured: cannot "
                              f"attach {WRITE_TP.decode()}: {self.writes.error}")
                self.writes.error = None
        elif since > key:
            r.output_since_ms = round((since - key) / 1e6, 3)
        self.runs[key] = r

    def _on_env(self, e: Any, payload: bytes) -> None:
        r = self.runs.get(int(e.run))
        if r is None or r.env_done:
            return
        r.env.extend(payload)
        if e.flags & F_TRUNCATED:
            r.run.truncated.add("env")
        if not e.flags & F_LAST:
            return
        r.env_done = True
        # Only the CNI variables: the rest of a runtime's environment is none of our business.
        r.run.env = {k: v for k, v in events.parse_env_block(bytes(r.env)).items() if k.startswith("CNI_")}
        r.env = bytearray()
        path = r.run.env.get("CNI_NETNS")
        if path and r.run.env.get("CNI_COMMAND") in ("ADD", "DEL", "CHECK"):
            lst = self.net.watch(path)
            r.netns_inode = lst.inode if lst is not None else _inode(path)
            for opened in self.net.take_opened():
                self._netns_pinned(opened, announce=True)  # made by the runtime, not by this run
        self._announce(r)

    def _announce(self, r: LeanRun) -> None:
        if not r.run.started_sent:
            r.run.started_sent = True
            self.counts["runs_started"] += 1
            self.ctx.publish(K.PLUGIN_STARTED, r.run.started_data(), ts=r.run.start_ns)

    def _on_exit(self, e: Any) -> None:
        r = self.runs.get(int(e.run))
        if r is None:
            return
        self._netlink()  # what the run changed is queued by now: published before it ends
        del self.runs[int(e.run)]
        r.exit_ns = int(e.ts)
        if e.flags & F_LOST:
            r.run.truncated.add("events")
        if e.flags & F_TRUNCATED:
            r.run.truncated.add("stdout")
        code, reason = decode_exit(int(e.code))
        self._finish(r, self._wall(e.ts), code, reason)

    def _finish(self, r: LeanRun, end_ns: int, code: int | None, reason: str | None) -> None:
        self._announce(r)
        self.recent.append(r)
        if not self.runs:
            self.writes.idle()
        data = r.run.finished_data(end_ns=end_ns, exit_code=code, reason=reason)
        if r.output_since_ms is not None:
            data["output_since_ms"] = r.output_since_ms
        env = r.run.env
        if env.get("CNI_COMMAND") == "DEL" and r.run.parent_run is None and r.netns_inode:
            self.net.close_inode(r.netns_inode)  # the runtime is done with it; a socket would pin it
        missed = (code == 0 and env.get("CNI_COMMAND") == "ADD" and "result" not in data and not r.run.stdout
                  and (r.output_since_ms is not None or not r.output_seen))
        if missed:
            data["truncated"] = sorted({*data.get("truncated", []), "stdout"})
            if not self._fill_from_cache(r, data):
                self.holding.append((time.monotonic() + RESULT_CACHE_WAIT_S, r, data))
                return
        self._publish_finished(r, data)

    def _fill_from_cache(self, r: LeanRun, data: dict[str, Any]) -> bool:
        env = r.run.env
        got = cached_result(env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", ""), r.run.start_ns)
        if got is None:
            return False
        data.update(got, result_source="cache")
        self.counts["results_from_cache"] += 1
        return True

    def _publish_finished(self, r: LeanRun, data: dict[str, Any]) -> None:
        self.counts["runs_finished"] += 1
        self.ctx.publish(K.PLUGIN_FINISHED, data, ts=self._wall(r.exit_ns or boot_ns()))

    def _reap_vanished(self) -> None:
        """Runs whose exit event was lost (a full ring buffer): their process is gone."""
        now = boot_ns()
        for key, r in list(self.runs.items()):
            if now - r.exec_ns >= REAP_AFTER_S * 1e9 and not alive_since(r.run.pid, key):
                self.bpf.ring_buffer_consume()  # an exit before the check is in the ring by now
                if key not in self.runs:
                    continue  # its exit event was just read
                r = self.runs.pop(key)
                r.exit_ns = boot_ns()
                r.run.truncated.add("events")
                self._finish(r, time.time_ns(), None, "exit not captured (kernel events lost)")

    # -- namespaces --------------------------------------------------------------------
    def _report(self, cookie: int) -> bool:
        """True the first time a namespace (by cookie) is seen."""
        if cookie in self.reported:
            return False
        self.reported[cookie] = None
        if len(self.reported) > SEEN_MAX:
            self.reported.popitem(last=False)
        return True

    def _netns_created(self, cookie: int, inode: int, data: dict[str, Any], ts: int) -> None:
        if cookie and not self._report(cookie):
            return
        if inode:
            data.update(netns=f"net:[{inode}]", inode=inode)
        self.counts["netns_events"] += 1
        self.ctx.publish(K.NETNS_CREATED, data, ts=ts)

    def _netns_pinned(self, lst: netwatch.Listener, *, announce: bool) -> None:
        """A listener opened: its namespace is news unless already reported."""
        if not announce:
            self._report(lst.cookie)
            return
        via = "pin" if lst.path and os.path.dirname(lst.path) in netwatch.NETNS_DIRS else "cni"
        data: dict[str, Any] = {"via": via, "path": lst.path}
        self._netns_created(lst.cookie, lst.inode, data, time.time_ns())

    # -- links and addresses -----------------------------------------------------------
    def _netlink(self) -> None:
        batch: list[tuple[netwatch.Listener, int, netwatch.Change, dict[str, Any] | None]] = []
        for lst, since, c in self.net.drain():
            before = None
            if c.kind == "link":
                idx = c.data["ifindex"]
                before = lst.links.get(idx)
                if c.deleted:
                    lst.links.pop(idx, None)
                else:
                    lst.links[idx] = {**c.data, "_link": c.link, "_nsid": c.link_netnsid}
            batch.append((lst, since, c, before))
        # Published once the whole batch is in the state: a veth's two halves
        # come on two sockets, and an address may name a link read after it.
        for lst, since, c, before in batch:
            if c.kind == "link":
                self._on_link(lst, since, c, before)
            else:
                self._on_addr(lst, since, c)

    def _candidates(self, lst: netwatch.Listener, since: int) -> list[LeanRun]:
        """Runs that were alive in ``lst``'s namespace since ``since`` (boot ns)."""
        alive = [r for r in (*self.runs.values(), *self.recent)
                 if (r.exit_ns is None or r.exit_ns >= since) and r.run.env.get("CNI_NETNS")]
        if lst is not self.net.home:
            alive = [r for r in alive if r.netns_inode == lst.inode]
        ids = {r.run.run_id for r in alive}
        return [r for r in alive if r.run.parent_run not in ids]  # a delegated IPAM plugin: its parent did it

    def _by_pid(self, pid: int) -> LeanRun | None:
        return next((r for r in (*self.runs.values(), *self.recent) if r.run.pid == pid), None)

    def _publish_change(self, kind: str, lst: netwatch.Listener, data: dict[str, Any], r: LeanRun | None,
                        dump: bool) -> None:
        if r is None and lst is self.net.home:
            return  # the host's own changes: not a CNI run's
        out = {**data, "netns": lst.netns}
        if dump:
            out["dump"] = True
        if r is not None:
            out.update(r.by())
        self.counts["netlink_events"] += 1
        self.ctx.publish(kind, out)

    def _on_link(self, lst: netwatch.Listener, since: int, c: netwatch.Change,
                 before: dict[str, Any] | None) -> None:
        d = c.data
        idx = d["ifindex"]
        if c.dump and lst.opened_ns <= min((r.exec_ns for r in self._candidates(lst, since)), default=lst.opened_ns):
            return  # the state before any run here: not a change
        if d.pop("loopback", False) and c.dump:
            return
        r = self._by_pid(c.nl_pid) if c.nl_pid else None
        if r is None and len(cands := self._candidates(lst, since)) == 1:
            r = cands[0]
        if c.deleted:
            kind = K.LINK_DELETED
        elif before is None:
            kind = K.LINK_CREATED
        elif any(before.get(k) != d.get(k) for k in ("name", "master", "mtu", "up")):
            kind = K.LINK_CHANGED
        else:
            return  # carrier, statistics: nothing the event reports
        data = dict(d)
        if isinstance(data.get("master"), int) and (m := lst.links.get(data["master"])) and m.get("name"):
            data["master_name"] = m["name"]
        if data.get("kind") == "veth" and c.link:
            data["peer_ifindex"] = c.link
            if c.link_netnsid is not None and (peer := self._veth_peer(lst, idx, c.link)) is not None:
                data["peer"], data["peer_netns"] = peer
        self._publish_change(kind, lst, data, r, c.dump)

    def _veth_peer(self, lst: netwatch.Listener, idx: int, peer_idx: int) -> tuple[str, str] | None:
        """The other half of a veth whose peer is in another namespace, as
        that namespace's listener saw it: (name, net:[inode])."""
        for other in self.net.by_inode.values():
            p = other.links.get(peer_idx)
            # The half created first was announced before the pair was linked (IFLA_LINK 0).
            if other is not lst and p is not None and p.get("_link") in (idx, 0) and p.get("kind") == "veth":
                return str(p.get("name", "")), other.netns
        return None

    def _on_addr(self, lst: netwatch.Listener, since: int, c: netwatch.Change) -> None:
        if c.dump and lst.opened_ns <= min((r.exec_ns for r in self._candidates(lst, since)), default=lst.opened_ns):
            return
        data = dict(c.data)
        if (link := lst.links.get(data["ifindex"])) and link.get("name"):
            data["ifname"] = link["name"]
        r = self._by_pid(c.nl_pid) if c.nl_pid else None
        if r is not None and lst.inode != r.home_inode and lst.inode not in r.entered:
            # Its netlink socket was made in this namespace: the process was in it.
            r.entered.add(lst.inode)
            self.ctx.publish(K.NETNS_ENTERED, {**r.by(), "netns": lst.netns, "inode": lst.inode, "via": "netlink"})
        if r is None and len(cands := self._candidates(lst, since)) == 1:
            r = cands[0]
        self._publish_change(K.ADDR_DELETED if c.deleted else K.ADDR_ADDED, lst, data, r, c.dump)


def _comm(e: Any) -> str:
    return bytes(e.comm).split(b"\0", 1)[0].decode(errors="replace")


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
