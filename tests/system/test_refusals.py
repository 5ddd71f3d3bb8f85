"""Refused names cost bounded memory and log, and a name that is not UTF-8 is the relay's
own refusal, not an error on stderr.

Searches go as raw UDP CA messages to the relay's CA port, as a careless or hostile
client can send them: names no client library would send (20 kB long, not UTF-8).
"""

from __future__ import annotations

import re
import socket
import struct
import uuid

import pytest

from tests.system.conftest import CA_PORT, wait_for
from tests.system.test_processes import status_rows

#: A line the relay itself logs: a timestamp, a level and the process role.
RELAY_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} [A-Z]+ [a-z]")


def search_packet(raw_name: bytes, cid: int) -> bytes:
    """A CA version message and one search request for ``raw_name``, as UDP bytes."""
    payload = raw_name + b"\0"
    payload += b"\0" * (-len(payload) % 8)
    version = struct.pack(">HHHHII", 0, 0, 1, 13, 0, 0)
    search = struct.pack(">HHHHII", 6, len(payload), 5, 13, cid, cid) + payload
    return version + search


def answered(sock: socket.socket, name: str, cid: int) -> bool:
    """Search for ``name`` and wait for the answer: the relay has read what came before."""
    sock.sendto(search_packet(name.encode(), cid), ("127.0.0.1", CA_PORT))
    while True:
        try:
            answer = sock.recv(4096)
        except TimeoutError:
            return False
        if len(answer) >= 32 and struct.unpack(">HHHHII", answer[16:32])[5] == cid:
            return True


def search_all(names: list[bytes], barrier: str, batch: int = 4) -> None:
    """Send searches for ``names``, a few at a time (what the server's receive buffer
    holds), each batch followed by a search for ``barrier`` that must be answered."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5.0)
        for start in range(0, len(names), batch):
            for raw in names[start : start + batch]:
                s.sendto(search_packet(raw, 1), ("127.0.0.1", CA_PORT))
            cid = 100_000 + start
            assert answered(s, barrier, cid) or answered(s, barrier, cid), "no answer"


def rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def long_names(prefix: str, n: int, size: int = 20_000) -> list[bytes]:
    tag = uuid.uuid4().hex[:8]
    return [f"{prefix}{tag}{k:06d}".encode() + b"x" * size + b"_f1" for k in range(n)]


#: What 20,000 refused names of 20 kB may cost the broker, at most.
RSS_BOUND = 24 * 2**20
LOG_BOUND = 256 * 1024


def test_many_long_refused_names_cost_bounded_memory_and_log(make_relay):
    relay = make_relay(shards=1)
    good = relay.name("good", "f1")
    from tests.system.clients import put

    put(good, 1.0)
    broker = status_rows(relay)["broker"]["pid"]
    log_before = relay.log_path.stat().st_size
    # Warm up: the allocator's pools and the server's buffers are in use before we measure.
    search_all(long_names(relay.prefix, 200), good)
    rss_before = rss(broker)

    search_all(long_names(relay.prefix, 20_000), good)

    grown, logged = rss(broker) - rss_before, relay.log_path.stat().st_size - log_before
    print(f"broker RSS +{grown / 2**20:.1f} MiB, log +{logged / 1024:.1f} KiB")
    assert grown < RSS_BOUND, f"broker RSS grew by {grown / 2**20:.1f} MiB"
    assert logged < LOG_BOUND, f"the log grew by {logged / 1024:.1f} KiB"
    # What is logged carries the start of a name, never the whole of it.
    new = relay.log()[-logged:].splitlines() if logged else []
    assert all(len(line) < 600 for line in new), max(map(len, new))
    assert status_rows(relay)["broker"]["pid"] == broker


@pytest.mark.parametrize("raw", [b"caf\xe9_f1", b"\xff\xfe_f1"], ids=["latin1", "ff-fe"])
def test_a_name_that_is_not_utf8_is_refused_with_the_relays_own_line(make_relay, raw):
    relay = make_relay(shards=1)
    good = relay.name("good", "f1")
    from tests.system.clients import put

    put(good, 1.0)
    start = len(relay.log())
    search_all([relay.prefix.encode() + raw], good, batch=1)
    search_all([relay.prefix.encode() + raw], good, batch=1)  # searched again: no new line
    new = relay.log()[start:].splitlines()
    refused = [line for line in new if "refused PV name" in line]
    assert len(refused) == 1 and "not UTF-8" in refused[0], new
    # Nothing but the relay's own lines: no SWIG error, no traceback, no "crashed".
    assert all(RELAY_LINE.match(line) for line in new), new
    assert not any("UnicodeDecodeError" in line or "crashed" in line for line in new), new


def test_what_pcas_writes_on_bad_searches_is_bounded_relay_log(make_relay):
    """PCAS reports a search for an empty name on stderr in two lines: they become relay
    log lines, and above a rate they are only counted."""
    relay = make_relay(shards=1)
    good = relay.name("good", "f1")
    from tests.system.clients import put

    put(good, 1.0)
    start = relay.log_path.stat().st_size
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(1000):
            s.sendto(search_packet(b"", 1), ("127.0.0.1", CA_PORT))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        # Answered: the relay has read the datagrams before.
        s.settimeout(1.0)
        wait_for(lambda: answered(s, good, 7), timeout=30, what="an answer after bad searches")
    # PCAS writes it with or without its "CAS: " (two threads write its lines: which
    # comes first, and how, varies from run to run).
    relay.wait_log("zero length PV name", timeout=10)
    new = relay.log_path.read_bytes()[start:].decode(errors="replace").splitlines()
    assert len(new) < 100, len(new)
    assert all(RELAY_LINE.match(line) for line in new), new[:10]
    assert status_rows(relay)["broker"]["pid"]
