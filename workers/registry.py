"""Which workers exist, per monitor family. Metadata only: importing this
module imports neither a worker's implementation nor its probe."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Worker
    from .probe import ProbeFn


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class WorkerInfo:
    name: str  #: also the envelope ``source``
    family: str
    role: str  #: "primary" or "fallback"
    privileged: bool  #: keeps root (kernel family); else drops to the workers user
    target: str  #: "module:Class" of the worker
    probe_target: str  #: "module:function" of its probe, importable without the worker's dependencies

    def load(self) -> type[Worker]:
        cls: type[Worker] = _load(self.target)
        return cls

    def probe(self) -> ProbeFn:
        fn: ProbeFn = _load(self.probe_target)
        return fn


#: Configuration keys every worker reads (the envelope's node, its logging, its
#: heartbeat and bus queue); a key names itself and every key under it.
WORKER_SETTINGS = ("node_name", "log_level", "workers.heartbeat_interval", "workers.bus_hwm")


@dataclass(frozen=True)
class Family:
    name: str
    primary: WorkerInfo
    fallback: WorkerInfo | None  #: None: nothing can stand in (export waits, retries and reports lag)
    enabled_key: str  #: config key that turns the family on
    prefer_key: str | None  #: config key that says "prefer the primary" (None: always, when it can run)
    #: Keys its workers read besides WORKER_SETTINGS; a reload that changes none of
    #: them (nor enabled_key, nor prefer_key) leaves its worker running. None: all.
    reads: tuple[str, ...] | None = None

    def affected_by(self, changed: list[str]) -> list[str]:
        """Which of the ``changed`` keys (flattened, ``cni.bin_dirs``) its workers see."""
        if self.reads is None:
            return list(changed)
        mine = (*WORKER_SETTINGS, *self.reads, self.enabled_key, *([self.prefer_key] if self.prefer_key else []))
        return [k for k in changed if any(k == m or k.startswith(f"{m}.") for m in mine)]


def _w(name: str, family: str, role: str, privileged: bool, module: str, cls: str, probe: str) -> WorkerInfo:
    package = f"cnisup.workers.{family}"
    return WorkerInfo(name, family, role, privileged, f"{package}.{module}:{cls}", f"{package}.probes:{probe}")


FAMILIES: dict[str, Family] = {
    # First: the supervisor starts the other families once the journal listens.
    "journal": Family(
        name="journal",
        primary=_w("journal", "journal", "primary", False, "writer", "JournalWorker", "journal"),
        # The same writer on a smaller file in the runtime dir, when journal.path is unusable.
        fallback=_w("journal-runtime", "journal", "fallback", False, "writer", "RuntimeJournalWorker",
                    "journal_runtime"),
        enabled_key="journal.enabled",
        prefer_key=None,
        reads=("journal", "workers.ready_timeout"),
    ),
    "config": Family(
        name="config",
        primary=_w("inotify", "config", "primary", False, "inotify", "InotifyWorker", "inotify"),
        fallback=_w("file-poll", "config", "fallback", False, "filepoll", "FilePollWorker", "file_poll"),
        enabled_key="monitors.config",
        prefer_key="use_inotify",
        reads=("cni", "fallback.file_poll_interval"),
    ),
    "kernel": Family(
        name="kernel",
        primary=_w("ebpf", "kernel", "primary", True, "ebpf", "EbpfWorker", "ebpf"),
        # Privileged too: /proc/<pid>/environ of plugins run by root (the
        # runtime's CNI_* variables) is readable only with root's ptrace access.
        fallback=_w("proc-poll", "kernel", "fallback", True, "procpoll", "ProcPollWorker", "proc_poll"),
        enabled_key="monitors.kernel",
        prefer_key="use_ebpf",
        reads=("cni.bin_dirs", "fallback.process_poll_interval"),
    ),
    "k8s": Family(
        name="k8s",
        primary=_w("k8s-informer", "k8s", "primary", False, "informer", "K8sInformerWorker", "informer"),
        fallback=_w("kubectl", "k8s", "fallback", False, "kubectl", "KubectlWorker", "kubectl"),
        enabled_key="monitors.k8s",
        prefer_key="use_k8s_informer",
        reads=("kubernetes",),
    ),
    # After the journal, whose file it reads.
    "export": Family(
        name="export",
        primary=_w("nats", "export", "primary", False, "nats", "NatsExportWorker", "nats"),
        fallback=None,  # another transport would be another family; without NATS it waits and reports lag
        enabled_key="export.enabled",
        prefer_key=None,
    ),
}

WORKERS: dict[str, WorkerInfo] = {
    w.name: w for f in FAMILIES.values() for w in (f.primary, f.fallback) if w is not None
}
