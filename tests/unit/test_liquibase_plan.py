"""Plan parsing, step hashes and state-id chains; recipe checks; error text from Liquibase."""

from __future__ import annotations

import pytest

from taidon_proxy.config import LiquibasePrepare
from taidon_proxy.errors import BuildFailed
from taidon_proxy.prepare.liquibase.launcher import Masker, check_parameters, error_text
from taidon_proxy.prepare.liquibase.plan import ChangeSet, chain, parse_plan_csv

pytestmark = pytest.mark.unit

CSV = """"ID","AUTHOR","FILENAME","DATEEXECUTED","ORDEREXECUTED","EXECTYPE","MD5SUM","DESCRIPTION"
"2","ann","db/master.xml","2026-11-27T05:34:58.168","4","EXECUTED","9:bbb","insert"
"1","ann","db/master.xml","2026-11-27T05:34:58.152","2","EXECUTED","9:aaa","createTable"
"3","bob","db/more.sql","2026-11-27T05:34:58.184","6","EXECUTED","9:ccc","sql, with comma"
"""
ROOT = "r" * 64


def prep(**kw: object) -> LiquibasePrepare:
    return LiquibasePrepare.model_validate({"kind": "lb", "changelog": "db/master.xml", **kw})


def plan() -> list[ChangeSet]:
    return parse_plan_csv(CSV)


def test_csv_in_execution_order() -> None:
    assert [c.label for c in plan()] == ["1::ann", "2::ann", "3::bob"]
    assert plan()[2] == ChangeSet("3", "bob", "db/more.sql", "9:ccc")


def test_append_keeps_every_earlier_id_edit_keeps_the_prefix() -> None:
    p = prep()
    ids = chain(ROOT, plan(), p)
    appended = chain(ROOT, [*plan(), ChangeSet("4", "bob", "db/more.sql", "9:ddd")], p)
    assert appended[:3] == ids
    edited = plan()
    edited[1] = ChangeSet("2", "ann", "db/master.xml", "9:changed")
    e_ids = chain(ROOT, edited, p)
    assert e_ids[0] == ids[0] and e_ids[1] != ids[1] and e_ids[2] != ids[2]


def test_order_identity_and_settings_change_ids() -> None:
    base = chain(ROOT, plan(), prep())
    assert chain(ROOT, list(reversed(plan())), prep())[-1] != base[-1]
    renamed = [ChangeSet("1b", "ann", "db/master.xml", "9:aaa"), *plan()[1:]]
    assert chain(ROOT, renamed, prep())[0] != base[0]  # same checksum, another row
    for other in (prep(contexts="dev"), prep(labels="x"), prep(parameters={"a": "1"})):
        assert not set(chain(ROOT, plan(), other)) & set(base)
    assert chain(ROOT, plan(), prep(contexts="dev")) == chain(ROOT, plan(), prep(contexts="dev"))


@pytest.mark.parametrize(
    "key",
    ["url", "liquibase.command.url", "USERNAME", "password", "driver", "classpath",
     "liquibase.searchPath", "changelog-file", "defaultsFile", "search_path"],
)  # fmt: skip
def test_connection_and_setting_parameters_are_refused(key: str) -> None:
    with pytest.raises(BuildFailed):
        check_parameters({key: "x"})


def test_changelog_parameters_pass() -> None:
    check_parameters({"greeting": "hello", "schema.name": "app", "table_prefix": "t_"})
    with pytest.raises(BuildFailed):
        check_parameters({"a b": "x"})


def test_masker_hides_host_paths() -> None:
    m = Masker([("/srv/proj", ""), ("/srv/proj/sub", "")])
    assert m("file /srv/proj/db/x.xml and /srv/proj/sub/y.sql") == "file db/x.xml and y.sql"
    assert m("search path /srv/proj") == "search path ."


def test_error_text_quotes_the_unexpected_error_block() -> None:
    tail = [
        "Starting Liquibase at 05:37:43 (version 4.28.0)",
        "Running Changeset: db/master.xml::3::bob",
        "ERROR: Exception Primary Class:  PSQLException",
        "Unexpected error running Liquibase: Migration failed for changeset db/master.xml::3::bob:",
        '     Reason: liquibase.exception.DatabaseException: ERROR: relation "nope" does not exist',
        "  Position: 13 [Failed SQL: (0) insert into nope values (1)]",
    ]
    msg, detail = error_text(tail, 1)
    assert msg.startswith("Migration failed for changeset db/master.xml::3::bob:")
    assert "insert into nope" in msg
    assert detail is not None and "PSQLException" in detail
    assert error_text(["Running Changeset: a::1::b"], 137)[0].startswith(
        "Liquibase crashed (killed by signal 9)"
    )
    assert "status 3" in error_text([], 3)[0]
