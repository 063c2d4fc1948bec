"""Fixtures of the k8s family tests: an API-server emulator per test, a
kubeconfig for it that the workers user (nobody) can read, and a per-test
kubectl cache dir."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import world_dir

from .apiserver import ApiServer


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
