"""`python -m taidon_proxy.k8s` as a subprocess: bad settings stop it with the variable named."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "TAIDON_IMAGE (the instance pods' Postgres image) is required"),
        ({"TAIDON_IMAGE": "pg", "TAIDON_TEAM_QUOTAS": "a:3"}, "expected team=N[,team=N]"),
    ],
)
def test_controller_refuses_bad_settings(env: dict[str, str], message: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TAIDON_")}
    done = subprocess.run(
        [sys.executable, "-m", "taidon_proxy.k8s"],
        env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
