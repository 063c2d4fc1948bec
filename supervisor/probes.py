"""Capability probes: can this host run a family's primary worker, and if not,
why. ``cnisup check`` prints them; the supervisor uses them to choose. Probes
only look: they change nothing on the host."""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inotify_simple import INotify

from cnisup.supervisor.config import Config
from cnisup.workers.registry import FAMILIES, PLANNED_FAMILIES, Family, WorkerInfo


@dataclass
class Probe:
    ok: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _dirs_state(dirs: list[str]) -> dict[str, str]:
    out = {}
    for d in dirs:
        if os.path.isdir(d):
            out[d] = "ok" if os.access(d, os.R_OK | os.X_OK) else "not readable"
        else:
            out[d] = "missing (watched for creation)"
    return out


def probe_inotify(cfg: Config) -> Probe:
    limits = {
        "max_user_watches": _read_int("/proc/sys/fs/inotify/max_user_watches"),
        "max_user_instances": _read_int("/proc/sys/fs/inotify/max_user_instances"),
        "max_queued_events": _read_int("/proc/sys/fs/inotify/max_queued_events"),
    }
    details: dict[str, Any] = {"limits": limits, "conf_dirs": _dirs_state(cfg.cni.conf_dirs),
                               "bin_dirs": _dirs_state(cfg.cni.bin_dirs)}
    if limits["max_user_instances"] is None:
        return Probe(False, "no inotify on this kernel (/proc/sys/fs/inotify missing)", details)
    try:
        INotify().close()
    except OSError as exc:
        return Probe(False, f"inotify_init failed: {exc.strerror}", details)
    needed = len(cfg.cni.conf_dirs) + len(cfg.cni.bin_dirs)
    if limits["max_user_watches"] is not None and limits["max_user_watches"] < needed:
        details["warning"] = (f"max_user_watches={limits['max_user_watches']} < {needed} dirs: "
                              "the rest is polled")
    return Probe(True, "inotify available", details)


def probe_file_poll(cfg: Config) -> Probe:
    return Probe(True, "stat polling needs nothing",
                 {"interval_s": cfg.fallback.file_poll_interval})


def probe_ebpf(cfg: Config) -> Probe:
    from cnisup.workers.kernel import features

    host = features.check()
    details = {**host.details, "bin_dirs": _dirs_state(cfg.cni.bin_dirs)}
    return Probe(host.ok, host.reason, details)


def probe_proc_poll(cfg: Config) -> Probe:
    details: dict[str, Any] = {"interval_s": cfg.fallback.process_poll_interval,
                               "bin_dirs": _dirs_state(cfg.cni.bin_dirs)}
    if not os.path.isdir("/proc/self"):
        return Probe(False, "/proc is not mounted", details)
    details["environ"] = ("readable for every process" if os.geteuid() == 0
                          else "only this user's processes: CNI_* of root's plugin runs are missing")
    details["misses"] = "runs that start and end between two scans; changes in other network namespaces"
    return Probe(True, "/proc scanning needs nothing", details)


def _k8s_access(cfg: Config, details: dict[str, Any]) -> str | None:
    """Where the k8s workers' client configuration comes from; the reason if nowhere."""
    from cnisup.workers.errors import CapabilityMissing
    from cnisup.workers.k8s import events

    details["pod_scope"] = cfg.kubernetes.pod_scope
    details["in_cluster_env"] = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    # As the worker will look: with the environment spawn passes and the workers user's home.
    env = {k: v for k, v in os.environ.items() if k in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST",
                                                        "KUBERNETES_SERVICE_PORT")}
    try:
        env["HOME"] = pwd.getpwnam(worker_identity(cfg)["user"]).pw_dir
    except KeyError:
        pass
    try:
        access = events.locate(cfg.kubernetes.kubeconfig, env)
    except CapabilityMissing as exc:
        return str(exc)
    details["client_config"] = {"mode": access.mode, "path": access.path, "from": access.origin}
    if access.mode == "kubeconfig" and os.geteuid() == 0 and not os.stat(access.path).st_mode & 0o004:
        details["warning"] = f"{access.path} is not world-readable: the workers user may not read it"
    return None


def probe_k8s_informer(cfg: Config) -> Probe:
    import importlib.util

    details: dict[str, Any] = {}
    if importlib.util.find_spec("kubernetes") is None:
        return Probe(False, "the kubernetes Python client is not installed (python3-kubernetes)", details)
    missing = _k8s_access(cfg, details)
    if missing:
        return Probe(False, missing, details)
    return Probe(True, f"kubernetes client; config from {details['client_config']['from']}", details)


#: Seconds ``kubectl version --client`` may take in ``cnisup check``.
KUBECTL_VERSION_TIMEOUT_S = 5.0


