"""Config family, fallback worker: stat every entry of the conf and bin dirs
every ``fallback.file_poll_interval`` seconds.

A file is read again only when its (size, mtime_ns, ino, ctime_ns) changed; one
modified less than QUIET_S ago may still be being written, so it is looked at
again as soon as it has been quiet that long, not a whole interval later. What
to report is ``events.Engine``'s job, shared with the inotify worker.
"""

from __future__ import annotations

import time

from cnisup.workers.base import Worker
from cnisup.workers.config.events import Engine, shown


class FilePollWorker(Worker):
    def run(self) -> None:
        ctx = self.ctx
        engine = Engine(ctx, ctx.config.cni)
        interval = ctx.config.fallback.file_poll_interval
        ctx.set_info(polled_dirs=[shown(d) for d in engine.dirs], poll_interval_s=interval)
        if not engine.initial_scan(ctx.sleep):
            return
        next_tick = time.monotonic() + interval
        while not ctx.stopping:
            ctx.wait(timeout_s=min(next_tick, engine.next_due() or next_tick) - time.monotonic())
            if time.monotonic() >= next_tick:
                for d in engine.dirs:
                    engine.scan_dir(d, hold_fresh=True, use_cache=True)
                next_tick += interval
                if next_tick <= time.monotonic():  # a scan longer than the interval: no catch-up burst
                    next_tick = time.monotonic() + interval
            engine.run_due()
            ctx.set_info(files_known=engine.files_known)
