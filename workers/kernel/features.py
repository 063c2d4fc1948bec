"""What the eBPF worker needs from the host, checked without loading anything.

Shared by ``cnisup check``, the supervisor's choice (supervisor/probes.py)
and the worker itself, so all say the same thing. Nothing here imports BCC:
importing it maps libbcc and LLVM (~60 MB), and the supervisor, which every
worker depends on, must stay small. BCC's presence is looked up
(``find_spec``, ``find_library``); the kernel side is tried with ``bpf(2)``
through ctypes (a ring buffer map, created and closed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import dataclass, field
from typing import Any

from cnisup.workers.kernel import btf

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

#: lean: without these there is no run tracking at all (exit 77).
LEAN_REQUIRED = ("sched:sched_process_exec", "sched:sched_process_fork", "sched:sched_process_exit",
                 "task:task_newtask")
#: lean: build switch -> (tracepoints, what is lost without them). Attached only while a plugin runs.
LEAN_OPTIONAL: dict[str, tuple[tuple[str, ...], str]] = {
    "sys_enter_write": (("syscalls:sys_enter_write",), "plugin stdout/stderr: result, error, stderr"),
}

#: full: without these there is no run tracking at all (exit 77).
REQUIRED = (
    "sched:sched_process_exec", "sched:sched_process_fork", "sched:sched_process_exit",
    "syscalls:sys_enter_execve", "syscalls:sys_enter_exit_group",
    "syscalls:sys_enter_read", "syscalls:sys_exit_read", "syscalls:sys_enter_write",
)

#: full: build switch (``-DHAVE_<name>``) -> (tracepoints it needs, what is lost without it).
OPTIONAL: dict[str, tuple[tuple[str, ...], str]] = {
    "sys_enter_execveat": (("syscalls:sys_enter_execveat",), "plugins started with execveat(2)"),
    "sys_enter_socket": (("syscalls:sys_enter_socket", "syscalls:sys_exit_socket"),
                         "netlink capture: link.* and addr.* events"),
    "sys_enter_close": (("syscalls:sys_enter_close",),
                        "closed netlink sockets are forgotten (a reused fd may be misread)"),
    "sys_enter_sendto": (("syscalls:sys_enter_sendto",), "netlink requests sent with sendto(2)"),
    "sys_enter_sendmsg": (("syscalls:sys_enter_sendmsg",), "netlink requests sent with sendmsg(2)"),
    "sys_enter_unshare": (("syscalls:sys_enter_unshare", "syscalls:sys_exit_unshare"),
                          "netns.created by unshare(2)"),
    "sys_enter_setns": (("syscalls:sys_enter_setns", "syscalls:sys_exit_setns"), "netns.entered"),
    "sys_enter_clone": (("syscalls:sys_enter_clone", "syscalls:sys_exit_clone"),
                        "netns.created by clone(2)"),
    "sys_enter_clone3": (("syscalls:sys_enter_clone3", "syscalls:sys_exit_clone3"),
                         "netns.created by clone3(2)"),
}

#: What each capture costs the node's other processes, said by ``cnisup check`` and ``status``.
#: Measured on a 2-core VM, kernel 6.18 (``make bench``: interleaved rounds, thread CPU time).
TAX = {"lean": "none measurable: sched/task tracepoints fire per exec, fork and exit, never per syscall; "
               "sys_enter_write only while a plugin runs",
       "full": "every syscall of every process pays for it: read() x2.4-3.0, getpid() x1.5-1.9, sendto() "
               "x1.1-1.3 per call"}

_NR_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_CREATE, _BPF_MAP_TYPE_RINGBUF = 0, 27


#: Capability numbers (linux/capability.h) a BPF tracing program needs: CAP_BPF and
#: CAP_PERFMON, or CAP_SYS_ADMIN alone (kernels before 5.8 know only that one).
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def effective_caps(pid: int | str = "self") -> int:
    """The CapEff bit mask of a process (0 when unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def can_trace(caps: int) -> bool:
    """May a process with effective set ``caps`` load and attach BPF tracing programs?"""
    bpf_perfmon = (1 << CAP_BPF) | (1 << CAP_PERFMON)
    return caps & bpf_perfmon == bpf_perfmon or bool(caps & (1 << CAP_SYS_ADMIN))


def tracefs() -> str | None:
    for d in TRACEFS_CANDIDATES:
        if os.path.isdir(f"{d}/events"):
            return d
    return None


def headers() -> str | None:
    """Kernel headers BCC can compile against, or None."""
    build = f"/lib/modules/{platform.release()}/build"
    if os.path.isdir(f"{build}/include"):
        return os.path.realpath(build)
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return "/sys/kernel/kheaders.tar.xz"
    return None


def tracepoint_exists(tfs: str, tp: str) -> bool:
    category, _, name = tp.partition(":")
    return os.path.isdir(f"{tfs}/events/{category}/{name}")


def exit_has_group_dead(tfs: str) -> bool:
    """sched_process_exit gained ``group_dead`` in 6.x; older kernels decide on the leader."""
    try:
        with open(f"{tfs}/events/sched/sched_process_exit/format") as f:
            return "group_dead" in f.read()
    except OSError:
        return False


def bcc_installed() -> tuple[str | None, str | None]:
    """(version, problem), found without importing it."""
    if importlib.util.find_spec("bcc") is None or ctypes.util.find_library("bcc") is None:
        return None, "BCC is not installed: install Debian's python3-bpfcc"
    try:
        return importlib.metadata.version("bcc"), None
    except importlib.metadata.PackageNotFoundError:
        return "unknown", None


def bpf_capable() -> str | None:
    """Why this process cannot load tracing programs, or None."""
    if os.geteuid() != 0:
        return "not root (BPF tracing programs need CAP_BPF and CAP_PERFMON)"
    if not can_trace(caps := effective_caps()):
        return f"CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) are not in the effective set ({caps:#x})"
    return None


def ringbuf_problem() -> str | None:
    """Create (and close) a 4 KiB BPF ring buffer map: the kernel says whether it can."""
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        return None  # unknown syscall number: the worker's load will tell
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = ctypes.create_string_buffer(b"".join(x.to_bytes(4, "little") for x in (_BPF_MAP_TYPE_RINGBUF, 0, 0,
                                                                                     4096, 0)), 128)
    fd = int(libc.syscall(nr, _BPF_MAP_CREATE, attr, 128))
    if fd < 0:
        return f"cannot create a BPF ring buffer: {os.strerror(ctypes.get_errno())}"
    os.close(fd)
    return None


def lockdown_problem() -> str | None:
    try:
        with open("/sys/kernel/security/lockdown") as f:
            mode = f.read()
    except OSError:
        return None
    return "kernel lockdown=confidentiality refuses BPF reads of kernel memory" if "[confidentiality]" in mode else None


@dataclass
class HostFeatures:
    ok: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    enabled_optional: list[str] = field(default_factory=list)
    group_dead: bool = False


def check(*, capture: str = "lean", tracefs_dir: str | None = None, btf_path: str = btf.BTF_PATH,
          privileges: bool = True) -> HostFeatures:
    """Can the eBPF worker load here with ``capture``? Each missing piece is
    named. ``tracefs_dir``/``btf_path`` override where things are looked up
    and ``privileges=False`` skips the checks that need root (tests)."""
    problems: list[str] = []
    details: dict[str, Any] = {"kernel": platform.release(), "euid": os.geteuid(), "capture": capture}
    if privileges:
        for problem in (bpf_capable(), lockdown_problem()):
            if problem:
                problems.append(problem)
    version, err = bcc_installed()
    details["bcc"] = version or err
    if err:
        problems.append(err)
    tfs = tracefs_dir or tracefs()
    details["tracefs"] = tfs or "not mounted (mount -t tracefs tracefs /sys/kernel/tracing)"
    hdr = headers()
    details["headers"] = hdr or f"missing: no /lib/modules/{platform.release()}/build (install linux-headers)"
    if hdr is None:
        problems.append(f"no kernel headers at /lib/modules/{platform.release()}/build")
    if capture == "lean":
        try:
            details["btf_offsets"] = len(btf.offsets(btf.BTF.load(btf_path)))
        except btf.BTFError as exc:
            details["btf_offsets"] = str(exc)
            problems.append(f"kernel BTF: {exc}")
    required, optional_map = (LEAN_REQUIRED, LEAN_OPTIONAL) if capture == "lean" else (REQUIRED, OPTIONAL)
    enabled: list[str] = []
    group_dead = False
    if tfs is None:
        problems.append("tracefs is not mounted")
    else:
        found = {tp: tracepoint_exists(tfs, tp) for tp in required}
        details["tracepoints_required"] = {tp: "ok" if ok else "missing" for tp, ok in found.items()}
        if missing := [tp for tp, ok in found.items() if not ok]:
            problems.append(f"required tracepoints missing: {', '.join(missing)}")
        optional: dict[str, str] = {}
        for switch, (tps, lost) in optional_map.items():
            absent = [tp for tp in tps if not tracepoint_exists(tfs, tp)]
            for tp in tps:
                optional[tp] = "ok" if not absent else f"missing: no {lost}"
            if not absent:
                enabled.append(switch)
        details["tracepoints_optional"] = optional
        group_dead = exit_has_group_dead(tfs)
    if privileges and not problems and (err := ringbuf_problem()):
        problems.append(err)
    details["ring_buffer"] = _kernel_at_least(5, 8)
    if not details["ring_buffer"]:
        problems.append("kernel older than 5.8: no BPF ring buffer")
    if problems:
        return HostFeatures(False, "; ".join(problems), details, enabled, group_dead)
    degraded = [f"{s}: no {optional_map[s][1]}" for s in optional_map if s not in enabled]
    reason = f"BPF tracepoints available, capture {capture}" + (
        f" (degraded: {'; '.join(degraded)})" if degraded else "")
    return HostFeatures(True, reason, details, enabled, group_dead)


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        parts = platform.release().split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False