def probe_kubectl(cfg: Config) -> Probe:
    import shutil
    import subprocess

    details: dict[str, Any] = {}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return Probe(False, "kubectl not found in PATH", details)
    details["kubectl"] = kubectl
    try:
        out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True,
                             timeout=KUBECTL_VERSION_TIMEOUT_S, check=False)
        details["version"] = json.loads(out.stdout)["clientVersion"]["gitVersion"]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        details["version_error"] = str(exc)
    missing = _k8s_access(cfg, details)
    if missing:
        return Probe(False, missing, details)
    return Probe(True, f"kubectl {details.get('version', '?')}; config from {details['client_config']['from']}",
                 details)


PROBES: dict[str, Callable[[Config], Probe]] = {
    "inotify": probe_inotify,
    "file-poll": probe_file_poll,
    "ebpf": probe_ebpf,
    "proc-poll": probe_proc_poll,
    "k8s-informer": probe_k8s_informer,
    "kubectl": probe_kubectl,
}


@dataclass
class Choice:
    family: str
    enabled: bool
    worker: WorkerInfo | None
    reason: str
    probes: dict[str, Probe]


def choose(cfg: Config, family: Family, *, skip_primary: bool = False) -> Choice:
    """Which worker runs ``family`` and why."""
    probes: dict[str, Probe] = {}
    if not getattr(cfg.monitors, family.name):
        return Choice(family.name, False, None, f"monitors.{family.name}: false", probes)
    if not getattr(cfg, family.prefer_key):
        probes[family.fallback.name] = PROBES[family.fallback.name](cfg)
        return Choice(family.name, True, family.fallback,
                      f"{family.prefer_key}: false", probes)
    primary = probes[family.primary.name] = PROBES[family.primary.name](cfg)
    probes[family.fallback.name] = PROBES[family.fallback.name](cfg)
    if primary.ok and not skip_primary:
        return Choice(family.name, True, family.primary, primary.reason, probes)
    return Choice(family.name, True, family.fallback,
                  f"{family.primary.name} unavailable: {primary.reason}", probes)


def worker_identity(cfg: Config) -> dict[str, Any]:
    """Who unprivileged workers will run as."""
    if os.geteuid() != 0:
        pw = pwd.getpwuid(os.getuid())
        return {"user": pw.pw_name, "uid": pw.pw_uid, "gid": os.getgid(), "groups": os.getgroups(),
                "note": "supervisor is not root: workers keep its user and groups"}
    try:
        pw = pwd.getpwnam(cfg.workers.user)
        note = ""
    except KeyError:
        pw = pwd.getpwnam("nobody")
        note = f"user {cfg.workers.user!r} does not exist: using nobody"
    blocked = unreachable_for(pw.pw_uid, pw.pw_gid)
    if blocked:
        note = "; ".join(filter(None, [note, f"{pw.pw_name} cannot reach {blocked}: its workers will fail "
                                              "to start (install cnisup where that user can read it)"]))
    return {"user": pw.pw_name, "uid": pw.pw_uid, "gid": pw.pw_gid, "groups": [], "note": note}


def unreachable_for(uid: int, gid: int) -> str | None:
    """The first directory on the way to our code or interpreter that ``uid``
    cannot traverse (mode bits only), e.g. a checkout under /root."""
    import sys

    import cnisup.workers

    for start in (*cnisup.workers.__path__, os.path.dirname(sys.executable)):
        path = os.path.realpath(start)
        while True:
            try:
                st = os.stat(path)
            except OSError:
                return path
            bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
            if not st.st_mode & bit:
                return path
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
    return None


def check(cfg: Config) -> dict[str, Any]:
    """Everything ``cnisup check`` reports."""
    families = []
    for fam in FAMILIES.values():
        c = choose(cfg, fam)
        reason = c.reason
        chosen = c.probes.get(c.worker.name) if c.worker else None
        if chosen is not None and not chosen.ok:  # started anyway: it exits 77 and is re-probed later
            reason += f"; {c.worker.name} will not run either: {chosen.reason}"  # type: ignore[union-attr]
        families.append({
            "family": fam.name, "enabled": c.enabled, "runnable": chosen is None or chosen.ok,
            "worker": c.worker.name if c.worker else None, "reason": reason,
            "primary": fam.primary.name, "fallback": fam.fallback.name,
            "probes": {n: {"ok": p.ok, "reason": p.reason, **p.details} for n, p in c.probes.items()},
        })
    for name in PLANNED_FAMILIES:
        enabled = bool(getattr(cfg.monitors, name))
        families.append({"family": name, "enabled": enabled, "worker": None,
                         "reason": "no worker for this family in this version" if enabled
                         else f"monitors.{name}: false", "probes": {}})
    return {"node": cfg.node_name, "euid": os.geteuid(), "workers_identity": worker_identity(cfg),
            "runtime_dir": cfg.runtime_dir, "publish": cfg.publish.endpoints,
            "control": cfg.control.endpoint, "families": families}
