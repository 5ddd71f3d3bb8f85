"""A read right after a put without callback shows that put, as EPICS ``caput`` expects.

``caput NAME.EGU K`` puts without callback and then reads the channel to print
the new value; the same holds for ``pvlist`` right after a creation or a delpv
made without callback.  Each check is made on one caproto channel, so the read
follows the put on the same circuit.
"""

from __future__ import annotations

from caproto import ChannelType

from tests.system.clients import connect


def names(pvlist) -> set[str]:
    text = bytes(pvlist.read(data_count=0, timeout=5).data).split(b"\0", 1)[0].decode()
    return set(text.split(",")) if text else set()


def test_a_field_read_right_after_a_put_shows_it(relay, ca):
    name = relay.name("egu", "f1")
    assert connect(ca, name).write([1.0], wait=True, timeout=5).status.success
    egu = connect(ca, name + ".EGU")
    prec = connect(ca, name + ".PREC")
    for k in range(5):
        egu.write(f"unit{k}".encode(), wait=False)
        assert egu.read(timeout=5).data[0] == f"unit{k}".encode()
        prec.write([k + 1], wait=False)
        assert prec.read(timeout=5).data[0] == k + 1


def test_pvlist_right_after_a_creation_and_a_delpv(relay, ca):
    delpv = connect(ca, relay.prefix + "delpv")
    pvlist = connect(ca, relay.prefix + "pvlist")
    for k in range(3):
        name = relay.name(f"listed{k}", "f1")
        pv = connect(ca, name)  # provisional until the put below
        pv.write([2.0], wait=False)
        assert name in names(pvlist)
        delpv.write(name.encode(), wait=False, data_type=ChannelType.CHAR)
        assert name not in names(pvlist)
