"""Access security on the PVA side: the ACF's rules for a peer address, an account and
its roles; a put refused by them fails with the reason and sends nothing."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from carelay.broker.pva.access import READ, WRITE, PvaAccess, Rules, peer_address
from carelay.broker.pva.front import PvaFrontEnd
from carelay.common.config import load_config
from tests.unit.test_pva_front import FakeChannel, FakeOp, FakeValue, live

pytest.importorskip("p4p")

ACF = """
# writers write from the control room; everyone reads
UAG(writers) {alice, "role/ops"}
HAG(opis) {localhost, "10.0.0.7"}
ASG(DEFAULT) {
    RULE(1, READ)
    RULE(1, WRITE) {
        UAG(writers)
        HAG(opis)
    }
}
ASG(LOCKED) {
    RULE(1, READ) { HAG(opis) }
}
ASG(COMPUTED) {
    RULE(1, WRITE) { CALC("A>0") }
}
"""


class Op(FakeOp):
    def __init__(self, value=None, peer="127.0.0.1:40000", account="alice", roles=()):
        super().__init__(value)
        self._peer, self._account, self._roles = peer, account, list(roles)

    def peer(self):
        return self._peer

    def account(self):
        return self._account

    def roles(self):
        return self._roles


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("127.0.0.1:5075", "127.0.0.1"),
        ("[::1]:5075", "::1"),
        ("[::ffff:10.0.0.7]:5075", "10.0.0.7"),
        ("10.0.0.7", "10.0.0.7"),
    ],
)
def test_peer_address(peer, address):
    assert peer_address(peer) == address


def test_rules_by_address_account_and_role():
    rules = Rules(ACF, "DEFAULT")
    assert rules.allows("127.0.0.1", "alice") == READ | WRITE  # localhost resolved
    assert rules.allows("10.0.0.7", "alice") == READ | WRITE
    assert rules.allows("10.0.0.8", "alice") == READ  # another address
    assert rules.allows("127.0.0.1", "bob") == READ  # another account
    assert rules.allows("127.0.0.1", "bob", ["ops"]) == READ | WRITE  # a role of the UAG
    assert rules.allows("127.0.0.1", "ops") == READ  # a role is no account


def test_rules_of_the_group_or_default():
    assert Rules(ACF, "LOCKED").allows("10.0.0.7", "bob") == READ
    assert Rules(ACF, "LOCKED").allows("10.0.0.8", "alice") == 0
    assert Rules(ACF, "COMPUTED").allows("127.0.0.1", "alice") == 0  # CALC is never met
    # A group the file lacks gets DEFAULT's rules, as EPICS does.
    assert Rules(ACF, "ELSE").allows("127.0.0.1", "alice") == READ | WRITE


def test_unresolved_host_names_match_nobody():
    text = 'HAG(h) {"no-such-host.invalid"}\nASG(DEFAULT) { RULE(1, WRITE) { HAG(h) } }'
    rules = Rules(text, "X")
    assert rules.unresolved == ["no-such-host.invalid"]
    assert rules.allows("127.0.0.1", "alice") == 0


def config(tmp_path, text: str | None):
    if text is None:
        return load_config(None, prefix="P:", data_dir=str(tmp_path))
    path = tmp_path / "r.acf"
    path.write_text(text)
    return load_config(None, prefix="P:", data_dir=str(tmp_path), access_security=str(path))


def test_without_a_file_everything_goes(tmp_path):
    access = PvaAccess(config(tmp_path, None))
    assert access.load()
    assert access.check_put("P:x_f1", 0, Op(account="mallory")) is None


def test_a_file_not_yet_loaded_allows_nothing(tmp_path, caplog):
    cfg = config(tmp_path, "ASG(DEFAULT) {")
    access = PvaAccess(cfg)
    assert not access.load()
    assert "not loaded, PVA clients get no access" in caplog.text
    assert access.check_put("P:x_f1", 0, Op()) == "access denied (no write access)"
    assert not access.may_read("127.0.0.1:1")
    cfg.access_security.write_text(ACF)
    assert access.load()
    assert access.check_put("P:x_f1", 0, Op()) is None


def test_a_bad_file_on_reload_leaves_the_rules_in_force(tmp_path, caplog):
    cfg = config(tmp_path, ACF)
    access = PvaAccess(cfg)
    assert access.load()
    cfg.access_security.write_text("ASG(DEFAULT) { RULE(1, WRITE\n")
    caplog.set_level(logging.INFO)
    access.reload()
    stays = "not loaded, the rules in force stay: EPICS does not load it: syntax error"
    assert stays in caplog.text
    assert access.check_put("P:x_f1", 0, Op()) is None
    cfg.access_security.write_text("ASG(DEFAULT) { RULE(1, READ) }\n")
    access.reload()
    assert "access security reloaded" in caplog.text
    assert access.check_put("P:x_f1", 0, Op()) is not None


def test_a_file_epics_does_not_load_is_not_loaded_here(tmp_path, caplog):
    """A CALC that asLib cannot compile: the grammar here takes it, EPICS does not, and
    neither side loads the file (on CA the rules in force stay too)."""
    cfg = config(tmp_path, ACF)
    access = PvaAccess(cfg)
    assert access.load()
    cfg.access_security.write_text('ASG(DEFAULT) { RULE(1, READ) RULE(1, WRITE) { CALC("A1") } }')
    assert not access.reload()
    assert "the rules in force stay: EPICS does not load it" in caplog.text
    assert access.check_put("P:x_f1", 0, Op()) is None  # the old rules


def test_refusals_are_logged_up_to_the_budget(tmp_path, caplog):
    now = [0.0]
    access = PvaAccess(config(tmp_path, ACF), clock=lambda: now[0])
    access.load()
    access.budget.lines = 2
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            access.check_put("P:x_f1", 1, Op(account="bob"))
        now[0] += access.budget.window + 1
        access.tick()
    lines = caplog.text.splitlines()
    one = "refused PVA put to P:x_f1 (shard 1) from bob@127.0.0.1: access denied"
    assert sum(one in line for line in lines) == 2
    assert any("refused 3 more PVA puts" in line for line in lines)


def test_a_denied_put_fails_and_sends_nothing(tmp_path):
    front = PvaFrontEnd(config(tmp_path, ACF))
    front.make_channel_object = lambda _front, name: FakeChannel(name)
    try:
        front.access.load()
        live(front, "P:x_f1")
        channel = front.make_channel("P:x_f1")
        front.inbox.run()
        for value in ({"value": np.float64(1.0)}, {"display.units": "mm"}):
            op = Op(FakeValue(value), account="bob")
            front.on_put(channel, op)
            assert op.result == ("error", "access denied (no write access)")
        delpv = front.make_channel(front.config.delpv_name)
        front.inbox.run()
        op = Op(FakeValue({"value": "P:x_f1"}), peer="10.0.0.9:1")
        front.on_put(delpv, op)
        assert op.result == ("error", "access denied (no write access)")
        assert not any(link.outbox for link in front.links)
        assert front.health.refusals == 3
        op = Op(FakeValue({"value": np.float64(1.0)}))  # alice from localhost
        front.on_put(channel, op)
        assert op.result != ("error", "access denied (no write access)")  # past the rules
    finally:
        front.inbox.close()


def test_a_client_without_read_access_gets_a_channel_of_its_own(tmp_path, caplog):
    # Reads from the HAG only.
    front = PvaFrontEnd(
        config(tmp_path, ACF.replace("ASG(DEFAULT)", "ASG(ALL)").replace("LOCKED", "DEFAULT"))
    )
    front.make_channel_object = lambda _front, name: FakeChannel(name)
    front.make_denied_object = lambda: "denied"
    try:
        front.access.load()
        live(front, "P:x_f1")
        assert front.make_channel("P:x_f1", "10.0.0.8:1") == "denied"
        assert "P:x_f1" not in front.channels  # nothing shared with it
        with caplog.at_level(logging.WARNING):
            front.inbox.run()
        assert "refused PVA channel P:x_f1 to 10.0.0.8: access denied (no read access)" in (
            caplog.text
        )
        assert front.health.refusals == 1
        assert isinstance(front.make_channel("P:x_f1", "10.0.0.7:1"), FakeChannel)
    finally:
        front.inbox.close()


def test_reads_need_no_account_unless_a_uag_asks(tmp_path):
    access = PvaAccess(config(tmp_path, ACF))
    access.load()
    assert access.may_read("10.0.0.8:1")  # DEFAULT: everyone reads
    only_writers = "UAG(w) {alice}\nASG(DEFAULT) { RULE(1, WRITE) { UAG(w) } }\n"
    access.config.access_security.write_text(only_writers)
    access.reload()
    # The account is not known when a channel is made: a UAG's read is no read there.
    assert not access.may_read("127.0.0.1:1")
    assert access.check_put("P:x_f1", 0, Op()) is None  # alice writes, over a channel she has
    assert PvaAccess(config(tmp_path, None)).may_read("")


def test_a_refusal_line_carries_the_start_of_a_long_name_and_account(tmp_path, caplog):
    from carelay.common.config import LOGGED_NAME_CHARS

    access = PvaAccess(config(tmp_path, ACF))
    access.load()
    name, account = "P:" + "n" * 1000 + "_f1", "a" * 5000
    with caplog.at_level(logging.WARNING):
        assert access.check_put(name, 0, Op(account=account)) is not None
        access.refused_read(name, "10.0.0.9:5075")
    assert len(caplog.messages) == 2
    for line in caplog.messages:
        assert name[:LOGGED_NAME_CHARS] in line and f"({len(name)} characters)" in line
        assert len(line) < 3 * LOGGED_NAME_CHARS + 200, len(line)


def test_the_file_is_read_as_epics_reads_its_bytes(tmp_path):
    """Lines ended by carriage returns alone: asLib ends a comment at a newline only, so
    ASG(relay) below is in the comment, and its clients get DEFAULT's rules (READ), as on
    CA.  Read with newlines translated, the PVA side granted WRITE."""
    path = tmp_path / "r.acf"
    path.write_bytes(b"ASG(DEFAULT) { RULE(1, READ) }\r# later\rASG(relay) { RULE(1, WRITE) }\r")
    cfg = load_config(
        None, prefix="P:", data_dir=str(tmp_path), access_security=str(path), access_group="relay"
    )
    access = PvaAccess(cfg)
    assert access.load()
    assert access.allows("127.0.0.1", "alice") == READ
