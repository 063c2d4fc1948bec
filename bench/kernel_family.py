"""Comparisons 1 and 2: the kernel family (root only; elsewhere one row
says it was skipped).

1. Pod churn: real CNI ADD/DEL of the reference ``bridge`` plugin (which
   runs ``host-local`` for the IPs: four plugin runs per pod) in a fresh
   netns per pod, first at a steady rate with a few pods alive at a time,
   then as a burst of pods added and deleted several at a time. ``ebpf`` and
   ``proc-poll`` each run under their own ``cnisup start`` and watch the same
   runs at the same time, beside a literal ``ps aux`` every 5 s (the seed's
   way, the baseline of the reference guide's "100x less CPU"). For each:
   runs seen / runs made, CPU per idle minute and per 1,000 runs made
   (``/proc/<pid>``: threads' schedstat plus reaped children).
   Per field of ``cni.plugin.finished``, how often ebpf filled it in.
2. Overhead on unrelated work, per capture mode (``kernel_overhead``).
3. Idle: the CPU and wake-ups of every process of one ``cnisup start``
   (production preset, every family) over a quiet stretch, per hour; the
   kernel worker's RSS and start-to-ready."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import kernel_overhead
from .common import Instance, Listener, cpu_seconds_fine, percentile, row, rss_bytes, world_dir

REFERENCE_DIR = Path("/usr/lib/cni")
PLUGINS = ("bridge", "host-local")
#: bridge ADD + the host-local it runs, bridge DEL + the host-local it runs.
RUNS_PER_POD = 4
BRIDGE = "cnibench0"
SUBNET = "10.199.0.0/16"
PS_INTERVAL_S = 5.0
POLL_INTERVAL_S = 5.0  #: proc-poll at its production interval
PATH_ENV = "/usr/sbin:/usr/bin:/sbin:/bin"
NAME_CHURN = "kernel family: ebpf vs proc-poll, pod churn"
NAME_PS = "kernel family: ebpf vs `ps aux` every 5 s (seed baseline)"
NAME_OVERHEAD = "kernel overhead on unrelated work (syscall loops, thread CPU time)"
#: The rows that divide the lean capture's ratio by the control's.
NET_OF_CONTROL = "lean net of the control"
NAME_FILL = "kernel family: fields of cni.plugin.finished filled in the churn (ebpf, lean)"
NAME_IDLE = "idle and footprint: every cnisup process"

@dataclass(frozen=True)
class Plan:
    idle_s: float  #: a multiple of the 5 s intervals: each poller scans the same number of times
    steady_rate: float  #: pods per second
    steady_pods: int
    alive: int  #: pods alive at once in the steady phase (each deleted this many ticks after its ADD)
    burst_pods: int
    burst_parallel: int
    rounds: int  #: valid off/on pairs per capture mode
    scale: float  #: of the syscall loops (1.0: 1M read, 1M getpid, 300k sendto, 1k fork)
    #: quiet stretch over which every cnisup process's CPU is measured: a whole number of the
    #: production preset's idle heartbeat period (300 s) and of restart.reprobe_interval (300 s,
    #: the k8s family's re-probe on a node without Kubernetes), so each is counted as often as it runs
    idle_all_s: float


#: Quick mode is the suite's smoke run: every code path, numbers of no weight.
QUICK = Plan(idle_s=1.0, steady_rate=5.0, steady_pods=12, alive=4, burst_pods=16, burst_parallel=4,
             rounds=1, scale=0.1, idle_all_s=1.5)
FULL = Plan(idle_s=60.0, steady_rate=5.0, steady_pods=300, alive=10, burst_pods=200, burst_parallel=4,
            rounds=10, scale=0.6, idle_all_s=600.0)
#: Fields of cni.plugin.finished that every run must have, and those only some can.
ALWAYS = ("command", "container_id", "netns", "ifname", "cni_args", "exit_code", "duration_ms")


# -- the workload -------------------------------------------------------------------------

class Pods:
    """Pods as a container runtime makes them: a netns, then the bridge
    plugin's ADD; DEL, then the netns goes."""

    def __init__(self, base: Path, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.conf = json.dumps({
            "cniVersion": "1.0.0", "name": "bench-br", "type": "bridge", "bridge": BRIDGE, "isGateway": True,
            "ipMasq": False, "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                                      "dataDir": str(base / "ipam")}}).encode()
        self.made: set[tuple[str, str, str]] = set()  #: (container id, command, plugin)
        self.netns: set[str] = set()
        self.lock = threading.Lock()

    def _plugin(self, cid: str, command: str) -> None:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": f"/var/run/netns/{cid}",
               "CNI_IFNAME": "eth0", "CNI_PATH": str(self.bin_dir), "PATH": PATH_ENV,
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={cid}"}
        p = subprocess.run([str(self.bin_dir / "bridge")], input=self.conf, env=env, capture_output=True,
                           timeout=30, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"bridge {command} {cid}: exit {p.returncode}: {p.stdout[-500:]!r} {p.stderr[-500:]!r}")
        with self.lock:
            self.made |= {(cid, command, plugin) for plugin in PLUGINS}

    def add(self, cid: str) -> None:
        subprocess.run(["ip", "netns", "add", cid], check=True)
        with self.lock:
            self.netns.add(cid)
        self._plugin(cid, "ADD")

    def delete(self, cid: str) -> None:
        try:
            self._plugin(cid, "DEL")
        finally:
            subprocess.run(["ip", "netns", "del", cid], check=False)
            with self.lock:
                self.netns.discard(cid)

    def cleanup(self) -> None:
        """What a failed run left: namespaces, the bridge."""
        for cid in list(self.netns):
            subprocess.run(["ip", "netns", "del", cid], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], check=False, capture_output=True)

    def steady(self, prefix: str, n: int, rate: float, alive: int) -> float:
        """One ADD per tick; each pod deleted ``alive`` ticks later."""
        t0 = time.monotonic()
        for i in range(n + alive):
            due = t0 + i / rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            if i < n:
                self.add(f"{prefix}{i:04d}")
            if i >= alive:
                self.delete(f"{prefix}{i - alive:04d}")
        return time.monotonic() - t0

    def burst(self, prefix: str, n: int, parallel: int) -> float:
        """``n`` pods added, then deleted, ``parallel`` at a time."""
        ids = [f"{prefix}{i:04d}" for i in range(n)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(self.add, ids))
            list(pool.map(self.delete, ids))
        return time.monotonic() - t0


# -- the observers ------------------------------------------------------------------------

class Collector(threading.Thread):
    """Receives while the workload runs, so arrival times are real."""

    def __init__(self, listener: Listener) -> None:
        super().__init__(daemon=True)
        self.listener = listener
        self.got: list[tuple[float, dict[str, Any]]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            got = self.listener.recv(0.2)
            if got is not None:
                self.got.append(got)

    def runs(self, prefix: str, kinds: tuple[str, ...]) -> set[tuple[str, str, str]]:
        return {(str(d.get("container_id")), str(d.get("command")), str(d.get("plugin")))
                for _, e in self.got if e["kind"] in kinds
                for d in (e["data"],) if str(d.get("container_id", "")).startswith(prefix)}

    def fill_rates(self, prefix: str) -> dict[str, Any]:
        """Per field of cni.plugin.finished, the fraction of runs that had it;
        result/error over ADDs only (a DEL prints nothing)."""
        done = [e["data"] for _, e in self.got if e["kind"] == "cni.plugin.finished"
                and str(e["data"].get("container_id", "")).startswith(prefix)]
        adds = [d for d in done if d.get("command") == "ADD"]
        rates: dict[str, Any] = {"runs": len(done), "adds": len(adds)}
        for f in ALWAYS:
            rates[f] = sum(f in d for d in done) / len(done) if done else None
        for f in ("result", "error", "output_since_ms", "truncated"):
            rates[f"{f} (ADD)"] = sum(f in d for d in adds) / len(adds) if adds else None
        rates["result or error (ADD)"] = sum("result" in d or "error" in d for d in adds) / len(adds) if adds else None
        return rates

    def exit_latencies_ms(self, prefix: str) -> list[float]:
        return [(at - e["ts"] / 1e9) * 1000 for at, e in self.got if e["kind"] == "cni.plugin.finished"
                and str(e["data"].get("container_id", "")).startswith(prefix)]


class PsAux(threading.Thread):
    """The seed's process monitor: ``ps aux`` every 5 s, its output scanned
    for commands in the bin dir. Its CPU is the shell's with its reaped
    children (every ``ps``)."""

    MARK = "--cnisup-bench-scan--"

    def __init__(self, bin_dir: Path) -> None:
        super().__init__(daemon=True)
        self.prefix = f"{bin_dir}/"
        self.proc = subprocess.Popen(
            ["sh", "-c", f"while :; do ps aux; echo {self.MARK}; sleep {PS_INTERVAL_S:g}; done"],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.pid = self.proc.pid
        self.seen: dict[int, tuple[float, str]] = {}  #: pid -> (first seen, command)
        self.scans = 0

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(self.MARK):
                self.scans += 1
                continue
            fields = line.split(None, 10)
            if len(fields) == 11 and fields[10].startswith(self.prefix) and fields[1].isdigit():
                self.seen.setdefault(int(fields[1]), (time.monotonic(), fields[10].strip()))

    def between(self, t0: float, t1: float) -> int:
        return sum(1 for at, _ in self.seen.values() if t0 <= at <= t1)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.join(5)


class Unavailable(Exception):
    """The worker to measure does not run on this host."""


# -- the run ------------------------------------------------------------------------------

def _instance(base: Path, bin_dir: Path, ebpf: bool) -> Instance:
    d = base / ("ebpf" if ebpf else "proc-poll")
    d.mkdir()
    d.chmod(0o755)
    return Instance(d, config={
        "monitors": {"kernel": True, "config": False, "k8s": False}, "use_ebpf": ebpf,
        "cni": {"bin_dirs": [str(bin_dir)], "conf_dirs": [str(base / "net.d")]},
        "fallback": {"process_poll_interval": POLL_INTERVAL_S}})


def _start(inst: Instance, worker: str) -> tuple[Listener, Collector, dict[str, Any], float]:
    listener = Listener(inst.endpoint)
    time.sleep(0.05)
    t0 = time.time()
    inst.start()
    try:
        at, _ = listener.until(lambda e: e["kind"] == "supervisor.worker.ready"
                               and e["data"].get("family") == "kernel", 90)
        w = inst.wait_running("kernel", timeout_s=30)
        if w["worker"] != worker:
            raise Unavailable(f"{worker} did not run: {w.get('fallback_reason') or w.get('reason')}")
    except BaseException:
        inst.stop()
        listener.close()
        raise
    collector = Collector(listener)
    collector.start()
    return listener, collector, w, at - t0


def _ctx_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all of ``pid``'s threads: its wake-ups."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                total += sum(int(line.split()[1]) for line in f
                             if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")))
        except (OSError, ValueError, IndexError):
            continue
    return total


class HostChanges:
    """Link and address notifications in the host's namespace over a span
    (other tenants of a shared host make them; each wakes the kernel worker)."""

    GROUPS = 1 | 1 << 4 | 1 << 8  #: RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR

    def __enter__(self) -> HostChanges:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, self.GROUPS))
        self.count = 0
        return self

    def __exit__(self, *_: object) -> None:
        while True:
            try:
                buf = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: more than the buffer held
                continue
            off = 0
            while off + 16 <= len(buf):
                ln = int.from_bytes(buf[off:off + 4], "little")
                if ln < 16:
                    break
                self.count += 1
                off += (ln + 3) & ~3
        self.sock.close()


#: publish.progress_interval of the idle stretch's instance (seconds).
PROGRESS_S = 1.0


def _idle_all(base: Path, bin_dir: Path, plan: Plan) -> dict[str, Any]:
    """Every process of one ``cnisup start`` (production preset, every family,
    the journal on) over a quiet stretch: CPU and wake-ups per hour."""
    d = base / "idle-all"
    d.mkdir()
    d.chmod(0o755)
    conf, journal = d / "net.d", d / "journal"
    for sub, mode in ((conf, 0o755), (journal, 0o1777)):  # the journal's dir: writable by the workers' user
        sub.mkdir()
        sub.chmod(mode)
    inst = Instance(d, config={"monitors": {"kernel": True, "config": True, "k8s": True},
                               "cni": {"bin_dirs": [str(bin_dir)], "conf_dirs": [str(conf)]},
                               "journal": {"enabled": True, "path": str(journal / "journal.db")},
                               # supervisor.progress repeats 4 times after the last event (1+2+4+8 s
                               # here; 30+60+120+240 s by default): over before the idle stretch
                               "publish": {"progress_interval": PROGRESS_S}})
    inst.start()
    try:
        inst.wait_running("config")  # the control socket answers from here on
        status = inst.status()
        deadline = time.monotonic() + 90
        # k8s is idle on a node without Kubernetes (no API server here): that is its idle state
        while not all(w["state"] in ("running", "idle", "disabled", "unavailable") for w in status["workers"]):
            if time.monotonic() > deadline:
                raise Unavailable(f"not every worker is running: {status['workers']}")
            time.sleep(0.5)
            status = inst.status()
        # the start-up's trailing heartbeats and the progress repeats are over
        time.sleep(min(PROGRESS_S * 16, plan.idle_all_s / 3))
        status = inst.status()
        pids = {"supervisor": int(status["supervisor"]["pid"])}
        pids |= {w["worker"]: int(w["pid"]) for w in status["workers"] if w["state"] == "running" and w.get("pid")}
        c0 = {k: cpu_seconds_fine(p) for k, p in pids.items()}
        w0 = {k: _ctx_switches(p) for k, p in pids.items()}
        with HostChanges() as host:  # what else happened meanwhile: it wakes the kernel worker
            t0 = time.monotonic()
            time.sleep(plan.idle_all_s)
            span = time.monotonic() - t0
        per_h = 3600 / span
        cpu = {k: (cpu_seconds_fine(p) - c0[k]) * per_h for k, p in pids.items()}
        return {"span_s": span, "cpu_s_per_hour": {**cpu, "all": sum(cpu.values())}, "host_changes": host.count,
                "wakeups_per_hour": {k: (_ctx_switches(p) - w0[k]) * per_h for k, p in pids.items()},
                "rss": {k: rss_bytes(p) for k, p in pids.items()}}
    finally:
        inst.stop()


def _measure(base: Path, bin_dir: Path, plan: Plan) -> dict[str, Any]:
    res: dict[str, Any] = {"plan": plan.__dict__}
    pods = Pods(base, bin_dir)
    ebpf_inst, poll_inst = _instance(base, bin_dir, True), _instance(base, bin_dir, False)
    started: list[tuple[Instance, Listener, Collector]] = []
    ps: PsAux | None = None
    try:
        listener, e_col, w, ready_s = _start(ebpf_inst, "ebpf")
        started.append((ebpf_inst, listener, e_col))
        info = w.get("info") or {}
        res["ebpf_ready_s"], res["ebpf_load_s"], res["ebpf_start_s"] = ready_s, info.get("load_s"), info.get("start_s")
        e_pid = int(w["pid"])
        res["ebpf_rss_ready"] = rss_bytes(e_pid)
        res["supervisor_rss_kernel"] = rss_bytes(int(ebpf_inst.status()["supervisor"]["pid"]))
        # Every observer at once: the same idle time, the same runs.
        listener, p_col, w, res["proc_poll_ready_s"] = _start(poll_inst, "proc-poll")
        started.append((poll_inst, listener, p_col))
        p_pid = int(w["pid"])
        ps = PsAux(bin_dir)
        ps.start()
        time.sleep(1.0)
        pids = {"ebpf": e_pid, "proc-poll": p_pid, "ps aux": ps.pid}
        c0 = {k: cpu_seconds_fine(p) for k, p in pids.items()}
        time.sleep(plan.idle_s)
        c1 = {k: cpu_seconds_fine(p) for k, p in pids.items()}
        res["idle_cpu_s_per_min"] = {k: (c1[k] - c0[k]) * 60 / plan.idle_s for k in pids}
        run = uuid.uuid4().hex[:5]
        t_steady = time.monotonic()
        res["steady_s"] = pods.steady(f"cb{run}s", plan.steady_pods, plan.steady_rate, plan.alive)
        t_burst = time.monotonic()
        res["burst_s"] = pods.burst(f"cb{run}b", plan.burst_pods, plan.burst_parallel)
        t_end = time.monotonic()
        time.sleep(3.0)  # the last events reach the subscribers (a held result waits up to 2 s for the cache)
        c2 = {k: cpu_seconds_fine(p) for k, p in pids.items()}
        res["runs_made"] = len(pods.made)
        res["churn_cpu_s"] = {k: c2[k] - c1[k] for k in pids}
        res["churn_s"] = time.monotonic() - t_steady
        res["rss"] = {"ebpf": rss_bytes(e_pid), "proc-poll": rss_bytes(p_pid)}
        info = (next(x for x in ebpf_inst.status()["workers"] if x["family"] == "kernel").get("info") or {})
        res["kernel_dropped"] = info.get("kernel_dropped")
        res["write_attaches"] = info.get("write_attaches")
        ps_scans = ps.scans
        ps.stop()
        ps_seen_steady, ps_seen_burst = ps.between(t_steady, t_burst), ps.between(t_burst, t_end + 1.0)
        for _, _, col in started:
            col.halt.set()
            col.join(2)
        made_s = {k for k in pods.made if k[0].startswith(f"cb{run}s")}
        made_b = pods.made - made_s
        finished = ("cni.plugin.finished",)
        both = ("cni.plugin.started", "cni.plugin.finished")
        res["phases"] = {
            "steady": {"made": len(made_s), "ebpf": len(e_col.runs(f"cb{run}s", finished) & made_s),
                       "proc-poll": len(p_col.runs(f"cb{run}s", both) & made_s), "ps aux": ps_seen_steady},
            "burst": {"made": len(made_b), "ebpf": len(e_col.runs(f"cb{run}b", finished) & made_b),
                      "proc-poll": len(p_col.runs(f"cb{run}b", both) & made_b), "ps aux": ps_seen_burst},
        }
        res["fill_rates"] = e_col.fill_rates(f"cb{run}")
        res["ps_scans"] = ps_scans
        res["exit_latency_ms"] = {"ebpf": e_col.exit_latencies_ms(f"cb{run}"),
                                  "proc-poll": p_col.exit_latencies_ms(f"cb{run}")}
    finally:
        if ps is not None and ps.proc.poll() is None:
            ps.stop()
        for inst, lst, col in started:
            col.halt.set()
            inst.stop()
            lst.close()
        pods.cleanup()
    res["idle_all"] = _idle_all(base, bin_dir, plan)
    # Quick mode (the test suite's smoke run) measures the default only: its point is the code path.
    modes = kernel_overhead.MODES if plan.rounds > 1 else ("lean",)
    res["overhead"] = kernel_overhead.measure(base, bin_dir, rounds=plan.rounds, scale=plan.scale, modes=modes)
    return res


def _maybe_row(name: str, metric: str, primary: float, fallback: float | None, unit: str,
               **extra: Any) -> dict[str, Any]:
    """A row whose fallback may have nothing to show (it saw no run)."""
    if fallback is None:
        return {**row(name, metric, primary, 0.0, unit, **extra), "fallback": None, "ratio": None}
    return row(name, metric, primary, fallback, unit, **extra)


def rows_of(res: dict[str, Any]) -> list[dict[str, Any]]:
    st, bu = res["phases"]["steady"], res["phases"]["burst"]
    plan = res["plan"]
    made = st["made"] + bu["made"]
    idle, churn = res["idle_cpu_s_per_min"], res["churn_cpu_s"]
    per_k = {k: v * 1000 / made for k, v in churn.items()}
    e_lat, p_lat = res["exit_latency_ms"]["ebpf"], res["exit_latency_ms"]["proc-poll"]
    rows = [
        row(NAME_CHURN, f"runs seen / made, steady {plan['steady_rate']:g} pods/s", st["ebpf"] / st["made"],
            st["proc-poll"] / st["made"], "fraction", runs_made=st["made"],
            note=f"{plan['steady_pods']} pods (bridge + host-local: {RUNS_PER_POD} plugin runs each, a netns each), "
                 f"{plan['alive']} alive at a time, in {res['steady_s']:.1f} s; proc-poll every "
                 f"{POLL_INTERVAL_S:g} s"),
        row(NAME_CHURN, f"runs seen / made, burst of {plan['burst_pods']} pods, {plan['burst_parallel']} at a time",
            bu["ebpf"] / bu["made"], bu["proc-poll"] / bu["made"], "fraction", runs_made=bu["made"],
            note=f"all ADDs then all DELs in {res['burst_s']:.1f} s; BPF ring-buffer losses: "
                 f"{res['kernel_dropped']}"),
        row(NAME_CHURN, "worker CPU per idle minute", idle["ebpf"], idle["proc-poll"], "s",
            idle_measured_s=plan["idle_s"]),
        row(NAME_CHURN, "worker CPU per 1,000 plugin runs", per_k["ebpf"], per_k["proc-poll"], "s",
            note=f"CPU over the churn ({res['churn_s']:.0f} s, {made} runs) / runs x 1,000; a poller's cost "
                 "is its scans, whatever the runs"),
    ]
    for q in (50, 99):  # proc-poll's "exit" is the scan that no longer saw the process
        rows.append(_maybe_row(NAME_CHURN, f"plugin exit -> subscriber p{q}", percentile(e_lat, q),
                               percentile(p_lat, q) if p_lat else None, "ms"))
    rows += [
        row(NAME_CHURN, "worker RSS", res["rss"]["ebpf"], res["rss"]["proc-poll"], "bytes"),
        row(NAME_PS, "runs seen / made, steady and burst", (st["ebpf"] + bu["ebpf"]) / made,
            (st["ps aux"] + bu["ps aux"]) / made, "fraction",
            note="ps aux: plugin processes (distinct pids) in its output; it runs beside the workers"),
        row(NAME_PS, "CPU per idle minute", idle["ebpf"], idle["ps aux"], "s",
            note="ps aux: the shell loop and every ps it ran, parsing not included"),
        row(NAME_PS, "CPU per 1,000 plugin runs", per_k["ebpf"], per_k["ps aux"], "s"),
    ]
    rows += _fill_rows(res)
    rows += _overhead_rows(res["overhead"])
    rows += _idle_rows(res, per_k)
    return rows


def _fill_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    f = res["fill_rates"]
    always = ", ".join(f"{k} {f[k]:.0%}" for k in ALWAYS)
    return [
        {"name": NAME_FILL, "metric": "runs whose cni.plugin.finished has every identity field", "primary":
         min(f[k] for k in ALWAYS), "fallback": None, "ratio": None, "unit": "fraction", "runs": f["runs"],
         "note": always},
        {"name": NAME_FILL, "metric": "ADD runs with result or error (the plugin's stdout)",
         "primary": f["result or error (ADD)"], "fallback": None, "ratio": None, "unit": "fraction",
         "runs": f["adds"], "note": f"result {f['result (ADD)']:.1%}, error {f['error (ADD)']:.1%}; output capture "
                                    f"began after the exec (output_since_ms) in {f['output_since_ms (ADD)']:.1%}; "
                                    f"truncated in {f['truncated (ADD)']:.1%}; write tracepoint attached "
                                    f"{res['write_attaches']} time(s) over the churn"},
    ]


def _overhead_rows(o: dict[str, Any]) -> list[dict[str, Any]]:
    if "skipped" in o:
        return [{"name": NAME_OVERHEAD, "metric": f"skipped: {o['skipped']}", "primary": None, "fallback": None,
                 "ratio": None, "unit": "-"}]
    rows = []
    for mode in [m for m in kernel_overhead.MODES if m in o]:
        m = o[mode]
        what = {"none": "control: cnisup without the kernel family", "lean": "kernel.capture lean (default)",
                "lean-run": "lean while a plugin runs (write tracepoint attached)",
                "full": "kernel.capture full"}[mode]
        if not m["summary"]:
            rows.append({"name": NAME_OVERHEAD, "metric": f"{what}: no valid round ({len(m['void'])} voided)",
                         "primary": None, "fallback": None, "ratio": None, "unit": "-"})
            continue
        for loop in kernel_overhead.LOOPS:
            sm = m["summary"][loop]
            note = (f"{sm['off_ns']:,.0f} -> {sm['on_ns']:,.0f} ns per call; p25-p75 {sm['p25']:.3f}-{sm['p75']:.3f}; "
                    f"{len(m['pairs'])} paired rounds, {len(m['void'])} voided (another tracing program was "
                    f"loaded); {m['programs']} tracing program(s) of ours loaded")
            rows.append({"name": NAME_OVERHEAD, "metric": f"{what}: {loop}() with / without, median of paired rounds",
                         "primary": sm["ratio"], "fallback": None, "ratio": None, "unit": "x",
                         "note": note if loop == "read" else f"{sm['off_ns']:,.0f} -> {sm['on_ns']:,.0f} ns; "
                                                             f"p25-p75 {sm['p25']:.3f}-{sm['p75']:.3f}"})
    return rows + net_of_control(rows)


def net_of_control(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lean capture's ratio divided by the control's, per loop: what the kernel worker
    adds beyond starting and running a cnisup at all (and beyond the method's noise, which
    the control measures). Built from the rows alone, so a stored run can be read this way."""
    def ratios(prefix: str) -> dict[str, float]:
        return {r["metric"][len(prefix) + 2:].split("()")[0]: r["primary"] for r in rows
                if r["name"] == NAME_OVERHEAD and r["metric"].startswith(prefix + ": ") and r["primary"]
                and "()" in r["metric"]}
    lean, control = ratios("kernel.capture lean (default)"), ratios("control: cnisup without the kernel family")
    return [{"name": NAME_OVERHEAD, "metric": f"{NET_OF_CONTROL}: {loop}() (lean ratio / control ratio; "
             "goal <= 1.03)", "primary": lean[loop] / control[loop], "fallback": None, "ratio": None, "unit": "x",
             "note": f"lean x{lean[loop]:.3f}, control x{control[loop]:.3f}" }
            for loop in kernel_overhead.LOOPS if loop in lean and loop in control]


def _idle_rows(res: dict[str, Any], per_k: dict[str, float]) -> list[dict[str, Any]]:
    idle = res["idle_all"]
    ps_per_h = res["idle_cpu_s_per_min"]["ps aux"] * 60
    rows = []
    for proc, cpu in idle["cpu_s_per_hour"].items():
        rows.append(row(NAME_IDLE, f"CPU per idle hour: {proc}", cpu, ps_per_h, "s",
                        note=(f"fallback column: `ps aux` every 5 s; over {idle['span_s']:.0f} s, scaled; "
                              "production preset, every family, the journal on") if proc == "supervisor" else
                        (f"{idle['wakeups_per_hour'].get(proc, 0):,.0f} wake-ups per hour" + (
                            f"; meanwhile the host's own activity made {idle['host_changes']} link/address "
                            "change(s), each of which wakes it"
                            if proc == "ebpf" else "") if proc != "all" else
                         "the seed's claim: 100x less CPU than ps aux every 5 s")))
    rows += [
        row(NAME_IDLE, "kernel worker (ebpf) RSS once ready", res["ebpf_rss_ready"], res["rss"]["proc-poll"], "bytes",
            note="fallback column: proc-poll"),
        {"name": NAME_IDLE, "metric": "supervisor RSS with the kernel family on", "primary":
         res["supervisor_rss_kernel"], "fallback": None, "ratio": None, "unit": "bytes",
         "note": "its probe does not import BCC: no libbcc or LLVM mapped"},
        row(NAME_IDLE, "kernel worker start to ready (cnisup start -> worker ready)", res["ebpf_ready_s"],
            res["proc_poll_ready_s"], "s",
            note=f"of which BTF offsets + compile + load + listeners {res['ebpf_start_s']} s "
                 f"(compile + load {res['ebpf_load_s']} s); fallback column: proc-poll"),
    ]
    return rows


def run(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if os.geteuid() != 0 or not all((REFERENCE_DIR / p).is_file() for p in PLUGINS):
        return [{"name": NAME_CHURN, "metric": "skipped: needs root and containernetworking-plugins",
                 "primary": None, "fallback": None, "ratio": None, "unit": "-"}], {}
    base = world_dir("cnisup-bench-kernel-")
    bin_dir = base / "bin"
    bin_dir.mkdir()
    for p in PLUGINS:
        shutil.copy2(REFERENCE_DIR / p, bin_dir / p)
    try:
        res = _measure(base, bin_dir, QUICK if quick else FULL)
    except Unavailable as exc:
        return [{"name": NAME_CHURN, "metric": f"skipped: {exc}", "primary": None, "fallback": None,
                 "ratio": None, "unit": "-"}], {}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows_of(res), res
