"""The groups the broker adds to every access security file it loads: its read-only
PVs are read by the readers of ``access_group`` and written by no client; the health
PVs are read by every client (the system tests in test_control and test_denied_errors
show what CA clients are told)."""

from __future__ import annotations

import itertools

from carelay.broker import acf
from carelay.broker.access import (
    PUBLIC_GROUP,
    READ_ONLY_GROUP,
    RELAY_ONLY,
    check_access_security,
    load_rules,
    undefined_access_group,
    with_relay_groups,
)

SITE = """\
UAG(ops) {alice, "bob smith"}
UAG(guests) {eve}
HAG(cr) {opi1, opi2}
ASG(DEFAULT) {
    RULE(1, READ) { HAG(cr) }
}
ASG(RELAY) {
    INPA("some:pv")
    RULE(1, READ) { UAG(guests) }
    RULE(1, WRITE, TRAPWRITE) { UAG(ops) HAG(cr) }
    RULE(1, WRITE) { UAG(guests) CALC("A=1") }
    RULE(0, WRITE)
    RULE(1, NONE) { UAG(ops) }
}"""

USERS = [set(), {"ops"}, {"guests"}, {"ops", "guests"}]
HOSTS = [set(), {"cr"}]


def test_the_read_only_group_reads_what_the_site_reads_and_writes_nothing():
    rules = acf.parse(with_relay_groups(SITE, "RELAY"))
    for uags, hags in itertools.product(USERS, HOSTS):
        site = rules.access("RELAY", uags, hags)
        read_only = rules.access(READ_ONLY_GROUP, uags, hags)
        assert read_only == min(site, acf.READ), (uags, hags)
        assert rules.access(PUBLIC_GROUP, uags, hags) == acf.READ
    # The site's own groups are as they were.
    assert rules.asgs["RELAY"] == acf.parse(SITE).asgs["RELAY"]


def test_a_group_that_grants_nothing_gives_an_empty_read_only_group():
    text = with_relay_groups("ASG(DEFAULT) {\n    RULE(0, WRITE)\n}\n", "DEFAULT")
    assert acf.parse(text).asgs[READ_ONLY_GROUP] == []


def test_what_the_broker_loads_is_a_file_epics_loads(tmp_path):
    for text, group in ((SITE, "RELAY"), (SITE, "DEFAULT"), (RELAY_ONLY, "DEFAULT")):
        path = tmp_path / "loaded.acf"
        path.write_text(with_relay_groups(text, group))
        assert check_access_security(path) is None, path.read_text()


def test_a_nul_in_the_site_file_does_not_cut_off_the_groups():
    text = with_relay_groups("ASG(DEFAULT) {\n    RULE(1, WRITE)\n}\n# x\0 y\n", "DEFAULT")
    assert "\0" not in text
    assert {READ_ONLY_GROUP, PUBLIC_GROUP} <= set(acf.parse(text).asgs)


def test_a_site_file_may_not_define_the_relays_groups(tmp_path):
    for ours in (READ_ONLY_GROUP, PUBLIC_GROUP):
        path = tmp_path / "site.acf"
        path.write_text(f'ASG(DEFAULT) {{ RULE(1, READ) }}\nASG("{ours}") {{ RULE(1, WRITE) }}\n')
        problem = undefined_access_group(path, "DEFAULT")
        assert problem is not None and f"defines ASG({ours})" in problem, problem


class FakeCas:
    """Records what asInitFile was given, as it read it."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def asInitFile(self, path, substitutions):  # noqa: N802 (pcaspy's name)
        with open(path) as f:
            self.loaded.append(f.read())
        return 0


def test_rules_are_loaded_from_a_file_of_their_own_that_does_not_stay(tmp_path):
    site = tmp_path / "site.acf"
    site.write_text(SITE)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cas = FakeCas()
    assert load_rules(cas, site, False, "RELAY", run_dir)
    assert load_rules(cas, None, False, "DEFAULT", run_dir)
    assert list(run_dir.iterdir()) == []
    site_rules, own = (acf.parse(text) for text in cas.loaded)
    assert site_rules.access(READ_ONLY_GROUP, {"ops"}, {"cr"}) == acf.READ
    # No site file: every client writes the relay's PVs, and reads the read-only ones.
    assert own.access("DEFAULT", set(), set()) == acf.WRITE
    assert own.access(READ_ONLY_GROUP, set(), set()) == acf.READ
