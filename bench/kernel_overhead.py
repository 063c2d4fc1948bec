"""Comparison 2: what the kernel monitor costs the node's *other* processes,
per capture mode (root only).

``syscall_loops.c`` times a ``read``, a ``getpid`` and a ``sendto`` loop
(and a fork loop) side by side, each by its own thread CPU time, pinned to
one CPU. Rounds are interleaved: each round measures once with nothing of
ours loaded and once under a ``cnisup start`` whose ebpf worker runs the
mode (off/on, then on/off in the next round), so drift cancels in the
paired ratio on/off. BPF programs run in the traced process's context, so
this is where their cost shows, not in the worker's CPU.

Other processes on a shared host load tracing programs too (a test run's
ebpf worker taxes every syscall as ours would): a thread lists the loaded
programs every 50 ms the way ``bpftool prog show`` does (``bpf(2)``
``PROG_GET_NEXT_ID``, ``GET_FD_BY_ID``, ``OBJ_GET_INFO_BY_FD``), and a round
during which a tracing program that is not ours was loaded is void and
measured again."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import Instance

SOURCE = Path(__file__).with_name("syscall_loops.c")
LOOPS = ("read", "getpid", "sendto", "fork")
#: none: the A/A control (a cnisup without the kernel family): the noise floor of the method.
#: lean-run: lean while a plugin run is alive (its write tracepoint attached): the cost during CNI activity.
MODES = ("none", "lean", "lean-run", "full")
#: The plugin kept alive during lean-run: a script in the bin dir that waits.
HOLD_PLUGIN = "cnisup-bench-hold"
#: The pinned CPU: the last one (CPU 0 takes most of a small VM's interrupts).
CPU = str((os.cpu_count() or 1) - 1)
#: BPF program types that run on a traced task's path (include/uapi/linux/bpf.h).
TRACING_TYPES = {2: "kprobe", 5: "tracepoint", 7: "perf_event", 17: "raw_tracepoint",
                 24: "raw_tracepoint_writable", 26: "tracing", 29: "lsm"}
_NR_BPF = {"x86_64": 321, "aarch64": 280}
_PROG_GET_NEXT_ID, _PROG_GET_FD_BY_ID, _OBJ_GET_INFO_BY_FD = 11, 13, 15


def build(tmp: Path) -> Path | None:
    if shutil.which("gcc") is None:
        return None
    out = tmp / "syscall_loops"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(SOURCE)], check=True)
    return out


def tracing_programs() -> dict[int, str]:
    """Every loaded tracing program: id -> type (what ``bpftool prog show`` lists)."""
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        return {}
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.syscall.restype = ctypes.c_long
    out: dict[int, str] = {}
    prog_id = 0
    while True:
        attr = ctypes.create_string_buffer(prog_id.to_bytes(4, "little"), 16)
        if libc.syscall(nr, _PROG_GET_NEXT_ID, attr, 16) < 0:
            return out
        prog_id = int.from_bytes(attr.raw[4:8], "little")
        fd = int(libc.syscall(nr, _PROG_GET_FD_BY_ID, ctypes.create_string_buffer(prog_id.to_bytes(4, "little"),
                                                                                  16), 16))
        if fd < 0:
            continue  # unloaded meanwhile
        info = ctypes.create_string_buffer(256)
        query = (fd.to_bytes(4, "little") + (256).to_bytes(4, "little")
                 + ctypes.addressof(info).to_bytes(8, "little"))
        if libc.syscall(nr, _OBJ_GET_INFO_BY_FD, ctypes.create_string_buffer(query, 16), 16) == 0:
            kind = int.from_bytes(info.raw[0:4], "little")
            if kind in TRACING_TYPES:
                out[prog_id] = TRACING_TYPES[kind]
        os.close(fd)


def held_programs(pid: int) -> set[int]:
    """Programs whose fds ``pid`` holds (``prog_id:`` in its fdinfo): ours."""
    ids: set[int] = set()
    d = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(d):
        try:
            with open(f"{d}/{fd}") as f:
                ids |= {int(line.split()[1]) for line in f if line.startswith("prog_id:")}
        except OSError:
            continue
    return ids


class Sampler(threading.Thread):
    """Foreign tracing programs seen while a measurement runs."""

    def __init__(self, own: set[int]) -> None:
        super().__init__(daemon=True)
        self.own = own
        self.halt = threading.Event()
        self.foreign: set[str] = set()

    def run(self) -> None:
        while not self.halt.is_set():
            self.foreign |= {f"{i}:{t}" for i, t in tracing_programs().items() if i not in self.own}
            self.halt.wait(0.05)


@dataclass
class Pair:
    on: dict[str, float]
    off: dict[str, float]

    def ratio(self, loop: str) -> float:
        return self.on[f"{loop}_ns"] / self.off[f"{loop}_ns"]


@dataclass
class ModeResult:
    mode: str
    pairs: list[Pair] = field(default_factory=list)
    void: list[str] = field(default_factory=list)
    programs: int = 0  #: tracing programs our worker held

    def summary(self, loop: str) -> dict[str, float]:
        ratios = sorted(p.ratio(loop) for p in self.pairs)
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 3 else [ratios[0], 0.0, ratios[-1]]
        return {"ratio": statistics.median(ratios), "p25": q[0], "p75": q[2],
                "on_ns": statistics.median(p.on[f"{loop}_ns"] for p in self.pairs),
                "off_ns": statistics.median(p.off[f"{loop}_ns"] for p in self.pairs)}


#: Runs per measurement; per loop the fastest counts: on a shared host the
#: other tenants only ever add time, and a tracepoint's cost is in every run.
REPEATS = 3


def _measure(binary: Path, scale: float, own: set[int]) -> tuple[dict[str, float] | None, str | None]:
    sampler = Sampler(own)
    sampler.start()
    runs: list[dict[str, float]] = []
    try:
        for _ in range(REPEATS):
            out = subprocess.run(["taskset", "-c", CPU, str(binary), str(scale / REPEATS)], capture_output=True,
                                 text=True, check=True).stdout
            runs.append({k: float(v) for k, v in (kv.split("=") for kv in out.split())})
    finally:
        sampler.halt.set()
        sampler.join()
    if sampler.foreign:
        return None, "foreign tracing programs " + ",".join(sorted(sampler.foreign)[:5])
    return {k: min(r[k] for r in runs) for k in runs[0]}, None


#: After the instance is ready, before measuring: its start-up work (heartbeats
#: while busy, the first events) is over by then.
SETTLE_S = 2.0


def run_mode(mode: str, *, binary: Path, instance: Instance, rounds: int, scale: float) -> ModeResult:
    """``rounds`` valid off/on pairs (at most twice as many and two more tried). ``none``: the
    control, a cnisup without the kernel family, started and stopped the same way."""
    res = ModeResult(mode)
    for k in range(2 * rounds + 2):
        if len(res.pairs) >= rounds:
            break
        got: dict[str, dict[str, float]] = {}
        why: str | None = None
        hold: subprocess.Popen[bytes] | None = None
        for phase in ("off", "on") if k % 2 == 0 else ("on", "off"):
            if phase == "off":
                value, reason = _measure(binary, scale, set())
            else:
                instance.start()
                try:
                    w = instance.wait_running("config" if mode == "none" else "kernel", timeout_s=90)
                    if mode != "none" and w["worker"] != "ebpf":
                        raise RuntimeError(f"ebpf did not run: {w.get('fallback_reason')}")
                    time.sleep(SETTLE_S)
                    hold = _hold_run(instance) if mode == "lean-run" else None
                    own = held_programs(int(w["pid"]))
                    res.programs = len(own & set(tracing_programs()))
                    value, reason = _measure(binary, scale, own)
                finally:
                    if hold is not None:
                        hold.kill()
                        hold.wait()
                    instance.stop()
                time.sleep(1.0)  # its exit (and the programs' detach) is over before the next off
            why = why or reason
            if value is not None:
                got[phase] = value
        if why is None:
            res.pairs.append(Pair(got["on"], got["off"]))
        else:
            res.void.append(why)
    return res


def _hold_run(instance: Instance) -> subprocess.Popen[bytes]:
    """A plugin run that stays alive, and the worker's write tracepoint attached for it."""
    bin_dir = Path(instance.config["cni"]["bin_dirs"][0])
    hold = subprocess.Popen([str(bin_dir / HOLD_PLUGIN)], env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        w = next(w for w in instance.status()["workers"] if w["family"] == "kernel")
        if (w.get("info") or {}).get("write_attached"):
            return hold
        time.sleep(0.1)
    hold.kill()
    raise RuntimeError("the write tracepoint was not attached for a live plugin run")


def measure(base: Path, bin_dir: Path, *, rounds: int, scale: float,
            modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    binary = build(base)
    if binary is None:
        return {"skipped": "no gcc: the syscall loops are C (scripts/setup.sh installs it)"}
    out: dict[str, Any] = {"cpu": CPU, "scale": scale}
    hold = bin_dir / HOLD_PLUGIN
    hold.write_text("#!/bin/sh\nexec sleep 600\n")
    hold.chmod(0o755)
    for mode in modes:
        d = base / f"overhead-{mode}"
        d.mkdir()
        d.chmod(0o755)
        kernel = mode != "none"
        inst = Instance(d, config={"monitors": {"kernel": kernel, "config": not kernel, "k8s": False},
                                   "kernel": {"capture": "full" if mode == "full" else "lean"},
                                   "cni": {"bin_dirs": [str(bin_dir)], "conf_dirs": [str(base / "net.d")]}})
        res = run_mode(mode, binary=binary, instance=inst, rounds=rounds, scale=scale)
        out[mode] = {"pairs": [{"on": p.on, "off": p.off} for p in res.pairs], "void": res.void,
                     "programs": res.programs,
                     "summary": {loop: res.summary(loop) for loop in LOOPS} if res.pairs else {}}
    return out
