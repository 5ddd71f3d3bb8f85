"""The floor for PV Access: the least a PVA front-end over a process that holds the truth
can do for a put.

    python -m bench.pva_floor SPEC.json

SPEC.json as for bench/pva_control.py; its records must be ``f`` or ``i`` scalars (W8's
PVs).  Each is a p4p ``SharedPV`` with the control's type, whose put handler (on p4p's
own thread, as carelay's) sends the value over ZeroMQ (ipc, a msgpack frame) to a
second process, ``python -m bench.pva_floor --truth``, which keeps it and answers; a
receiving thread then posts the value and completes the put.  So a put crosses what
carelay's shape asks of it (another process holds the truth; a put completes once that
process has it) and nothing more: no naming rule, no mirror, no persistence, no
batching, no limits, no refusals, no access security.  ``python -m bench.pva_cost``
runs it beside carelay and the control: carelay against the floor is what the relay's
own work costs, the floor against the control what the shape costs.

Port and interfaces come from the pvxs variables, as for the control.  It prints
``ready`` once it serves.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import threading

import msgpack
import zmq

from bench import pva_control

#: The PVs served: p4p's type code and first value of each type letter.
_CODES = {"f": ("d", 0.0), "i": ("i", 0)}
#: How often the truth process looks whether its parent is gone (ms).
_ORPHAN_CHECK_MS = 500


def truth(inbound: str, outbound: str) -> int:
    """Keep each value put and answer with the put's key, until the parent is gone."""
    parent = os.getppid()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(inbound)
    push = ctx.socket(zmq.PUSH)
    push.bind(outbound)
    values: dict[str, float] = {}
    while os.getppid() == parent:
        if not pull.poll(_ORPHAN_CHECK_MS):
            continue
        key, name, value = msgpack.unpackb(pull.recv())
        values[name] = value
        push.send(msgpack.packb(key))
    return 0


class _Front:
    """Sends each put to the truth process and completes it on the answer."""

    def __init__(self, ctx: zmq.Context, inbound: str, outbound: str) -> None:
        self.push = ctx.socket(zmq.PUSH)
        self.push.connect(inbound)
        self.pull = ctx.socket(zmq.PULL)
        self.pull.connect(outbound)
        self.lock = threading.Lock()  # p4p may call from more than one thread
        self.waiting: dict[int, tuple] = {}
        self.next_key = 0
        #: Operations completed, freed on p4p's thread: a p4p operation freed elsewhere
        #: waits for that thread (as carelay's, see broker/pva/channels.py).
        self.done: collections.deque = collections.deque()

    def put(self, pv, op) -> None:
        self.done.clear()
        value = op.value()
        with self.lock:
            self.next_key += 1
            self.waiting[self.next_key] = (pv, op, value)
            self.push.send(msgpack.packb((self.next_key, pv.name, value["value"])))

    def answers(self) -> None:
        while True:
            key = msgpack.unpackb(self.pull.recv())
            with self.lock:
                pv, op, value = self.waiting.pop(key)
            pv.post(value)
            op.done()
            self.done.append(op)
            del pv, op, value


def serve(records: list, front: _Front) -> None:
    """Serve ``records`` through ``front`` until SIGTERM or SIGINT."""
    from p4p.nt import NTScalar
    from p4p.server.raw import SharedPV

    pvs = {}
    for name, type_code, _ in records:
        code, initial = _CODES[type_code]
        nt = NTScalar(code, display=True, control=True, valueAlarm=True, form=True)
        pv = SharedPV(initial=nt.wrap(initial), handler=front)
        pv.name = name
        pvs[name] = pv
    threading.Thread(target=front.answers, name="answers", daemon=True).start()
    pva_control.serve(pvs, "p4p floor")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--truth"]:
        return truth(argv[1], argv[2])
    with open(argv[0]) as f:
        spec = json.load(f)

    for name, type_code, count in spec["records"]:
        if type_code not in _CODES or count != 1:
            print(f"the floor serves f and i scalars only, not {name}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="pva-floor-") as run:
        inbound, outbound = f"ipc://{run}/in", f"ipc://{run}/out"
        argv = [sys.executable, "-m", "bench.pva_floor", "--truth", inbound, outbound]
        keeper = subprocess.Popen(argv)
        try:
            serve(spec["records"], _Front(zmq.Context.instance(), inbound, outbound))
        finally:
            keeper.kill()
            keeper.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
