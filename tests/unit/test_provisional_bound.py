"""At most ``max_pvs`` provisional PVs at once (names a client holds that exist in no
shard, and fields of such names), besides the PVs that exist: the search is not
answered once they are held, and the attach refuses what a burst of searches let by."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from carelay.broker.app import Broker
from carelay.broker.table import counted as counts
from carelay.common.config import load_config
from tests.unit.test_attached_count import PREFIX, made_real, serving

MAX = 3


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("data"))
    return load_config(prefix=PREFIX, shards=1, data_dir=data, max_pvs=MAX)


def name(k: int) -> str:
    return f"{PREFIX}p{k}_f1"


def refused(broker: Broker, names: list[str]) -> list[str]:
    return [n for n in names if n in broker.table.refusals]


def test_a_burst_of_searches_passes_but_the_attaches_stop_at_max_pvs(config):
    broker = serving(config)
    names = [name(k) for k in range(5)]
    assert all(broker.claims(n) for n in names)  # nothing held yet: all answered
    attached = [n for n in names if broker.attach(n) is not None]
    assert attached == names[:MAX]
    assert broker.table.n_provisional == MAX
    assert refused(broker, names) == names[MAX:]
    # Held ones are still served; new ones are not even answered now.
    assert broker.claims(names[0]) and broker.attach(names[0]) is not None
    assert not broker.claims(name(9))


def test_a_pv_that_exists_counts_against_max_pvs_not_as_provisional(config):
    broker = serving(config)
    for k in range(MAX):
        broker.attach(name(k))
    made_real(broker, name(0))
    assert broker.table.n_provisional == MAX - 1
    assert broker.attach(name(5)) is not None  # the room the real PV left
    # A field of a PV that exists is no provisional PV; one of a name that does not is.
    assert broker.attach(name(0) + ".EGU") is not None
    assert broker.table.n_provisional == MAX
    assert broker.attach(name(7) + ".EGU") is None


def test_the_fields_held_of_a_deleted_pv_are_provisional_again(config):
    """A client that holds fields of a PV that is then deleted holds provisional PVs: they
    count against max_pvs until the PV is created again or the client lets go."""
    broker = serving(config)
    made_real(broker, name(0))
    held = [broker.attach(name(0) + f) for f in (".EGU", ".DESC", ".HOPR")]
    assert all(held) and broker.table.n_provisional == 0
    broker.table.forget(name(0))  # deleted in its shard
    assert broker.table.n_provisional == MAX
    assert not broker.claims(name(9)) and broker.attach(name(9)) is None
    made_real(broker, name(0))  # created again
    assert broker.table.n_provisional == 0
    assert broker.claims(name(9))


def test_letting_go_makes_room(config):
    broker = serving(config)
    pvs = [broker.attach(name(k)) for k in range(MAX - 1)]
    loose = broker.attach(name(8) + ".DESC")
    assert broker.table.n_provisional == MAX
    assert not broker.claims(name(9))
    loose.destroy()
    pvs[0].destroy()
    broker.table.graveyard.clear()
    assert broker.table.n_provisional == MAX - 2
    assert broker.claims(name(9)) and broker.attach(name(9)) is not None
    assert broker.claims(name(8) + ".DESC") and broker.attach(name(8) + ".DESC") is not None


#: max_pvs PVs made and created, then a new name: refused, though no provisional PV is
#: held (none may be created).
_MAX_EXIST = [*(("attach", k) for k in range(MAX)), *(("real", k) for k in range(MAX))]
_MAX_EXIST.append(("attach", MAX))
_OPS = st.sampled_from(["attach", "field", "destroy", "real", "forget"])


@given(st.lists(st.tuples(_OPS, st.integers(0, 6)), max_size=50))
@example(steps=_MAX_EXIST)
def test_never_more_than_max_pvs_provisional_pvs(config, steps):
    """After any sequence, the count is what a walk finds, and an attach of a new name
    is refused exactly when max_pvs are held, provisional or real (a deleted PV a client
    holds is provisional again, so the count itself may pass max_pvs)."""
    broker = serving(config)
    table = broker.table
    held: dict[str, object] = {}
    for op, k in steps:
        target = name(k) + (".EGU" if op == "field" else "")
        if op in ("attach", "field"):
            # No room for another provisional PV, or max_pvs exist: none may be created.
            full = table.n_provisional >= MAX or table.n_real + table.n_creating >= MAX
            new = target not in table.pvs and target not in table.field_pvs
            base = table.pvs.get(name(k))
            counted = op == "attach" or base is None or not base.real
            pv = broker.attach(target)
            assert (pv is None) == (new and counted and full)
            if pv is not None:
                held[target] = pv
        elif op == "destroy" and (name(k) in held or name(k) + ".EGU" in held):
            held.pop(name(k) if name(k) in held else name(k) + ".EGU").destroy()
        elif op == "real" and name(k) in table.pvs:
            made_real(broker, name(k))
        elif op == "forget":
            table.forget(name(k))
        table.graveyard.clear()
        walked = sum(1 for pv in table.pvs.values() if not (pv.real or pv.creating))
        loose = {n for n in table.field_pvs if not counts(table.pvs.get(n.split(".")[0]))}
        assert table.loose_fields == loose
        assert table.n_provisional == walked + len(loose)


@pytest.fixture
def pva_front(tmp_path):
    """A PVA front-end without p4p (see test_pva_front), ``max_pvs`` 2."""
    from carelay.broker.pva.front import PvaFrontEnd
    from tests.unit.test_pva_front import FakeChannel

    f = PvaFrontEnd(load_config(None, prefix="P:", data_dir=str(tmp_path), max_pvs=2))
    f.make_channel_object = lambda _front, n: FakeChannel(n)
    yield f
    f.inbox.close()


def test_the_pva_front_end_holds_no_more_provisional_pvs_than_max_pvs(pva_front):
    from tests.unit.test_pva_front import live

    f = pva_front
    names = [f"P:v{k}_f1" for k in range(3)] + ["P:later_f1"]
    for n in names:
        live(f, n)
    assert all(f.test_channel(n) is True for n in names[:3])  # a burst of searches passes
    channels = [f.make_channel(n) for n in names[:3]]
    f.inbox.run()  # the loop binds them: the third is one over max_pvs
    assert f.table.n_provisional == 2
    assert sorted(f.channels) == names[:2]
    assert channels[2].shut_count == 1
    assert names[2] in f.table.refusals
    assert f.test_channel(names[3]) is None  # held to the limit: the search is not answered
    f.on_last_disconnect(channels[0])  # a client lets go: room again
    assert f.table.n_provisional == 1
    assert f.test_channel(names[3]) is True
