"""``relay:LAST_ERROR`` and ``ERRORS``: the lines of refusals and failures, and the log of
the last of them that every front-end keeps.  No pcaspy, no p4p: the PVA front-end keeps
one too, which its status file carries to the CA brokers (broker/health.py)."""

from __future__ import annotations

import collections
import time

from carelay.broker.logbudget import FAILURES, RefusedPuts
from carelay.common.config import ERROR_LINE_MAX, ERRORS_KEPT

__all__ = ["ErrorLog", "KeepsRefusals", "error_line", "fit_line"]


def error_line(
    reason: str,
    pv: str | None = None,
    shard: int | None = None,
    host: str | None = None,
    user: str | None = None,
    when: float | None = None,
) -> str:
    """One line of ``relay:ERRORS``: UTC time, client host and user, PV, shard, reason."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() if when is None else when))
    parts = [stamp + "Z"]
    if user:
        parts.append(f"client {user}@{host or '?'}")
    elif host:
        parts.append(f"client {host}")  # a search: an address, no user
    if pv:
        parts.append(f"pv {pv}")
    if shard is not None:
        parts.append(f"shard {shard}")
    return fit_line(" ".join(parts) + ": " + str(reason))


def fit_line(line: str) -> str:
    """At most ERROR_LINE_MAX bytes as the CA char PVs carry it (LAST_ERROR, ERRORS), cut on
    a character: a line of names that are not ASCII must fit whole, or ERRORS would lose
    its newest lines and LAST_ERROR its reason; one line."""
    line = " ".join(line.split())
    return line.encode("utf-8", "replace")[:ERROR_LINE_MAX].decode("utf-8", "ignore")


class ErrorLog:
    """The last ``keep`` refusals and failures, newest last; ``changes`` moves with each.

    The relay's own failures (a shard down or refusing: ``own``) hold their place against
    clients' refusals: the newest ``keep // 2`` of them stay among the lines however many
    refusals come after them (the oldest refusals give way instead), so that a client
    that searches or puts bad names by the hundred never hides a shard that is down."""

    def __init__(self, keep: int = ERRORS_KEPT) -> None:
        self.keep = keep
        self._own: collections.deque[tuple[int, str]] = collections.deque(maxlen=keep)
        self._others: collections.deque[tuple[int, str]] = collections.deque(maxlen=keep)
        self.changes = 0

    def add(self, line: str, own: bool = False) -> None:
        self.changes += 1
        (self._own if own else self._others).append((self.changes, line))

    @property
    def lines(self) -> list[str]:
        return [line for _, line in self.lines_with_numbers()]

    def lines_with_numbers(self) -> list[tuple[int, str]]:
        own = list(self._own)
        held = own[-max(1, self.keep // 2) :]
        rest = sorted(own[: len(own) - len(held)] + list(self._others))
        return sorted(held + rest[max(0, len(rest) - (self.keep - len(held))) :])

    @property
    def last(self) -> str:
        newest = max((d[-1] for d in (self._own, self._others) if d), default=(0, ""))
        return newest[1]

    def entries(self) -> list[tuple[int, str, bool]]:
        """The lines kept, oldest first, each with its number and whether it is the
        relay's own failure."""
        own = {seq for seq, _ in self._own}
        return [(seq, line, seq in own) for seq, line in self.lines_with_numbers()]

    def text(self) -> str:
        return "\n".join(self.lines)


class KeepsRefusals:
    """How a front-end takes a refusal or failure, the CA broker's Health as the PVA
    front-end's Figures: counted by ``kind`` (``count_refusal``, each its own way), and,
    if the budget of refused puts (``put_refusals``, a RefusedPuts) lets it be logged,
    kept as a line of ``errors`` (an ErrorLog), the relay's own failures marked so."""

    errors: ErrorLog
    put_refusals: RefusedPuts

    def count_refusal(self, kind: str) -> None:
        raise NotImplementedError

    def refused(
        self,
        kind: str,
        reason: str,
        pv: str | None = None,
        shard: int | None = None,
        client: tuple[str, str] | None = None,
    ) -> bool:
        """A refusal or failure: counted by ``kind`` and kept for LAST_ERROR/ERRORS;
        whether it may be logged too (False: over the budget of refused puts, and so
        counted only)."""
        self.count_refusal(kind)
        if not self.put_refusals.allow(kind, reason, pv):
            return False
        host, user = client if client else (None, None)
        self.errors.add(error_line(reason, pv, shard, host, user), own=kind in FAILURES)
        return True
