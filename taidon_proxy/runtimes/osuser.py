"""Which OS user runs the servers, and whether that user can reach a directory."""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from taidon_proxy.runtimes.base import RuntimeError_


@dataclass(frozen=True)
class Identity:
    """Who runs initdb and postgres; `switch` when we are root and drop to that user."""

    name: str
    uid: int
    gid: int
    switch: bool


def resolve_identity(os_user: str | None) -> Identity:
    """As root: `os_user` (default "postgres"), never root itself. Otherwise: ourselves."""
    if os.geteuid() == 0:
        name = os_user or "postgres"
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise RuntimeError_(f"os user {name!r} does not exist") from None
        if pw.pw_uid == 0:
            raise RuntimeError_(f"os user {name!r} is root; postgres refuses to run as root")
        return Identity(name, pw.pw_uid, pw.pw_gid, switch=True)
    pw = pwd.getpwuid(os.geteuid())
    if os_user is not None and os_user != pw.pw_name:
        raise RuntimeError_(f"running as {pw.pw_name!r}: only root can run servers as {os_user!r}")
    return Identity(pw.pw_name, pw.pw_uid, os.getegid(), switch=False)


def blocking_dir(path: Path, ident: Identity) -> Path | None:
    """The first existing directory on the way to `path` (inclusive) `ident` cannot traverse.

    Mode bits only, with the primary group alone (children run with no supplementary groups).
    """
    if ident.uid == 0:
        return None
    path = Path(os.path.abspath(path))
    for d in [*reversed(path.parents), path]:
        try:
            st = d.stat()
        except FileNotFoundError:
            return None  # created later, by us
        if st.st_uid == ident.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == ident.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return d
    return None


def check_reachable(path: Path, ident: Identity, what: str) -> None:
    """Raise a message naming the directory that keeps `ident` from reaching `path`."""
    blocker = blocking_dir(path, ident)
    if blocker is not None:
        raise RuntimeError_(
            f"os user {ident.name!r} cannot traverse {blocker} on the way to the {what} "
            f"{path}; make it traversable (chmod o+x) or choose another location"
        )
