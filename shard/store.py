"""The shard's PV store: a plain object, no sockets, driven by the shard loop."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from carelay.common.fields import (
    NO_FIELDS,
    FieldError,
    FieldResolver,
    applies,
    clip_to_drive_limits,
    processes,
    validate,
)
from carelay.common.naming import InvalidPvName, PvSpec, parse_pv_name
from carelay.common.ring import RingBuffer


class Rejected(Exception):
    """An operation the store refuses; the message says why."""


@dataclass(slots=True)
class Change:
    """What one applied put did, as the broker needs to mirror it."""

    name: str
    seq: int
    stamp: float
    #: For a buffer the appended elements, else the whole new value.
    data: np.ndarray
    length: int
    created: bool


@dataclass(slots=True)
class StoredPv:
    spec: PvSpec
    stamp: float
    value: np.ndarray | None = None  # arrays and scalars
    ring: RingBuffer | None = None  # buffers
    #: Read-only: a change makes a new dict.  Most PVs have none and share NO_FIELDS.
    fields: Mapping[str, Any] = field(default_factory=lambda: NO_FIELDS)
    #: fields with the configured defaults filled in; None until needed, reset on a change.
    effective: dict | None = None

    def contents(self) -> np.ndarray:
        """The value, oldest first.  A copy for buffers: the ring's storage changes
        under later puts, and what we hand out may still be queued for sending."""
        return self.ring.view().copy() if self.ring is not None else self.value


@dataclass(slots=True)
class _Undo:
    """How to undo one PV's changes that wait for their commit (see ``rollback_unsaved``).

    A creation or deletion, change number ``seq`` (0: neither happened), takes the PV back
    to ``before`` (None: it did not exist), as it stood just before that change; it undoes
    every later change of the PV with it.  Field changes before any such change only bring
    back the fields (``fields``): the value puts around them stay applied, as acknowledged.
    """

    seq: int = 0
    before: StoredPv | None = None
    fields: Mapping[str, Any] | None = None
    #: Created again after its deletion here: a front-end may have written to the new PV
    #: through its mirror, so the one brought back is restated to all.
    recreated: bool = False


@dataclass(slots=True)
class Rollback:
    """What ``rollback_unsaved`` undid: by name, the sequence number from which all the
    PV's changes were undone (its creation's or deletion's), or None where only its field
    changes were; and the PVs brought back that every front-end must hear of again."""

    undone: dict[str, int | None]
    restate: list[str]


class ShardStore:
    """The PVs one shard owns, with a sequence number counting their changes."""

    def __init__(
        self,
        prefix: str,
        max_elements: int,
        max_name_length: int,
        clock: Callable[[], float] = time.time,
        field_defaults: dict | None = None,
    ) -> None:
        self._prefix = prefix
        self._resolver = FieldResolver(prefix, field_defaults or {})
        self._max_elements = max_elements
        self._max_name_length = max_name_length
        self._clock = clock
        self._pvs: dict[str, StoredPv] = {}
        self.seq = 0
        #: Names whose value changed since the last autosave.
        self.dirty: set[str] = set()
        #: Creations, deletions and field changes not yet durable, and how to undo them.
        self._unsaved: dict[str, _Undo] = {}

    def __len__(self) -> int:
        return len(self._pvs)

    def __contains__(self, name: str) -> bool:
        return name in self._pvs

    def names(self) -> list[str]:
        return list(self._pvs)

    def get(self, name: str) -> np.ndarray:
        return self._pvs[name].contents()

    def stamp(self, name: str) -> float:
        return self._pvs[name].stamp

    def is_buffer(self, name: str) -> bool:
        return self._pvs[name].ring is not None

    def _spec(self, name: str) -> PvSpec:
        try:
            return parse_pv_name(name, self._prefix, self._max_elements, self._max_name_length)
        except InvalidPvName as e:
            raise Rejected(f"invalid PV name: {e}") from None

    def put(self, name: str, data: np.ndarray, stamp: float = 0.0, create: bool = True) -> Change:
        """Apply a put: replace the value, or append to a buffer.  Creates the PV if new
        (``create`` False: refuses instead).  ``stamp``: the put's time (0: now)."""
        pv = self._pvs.get(name)
        if pv is None and not create:
            raise Rejected(f"no PV named {name}")
        spec = pv.spec if pv is not None else self._spec(name)
        if data.dtype != spec.dtype:
            raise Rejected(f"value of dtype {data.dtype} for a PV of dtype {spec.dtype}")
        data = data.reshape(-1)
        n = data.shape[0]
        if n == 0:
            raise Rejected("a put needs at least one element")
        if not spec.is_buffer and n > spec.count:
            raise Rejected(f"{n} elements for a PV of {spec.count}")
        created = pv is None
        if created:
            pv = StoredPv(spec, 0.0)
            if spec.is_buffer:
                pv.ring = RingBuffer(spec.count, spec.dtype)
        applied, length = self._apply(pv, data, stamp)
        self._pvs[name] = pv
        self.seq += 1
        if created:
            self._undo_whole(name, None)
        else:
            self.dirty.add(name)
        return Change(name, self.seq, pv.stamp, applied, length, created)

    def write_one(self, name: str, value: np.ndarray, stamp: float) -> int:
        """``put(name, value, stamp, create=False)`` of one element (a WRITE of a run),
        without the checks one element cannot fail and the Change that a run does not
        need.  Returns the change's seq."""
        pv = self._pvs.get(name)
        if pv is None:
            raise Rejected(f"no PV named {name}")
        if value.dtype != pv.spec.dtype:
            raise Rejected(f"value of dtype {value.dtype} for a PV of dtype {pv.spec.dtype}")
        self._apply(pv, value, stamp)
        self.dirty.add(name)
        self.seq += 1
        return self.seq

    def _apply(self, pv: StoredPv, data: np.ndarray, stamp: float) -> tuple[np.ndarray, int]:
        """Put ``data``, checked against ``pv``, into it: clipped to the drive limits, then
        appended to a buffer or replacing the value, at ``stamp`` (the put's time; now if it
        came with none, 0, or a bad one).  Returns (the elements applied, the length after)."""
        spec = pv.spec
        if spec.kind in "fi":
            data = clip_to_drive_limits(self._effective(pv), data)
        pv.stamp = stamp if stamp > 0.0 and math.isfinite(stamp) else self._clock()
        if pv.ring is not None:
            pv.ring.append(data)
            n = data.shape[0]
            return (data[-spec.count :] if n > spec.count else data), len(pv.ring)
        pv.value = data.copy()
        return pv.value, data.shape[0]

    def _effective(self, pv: StoredPv) -> Mapping[str, Any]:
        """``pv``'s fields with the configured defaults filled in (cached)."""
        eff = pv.effective
        if eff is None:
            eff = pv.effective = self._resolver.effective(pv.spec, pv.fields)
        return eff

    def fields(self, name: str) -> dict[str, Any]:
        """The fields clients put on ``name`` (configured defaults not included)."""
        return dict(self._pvs[name].fields)

    def set_field(self, name: str, field_name: str, value: Any) -> tuple[int, Any]:
        """Set a field of an existing PV; returns (seq, the stored value)."""
        pv = self._pvs.get(name)
        if pv is None:
            raise Rejected(f"no PV named {name}")
        if not applies(field_name, pv.spec):
            raise Rejected(f"{name} has no field {field_name}")
        try:
            value = validate(field_name, value)
        except FieldError as e:
            raise Rejected(str(e)) from None
        undo = self._unsaved.setdefault(name, _Undo())
        if not undo.seq and undo.fields is None:
            undo.fields = pv.fields  # never changed in place: a change makes a new dict
        pv.fields = {**pv.fields, field_name: value}
        pv.effective = None
        self.seq += 1
        return self.seq, value

    def reset(self, name: str) -> Change:
        """Empty a buffer (``NAME.RES``)."""
        pv = self._pvs.get(name)
        if pv is None or pv.ring is None:
            raise Rejected(f"no buffer named {name}")
        pv.ring.clear()
        pv.stamp = self._clock()
        self.dirty.add(name)
        self.seq += 1
        return Change(name, self.seq, pv.stamp, pv.ring.view().copy(), 0, False)

    def process(self, name: str) -> Change:
        """Process a PV (``NAME.PROC``), as an IOC processes a passive output record: its
        value put again, through the drive limits as they stand now, and stamped now."""
        pv = self._pvs.get(name)
        if pv is None:
            raise Rejected(f"no PV named {name}")
        if pv.ring is not None:
            raise Rejected(f"{name} has no field PROC")
        applied, length = self._apply(pv, pv.value, 0.0)
        self.dirty.add(name)
        self.seq += 1
        return Change(name, self.seq, pv.stamp, applied, length, False)

    def process_after_field(self, name: str, field: str) -> Change | None:
        """What a put to ``field`` (a drive limit, an alarm limit or severity) does to the
        value once it is durable: an ao or longout record processes (``process``: its value
        put again, through the drive limits as they stand, stamped now); an array's value
        past new drive limits is brought within them, stamped now.  Its Change, or None
        when the value stays as it is (the PV is gone, a buffer, whose elements are
        history, text, or an array within them)."""
        pv = self._pvs.get(name)
        if pv is None:
            return None
        if processes(field, pv.spec):
            return self.process(name)
        if field not in ("DRVH", "DRVL") or pv.ring is not None or pv.spec.kind not in "fi":
            return None
        clipped = clip_to_drive_limits(self._effective(pv), pv.value)
        if clipped is pv.value or np.array_equal(clipped, pv.value, equal_nan=True):
            return None
        return self.process(name)

    def delete(self, name: str) -> int:
        """Delete a PV; returns the sequence number of the change."""
        pv = self._pvs.pop(name, None)
        if pv is None:
            raise Rejected(f"no PV named {name}")
        self.seq += 1
        self._undo_whole(name, pv)
        self.dirty.discard(name)
        return self.seq

    def _undo_whole(self, name: str, before: StoredPv | None) -> None:
        """``name`` was just created (``before`` None) or deleted, in change ``self.seq``:
        undone, it goes back to ``before``, unless an earlier creation or deletion not yet
        durable takes it back further."""
        undo = self._unsaved.setdefault(name, _Undo())
        if not undo.seq:
            undo.seq, undo.before = self.seq, before
        elif before is None and undo.before is not None:
            undo.recreated = True

    def snapshot(self) -> Iterator[tuple[str, float, np.ndarray, dict]]:
        """Every PV as (name, stamp, contents oldest first, fields)."""
        for name, pv in self._pvs.items():
            yield name, pv.stamp, pv.contents(), dict(pv.fields)

    # -- persistence ----------------------------------------------------------------

    def load(self, saved) -> list[str]:
        """Take PVs from the autosave (objects with name, stamp, value, fields).

        Returns the names that cannot be served under this configuration (they
        stay in the autosave untouched).
        """
        skipped = []
        for row in saved:
            try:
                spec = self._spec(row.name)
            except Rejected:
                skipped.append(row.name)
                continue
            if row.value.dtype != spec.dtype:
                skipped.append(row.name)
                continue
            pv = StoredPv(spec, row.stamp, fields=dict(row.fields) if row.fields else NO_FIELDS)
            if spec.is_buffer:
                pv.ring = RingBuffer(spec.count, spec.dtype)
                pv.ring.append(row.value)
            elif len(row.value) > spec.count:
                pv.value = row.value[: spec.count].copy()
            else:
                pv.value = row.value  # the row's own array: not a second copy
            self._pvs[row.name] = pv
        return skipped

    def _row(self, name: str, copy: bool = False) -> tuple[str, float, np.ndarray, dict]:
        """``name``'s row for the autosave; ``copy``: one that later changes do not touch
        (a value array is replaced by each put, never changed, so only buffers are copied)."""
        pv = self._pvs[name]
        if pv.ring is not None:
            value = pv.ring.view()
            if copy and value.base is not None:
                value = value.copy()
        else:
            value = pv.value
        return name, pv.stamp, value, dict(pv.fields)

    @property
    def needs_commit(self) -> bool:
        """Creations or deletions wait to be made durable before they are acknowledged."""
        return bool(self._unsaved)

    def unsaved_changes(self) -> tuple[list[tuple], list[str]]:
        """Rows to write and names to delete that make the creations and deletions durable."""
        upserts, deletes = [], []
        for name in self._unsaved:
            if name in self._pvs:
                upserts.append(self._row(name))
            else:
                deletes.append(name)
        return upserts, deletes

    def committed(self) -> None:
        """The unsaved creations and deletions are on disk."""
        for name in self._unsaved:
            self.dirty.discard(name)
        self._unsaved.clear()

    def rollback_unsaved(self) -> Rollback:
        """Undo the creations, deletions and field changes that could not be made durable."""
        undone: dict[str, int | None] = {}
        restate = [name for name, undo in self._unsaved.items() if undo.recreated]
        for name, undo in self._unsaved.items():
            pv = self._pvs.get(name)
            undone[name] = undo.seq or None
            if undo.seq:
                pv = undo.before
                if pv is None:
                    self._pvs.pop(name, None)
                    self.dirty.discard(name)
                else:
                    self._pvs[name] = pv
                    # Back with the value it held, which may wait for the autosave still.
                    self.dirty.add(name)
            if undo.fields is not None and pv is not None:
                pv.fields, pv.effective = undo.fields, None
        self._unsaved.clear()
        self.seq += 1
        return Rollback(undone, restate)

    def take_rows(self, names: list[str], budget: int) -> list[tuple[str, float, np.ndarray, dict]]:
        """Rows for the autosave, that stay as they are while the store goes on changing, of
        names taken from the end of ``names`` until their values reach ``budget`` bytes (one
        row at least); names no longer stored are dropped."""
        rows, size = [], 0
        while names and (not rows or size < budget):
            name = names.pop()
            if name in self._pvs:
                rows.append(self._row(name, copy=True))
                size += rows[-1][2].nbytes
        return rows

    def dirty_rows(self, copy: bool = False) -> list[tuple[str, float, np.ndarray, dict]]:
        """Rows of the PVs whose value changed since the last autosave (not cleared);
        ``copy``: rows that stay as they are while the store goes on changing."""
        return [self._row(name, copy) for name in self.dirty if name in self._pvs]
