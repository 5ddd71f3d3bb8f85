"""Access security over PV Access: the relay's ACF governs PVA puts as it does CA puts.

A p4p client connects from 127.0.0.1 with this process's account.  While the ACF lets
that account write from ``localhost``, its PVA puts create and change PVs; once the
file (reloaded with ``carelay reload-acf``) lets it write from 127.0.0.2 only, its puts
(a value, a creation, a delete) fail with the reason and change nothing, read back over
CA and PVA.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.system.clients import Context, close, connect, get, write_status
from tests.system.conftest import wait_for
from tests.system.pva import PvaRelay, pva_context, with_context
from tests.system.test_access_ip import acf as ca_acf
from tests.system.test_hardening import me

p4p = pytest.importorskip("p4p")


def acf(path, hosts: str) -> None:
    """Everyone reads; this process's account writes from ``hosts`` only."""
    ca_acf(path, hosts, ", ".join(f'"{u}"' for u in me()))


def test_pva_puts_follow_the_access_security_file(tmp_path):
    relay, path = _guarded_relay(tmp_path)
    ctx = pva_context()
    try:
        name, fresh = relay.name("guarded", "f1"), relay.name("fresh", "f1")
        # Allowed: the put creates the PV and changes it.
        ctx.put(name, 1.5, timeout=5)
        assert ctx.get(name, timeout=5) == 1.5
        wait_for(lambda: get(name) == 1.5, what="CA to read the PVA put")

        acf(path, '"127.0.0.2"')
        start = len(relay.log())
        r = subprocess.run(
            [*relay.argv("reload-acf")], capture_output=True, text=True, timeout=30, check=False
        )
        assert r.returncode == 0, r.stdout + r.stderr
        relay.wait_log(" pva: access security reloaded", start=start, timeout=10)

        with pytest.raises(p4p.client.thread.RemoteError, match="access denied"):
            ctx.put(name, 2.5, timeout=5)
        with pytest.raises(p4p.client.thread.RemoteError, match="access denied"):
            ctx.put(name, {"display.units": "mm"}, timeout=5)
        with pytest.raises(p4p.client.thread.RemoteError, match="access denied"):
            ctx.put(fresh, 1.0, timeout=5)
        with pytest.raises(p4p.client.thread.RemoteError, match="access denied"):
            ctx.put(relay.prefix + "delpv", name, timeout=5)
        stamp = ctx.get(name, timeout=5).timestamp
        for field, value in (("EGU", "mm"), ("PROC", 1), ("VAL", 2.5)):  # field channels
            with pytest.raises(p4p.client.thread.RemoteError, match="access denied"):
                ctx.put(f"{name}.{field}", value, timeout=5)
        # Nothing changed, over either protocol; nothing was created or deleted.
        assert ctx.get(name, timeout=5) == 1.5
        assert ctx.get(name, timeout=5).raw["display.units"] == ""
        assert ctx.get(name + ".EGU", timeout=5) == ""
        assert ctx.get(name, timeout=5).timestamp == stamp  # not processed
        assert get(name) == 1.5
        assert ctx.get(relay.prefix + "pvlist", timeout=5) == name
        logged = f"refused PVA put to {name} (shard 0) from "
        assert any(
            logged in line and "@127.0.0.1: access denied" in line
            for line in relay.log()[start:].splitlines()
        ), relay.log()[start:]
    finally:
        ctx.close()
        relay.stop()


@pytest.mark.slow
def test_a_client_without_read_access_gets_no_channel(tmp_path):
    relay, path = _guarded_relay(tmp_path)
    try:
        name = relay.name("hidden", "f1")
        with_context(lambda ctx: ctx.put(name, 1.5, timeout=5))
        # Reads only from 127.0.0.2 now: the client at 127.0.0.1 reads nothing.
        start = _reads_only_from_elsewhere(relay, path)
        with pytest.raises(TimeoutError):
            with_context(lambda ctx: ctx.get(name, timeout=2))
        relay.wait_log(
            f"refused PVA channel {name} to 127.0.0.1: access denied (no read access)",
            start=start,
            timeout=10,
        )
    finally:
        relay.stop()


