"""Hardening: access security, limits, bad input of every kind, and bad configuration.

What each part shows, through real CA clients against the real relay:

- access security: without write access a put creates nothing, and a field
  put or a delpv changes nothing; reads still work; with write access puts
  create and write.  An invalid access security file stops ``carelay up``
  before anything starts.
- limits (max_pvs, max_bytes, max_name_length, max_elements): a creation
  over a limit is refused (not served, logged once per name), a burst of
  first puts does not get past it, and what exists keeps its values and
  takes puts.
- bad names, bad values and bad bytes on a shard's socket: a CA error or a
  log line, never a dead process or a changed PV.
- every invalid configuration key exits with status 2 and one line naming it.

Covered elsewhere, and not repeated here: names outside the rule, count 0,
leading zeros and counts above max_elements, logged once (test_control:
test_names_outside_the_rule_are_not_served_and_logged_once); integers out of
range sent as text, and what PCAS converts itself (test_semantics:
test_int_out_of_range_fails_and_keeps_the_value, test_put_pcas_converts_is_refused);
delpv of a name that does not exist and a put to pvlist (test_control); bad
field values (test_fields); a tcp endpoint on 0.0.0.0 without keys
(test_multihost); the codec on its own (tests/unit/test_protocol.py) and the
shard's handler fuzzed (tests/unit/test_fuzz_shard.py).
"""

from __future__ import annotations

import getpass
import os
import pwd
import socket
import struct
import subprocess
import time
import uuid

import epics
import msgpack
import numpy as np
import pytest
import zmq
from caproto import ChannelType

from carelay.common.config import VALUE_COPIES, load_config
from carelay.common.logbudget import shorten
from carelay.common.messages import Put
from carelay.common.protocol import BATCH_TAG, encode_batch
from carelay.common.sharding import shard_for
from tests.system.clients import Context, close, get, get_array, put, pvlist, write_status
from tests.system.conftest import CA_PORT, CARELAY, caproto_cli, wait_for
from tests.system.test_processes import config_error, status_rows

#: The user name a CA client of this module's own writer context sends.
WRITER = "carelay_writer"


@pytest.fixture(scope="module")
def ca():
    """One caproto client context for the module (it sends this process's user name)."""
    ctx = Context()
    yield ctx
    close(ctx)


@pytest.fixture
def writer():
    """A caproto context that tells the server its user is WRITER."""
    ctx = Context(client_name=WRITER)
    yield ctx
    close(ctx)


def connect(ctx: Context, *names: str):
    pvs = ctx.get_pvs(*names, timeout=5)
    for pv in pvs:
        pv.wait_for_connection(timeout=5)
    return pvs if len(pvs) > 1 else pvs[0]


def stored(relay, name: str) -> tuple[int, str]:
    """``carelay status --pv NAME``: (exit status, output)."""
    r = subprocess.run(
        [*relay.argv("status"), "--pv", name], capture_output=True, text=True, timeout=30
    )
    return r.returncode, r.stdout + r.stderr


def served(names: list[str], timeout: float = 1.5) -> dict[str, bool]:
    """Search for ``names`` at once through libca; which of them connect."""
    chids = {name: epics.ca.create_channel(name, connect=False, auto_cb=False) for name in names}
    deadline = time.monotonic() + timeout
    out = {}
    for name, chid in chids.items():
        out[name] = epics.ca.connect_channel(chid, timeout=max(0.05, deadline - time.monotonic()))
    for name, chid in chids.items():
        # Stop libca searching for the names nobody answers.  (A channel that did
        # connect may be pyepics's cached one for that name: it stays.)
        if not out[name]:
            epics.ca.clear_channel(chid)
    return out


def refusals(relay, name: str, start: int = 0) -> list[str]:
    # A log line carries at most the start of a name (see test_refusals).
    logged = shorten(name)
    return [
        line for line in relay.log()[start:].splitlines() if f"refused PV name {logged}:" in line
    ]


def pids(relay) -> dict[str, int]:
    return {role: row["pid"] for role, row in status_rows(relay).items()}


# -- 1. access security ------------------------------------------------------------------------


