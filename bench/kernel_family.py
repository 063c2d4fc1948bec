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
2. Overhead on unrelated work: a C ``sendto`` loop and ``ip addr`` in a
   shell loop (fork + exec + netlink), timed with no kernel worker, with the
   ebpf worker loaded, and with none again (off rounds bracket the on rounds
   so drift shows)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
NAME_OVERHEAD = "kernel overhead on unrelated work: ebpf loaded vs none"

C_LOOP = r"""
#include <arpa/inet.h>
#include <stdlib.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    char buf[64] = {0};
    for (long i = 0; i < n; i++)
        sendto(s, buf, sizeof(buf), 0, (struct sockaddr *)&a, sizeof(a));
    return 0;
}
"""
PY_LOOP = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nb=bytes(64)\n"
           "a=('127.0.0.1',int(sys.argv[2]))\nfor _ in range(int(sys.argv[1])): s.sendto(b,a)\n")


@dataclass(frozen=True)
class Plan:
    idle_s: float  #: a multiple of the 5 s intervals: each poller scans the same number of times
    steady_rate: float  #: pods per second
    steady_pods: int
    alive: int  #: pods alive at once in the steady phase (each deleted this many ticks after its ADD)
    burst_pods: int
    burst_parallel: int
    rounds: int  #: overhead rounds per state (off, on, off)
    sendto_calls: int
    ip_execs: int


QUICK = Plan(idle_s=10.0, steady_rate=5.0, steady_pods=25, alive=5, burst_pods=30, burst_parallel=4,
             rounds=3, sendto_calls=150_000, ip_execs=300)
FULL = Plan(idle_s=60.0, steady_rate=5.0, steady_pods=300, alive=10, burst_pods=200, burst_parallel=4,
            rounds=9, sendto_calls=300_000, ip_execs=1000)


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
               "CNI_IFNAME": "eth0", "CNI_PATH": str(self.bin_dir), "PATH": PATH_ENV}
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


# -- overhead on unrelated work ------------------------------------------------------------

@dataclass
class Loops:
    sendto: list[str]
    language: str
    port: int
    plan: Plan
    disturbed: int = 0

    def sendto_s(self) -> float:
        t0 = time.perf_counter()
        subprocess.run([*self.sendto, str(self.plan.sendto_calls), str(self.port)], check=True)
        return time.perf_counter() - t0

    def ip_s(self) -> float:
        script = f'i=0; while [ "$i" -lt {self.plan.ip_execs} ]; do ip addr show >/dev/null; i=$((i+1)); done'
        t0 = time.perf_counter()
        subprocess.run(["sh", "-c", script], check=True)
        return time.perf_counter() - t0

    def rounds(self, out: dict[str, list[float]], *, ours: int) -> None:
        """``plan.rounds`` of each loop; ``disturbed`` counts ebpf workers
        not ours (``ours``: how many of the ones running are ours)."""
        for _ in range(self.plan.rounds):
            self.disturbed = max(self.disturbed, ebpf_workers() - ours)
            out["sendto"].append(self.sendto_s())
            out["ip"].append(self.ip_s())
        self.disturbed = max(self.disturbed, ebpf_workers() - ours)


def ebpf_workers() -> int:
    """ebpf workers running on this host. Others than ours (another cnisup,
    a test run) tax every process with their tracepoints: "off" is not off."""
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"ebpf" in argv and any(a.endswith(b".workers") for a in argv):
                n += 1
    return n


class Unavailable(Exception):
    """The worker to measure does not run on this host."""


def _build_sendto(tmp: Path) -> tuple[list[str], str]:
    if shutil.which("gcc"):
        (tmp / "loop.c").write_text(C_LOOP)
        subprocess.run(["gcc", "-O2", "-o", str(tmp / "loop"), str(tmp / "loop.c")], check=True)
        return [str(tmp / "loop")], "C"
    return [shutil.which("python3") or "python3", "-c", PY_LOOP], "Python"


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


def _measure(base: Path, bin_dir: Path, plan: Plan) -> dict[str, Any]:
    # The sendto loop's receiver, bound throughout: it overflows and drops, as
    # it should (no receiver at all would make every datagram an ICMP error).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sendto, language = _build_sendto(base)
        return _measure_all(base, bin_dir, Loops(sendto, language, sink.getsockname()[1], plan))


def _measure_all(base: Path, bin_dir: Path, loops: Loops) -> dict[str, Any]:
    plan = loops.plan
    off: dict[str, list[float]] = {"sendto": [], "ip": []}
    on: dict[str, list[float]] = {"sendto": [], "ip": []}
    res: dict[str, Any] = {"plan": plan.__dict__, "loop_language": loops.language}
    pods = Pods(base, bin_dir)
    ebpf_inst, poll_inst = _instance(base, bin_dir, True), _instance(base, bin_dir, False)
    started: list[tuple[Instance, Listener, Collector]] = []
    ps: PsAux | None = None
    try:
        loops.sendto_s(), loops.ip_s()  # warm-up: page cache, first exec of ip
        loops.rounds(off, ours=0)
        # Start-up, then the overhead with the ebpf worker alone.
        listener, e_col, w, ready_s = _start(ebpf_inst, "ebpf")
        started.append((ebpf_inst, listener, e_col))
        res["ebpf_ready_s"], res["ebpf_load_s"] = ready_s, (w.get("info") or {}).get("load_s")
        e_pid = int(w["pid"])
        time.sleep(0.5)
        loops.rounds(on, ours=1)
        # Now every observer at once: the same idle time, the same runs.
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
        time.sleep(1.0)  # the last events reach the subscribers
        c2 = {k: cpu_seconds_fine(p) for k, p in pids.items()}
        res["runs_made"] = len(pods.made)
        res["churn_cpu_s"] = {k: c2[k] - c1[k] for k in pids}
        res["churn_s"] = time.monotonic() - t_steady
        res["rss"] = {"ebpf": rss_bytes(e_pid), "proc-poll": rss_bytes(p_pid)}
        info = (next(x for x in ebpf_inst.status()["workers"] if x["family"] == "kernel").get("info") or {})
        res["kernel_dropped"] = info.get("kernel_dropped")
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
    loops.rounds(off, ours=0)  # after: drift between the off rounds shows in the spread
    res["other_bpf_workers"] = loops.disturbed
    res["off_s"], res["on_s"] = off, on
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
    off, on = res["off_s"], res["on_s"]
    overhead_note = ("primary: with the ebpf worker loaded; fallback column: no kernel worker (proc-poll hooks "
                     "nothing), rounds before and after; ratio < 1 is the overhead")
    if res["other_bpf_workers"]:
        overhead_note += (f"; DISTURBED: {res['other_bpf_workers']} other ebpf worker(s) ran on this host, "
                          "so the off rounds were not off")
    for key, what in (("sendto", f"{res['loop_language']} loop of {plan['sendto_calls']:,} sendto"),
                      ("ip", f"`ip addr show` x {plan['ip_execs']} in a shell loop")):
        for stat, fn in (("median", statistics.median), ("fastest", min)):
            p, f = fn(on[key]), fn(off[key])
            rows.append(row(NAME_OVERHEAD, f"{what}, {stat} of {len(on[key])} rounds", p, f, "s",
                            overhead_pct=round((p / f - 1) * 100, 2),
                            note=overhead_note if key == "sendto" and stat == "median" else None))
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
