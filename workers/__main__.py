"""Exec target of every worker: ``python -m cnisup.workers <name>``.

Order matters: drop privileges first (before any socket or thread exists),
arm the parent-death signal (the credential change clears it), audit the
result, rebuild the configuration, probe, and only then connect to the bus.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import traceback

from cnisup.protocol import envelope, exitcodes, reach
from cnisup.protocol.settings import Config, ConfigError
from cnisup.workers import logs, privileges
from cnisup.workers.errors import CapabilityMissing, WorkerConfigError
from cnisup.workers.spec import STATUS_FD_ENV, WorkerSpec, status_line


class _Exit(Exception):
    """Leave with ``code``, telling the supervisor why."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _say_exit(status_fd: int, code: int, reason: str) -> int:
    try:
        os.write(status_fd, status_line("exit", code=code, reason=reason))
    except OSError:
        pass
    return code


def _become(spec: WorkerSpec) -> None:
    """Drop to the spec's identity and check that it holds (fail closed)."""
    if spec.identity is not None:
        try:
            privileges.drop_to(spec.identity.uid, spec.identity.gid)
        except privileges.PrivilegeError as exc:
            raise _Exit(exitcodes.EX_NOPERM, str(exc)) from exc
    privileges.die_with_parent(spec.supervisor_pid)
    if spec.identity is not None and (problems := privileges.audit(spec.identity)):
        raise _Exit(exitcodes.EX_NOPERM, "privilege audit failed: " + "; ".join(problems))


def _check_bus(endpoint: str) -> None:
    """Connect once to the bus's ipc socket: ZeroMQ's own connect is asynchronous
    and silent, so a worker that may not reach the bus would wait out the ready
    timeout without a word. Say why at once instead: EACCES/EPERM is a missing
    privilege (77: the supervisor starts the fallback, then re-probes), anything
    else a crash (70: restarted with backoff)."""
    if (exc := reach.unreachable(endpoint)) is not None:
        code = exitcodes.EX_NOPERM if exc.errno in (errno.EACCES, errno.EPERM) else exitcodes.EX_SOFTWARE
        raise _Exit(code, f"the bus: {reach.describe(endpoint, exc)} as uid {os.geteuid()}")


def _stop_pipe() -> int:
    """SIGTERM only makes this pipe readable; the worker's loop decides what to do."""
    stop_r, stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.set_wakeup_fd(stop_w)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return stop_r


def _run(spec: WorkerSpec, cfg: Config, status_fd: int) -> None:
    from cnisup.workers.base import WorkerContext
    from cnisup.workers.bus import Bus
    from cnisup.workers.registry import WORKERS

    info = WORKERS[spec.name]
    probe = info.probe()(cfg)  # the same probe `cnisup check` ran
    if not probe.ok:
        raise CapabilityMissing(probe.reason)
    _check_bus(spec.bus_endpoint)
    stamp = envelope.Stamp(source=spec.name, node=cfg.node_name, incarnation=spec.incarnation)
    bus = Bus(spec.bus_endpoint, stamp, sndhwm=cfg.workers.bus_hwm)
    try:
        ctx = WorkerContext(info, cfg, bus, status_fd, _stop_pipe())
        worker = info.load()(ctx)
        bus.wait_ready(cfg.workers.ready_timeout)
        worker.prepare()
        ctx.status("ready", pid=os.getpid())
        ctx.heartbeat(force=True)
        worker.run()
        ctx.heartbeat(force=True)
    finally:
        bus.close()


def main(argv: list[str]) -> int:
    spec = WorkerSpec.from_env()
    status_fd = int(os.environ[STATUS_FD_ENV])
    os.set_blocking(status_fd, False)
    if len(argv) != 2 or argv[1] != spec.name:
        return _say_exit(status_fd, exitcodes.EX_CONFIG, f"argv {argv[1:]} does not match spec {spec.name}")
    log = logging.getLogger(f"cnisup.{spec.name}")
    try:
        _become(spec)
        try:
            cfg = Config.from_dict(spec.config)
        except ConfigError as exc:
            raise _Exit(exitcodes.EX_CONFIG, str(exc)) from exc
        logs.setup(cfg.log_level, f"{spec.name}[%(process)d]")
        _run(spec, cfg, status_fd)
    except _Exit as exc:
        log.error("%s", exc)  # its own line, at once: the supervisor's line comes with its exit
        return _say_exit(status_fd, exc.code, str(exc))
    except CapabilityMissing as exc:
        log.error("cannot run: %s", exc)
        return _say_exit(status_fd, exitcodes.EX_NOPERM, str(exc))
    except WorkerConfigError as exc:
        log.error("configuration error: %s", exc)
        return _say_exit(status_fd, exitcodes.EX_CONFIG, str(exc))
    except Exception as exc:  # a crash: its traceback to the log, one line to the supervisor
        log.error("crashed:\n%s", traceback.format_exc())
        return _say_exit(status_fd, exitcodes.EX_SOFTWARE, f"{type(exc).__name__}: {exc}")
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