def acf(tmp_path, writers: list[str]) -> str:
    """An access security file: everyone reads, only ``writers`` write."""
    path = tmp_path / f"relay-{uuid.uuid4().hex[:6]}.acf"
    users = ", ".join(f'"{u}"' for u in writers)
    path.write_text(
        f"UAG(writers) {{{users}}}\n"
        "ASG(DEFAULT) {\n"
        "    RULE(1, READ)\n"
        "    RULE(1, WRITE) {\n"
        "        UAG(writers)\n"
        "    }\n"
        "}\n"
    )
    return str(path)


def me() -> list[str]:
    """The names this process's CA clients may send as their user."""
    return sorted({getpass.getuser(), pwd.getpwuid(os.getuid()).pw_name})


def test_without_write_access_nothing_is_created_or_changed(make_relay, tmp_path, ca, writer):
    relay = make_relay(extra=["--access-security", acf(tmp_path, [WRITER])])
    assert WRITER not in me()
    # The writer creates a PV, with a unit.
    existing = relay.name("kept", "f1")
    pv_w = connect(writer, existing)
    assert write_status(pv_w, [1.5]).success
    assert write_status(connect(writer, existing + ".EGU"), ["V"]).success
    assert pvlist(relay) == [existing]

    # This process's user may not write: a put creates nothing, through any client.
    new_pyepics, new_caproto, new_cli = (relay.name("denied", "f1") for _ in range(3))
    with pytest.raises(epics.ca.CASeverityException, match="Write access denied"):
        epics.caput(new_pyepics, 2.5, wait=True, timeout=5)
    status = write_status(connect(ca, new_caproto), [2.5])
    assert not status.success and status.name == "ECA_NOWTACCESS", status
    connect(ca, new_caproto).write([3.5], wait=False)  # no callback: no answer, no effect
    caproto_cli("put", "-c", new_cli, "4.5")  # it reports the value it reads back after
    for name in (new_pyepics, new_caproto, new_cli):
        assert name not in pvlist(relay)
        code, out = stored(relay, name)
        assert code == 1 and "not stored" in out, out
        assert f"created PV {name}" not in relay.log()

    # Reads of the existing PV work, for pyepics and caproto alike; writes to it do not.
    assert get(existing) == 1.5
    assert connect(ca, existing).read().data[0] == 1.5
    assert not write_status(connect(ca, existing), [9.0]).success
    with pytest.raises(epics.ca.CASeverityException):
        epics.caput(existing, 9.0, wait=True, timeout=5)
    # A field put and a delpv are writes as well.
    egu = connect(ca, existing + ".EGU")
    assert not write_status(egu, ["mV"]).success
    assert egu.read().data[0] == b"V"
    assert connect(ca, existing).read(data_type="control").metadata.units == b"V"
    assert not write_status(connect(ca, relay.prefix + "delpv"), existing.encode()).success
    with pytest.raises(epics.ca.CASeverityException):
        epics.caput(relay.prefix + "delpv", existing, wait=True, timeout=5)
    assert pvlist(relay) == [existing]
    assert get(existing) == 1.5
    assert stored(relay, existing)[0] == 0

    # The writer still writes, deletes and creates.
    assert write_status(pv_w, [2.0]).success
    assert get(existing) == 2.0
    assert write_status(connect(writer, relay.prefix + "delpv"), existing.encode()).success
    assert pvlist(relay) == []
    assert stored(relay, existing)[0] == 1


def test_with_write_access_puts_create_and_write(make_relay, tmp_path, ca):
    relay = make_relay(extra=["--access-security", acf(tmp_path, me())])
    by_pyepics, by_caproto = relay.name("allowed", "f1"), relay.name("allowed", "F4")
    put(by_pyepics, 1.25)
    assert write_status(connect(ca, by_caproto), [1.0, 2.0]).success
    assert write_status(connect(ca, by_caproto), [3.0]).success
    assert get(by_pyepics) == 1.25
    np.testing.assert_array_equal(get_array(by_caproto), [1.0, 2.0, 3.0])
    assert sorted(pvlist(relay)) == sorted([by_pyepics, by_caproto])
    for name in (by_pyepics, by_caproto):
        assert stored(relay, name)[0] == 0
    assert write_status(connect(ca, by_pyepics + ".EGU"), ["K"]).success
    assert connect(ca, by_pyepics).read(data_type="control").metadata.units == b"K"
    assert epics.caput(relay.prefix + "delpv", by_caproto, wait=True, timeout=5) == 1
    assert pvlist(relay) == [by_pyepics]


