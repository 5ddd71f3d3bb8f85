"""The broker process: ``carelay broker`` starts here.

It readies the process (signals, descriptors, the CA environment, access security),
makes the Broker and its CA server, serves /metrics if asked, runs the loop until a
stop, and then lets the last puts go to the shards.
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import sys

from carelay.broker import access
from carelay.broker.app import Broker
from carelay.broker.cabuffers import watch_free_list
from carelay.broker.circuits import CircuitMonitor, Limits, client_limit, open_fds
from carelay.broker.cstreams import own_stderr
from carelay.broker.listening import listening_tcp_ports, udp_port_held
from carelay.broker.peers import PeerBrokers
from carelay.common import exits
from carelay.common.config import FD_SETSIZE, Config, ca_interfaces, configured_ca_port
from carelay.common.keys import KeysError
from carelay.common.lifecycle import (
    StopFlag,
    bound_malloc,
    broker_role,
    die_with_parent,
    fit_fd_limit,
    release_signals,
    settle_gc,
    status_path,
)
from carelay.common.runlock import run_token, supervised

log = logging.getLogger(__name__)

#: How long a stopping broker lets ZeroMQ send its last puts to the shards (ms).
_STOP_LINGER = 1000


def run_broker(config: Config, index: int = 0) -> int:
    """Entry point of ``carelay broker``; ``index``: which of the ``[[ca]]`` brokers."""
    die_with_parent()
    own_stderr()
    bound_malloc()
    stop = StopFlag()
    # Until the broker can act on it (below), a reload has nothing to do: it loads anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    release_signals(signal.SIGHUP)
    # Before PCAS exists: no circuit it accepts may reach FD_SETSIZE (see circuits.py).
    fd_limit = fit_fd_limit(FD_SETSIZE)
    # libca/PCAS read this when the server is made: large arrays need it.
    os.environ["EPICS_CA_MAX_ARRAY_BYTES"] = str(config.ca_max_array_bytes)
    from pcaspy import _cas, cas

    from carelay.broker import sockethooks
    from carelay.broker.casserver import RelayServer

    config.run_dir.mkdir(parents=True, exist_ok=True)
    # PCAS aborts the process when it cannot bind its UDP port: say why, before anything.
    port = configured_ca_port()
    held = udp_port_held(ca_interfaces(), int(port)) if port.isdigit() else None
    if held is not None:
        log.error("broker cannot serve CA: %s", held)
        return exits.CANNOT_START
    acf = config.access_security is not None
    # The CA streams are followed to bound each circuit's channels, and with access
    # security for the rewrite of access by address and to see the puts that PCAS
    # refuses by itself.
    followed = True
    try:
        sockethooks.install(_cas.__file__, acf and config.access_by_ip, config.channel_limit)
    except (OSError, RuntimeError, ValueError, struct.error) as e:
        if acf and config.access_by_ip:
            log.error(
                "broker cannot start: access_by_ip cannot be enforced with this pcaspy "
                "(%s); set access_by_ip = false to match claimed host names",
                e,
            )
            return exits.REFUSED
        log.warning(
            "the channels of a CA circuit are not bounded%s: %s",
            ", and puts refused by access security not recorded" if acf else "",
            e,
        )
        followed = False
    # The file is loaded before any PV is made (PCAS adds a PV to its group only while
    # rules are in force): the relay's read-only PVs and the health PVs join groups that
    # tell CA clients they may not write them (broker/access.py).
    if acf:
        # Every relay PV joins access_group; pcaspy's channels then check each
        # read and write (and so each creation, which is a write) against the file.
        problem = access.undefined_access_group(config.access_security, config.access_group)
        if problem is not None:
            log.error("broker cannot start: access_group: %s", problem)
            return exits.REFUSED
        if not access.load_rules(
            cas, config.access_security, config.access_by_ip, config.access_group, config.run_dir
        ):
            log.error(
                "broker cannot start: access security file %s is invalid", config.access_security
            )
            return exits.REFUSED
        cas.asCaStart()
        log.info(
            "access security from %s, group %s, HAGs by %s",
            config.access_security,
            config.access_group,
            "peer address" if config.access_by_ip else "claimed host name",
        )
    elif not access.load_rules(cas, None, False, "DEFAULT", config.run_dir):
        log.warning("the read-only PVs tell clients they may be written")
    try:
        broker = Broker(config, cas, token=run_token(config))
    except KeysError as e:
        log.error("broker cannot start: %s", e)
        return exits.CANNOT_START
    if index:
        broker.status_path = status_path(config.run_dir, broker_role(index))
    # Under `carelay up` every broker runs here; one started alone may have peers elsewhere.
    here = supervised(config.data_dir)
    broker.health.peers = PeerBrokers(
        config.run_dir, config.brokers, index, all_here=here, pva=config.pva
    )
    sys.excepthook = _undecodable_names(broker, sys.excepthook)
    if followed:
        broker.denied_puts = sockethooks.DeniedPuts(
            broker.access_denied, lambda: broker.health.count_refusal("access")
        )
        sockethooks.watch_denied(broker.denied_puts.denied)

    def reload_asked(_signum, _frame) -> None:
        broker.reload_due = True

    signal.signal(signal.SIGHUP, reload_asked)
    # Before the server is made: PCAS makes its list of large CA buffers with it.
    free_list = watch_free_list(config.ca_max_array_bytes)
    server = RelayServer(broker)
    # Read now, while the CA server's are the only listening sockets of this process.
    broker.ca_ports = listening_tcp_ports()
    metrics = None
    # One /metrics port: the first broker serves it.
    if config.metrics_port is not None and index == 0:
        from carelay.broker.metrics import serve_metrics

        try:
            metrics = serve_metrics(broker.health, config.metrics_address, config.metrics_port)
        except OSError as e:
            # CA goes on: the relay's PVs matter more than its metrics.
            log.error(
                "cannot serve metrics on %s:%d: %s; the relay runs without /metrics",
                config.metrics_address,
                config.metrics_port,
                e.strerror or e,
            )
    broker.loop.wait = _select_hook()
    # Where the streams are not followed, mid_message says None for every circuit.
    broker.circuits = _circuit_monitor(config, broker.ca_ports, fd_limit, sockethooks.mid_message)
    sockethooks.watch_channel_limit(broker.circuits.too_many_channels)
    sockethooks.watch_refused(broker.refused_write)
    broker.circuits.buffers.watch(free_list)
    log.debug("started (pid %d)", os.getpid())
    settle_gc()
    try:
        broker.run(stop)
    finally:
        if broker.circuits is not None:
            broker.circuits.close()
        for link in broker.links:
            link.close(linger=_STOP_LINGER)
            link.close_parked()
        broker.status_path.unlink(missing_ok=True)
        if metrics is not None:
            metrics.shutdown()
        del server
    log.info("stopped")
    return exits.OK


def _select_hook():
    """CA's select() watching the shard sockets too (broker/wait.py), or None."""
    from pcaspy import _cas

    from carelay.broker.wait import install

    return install(_cas.__file__)


