"""A CA broker on another host: ``carelay broker --config FILE --index K`` joins the
shards of a running ``carelay up`` over tcp and CurveZMQ.

On one host: the relay's shards listen on loopback tcp endpoints with keys; the second
broker is started by hand from a configuration of its own (the same endpoints, prefix
and keys, a data directory of its own, as on another machine) on a second CA port.
A put through it is read through broker 0, and the other way round.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from bench.servers import free_port
from tests.system.conftest import CA_PORT, CARELAY, REPEATER_PORT, Relay, wait_for
from tests.system.test_multihost import Proc
from tests.system.test_two_brokers import PORT_B, _config, _on_b


@pytest.fixture
def site(tmp_path, request):
    Relay.give_way()
    keys = tmp_path / "keys"
    made = subprocess.run([*CARELAY, "keys", str(keys)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    used = {CA_PORT, REPEATER_PORT, PORT_B}
    first = free_port(used)
    shard_ports = [first, free_port(used | {first})]
    endpoints = ", ".join(f'"tcp://127.0.0.1:{p}"' for p in shard_ports)
    common = f'endpoints = [{endpoints}]\nkeys_dir = "{keys}"\n'
    relay_config = tmp_path / "relay.toml"
    relay_config.write_text(common)
    relay = Relay(tmp_path / "relayhost", shards=2, extra=["--config", str(relay_config)])
    (tmp_path / "relayhost").mkdir()
    relay.start()
    # The other host's configuration: both doors, the shards' endpoints, the keys.
    remote_config = _config(tmp_path / "remote.toml", f"shards = 2\n{common}\n")
    argv = [*CARELAY, "broker", "--config", str(remote_config), "--index", "1"]
    argv += ["--prefix", relay.prefix, "--data-dir", str(tmp_path / "brokerhost")]
    broker = Proc(argv, tmp_path / "remote-broker.log")
    yield relay, broker
    broker.stop()
    relay.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(f"\n----- relay log -----\n{relay.log()}\n----- remote broker log -----")
        print(broker.log())


def test_a_put_through_a_remote_broker_is_read_through_broker_0(site, ca):
    relay, broker = site
    broker.wait_log("ready:")
    name = relay.name("remote", "f1")
    done = _on_b("put", "-c", name, "6.5")  # creates it, through the remote broker
    assert done.returncode == 0, done.stdout + done.stderr
    (pv,) = ca.get_pvs(name, timeout=5)
    assert pv.read(timeout=5).data[0] == 6.5  # through broker 0
    # And back: a put with callback through broker 0 is served by the remote broker.
    assert pv.write([7.5], wait=True, timeout=5).status.success
    wait_for(
        lambda: _on_b("get", "--terse", name).stdout.strip() == "7.5",
        what=f"{name} = 7.5 through the remote broker",
    )
    # It says which broker it is; broker 0 serves from a data directory it cannot see,
    # so it neither counts it nor raises an alarm for it.
    base = relay.prefix + "relay:"
    assert _on_b("get", "--terse", base + "BROKER").stdout.strip() == "1"
    assert _on_b("get", "--terse", base + "BROKER_CNT").stdout.strip() == "2"
    fmt = "{response.data[0]} {response.metadata.severity}"
    wait_for(
        lambda: (
            _on_b(
                "get", "-d", "DBR_TIME_LONG", "--format", fmt, base + "BROKER_UP_CNT"
            ).stdout.strip()
            in ("1 AlarmSeverity.NO_ALARM", "1 0")
        ),
        what="the remote broker counting itself, with no alarm",
    )
    assert broker.proc.poll() is None
    broker.stop(signal.SIGTERM)
    assert broker.proc.returncode == 0