def test_invalid_access_security_file_stops_the_relay_before_it_starts(tmp_path):
    bad = tmp_path / "bad.acf"
    bad.write_text("UAG(writers) {someone\nASG(DEFAULT) { RULE(1, READ\n")
    line = config_error(tmp_path, "--access-security", str(bad))
    assert "access_security" in line and str(bad) in line and "syntax error" in line, line
    empty = tmp_path / "empty.acf"
    empty.write_text("")
    line = config_error(tmp_path, "--access-security", str(empty))
    assert "access_security" in line and str(empty) in line, line
    # A file that goes bad behind a running relay's back: the broker, restarted
    # on it, refuses to serve and says why (and the supervisor shows it failing).
    r = subprocess.run(
        [*CARELAY, "broker", "--data-dir", str(tmp_path / "d"), "--access-security", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert f"access security file {bad} is invalid" in r.stderr, r.stderr


def test_an_access_group_the_file_does_not_define_stops_the_relay(tmp_path):
    # EPICS would put the relay's PVs in DEFAULT, whose rules here let anyone write.
    path = tmp_path / "relay.acf"
    path.write_text("# ASG(RELAY) only in a comment\nASG(DEFAULT) {\n    RULE(1, WRITE)\n}\n")
    toml = 'access_group = "RELAY"\n'
    line = config_error(tmp_path, "--access-security", str(path), toml=toml)
    assert "access_group" in line and "ASG(RELAY)" in line and str(path) in line, line
    # The broker, run by itself on the same configuration, refuses as well.
    config = tmp_path / "broker.toml"
    config.write_text(toml)
    r = subprocess.run(
        [*CARELAY, "broker", "--data-dir", str(tmp_path / "d"), "--config", str(config)]
        + ["--access-security", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "broker cannot start: access_group" in r.stderr and "ASG(RELAY)" in r.stderr, r.stderr


# -- 2. limits ----------------------------------------------------------------------------------


def burst(ctx: Context, names: list[str], values) -> None:
    """Connect every name (provisional PVs), then put to all without waiting between."""
    pvs = connect(ctx, *names)
    for pv, value in zip(pvs, values, strict=True):
        pv.write(value, wait=False)


def test_max_pvs_refuses_new_names_and_leaves_the_rest(make_relay, ca):
    relay = make_relay(extra=["--max-pvs", "5"])
    # Two PVs exist and five provisional PVs are held (all max_pvs allows besides them),
    # then five first puts at once: the ones in flight count, and only three are created.
    first = [relay.name(f"first{k}", "f1") for k in range(2)]
    for k, name in enumerate(first):
        put(name, float(k))
    names = [relay.name(f"burst{k}", "f1") for k in range(5)]
    burst(ca, names, [[float(k)] for k in range(5)])

    def settled():
        created = [n for n in names if f"created PV {n}" in relay.log()]
        refused = [n for n in names if refusals(relay, n)]
        return (created, refused) if len(created) + len(refused) == len(names) else None

    created, refused = wait_for(settled, what="every first put created or refused")
    assert len(created) == 3, created
    assert sorted(pvlist(relay)) == sorted(first + created)
    for n in refused:
        assert "max_pvs (5) reached" in refusals(relay, n)[0]
        assert stored(relay, n)[0] == 1
    for n in created:
        assert get(n) == float(names.index(n))

    # A new name is not served at all now, and its refusal is logged once.
    extra = relay.name("sixth", "f1")
    assert served([extra, extra + ".EGU", created[0]]) == {
        extra: False,
        extra + ".EGU": False,
        created[0]: True,
    }
    r = caproto_cli("put", "-w", "0.5", extra, "1")
    assert "Timed out" in r.stdout + r.stderr, r
    assert len(refusals(relay, extra)) == 1, refusals(relay, extra)
    assert extra not in pvlist(relay)
    # What exists keeps its values and takes puts, fields included.
    for k, n in enumerate(created):
        put(n, 100.0 + k)
        assert get(n) == 100.0 + k
    assert write_status(connect(ca, created[0] + ".EGU"), ["A"]).success
    # Room again after a delete.
    assert epics.caput(relay.prefix + "delpv", created[0], wait=True, timeout=5) == 1
    again = relay.name("room", "f1")
    put(again, 7.0)
    assert get(again) == 7.0
    assert len(pvlist(relay)) == 5


def held(ctx: Context, names: list[str]) -> list[str]:
    """Which of ``names`` the channels of ``ctx`` are connected to now."""
    return [pv.name for pv in ctx.get_pvs(*names, timeout=5) if pv.connected]


def test_provisional_pvs_are_bounded_by_max_pvs(make_relay, ca):
    """Names that exist in no shard, connected and never put (a careless or hostile
    client): at most max_pvs such provisional PVs at once, besides the PVs that exist.
    The rest are not served, each refusal logged once; what exists is untouched; once
    the client lets go, new names are served again."""
    relay = make_relay(extra=["--max-pvs", "5"])
    kept = relay.name("kept", "f1")
    put(kept, 3.0)
    names = [relay.name(f"held{k}", "f1") for k in range(8)]
    careless = Context()
    try:
        careless.get_pvs(*names, timeout=5)

        def settled():
            refused = [n for n in names if refusals(relay, n)]
            served_now = held(careless, names)
            return (served_now, refused) if len(served_now) + len(refused) == 8 else None

        served_now, refused = wait_for(settled, what="each held name served or refused")
        assert len(served_now) == 5, served_now
        for name in refused:
            assert "max_pvs (5) provisional PVs held" in refusals(relay, name)[0]
        # A field of a name that exists nowhere is a provisional PV too; one of a PV
        # that exists is not.
        loose = relay.name("loose", "f1") + ".EGU"
        assert served([loose, kept + ".EGU", kept]) == {
            loose: False,
            kept + ".EGU": True,
            kept: True,
        }
        put(kept, 4.0)
        assert get(kept) == 4.0
        assert sorted(pvlist(relay)) == [kept]
    finally:
        close(careless)
    # Let go: room again, for a name refused before and for a new one.
    again = relay.name("again", "f1")
    assert wait_for(
        lambda: served([refused[0], again]) == {refused[0]: True, again: True},
        what="the names served once the careless client went",
    )
    put(again, 1.0)
    assert sorted(pvlist(relay)) == sorted([kept, again])
    assert len(refusals(relay, refused[1])) == 1


def test_fields_held_of_a_deleted_pv_count_as_provisional_pvs(make_relay, ca):
    """A client that holds field channels of a PV that is then deleted holds provisional
    PVs: with max_pvs of them held, a new name is not served until the PV is created
    again."""
    relay = make_relay(extra=["--max-pvs", "3"])
    base = relay.name("gone", "f1")
    put(base, 1.0)
    holder = Context()
    try:
        fields = connect(holder, *(f"{base}.{f}" for f in ("EGU", "DESC", "HOPR")))
        assert all(pv.connected for pv in fields)
        assert epics.caput(relay.prefix + "delpv", base, wait=True, timeout=5) == 1
        late = relay.name("late", "f1")
        assert served([late]) == {late: False}
        assert "max_pvs (3) provisional PVs held" in refusals(relay, late)[0]
        put(base, 2.0)  # created again: its fields are no provisional PVs
        assert wait_for(lambda: served([late]) == {late: True}, what="the new name served")
    finally:
        close(holder)


def test_max_bytes_refuses_what_does_not_fit(make_relay, ca):
    # Each PV is charged its values in every copy the relay holds (VALUE_COPIES).
    limit = 1000 * VALUE_COPIES
    relay = make_relay(extra=["--max-bytes", str(limit)])
    # Three PVs of 800 bytes at full capacity: each fits alone, so each is served
    # while none exists.  Their first puts in one burst: only one is created.
    bigs = [relay.name(f"big{k}", "f100") for k in range(3)]
    burst(ca, bigs, [[1.0, 2.0]] * 3)

    def settled():
        created = [n for n in bigs if f"created PV {n}" in relay.log()]
        refused = [n for n in bigs if refusals(relay, n)]
        return (created, refused) if len(created) + len(refused) == len(bigs) else None

    (big,), refused = wait_for(settled, what="every first put created or refused")
    for n in refused:
        assert f"max_bytes ({limit}) would be exceeded" in refusals(relay, n)[0]
        assert n not in pvlist(relay)
        assert stored(relay, n)[0] == 1
    # Another one is not served at all now.
    another = relay.name("big", "f100")
    assert served([another]) == {another: False}
    assert len(refusals(relay, another)) == 1
    # 160 + 40 bytes fit exactly; 4 more do not.
    small, text = relay.name("small", "f20"), relay.name("text", "c40")
    put(small, [3.0])
    put(text, "fits")
    over = relay.name("over", "i1")
    assert served([over]) == {over: False}
    assert len(refusals(relay, over)) == 1
    assert sorted(pvlist(relay)) == sorted([big, small, text])
    # What exists keeps its values and takes puts.
    np.testing.assert_array_equal(get_array(big), [1.0, 2.0])
    put(big, list(range(100)))
    np.testing.assert_array_equal(get_array(big), np.arange(100.0))
    assert get_array(text, as_string=True) == "fits"


def test_max_name_length_and_max_elements_refuse_what_is_over(make_relay, tmp_path):
    config = tmp_path / "short.toml"
    config.write_text("max_name_length = 40\n")
    relay = make_relay(extra=["--config", str(config), "--max-elements", "100"])
    stem = relay.prefix + "n"
    longest = stem + "x" * (40 - len(stem) - 3) + "_f1"
    too_long = stem + "x" * (41 - len(stem) - 3) + "_f1"
    assert (len(longest), len(too_long)) == (40, 41)
    put(longest, 1.0)
    assert served([too_long, too_long]) == {too_long: False}
    assert served([too_long]) == {too_long: False}
    lines = refusals(relay, too_long)
    assert len(lines) == 1 and "longer than 40 characters" in lines[0], lines
    put(longest, 2.0)
    assert get(longest) == 2.0
    # A count over max_elements, for a value and for a buffer.
    widest, too_wide, too_deep = (relay.prefix + f"w_{tc}" for tc in ("f100", "f101", "F101"))
    put(widest, list(range(100)))
    assert served([too_wide, too_deep]) == {too_wide: False, too_deep: False}
    for name in (too_wide, too_deep):
        lines = refusals(relay, name)
        assert len(lines) == 1 and "above max_elements 100" in lines[0], lines
    np.testing.assert_array_equal(get_array(widest), np.arange(100.0))
    assert get(longest) == 2.0
    assert sorted(pvlist(relay)) == sorted([longest, widest])


# -- 3. bad input: names ----------------------------------------------------------------------


def test_bad_names_are_not_served_and_logged_once(relay):
    p = relay.prefix
    tag = uuid.uuid4().hex[:6]
    refused = {
        f"{p}{tag}" + "a" * 130 + "_f1": "longer than 128",  # over-long (caproto cannot send it)
        f"{p}_f1": "<name>_<type><count>",  # empty name part
        f"{p}caf\u00e9{tag}_f1": "not ASCII",  # non-ASCII (sent as UTF-8)
        f"{p}two words{tag}_f1": "<name>_<type><count>",  # a space
        f"{p}huge{tag}_f99999999999999": "count",  # absurd counts
        f"{p}huge{tag}_F4294967297": "max_elements",
        f"{p}letter{tag}_q1": "type one of",  # unknown type letters
        f"{p}letter{tag}_d4": "type one of",
        f"{p}zero{tag}_c0": "count",
    }
    good = relay.name("good", "f1")
    put(good, 4.0)
    broker = pids(relay)["broker"]
    for _ in range(2):  # searched twice: still one log line each
        assert served([*refused, good]) == {**dict.fromkeys(refused, False), good: True}
    for name, why in refused.items():
        lines = refusals(relay, name)
        assert len(lines) == 1, (name, lines)
        assert why in lines[0], (name, lines[0])
    assert pids(relay)["broker"] == broker
    assert get(good) == 4.0


def search_packet(raw_name: bytes, cid: int) -> bytes:
    """A CA version message and one search request for ``raw_name``, as UDP bytes."""
    payload = raw_name + b"\0"
    payload += b"\0" * (-len(payload) % 8)
    version = struct.pack(">HHHHII", 0, 0, 1, 13, 0, 0)
    search = struct.pack(">HHHHII", 6, len(payload), 5, 13, cid, cid) + payload
    return version + search


def test_names_that_are_not_text_get_no_answer_and_harm_nothing(relay):
    """Raw searches with bytes no client library would send: invalid UTF-8, control
    characters, a NUL in the middle.  No answer, and the broker lives on."""
    good = relay.name("good", "f1")
    put(good, 5.0)
    broker = pids(relay)["broker"]
    p = relay.prefix.encode()
    names = [
        p + b"caf\xe9_f1",
        p + b"\xff\xfe_f1",
        p + b"ab\x00cd_f1",
        p + bytes(range(1, 32)) + b"_f1",
        p + b"x" * 3000 + b"_f1",
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        for cid, raw in enumerate(names, start=1):
            s.sendto(search_packet(raw, cid), ("127.0.0.1", CA_PORT))
        # The one answer that must come: a search for a name the relay serves.
        s.sendto(search_packet(good.encode(), 99), ("127.0.0.1", CA_PORT))
        answers = []
        with pytest.raises(TimeoutError):
            while True:
                answers.append(s.recv(4096))
    # Each answer carries the search id it answers (in the last header field).
    ids = {struct.unpack(">HHHHII", a[16:32])[5] for a in answers if len(a) >= 32}
    assert ids == {99}, answers
    assert pids(relay)["broker"] == broker
    assert get(good) == 5.0


# -- 3. bad input: values ---------------------------------------------------------------------


def test_nan_and_infinities_are_stored_as_given(relay, ca):
    for value in (float("nan"), float("inf"), float("-inf")):
        by_pyepics, by_caproto = relay.name("special", "f1"), relay.name("special", "f1")
        put(by_pyepics, value)
        assert write_status(connect(ca, by_caproto), [value]).success
        for name in (by_pyepics, by_caproto):
            np.testing.assert_array_equal([get(name)], [value])
            np.testing.assert_array_equal(connect(ca, name).read().data, [value])
    array = relay.name("special", "f4")
    values = [float("nan"), float("inf"), float("-inf"), 1.0]
    put(array, values)
    np.testing.assert_array_equal(get_array(array), values)
    np.testing.assert_array_equal(connect(ca, array).read(data_count=0).data, values)


def test_nan_as_text_to_an_int_fails_and_keeps_the_value(relay, ca):
    name = relay.name("count", "i1")
    put(name, 12)
    for text in ("nan", "inf", "-inf"):
        assert not write_status(connect(ca, name), [text], data_type=ChannelType.STRING).success
    assert get(name) == 12


def test_nan_as_a_double_to_an_int_fails(relay, ca):
    name = relay.name("count", "i1")
    put(name, 12)
    assert not write_status(connect(ca, name), [float("nan")], data_type=ChannelType.DOUBLE).success
    assert get(name) == 12


def test_text_longer_than_a_char_array_is_cut_or_refused(relay, ca):
    name = relay.name("short", "c10")
    put(name, "0123")
    # pyepics cuts the text to the PV's count itself: the first 10 characters go in.
    put(name, "abcdefghijklmnopqrst")
    assert get_array(name, as_string=True) == "abcdefghij"
    # caproto sends all 20: CA refuses a put of more elements than the PV has.
    status = write_status(connect(ca, name), b"ABCDEFGHIJKLMNOPQRST")
    assert status.name == "ECA_BADCOUNT", status
    assert get_array(name, as_string=True) == "abcdefghij"
    assert write_status(connect(ca, name), b"KLMNOPQRST").success
    assert get_array(name, as_string=True) == "KLMNOPQRST"


def test_string_of_40_characters_or_more_is_refused_and_39_go_in(relay, ca):
    """A DBR_STRING is 40 bytes with its terminator: at most 39 characters travel.
    pyepics refuses longer text itself; caproto sends 40 bytes without a
    terminator, and the relay refuses that: the put fails, the value stays."""
    name = relay.name("label", "s1")
    put(name, "short")
    with pytest.raises(ValueError):
        epics.caput(name, "y" * 50, wait=True, timeout=5)
    pv = connect(ca, name)
    mark = len(relay.log())
    for n in (50, 41, 40):
        assert not write_status(pv, ["z" * n]).success, n
        assert get(name) == "short"
    assert "refused put to " + name in relay.log()[mark:]
    assert write_status(pv, ["w" * 39]).success
    assert get(name) == "w" * 39
    # caproto-put sends the first 40 characters, without a terminator: refused too
    # (it reports the value it reads back afterwards, and exits 0).  The same refusal
    # of the same PV within a minute is logged once: the four are one line.
    caproto_cli("put", "-c", name, "q" * 50)
    assert get(name) == "w" * 39
    assert pv.read().data == [b"w" * 39]
    assert relay.log()[mark:].count("refused put to " + name) == 1


def test_more_elements_than_the_count_are_cut_or_refused(relay, ca):
    name = relay.name("four", "f4")
    put(name, [1.0, 2.0])
    # pyepics cuts the array to the PV's count before it sends it.
    put(name, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    np.testing.assert_array_equal(get_array(name), [1.0, 2.0, 3.0, 4.0])
    # caproto sends all six: refused, value unchanged.
    status = write_status(connect(ca, name), [9.0, 8.0, 7.0, 6.0, 5.0, 4.0])
    assert status.name == "ECA_BADCOUNT", status
    np.testing.assert_array_equal(get_array(name), [1.0, 2.0, 3.0, 4.0])
    buffer = relay.name("four", "F4")
    put(buffer, [1.0])
    status = write_status(connect(ca, buffer), [9.0, 8.0, 7.0, 6.0, 5.0, 4.0])
    assert status.name == "ECA_BADCOUNT", status
    np.testing.assert_array_equal(get_array(buffer), [1.0])
    assert write_status(connect(ca, buffer), [2.0, 3.0, 4.0, 5.0]).success
    np.testing.assert_array_equal(get_array(buffer), [2.0, 3.0, 4.0, 5.0])


# -- 3. bad input: bytes on a shard's socket ---------------------------------------------------


def put_entry(**kw) -> bytes:
    """A batch of one Put entry, with the fields ``kw`` changed."""
    e = {
        "kind": Put.KIND,
        "name": "",
        "req": 1,
        "stamp": 0.0,
        "data": ["<f8", 1, None],
        "callback": False,
        "expires": 0.0,
    }
    e.update(kw)
    return BATCH_TAG + msgpack.packb([list(e.values())], use_bin_type=True)


def malformed(name: str) -> list[list[bytes]]:
    """Messages every decoder must drop, each aimed at the PV ``name`` where it has one."""
    rng = np.random.default_rng(7)
    # An array too large to travel inline: the batch is two frames.
    valid = [bytes(f) for f in encode_batch([Put(name, 1, 0.0, np.full(1000, 666.0))])]
    return [
        [rng.bytes(64)],  # random bytes, one frame
        [rng.bytes(16) for _ in range(5)],  # random bytes, five frames
        [BATCH_TAG],  # truncated: the tag alone
        [valid[0][:12]],  # truncated entries
        valid[:1],  # truncated: the data frame missing
        [valid[0], valid[1][:5]],  # truncated data frame
        [b"CRB1" + valid[0][len(BATCH_TAG) :], valid[1]],  # another protocol version
        [valid[0][len(BATCH_TAG) :], valid[1]],  # no tag
        [put_entry(name=name, data=["<f8", 10**8, None]), b"\0" * 8],  # a huge declared array
        [put_entry(name=name, data=["<f8", 2**40, None]), b"\0" * 8],
        [put_entry(name=name, data=["<f8", 2**63 - 1, None])],
        [put_entry(name=name, data=["O", 1, None]), b"\0" * 8],  # a dtype not allowed
        [put_entry(name=name, kind=99), b"\0" * 8],  # no such kind of message
        [BATCH_TAG + msgpack.packb([[Put.KIND, name]]), b"\0" * 8],  # an entry too short
        [*valid, b"one frame too many"],
    ]


def test_garbage_on_a_shard_socket_is_dropped_and_harms_nothing(make_relay, ca):
    relay = make_relay(shards=2)
    names = {}
    for k in range(2):
        while True:
            name = relay.name(f"wire{k}", "f1")
            if shard_for(name, 2) == k:
                break
        names[k] = name
        put(name, 10.0 + k)
    before = pids(relay)
    config = load_config(prefix=relay.prefix, shards=2, data_dir=str(relay.data_dir))
    mark = len(relay.log())
    ctx = zmq.Context()
    sent = {}
    try:
        for k, name in names.items():
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(config.shard_endpoint(k))
            messages = malformed(name) * 3
            for frames in messages:
                sock.send_multipart(frames)
            sent[k] = len(messages)
            sock.close()
    finally:
        ctx.term()

    def dropped(k: int) -> int:
        return relay.log()[mark:].count(f"shard {k}: dropped a malformed message")

    for k in names:
        wait_for(lambda k=k: dropped(k) >= sent[k], what=f"shard {k} to drop {sent[k]} messages")
    assert {k: dropped(k) for k in names} == sent
    assert "Traceback" not in relay.log()[mark:]
    assert pids(relay) == before
    for k, name in names.items():
        assert get(name) == 10.0 + k
        assert stored(relay, name)[0] == 0
        put(name, 20.0 + k)
        assert get(name) == 20.0 + k
    fresh = relay.name("after", "i1")
    put(fresh, 3)
    assert get(fresh) == 3


# -- 3. bad input: configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args, toml, words",
    [
        (["--max-bytes", "0"], None, ["max_bytes"]),
        (["--max-bytes", "lots"], None, ["--max-bytes"]),
        ([], "max_bytes = -5\n", ["max_bytes"]),
        ([], 'max_bytes = "1G"\n', ["max_bytes"]),
        (["--access-security", "/nonexistent/relay.acf"], None, ["access_security"]),
        ([], 'access_security = "/nonexistent/relay.acf"\n', ["access_security"]),
        ([], 'access_security = ""\n', ["access_security"]),
        ([], 'access_group = ""\n', ["access_group"]),
        ([], "access_group = 5\n", ["access_group"]),
        ([], 'access_group = "\\u0007"\n', ["access_group"]),
        (["--autosave-period", "0"], None, ["autosave_period"]),
        (["--autosave-period", "x"], None, ["--autosave-period"]),
        ([], 'autosave_period = "x"\n', ["autosave_period"]),
        ([], "autosave_period = 0\n", ["autosave_period"]),
        ([], "autosave_period = true\n", ["autosave_period"]),
        ([], "autosave_period = 3601\n", ["autosave_period"]),
        ([], "fields = 5\n", ["fields"]),
        ([], '[fields."x*"]\nBOGUS = 1\n', ["fields", "BOGUS"]),
        ([], '[fields."x*"]\nEGU = 5\n', ["fields", "EGU"]),
        ([], '[fields."x*"]\nPREC = inf\n', ["fields", "PREC"]),
        ([], '[fields."x*"]\nPREC = nan\n', ["fields", "PREC"]),
        ([], '[fields."x*"]\nHHSV = -inf\n', ["fields", "HHSV"]),
        ([], '[fields."x*"]\nHIHI = 1' + "0" * 400 + "\n", ["fields", "HIHI"]),
        ([], '[fields."x*"]\nHIHI = nan\n', ["fields", "HIHI"]),
        ([], 'endpoints = ["tcp://127.0.0.1:5701"]\n', ["endpoints", "2 shards"]),
        ([], 'shards = 1\nendpoints = ["udp://127.0.0.1:5701"]\n', ["endpoints"]),
        ([], 'shards = 1\nendpoints = ["tcp://10.1.2.3:5701"]\n', ["keys_dir", "10.1.2.3"]),
        (["--max-pvs", "100000000"], None, ["max_pvs"]),
        ([], "max_pvs = 1" + "0" * 400 + "\n", ["max_pvs"]),
        ([], "max_name_length = 7\n", ["max_name_length"]),
        ([], "max_name_length = 100000\n", ["max_name_length"]),
    ],
)
def test_bad_configuration_exits_2_naming_the_key(tmp_path, args, toml, words):
    line = config_error(tmp_path, *args, toml=toml)
    for word in words:
        assert word in line, line


def test_keys_dir_without_its_keys_exits_2(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    line = config_error(tmp_path, "--keys-dir", str(keys))
    assert "keys_dir" in line and "shard.key" in line, line
    (keys / "shard.key").write_text("")
    line = config_error(tmp_path, "--keys-dir", str(keys))
    assert "keys_dir" in line and "broker.key" in line, line
    line = config_error(tmp_path, "--keys-dir", str(tmp_path / "none"))
    assert "keys_dir" in line, line
