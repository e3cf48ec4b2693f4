"""Validation of caller-chosen snapshot and clone ids."""

from __future__ import annotations

import re

_ID = re.compile(r"[A-Za-z0-9_-]{1,80}")


def check_id(value: str, what: str = "id") -> str:
    """Return value when it is a valid id, else raise ValueError (ids become path names)."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise ValueError(f"invalid {what} {value!r}: expected 1-80 characters of [A-Za-z0-9_-]")
    return value
