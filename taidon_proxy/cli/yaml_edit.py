"""Round-trip edits of the config file: set one dotted key, keep its comments, order and layout."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError


class EditError(Exception):
    """The file or the value cannot be edited as asked (the message says why)."""


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096  # never fold a long value onto a second line
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def set_key(text: str, key: str, value: str) -> str:
    """`text` with the dotted `key` set to the YAML `value`; everything else stays as written."""
    y = _yaml()
    try:
        data = y.load(text)
    except YAMLError as e:
        raise EditError(f"the file is not valid YAML: {e}") from None
    if data is None:
        data = CommentedMap()
    if not isinstance(data, dict):
        raise EditError("the top level is not a mapping of settings")
    try:
        new: Any = y.load(value)
    except YAMLError as e:
        raise EditError(f"the value is not valid YAML: {e}") from None
    parts = key.split(".")
    if not all(parts):
        raise EditError(f"not a dotted key: {key!r}")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = CommentedMap()
        if not isinstance(child, dict):
            raise EditError(f"{'.'.join(parts[: i + 1])} is not a mapping")
        if not child and isinstance(child, CommentedMap):
            child.fa.set_block_style()  # `databases: {}` grows into a block, not one long line
        node = child
    node[parts[-1]] = new
    out = io.StringIO()
    y.dump(data, out)
    return out.getvalue()


def write_atomically(path: Path, text: str) -> None:
    """Replace the file in one rename, keeping its mode (a reader never sees half a file)."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
