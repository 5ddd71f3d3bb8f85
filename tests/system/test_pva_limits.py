"""The PVA front-end keeps the relay's limits as the CA broker does: at most ``max_pvs``
provisional PVs (names that exist in no shard, held by a client that never puts) at
once, besides the PVs that exist."""

from __future__ import annotations

import pytest

from tests.system.conftest import Relay, _report_log, wait_for
from tests.system.pva import PvaRelay, pva_context
from tests.system.test_hardening import refusals

pytest.importorskip("p4p")


@pytest.fixture
def pva_relay(tmp_path, request):
    Relay.give_way()
    (tmp_path / "limits").mkdir()
    relay = PvaRelay(tmp_path / "limits", shards=1, extra=["--max-pvs", "5"])
    try:
        yield relay.start()
    finally:
        relay.stop()
        _report_log(request, relay)


@pytest.fixture
def pva():
    ctx = pva_context()
    yield ctx
    ctx.close()


def test_provisional_pvs_over_pva_are_bounded_by_max_pvs(pva_relay, pva):
    relay = pva_relay
    kept = relay.name("kept", "f1")
    pva.put(kept, 3.0, timeout=5)
    names = [relay.name(f"held{k}", "f1") for k in range(8)]
    careless = pva_context()
    try:
        # A monitor holds each name's channel; a served one gets a first event.
        seen: set[str] = set()
        subs = [careless.monitor(n, lambda _v, n=n: seen.add(n)) for n in names]

        def settled():
            refused = [n for n in names if refusals(relay, n)]
            return (set(seen), refused) if len(seen) + len(refused) == len(names) else None

        served, refused = wait_for(settled, what="each held name served or refused")
        assert len(served) == 5, served
        assert not served & set(refused)
        for name in refused:
            assert "max_pvs (5) provisional PVs held" in refusals(relay, name)[0]
        # What exists is untouched.
        pva.put(kept, 4.0, timeout=5)
        assert pva.get(kept, timeout=5) == 4.0
        for sub in subs:
            sub.close()
    finally:
        careless.close()
    # Let go: room again, for a name refused before.
    wait_for(
        lambda: _creates(pva, refused[0]),
        timeout=20,
        what="a refused name served once the careless client went",
    )
    assert pva.get(refused[0], timeout=5) == 1.0


def _creates(ctx, name: str) -> bool:
    try:
        ctx.put(name, 1.0, timeout=1)
    except TimeoutError:
        return False
    return True
