"""The compiled reference: an IOC of the ``softioc`` package (pythonSoftIOC).

    python -m bench.softioc_server SPEC.json

SPEC.json holds ``{"prefix": "P:", "records": [[name, type_code, count], ...]}``
with full PV names.  Every record is created up front with the builder, in the
shapes the relays create on the fly: ``f1`` an aOut, ``i1`` a longOut, ``s1`` a
stringOut, anything else a WaveformOut of ``count`` elements.  An IOC has no
ring buffer: an ``F``/``I``/``C`` name gets a plain WaveformOut, which the
client writes whole (the suite keeps the ring on the client side and says
"not a ring").  The CA server is the one of EPICS base (RSRV, C); the PVA
server is left off (PVXS_QSRV_ENABLE=NO in the environment the suite gives).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    prefix: str = spec["prefix"]
    if not prefix.endswith(":"):
        raise SystemExit("softioc_server: the prefix must end with ':'")

    import numpy as np
    from softioc import asyncio_dispatcher, builder, softioc

    dtypes = {"f": np.float64, "i": np.int32, "c": np.uint8}
    dispatcher = asyncio_dispatcher.AsyncioDispatcher()
    builder.SetDeviceName(prefix[:-1])
    keep = []
    for name, type_code, count in spec["records"]:
        short = name[len(prefix) :]
        kind = type_code.lower()
        if count == 1 and type_code == kind and kind != "c":
            if kind == "f":
                rec = builder.aOut(short, initial_value=0.0, always_update=True, PREC=6)
            elif kind == "i":
                rec = builder.longOut(short, initial_value=0, always_update=True)
            else:
                rec = builder.stringOut(short, initial_value="", always_update=True)
        else:
            rec = builder.WaveformOut(short, length=count, datatype=dtypes[kind])
        keep.append(rec)
    builder.LoadDatabase()
    softioc.iocInit(dispatcher)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"ready: softioc, {len(keep)} records, prefix {prefix}", flush=True)
    while not done.wait(0.5):
        pass
    sys.stdout.flush()
    os._exit(0)  # skip epicsExit's hooks: nothing to save


if __name__ == "__main__":
    sys.exit(main())
