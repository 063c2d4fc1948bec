"""Choosing a worker for each family from its workers' probes (each worker's
own ``probe``, named in the registry), and what ``cnisup check`` reports.
Probes only look: they change nothing on the host."""

from __future__ import annotations

import importlib
import os
import pwd
from dataclasses import dataclass
from typing import Any

from cnisup.protocol.settings import Config
from cnisup.supervisor import service
from cnisup.supervisor.service import UNIT
from cnisup.workers import privileges
from cnisup.workers.probe import Probe
from cnisup.workers.registry import FAMILIES, Family, WorkerInfo


@dataclass
class Choice:
    family: str
    enabled: bool
    worker: WorkerInfo | None
    reason: str
    probes: dict[str, Probe]
    #: enabled, but nothing to watch on this host (no worker: the slot idles and looks again)
    idle: bool = False


def choose(cfg: Config, family: Family) -> Choice:
    """Which worker runs ``family`` and why."""
    probes: dict[str, Probe] = {}
    if not cfg.lookup(family.enabled_key):
        return Choice(family.name, False, None, f"{family.enabled_key}: false", probes)
    fallback = family.fallback
    if fallback is not None and family.prefer_key is not None and not cfg.lookup(family.prefer_key):
        only = probes[fallback.name] = fallback.probe()(cfg)
        if only.idle:
            return Choice(family.name, True, None, only.reason, probes, idle=True)
        return Choice(family.name, True, fallback, f"{family.prefer_key}: false", probes)
    primary = probes[family.primary.name] = family.primary.probe()(cfg)
    if primary.ok:
        if fallback is not None:
            probes[fallback.name] = fallback.probe()(cfg)
        return Choice(family.name, True, family.primary, primary.reason, probes)
    if fallback is None:
        if primary.idle:
            return Choice(family.name, True, None, primary.reason, probes, idle=True)
        # started anyway: it exits 77, the family is unavailable and re-probed later
        return Choice(family.name, True, family.primary,
                      f"{family.primary.name} unavailable: {primary.reason} (no fallback: re-probed later)", probes)
    second = probes[fallback.name] = fallback.probe()(cfg)
    if primary.idle and (second.idle or not second.ok):
        return Choice(family.name, True, None, primary.reason, probes, idle=True)
    return Choice(family.name, True, fallback, f"{family.primary.name} unavailable: {primary.reason}", probes)


def worker_identity(cfg: Config) -> dict[str, Any]:
    """Who unprivileged workers will run as."""
    if os.geteuid() != 0:
        pw = pwd.getpwuid(os.getuid())
        return {"user": pw.pw_name, "uid": pw.pw_uid, "gid": os.getgid(), "groups": os.getgroups(),
                "note": "supervisor is not root: workers keep its user and groups"}
    pw, note = privileges.workers_account(cfg.workers.user)
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


def audits(cfg: Config, family: Family) -> dict[str, Probe]:
    """Checks only ``cnisup check`` runs, never the supervisor's choice (they may ask a server
    and take seconds): a family's probes module may define ``audit(cfg) -> {name: Probe}``."""
    module = importlib.import_module(family.primary.probe_target.partition(":")[0])
    audit = getattr(module, "audit", None)
    found: dict[str, Probe] = audit(cfg) if audit is not None else {}
    return found


def families(cfg: Config) -> list[dict[str, Any]]:
    """Per family: which worker would run and why, and whether it can run at all."""
    out = []
    for fam in FAMILIES.values():
        c = choose(cfg, fam)
        reason = c.reason
        chosen = c.probes.get(c.worker.name) if c.worker else None
        # Started anyway: it exits 77 and is re-probed later (a family without fallback says so in its reason).
        if chosen is not None and not chosen.ok and c.worker is not fam.primary:
            reason += f"; {c.worker.name} will not run either: {chosen.reason}"  # type: ignore[union-attr]
        out.append({
            "family": fam.name, "enabled": c.enabled, "idle": c.idle,
            "runnable": not c.idle and (chosen is None or chosen.ok),
            "worker": c.worker.name if c.worker else None, "reason": reason,
            "primary": fam.primary.name, "fallback": fam.fallback.name if fam.fallback else None,
            "probes": {n: {"ok": p.ok, "reason": p.reason, **p.details} for n, p in c.probes.items()},
            "audits": {n: {"ok": p.ok, "reason": p.reason, **p.details}
                       for n, p in (audits(cfg, fam) if c.enabled and (chosen is None or chosen.ok) else {}).items()},
        })
    return out


def unrunnable(report: dict[str, Any]) -> list[str]:
    """Enabled families that can run neither worker, here or under the installed unit."""
    out = [f"{f['family']} (here)" for f in report["families"] if f["enabled"] and not f["runnable"]
           and not f["idle"]]
    service = report.get("service") or {}
    out += [f"{f['family']} (under {UNIT})" for f in service.get("families", [])
            if f["enabled"] and not f["runnable"] and not f["idle"]]
    return out


def check(cfg: Config) -> dict[str, Any]:
    """Everything ``cnisup check`` reports: this host as this process sees it,
    and (as root, with the unit installed) as cnisup.service will see it."""
    return {"node": cfg.node_name, "euid": os.geteuid(), "workers_identity": worker_identity(cfg),
            "runtime_dir": cfg.runtime_dir, "publish": cfg.publish.endpoints,
            "control": cfg.control.endpoint, "families": families(cfg), "service": service.judge(cfg)}
