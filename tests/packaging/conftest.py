"""The packaging tests run last (tests/ in name order): start what the nspawn
test will need, its Debian rootfs, as soon as the session knows it runs."""

from __future__ import annotations

import pytest


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        if item.path.name == "test_nspawn.py":
            getattr(item, "module").prebuild()  # noqa: B009 - pytest.Item has no typed .module
            return
