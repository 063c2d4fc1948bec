"""Which workers exist, per monitor family. Metadata only: importing this
module does not import any worker's implementation."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Worker


@dataclass(frozen=True)
class WorkerInfo:
    name: str  #: also the envelope ``source``
    family: str
    role: str  #: "primary" or "fallback"
    privileged: bool  #: keeps root (kernel family); else drops to the workers user
    target: str  #: "module:Class"

    def load(self) -> type[Worker]:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Family:
    name: str
    primary: WorkerInfo
    fallback: WorkerInfo
    prefer_key: str  #: config key that says "prefer the primary"


FAMILIES: dict[str, Family] = {
    "config": Family(
        name="config",
        primary=WorkerInfo("inotify", "config", "primary", False,
                           "cnisup.workers.config.inotify:InotifyWorker"),
        fallback=WorkerInfo("file-poll", "config", "fallback", False,
                            "cnisup.workers.config.filepoll:FilePollWorker"),
        prefer_key="use_inotify",
    ),
    "kernel": Family(
        name="kernel",
        primary=WorkerInfo("ebpf", "kernel", "primary", True,
                           "cnisup.workers.kernel.ebpf:EbpfWorker"),
        # Privileged too: /proc/<pid>/environ of plugins run by root (the
        # runtime's CNI_* variables) is readable only with root's ptrace access.
        fallback=WorkerInfo("proc-poll", "kernel", "fallback", True,
                            "cnisup.workers.kernel.procpoll:ProcPollWorker"),
        prefer_key="use_ebpf",
    ),
    "k8s": Family(
        name="k8s",
        primary=WorkerInfo("k8s-informer", "k8s", "primary", False,
                           "cnisup.workers.k8s.informer:K8sInformerWorker"),
        fallback=WorkerInfo("kubectl", "k8s", "fallback", False,
                            "cnisup.workers.k8s.kubectl:KubectlWorker"),
        prefer_key="use_k8s_informer",
    ),
}

#: Families named in the configuration contract whose workers this version
#: does not ship yet; the supervisor says so instead of failing.
PLANNED_FAMILIES: tuple[str, ...] = ()

WORKERS: dict[str, WorkerInfo] = {
    w.name: w for f in FAMILIES.values() for w in (f.primary, f.fallback)
}
