"""A shard's autosave: its store written to its database, and whether that can be done.

Creations and deletions are committed by the loop, a batch at a time, before they are
acknowledged (``commit``).  Changed values are flushed every ``autosave_period`` by a
thread of its own (``flush_soon``), so that the loop goes on serving during the write and
its fsync; ``flush`` writes them all at once (the clean stop).  Another thread refreshes
the database's good copy (seconds for a large store): a commit waits for the value write
in flight, which must not queue behind the copy, and the copy reads a snapshot of its own
(ShardDatabase.refresh_good_copy), so that neither a commit nor a value write waits for it.

A store that cannot be written (a full disk, a file size limit) is a fault of its own:
the values stay held in memory and the write is tried again every ``autosave_period``.
Once it has failed for longer than that, the shard refuses puts with callback (it could
not keep the promise of their acknowledgement) and tells the broker, in every PONG, so
that its PVs carry an alarm.  Creations, deletions and field changes are refused while
they cannot be made durable, and all of them once it has failed that long, even where their
small commit would get through (a file size limit lets it in, never the large value held).
It all clears once the store is written again: a write succeeds and no value whose write
failed is left unsaved.  A small write alone does not clear it: the values it held would
still be lost, while the clients were told their puts are safe.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from carelay.common.config import AUTOSAVE_PART_BYTES
from carelay.common.histogram import FLUSH_BUCKETS, Histogram
from carelay.shard.persist import ShardDatabase
from carelay.shard.store import ShardStore

log = logging.getLogger(__name__)

#: Seconds between refreshes of the store's good copy (each after an integrity check).
GOOD_COPY_INTERVAL = 300.0
#: While the store cannot be written, how often the ERROR is said again (seconds).
STORE_ERROR_REPEAT = 60.0
#: Most PV names one log line lists.
_NAMES_LOGGED = 20


@dataclass(frozen=True, slots=True)
class Unsaved:
    """Creations, deletions and field changes that a commit could not make durable
    (undone in the store), and why: ``undone`` says, by name, from which change on all of
    the PV's changes were undone, or None where only its field changes were (see
    ShardStore.rollback_unsaved)."""

    undone: dict[str, int | None]
    error: Exception
    #: PVs brought back that every front-end must hear of again (Rollback.restate).
    restate: tuple[str, ...] = ()

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.undone)


class Autosave:
    """Writes one shard's store to its database, and tells ``health`` how that went."""

    def __init__(
        self, store: ShardStore, db: ShardDatabase | None, health: StoreHealth, index: int
    ) -> None:
        self.store = store
        self.db = db
        self.health = health
        self.index = index
        self._thread: ThreadPoolExecutor | None = None
        self._saving: Future | None = None
        #: The thread that refreshes the good copy, and the refresh in flight.
        self._copy_thread: ThreadPoolExecutor | None = None
        self._copying: Future | None = None
        self._saving_names: list[str] = []
        #: Names changed in the period whose values are being written, part by part
        #: (AUTOSAVE_PART_BYTES), and are not yet taken.
        self._to_save: list[str] = []
        #: Names whose value write failed and that no write has saved since: while any is
        #: left, the store is not written again, whatever smaller write got through.
        self._held: set[str] = set()
        #: Values written by the clean stop (changed since the last flush).
        self.saved_on_stop = 0
        #: For the broker's health figures: how long value flushes took, and since when
        #: (wall clock) every value applied is saved.
        self.flush_times = Histogram(FLUSH_BUCKETS)
        self.saved_at = time.time()
        self._saving_since = 0.0

    # -- creations and deletions: on the loop ------------------------------------------

    def commit(self) -> Unsaved | None:
        """Make the creations and deletions applied since the last commit durable; None
        when they are, else what could not be (undone in the store) and why."""
        if self.db is None or not self.store.needs_commit:
            self.store.committed()
            return None
        # A value write in flight holds older rows: it lands first, so that it can
        # never bring back a PV deleted here.
        self.collect(wait=True)
        if self.health.refusing:
            # Past the autosave period they are refused with the error, as puts with
            # callback are, though a commit this small might fit: it would not end the
            # fault, and what it made durable would be all that is.
            return self._refuse(self.health.store_error)
        upserts, deletes = self.store.unsaved_changes()
        try:
            self.db.save(upserts, deletes)
        except (sqlite3.Error, OSError) as e:
            self.health.failed(e, quiet=True)  # the line of _refuse says it
            return self._refuse(e)
        # Their rows hold their values: a value held for them is saved now.
        self._held.difference_update(row[0] for row in upserts)
        self._held.difference_update(deletes)
        self._written()
        self.store.committed()
        return None

    def _refuse(self, error: Exception) -> Unsaved:
        """Undo the creations, deletions and field changes not made durable (``error``)."""
        rollback = self.store.rollback_unsaved()
        log.error(
            "cannot save %d creations/deletions/field changes to %s (%s); refusing them",
            len(rollback.undone),
            self.db.path,
            error,
        )
        return Unsaved(rollback.undone, error, tuple(rollback.restate))

    def _written(self) -> None:
        """A write succeeded: the store is written again only when no value whose write
        failed is left unsaved (a file size limit lets small writes in, never the large
        value held); until then the fault stays, and so do its refusals."""
        if not self._held:
            self.health.written()

    # -- values: in the autosave thread ---------------------------------------------------

    def flush(self) -> int:
        """Write every changed value now; returns how many PVs."""
        if self.db is None:
            self.store.dirty.clear()
            return 0
        self.collect(wait=True)
        rows = self.store.dirty_rows()
        if not rows:
            return 0
        # When it began, which the front-ends read as the flush's age; how long it took, on
        # a clock that no step of the wall clock moves.
        started, t0 = time.time(), time.monotonic()
        try:
            self.db.save(rows)
        except (sqlite3.Error, OSError) as e:
            self._held.update(row[0] for row in rows)
            self.health.failed(e, f"autosave of {len(rows)} values failed", len(self.store.dirty))
            return 0
        self.flush_times.observe(time.monotonic() - t0)
        self.saved_at = started
        self._held.clear()
        self._written()
        self.store.dirty.clear()
        self._to_save.clear()
        return len(rows)

    def flush_soon(self) -> int:
        """Start writing the changed values in the autosave thread, the next part of them
        (AUTOSAVE_PART_BYTES) while ``saving_parts``; returns how many PVs (0 also while the
        previous write is still going: the next tick takes them)."""
        if self.db is None:
            self.store.dirty.clear()
            return 0
        if not self.collect(wait=False):
            return 0
        if not self._to_save:
            # A new period: once all its parts are written, every value applied before
            # now is saved (FLUSH_AGE).
            self._to_save = list(self.store.dirty)
            self._saving_since = time.time()
        rows = self.store.take_rows(self._to_save, AUTOSAVE_PART_BYTES)
        if not rows:
            if self.health.store_error is None:
                self.saved_at = time.time()  # nothing waits to be saved
            else:
                # Nothing waits, but the store failed: a small write tells when it heals.
                self._saving_names = []
                self._saving = self._autosave_thread().submit(self.db.check_writable)
            return 0
        self._saving_names = [row[0] for row in rows]
        self.store.dirty.difference_update(self._saving_names)
        self._saving = self._autosave_thread().submit(self._timed_save, rows)
        return len(rows)

    def _timed_save(self, rows) -> float:
        """In the autosave thread: save ``rows``; returns how long that took (seconds)."""
        started = time.monotonic()
        self.db.save(rows)
        return time.monotonic() - started

    @property
    def unsaved(self) -> bool:
        """Values wait to be written, or a write is in flight: the flush timer has work."""
        return bool(self.store.dirty or self._to_save or self._saving is not None)

    @property
    def saving_parts(self) -> bool:
        """Parts of the period's changed values wait to be written after the one in flight."""
        return bool(self._to_save)

    def collect(self, wait: bool) -> bool:
        """Whether no value write is in flight, after taking the result of a finished one
        (``wait``: after waiting for it).  A failed write is made again at the next tick."""
        future = self._saving
        if future is None:
            return True
        if not wait and not future.done():
            return False
        self._saving = None
        try:
            took = future.result()
        except (sqlite3.Error, OSError) as e:
            self.store.dirty.update(self._saving_names)
            self._held.update(self._saving_names)
            n = len(self._saving_names)
            what = f"autosave of {n} values failed" if n else "write check failed"
            self.health.failed(e, what, len(self.store.dirty))
        else:
            self._held.difference_update(self._saving_names)
            if self._saving_names:
                self.flush_times.observe(took)
                if not self._to_save and not self._held:
                    self.saved_at = self._saving_since
            self._written()
        self._saving_names = []
        return True

    def refresh_good_copy_soon(self) -> None:
        """Refresh the database's good copy in a thread of its own (not the one of the
        value writes: they would queue behind it), unless the last refresh still runs."""
        if self.db is None:
            return
        if self._copying is not None and not self._copying.done():
            return  # the next is due a GOOD_COPY_INTERVAL later
        if self._copy_thread is None:
            self._copy_thread = ThreadPoolExecutor(
                1, thread_name_prefix=f"shard{self.index}-goodcopy"
            )
        self._copying = self._copy_thread.submit(self._refresh_good_copy)

    def _refresh_good_copy(self) -> None:
        """In the good copy's thread: a new good copy, after the integrity check."""
        try:
            self.db.refresh_good_copy()
        except (sqlite3.Error, OSError) as e:
            log.error("cannot refresh the good copy: %s", e)

    def _autosave_thread(self) -> ThreadPoolExecutor:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"shard{self.index}-autosave")
        return self._thread

    def close(self) -> None:
        """Wait for a value write in flight, abandon a refresh of the good copy in flight
        (see ShardDatabase.abandon_copy), and stop their threads."""
        self.collect(wait=True)
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._copy_thread is not None:
            self.db.abandon_copy()
            self._copy_thread.shutdown(wait=True)
            self._copy_thread = None
            self._copying = None

    def stop(self) -> bool:
        """The clean stop: write every changed value and stop the thread; False, after a
        line that names them, when values are left unsaved."""
        n = self.flush()
        self.close()
        if self.store.dirty:
            names = sorted(self.store.dirty)
            more = len(names) - _NAMES_LOGGED
            log.error(
                "stopped with %d value%s not saved to %s (%s): %s%s",
                len(names),
                "" if len(names) == 1 else "s",
                self.db.path,
                self.health.store_error,
                ", ".join(names[:_NAMES_LOGGED]),
                f" and {more} more" if more > 0 else "",
            )
            return False
        self.saved_on_stop = n
        return True


