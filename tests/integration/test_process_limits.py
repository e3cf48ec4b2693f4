"""`sqlrs serve` lifts its open-files limit, and says so when even the hard limit is short."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

CHILD = """
import resource, sys
from taidon_proxy.cli.limits import raise_open_files
soft, hard = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print("limit", raise_open_files(int(sys.argv[3])), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def run(soft: int, hard: int, instances_max: int) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(soft), str(hard), str(instances_max)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout + out.stderr


def test_the_soft_limit_is_lifted_to_the_hard_one() -> None:
    out = run(256, 4096, 50)
    assert "limit 4096 4096" in out
    assert "open_files_low" not in out


def test_a_hard_limit_too_low_for_instances_max_is_named() -> None:
    out = run(300, 300, 200)  # 200 instances need 256 + 4 * 200 descriptors
    assert "limit 300 300" in out
    assert "limits.open_files_low" in out and "needed=1056" in out and "instances_max=200" in out
