"""Refusals of a use-case: a stable code the edges translate (HTTP status, exit code)."""

from __future__ import annotations

from typing import Any

from taidon_proxy.errors import TaidonError

SHOWN_CANDIDATES = 10


class Refusal(TaidonError):
    """A use-case said no. `code`: not_found, ambiguous, conflict, unsupported, stopped, in_use
    or invalid; `extra`: fields that explain it (candidates, the removal plan, the field)."""

    sqlstate = "55000"

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


def not_found(kind: str, ref: str) -> Refusal:
    return Refusal("not_found", f'{kind} "{ref}" does not exist')


def ambiguous(kind: str, ref: str, candidates: list[str]) -> Refusal:
    return Refusal("ambiguous", f'{kind} prefix "{ref}" is ambiguous', candidates=candidates)


def invalid(field: str, message: str) -> Refusal:
    return Refusal("invalid", f"{field}: {message}", field=field)
