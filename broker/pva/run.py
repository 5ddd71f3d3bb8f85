"""The PVA front-end process: ``carelay pva`` starts here.

It makes the front-end, serves it with a p4p Server (port and interfaces as pvxs reads
them from EPICS_PVAS_SERVER_PORT and EPICS_PVAS_INTF_ADDR_LIST), runs the loop until a
stop, and lets the last puts go to the shards.
"""

from __future__ import annotations

import logging
import os
import signal

from carelay.broker.cstreams import own_stderr
from carelay.common import exits
from carelay.common.config import PVA_FD_LIMIT, Config
from carelay.common.keys import KeysError
from carelay.common.lifecycle import (
    StopFlag,
    bound_malloc,
    die_with_parent,
    fit_fd_limit,
    release_signals,
    settle_gc,
)
from carelay.common.runlock import run_token

log = logging.getLogger(__name__)

#: How long a stopping front-end lets ZeroMQ send its last puts to the shards (ms).
_STOP_LINGER = 1000
#: What to install when p4p is missing.
NEEDS_P4P = "PV Access needs p4p: pip install 'carelay[pva]'"


def server_failed(e: Exception, interfaces: str) -> str:
    """Why pvxs could not start its server on ``interfaces`` (EPICS_PVAS_INTF_ADDR_LIST),
    and which port it means: a taken TCP port it replaces by another, so an address in
    use is its UDP port (searches), which PVA servers share and some other program holds
    alone."""
    why = str(e) or type(e).__name__
    if "Address already in use" in why:
        port = (
            os.environ.get("EPICS_PVAS_BROADCAST_PORT")
            or os.environ.get("EPICS_PVA_BROADCAST_PORT")
            or "5076"
        )
        where = interfaces or "every interface"
        why += (
            f" (UDP port {port} on {where}, EPICS_PVAS_BROADCAST_PORT: held by a program "
            "that does not share it)"
        )
    return why


def run_pva(config: Config) -> int:
    """Entry point of ``carelay pva``."""
    die_with_parent()
    # pvxs and libevent report on stderr, as often as clients make them (a refused
    # accept, each time): log lines, bounded as the CA broker's (see cstreams.py).
    own_stderr()
    bound_malloc()
    # A descriptor per PVA client: the usual soft limit of 1,024 would leave clients
    # past it waiting in the kernel's backlog, and this process without descriptors of
    # its own (shard sockets, status files).
    fit_fd_limit(PVA_FD_LIMIT)
    stop = StopFlag()
    # The supervisor passes SIGHUP (reload the access security) to every front-end;
    # until the front-end can act on it (below), it loads the file anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    release_signals(signal.SIGHUP)
    try:
        from p4p.server import Server

        from carelay.broker.pva.channels import (
            Channel,
            denied,
            free_operations,
            provider,
            quiet_refusals,
            sweep,
        )
    except ImportError as e:
        log.error("pva cannot start: %s (%s)", NEEDS_P4P, e)
        return exits.CANNOT_START
    from carelay.broker.pva.front import PvaFrontEnd

    config.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        front = PvaFrontEnd(config, token=run_token(config))
    except KeysError as e:
        log.error("pva cannot start: %s", e)
        return exits.CANNOT_START
    front.make_channel_object = Channel
    front.make_denied_object = denied
    front.sweep_operations = sweep
    front.access.load()
    signal.signal(signal.SIGHUP, lambda *_: setattr(front, "reload_due", True))
    names = provider(front)
    quiet_refusals()
    interfaces = os.environ.get("EPICS_PVAS_INTF_ADDR_LIST", "").strip()  # pvxs reads it too
    try:
        server = Server(providers=[names], useenv=True)
    except Exception as e:
        log.error("pva cannot start: the PVA server failed: %s", server_failed(e, interfaces))
        return exits.CANNOT_START
    conf = server.conf()
    port = conf.get("EPICS_PVAS_SERVER_PORT", "")
    front.pva_port = int(port) if str(port).isdigit() else None
    front.interfaces = interfaces
    log.debug("started (pid %d), PVA server %s", os.getpid(), conf)
    settle_gc()  # as the CA broker: fewer and shorter collections while puts flow
    try:
        front.loop.run(stop)
    finally:
        free_operations()  # while the server's thread runs, which freeing them waits for
        server.stop()
        for link in front.links:
            link.close(linger=_STOP_LINGER)
            link.close_parked()
        front.status_path.unlink(missing_ok=True)
        front.inbox.close()
    log.info("stopped")
    return exits.OK
