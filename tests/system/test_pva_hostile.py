"""Hostile or careless PVA clients: the PVA front-end keeps the relay's limits as the CA
broker does, at most ``max_pvs`` provisional PVs (names that exist in no shard, held by
a client that never puts) at once besides the PVs that exist; a thousand idle
connections to its port, past the usual soft limit of 1,024 descriptors, lock no client
out; and garbage, a message cut short and a stalled one harm no other client."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct

import pytest

from tests.system.clients import role_pid as relay_pid
from tests.system.conftest import wait_for
from tests.system.pva import PVA_PORT, PvaRelay, pva_context, read_then_write
from tests.system.test_hardening import refusals

pytest.importorskip("p4p")


@pytest.fixture
def pva_relay(make_relay):
    return make_relay(shards=1, extra=["--max-pvs", "5"], kind=PvaRelay)


@pytest.fixture
def pva():
    ctx = pva_context()
    yield ctx
    ctx.close()


def test_provisional_pvs_over_pva_are_bounded_by_max_pvs(pva_relay, pva):
    relay = pva_relay
    kept = relay.name("kept", "f1")
    pva.put(kept, 3.0, timeout=5)
    names = [relay.name(f"held{k}", "f1") for k in range(8)]
    careless = pva_context()
    try:
        served, refused, subs = _hold_each(relay, careless, names)
        assert len(served) == 5, served
        assert not served & set(refused)
        for name in refused:
            assert "max_pvs (5) provisional PVs held" in refusals(relay, name)[0]
        # What exists is untouched.
        pva.put(kept, 4.0, timeout=5)
        assert pva.get(kept, timeout=5) == 4.0
        for sub in subs:
            sub.close()
    finally:
        careless.close()
    # Let go: room again, for a name refused before.
    wait_for(
        lambda: _creates(pva, refused[0]),
        timeout=20,
        what="a refused name served once the careless client went",
    )
    assert pva.get(refused[0], timeout=5) == 1.0


def test_field_channels_over_pva_are_bounded_by_max_pvs(pva_relay, pva):
    """Each field channel held costs the PVA front-end memory: at most max_pvs at once,
    the others refused for now and served once some are let go."""
    relay = pva_relay
    a, b = relay.name("fa", "f1"), relay.name("fb", "f1")
    pva.put(a, 1.0, timeout=5)
    pva.put(b, 2.0, timeout=5)
    names = [f"{pv}.{f}" for pv in (a, b) for f in ("EGU", "DESC", "HIHI", "LOLO")]
    careless = pva_context()
    try:
        served, refused, subs = _hold_each(relay, careless, names)
        assert len(served) == 5, served
        for name in refused:
            assert "max_pvs (5) field channels held" in refusals(relay, name)[0]
        pva.put(a, 3.0, timeout=5)  # what exists is served as before
        assert pva.get(a, timeout=5) == 3.0
        for sub in subs:
            sub.close()
    finally:
        careless.close()
    wait_for(
        lambda: _reads(pva, refused[0]),
        timeout=20,
        what="a refused field channel served once the careless client went",
    )


def _hold_each(relay, ctx, names: list[str]):
    """A monitor of each name through ``ctx``, held: (the names served, which got a first
    event; those refused, in the relay's log; the subscriptions), once each is one or the
    other."""
    seen: set[str] = set()
    subs = [ctx.monitor(n, lambda _v, n=n: seen.add(n)) for n in names]

    def settled():
        refused = [n for n in names if refusals(relay, n)]
        return (set(seen), refused) if len(seen) + len(refused) == len(names) else None

    served, refused = wait_for(settled, what="each held name served or refused")
    return served, refused, subs


def _reads(ctx, name: str) -> bool:
    try:
        ctx.get(name, timeout=1)
    except TimeoutError:
        return False
    return True


def _creates(ctx, name: str) -> bool:
    try:
        ctx.put(name, 1.0, timeout=1)
    except TimeoutError:
        return False
    return True


#: The soft descriptor limit a service often starts with (systemd's default, a shell's).
_USUAL_SOFT = 1024


class _UsualLimits(PvaRelay):
    """A relay started with the usual soft descriptor limit."""

    def argv(self, command: str = "up") -> list[str]:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return ["prlimit", f"--nofile={_USUAL_SOFT}:{hard}", "--", *super().argv(command)]


@pytest.fixture
def usual_relay(make_relay):
    return make_relay(shards=1, kind=_UsualLimits)


def test_a_thousand_idle_connections_lock_no_pva_client_out(usual_relay, pva):
    relay = usual_relay
    name = relay.name("idle", "f1")
    pva.put(name, 1.0, timeout=5)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2 * _USUAL_SOFT + 100:
        pytest.skip(f"the hard descriptor limit ({hard}) leaves no room for the test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        with contextlib.ExitStack() as stack:
            for k in range(_USUAL_SOFT + 100):
                try:
                    s = socket.create_connection(("127.0.0.1", PVA_PORT), 5)
                except OSError as e:
                    pytest.fail(f"idle connection {k} to the PVA port not accepted: {e}")
                stack.enter_context(s)  # held open, sending nothing
            assert read_then_write(name, 2.0) == 1.0
            assert pva.get(name, timeout=5) == 2.0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_garbage_and_stalled_messages_on_the_pva_port_harm_no_client(pva_relay, pva):
    relay = pva_relay
    name = relay.name("rude", "f1")
    pva.put(name, 1.0, timeout=5)
    pid = relay_pid(relay, "pva")
    header = struct.Struct("<BBBBI")  # magic, version, flags, command, payload size
    rude: list[socket.socket] = []
    try:
        for payload in (
            os.urandom(4096),  # garbage
            header.pack(0xCA, 2, 0, 4, 1000) + b"\x01" * 10,  # a message cut short, stalled
            header.pack(0xCA, 2, 0, 4, 2**31 - 1) + b"\x02" * 65536,  # a huge one, stalled
            header.pack(0xCA, 2, 0, 4, 16)[:5],  # half a header, stalled
        ):
            s = socket.create_connection(("127.0.0.1", PVA_PORT), 5)
            rude.append(s)
            s.sendall(payload)
        # Every other client is served meanwhile, and the front-end lives on.
        assert read_then_write(name, 2.0) == 1.0
        assert pva.get(name, timeout=5) == 2.0
        assert relay_pid(relay, "pva") == pid
    finally:
        for s in rude:
            s.close()
