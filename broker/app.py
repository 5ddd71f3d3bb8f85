"""Broker: the object that ties the broker's parts together.

The parts, one concern each: the PV table with its claims and limits (table.py), the
put path to the shards (forward.py), the requests in flight (requests.py), what the
shards send and the resync (sync.py), the loop that serves CA and the shards on one
thread (loop.py), and the process around them (main.py).  The CA adapter classes
(pvs.py) and the health figures see only this object.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable

import zmq

from carelay.broker import sockethooks
from carelay.broker.forward import Forwarder
from carelay.broker.health import Health
from carelay.broker.link import shard_links
from carelay.broker.loop import Loop
from carelay.broker.offloop import OffLoop
from carelay.broker.requests import Requests
from carelay.broker.sync import ShardSync
from carelay.broker.table import PvTable
from carelay.broker.turnposts import TurnPosts
from carelay.common.config import STARTUP_GRACE, STARTUP_QUIET, Config
from carelay.common.fields import FieldResolver, split_field
from carelay.common.lifecycle import StopFlag
from carelay.common.logbudget import shorten

log = logging.getLogger(__name__)


class Broker:
    """The shard links, the PV table, the requests and the loop, and what the CA
    adapter classes ask of them."""

    def __init__(
        self, config: Config, cas_module, ctx: zmq.Context | None = None, token: str | None = None
    ) -> None:
        from carelay.broker.healthpvs import HealthPVs
        from carelay.broker.pvs import DelPvPV, FieldPV, PvListPV, RelayPV

        self.config = config
        #: Presented in every HELLO: a shard serves only the brokers of its own relay.
        self.token = token
        #: This broker process, in every HELLO: a shard fences its earlier connections.
        self.instance = secrets.token_hex(8)
        self.cas = cas_module
        self.ctx = ctx or zmq.Context.instance()
        self.links = shard_links(self.ctx, config)
        #: Per shard, why its store cannot be written ("" while it can), as its PONGs say:
        #: its PVs carry a WRITE alarm, and puts with callback to them (which it refuses)
        #: take the round trip.
        self.store_errors = [""] * config.shards
        self.resolver = FieldResolver(config.prefix, config.fields)
        self.access_group = config.access_group if config.access_security else None
        #: The relay's own health: figures, ``<prefix>relay:`` PVs (served at once, even
        #: before the shards are in sync) and what /metrics reads.
        self.health = Health(config.shards, _version())
        self.health_pvs = HealthPVs(config.prefix, config.shards, config.autosave_period)
        self.table = PvTable(self, RelayPV, FieldPV)
        #: The same dicts as the table's: the CA adapter classes look PVs up here.
        self.pvs = self.table.pvs
        self.field_pvs = self.table.field_pvs
        self.requests = Requests(self.links, self.table, self.health, self.error)
        self.sync = ShardSync(self)
        self.loop = Loop(self)
        #: The loop's turns, and the PVs whose events wait for a turn's end.
        self.turn_posts = TurnPosts()
        self.forwarder = Forwarder(self)
        # The put path, bound once (no forwarding call on every put).
        self.forward_put = self.forwarder.put
        self.write_through = self.forwarder.write_through
        self.forward_field = self.forwarder.field
        self.forward_delete = self.forwarder.delete
        self.pvlist = PvListPV(self, config.pvlist_name, config.pvlist_count)
        # Room for the terminating NUL a client may send after the longest name.
        self.delpv = DelPvPV(self, config.delpv_name, config.max_name_length + 1)
        self.controls = {self.pvlist.name: self.pvlist, self.delpv.name: self.delpv}
        #: Every shard has been in sync once: the relay serves.
        self.ready = False
        #: Until ready, or STARTUP_QUIET after the start, shards in sync are DEBUG news:
        #: the ready line says it for all of them.
        self.quiet_until: float | None = time.monotonic() + STARTUP_QUIET
        self.ca_port: int | None = None
        #: The TCP ports the CA server listens on (see run_broker).
        self.ca_ports: list[int] = []
        self.status_path = config.run_dir / "broker.json"
        #: A link changed state: the status file is written at the next tick.
        self.status_due = False
        #: SIGHUP asked for the access security file to be read again.
        self.reload_due = False
        #: Where it is read again (see offloop.py).
        self.acf_reload = OffLoop("acf-reload")
        self.startup_grace = STARTUP_GRACE
        #: The CA context of the put being handled (BasePV.write), for whom an error names.
        self.put_context = None
        #: Bounds and reaps the CA circuits (see run_broker); None: not watched.
        self.circuits = None
        #: Puts that access security refused, as the CA streams show them (see
        #: run_broker); None: not followed.
        self.denied_puts = None

    def run(self, stop: StopFlag) -> None:
        self.loop.run(stop)

    def reload_access(self) -> None:
        """Read the access security file again (SIGHUP, ``carelay reload-acf``): off the
        loop, and in force once the loop takes it (``acf_reload.poll``)."""
        from carelay.broker.access import reinstall_rules, reread_rules

        self.reload_due = False
        config = self.config
        self.acf_reload.submit(
            lambda: reread_rules(config), lambda text: reinstall_rules(self.cas, config, text)
        )

    # -- what the CA adapter classes and the health figures read ---------------------------

    @property
    def n_real(self) -> int:
        return self.table.n_real

    @property
    def n_bytes(self) -> int:
        return self.table.n_bytes

    @property
    def byte_limit(self) -> int:
        return self.table.byte_limit

    def claims(self, name: str, addr=None) -> bool:
        return self.table.claims(name, addr)

    def bytes_left(self) -> int:
        return self.table.bytes_left()

    def ca_buffer_bytes(self) -> int:
        return self.table.ca_buffer_bytes()

    @property
    def other_ca_buffer_bytes(self) -> int:
        """The large CA buffers the relay's other CA brokers hold (their status files)."""
        peers = self.health.peers
        return peers.others_buffer_bytes if peers is not None else 0

    def attach(self, name: str):
        return self.table.attach(name)

    def detached(self, pv) -> None:
        self.table.detached(pv)

    def real_names(self) -> Iterable[str]:
        return self.table.real_names()

    def attached_count(self) -> int:
        return self.table.attached_count()

    def refuse_undecodable(self, raw: bytes) -> None:
        self.table.refuse_undecodable(raw)

    def field_value(self, spec, field: str):
        return self.table.field_value(spec, field)

    def post_field(self, name: str, field: str) -> None:
        self.table.post_field(name, field)

    def post_later(self, pv) -> None:
        """``pv`` has a coalesced event waiting (see RelayPV.post)."""
        self.loop.due_posts.add(pv)

    def shard_live(self, index: int) -> bool:
        """Shard ``index`` is in sync: what the mirror shows of it is what it holds."""
        return self.links[index].live

    def put_waits(self, shard: int) -> bool:
        return self.requests.put_waits(shard)

    def park(self, pv, payload, notify, shard: int) -> None:
        self.requests.park(pv, payload, notify, shard, self.client())

    def client(self) -> tuple[str, str] | None:
        """(host, user) of the CA client whose put is being handled, if one is."""
        ctx = self.put_context
        if ctx is None:
            return None
        try:
            host, user = str(ctx.host), str(ctx.user)
        except Exception:
            return None
        if self.config.access_security is not None and self.config.access_by_ip:
            from carelay.broker.access import token_address

            # PCAS holds the token of the client's address (see access.py), not a name.
            host = token_address(host) or host
        return host, user

    def error(
        self, kind: str, reason: str, pv: str | None = None, shard: int | None = None, client=None
    ) -> bool:
        """A refusal or failure, for ``relay:LAST_ERROR``/``ERRORS`` and /metrics: it names
        the client of the put being handled unless ``client`` is given.  Whether it may be
        logged too: refused and failed puts are kept and logged within a budget."""
        return self.health.refused(kind, reason, pv, shard, client or self.client())

    def access_denied(self, name: str, user: str, address: str, notify: bool) -> None:
        """A put that PCAS refused for want of write access: one log line and one entry."""
        from carelay.broker.access import ACCESS_DENIED

        pv = self.pvs.get(split_field(name)[0])
        shard = None if pv is None else pv.shard
        log.warning(
            "refused %s to %s%s from %s@%s: %s",
            "put with callback" if notify else "put",
            shorten(name),
            "" if shard is None else f" (shard {shard})",
            user or "?",
            address or "?",
            ACCESS_DENIED,
        )
        self.error("access", ACCESS_DENIED, shorten(name), shard, (address, user or "?"))

    def tick_hooks(self) -> None:
        """The summaries of what the CA stream hooks logged within a budget."""
        sockethooks.tick()

    def refused_write(self, name: str, user: str, address: str, notify: bool, reason: str):
        """A put refused on its way into PCAS, for what PCAS would have made of it (see
        broker/writecheck.py): one log line and one entry, within the budget."""
        pv = self.pvs.get(split_field(name)[0])
        shard = None if pv is None else pv.shard
        client = (address or "?", user or "?")
        if self.error("convert", f"refused put: {reason}", shorten(name), shard, client):
            log.warning(
                "refused %s to %s from %s@%s: %s",
                "put with callback" if notify else "put",
                shorten(name),
                user or "?",
                address or "?",
                reason,
            )

    # -- reads that wait for the changes in flight -------------------------------------------

    def wait_for_answers(self, pv) -> None:
        """Serve ``pv``'s shard until its requests in flight are answered (bounded)."""
        link = self.links[pv.shard]

        def waited_for() -> set[int]:
            busy = self.requests.in_flight(pv) and link.usable and link.sock is not None
            return {pv.shard} if busy else set()

        self.loop.serve_until(waited_for, pv.name)

    def wait_for_list_changes(self) -> None:
        """Serve the shards until the creations and deletions in flight are answered
        (bounded), so that a read of pvlist shows them."""
        in_flight = self.requests.in_flight

        def waited_for() -> set[int]:
            return {
                pv.shard
                for pv in self.pvs.values()
                if (pv.creating or pv.deleting) and in_flight(pv) and self.links[pv.shard].usable
            }

        self.loop.serve_until(waited_for, "pvlist")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("carelay")
    except PackageNotFoundError:
        return "unknown"
