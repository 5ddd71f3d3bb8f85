"""CurveZMQ keys that do not match, or cannot be read: each side says so.

Before, a shard whose keys_dir held one more ``*.key`` file (pyzmq loaded them all,
failed on it, and admitted no one), a broker with keys from another ``carelay keys``,
or a shard with the wrong secret, all ended the same way, without a reason in either
log: the broker "not ready: waiting for shard 0", for good.  And a key file with a
malformed key ended in a traceback, or in "cannot listen on ...: Invalid argument".
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from types import SimpleNamespace

import pytest
import zmq

from bench.servers import free_port
from carelay.broker.link import shard_links
from carelay.common.config import ConfigError, load_config
from carelay.common.keys import KeysError, load_keys, make_keys
from carelay.shard.persist import ShardDatabase
from carelay.shard.server import ShardServer
from tests.unit.driven_shard import PREFIX


def _config(tmp_path, keys, port):
    config = load_config(
        prefix=PREFIX,
        shards=1,
        data_dir=str(tmp_path / "data"),
        endpoints=[f"tcp://127.0.0.1:{port}"],
        keys_dir=str(keys),
    )
    config.run_dir.mkdir(parents=True, exist_ok=True)
    return config


def _handshake(tmp_path, shard_keys, broker_keys, caplog, until):
    """A shard with ``shard_keys`` and a front-end link with ``broker_keys``; the link is
    watched until ``until(link)`` or 10 s.  What was logged."""
    port = free_port()
    server = ShardServer(
        _config(tmp_path, shard_keys, port), 0, db=ShardDatabase(tmp_path / "s.sqlite")
    )
    server.load()
    server.bind()
    stop = SimpleNamespace(stopping=False)
    serving = threading.Thread(target=server.serve, args=(stop,))
    serving.start()
    ctx = zmq.Context()
    (link,) = shard_links(ctx, _config(tmp_path, broker_keys, port))
    try:
        with caplog.at_level(logging.INFO):
            link.open()
            deadline = time.monotonic() + 10
            while not until(link) and time.monotonic() < deadline:
                link.disconnected()
                time.sleep(0.02)
    finally:
        link.close()
        stop.stopping = True
        serving.join(10)
        server.close()
        ctx.term()
    return caplog.text


@pytest.fixture
def keys(tmp_path):
    make_keys(tmp_path / "keys")
    return tmp_path / "keys"


def test_keys_of_another_carelay_keys_are_said_on_both_sides(tmp_path, keys, caplog):
    other = tmp_path / "other"
    make_keys(other)

    def both_said(link):
        return "CurveZMQ handshake failed" in caplog.text and "a connection failed" in caplog.text

    text = _handshake(tmp_path, keys, other, caplog, both_said)
    assert "shard 0 at tcp://127.0.0.1:" in text and "the CurveZMQ handshake failed" in text
    assert "a connection failed its CurveZMQ handshake" in text, text


def test_a_front_end_key_the_shard_does_not_know_is_refused_and_said(tmp_path, keys, caplog):
    """The shard's key right, the front-end's own another: the shard refuses it by name."""
    mixed = tmp_path / "mixed"
    other = tmp_path / "other"
    make_keys(other)
    shutil.copytree(keys, mixed)
    for suffix in (".key", ".key_secret"):
        shutil.copy(other / f"broker{suffix}", mixed / f"broker{suffix}")

    def both_said(link):
        return "shard 0 at" in caplog.text and "a connection failed" in caplog.text

    text = _handshake(tmp_path, keys, mixed, caplog, both_said)
    assert "a connection failed its CurveZMQ handshake (the key was refused, status 400)" in text
    assert "the CurveZMQ handshake failed (the key was refused, status 400)" in text, text


def test_a_stray_key_file_beside_the_keys_lets_the_broker_in(tmp_path, keys, caplog):
    shutil.copy(keys / "shard.key", keys / "tls-server.key")
    (keys / "garbage.key").write_text("not a certificate")
    got_in = []

    def in_sync(link):
        # The shard answers only a peer it admitted: a message back is the proof.
        if link.sock is not None and link.sock.poll(0):
            got_in.append(True)
        return bool(got_in)

    def hello(link):
        from carelay.common.messages import Hello
        from carelay.common.protocol import encode_batch

        if link.sock is not None and not getattr(link, "_said", False):
            try:
                link.sock.send_multipart(encode_batch([Hello(1)]), zmq.NOBLOCK)
                link._said = True
            except zmq.Again:
                pass
        return in_sync(link)

    text = _handshake(tmp_path, keys, keys, caplog, hello)
    assert got_in, text
    assert "handshake failed" not in text and "refused a peer" not in text


@pytest.mark.parametrize("name", ["shard.key_secret", "broker.key"])
def test_a_malformed_key_is_refused_naming_its_file(keys, name):
    path = keys / name
    if name == "broker.key":  # read where its secret is not (a shard's host)
        (keys / "broker.key_secret").unlink()
    path.write_text(
        path.read_text()
        .replace('secret-key = "', 'secret-key = "abc')
        .replace('public-key = "', 'public-key = "~~~')
    )
    with pytest.raises(KeysError, match=rf"{name}: its (public|secret) key is not a CurveZMQ key"):
        load_keys(keys, name.split(".")[0])


def test_a_keys_dir_that_cannot_be_read_is_a_configuration_error(tmp_path, keys, monkeypatch):
    import pathlib

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "is_file", denied)
    with pytest.raises(ConfigError, match="keys_dir: cannot read .*Permission denied"):
        _config(tmp_path, keys, 5999)
