"""Fingerprints of recipe inputs: stat first, content hash only when the stat changed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from taidon_proxy.store.ids import digest


class FileHashCache:
    """Remembers each file's content hash by its stat, so unchanged files are never re-read."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple[int, int, int, int], str]] = {}

    def file_hash(self, path: Path) -> str:
        key = str(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache.pop(key, None)
            return "missing"
        sig = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == sig:
            return hit[1]
        h = hashlib.sha256()
        if os.path.isdir(path):
            # A directory an input glob walks: its entry names, so an added file is a change.
            for name in sorted(os.listdir(path)):
                h.update(name.encode(errors="surrogateescape") + b"\x00")
        else:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        value = h.hexdigest()
        self._cache[key] = (sig, value)
        return value

    def fingerprint(self, config_key: str, files: Iterable[Path]) -> str:
        """One digest over the recipe's settings and every input file's path and content."""
        fields: list[str] = [config_key]
        for p in sorted({str(f) for f in files}):
            fields += [p, self.file_hash(Path(p))]
        return digest(*fields)