def _undecodable_names(broker: Broker, previous):
    """An excepthook that turns pcaspy's report of a name it cannot decode into a refusal.

    SWIG converts a searched name to str before any relay code runs; on bytes that are
    not UTF-8 it prints the UnicodeDecodeError through sys.excepthook, with no traceback
    (no Python frame raised it), and goes on.  Anything else goes to ``previous``."""

    def hook(kind, exc, tb) -> None:
        if tb is None and issubclass(kind, UnicodeDecodeError) and isinstance(exc.object, bytes):
            try:
                broker.refuse_undecodable(exc.object)
            except Exception:
                log.exception("cannot log a name that is not UTF-8")
            return
        previous(kind, exc, tb)

    return hook


def _circuit_monitor(
    config: Config, ports: list[int], fd_limit: int, mid_message
) -> CircuitMonitor:
    max_clients = client_limit(config.max_clients, fd_limit, open_fds(), config.memory_client_limit)
    if config.max_clients is not None and max_clients < config.max_clients:
        log.warning(
            "max_clients %d does not fit in %d descriptors; at most %d CA circuits",
            config.max_clients,
            fd_limit,
            max_clients,
        )
    log.info(
        "CA circuits: at most %d (max_clients), each pinning up to %d bytes of CA buffers "
        "(%d MiB in all), at most %d channels each (max_channels); closed after %g s of "
        "silence (client_idle_timeout)",
        max_clients,
        config.circuit_bytes,
        max_clients * config.circuit_bytes >> 20,
        config.channel_limit,
        config.client_idle_timeout,
    )
    limits = Limits(max_clients, config.client_idle_timeout)
    return CircuitMonitor(
        ports,
        limits,
        fd_limit,
        array_bytes=config.ca_max_array_bytes,
        mid_message=mid_message,
    )
