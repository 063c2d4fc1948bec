"""Can the kernel family's workers run here? (``WorkerInfo.probe``)"""

from __future__ import annotations

import os
from typing import Any

from cnisup.protocol.settings import Config
from cnisup.workers.kernel import features
from cnisup.workers.probe import Probe, dirs_state


def ebpf(cfg: Config) -> Probe:
    capture = cfg.kernel.capture
    host = features.check(capture=capture)
    # What the capture costs every other process, said wherever it is chosen.
    return Probe(host.ok, host.reason, {**host.details, "tax": features.TAX[capture],
                                        "bin_dirs": dirs_state(cfg.cni.bin_dirs)})


def proc_poll(cfg: Config) -> Probe:
    details: dict[str, Any] = {"interval_s": cfg.fallback.process_poll_interval,
                               "bin_dirs": dirs_state(cfg.cni.bin_dirs)}
    if not os.path.isdir("/proc/self"):
        return Probe(False, "/proc is not mounted", details)
    details["environ"] = ("readable for every process" if os.geteuid() == 0
                          else "only this user's processes: CNI_* of root's plugin runs are missing")
    details["misses"] = "runs that start and end between two scans; changes in other network namespaces"
    return Probe(True, "/proc scanning needs nothing", details)
