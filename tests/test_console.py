"""Unit tests of the CLI's output rules (dropq.cli.console): what comes from a job is shown escaped, in every
way the CLI writes it, and the only escapes written to a terminal are dropq's own."""

from __future__ import annotations

import io
import json
import re

import pytest

from dropq.cli.console import Screen, as_json, say, shown, table

#: a name with a retitle, a screen clear, a newline, a bidi override and a byte that is not UTF-8
NAME = "a\x1b]0;t\x07b\x1b[2Jc\nd\u202ee\udcff"
NAME_SHOWN = "a\\x1b]0;t\\x07b\\x1b[2Jc\\nd\\u202ee\\xff"
OWN = re.compile(r"\x1b\[(?:H|K|J|2J)|\r")


class Terminal(io.StringIO):
    """A stream that says it is a terminal, so Screen draws as on one."""

    def isatty(self) -> bool:
        return True


def test_table_cells_are_escaped_and_aligned_by_what_is_shown() -> None:
    lines = table(["ID", "N"], [[NAME, 1], ["x", None]])
    assert lines == [f"{'ID'.ljust(len(NAME_SHOWN))}  N", f"{NAME_SHOWN}  1", f"{'x'.ljust(len(NAME_SHOWN))}  -"]


def test_shown_keeps_line_breaks_and_escapes_the_rest() -> None:
    assert shown("id: x\x1b[2J\r\nerror: y\u202e\udcff\n") == "id: x\\x1b[2J\\r\nerror: y\\u202e\\xff\n"


def test_say_writes_escaped_text(capsys: pytest.CaptureFixture[str]) -> None:
    say("dropq: job t\x1b]0;pwned\x07 not found", out=None)
    assert capsys.readouterr().out == "dropq: job t\\x1b]0;pwned\\x07 not found\n"


@pytest.mark.parametrize("tty", [True, False])
def test_a_screen_writes_no_escape_but_its_own(tty: bool) -> None:
    out = Terminal() if tty else io.StringIO()
    screen = Screen(out)
    screen.start()
    screen.draw(["head", f"row {NAME}"])
    screen.line(f"{NAME}: running")
    screen.end_line()
    text = out.getvalue()
    assert NAME_SHOWN in text
    leftover = OWN.sub("", text) if tty else text
    assert not re.findall("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e\ud800-\udfff]", leftover), leftover
    assert bool(OWN.search(text)) is tty  # on a terminal it does redraw; elsewhere it writes plain lines


def test_json_stays_exact_and_survives_a_name_that_is_not_utf8() -> None:
    text = as_json({"id": NAME})
    text.encode("ascii")  # writable to any stdout: the surrogate is a \\udcff escape, not an encoding error
    assert "\x1b" not in text and json.loads(text) == {"id": NAME}
