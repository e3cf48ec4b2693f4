"""Fixtures for the contract suites."""

from tests.contract.snapshot_fixtures import (
    backend_case,
    btrfs_mount,
    xfs_mount,
    zfs_store_pool,
)

__all__ = ["backend_case", "btrfs_mount", "xfs_mount", "zfs_store_pool"]
