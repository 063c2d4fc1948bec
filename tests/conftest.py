"""Shared by every test folder: the ``root`` marker's skip, and fixtures that
run real worker processes through ``harness`` (importable from here because
this folder is on sys.path while its conftest is loaded)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import WorkerRun, world_dir


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root (CI runs as root)")


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A temp dir under /tmp that an unprivileged worker can traverse."""
    d = world_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_worker(world_tmp: Path) -> Iterator[Callable[..., WorkerRun]]:
    """``start_worker(name, config, identity=..., ...)`` runs one worker until
    the test ends; then it must stop cleanly on SIGTERM (exit 0) unless the
    test collected its exit itself, and what it sent must follow the protocol."""
    runs: list[WorkerRun] = []

    def start(name: str, config: dict[str, Any], **kw: Any) -> WorkerRun:
        run = WorkerRun(name, config, tmp=world_tmp, **kw)
        runs.append(run)
        return run.start()

    yield start
    failures = []
    for run in runs:
        try:
            if run.proc is not None and run.proc.poll() is None:
                code = run.stop()
                if code != 0:
                    failures.append(f"{run.name} exited {code} on SIGTERM\n{run.stderr()}")
            if run.problems:
                failures.append(f"{run.name} protocol problems: {run.problems[:5]}")
        finally:
            run.close()
    if failures:
        pytest.fail("\n".join(failures))
