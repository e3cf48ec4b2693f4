"""SASLprep (RFC 4013) of passwords, with Postgres's fallback to the raw string."""

from __future__ import annotations

import stringprep
import unicodedata

_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
    stringprep.in_table_a1,  # unassigned code points are prohibited in stored strings
)


def saslprep(text: str) -> str | None:
    """The prepared string, or None when RFC 4013 prohibits it."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    if any(check(ch) for ch in normalized for check in _PROHIBITED):
        return None
    if any(stringprep.in_table_d1(ch) for ch in normalized):
        if any(stringprep.in_table_d2(ch) for ch in normalized):
            return None
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            return None
    return normalized


def prepare_password(password: str) -> bytes:
    """Password bytes for SCRAM as Postgres and libpq compute them.

    Pure ASCII is used as is; otherwise SASLprep, falling back to the raw UTF-8 bytes when
    the password is not a valid SASLprep string (Postgres does the same).
    """
    if password.isascii():
        return password.encode("ascii")
    prepared = saslprep(password)
    return (prepared if prepared is not None else password).encode("utf-8")
