"""Config family, primary worker: inotify on the conf and bin dirs.

This module decides only *which* paths to look at again and *when*; what to
report is ``events.Engine``'s job, shared with file-poll.

* A regular file is read once it is closed after writing (IN_CLOSE_WRITE), or
  after QUIET_S without IN_MODIFY for writers that keep it open; a new name
  only after SETTLE_S, so a temp file renamed away at once is never reported.
* A dir that does not exist yet: its nearest existing ancestor is watched
  until the next path component appears, checked again after each watch is
  added (``mkdir -p`` may be faster than we are).
* A watched dir deleted or moved (IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED):
  its files are reported deleted and the ancestor is watched again.
* ENOSPC (fs.inotify.max_user_watches reached): that dir is polled by stat
  every ``fallback.file_poll_interval`` and the watch retried each time.
* IN_Q_OVERFLOW: everything is rescanned; the engine reports what was missed.
* Every RESCAN_MIN_S (or the poll interval, if longer) a stat-only rescan
  catches what no event tells: a parent dir renamed, a symlink whose target
  in another dir changed.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

from inotify_simple import INotify, flags

from cnisup.workers.base import Worker, WorkerContext
from cnisup.workers.config.events import QUIET_S, SETTLE_S, Engine, shown
from cnisup.workers.config.probes import init_failure, inotify_limits
from cnisup.workers.errors import CapabilityMissing

_DIR_MASK = (flags.CREATE | flags.DELETE | flags.MODIFY | flags.CLOSE_WRITE | flags.ATTRIB
             | flags.MOVED_FROM | flags.MOVED_TO | flags.DELETE_SELF | flags.MOVE_SELF
             | flags.ONLYDIR | flags.EXCL_UNLINK)
#: An ancestor only has to tell when the next component appears or it goes away.
_ANC_MASK = flags.CREATE | flags.MOVED_TO | flags.DELETE_SELF | flags.MOVE_SELF | flags.ONLYDIR
_SELF_GONE = flags.DELETE_SELF | flags.MOVE_SELF | flags.IGNORED
_NAME_GONE_OR_NEW = flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO
#: The safety-net rescan is stat-only; ten minutes bound how stale a change that
#: inotify cannot tell (a parent renamed, a symlink's target elsewhere) gets, at a
#: few wake-ups an hour when idle.
RESCAN_MIN_S = 600.0
#: A path that keeps appearing and vanishing while we resolve it is polled instead.
_MAX_RESOLVE_STEPS = 64


def _next_name(ancestor: str, d: str) -> str:
    return os.path.relpath(d, ancestor).split(os.sep)[0]


def _ident(d: str) -> tuple[int, int] | None:
    try:
        st = os.stat(d)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass
class _Target:
    """How one configured dir is followed."""

    mode: str = "new"  #: "watched", "waiting" (for ``ancestor``) or "polled"
    ancestor: str | None = None
    ident: tuple[int, int] | None = None  #: (dev, ino) the watch is on


class InotifyWorker(Worker):
    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        self.poll_interval = ctx.config.fallback.file_poll_interval
        self.engine = Engine(ctx, ctx.config.cni)
        self.limits = inotify_limits()
        self._targets = {d: _Target() for d in self.engine.dirs}
        self._path_wd: dict[str, int] = {}
        self._wd_paths: dict[int, set[str]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._relink: set[str] = set()  #: dirs whose symlinks to look at after this batch
        self._ino: Any = None

    def run(self) -> None:
        ctx = self.ctx
        ctx.set_info(**self.limits)
        try:
            self._ino = INotify(nonblocking=True)
        except OSError as exc:  # the probe succeeded a moment ago: another process took the last one
            raise CapabilityMissing(init_failure(exc, self.limits)) from exc
        with self._ino:
            for d in self.engine.dirs:
                self._resolve(d, scan=False)  # the initial scan follows, after every watch
            if self.engine.initial_scan(ctx.sleep):
                self._loop()

    def _loop(self) -> None:
        ctx, engine = self.ctx, self.engine
        interval = self.poll_interval
        now = time.monotonic()
        next_poll, next_rescan = now + interval, now + max(RESCAN_MIN_S, interval)
        fd = self._ino.fileno()
        while not ctx.stopping:
            self._set_info()
            wakes = [next_rescan, engine.next_due() or next_rescan]
            if self._polled():
                wakes.append(next_poll)
            if ctx.wait([fd], timeout_s=min(wakes) - time.monotonic()):
                self._handle(self._ino.read(timeout=0))
            now = time.monotonic()
            if now >= next_rescan:
                self._rescan()
                next_rescan = now + max(RESCAN_MIN_S, interval)
            if now >= next_poll:
                for d in self._polled():
                    self._resolve(d)  # retries the watch; polls again if it still fails
                next_poll = now + interval
            engine.run_due()

    # -- events ------------------------------------------------------------------
    def _handle(self, events: list[Any]) -> None:
        resolve: set[str] = set()
        overflow = False
        for ev in events:
            self.ctx.heartbeat()
            if ev.mask & flags.Q_OVERFLOW:
                overflow = True
                continue
            paths = self._wd_paths.get(ev.wd)
            if not paths:
                continue  # a watch we already dropped
            if ev.mask & _SELF_GONE:
                resolve |= self._lost(ev.wd, removed=bool(ev.mask & flags.IGNORED))
                continue
            for d, t in self._targets.items():
                if t.mode == "watched" and d in paths:
                    self._file_event(d, ev)
                if (t.mode == "waiting" and t.ancestor in paths and ev.mask & (flags.CREATE | flags.MOVED_TO)
                        and ev.name == _next_name(t.ancestor, d)):
                    resolve.add(d)
        for d in self.engine.dirs:
            if d in resolve:
                self._resolve(d)
            if d in self._relink:
                self.engine.schedule_links(d, SETTLE_S)
        self._relink.clear()
        if overflow:
            self.ctx.warn("inotify_queue_overflow",
                          f"inotify event queue overflowed (fs.inotify.max_queued_events="
                          f"{self.limits['max_queued_events']}); rescanning every directory")
            self._rescan()

    def _file_event(self, d: str, ev: Any) -> None:
        if not ev.name:
            return  # about the dir itself
        path, mask = os.path.join(d, ev.name), ev.mask
        engine = self.engine
        known = engine.knows(path)
        if mask & _NAME_GONE_OR_NEW and not known:
            self._relink.add(d)  # a ``..data``-style swap retargets symlinks
        if mask & flags.ISDIR:
            if known:
                engine.schedule(path, 0)  # a file replaced by a directory
            return
        if not engine.kinds(path):
            return
        if mask & (flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO):
            engine.schedule(path, 0)
        elif mask & flags.CLOSE_WRITE:
            engine.schedule(path, 0 if known else SETTLE_S)
        elif mask & flags.MODIFY:
            engine.schedule(path, QUIET_S, push=True)
        elif mask & flags.CREATE:
            try:
                regular = stat.S_ISREG(os.lstat(path).st_mode)
            except OSError:
                regular = False
            # A writer has a new regular file open: wait for its close (or quiet).
            engine.schedule(path, QUIET_S if regular else SETTLE_S, push=regular)
        elif mask & flags.ATTRIB and not engine.pending(path):
            engine.schedule(path, 0 if known else SETTLE_S)

    def _lost(self, wd: int, *, removed: bool) -> set[str]:
        """The watched inode went away (or moved): forget the watch; return the
        targets that must be resolved again."""
        paths = self._wd_paths.pop(wd, set())
        for p in paths:
            if self._path_wd.get(p) == wd:
                del self._path_wd[p]
        if not removed:
            self._rm_watch(wd)  # after a move the watch would follow the old dir
        return {d for d, t in self._targets.items()
                if (t.mode == "watched" and d in paths) or (t.mode == "waiting" and t.ancestor in paths)}

    # -- watches -----------------------------------------------------------------
    def _resolve(self, d: str, *, scan: bool = True) -> None:
        """Watch ``d``, else its nearest existing ancestor, else poll it."""
        t = self._targets[d]
        for _ in range(_MAX_RESOLVE_STEPS):
            err = self._add(d, _DIR_MASK)
            if err == 0:
                t.mode, t.ancestor, t.ident = "watched", None, _ident(d)
                self._warned = {w for w in self._warned if w[0] != d}
                break
            if err not in (errno.ENOENT, errno.ENOTDIR):
                self._poll(d, err)
                break
            ancestor, err = self._watch_ancestor(d)
            if ancestor is None:
                self._poll(d, err)
                break
            t.mode, t.ancestor, t.ident = "waiting", ancestor, None
            # Did the next component appear before the watch was there?
            if not os.path.isdir(os.path.join(ancestor, _next_name(ancestor, d))):
                break
        else:
            self._poll(d, errno.ELOOP)
        self._gc()
        if scan:
            self.engine.scan_dir(d, hold_fresh=True, use_cache=True)

    def _watch_ancestor(self, d: str) -> tuple[str | None, int]:
        p, err = d, errno.ENOENT
        while (parent := os.path.dirname(p)) != p:
            p = parent
            err = self._add(p, _ANC_MASK)
            if err == 0:
                return p, 0
            if err not in (errno.ENOENT, errno.ENOTDIR):
                break  # EACCES: we could not see inside it anyway
        return None, err

    def _poll(self, d: str, err: int) -> None:
        t = self._targets[d]
        t.mode, t.ancestor, t.ident = "polled", None, None
        every = f"polling it every {self.poll_interval:g} s"
        if err == errno.ENOSPC:
            code = "inotify_watch_limit"
            message = (f"cannot watch {shown(d)}: fs.inotify.max_user_watches="
                       f"{self.limits['max_user_watches']} reached; {every}")
        else:
            code = "inotify_watch_failed"
            message = f"cannot watch {shown(d)}: {os.strerror(err)}; {every}"
        if (d, code) not in self._warned:
            self._warned.add((d, code))
            self.ctx.warn(code, message, path=shown(d))

    def _polled(self) -> list[str]:
        return [d for d, t in self._targets.items() if t.mode == "polled"]

    def _add(self, path: str, mask: int) -> int:
        """Add (or extend: IN_MASK_ADD, masks only grow) a watch; 0 or the errno."""
        try:
            wd: int = self._ino.add_watch(path, mask | flags.MASK_ADD)
        except OSError as exc:
            return exc.errno or errno.EIO
        old = self._path_wd.get(path)
        if old is not None and old != wd:  # the path now names another inode
            self._forget(path, old)
        self._path_wd[path] = wd
        self._wd_paths.setdefault(wd, set()).add(path)
        return 0

    def _forget(self, path: str, wd: int) -> None:
        self._path_wd.pop(path, None)
        paths = self._wd_paths.get(wd, set())
        paths.discard(path)
        if not paths:
            self._wd_paths.pop(wd, None)
            self._rm_watch(wd)

    def _rm_watch(self, wd: int) -> None:
        try:
            self._ino.rm_watch(wd)
        except OSError:
            pass  # already gone with its inode

    def _gc(self) -> None:
        """Drop the watches no target needs any more."""
        needed = {d for d, t in self._targets.items() if t.mode == "watched"}
        needed |= {t.ancestor for t in self._targets.values() if t.mode == "waiting" and t.ancestor}
        for p, wd in list(self._path_wd.items()):
            if p not in needed:
                self._forget(p, wd)

    def _rescan(self) -> None:
        for d in self.engine.dirs:
            t = self._targets[d]
            if t.mode == "watched" and t.ident is not None and t.ident == _ident(d):
                self.engine.scan_dir(d, hold_fresh=True, use_cache=True)
                continue
            # Not watched, or the path names another dir now (a parent was moved):
            # watch what is there; the scan reports the difference.
            self._resolve(d)

    def _set_info(self) -> None:
        ts = self._targets.items()
        self.ctx.set_info(
            watched_dirs=[shown(d) for d, t in ts if t.mode == "watched"],
            waiting_dirs={shown(d): shown(t.ancestor or "") for d, t in ts if t.mode == "waiting"},
            polled_dirs=[shown(d) for d, t in ts if t.mode == "polled"],
            watches=len(self._wd_paths),
            files_known=self.engine.files_known,
        )
