"""The log tells a creation once it is durable: a creation that the store refused is not
logged as created, and one that is kept is logged once.

The fault is the one of test_storage_faults.py: a file size limit on the running shard
at the size of its store's write-ahead log, so that the commit of the next creation fails
with EFBIG.  The autosave period is long enough that the shard has not begun refusing
puts with callback by itself when the creating put comes: it is the commit that fails.
"""

from __future__ import annotations

from tests.system.clients import name_on_shard
from tests.system.conftest import wait_for
from tests.system.test_storage_faults import connect, limit_store, log_lines, put_ok, unlimit

#: Longer than the few steps between the fault and the creating put.
PERIOD = ["--autosave-period", "3"]


def test_a_creation_the_store_refused_is_not_logged_as_created(make_relay, ca):
    relay = make_relay(shards=1, extra=PERIOD)
    name = name_on_shard(relay, 0, "refused")
    pid = limit_store(relay, ca)
    mark = len(relay.log())
    (pv,) = connect(ca, name)
    assert not put_ok(pv, [1.0])
    wait_for(
        lambda: log_lines(relay, "ERROR", "shard 0", "cannot save 1 creations/deletions/"),
        what="the ERROR of the failed commit",
    )
    assert f"created PV {name}" not in relay.log()[mark:]

    unlimit(pid)
    assert put_ok(pv, [2.0])
    relay.wait_log(f"created PV {name}", start=mark)
    assert len(log_lines(relay, "shard 0", f"created PV {name}")) == 1
