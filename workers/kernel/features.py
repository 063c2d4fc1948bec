"""What the eBPF worker needs from the host, checked without loading anything.

Shared by ``cnisup check`` (supervisor/probes.py) and the worker itself, so
both say the same thing. Importing this module does not import BCC.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Any

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

#: Without these there is no run tracking at all: the worker exits 77.
REQUIRED = (
    "sched:sched_process_exec", "sched:sched_process_fork", "sched:sched_process_exit",
    "syscalls:sys_enter_execve", "syscalls:sys_enter_exit_group",
    "syscalls:sys_enter_read", "syscalls:sys_exit_read", "syscalls:sys_enter_write",
)

#: Build switch (``-DHAVE_<name>``) -> (tracepoints it needs, what is lost without it).
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


def bcc_version() -> tuple[str | None, str | None]:
    """(version, error): importing BCC is the one expensive step of the probe."""
    try:
        import bcc
    except Exception as exc:  # ImportError, or a broken libbcc
        return None, f"cannot import bcc ({type(exc).__name__}: {exc}); install Debian's python3-bpfcc"
    return str(getattr(bcc, "__version__", "unknown")), None


@dataclass
class HostFeatures:
    ok: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    enabled_optional: list[str] = field(default_factory=list)
    group_dead: bool = False


def check(*, import_bcc: bool = True, tracefs_dir: str | None = None) -> HostFeatures:
    """Can the eBPF worker load here? Each missing piece is named.
    ``tracefs_dir`` overrides where tracepoints are looked up (tests)."""
    problems: list[str] = []
    details: dict[str, Any] = {"kernel": platform.release(), "euid": os.geteuid()}
    if os.geteuid() != 0:
        problems.append("not root (BPF tracing programs need CAP_BPF and CAP_PERFMON)")
    elif not can_trace(caps := effective_caps()):
        problems.append(f"CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) are not in the effective set ({caps:#x})")
    if import_bcc:
        version, err = bcc_version()
        details["bcc"] = version or err
        if err:
            problems.append(err)
    tfs = tracefs_dir or tracefs()
    details["tracefs"] = tfs or "not mounted (mount -t tracefs tracefs /sys/kernel/tracing)"
    hdr = headers()
    details["headers"] = hdr or f"missing: no /lib/modules/{platform.release()}/build (install linux-headers)"
    if hdr is None:
        problems.append(f"no kernel headers at /lib/modules/{platform.release()}/build")
    enabled: list[str] = []
    group_dead = False
    if tfs is None:
        problems.append("tracefs is not mounted")
    else:
        required = {tp: tracepoint_exists(tfs, tp) for tp in REQUIRED}
        details["tracepoints_required"] = {tp: "ok" if ok else "missing" for tp, ok in required.items()}
        missing = [tp for tp, ok in required.items() if not ok]
        if missing:
            problems.append(f"required tracepoints missing: {', '.join(missing)}")
        optional: dict[str, str] = {}
        for switch, (tps, lost) in OPTIONAL.items():
            absent = [tp for tp in tps if not tracepoint_exists(tfs, tp)]
            for tp in tps:
                optional[tp] = "ok" if not absent else f"missing: no {lost}"
            if not absent:
                enabled.append(switch)
        details["tracepoints_optional"] = optional
        group_dead = exit_has_group_dead(tfs)
    details["ring_buffer"] = _kernel_at_least(5, 8)
    if not details["ring_buffer"]:
        problems.append("kernel older than 5.8: no BPF ring buffer")
    if problems:
        return HostFeatures(False, "; ".join(problems), details, enabled, group_dead)
    degraded = [f"{s}: no {OPTIONAL[s][1]}" for s in OPTIONAL if s not in enabled]
    reason = "BPF tracepoints available" + (f" (degraded: {'; '.join(degraded)})" if degraded else "")
    return HostFeatures(True, reason, details, enabled, group_dead)


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        parts = platform.release().split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False
