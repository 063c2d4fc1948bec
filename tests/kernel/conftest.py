"""Fixtures of the kernel family tests: a bin dir of real reference plugins
(helpers shared by the modules are in ``kernel_support``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cni import install_plugins
from harness import world_dir


@pytest.fixture(scope="module")
def kernel_tmp() -> Iterator[Path]:
    d = world_dir("cnisup-kernel-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def bin_dir(kernel_tmp: Path) -> Path:
    d = kernel_tmp / "bin"
    install_plugins(d)
    return d
