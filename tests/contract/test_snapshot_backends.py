"""Every snapshot backend against the shared contract, each on a real filesystem of its kind."""

from __future__ import annotations

import pytest

from tests.contract.snapshot_suite import PostgresOnClone, SnapshotContract

pytestmark = [pytest.mark.contract, pytest.mark.root]


class TestSnapshotBackends(SnapshotContract):
    pass


@pytest.mark.integration
class TestPostgresOnSnapshotClones(PostgresOnClone):
    pass
