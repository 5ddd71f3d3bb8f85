"""``carelay import`` into a running relay: the puts of one line, against a stand-in CA
context.  Every channel of a line is connected, with write access, before its first put,
so that a line the relay would refuse changes nothing; a put that fails midway says what
stays, and a PV the line made is deleted again."""

from __future__ import annotations

import numpy as np
import pytest
from caproto import AccessRights

from carelay.supervisor.pvfile import decode
from carelay.supervisor.transfer import _put_record, _PutFailed, _puts

DELPV = "P:delpv"


class FakePv:
    def __init__(self, ctx, name):
        self.ctx, self.name = ctx, name
        self.access_rights = (
            AccessRights.READ if name in ctx.read_only else AccessRights.READ | AccessRights.WRITE
        )

    def wait_for_connection(self, timeout):
        if self.name in self.ctx.unserved:
            raise TimeoutError(f"{self.name} could not connect")

    def write(self, data, wait, timeout):
        if self.name in self.ctx.failing:
            raise TimeoutError("no answer")
        self.ctx.written.append(self.name)

    def disconnect(self):
        pass


class FakeContext:
    def __init__(self, unserved=(), read_only=(), failing=()):
        self.unserved, self.read_only, self.failing = set(unserved), set(read_only), set(failing)
        self.written: list[str] = []

    def get_pvs(self, *names, timeout):
        return [FakePv(self, name) for name in names]


LINE = '{"name": "P:t_f1", "type": "f", "count": 1, "fields": {"EGU": "V", "PREC": 2}, '
RECORD = decode(LINE + '"value": [1.5]}')


def test_a_new_pv_is_made_by_its_value_then_gets_its_fields():
    ctx = FakeContext()
    _put_record(ctx, RECORD, False, DELPV)
    assert ctx.written == ["P:t_f1", "P:t_f1.EGU", "P:t_f1.PREC"]


def test_an_existing_buffer_gets_its_fields_then_a_reset_then_its_values():
    record = decode(
        '{"name": "P:b_F4", "type": "F", "count": 4, "fields": {"EGU": "V"}, "value": [1, 2]}'
    )
    assert [name for name, _ in _puts(record, True)] == ["P:b_F4.EGU", "P:b_F4.RES", "P:b_F4"]
    empty = decode('{"name": "P:b_F4", "type": "F", "count": 4, "value": []}')
    assert [name for name, _ in _puts(empty, False)] == ["P:b_F4", "P:b_F4.RES"]
    assert np.array_equal(_puts(empty, False)[0][1], np.zeros(1))


@pytest.mark.parametrize("exists", [False, True])
@pytest.mark.parametrize(
    ("faults", "why"),
    [
        ({"unserved": {"P:t_f1.PREC"}}, "P:t_f1.PREC does not connect"),
        ({"unserved": {"P:t_f1"}}, "P:t_f1 does not connect"),
        ({"read_only": {"P:t_f1"}}, "no write access to P:t_f1"),
    ],
)
def test_a_channel_that_does_not_connect_or_take_puts_refuses_the_line_untouched(
    faults, why, exists
):
    ctx = FakeContext(**faults)
    with pytest.raises(_PutFailed, match=f"^{why}"):
        _put_record(ctx, RECORD, exists, DELPV)
    assert ctx.written == []


def test_a_put_failing_midway_deletes_the_pv_the_line_made():
    ctx = FakeContext(failing={"P:t_f1.PREC"})
    with pytest.raises(_PutFailed, match="PREC failed: .*; the PV it made is deleted again$"):
        _put_record(ctx, RECORD, False, DELPV)
    assert ctx.written == ["P:t_f1", "P:t_f1.EGU", DELPV]


def test_a_put_failing_midway_on_an_existing_pv_names_what_stays():
    ctx = FakeContext(failing={"P:t_f1"})
    with pytest.raises(_PutFailed, match="; already put, and kept: P:t_f1.EGU, P:t_f1.PREC$"):
        _put_record(ctx, RECORD, True, DELPV)
    assert ctx.written == ["P:t_f1.EGU", "P:t_f1.PREC"]
