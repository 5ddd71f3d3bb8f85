"""The control: a single-process pcaspy relay, written the straightforward way.

    python -m bench.control_relay --prefix P [--max-elements N]

This is how single-process pcaspy relays are written today, and the baseline
carelay is measured against.  It serves the same naming rule
(``carelay.common.naming.parse_pv_name``) with the same results: a put to
``<prefix><name>_<type><count>`` creates the PV, upper case ``F I C`` are
right-appending ring buffers.  The way it does so is the usual one:

- pcaspy's SimpleServer/Driver layer links its PVs when the driver is made,
  so PVs are created in ``pvAttach`` by reaching into pcaspy's internals:
  ``SimpleServer.createPV`` registers the PV in ``manager.pvs``/``manager.pvf``
  and a ``Data`` entry is added to ``driver.pvDB`` on the fly;
- values are pcaspy parameters (``setParam``; pcaspy's ``writeValue`` then
  calls ``updatePV``, which posts the monitors);
- buffers are Python lists (text buffers Python strings), concatenated and
  sliced on every put;
- one thread, ``server.process(0.1)`` in a loop.

CA port and interfaces come from the usual EPICS variables.  It prints
``ready`` once it serves.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from carelay.common.naming import InvalidPvName, PvSpec, parse_pv_name

#: pcaspy type name for each type letter.
PCASPY_TYPES = {"f": "float", "i": "int", "c": "char", "s": "string"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--max-elements", type=int, default=1_000_000)
    parser.add_argument("--max-name-length", type=int, default=128)
    args = parser.parse_args(argv)
    os.environ.setdefault("EPICS_CA_MAX_ARRAY_BYTES", str(args.max_elements * 8 + 16384))

    from pcaspy import Driver, SimpleServer, cas
    from pcaspy.driver import Data, manager

    prefix = args.prefix

    class RelayDriver(Driver):
        def __init__(self) -> None:
            manager.pvs.setdefault(self.port, {})  # no PV exists yet when the driver is made
            super().__init__()
            self.specs: dict[str, PvSpec] = {}

        def add(self, reason: str, spec: PvSpec) -> None:
            """Register a PV created after the driver (pvDB entry added on the fly)."""
            self.specs[reason] = spec
            data = Data()
            data.value = manager.pvs[self.port][reason].info.value
            self.pvDB[reason] = data

        def read(self, reason):
            value = self.getParam(reason)
            if isinstance(value, list) and not value:
                return [0]  # an empty buffer: CA cannot send zero elements
            return value

        def write(self, reason, value):
            spec = self.specs[reason]
            if spec.is_buffer:
                old = self.getParam(reason)
                if spec.kind == "c":
                    new = value if isinstance(value, str) else "".join(map(chr, value))
                    self.setParam(reason, (old + new)[-spec.count :])
                else:
                    new = value if isinstance(value, list) else [value]
                    self.setParam(reason, (old + new)[-spec.count :])
            else:
                self.setParam(reason, value)
            return True

    class RelayServer(SimpleServer):
        def __init__(self) -> None:
            super().__init__()
            self.driver: RelayDriver | None = None

        def _spec(self, fullname: str) -> PvSpec | None:
            try:
                return parse_pv_name(fullname, prefix, args.max_elements, args.max_name_length)
            except InvalidPvName:
                return None

        def pvExistTest(self, context, addr, fullname):
            if fullname in manager.pvf or self._spec(fullname) is not None:
                return cas.pverExistsHere
            return cas.pverDoesNotExistHere

        def pvAttach(self, context, fullname):
            pv = manager.pvf.get(fullname)
            if pv is not None:
                return pv
            spec = self._spec(fullname)
            if spec is None:
                return cas.S_casApp_pvNotFound
            reason = fullname[len(prefix) :]
            info = {"type": PCASPY_TYPES[spec.kind], "count": spec.count}
            if spec.is_buffer:
                info["value"] = "" if spec.kind == "c" else []
            self.createPV(prefix, {reason: info})
            self.driver.add(reason, spec)
            return manager.pvf[fullname]

    server = RelayServer()
    server.driver = RelayDriver()

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    print(f"ready: control relay, prefix {prefix}", flush=True)
    while not stopping:
        server.process(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
