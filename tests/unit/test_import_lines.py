"""``carelay import`` into a stopped relay and ``carelay list``, in this process: a line
the relay cannot serve is refused by its number, the good lines beside it imported."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest

from carelay.common import exits
from carelay.common.config import load_config
from carelay.shard.persist import ShardDatabase
from carelay.supervisor.transfer import import_pvs, list_pvs, read_pvs

GOOD_STAMP = 1795904681.5


@pytest.fixture
def config(tmp_path):
    return load_config(data_dir=str(tmp_path / "data"), prefix="P:", shards=2)


def line(name: str, stamp="1795904681.5", value="[1.5]") -> str:
    return (
        f'{{"name": "P:{name}_f1", "type": "f", "count": 1, "stamp": {stamp}, '
        f'"fields": {{}}, "value": {value}}}\n'
    )


def test_bad_stamps_and_values_are_refused_by_line_and_the_others_imported(
    config, tmp_path, caplog
):
    names = [f"good{k}" for k in range(8)]
    bad = [
        ("nan", '"nan"', "[1.5]", "stamp: 'nan' is not a time"),
        ("inf", '"inf"', "[1.5]", "stamp: 'inf' is not a time"),
        ("huge", "1e300", "[1.5]", "stamp: 1e+300 is not a time"),
        ("early", "1.0", "[1.5]", "stamp: 1.0 is not a time"),
        ("digits", "1795904681.5", "[" + "7" * 400 + "]", "7777777777"),
    ]
    # Good lines before, between and after the bad ones, for both stores.
    text = "".join(line(n) for n in names[:4])
    text += "".join(line(n, stamp, value) for n, stamp, value, _ in bad)
    text += "".join(line(n) for n in names[4:])
    path = tmp_path / "in.jsonl"
    path.write_text(text)

    with caplog.at_level(logging.INFO, logger="carelay"):
        assert import_pvs(config, path) == exits.IMPORT_REFUSED
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refusals) == len(bad), refusals
    for k, (n, _, _, why) in enumerate(bad):
        assert refusals[k].startswith(f"refused line {5 + k}: P:{n}_f1: "), refusals[k]
        assert why in refusals[k], refusals[k]
    assert f"imported {len(names)} PVs into the stores; {len(bad)} refused" in caplog.text

    stored = {row.name: row for _, row in read_pvs(config)}
    assert sorted(stored) == sorted(f"P:{n}_f1" for n in names)
    assert {row.stamp for row in stored.values()} == {GOOD_STAMP}
    assert {k for k, _ in read_pvs(config)} == {0, 1}


def test_list_shows_a_stored_stamp_it_cannot_show(config):
    # A store written before such stamps were refused.
    config.data_dir.mkdir(parents=True)
    stamps = {"P:inf_f1": float("inf"), "P:big_f1": 1e300, "P:neg_f1": -1e300, "P:ok_f1": 0.0}
    db = ShardDatabase(config.store_path(0))
    db.open()
    try:
        db.save((name, stamp, np.array([1.0]), {}) for name, stamp in stamps.items())
    finally:
        db.close()

    out, err = io.StringIO(), io.StringIO()
    assert list_pvs(config, out=out, out_err=err) == exits.OK, err.getvalue()
    rows = {line.split()[0]: line.split() for line in out.getvalue().splitlines()[1:]}
    assert sorted(rows) == sorted(stamps)
    for name in ("P:inf_f1", "P:big_f1", "P:neg_f1"):
        assert rows[name][5] == "?", rows[name]
    assert rows["P:ok_f1"][5] == "never"

    out = io.StringIO()
    assert list_pvs(config, as_json=True, out=out, out_err=err) == exits.OK

    def strict(constant):
        raise AssertionError(f"{constant} is not JSON")

    entries = json.loads(out.getvalue(), parse_constant=strict)
    updated = {e["name"]: e["updated"] for e in entries}
    assert updated == {"P:inf_f1": None, "P:big_f1": 1e300, "P:neg_f1": -1e300, "P:ok_f1": 0.0}


def test_a_field_its_type_lacks_or_a_float_beyond_a_double_touches_no_store(
    config, tmp_path, caplog
):
    lines = [
        # A c PV has no EGU: the relay serves no P:egu_c8.EGU, so no store may hold it.
        '{"name":"P:egu_c8","type":"c","count":8,"stamp":0,"fields":{"EGU":"V"},"text":"hi"}',
        # Python's json reads 1e400 as inf; export writes a real infinity as "inf".
        line("huge", value="[1e400]").strip(),
        line("good").strip(),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(text + "\n" for text in lines))

    with caplog.at_level(logging.INFO, logger="carelay"):
        assert import_pvs(config, path) == exits.IMPORT_REFUSED
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert refusals == [
        "refused line 1: P:egu_c8.EGU: a c PV has no EGU field",
        "refused line 2: P:huge_f1: 1e400 is beyond a double",
    ]
    assert [row.name for _, row in read_pvs(config)] == ["P:good_f1"]


def test_lines_past_max_pvs_are_refused_and_the_pvs_held_imported_again(tmp_path, caplog):
    config = load_config(data_dir=str(tmp_path / "data"), prefix="P:", shards=2, max_pvs=5)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(line(f"pv{k}") for k in range(8)))
    with caplog.at_level(logging.INFO, logger="carelay"):
        assert import_pvs(config, path) == exits.IMPORT_REFUSED
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert refusals == [f"refused P:pv{k}_f1: max_pvs (5) reached" for k in range(5, 8)]
    assert sorted(row.name for _, row in read_pvs(config)) == [f"P:pv{k}_f1" for k in range(5)]
    # Again: the five it holds are taken (their values written again), no sixth.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="carelay"):
        assert import_pvs(config, path) == exits.IMPORT_REFUSED
    assert "imported 5 PVs into the stores; 3 refused" in caplog.text
    assert len(read_pvs(config)) == 5


def test_a_line_that_is_not_utf8_is_refused_alone(config, tmp_path, caplog):
    """One byte that is not UTF-8 refused the whole file (exit 2), the good lines with it."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        line("first").encode() + line("bad\xff").encode("latin-1") + line("last").encode()
    )
    with caplog.at_level(logging.INFO, logger="carelay"):
        assert import_pvs(config, path) == exits.IMPORT_REFUSED
    assert "refused line 2: not UTF-8" in caplog.text
    assert {row.name for _, row in read_pvs(config)} == {"P:first_f1", "P:last_f1"}


