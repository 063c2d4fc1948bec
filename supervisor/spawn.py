"""Start one worker as a fresh interpreter (fork+exec via subprocess).

No ``preexec_fn`` (unsafe with threads; the proxy thread holds a ZeroMQ
context): the worker drops its own privileges as its first step, and
``start_new_session`` gives it a process group we can SIGKILL as a whole.
Exits are learned through a pidfd, never by polling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from cnisup.workers.spec import MAX_STATUS_LINE, SPEC_ENV, STATUS_FD_ENV, StatusError, WorkerSpec

#: Environment a worker inherits: nothing else of the supervisor's leaks to an
#: unprivileged process.
_PASS_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "KUBECONFIG",
             "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT",
             "JOURNAL_STREAM")  # their stderr is ours: under systemd, the journal (workers/logs.py)


@dataclass
class Child:
    spec: WorkerSpec
    popen: subprocess.Popen[bytes]
    pidfd: int
    status_fd: int  #: read end of the worker's status pipe (non-blocking)
    started: float = field(default_factory=time.monotonic)
    buffer: bytes = b""
    status_open: bool = True  #: False once the worker closed its end: stop polling it

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int) -> None:
        """Signal the worker itself (it handles SIGTERM gracefully)."""
        if self.popen.returncode is None:
            signal.pidfd_send_signal(self.pidfd, sig)

    def kill_group(self) -> None:
        """SIGKILL the worker's whole process group (it leads its own session)."""
        if self.popen.returncode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.signal(signal.SIGKILL)

    def read_status(self) -> list[bytes]:
        """The complete status lines readable now; ``StatusError`` when the
        worker sends a line longer than any status line."""
        try:
            chunk = os.read(self.status_fd, 65536)
        except BlockingIOError:
            return []
        if not chunk:
            self.status_open = False
            return []
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > MAX_STATUS_LINE:
            self.buffer = b""
            raise StatusError(f"a status line longer than {MAX_STATUS_LINE} bytes")
        return lines

    def reap(self) -> int:
        """Collect the exit status once the pidfd is readable; no zombie remains."""
        code = self.popen.wait()
        os.close(self.pidfd)
        os.close(self.status_fd)
        return code


def spawn(spec: WorkerSpec) -> Child:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_fd, False)
    env = {k: v for k, v in os.environ.items() if k in _PASS_ENV}
    env[SPEC_ENV] = spec.to_env()
    env[STATUS_FD_ENV] = str(write_fd)
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", "cnisup.workers", spec.name],
            env=env, pass_fds=(write_fd,), start_new_session=True,
            stdin=subprocess.DEVNULL, cwd="/", close_fds=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return Child(spec=spec, popen=popen, pidfd=os.pidfd_open(popen.pid), status_fd=read_fd)
