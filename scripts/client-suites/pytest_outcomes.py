"""A pytest plugin that writes one JSON line per test: its node id, outcome and first error line.

Loaded into psycopg's own test run by scripts/client-suites/psycopg (`-p pytest_outcomes`, with
this directory on PYTHONPATH) and written to the file named by $CLIENT_SUITE_OUTCOMES. The
outcome is that of the worst phase: `error` (setup or teardown failed), `failed` (the call
failed, or an xfail(strict) passed), `xfailed`, `xpassed`, `skipped` or `passed`.
"""

from __future__ import annotations

import json
import os
from typing import Any

_RANK = {"passed": 0, "skipped": 1, "xfailed": 1, "xpassed": 2, "failed": 3, "error": 4}
_results: dict[str, dict[str, Any]] = {}
_counts = {"deselected": 0}


def pytest_deselected(items: list[Any]) -> None:
    _counts["deselected"] += len(items)


def _first_line(report: Any) -> str:
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    if crash is not None:
        return str(crash.message).strip().splitlines()[0][:300] if crash.message else ""
    text = str(getattr(report, "longreprtext", "") or "").strip()
    return text.splitlines()[-1][:300] if text else ""


def pytest_runtest_logreport(report: Any) -> None:
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
        if report.failed:  # strict xfail that passed
            outcome = "failed"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "error"
    elif report.skipped:
        outcome = "skipped"
    elif report.when == "call":
        outcome = "passed"
    else:
        return
    prev = _results.get(report.nodeid)
    if prev is None or _RANK[outcome] > _RANK[prev["outcome"]]:
        entry = {"nodeid": report.nodeid, "outcome": outcome, "when": report.when}
        if outcome in ("failed", "error"):
            entry["message"] = _first_line(report)
        entry["duration"] = round(float(getattr(report, "duration", 0.0)), 3)
        _results[report.nodeid] = entry


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get("CLIENT_SUITE_OUTCOMES")
    if not path:
        return
    with open(path, "w", encoding="utf-8") as f:
        for entry in _results.values():
            f.write(json.dumps(entry) + "\n")
        f.write(json.dumps({**_counts, "exitstatus": int(exitstatus)}) + "\n")
