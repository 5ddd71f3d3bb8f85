"""The control for PV Access: a plain p4p server with its PVs created up front.

    python -m bench.pva_control SPEC.json

SPEC.json holds ``{"prefix": "P:", "records": [[name, type_code, count], ...]}`` with
full PV names, as for bench/softioc_server.py.  Each record is a ``SharedPV`` of p4p
(pvxs underneath) written the way p4p's own examples write a mailbox PV: a put posts
the value it brings and completes.  ``f``/``i`` scalars are NTScalar ``double``/``int``,
arrays and buffers NTScalarArray, the rest NTScalar ``string``, each with the metadata
structures carelay's PVs carry (display, control, valueAlarm, form: the same type on the
wire); no naming rule, no ring, no persistence: the least a PVA server can do for a put.

Port and interfaces come from the usual pvxs variables (``EPICS_PVAS_SERVER_PORT``,
``EPICS_PVAS_BROADCAST_PORT``, ``EPICS_PVAS_INTF_ADDR_LIST``).  It prints ``ready``
once it serves.
"""

from __future__ import annotations

import json
import signal
import sys
import threading


class _Mailbox:
    """A put posts its value to the PV's subscribers and completes."""

    @staticmethod
    def put(pv, op) -> None:
        pv.post(op.value())
        op.done()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)

    from p4p.nt import NTScalar
    from p4p.server.thread import SharedPV

    codes = {"f": ("d", 0.0), "i": ("i", 0)}
    pvs = {}
    for name, type_code, count in spec["records"]:
        code, initial = codes.get(type_code.lower(), ("s", ""))
        if code != "s" and (count > 1 or type_code != type_code.lower()):
            code, initial = "a" + code, []
        nt = NTScalar(code, display=True, control=True, valueAlarm=True, form=True)
        pvs[name] = SharedPV(nt=nt, initial=initial, handler=_Mailbox())

    serve(pvs, "p4p control")
    return 0


def serve(pvs: dict, label: str) -> None:
    """Serve ``pvs`` (name: SharedPV) until SIGTERM or SIGINT; ``ready: LABEL, ...`` once
    it does."""
    from p4p.server import Server

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with Server(providers=[pvs]) as server:
        port = server.conf().get("EPICS_PVAS_SERVER_PORT")
        print(f"ready: {label}, {len(pvs)} PVs, port {port}", flush=True)
        while not done.wait(0.5):
            pass


if __name__ == "__main__":
    sys.exit(main())
