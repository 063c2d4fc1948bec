"""Fixtures of the k8s family tests: an API-server emulator per test, a
kubeconfig for it that the workers user (nobody) can read, a per-test
temp dir, and ``run_worker`` (one worker through the harness, as nobody
when root, stopped and checked at the end)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import WorkerRun, world_dir

from .apiserver import ApiServer
from .support import identity


@pytest.fixture
def k8s_tmp() -> Iterator[Path]:
    d = world_dir("cnisup-k8s-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def api() -> Iterator[ApiServer]:
    server = ApiServer(bookmark_interval_s=1.0).start()
    yield server
    server.stop()


@pytest.fixture
def kubeconfig(api: ApiServer, k8s_tmp: Path) -> Path:
    return api.write_kubeconfig(k8s_tmp / "kubeconfig")


@pytest.fixture
def run_worker(k8s_tmp: Path) -> Iterator[Callable[[str, dict[str, Any]], WorkerRun]]:
    runs: list[WorkerRun] = []

    def start(name: str, config: dict[str, Any]) -> WorkerRun:
        run = WorkerRun(name, config, tmp=k8s_tmp, identity=identity(), heartbeat_interval_s=0.5)
        runs.append(run)
        return run.start(ready_timeout_s=15)

    yield start
    for run in runs:
        try:
            if run.proc is not None and run.proc.poll() is None:
                assert run.stop() == 0, run.stderr()
            assert not run.problems, run.problems[:5]
        finally:
            run.close()
