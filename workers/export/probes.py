"""Can the export run here? (``WorkerInfo.probe``) Only what can be known
without a network round trip: the client library, and the files its
configuration names, readable by the user the workers run as. Whether a
server answers is the worker's business: it waits and retries."""

from __future__ import annotations

import importlib.util
import os
import stat

from cnisup.protocol.settings import Config
from cnisup.workers.probe import Probe, may, workers_ids


def _unreadable(path: str, cfg: Config) -> str | None:
    """Why the workers' user cannot read ``path`` (by mode bits: the supervisor probes for them)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    uid, gid = workers_ids(cfg)
    if not may(st, uid, gid, 0o4):
        return f"{path} is not readable by uid {uid} (owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})"
    return None


def nats(cfg: Config) -> Probe:
    n = cfg.export.nats
    details = {"servers": n.servers, "stream": n.stream, "subject_prefix": n.subject_prefix}
    if importlib.util.find_spec("nats") is None:
        return Probe(False, "the nats-py client library is not installed", details)
    files = [(k, getattr(n, k)) for k in ("credentials_file", "nkey_seed_file", "user_password_file")]
    files += [(f"tls.{k}", getattr(n.tls, k)) for k in ("ca", "cert", "key")]
    for key, path in files:
        if path and (problem := _unreadable(path, cfg)) is not None:
            return Probe(False, f"export.nats.{key}: {problem}", details)
    return Probe(True, f"NATS {', '.join(n.servers) or '(no servers)'}, stream {n.stream}", details)
