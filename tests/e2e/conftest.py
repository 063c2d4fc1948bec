from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import Cnisup, world_dir

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


@pytest.fixture
def base() -> Iterator[Path]:
    import shutil
    d = world_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cnisup(base: Path) -> Iterator[Cnisup]:
    c = Cnisup(base)
    yield c
    if c.proc is not None and c.proc.poll() is None:
        c.stop()
