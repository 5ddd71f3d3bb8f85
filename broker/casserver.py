"""RelayServer: the caServer whose pvExistTest/pvAttach claim names by the rule."""

from __future__ import annotations

import logging

from pcaspy import cas

from carelay.common.logbudget import shorten

log = logging.getLogger(__name__)


class RelayServer(cas.caServer):
    """Claims names that follow the rule and hands out the broker's PVs."""

    def __init__(self, broker) -> None:
        super().__init__()
        self.broker = broker

    def pvExistTest(self, context, addr, fullname):
        try:
            if self.broker.claims(fullname, addr):
                return cas.pverExistsHere
        except Exception:
            log.exception("pvExistTest %s failed", shorten(fullname))
        return cas.pverDoesNotExistHere

    def pvAttach(self, context, fullname):
        try:
            pv = self.broker.attach(fullname)
        except Exception:
            log.exception("pvAttach %s failed", shorten(fullname))
            pv = None
        return pv if pv is not None else cas.S_casApp_pvNotFound
