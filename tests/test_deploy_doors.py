"""deploy/: several CA brokers as an option (``[[ca]]``).

The template unit of broker K on a host of its own, and the ``[[ca]]`` blocks of the
configuration examples: commented out as shipped, and valid once uncommented.
"""

from __future__ import annotations

import re

import pytest

from tests.test_deploy import CARELAY, CONFIG_PATH, SYSTEMD, _load_deployed, _unit, _verify_or_skip

UNIT = "carelay-broker@.service"


def test_broker_template_runs_broker_k_as_broker_0_is_run():
    ours, zero = _unit(UNIT), _unit("carelay-broker.service")
    assert ours["Service"]["ExecStart"] == f"{CARELAY} broker --config {CONFIG_PATH} --index %i"
    # The same service settings and hardening as broker 0's unit, bar the command.
    theirs = dict(zero["Service"])
    mine = dict(ours["Service"])
    assert mine.pop("ExecStart") and theirs.pop("ExecStart")
    assert mine == theirs
    assert ours["Install"]["WantedBy"] == "multi-user.target"


def test_broker_template_passes_systemd_analyze_verify(tmp_path):
    rc, ours = _verify_or_skip({UNIT: (SYSTEMD / UNIT).read_text()}, tmp_path)
    assert not ours, "\n".join(ours)
    assert rc == 0


def _uncommented(text: str) -> str:
    """``text`` with its commented ``[[ca]]`` block made live."""
    lines, live = [], False
    for line in text.splitlines():
        if line.startswith("# [[ca]]"):
            live = True
        if live and not line.startswith("#"):
            live = False
        lines.append(re.sub(r"^# ?", "", line) if live else line)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", ["carelay.toml.example", "carelay-multihost.toml.example"])
def test_examples_offer_two_brokers(name, tmp_path):
    text = (SYSTEMD / name).read_text()
    (tmp_path / "shipped").mkdir()
    (tmp_path / "two").mkdir()
    shipped = _load_deployed(text, tmp_path / "shipped")
    assert shipped.brokers == 1, "the [[ca]] block must ship commented out"
    two = _load_deployed(_uncommented(text), tmp_path / "two")
    assert two.brokers == 2
    assert [door.port for door in two.ca] == [5064, 5064]
    assert len({door.interfaces for door in two.ca}) == 2
