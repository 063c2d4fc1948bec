"""Can the journal's workers write their file? (``WorkerInfo.probe``)

Judged for the user the workers run as: in the supervisor (root) from the
mode bits, in the worker itself with its own credentials."""

from __future__ import annotations

import os
import stat
from typing import Any

from cnisup.protocol.settings import Config
from cnisup.workers.probe import Probe, may, workers_ids


def _problem(path: str, cfg: Config) -> str | None:
    """Why the workers' user cannot create or write the journal at ``path``."""
    uid, gid = workers_ids(cfg)
    d = os.path.dirname(path)
    try:
        st = os.stat(d)
    except FileNotFoundError:
        if os.path.realpath(d).startswith(os.path.realpath(cfg.runtime_dir) + os.sep):
            return None  # the supervisor makes it, for the workers' user, when it starts
        return f"{d}: no such directory"
    except OSError as exc:
        return f"{d}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{d} is not a directory"
    if not may(st, uid, gid, 0o3):
        return f"{d} is not writable by uid {uid} (owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})"
    for suffix in ("", "-wal", "-shm"):
        try:
            fst = os.stat(path + suffix)
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"{path}{suffix}: {exc.strerror}"
        if not may(fst, uid, gid, 0o6):
            return f"{path}{suffix} is not writable by uid {uid} (owner {fst.st_uid})"
    return None


def _probe(path: str, cfg: Config, max_bytes: int) -> Probe:
    details: dict[str, Any] = {"path": path, "max_bytes": max_bytes, "max_age_s": cfg.journal.max_age}
    problem = _problem(path, cfg)
    if problem is not None:
        return Probe(False, problem, details)
    return Probe(True, f"journal at {path}", details)


def journal(cfg: Config) -> Probe:
    return _probe(cfg.journal_path, cfg, cfg.journal.max_bytes)


def journal_runtime(cfg: Config) -> Probe:
    return _probe(cfg.journal_fallback_path, cfg, cfg.journal.fallback_max_bytes)
