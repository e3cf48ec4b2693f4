"""The short churn run (the long one is `benchmarks/churn.py --cycles 10000`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="instances run as the postgres user"),
]
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "churn.py"


@pytest.mark.timeout(600)
def test_500_mixed_cycles_leave_nothing_behind() -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--cycles", "500", "--workers", "4", "--seed", "3"],
        check=False, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    leaks = [line for line in r.stderr.splitlines() if line.startswith("LEAK")]
    assert r.returncode == 0, leaks or r.stderr[-3000:]
    report = json.loads(r.stdout[r.stdout.index("{") :])
    assert sum(report["by_kind"].values()) == 500 and report["failed"] == {}
    assert set(report["by_kind"]) == {
        "shared", "connection", "cancel", "half_startup", "vanish", "reset",
    }  # fmt: skip
    assert report["left"]["connection_instances"] == 0 and report["left"]["sessions"] == 0
