"""Fixtures of the export tests: real nats-server processes, shared per module
(each test gets a stream and subject prefix of its own, so tests do not see
each other's events)."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import natsserver
import pytest
from harness import world_dir
from support import Dest

_names = itertools.count(1)


@pytest.fixture
def dest() -> Dest:
    n = next(_names)
    return Dest(f"T{n}", f"t{n}")


def _need_server() -> None:
    if not natsserver.available():
        pytest.skip("nats-server is not installed (Debian's nats-server; scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def nats_dir() -> Iterator[Path]:
    d = world_dir("cnisup-nats-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def nats_single(nats_dir: Path) -> Iterator[natsserver.Server]:
    """One ``nats-server -js`` for the whole module."""
    _need_server()
    server = natsserver.single(nats_dir / "single")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def nats_cluster(nats_dir: Path) -> Iterator[natsserver.Cluster]:
    """Three JetStream servers, routes on loopback, for the whole module."""
    _need_server()
    cluster = natsserver.Cluster(nats_dir / "cluster").start()
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()
