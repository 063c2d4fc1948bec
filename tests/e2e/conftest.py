from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import Cnisup


@pytest.fixture
def base(world_tmp: Path) -> Path:
    """This test's world-traversable dir (tests/conftest.py's ``world_tmp``)."""
    return world_tmp


@pytest.fixture
def cnisup(base: Path) -> Iterator[Cnisup]:
    c = Cnisup(base)
    yield c
    if c.proc is not None and c.proc.poll() is None:
        c.stop()
