"""Refusals that PCAS answers by itself reach ``relay:LAST_ERROR``, ERRORS and /metrics.

- A put without write access (access security) never reaches relay code: PCAS
  refuses it.  The relay sees it in the circuit's CA stream and records it, with
  the PV, the client's user and address, and the reason.
- A search for a name that breaks the naming rule gets no answer; its refusal
  names the address that searched.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from caproto import AccessRights

from bench.servers import free_port
from tests.system.clients import Context, close, connect, write_status
from tests.system.conftest import CA_PORT, Relay, using_shared, wait_for
from tests.system.test_hardening import acf, me
from tests.system.test_health import _text
from tests.system.test_metrics import scrape, value

pytestmark = pytest.mark.system

#: The only user that the relay's access security lets write.
WRITER = "carelay_denied_writer"
METRICS_PORT = free_port({CA_PORT})
DENIED = "access denied (no write access)"


@pytest.fixture(scope="module")
def denying_relay(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("denied")
    extra = ["--access-security", acf(tmp, [WRITER]), "--metrics-port", str(METRICS_PORT)]
    relay = Relay(tmp, shards=1, extra=extra)
    relay.shared = True
    yield relay
    relay.stop()


@pytest.fixture
def relay(denying_relay, request):
    yield from using_shared(denying_relay, request)


@pytest.fixture
def writer():
    ctx = Context(client_name=WRITER)
    yield ctx
    close(ctx)


def refused_by_access() -> float:
    return value(scrape(METRICS_PORT), "carelay_refusals_total", reason="access") or 0.0


def test_a_put_without_write_access_reaches_last_error_errors_and_metrics(relay, ca, writer):
    kept, new = relay.name("kept", "f1"), relay.name("new", "f1")
    assert write_status(connect(writer, kept), [1.5]).success
    before = refused_by_access()

    # A plain put: PCAS answers it with an error message, which no put API reports.
    pv = connect(ca, kept)
    pv.write([9.0], wait=False)
    # A put with callback: caproto reports the refusal.
    status = write_status(connect(ca, new), [2.5])
    assert not status.success and status.name == "ECA_NOWTACCESS", status
    assert pv.read(timeout=5).data[0] == 1.5

    who = f"client {ca.client_name}@127.0.0.1"

    def both_in_errors():
        errors = _text(ca, relay, "ERRORS").splitlines()
        return all(
            any(f"pv {name}" in line and DENIED in line and who in line for line in errors)
            for name in (kept, new)
        )

    wait_for(both_in_errors, what="both refused puts in ERRORS")
    last = _text(ca, relay, "LAST_ERROR")
    assert f"pv {new}" in last and DENIED in last and who in last, last
    wait_for(lambda: refused_by_access() >= before + 2, what="refusals{reason=access} +2")
    logged = [line for line in relay.log().splitlines() if DENIED in line]
    assert any(kept in line and ca.client_name in line for line in logged), logged


def test_a_refused_search_names_the_address_that_searched(relay, ca):
    bad = f"{relay.prefix}no_type_here{os.getpid()}"
    (pv,) = ca.get_pvs(bad, timeout=2)
    with pytest.raises(TimeoutError):
        pv.wait_for_connection(timeout=1)

    def shown():
        last = _text(ca, relay, "LAST_ERROR")
        return last if bad in last and "does not follow" in last else None

    last = wait_for(shown, what="the refused name in LAST_ERROR")
    assert "client 127.0.0.1:" in last, last
    logged = [line for line in relay.log().splitlines() if f"refused PV name {bad}" in line]
    assert logged and all("127.0.0.1:" in line for line in logged), logged


def test_names_searched_by_the_hundred_are_counted_each_time_and_entered_within_budget(
    relay, ca, writer
):
    """A client that keeps searching for a name the relay refuses is counted at every
    search (REFUSE_RATE and /metrics show it), logged and entered once; one that searches
    for more names than the log's budget gets no more of them into ERRORS than into the
    log.  Before, a name was counted once however often it was searched, and every new
    name went into ERRORS (150 of them pushed all else out)."""
    from carelay.common.config import REFUSAL_LOG_LINES
    from tests.system.test_refusals import search_all

    good = relay.name("barrier", "f1")
    assert write_status(connect(writer, good), [1.0]).success
    tag = f"{relay.prefix}unsuffixed{os.getpid()}x"
    names = lambda: value(scrape(METRICS_PORT), "carelay_refusals_total", reason="name") or 0.0  # noqa: E731
    before = names()
    search_all([f"{tag}again".encode()] * 40, good)
    wait_for(lambda: names() >= before + 40, what="every search of one name counted")
    assert relay.log().count(f"refused PV name {tag}again") == 1

    many = REFUSAL_LOG_LINES + 20
    search_all([f"{tag}{k}".encode() for k in range(many)], good)
    wait_for(lambda: names() >= before + 40 + many, what="every new name counted")
    logged = set(re.findall(rf"refused PV name {re.escape(tag)}(\d+)", relay.log()))
    entered = set(re.findall(rf"pv {re.escape(tag)}(\d+)", _text(ca, relay, "ERRORS")))
    assert entered and entered <= logged, sorted(entered - logged, key=int)


def test_a_put_to_a_channel_that_a_reload_made_read_only_is_recorded(make_relay, tmp_path, ca):
    path = Path(acf(tmp_path, me()))
    relay = make_relay(shards=1, extra=["--access-security", str(path)])
    name = relay.name("revoked", "f1")
    pv = connect(ca, name)
    assert write_status(pv, [1.0]).success
    text = path.read_text()
    for user in me():
        text = text.replace(f'"{user}"', f'"{WRITER}"')
    path.write_text(text)
    start = len(relay.log())
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_log("access security reloaded", start=start, timeout=10)
    wait_for(
        lambda: not pv.channel.access_rights & AccessRights.WRITE,
        what="the channel's new rights at the client",
    )
    status = write_status(pv, [2.0])
    assert not status.success and status.name == "ECA_NOWTACCESS", status

    def shown():
        last = _text(ca, relay, "LAST_ERROR")
        return last if f"pv {name}" in last and DENIED in last else None

    wait_for(shown, what="the refused put in LAST_ERROR")


def test_denials_are_recorded_when_rules_match_claimed_host_names(make_relay, tmp_path, ca):
    config = tmp_path / "relay.toml"
    config.write_text("access_by_ip = false\n")
    extra = ["--config", str(config), "--access-security", acf(tmp_path, [WRITER])]
    relay = make_relay(shards=1, extra=extra)
    name = relay.name("claimed", "f1")
    status = write_status(connect(ca, name), [1.0])
    assert not status.success and status.name == "ECA_NOWTACCESS", status

    def shown():
        last = _text(ca, relay, "LAST_ERROR")
        return last if f"pv {name}" in last and DENIED in last else None

    last = wait_for(shown, what="the refused put in LAST_ERROR")
    assert f"client {ca.client_name}@127.0.0.1" in last, last


def test_other_refused_puts_name_the_address_not_its_token(make_relay, tmp_path, ca):
    # With access by address, PCAS holds each client's host as the token of its address.
    relay = make_relay(shards=1, extra=["--access-security", acf(tmp_path, me())])
    name = relay.name("prov", "f1")
    assert not write_status(connect(ca, f"{name}.DESC"), "a description").success

    def shown():
        last = _text(ca, relay, "LAST_ERROR")
        return last if name in last and "no put yet" in last else None

    last = wait_for(shown, what="the refused field put in LAST_ERROR")
    assert f"client {ca.client_name}@127.0.0.1 " in last, last


def test_the_read_only_pvs_are_read_by_the_sites_readers_and_written_by_none(relay, ca, writer):
    """With the site's file, too: the writer writes the relay's PVs but not pvlist,
    NAME.NORD or the health PVs, and a reader reads them all."""
    name = relay.name("rights", "f3")
    assert write_status(connect(writer, name), [1.0, 2.0]).success
    both = AccessRights.READ | AccessRights.WRITE
    assert connect(writer, name).access_rights == both
    assert connect(ca, name).access_rights == AccessRights.READ
    for pv_name in (relay.prefix + "pvlist", f"{name}.NORD", relay.prefix + "relay:HEARTBEAT"):
        for ctx in (writer, ca):
            assert connect(ctx, pv_name).access_rights == AccessRights.READ, pv_name
    status = write_status(connect(writer, f"{name}.NORD"), [1])
    assert status.name == "ECA_NOWTACCESS"
    assert list(connect(ca, name).read(timeout=5).data) == [1.0, 2.0]
