"""Access rules that a client cannot fake: HAG membership by the circuit's peer address.

A raw CA client (caproto's protocol objects over a plain socket) can claim any user
and host name.  With ``access_by_ip`` (the default) the relay matches HAG entries
against the address the client connects from, so a client that claims a permitted
host from another address gets no write (and so no create) access, and one that
connects from a permitted address does, whatever host name it claims.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid

import caproto
import numpy as np
import pytest

from tests.system.clients import get_array, put, pvlist
from tests.system.conftest import CA_PORT
from tests.system.test_hardening import me
from tests.system.test_processes import status_rows

USER = "alice"


def acf(path, hosts: str, users: str = USER) -> str:
    """Everyone reads; ``users`` write from ``hosts`` only."""
    path.write_text(
        f"UAG(writers) {{{users}}}\n"
        f"HAG(opis) {{{hosts}}}\n"
        "ASG(DEFAULT) {\n"
        "    RULE(1, READ)\n"
        "    RULE(1, WRITE) {\n"
        "        UAG(writers)\n"
        "        HAG(opis)\n"
        "    }\n"
        "}\n"
    )
    return str(path)


class RawClient:
    """One CA circuit from ``source`` that claims ``host`` and USER."""

    def __init__(self, source: str, host: str) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", CA_PORT), timeout=5, source_address=(source, 0)
        )
        self.received: list = []
        self.circuit = caproto.VirtualCircuit(caproto.CLIENT, ("127.0.0.1", CA_PORT), 0)
        self.send(
            caproto.VersionRequest(priority=0, version=13),
            caproto.HostNameRequest(host),
            caproto.ClientNameRequest(USER),
        )

    def send(self, *commands) -> None:
        for buf in self.circuit.send(*commands):
            self.sock.sendall(buf)

    def next(self, kind):
        """The next command of type ``kind`` from the server."""
        while True:
            while self.received:
                command = self.received.pop(0)
                if isinstance(command, kind):
                    return command
            commands, _ = self.circuit.recv(self.sock.recv(65536))
            for command in commands:
                self.circuit.process_command(command)
            self.received.extend(commands)

    def put(self, name: str, value: float) -> tuple[int, bool]:
        """(access rights, whether a put with callback succeeded) for a new channel."""
        cid = int(uuid.uuid4().int % 2**31)
        self.send(caproto.CreateChanRequest(name=name, cid=cid, version=13))
        rights = self.next(caproto.AccessRightsResponse).access_rights
        created = self.next(caproto.CreateChanResponse)
        self.send(
            caproto.WriteNotifyRequest(
                data=[value],
                data_type=caproto.ChannelType.DOUBLE,
                data_count=1,
                sid=created.sid,
                ioid=cid,
            )
        )
        answer = self.next((caproto.WriteNotifyResponse, caproto.ErrorResponse))
        ok = isinstance(answer, caproto.WriteNotifyResponse) and bool(answer.status.success)
        return int(rights), ok

    def close(self) -> None:
        self.sock.close()


def put_from(source: str, host: str, name: str) -> tuple[int, bool]:
    client = RawClient(source, host)
    try:
        return client.put(name, 1.5)
    finally:
        client.close()


READ, READ_WRITE = 1, 3


def test_a_claimed_host_from_another_address_is_denied(make_relay, tmp_path):
    relay = make_relay(shards=1, extra=["--access-security", acf(tmp_path / "r.acf", "localhost")])
    spoofed, honest = relay.name("spoofed", "f1"), relay.name("honest", "f1")
    # Claims the permitted host, from 127.0.0.2: read only, and the put creates nothing.
    assert put_from("127.0.0.2", "localhost", spoofed) == (READ, False)
    # From the permitted address, whatever host it claims: allowed.
    assert put_from("127.0.0.1", "elsewhere", honest) == (READ_WRITE, True)
    assert pvlist(relay) == [honest]


def test_real_clients_from_a_permitted_address_write_and_read_large_arrays(make_relay, tmp_path):
    # libca (pyepics) claims this machine's name, which no HAG holds: its address counts.
    relay = make_relay(shards=1, extra=["--access-security", acf(tmp_path / "r.acf", "localhost")])
    path = tmp_path / "r.acf"
    path.write_text(path.read_text().replace(f"{{{USER}}}", "{" + ", ".join(me()) + "}"))
    os.kill(status_rows(relay)["broker"]["pid"], signal.SIGHUP)
    relay.wait_log("access security reloaded", timeout=10)
    name = relay.name("big", "f500000")
    values = np.arange(500_000, dtype=float)
    put(name, values)
    np.testing.assert_array_equal(get_array(name), values)


def test_access_by_claimed_host_name_when_configured(make_relay, tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text("access_by_ip = false\n")
    path = acf(tmp_path / "r.acf", "localhost")
    relay = make_relay(shards=1, extra=["--config", str(config), "--access-security", path])
    # The claimed host name counts, wherever the client connects from.
    assert put_from("127.0.0.2", "localhost", relay.name("claimed", "f1")) == (READ_WRITE, True)
    assert put_from("127.0.0.1", "elsewhere", relay.name("other", "f1")) == (READ, False)


@pytest.mark.parametrize("how", ["sighup", "sighup-up", "reload-acf"])
def test_reload_reads_the_file_and_resolves_hosts_again(make_relay, tmp_path, how):
    path = tmp_path / "r.acf"
    relay = make_relay(shards=1, extra=["--access-security", acf(path, "localhost")])
    assert put_from("127.0.0.2", "x", relay.name("before", "f1")) == (READ, False)
    acf(path, '"127.0.0.2"')
    start = len(relay.log())
    if how == "sighup":
        os.kill(status_rows(relay)["broker"]["pid"], signal.SIGHUP)
    elif how == "sighup-up":
        relay.proc.send_signal(signal.SIGHUP)  # `carelay up` passes it to the broker
    else:
        r = subprocess.run(
            [*relay.argv("reload-acf")], capture_output=True, text=True, timeout=30, check=False
        )
        assert r.returncode == 0, r.stdout + r.stderr
    relay.wait_log("access security reloaded", start=start, timeout=10)
    assert put_from("127.0.0.2", "x", relay.name("after", "f1")) == (READ_WRITE, True)
    assert put_from("127.0.0.1", "localhost", relay.name("after", "f1")) == (READ, False)
    # A file gone bad: the rules in force stay, and the log says why.
    path.write_text("ASG(DEFAULT) { RULE(1, WRITE\n")
    start = len(relay.log())
    os.kill(status_rows(relay)["broker"]["pid"], signal.SIGHUP)
    relay.wait_log("access security not reloaded", start=start, timeout=10)
    assert put_from("127.0.0.2", "x", relay.name("still", "f1")) == (READ_WRITE, True)