class StoreHealth:
    """Whether a shard's database can be written: the last write's error, since when, and,
    once that has lasted longer than the autosave period, why puts with callback are
    refused (``refusing``, "" while they are not)."""

    def __init__(self, index: int, period: float, path: Path | None) -> None:
        self.index = index
        self.period = period
        self.path = path
        #: The last write's error (None: it worked), and since when (POSIX time).
        self.store_error: Exception | None = None
        self.store_failed_since: float | None = None
        self._failed_at = 0.0  # monotonic
        self._failures = 0
        self._error_logged = 0.0
        self.refusing = ""
        #: The state changed: the broker and the status file should hear it now.
        self.status_due = False

    def failed(self, error: Exception, what: str = "", held: int = 0, quiet: bool = False) -> None:
        """A write to the store failed, with ``held`` values waiting: said at once (ERROR,
        with the errno and the file), then again when the error changes or every
        STORE_ERROR_REPEAT seconds (``quiet``: the caller says it this time)."""
        now = time.monotonic()
        self._failures += 1
        first = self.store_error is None
        changed = first or str(error) != str(self.store_error)
        self.store_error = error
        if first:
            self.store_failed_since = time.time()
            self._failed_at = now
        else:
            what = (
                f"{what}; the store still cannot be written ({self._failures} failed writes "
                f"in {now - self._failed_at:.0f} s)"
            )
        if self.refusing and changed:
            self.refusing = self._refusal()
            self.status_due = True
        if quiet:
            self._error_logged = now
        elif changed or now - self._error_logged >= STORE_ERROR_REPEAT:
            log.error(
                "%s: %s; %d values held, tried again every %g s",
                what,
                error,
                held,
                self.period,
            )
            self._error_logged = now

    def _refusal(self) -> str:
        return f"the store of shard {self.index} cannot be written: {self.store_error}"

    def written(self) -> None:
        """The store is written again (a write succeeded, and no value whose write failed
        is left: see Autosave._written): a fault it was in is over."""
        if self.store_error is None:
            return
        log.warning(
            "the store %s can be written again, after %.1f s; puts with callback "
            "are accepted again",
            self.path,
            time.monotonic() - self._failed_at,
        )
        self.store_error = None
        self.store_failed_since = None
        self._failures = 0
        self._error_logged = 0.0
        if self.refusing:
            self.refusing = ""
            self.status_due = True

    def check(self, now: float) -> None:
        """Refuse puts with callback once the store has failed for longer than the
        autosave period (the promise behind their acknowledgement cannot be kept)."""
        if self.refusing or self.store_error is None:
            return
        if now - self._failed_at <= self.period:
            return
        self.refusing = self._refusal()
        self.status_due = True
        log.error(
            "the store has not been written for %.1f s: puts with callback to its "
            "PVs fail, and the PVs carry a WRITE alarm, until it can be",
            now - self._failed_at,
        )
