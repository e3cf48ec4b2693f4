"""A failed command's message quotes the line that names the error, not a trailing caret."""

import pytest

from taidon_proxy.prepare.command import _telling_line

pytestmark = pytest.mark.unit


def test_the_error_line_wins_over_a_caret_after_it() -> None:
    tail = [
        "applying migr/003.sql",
        'psql:migr/003.sql:1: ERROR:  syntax error at or near "this"',
        "LINE 1: this is not sql;",
        "        ^",
    ]
    assert _telling_line(tail) == 'psql:migr/003.sql:1: ERROR:  syntax error at or near "this"'


def test_without_an_error_word_the_last_non_blank_line() -> None:
    assert _telling_line(["step 1", "about to stop", "   "]) == "about to stop"
    assert _telling_line(["  "]) == ""
