"""What a probe says: can this host run a worker, and why (not). Each worker
names one probe function in the registry (``WorkerInfo.probe``); ``cnisup
check`` and the supervisor's choice run it in the supervisor, and the worker
runs the same function before it starts. Probes only look: they change
nothing on the host, and they import nothing heavy (no BCC, no kubernetes
client), so the supervisor stays small."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cnisup.protocol.settings import Config


@dataclass
class Probe:
    ok: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    #: not ok because there is nothing to watch here (no cluster), not because something is missing
    idle: bool = False


ProbeFn = Callable[[Config], Probe]


def dirs_state(dirs: list[str]) -> dict[str, str]:
    out = {}
    for d in dirs:
        if os.path.isdir(d):
            out[d] = "ok" if os.access(d, os.R_OK | os.X_OK) else "not readable"
        else:
            out[d] = "missing (watched for creation)"
    return out


def workers_ids(cfg: Config) -> tuple[int, int]:
    """uid and gid the unprivileged workers run as: the workers account when
    we are root (the supervisor probing for them), else our own."""
    if os.geteuid() == 0:
        from cnisup.workers import privileges

        pw = privileges.workers_account(cfg.workers.user)[0]
        return pw.pw_uid, pw.pw_gid
    return os.getuid(), os.getgid()


def may(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    """Does ``uid``/``gid`` have ``bits`` (rwx as 0o7) on this inode, by its mode? (root may anything)"""
    if uid == 0:
        return True
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    return (st.st_mode >> shift) & bits == bits
