"""How the supervisor and its workers log: to stderr, one record per line.

Under systemd, stderr is a stream into the journal ($JOURNAL_STREAM names it).
There every line starts with its syslog priority (``<3>``, sd-daemon(3)'s
prefix), so ``journalctl -p warning`` finds warnings and errors, and carries
no timestamp of its own: the journal stamps each line. Elsewhere lines carry
a timestamp and the level's name.
"""

from __future__ import annotations

import logging
import os
import sys

#: Python's levels as syslog priorities.
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def to_journal(stream_fd: int = 2) -> bool:
    """Is ``stream_fd`` the journal stream systemd gave us (not a later redirect)?"""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream_fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """``<N>`` before every line of a record (a traceback's lines too)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup(level: str, name: str) -> None:
    """Log at ``level`` to stderr; ``name`` is how lines name their sender
    (a ``logging`` format: ``%(name)s``, or a worker's ``ebpf[%(process)d]``)."""
    handler = logging.StreamHandler(sys.stderr)
    if to_journal():
        handler.setFormatter(JournalFormatter(f"{name}: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {name}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
