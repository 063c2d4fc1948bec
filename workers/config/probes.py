"""Can the config family's workers run here? (``WorkerInfo.probe``)"""

from __future__ import annotations

import errno
import resource
from typing import Any

from inotify_simple import INotify

from cnisup.protocol.settings import Config
from cnisup.workers.probe import Probe, dirs_state

_LIMITS = ("max_user_watches", "max_user_instances", "max_queued_events")


def inotify_limits() -> dict[str, int | None]:
    """fs.inotify.* of this kernel (per user, all its processes); None where unreadable."""
    out: dict[str, int | None] = {}
    for name in _LIMITS:
        try:
            with open(f"/proc/sys/fs/inotify/{name}") as f:
                out[name] = int(f.read())
        except (OSError, ValueError):
            out[name] = None
    return out


def init_failure(exc: OSError, limits: dict[str, int | None]) -> str:
    """Why inotify_init1 failed, with every limit that can cause it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"inotify_init1 failed: {exc.strerror} ({errno.errorcode.get(exc.errno or 0, exc.errno)}); "
            f"fs.inotify.max_user_instances={limits['max_user_instances']} (per user, all its processes), "
            f"fs.inotify.max_user_watches={limits['max_user_watches']}, RLIMIT_NOFILE={soft}/{hard}")


def inotify(cfg: Config) -> Probe:
    limits = inotify_limits()
    details: dict[str, Any] = {"limits": limits, "conf_dirs": dirs_state(cfg.cni.conf_dirs),
                               "bin_dirs": dirs_state(cfg.cni.bin_dirs)}
    if limits["max_user_instances"] is None:
        return Probe(False, "no inotify on this kernel (/proc/sys/fs/inotify missing)", details)
    try:
        INotify().close()
    except OSError as exc:
        return Probe(False, init_failure(exc, limits), details)
    needed = len(cfg.cni.conf_dirs) + len(cfg.cni.bin_dirs)
    watches = limits["max_user_watches"]
    if watches is not None and watches < needed:
        details["warning"] = f"max_user_watches={watches} < {needed} dirs: the rest is polled"
    return Probe(True, "inotify available", details)


def file_poll(cfg: Config) -> Probe:
    return Probe(True, "stat polling needs nothing", {"interval_s": cfg.fallback.file_poll_interval})
