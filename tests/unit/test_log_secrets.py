"""The suite-wide log check finds a registered secret in a line the proxy logs."""

from __future__ import annotations

import pytest
import structlog

from tests import log_secrets

pytestmark = pytest.mark.unit


def test_a_logged_secret_is_found_and_an_ordinary_line_is_not() -> None:
    log_secrets.register("s3cr3t-for-the-checker")
    log = structlog.get_logger("taidon.test")
    log.info("session.ok", user="ana")
    assert log_secrets.leaks == []
    log.info("session.oops", password="s3cr3t-for-the-checker")
    assert len(log_secrets.leaks) == 1 and "s3cr…" in log_secrets.leaks[0]
    log_secrets.leaks.clear()  # this test's own leak is the point, not a failure