def test_a_name_with_a_line_break_logs_one_line(config, tmp_path, caplog):
    forged = "x\\n2026-11-30T15:00:00.000 INFO import: imported 99 PVs; 0 refused\\ny"
    path = tmp_path / "in.jsonl"
    path.write_text(line("good") + line(forged))
    with caplog.at_level(logging.INFO, logger="carelay"):
        assert import_pvs(config, path) == exits.IMPORT_REFUSED
    (refusal,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "\n" not in refusal and "\\n2026-11-30" in refusal


def test_a_store_failing_midway_keeps_and_counts_what_was_imported(tmp_path, caplog, monkeypatch):
    """Each chunk of an import into stopped stores is a transaction: a store that fails
    after some were saved keeps them, and the import says so (exit 1, the rest refused),
    not that nothing could be imported (exit 2)."""
    from carelay.shard.persist import StoreWriteError
    from carelay.supervisor import transfer

    config = load_config(data_dir=str(tmp_path / "data"), prefix="P:", shards=1)
    monkeypatch.setattr(transfer, "TRANSFER_CHUNK", 2)
    real_save, calls = ShardDatabase.save, []

    def save(self, upserts, deletes=()):
        calls.append(1)
        if len(calls) == 3:  # the third chunk: a full disk
            raise StoreWriteError(28, self.path, "database or disk is full")
        return real_save(self, upserts, deletes)

    monkeypatch.setattr(ShardDatabase, "save", save)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(line(f"pv{k}") for k in range(6)))
    with caplog.at_level(logging.INFO, logger="carelay"):
        assert import_pvs(config, path) == exits.IMPORT_REFUSED
    assert "the other 2 PVs not imported" in caplog.text
    assert "imported 4 PVs into the stores; 2 refused" in caplog.text
    monkeypatch.setattr(ShardDatabase, "save", real_save)
    assert len(read_pvs(config)) == 4


def test_a_store_damaged_after_an_import_is_restored_with_what_was_imported(tmp_path, caplog):
    """The good copy, taken when the import opened the store, held it without the
    import: a store damaged before its shard first opened it came back empty."""
    config = load_config(data_dir=str(tmp_path / "data"), prefix="P:", shards=1)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(line(f"pv{k}") for k in range(6)))
    assert import_pvs(config, path) == exits.OK
    with open(config.store_path(0), "r+b") as f:
        f.write(b"\xff" * 100)  # over the header
    db = ShardDatabase(config.store_path(0))
    with caplog.at_level(logging.INFO, logger="carelay"):
        rows = db.open()
    db.close()
    assert "restored the last good copy" in caplog.text
    assert sorted(r.name for r in rows) == sorted(f"P:pv{k}_f1" for k in range(6))
