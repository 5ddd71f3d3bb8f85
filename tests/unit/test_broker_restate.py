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

# make_hop: a Broker on a script and a real shard in a thread (a fixture).
from tests.unit.test_broker_hop import PREFIX, Notify, make_hop  # noqa: F401


@pytest.mark.parametrize(
    ("name", "first", "refused", "later", "held"),
    [
        (f"{PREFIX}a_f1", [1.0], [2.0], [3.0], [3.0]),
        (f"{PREFIX}b_F5", [1.0], [2.0], [3.0], [1.0, 3.0]),
    ],
)
def test_a_plain_put_after_a_refused_one_stays_in_the_mirror(
    make_hop,  # noqa: F811 - the fixture imported above
    name,
    first,
    refused,
    later,
    held,
):
    broker, shard, script = make_hop()
    box, notify = {}, Notify()

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
            notify.result is not None
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
    broker.run(script.stop)
    assert notify.result is False
    assert box["pv"].contents().tolist() == held
