"""Jinja2 (autoescape on) for the dashboard's pages, the formats they show, and their headers."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import cache
from typing import Any

import jinja2
from aiohttp import web

# The page loads only its own files: no inline script, no other origin. `data:` images are
# the empty favicon. htmx's inline indicator styles are switched off in the base template.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
NONE = "\N{EN DASH}"  # shown for no value
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make the Origin of a form "null"
    "Cache-Control": "no-store",
}


def size(n: int | float | None) -> str:
    if n is None:
        return NONE
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover  (the loop returns)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def ago(ts: float | None) -> str:
    return "never" if not ts else duration(time.time() - ts) + " ago"


def clock(ts: float | None) -> str:
    if not ts:
        return NONE
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("taidon_proxy.admin.dashboard", "templates"),
        autoescape=True,  # every string a template prints is escaped unless marked safe
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(size=size, duration=duration, ago=ago, clock=clock, short=lambda s: s[:12])
    return env


def page(template: str, code: int = 200, **context: Any) -> web.Response:
    """The rendered page; `code` is its HTTP status."""
    html = environment().get_template(template).render(**context)
    return web.Response(text=html, status=code, content_type="text/html", headers=HEADERS)
