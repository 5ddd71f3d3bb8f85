"""`pva = true`: the supervisor's slot for `carelay pva`, and a clear stop without p4p."""

from __future__ import annotations

import logging

from carelay.common import exits
from carelay.common.config import load_config
from carelay.supervisor import supervisor as sup


def test_pva_gets_a_slot_among_the_front_ends(tmp_path):
    s = sup.Supervisor(load_config(None, data_dir=str(tmp_path), pva=True), [])
    names = [w.name for w in s.watchers]
    assert names == ["shard 0", "shard 1", "broker", "pva"]
    # Stopped with the brokers, before the shards.
    assert [w.name for w in s.brokers] == ["broker", "pva"]
    assert "pva" not in [w.name for w in sup.Supervisor(load_config(None), []).watchers]


def test_pva_without_p4p_stops_at_once_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sup, "pva_installed", lambda: False)
    s = sup.Supervisor(load_config(None, data_dir=str(tmp_path), pva=True), [])
    with caplog.at_level(logging.ERROR):
        assert s.run() == exits.CANNOT_START
    assert "pip install 'carelay[pva]'" in caplog.text
    assert not (tmp_path / "run").exists()  # nothing started
