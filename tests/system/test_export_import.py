"""``carelay export`` and ``carelay import``: PVs with fields and values, out and back."""

from __future__ import annotations

import json
import subprocess

import numpy as np

from tests.system.clients import Context, close, connect, write_status
from tests.system.conftest import CARELAY, wait_for


def carelay(*args: str, stdout=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CARELAY, *args],
        capture_output=stdout is None,
        stdout=stdout,
        stderr=None if stdout is None else subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
    )


def export(relay, path=None) -> list[dict]:
    r = carelay("export", "--data-dir", str(relay.data_dir))
    assert r.returncode == 0, r.stderr
    if path is not None:
        path.write_text(r.stdout)
    return [json.loads(line) for line in r.stdout.splitlines()]


def without_stamps(records):
    return [{k: v for k, v in r.items() if k != "stamp"} for r in records]


def fill(ca, p):
    """PVs of every kind, values CA carries exactly, fields: the export must hold them."""
    values = {
        f"{p}floats_f4": np.array([0.1, 1e-300, -0.0, 3231.123]),
        f"{p}ints_i4": np.array([1, -2, 2**31 - 1], dtype=np.int32),
        f"{p}bytes_c8": np.frombuffer(b"\x00\xffa\n\xc3", dtype=np.uint8),
        f"{p}text_s1": b"hello world",
        f"{p}log_F3": np.array([1.0, 2.0, 3.0]),
        f"{p}temp_f1": np.array([21.25]),
    }
    for name, value in values.items():
        assert write_status(connect(ca, name), value).success, name
    # The buffer keeps the last three, oldest first.
    assert write_status(connect(ca, f"{p}log_F3"), np.array([4.0, 5.0])).success
    fields = {"EGU": b"degC", "HIHI": 30.0, "PREC": 2, "DESC": b"lab temperature"}
    for field, value in fields.items():
        assert write_status(connect(ca, f"{p}temp_f1.{field}"), [value]).success, field


def test_export_delete_import_running(make_relay, ca, tmp_path):
    relay = make_relay()
    p = relay.prefix
    fill(ca, p)

    # Field changes are durable at once, values within the autosave period.
    def flushed():
        records = export(relay, tmp_path / "pvs.jsonl")
        buffers = [r for r in records if r["name"] == f"{p}log_F3"]
        return len(records) == 6 and buffers[0]["value"] == [3.0, 4.0, 5.0] and records

    before = wait_for(flushed, what="the export to hold every PV as put")
    by_name = {r["name"]: r for r in before}
    assert by_name[f"{p}bytes_c8"]["hex"] == "00ff610ac3"
    assert by_name[f"{p}text_s1"]["text"] == "hello world"
    assert by_name[f"{p}floats_f4"]["value"] == [0.1, 1e-300, -0.0, 3231.123]
    assert by_name[f"{p}temp_f1"]["fields"] == {
        "DESC": "lab temperature",
        "EGU": "degC",
        "HIHI": 30.0,
        "PREC": 2,
    }

    delpv = connect(ca, p + "delpv")
    for r in before:
        assert write_status(delpv, r["name"].encode()).success
    assert export(relay) == []

    r = carelay("import", "--data-dir", str(relay.data_dir), str(tmp_path / "pvs.jsonl"))
    assert r.returncode == 0, r.stderr
    assert "imported 6 PVs" in r.stderr
    # Served at once, through CA.
    assert list(connect(ca, f"{p}log_F3").read().data) == [3.0, 4.0, 5.0]
    assert bytes(connect(ca, f"{p}bytes_c8").read().data) == b"\x00\xffa\n\xc3"
    # And stored (values within the autosave period), as they were exported.
    wait_for(
        lambda: without_stamps(export(relay)) == without_stamps(before),
        what="the export after the import to equal the first",
    )


