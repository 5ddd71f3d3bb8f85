"""Which groups an access security file defines: the relay refuses to start on a file
that does not define its access_group (see test_hardening for the refusal itself)."""

from __future__ import annotations

import pytest

from carelay.broker.access import access_groups, undefined_access_group

SITE = """\
HAG(controlroom) {opi1, opi2}   # ASG(NOT_THIS) in a comment
UAG(operators) {operator}
ASG(DEFAULT) {
    RULE(1, READ)
}
ASG ( RELAY ) {
    RULE(1, WRITE) { UAG(operators) }
}
ASG("beam line") { RULE(1, READ) }
# ASG(COMMENTED)
"""


def test_groups_bare_spaced_and_quoted_but_not_in_comments():
    assert access_groups(SITE) == {"DEFAULT", "RELAY", "beam line"}
    assert access_groups("") == set()
    assert access_groups("UAG(ASGX) {a}\nHASG(X) {}") == set()


@pytest.mark.parametrize(
    "group, why",
    [
        ("DEFAULT", None),
        ("RELAY", None),
        ("beam line", None),
        ("NOT_THIS", "defines no ASG(NOT_THIS): the relay's PVs would get the rules of "),
        ("COMMENTED", "defines no ASG(COMMENTED)"),
    ],
)
def test_undefined_access_group_says_why(tmp_path, group, why):
    path = tmp_path / "site.acf"
    path.write_text(SITE)
    problem = undefined_access_group(path, group)
    if why is None:
        assert problem is None
    else:
        assert problem is not None and str(path) in problem and why in problem, problem


def test_a_file_without_default_denies_a_relay_in_default(tmp_path):
    path = tmp_path / "no-default.acf"
    path.write_text("ASG(RELAY) { RULE(1, READ) }\n")
    problem = undefined_access_group(path, "DEFAULT")
    assert problem is not None and "denied everything" in problem, problem
