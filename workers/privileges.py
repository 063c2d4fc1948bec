"""Privilege drop and self-audit, done by the worker as its first step.

The drop happens here rather than in ``Popen(user=..., group=...)`` because
the capability *bounding* set can only be emptied while the process still has
CAP_SETPCAP, i.e. before the uid change; Popen has no hook for that short of
``preexec_fn``, which is unsafe in a threaded parent.
"""

from __future__ import annotations

import ctypes
import os
import platform
import pwd
import signal
from dataclasses import dataclass

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
# capset(2) has no glibc wrapper; the syscall number is per architecture.
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "riscv64": 91, "ppc64le": 184, "s390x": 185}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


def workers_account(name: str) -> tuple[pwd.struct_passwd, str]:
    """The account unprivileged workers run as: ``name``, else nobody; and a
    note when the fallback was taken."""
    try:
        return pwd.getpwnam(name), ""
    except KeyError:
        return pwd.getpwnam("nobody"), f"user {name!r} does not exist: using nobody"


class PrivilegeError(Exception):
    """The worker could not reach the identity it was asked to run with."""


def _prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    args = (ctypes.c_ulong(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4), ctypes.c_ulong(arg5))
    if _libc.prctl(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _clear_capsets() -> None:
    """Empty the effective, permitted and inheritable sets (always allowed)."""
    nr = _SYS_CAPSET.get(platform.machine())
    if nr is None:
        return  # the audit below still fails closed if anything is left
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if _libc.syscall(ctypes.c_long(nr), header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _cap_last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_to(uid: int, gid: int) -> None:
    """Become uid:gid with no supplementary groups, no capabilities in any set
    and no_new_privs. As non-root, only what an unprivileged process can do:
    no_new_privs and empty capability sets (it cannot shed its groups)."""
    try:
        if os.geteuid() == 0:
            for cap in range(_cap_last_cap() + 1):
                _prctl(_PR_CAPBSET_DROP, cap)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
        _clear_capsets()
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    except OSError as exc:
        raise PrivilegeError(f"privilege drop to {uid}:{gid} failed: {exc}") from exc


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies. Must run *after* the
    credential change, which clears the parent-death signal."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        # The parent died before the signal was armed.
        os._exit(0)


@dataclass(frozen=True)
class Identity:
    """What an unprivileged worker must look like in /proc/self/status."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()  #: allowed supplementary groups (empty as root)
    bounding_must_be_empty: bool = True


def read_status(pid: int | str = "self") -> dict[str, str]:
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def audit(expected: Identity, pid: int | str = "self") -> list[str]:
    """Problems found with the process's credentials; empty means all good."""
    st = read_status(pid)
    problems = []
    if {int(x) for x in st["Uid"].split()} != {expected.uid}:
        problems.append(f"Uid is {st['Uid']}, expected {expected.uid}")
    if {int(x) for x in st["Gid"].split()} != {expected.gid}:
        problems.append(f"Gid is {st['Gid']}, expected {expected.gid}")
    groups = tuple(sorted(int(g) for g in st.get("Groups", "").split()))
    if groups != tuple(sorted(expected.groups)):
        problems.append(f"supplementary groups {groups}, expected {expected.groups}")
    capsets = ["CapInh", "CapPrm", "CapEff", "CapAmb"]
    if expected.bounding_must_be_empty:
        capsets.append("CapBnd")
    for name in capsets:
        if int(st.get(name, "0"), 16) != 0:
            problems.append(f"{name} is {st[name]}, expected empty")
    if st.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs is {st.get('NoNewPrivs')}, expected 1")
    return problems