def test_import_takes_pvs_that_share_a_base_name_and_refuses_a_bad_line(make_relay, ca, tmp_path):
    """The relay holds ``x_f1`` and ``x_i1`` side by side when clients put to both; its
    export has both, so its import takes both (it refused the second one: a backup and
    restore lost it).  A line whose type disagrees with its name is refused alone."""
    relay = make_relay()
    p = relay.prefix
    assert write_status(connect(ca, f"{p}x_f1"), [1.5]).success
    t = 1795904681.0  # a stamp EPICS time carries; a running relay stamps puts itself
    lines = [
        {"name": f"{p}x_i1", "type": "i", "count": 1, "stamp": t, "fields": {}, "value": [7]},
        {"name": f"{p}x_F3", "type": "F", "count": 3, "stamp": t, "fields": {}, "value": [1]},
        {"name": f"{p}y_f2", "type": "i", "count": 2, "stamp": t, "fields": {}, "value": [2]},
        {"name": f"{p}z_i2", "type": "i", "count": 2, "stamp": t, "fields": {}, "value": [3, 4]},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    r = carelay("import", "--data-dir", str(relay.data_dir), str(path))
    assert r.returncode == 1, r.stderr
    refusals = [line for line in r.stderr.splitlines() if " WARNING " in line]
    assert len(refusals) == 1, r.stderr
    assert f"{p}y_f2: conflicting type: the line says i2" in refusals[0], refusals
    names = {e["name"]: e for e in export(relay)}
    assert set(names) == {f"{p}x_f1", f"{p}x_i1", f"{p}x_F3", f"{p}z_i2"}
    assert names[f"{p}x_f1"]["value"] == [1.5]
    assert list(connect(ca, f"{p}x_i1").read().data) == [7]
    assert list(connect(ca, f"{p}x_F3").read().data) == [1.0]
    assert list(connect(ca, f"{p}z_i2").read().data) == [3, 4]


def test_import_into_a_stopped_relay_keeps_everything(make_relay, ca, tmp_path):
    source = make_relay()
    fill(ca, source.prefix)
    path = tmp_path / "pvs.jsonl"
    source.stop()
    before = export(source, path)
    assert len(before) == 6

    # Started with a max_pvs below what the import brings: all are served, and it says so.
    target = make_relay(start=False, extra=["--max-pvs", "4"])
    target.prefix = source.prefix
    r = carelay("import", "--data-dir", str(target.data_dir), "--prefix", target.prefix, str(path))
    assert r.returncode == 0, r.stderr
    # Exact: stamps included, as the stores hold them.
    assert export(target) == before
    target.start()
    assert "6 PVs stored, more than max_pvs (4): every one is served" in target.log()
    # A new client: the module's one still searches the names the source relay served.
    fresh = Context()
    try:
        assert list(connect(fresh, f"{target.prefix}log_F3").read().data) == [3.0, 4.0, 5.0]
        ctrl = connect(fresh, f"{target.prefix}temp_f1").read(data_type="control")
        assert ctrl.metadata.units == b"degC"
    finally:
        close(fresh)


def test_import_refuses_a_line_before_any_put(make_relay, ca, tmp_path):
    """A line whose fields its PV's type lacks, or with a float beyond a double, is refused
    before anything is put: the PV it names is not made, nor an existing one changed."""
    relay = make_relay()
    p = relay.prefix
    assert write_status(connect(ca, f"{p}old_c8"), np.frombuffer(b"was", np.uint8)).success
    lines = [
        {"name": f"{p}egu_c8", "type": "c", "count": 8, "stamp": 0, "fields": {"EGU": "V"}},
        {"name": f"{p}old_c8", "type": "c", "count": 8, "stamp": 0, "fields": {"PREC": 2}},
        {"name": f"{p}ok_c8", "type": "c", "count": 8, "stamp": 0, "fields": {"DESC": "d"}},
    ]
    text = "".join(json.dumps({**line, "text": "hi"}) + "\n" for line in lines)
    text += f'{{"name": "{p}huge_f1", "type": "f", "count": 1, "value": [1e400]}}\n'
    path = tmp_path / "in.jsonl"
    path.write_text(text)

    r = carelay("import", "--data-dir", str(relay.data_dir), str(path))
    assert r.returncode == 1, r.stderr
    refusals = [line for line in r.stderr.splitlines() if " WARNING " in line]
    assert len(refusals) == 3, r.stderr
    assert refusals[0].endswith(f"refused line 1: {p}egu_c8.EGU: a c PV has no EGU field")
    assert refusals[1].endswith(f"refused line 2: {p}old_c8.PREC: a c PV has no PREC field")
    assert refusals[2].endswith(f"refused line 4: {p}huge_f1: 1e400 is beyond a double")
    assert "imported 1 PVs into the running relay; 3 refused" in r.stderr
    names = {e["name"]: e for e in export(relay)}
    assert set(names) == {f"{p}old_c8", f"{p}ok_c8"}
    assert bytes(connect(ca, f"{p}old_c8").read().data) == b"was"
    assert bytes(connect(ca, f"{p}ok_c8").read().data) == b"hi"
