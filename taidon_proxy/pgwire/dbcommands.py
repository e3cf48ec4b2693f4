"""Recognise `CREATE DATABASE` and `DROP DATABASE` statements in SQL text, without a server.

Only what a framework or a person sends to create or drop a database is recognised: one
statement, optionally ending in `;`, with comments and whitespace anywhere. Anything else
(another statement, several statements, text we cannot tokenise) is `None`, never an
exception: the caller forwards it to a real server, which has the last word on its syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Unquoted identifiers fold to lower case in ASCII only, as the server folds them.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# Postgres truncates longer identifiers to NAMEDATALEN-1 bytes; we refuse to guess.
MAX_IDENTIFIER_BYTES = 63

_TOKEN = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<line_comment>--[^\n\r]*)
    | (?P<qident>"(?:[^"]|"")*")
    | (?P<string>'(?:[^']|'')*')
    | (?P<ident>[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*)
    | (?P<number>-?\d+)
    | (?P<punct>[=(),;])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class CreateDatabase:
    name: str
    template: str | None = None
    # Every other option as written (lower-cased keyword -> value), e.g. encoding, owner.
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DropDatabase:
    name: str
    if_exists: bool = False
    force: bool = False


DatabaseCommand = CreateDatabase | DropDatabase


@dataclass(frozen=True)
class _Tok:
    kind: str  # "word" (unquoted, lower-cased), "name" (quoted), "string", "number", "punct"
    text: str


def _skip_block_comment(sql: str, pos: int) -> int | None:
    """Position after a (nested) /* */ comment starting at `pos`; None if unterminated."""
    depth = 0
    n = len(sql)
    while pos < n:
        if sql.startswith("/*", pos):
            depth += 1
            pos += 2
        elif sql.startswith("*/", pos):
            depth -= 1
            pos += 2
            if depth == 0:
                return pos
        else:
            pos += 1
    return None


def _tokens(sql: str) -> list[_Tok] | None:
    out: list[_Tok] = []
    pos = 0
    n = len(sql)
    while pos < n:
        if sql.startswith("/*", pos):
            end = _skip_block_comment(sql, pos)
            if end is None:
                return None
            pos = end
            continue
        m = _TOKEN.match(sql, pos)
        if m is None:
            return None
        pos = m.end()
        kind = m.lastgroup
        text = m.group()
        if kind in ("ws", "line_comment"):
            continue
        if kind == "qident":
            name = text[1:-1].replace('""', '"')
            if not name:
                return None  # a zero-length delimited identifier is a syntax error
            out.append(_Tok("name", name))
        elif kind == "string":
            out.append(_Tok("string", text[1:-1].replace("''", "'")))
        elif kind == "ident":
            out.append(_Tok("word", text.translate(_ASCII_LOWER)))
        elif kind == "number":
            out.append(_Tok("number", text))
        else:
            out.append(_Tok("punct", text))
    return out


def _identifier(tok: _Tok | None) -> str | None:
    if tok is None or tok.kind not in ("word", "name"):
        return None
    if len(tok.text.encode("utf-8", errors="surrogatepass")) > MAX_IDENTIFIER_BYTES:
        return None
    return tok.text


class _Cursor:
    def __init__(self, toks: list[_Tok]) -> None:
        self.toks = toks
        self.i = 0

    def peek(self, k: int = 0) -> _Tok | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def take(self) -> _Tok | None:
        tok = self.peek()
        if tok is not None:
            self.i += 1
        return tok

    def word(self, *words: str) -> bool:
        """Consume the unquoted keywords `words` if they come next."""
        for k, w in enumerate(words):
            tok = self.peek(k)
            if tok is None or tok.kind != "word" or tok.text != w:
                return False
        self.i += len(words)
        return True

    def punct(self, p: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.kind == "punct" and tok.text == p:
            self.i += 1
            return True
        return False

    def at_end(self) -> bool:
        """Only an optional `;` remains."""
        if self.punct(";"):
            return self.peek() is None
        return self.peek() is None


# CREATE DATABASE options, as in the grammar (createdb_opt_name): multi-word ones first.
_CREATE_OPTIONS_2 = {("connection", "limit"): "connection_limit"}
_CREATE_OPTIONS_1 = frozenset(
    {
        "owner", "template", "encoding", "strategy", "locale", "lc_collate", "lc_ctype",
        "icu_locale", "icu_rules", "locale_provider", "collation_version", "tablespace",
        "allow_connections", "is_template", "oid", "builtin_locale",
    }
)  # fmt: skip


def _create(cur: _Cursor) -> CreateDatabase | None:
    name = _identifier(cur.take())
    if name is None:
        return None
    cur.word("with")
    options: dict[str, str] = {}
    while not cur.at_end():
        key: str | None = None
        for words, opt in _CREATE_OPTIONS_2.items():
            if cur.word(*words):
                key = opt
                break
        if key is None:
            tok = cur.take()
            if tok is None or tok.kind != "word" or tok.text not in _CREATE_OPTIONS_1:
                return None
            key = tok.text
        cur.punct("=")
        value = cur.take()
        if value is None or value.kind == "punct" or key in options:
            return None
        options[key] = value.text
    template = options.pop("template", None)
    if template == "default":
        template = None  # TEMPLATE DEFAULT: the server's default template
    if template is not None and len(template.encode("utf-8", "surrogatepass")) > 63:
        return None
    return CreateDatabase(name=name, template=template, options=options)


def _drop(cur: _Cursor) -> DropDatabase | None:
    if_exists = cur.word("if", "exists")
    name = _identifier(cur.take())
    if name is None:
        return None
    force = False
    if not cur.at_end():
        cur.word("with")
        if not cur.punct("("):
            return None
        while True:
            if not cur.word("force"):
                return None
            force = True
            if cur.punct(")"):
                break
            if not cur.punct(","):
                return None
        if not cur.at_end():
            return None
    return DropDatabase(name=name, if_exists=if_exists, force=force)


def recognize(sql: str) -> DatabaseCommand | None:
    """The CREATE/DROP DATABASE statement `sql` is, or None (never raises)."""
    try:
        toks = _tokens(sql)
    except (RecursionError, MemoryError):  # pathological input: not ours to decide
        return None
    if not toks:
        return None
    cur = _Cursor(toks)
    if cur.word("create", "database"):
        return _create(cur)
    if cur.word("drop", "database"):
        return _drop(cur)
    return None


def recognize_bytes(raw: bytes) -> DatabaseCommand | None:
    """As `recognize`, for a Query/Parse string as it came off the wire (UTF-8 or not ours)."""
    try:
        return recognize(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None
