"""A refused WRITE's restatement never takes the mirror back past a later WRITE.

A put with callback refused by its shard (its store cannot be written, or it came too
late) is followed by the PV as the shard holds it then, for the mirror, which showed the
refused value at once.  A plain put made right after it, also shown at once, is applied
by the shard after that restatement: the mirror must end as the shard does.

A real Broker on a scripted ``cas`` and a real shard in a thread.
"""

from __future__ import annotations

import numpy as np
import pytest

from carelay.broker.app import Broker
from carelay.common.config import load_config
from carelay.shard.server import ShardServer
from tests.unit.scripted_cas import Script, serve_in_thread

PREFIX = "H:"


class _Notify:
    def __init__(self) -> None:
        self.ok: bool | None = None

    def complete(self, ok: bool) -> None:
        assert self.ok is None, "completed twice"
        self.ok = ok


@pytest.mark.parametrize(
    ("name", "first", "refused", "later", "held"),
    [
        (f"{PREFIX}a_f1", [1.0], [2.0], [3.0], [3.0]),
        (f"{PREFIX}b_F5", [1.0], [2.0], [3.0], [1.0, 3.0]),
    ],
)
def test_a_plain_put_after_a_refused_one_stays_in_the_mirror(
    tmp_path, name, first, refused, later, held
):
    config = load_config(prefix=PREFIX, shards=1, data_dir=str(tmp_path))
    shard = ShardServer(config, 0, db=None)
    shard.bind()
    stop_shard = serve_in_thread(shard)
    script = Script()
    broker = Broker(config, script)
    box, notify = {}, _Notify()

    def create() -> bool:
        pv = box["pv"] = broker.attach(name)
        assert broker.forward_put(pv, np.array(first), None)
        return True

    def refused_then_plain() -> bool:
        shard.health.refusing = "the store of shard 0 cannot be written"
        assert broker.forward_put(box["pv"], np.array(refused), notify)  # caput -c
        assert broker.forward_put(box["pv"], np.array(later), None)  # caput, right after
        return True

    def settled() -> bool:
        pv = box["pv"]
        return (
            notify.ok is not None
            and shard.store.get(name).tolist() == held
            and not broker.requests.in_flight(pv)
            and pv.contents().tolist() == held
        )

    script.steps = [
        lambda: broker.links[0].live,
        create,
        lambda: box["pv"].real and not broker.requests.in_flight(box["pv"]),
        refused_then_plain,
        settled,
    ]
    try:
        broker.run(script.stop)
    finally:
        for link in broker.links:
            link.close(linger=0)
        stop_shard()
        shard.close()
    assert notify.ok is False
    assert box["pv"].contents().tolist() == held
