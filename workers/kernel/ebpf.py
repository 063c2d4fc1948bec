"""Kernel family, primary worker: every CNI plugin run, seen by BPF.

``kernel.capture`` chooses the program:

* ``lean`` (default, ``lean.py`` + ``lean.bpf.c``): sched/task tracepoints
  only in the steady state, the environment and exit code read from the
  task, link/address changes from rtnetlink listeners, stdout/stderr from a
  write tracepoint attached only while a plugin runs. No tax on the node's
  other processes.
* ``full`` (``full.py`` + ``cnirun.bpf.c``): always-on syscall tracepoints,
  for stdin (the network config) and the netlink requests themselves; every
  syscall on the node pays for it (``features.TAX``).

What both share is here: compiling with BCC, the bin-dir map, liveness of a
run's process.
"""

from __future__ import annotations

import abc
import ctypes as ct
import os
import time
from pathlib import Path
from typing import Any, Protocol

from cnisup.workers.base import Worker, WorkerContext
from cnisup.workers.errors import CapabilityMissing
from cnisup.workers.kernel.features import TAX

PATH_MAX = 256  #: struct dir_key in both programs (a power of two: the verifier masks with it)
MAX_BIN_DIRS = 64  #: entries of the bin_dirs map


class Capture(Protocol):
    def run(self) -> None: ...


class RingConsumer(abc.ABC):
    """What both captures share: records off the ring buffer into ``_handle``,
    kernel clocks to wall clock, the program's loss counter."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.boot_to_wall = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self.counts: dict[str, int] = {"decode_errors": 0}
        self.kernel_dropped = 0
        self.bpf: Any = None
        self._table: Any = None
        self._data_offset = 0
        self._seen = 0

    @abc.abstractmethod
    def _handle(self, e: Any, payload: bytes) -> None:
        """One decoded ring-buffer record (the lean and full captures each decode their own)."""

    def _on_event(self, _ctx: Any, data: int, size: int) -> int:
        self._seen += 1
        if self._seen % 256 == 0:
            self.ctx.heartbeat()  # a long burst is consumed inside one call
        try:
            e = self._table.event(data)
            if not self._data_offset:
                self._data_offset = type(e).data.offset
            n = max(0, min(int(e.len), size - self._data_offset))
            self._handle(e, ct.string_at(data + self._data_offset, n))
        except Exception as exc:  # a bad record must never stop the loop
            self.counts["decode_errors"] += 1
            self.ctx.log.exception("cannot decode a kernel event: %s", exc)
        return 0

    def _wall(self, boot: int) -> int:
        return int(boot) + self.boot_to_wall

    def _check_loss(self) -> None:
        table = self.bpf["lost"]
        total, runs = int(sum(table.getvalue(table.Key(0)))), int(sum(table.getvalue(table.Key(1))))
        if total > self.kernel_dropped:
            self.ctx.warn("ringbuf_loss", f"{total - self.kernel_dropped} kernel event(s) lost: the ring buffer "
                          f"was full ({total} in this incarnation, of which {runs} plugin run start(s): "
                          "those runs are not reported at all)",
                          dropped=total - self.kernel_dropped, dropped_total=total, runs_lost_total=runs)
            self.kernel_dropped = total
            self.ctx.set_info(kernel_dropped=total, kernel_runs_lost=runs)


class EbpfWorker(Worker):
    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        mode = ctx.config.kernel.capture
        ctx.set_info(capture=mode, tax=TAX[mode])
        if mode == "full":
            from cnisup.workers.kernel.full import FullCapture

            self.capture: Capture = FullCapture(ctx)
        else:
            from cnisup.workers.kernel.lean import LeanCapture

            self.capture = LeanCapture(ctx)

    def run(self) -> None:
        self.capture.run()


def compile_program(source: Path, cflags: list[str]) -> tuple[Any, float]:
    """(the loaded BPF object, seconds it took). BCC is imported here only:
    importing it maps libbcc and LLVM."""
    from bcc import BPF

    t0 = time.monotonic()
    try:
        # -I: the programs share bin_dir.h beside them.
        bpf = BPF(src_file=str(source).encode(), cflags=[*cflags, f"-I{source.parent}"])
    except Exception as exc:  # BCC raises bare Exception for compile and verifier errors
        raise CapabilityMissing(f"the kernel refused the BPF program: {exc}") from exc
    return bpf, time.monotonic() - t0


def release_compiler(bpf: Any) -> None:
    """Give back clang/LLVM's memory once the program is loaded (~25 MB)."""
    bpf.free_bcc_memory()
    try:
        ct.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fill_bin_dirs(bpf: Any, bin_dirs: list[str]) -> list[tuple[str, str]]:
    """Write each bin dir (and its real path) into the program's ``bin_dirs``
    map; returns warnings (code, message) for what could not be."""
    table = bpf["bin_dirs"]
    warnings: list[tuple[str, str]] = []
    dirs: list[str] = []
    for d in bin_dirs:
        for variant in (d.rstrip("/") or "/", os.path.realpath(d)):
            if variant not in dirs:
                dirs.append(variant)
    for d in dirs[:MAX_BIN_DIRS]:
        raw = d.encode()
        if len(raw) >= PATH_MAX - 1:
            warnings.append(("bin_dir_too_long", f"{d}: longer than {PATH_MAX - 2} bytes, not traced"))
            continue
        key = table.Key()
        ct.memmove(ct.addressof(key), raw, len(raw))
        table[key] = ct.c_ubyte(1)
    if len(dirs) > MAX_BIN_DIRS:
        warnings.append(("too_many_bin_dirs", f"only the first {MAX_BIN_DIRS} bin dirs are traced"))
    return warnings


def alive_since(pid: int, start_boot_ns: int) -> bool:
    """Is ``pid`` still the process that started at ``start_boot_ns``?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return False
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    # The process forked before it exec'd the plugin; a later process with the
    # same pid started after. One clock tick of slack for the tick rounding.
    return start_ticks * tick_ns <= start_boot_ns + tick_ns
