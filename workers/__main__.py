"""Exec target of every worker: ``python -m cnisup.workers <name>``.

Order matters: drop privileges first (before any socket or thread exists),
arm the parent-death signal (the credential change clears it), audit the
result, and only then connect to the bus.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

from cnisup.protocol import envelope, exitcodes
from cnisup.workers import privileges
from cnisup.workers.spec import STATUS_FD_ENV, WorkerSpec, status_line


def _exit(status_fd: int, code: int, reason: str) -> int:
    try:
        os.write(status_fd, status_line("exit", code=code, reason=reason))
    except OSError:
        pass
    return code


def main(argv: list[str]) -> int:
    spec = WorkerSpec.from_env()
    status_fd = int(os.environ[STATUS_FD_ENV])
    os.set_blocking(status_fd, False)
    if len(argv) != 2 or argv[1] != spec.name:
        return _exit(status_fd, exitcodes.EX_CONFIG, f"argv {argv[1:]} does not match spec {spec.name}")

    if spec.identity is not None:
        try:
            privileges.drop_to(spec.identity.uid, spec.identity.gid)
        except privileges.PrivilegeError as exc:
            return _exit(status_fd, exitcodes.EX_NOPERM, str(exc))
    privileges.die_with_parent(spec.supervisor_pid)
    if spec.identity is not None:
        expected = privileges.Identity(spec.identity.uid, spec.identity.gid,
                                       spec.identity.groups, spec.identity.bounding_must_be_empty)
        problems = privileges.audit(expected)
        if problems:  # fail closed
            return _exit(status_fd, exitcodes.EX_NOPERM, "privilege audit failed: " + "; ".join(problems))

    logging.basicConfig(
        level=spec.log_level.upper(), stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {spec.name}[%(process)d] %(message)s",
    )
    log = logging.getLogger(f"cnisup.{spec.name}")

    # SIGTERM only wakes the main loop through this pipe; the loop decides.
    stop_r, stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.set_wakeup_fd(stop_w)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    from cnisup.workers.base import WorkerContext
    from cnisup.workers.bus import Bus, BusNotReady
    from cnisup.workers.errors import CapabilityMissing, WorkerConfigError
    from cnisup.workers.registry import WORKERS

    stamp = envelope.Stamp(source=spec.name, node=spec.node, incarnation=spec.incarnation)
    bus = Bus(spec.bus_endpoint, stamp, sndhwm=spec.sndhwm)
    ctx = WorkerContext(spec, bus, status_fd, stop_r)
    code = exitcodes.OK
    try:
        worker = WORKERS[spec.name].load()(ctx)
        bus.wait_ready(spec.ready_timeout_s)
        ctx.status("ready", pid=os.getpid())
        ctx.heartbeat(force=True)
        worker.run()
        ctx.heartbeat(force=True)
    except CapabilityMissing as exc:
        log.error("cannot run: %s", exc)
        code = _exit(status_fd, exitcodes.EX_NOPERM, str(exc))
    except WorkerConfigError as exc:
        log.error("configuration error: %s", exc)
        code = _exit(status_fd, exitcodes.EX_CONFIG, str(exc))
    except BusNotReady as exc:
        log.error("%s", exc)
        code = _exit(status_fd, exitcodes.EX_SOFTWARE, str(exc))
    except Exception as exc:
        log.error("crashed:\n%s", traceback.format_exc())
        code = _exit(status_fd, exitcodes.EX_SOFTWARE, f"{type(exc).__name__}: {exc}")
    finally:
        bus.close()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
