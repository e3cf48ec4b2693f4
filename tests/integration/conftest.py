"""Fixtures shared by integration modules: stores on real copy-on-write filesystems, a browser."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.contract.snapshot_fixtures import loop_fs, unmount_all
from tests.integration.browser_support import CALL_FAILED, browser, dashboard  # noqa: F401
from tests.integration.oidc_support import op  # noqa: F401  (the OpenID Provider of a test)


@pytest.fixture(params=["overlayfs", "btrfs"])
def cow_store(request: pytest.FixtureRequest, pg_dir: Path) -> Iterator[tuple[str, Path]]:
    """(backend, store dir) for backends whose states share layers or blocks (root only)."""
    kind: str = request.param
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {kind} mounts")
    if kind == "btrfs":
        with loop_fs("btrfs", "1G") as mnt:
            yield kind, mnt / "store"
        return
    try:
        yield kind, pg_dir / "cow-store"
    finally:
        unmount_all(pg_dir / "cow-store")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember whether a test's body failed, for fixtures that keep evidence (screenshots)."""
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report
