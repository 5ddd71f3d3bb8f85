"""A client's text in the relay's log: bounded, and on one line.

A name a client puts to ``delpv`` (or asks a field of) is its own text: logged whole, a
put of a million characters made a log line of a million, and one with a line break
forged a log line of its own ("...ERROR supervisor: ..." after the break)."""

from __future__ import annotations

import logging

import pytest

from carelay.broker.pva.front import PvaFrontEnd
from carelay.common.config import LOGGED_NAME_CHARS, load_config
from carelay.common.logbudget import shorten

FORGED = "\n2026-01-01T00:00:00.000 ERROR supervisor: a line the relay never wrote"


def test_control_characters_are_escaped():
    assert shorten("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert shorten("red \x1b[31m bell \x07 del \x7f") == "red \\x1b[31m bell \\x07 del \\x7f"
    assert shorten("plain:name_f1") == "plain:name_f1"
    assert shorten("é ü 温度") == "é ü 温度"  # text is not control


def test_a_long_text_is_cut_and_escaped():
    out = shorten("\n" * 1000)
    assert "\n" not in out and out.endswith("(1000 characters)")
    assert len(out) < 4 * LOGGED_NAME_CHARS + 30


@pytest.fixture
def front(tmp_path):
    f = PvaFrontEnd(load_config(None, prefix="P:", data_dir=str(tmp_path)))
    yield f
    f.inbox.close()


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("carelay")]


@pytest.mark.parametrize(
    "name",
    ["P:" + "y" * 1_000_000, "P:zz_f1" + FORGED],
    ids=["a million characters", "a line break"],
)
def test_a_delpv_of_a_clients_text_logs_one_bounded_line(front, caplog, name):
    caplog.set_level(logging.WARNING)
    assert front.forwarder.delete(name, None) is False
    (line,) = [x for x in _lines(caplog) if "delpv" in x]
    assert "\n" not in line and len(line) < 600
    assert "no such PV" in line


def test_a_field_put_to_a_clients_name_logs_one_bounded_line(front, caplog):
    caplog.set_level(logging.WARNING)
    assert front.forwarder.field("P:zz_f1" + FORGED, "EGU", "V", None) is False
    (line,) = [x for x in _lines(caplog) if "EGU" in x]
    assert "\n" not in line