@pytest.mark.slow
def test_a_reload_takes_read_access_from_channels_already_open(tmp_path):
    relay, path = _guarded_relay(tmp_path)
    ctx = pva_context()
    try:
        name = relay.name("held", "f1")
        ctx.put(name, 1.5, timeout=5)
        assert ctx.get(name, timeout=5) == 1.5  # this context holds the channel open
        start = _reads_only_from_elsewhere(relay, path)
        # The channel it held is closed, just after the reload (on the thread that closes
        # channels); reconnecting, it is refused, and reads nothing.
        wait_for(lambda: not _reads(ctx, name), timeout=10, what=f"{name} unreadable")
        relay.wait_log(f"refused PVA channel {name} to 127.0.0.1", start=start, timeout=10)
        assert not _reads(ctx, name)
    finally:
        ctx.close()
        relay.stop()


def test_the_pva_side_reads_the_file_as_epics_does(tmp_path):
    """A file EPICS loads (a HAG of a bare address, a last comment with no newline) is
    the PVA side's too, and its rules grant there what they grant on CA: a RULE(0, ...)
    nothing, since pcaspy adds every CA client at level 1.  Before, p4p's parser refused
    this file, so PVA clients got no access at all, and a parsable file's RULE(0, WRITE)
    let PVA clients write where CA clients could not."""
    path = tmp_path / "r.acf"
    accounts = ", ".join(f'"{u}"' for u in me())
    path.write_text(
        f"UAG(me) {{{accounts}}}\n"
        "HAG(local) {127.0.0.1}\n"
        "ASG(DEFAULT) {\n"
        "    RULE(1, READ) { HAG(local) }\n"
        "    RULE(0, WRITE) { UAG(me) }\n"
        "}\n"
        "# level 0: the relay's clients are at level 1"
    )
    PvaRelay.give_way()
    relay = PvaRelay(tmp_path, shards=1, extra=["--access-security", str(path)]).start()
    ctx = pva_context()
    ca = Context()
    try:
        name = relay.name("levelled", "f1")
        assert ctx.get(relay.prefix + "pvlist", timeout=5) == ""  # read access
        with pytest.raises(p4p.client.thread.RemoteError, match="access denied"):
            ctx.put(name, 1.5, timeout=5)
        status = write_status(connect(ca, name), [1.5])
        assert not status.success and status.name == "ECA_NOWTACCESS", status
        assert ctx.get(relay.prefix + "pvlist", timeout=5) == ""  # nothing created
        assert "not loaded" not in relay.log()
        assert "RULE(0, ...) of " in relay.log()  # said at the start
    finally:
        close(ca)
        ctx.close()
        relay.stop()


def _reads(ctx, name: str) -> bool:
    try:
        ctx.get(name, timeout=1)
    except (TimeoutError, p4p.client.thread.Disconnected, p4p.client.thread.RemoteError):
        # A RemoteError ("Get races with type change"): the channel closed under the get.
        return False
    return True


def _guarded_relay(tmp_path):
    """(relay, its ACF's path): a relay with PVA whose ACF lets everyone read and this
    process's account write from localhost."""
    path = tmp_path / "r.acf"
    acf(path, "localhost")
    PvaRelay.give_way()
    relay = PvaRelay(tmp_path, shards=1, extra=["--access-security", str(path)]).start()
    return relay, path


def _reads_only_from_elsewhere(relay, path) -> int:
    """Rewrite the ACF so that only 127.0.0.2 reads, and reload it with SIGHUP to
    `carelay up` (which passes it on); returns where the relay's log stood before."""
    path.write_text(path.read_text().replace("RULE(1, READ)", "RULE(1, READ) { HAG(opis) }"))
    acf_hosts(path, '"127.0.0.2"')
    start = len(relay.log())
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_log(" pva: access security reloaded", start=start, timeout=10)
    return start


def acf_hosts(path, hosts: str) -> None:
    """The file at ``path`` with its HAG holding ``hosts``."""
    text = path.read_text()
    head, rest = text.split("HAG(opis) {", 1)
    path.write_text(f"{head}HAG(opis) {{{hosts}}}{rest.split('}', 1)[1]}")
