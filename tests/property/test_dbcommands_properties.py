"""Hypothesis invariants of CREATE/DROP DATABASE recognition and the maintenance filter."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taidon_proxy.pgwire import messages as m
from taidon_proxy.pgwire.dbcommands import CreateDatabase, DropDatabase, recognize
from taidon_proxy.pgwire.errors import RemoteProtocolError
from taidon_proxy.pgwire.maintenance import Forward, MaintenanceFilter, Outcome, Run

pytestmark = pytest.mark.property
SETTINGS = settings(deadline=None, max_examples=300)

# Identifiers that need quoting or not; as the server reads them back.
idents = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    min_size=1, max_size=20,
).filter(lambda s: len(s.encode()) <= 63)  # fmt: skip
junk = st.sampled_from(["", " ", "\n", "\t ", " /* c */ ", " -- c\n", "/**/"])


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def spaced(draw: st.DrawFn, *words: str) -> str:
    return draw(junk) + " ".join(w + draw(junk) for w in words)


def cased(draw: st.DrawFn, word: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c for c in word)


@SETTINGS
@given(st.data(), idents, st.booleans())
def test_quoted_names_round_trip(data: st.DataObject, name: str, create: bool) -> None:
    d = data.draw
    verb = cased(d, "create" if create else "drop")
    sql = spaced(d, verb, cased(d, "database"), quote(name)) + d(st.sampled_from(["", ";"]))
    got = recognize(sql)
    assert got == (CreateDatabase(name) if create else DropDatabase(name))


@SETTINGS
@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_$]{0,30}", fullmatch=True))
def test_unquoted_names_fold_to_lower_case(name: str) -> None:
    assert recognize(f"CREATE DATABASE {name}") == CreateDatabase(name.lower())


@SETTINGS
@given(st.text(max_size=200))
def test_garbage_never_raises(sql: str) -> None:
    got = recognize(sql)
    assert got is None or isinstance(got, CreateDatabase | DropDatabase)


@SETTINGS
@given(st.text(max_size=80), st.sampled_from(["CREATE DATABASE x", "DROP DATABASE x"]))
def test_trailing_statements_are_never_ours(rest: str, sql: str) -> None:
    got = recognize(f"{sql}; SELECT {rest}")
    assert got is None


@SETTINGS
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_filter_garbage_gives_only_protocol_errors(data: bytes, size: int) -> None:
    f = MaintenanceFilter(inspect_limit=64)
    try:
        for i in range(0, len(data), size):
            f.receive_data(data[i : i + size])
            while (ev := f.next_event()) is not None:
                if isinstance(ev, Run):
                    f.reply(ev, _ok())
                elif not isinstance(ev, Forward):
                    break
    except RemoteProtocolError:
        pass


@SETTINGS
@given(st.lists(st.sampled_from(["select 1", "CREATE DATABASE a", "DROP DATABASE b"]),
                min_size=1, max_size=6), st.integers(min_value=1, max_value=40))  # fmt: skip
def test_chunking_does_not_change_decisions(queries: list[str], size: int) -> None:
    stream = b"".join(m.query(q) for q in queries)

    def run(chunk: int) -> list[object]:
        f = MaintenanceFilter()
        seen: list[object] = []
        for i in range(0, len(stream), chunk):
            f.receive_data(stream[i : i + chunk])
            while (ev := f.next_event()) is not None:
                if isinstance(ev, Forward):
                    seen.append(("forward", ev.data))
                    f.server_data(m.ready_for_query(b"I"))  # the server answers at once
                elif isinstance(ev, Run):
                    seen.append(("run", ev.command))
                    f.reply(ev, _ok())
                else:
                    break
        return _merge(seen)

    assert run(size) == run(len(stream))


def _merge(seen: list[object]) -> list[object]:
    """Forwarded bytes joined: chunking may split one message's forward in several."""
    out: list[object] = []
    for item in seen:
        assert isinstance(item, tuple)
        if item[0] == "forward" and out and isinstance(out[-1], tuple) and out[-1][0] == "forward":
            out[-1] = ("forward", out[-1][1] + item[1])
        else:
            out.append(item)
    return out


def _ok() -> Outcome:
    return Outcome.ok("DONE")
