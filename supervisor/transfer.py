"""``carelay list``, ``export`` and ``import``: the PVs of a relay, read and written.

Reading (list, export) goes to the shards' stores, read-only, whether the relay runs
or not: SQLite's WAL lets a reader in beside the writing shard, no request has to pass
the shards' admission (they serve only their own broker), and creations and deletions
are durable before they are acknowledged, so the names are exact.  Values and fields
are as of each shard's last flush: at most ``autosave_period`` seconds older than what
the relay serves.

Writing (import) into a running relay goes through its CA port, as any client's puts
do: the shards create the PVs, the broker mirrors them, monitors fire and access
security applies.  The client is caproto (pure Python: no C library to find, nothing
to go wrong when a process forks).  Into a stopped relay, import writes the stores
directly, under the relay's lock, so that no relay starts meanwhile.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from carelay.common import exits
from carelay.common.config import IMPORT_CA_TIMEOUT, TRANSFER_CHUNK, Config, ca_interfaces
from carelay.common.logbudget import shorten
from carelay.common.naming import InvalidPvName, split_type
from carelay.common.progress import Progress
from carelay.common.runlock import DataDirInUse, lock_run
from carelay.common.sharding import shard_for
from carelay.shard.persist import (
    SavedPv,
    ShardDatabase,
    StoreDamaged,
    lock_store,
    read_store,
)
from carelay.shard.reshard import store_indices
from carelay.supervisor import pvfile
from carelay.supervisor.status import collect, running_config

log = logging.getLogger(__name__)
#: At most this much of a file's text (a name, the reason given for it) in a log line.
_SAID_CHARS = 300

#: ``carelay list`` and ``export`` whose reader closed the pipe: 128 + SIGPIPE, the
#: status a shell reports for a writer that signal ends.
EXIT_READER_GONE = 128 + 13


@dataclass
class Source:
    """Where PVs are read from: the configuration in force and whether a relay runs."""

    config: Config
    running: bool
    ca_port: int | None = None
    #: The addresses the running relay's broker serves CA on (empty: every interface),
    #: from its status file; None when it does not say.
    ca_interfaces: list[str] | None = None


def _port(port) -> int | None:
    return int(port) if str(port).isdigit() else None


def _ca_door(status: dict) -> tuple[list[str] | None, int | None]:
    """Where a broker of the running relay serves CA: its interfaces and port, from its
    status file (a ready broker first, then the first that answers); (None, the
    relay's CA port) when none says."""
    brokers = [b for b in status.get("brokers") or () if isinstance(b, dict)]
    for b in sorted(brokers, key=lambda b: b.get("ready") is not True):
        interfaces, port = b.get("interfaces"), _port(b.get("ca_port"))
        if port is not None and isinstance(interfaces, list):
            return [str(a) for a in interfaces], port
    return None, _port(status.get("ca_port"))


def find_relay(config: Config) -> Source:
    """The running relay on ``config``'s data directory (its own prefix and shard count),
    or the stores alone under ``config``."""
    status = collect(config)
    if status is None:
        return Source(config, False)
    running = running_config(config, status) or config
    period = (status.get("config") or {}).get("autosave_period")
    if isinstance(period, int | float) and period > 0:
        running = replace(running, autosave_period=float(period))
    interfaces, port = _ca_door(status)
    return Source(running, True, port, interfaces)


def read_pvs(config: Config) -> list[tuple[int, SavedPv]]:
    """Every PV in the stores of ``config``'s data directory, with its store's index,
    sorted by name.  StoreDamaged when a store cannot be read."""
    indices = sorted(set(store_indices(config.data_dir)) | set(range(config.shards)))
    rows = [(k, row) for k in indices for row in read_store(config.store_path(k))]
    return sorted(rows, key=lambda kr: kr[1].name)


def _matches(name: str, prefix: str, pattern: str | None) -> bool:
    """``pattern`` matches the full name or the part after the prefix."""
    if pattern is None:
        return True
    short = name[len(prefix) :] if name.startswith(prefix) else name
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(short, pattern)


def _source_note(source: Source) -> str:
    where = source.config.data_dir.resolve()
    if source.running:
        return (
            f"from the stores of the relay running on {where}: values as of each shard's "
            f"last flush (every {source.config.autosave_period:g} s)"
        )
    return f"no relay runs on {where}: from its stores"


def _selected(source: Source, pattern: str | None, shard: int | None, out_err):
    try:
        rows = read_pvs(source.config)
    except StoreDamaged as e:
        print(f"carelay: cannot read a store: {e}", file=out_err)
        return None
    return [
        (k, row)
        for k, row in rows
        if (shard is None or k == shard) and _matches(row.name, source.config.prefix, pattern)
    ]


def list_pvs(
    config: Config,
    pattern: str | None = None,
    shard: int | None = None,
    as_json: bool = False,
    out=sys.stdout,
    out_err=sys.stderr,
) -> int:
    """``carelay list``: one row per PV, sorted by name."""
    source = find_relay(config)
    rows = _selected(source, pattern, shard, out_err)
    if rows is None:
        return exits.TRANSFER_FAILED
    entries = []
    for k, row in rows:
        parsed = split_type(row.name)
        entries.append(
            {
                "name": row.name,
                "type": parsed[1] if parsed else "?",
                "count": parsed[2] if parsed else None,
                "nord": int(row.value.size),
                "shard": k,
                # null for a stamp JSON has no number for (inf, in a store written
                # before import refused such stamps).
                "updated": row.stamp if math.isfinite(row.stamp) else None,
                "bytes": int(row.value.nbytes),
            }
        )
    try:
        print(_source_note(source), file=out_err)
        _print_list(entries, as_json, out)
        out.flush()
    except BrokenPipeError:
        return _reader_gone(out, out_err)
    return exits.OK


def _print_list(entries: list[dict], as_json: bool, out) -> None:
    if as_json:
        json.dump(entries, out, indent=1)
        out.write("\n")
        return
    width = max([len("NAME"), *(len(e["name"]) for e in entries)])
    print(
        f"{'NAME':<{width}} {'TYPE':<4} {'COUNT':>8} {'NORD':>8} {'SHARD':>5} "
        f"{'UPDATED':<23} {'BYTES':>10}",
        file=out,
    )
    for e in entries:
        count = "?" if e["count"] is None else str(e["count"])
        print(
            f"{e['name']:<{width}} {e['type']:<4} {count:>8} {e['nord']:>8} {e['shard']:>5} "
            f"{_when(e['updated']):<23} {e['bytes']:>10}",
            file=out,
        )


def _reader_gone(*streams) -> int:
    """A reader closed its pipe (``carelay list | head -1``): end quietly.  What is still
    buffered for ``streams`` goes to /dev/null, else flushing it at exit fails again,
    with a traceback.  The status is the one a shell reports for a writer SIGPIPE ends."""
    for stream in streams:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            fd = stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)
    return EXIT_READER_GONE


def _when(stamp: float | None) -> str:
    """A stamp as local time; "?" for one no clock shows (a store written before such
    stamps were refused on import)."""
    if stamp is None:
        return "?"
    if not stamp:
        return "never"
    try:
        millis = int(stamp % 1 * 1000)
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) + f".{millis:03d}"
    except (OverflowError, OSError, ValueError):
        return "?"


def export_pvs(
    config: Config, pattern: str | None = None, out=sys.stdout, out_err=sys.stderr
) -> int:
    """``carelay export``: the export line of every PV, sorted by name."""
    source = find_relay(config)
    rows = _selected(source, pattern, None, out_err)
    if rows is None:
        return exits.TRANSFER_FAILED
    try:
        print(_source_note(source), file=out_err)
        for _, row in rows:
            try:
                line = pvfile.encode(row.name, row.stamp, row.value, row.fields)
            except pvfile.RecordError as e:
                print(f"carelay: skipped {e}", file=out_err)
                continue
            out.write(line + "\n")
        out.flush()
        print(f"exported {len(rows)} PVs", file=out_err)
    except BrokenPipeError:
        return _reader_gone(out, out_err)
    except OSError as e:  # a full disk, a file size limit: one line, not a traceback
        print(f"carelay: cannot write the export: {e.strerror or e}", file=out_err)
        _reader_gone(out)  # what is still buffered would fail again at exit
        return exits.TRANSFER_FAILED
    return exits.OK


# -- import -----------------------------------------------------------------------------


def read_records(path: Path) -> tuple[list[pvfile.PvRecord], int]:
    """The PVs of an export file and how many of its lines were refused (each logged)."""
    records: dict[str, pvfile.PvRecord] = {}
    refused = 0
    # Line by line as bytes: a line that is not UTF-8 is refused alone, not the file.
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                log.warning("refused line %d: not UTF-8 (%s)", number, e.reason)
                refused += 1
                continue
            if not line.strip():
                continue
            try:
                record = pvfile.decode(line)
            except pvfile.RecordError as e:
                log.warning("refused line %d: %s", number, _said(str(e)))
                refused += 1
                continue
            if record.name in records:
                log.warning(
                    "refused line %d: %s: a second time in the file", number, _said(record.name)
                )
                refused += 1
                continue
            records[record.name] = record
    return list(records.values()), refused


def _said(text: str) -> str:
    """A file's text as a log line carries it: cut, its control characters escaped (a name
    with a line break would forge a line of the import's own)."""
    return shorten(text, _SAID_CHARS)


def _admissible(
    records: Iterable[pvfile.PvRecord], config: Config, existing: Iterable[str]
) -> tuple[list[pvfile.PvRecord], int]:
    """The records this relay can take; each refused one gets its log line.  A record is
    refused when its name is not one of this relay's, or when it would be a PV past
    ``max_pvs``.  Names that differ in their type or count alone (``x_f1`` beside
    ``x_i1``) are two PVs, as the relay holds them: its export has both, and its import
    takes both."""
    pvs = set(existing)
    ok, refused = [], 0
    for record in records:
        try:
            config.pv_spec(record.name)
        except InvalidPvName as e:
            log.warning(
                "refused %s: not a PV of this relay (prefix %s): %s",
                _said(record.name),
                config.prefix,
                _said(str(e)),
            )
            refused += 1
            continue
        if record.name not in pvs and len(pvs) >= config.max_pvs:
            log.warning("refused %s: max_pvs (%d) reached", _said(record.name), config.max_pvs)
            refused += 1
            continue
        pvs.add(record.name)
        ok.append(record)
    return ok, refused


def import_pvs(config: Config, path: Path) -> int:
    """``carelay import FILE``: into the running relay through CA, else into its stores."""
    try:
        records, refused = read_records(path)
    except (OSError, UnicodeDecodeError) as e:
        log.error("cannot read %s: %s", path, e)
        return exits.TRANSFER_FAILED
    source = find_relay(config)
    try:
        existing = {row.name: k for k, row in read_pvs(source.config)}
    except StoreDamaged as e:
        log.error("cannot read a store: %s", e)
        return exits.TRANSFER_FAILED
    records, more = _admissible(records, source.config, existing)
    refused += more
    if source.running:
        done, failed = _import_running(source, records, existing)
    else:
        try:
            done, failed = _import_stopped(source.config, records, existing)
        except (DataDirInUse, OSError, StoreDamaged) as e:
            log.error("cannot import: %s", e)
            return exits.TRANSFER_FAILED
    refused += failed
    where = "the running relay" if source.running else "the stores"
    log.info("imported %d PVs into %s; %d refused", done, where, refused)
    return exits.IMPORT_REFUSED if refused else exits.OK


def _import_stopped(
    config: Config, records: list[pvfile.PvRecord], existing: dict[str, int]
) -> tuple[int, int]:
    """Write the records into the stores: a PV a store already holds stays in that store
    (a resharding at the next start moves it), a new one goes to its owner."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    run_lock = lock_run(config.data_dir)
    locks: list[int] = []
    dbs: dict[int, ShardDatabase] = {}
    try:
        by_store: dict[int, list[pvfile.PvRecord]] = {}
        for record in records:
            k = existing.get(record.name, shard_for(record.name, config.shards))
            by_store.setdefault(k, []).append(record)
        for k in sorted(by_store):
            fd = lock_store(config.store_path(k))
            if fd is None:
                raise DataDirInUse(f"{config.store_path(k)} is in use by a running shard")
            locks.append(fd)
            db = ShardDatabase(config.store_path(k))
            db.open()
            dbs[k] = db
        progress = Progress(log, "import", len(records))
        saved = 0
        for k, group in by_store.items():
            for i in range(0, len(group), TRANSFER_CHUNK):
                chunk = group[i : i + TRANSFER_CHUNK]
                try:
                    dbs[k].save((r.name, r.stamp, r.value, r.fields) for r in chunk)
                except OSError as e:
                    if not saved:
                        raise  # nothing imported: the import failed
                    # Each chunk is a transaction: those saved stay, and the import says
                    # so rather than that nothing could be imported.
                    left = len(records) - saved
                    log.error(
                        "cannot write %s: %s; the other %d PVs not imported", dbs[k].path, e, left
                    )
                    return saved, left
                saved += len(chunk)
                progress.step(len(chunk))
    finally:
        # Taken when the import opened them, the good copies hold the stores without it.
        for db in dbs.values():
            db.settle_good_copy()
            db.close()
        for fd in (*locks, run_lock):
            os.close(fd)
    return len(records), 0


def _ca_environment(source: Source) -> None:
    """Point this process's CA client at the running relay on this host alone: at an
    address its broker serves on (127.0.0.1 when it serves on every interface), and at
    its port.  A broker that does not say where it serves is searched where this shell's
    EPICS_CAS_INTF_ADDR_LIST says."""
    interfaces = source.ca_interfaces
    if interfaces is None:
        interfaces = ca_interfaces()
        addresses = [a for a in interfaces if a != "0.0.0.0"]
    elif not interfaces or "0.0.0.0" in interfaces:
        addresses = []
    else:
        # One address: several would each answer, and the client warns of each twice-found PV.
        addresses = interfaces[:1]
    os.environ["EPICS_CA_ADDR_LIST"] = " ".join(addresses) or "127.0.0.1"
    os.environ["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
    if source.ca_port is not None:
        os.environ["EPICS_CA_SERVER_PORT"] = str(source.ca_port)


def _import_running(
    source: Source, records: list[pvfile.PvRecord], existing: dict[str, int]
) -> tuple[int, int]:
    """Put each record through the running relay's CA port; returns (done, failed)."""
    _ca_environment(source)
    from caproto.threading.client import Context

    # Its own INFO lines (each channel's connection) are not this command's news.
    logging.getLogger("caproto").setLevel(logging.WARNING)

    ctx = Context()
    done = failed = 0
    progress = Progress(log, "import", len(records))
    try:
        for record in records:
            try:
                _put_record(ctx, record, record.name in existing, source.config.delpv_name)
                done += 1
            except _PutFailed as e:
                log.warning("refused %s: %s", _said(record.name), e)
                failed += 1
            progress.step()
    finally:
        ctx.disconnect()
    return done, failed


class _PutFailed(Exception):
    pass


def _connect(ctx, names: list[str]) -> list:
    """A connected channel with write access to each of ``names``; _PutFailed, and
    nothing put, when one does not connect (a field the relay does not serve, a shard not
    in sync, a limit) or may not be written (access security)."""
    from caproto import AccessRights

    pvs = ctx.get_pvs(*names, timeout=IMPORT_CA_TIMEOUT)
    try:
        for pv in pvs:
            try:
                pv.wait_for_connection(timeout=IMPORT_CA_TIMEOUT)
            except Exception as e:  # caproto raises its own kinds
                raise _PutFailed(f"{pv.name} does not connect: {type(e).__name__}: {e}") from None
            rights = pv.access_rights
            if rights is not None and not rights & AccessRights.WRITE:
                raise _PutFailed(f"no write access to {pv.name}")
    except _PutFailed:
        _disconnect(pvs)
        raise
    return pvs


def _disconnect(pvs) -> None:
    for pv in pvs:
        with contextlib.suppress(Exception):
            pv.disconnect()


def _write_to(pv, data) -> None:
    try:
        response = pv.write(data, wait=True, timeout=IMPORT_CA_TIMEOUT)
    except Exception as e:  # caproto raises its own kinds for timeouts and refusals
        raise _PutFailed(f"put to {pv.name} failed: {type(e).__name__}: {e}") from None
    status = getattr(response, "status", None)
    if status is not None and not getattr(status, "success", 1):
        raise _PutFailed(f"put to {pv.name} failed: {getattr(status, 'name', status)}")


def _field_data(value) -> list:
    return [value.encode("utf-8")] if isinstance(value, str) else [value]


def _puts(record: pvfile.PvRecord, exists: bool) -> list[tuple[str, object]]:
    """The puts that import ``record``, in order.  A new PV is made by its value, then
    gets its fields (a field of a PV that does not exist yet is refused); an existing one
    gets its fields first, so that the value meets the drive limits it was stored under."""
    fields = [(f"{record.name}.{f}", _field_data(v)) for f, v in record.fields.items()]
    data = [bytes(record.value[0])] if record.type_code.lower() == "s" else record.value
    value: list[tuple[str, object]]
    if not record.type_code.isupper():
        value = [(record.name, data)]
    elif exists:
        value = [(f"{record.name}.RES", [1])]
        if record.value.size:
            value.append((record.name, data))
    elif record.value.size:
        value = [(record.name, data)]
    else:
        # An empty buffer is made by a put, then emptied.
        value = [(record.name, np.zeros(1, record.value.dtype)), (f"{record.name}.RES", [1])]
    return fields + value if exists else value + fields


def _put_record(ctx, record: pvfile.PvRecord, exists: bool, delpv: str) -> None:
    """Import ``record`` (see _puts).  Every channel of the line is connected, with write
    access, before the first put, so that what the relay would refuse for want of a
    channel or of access is refused with nothing changed.  A put that still fails midway
    (a timeout, a shard gone) leaves the puts before it: a PV this line made is deleted
    again; the fields and buffer reset of one that existed stay, and the message names
    them."""
    puts = _puts(record, exists)
    pvs = _connect(ctx, [name for name, _ in puts])
    made: list[str] = []
    try:
        for pv, (name, data) in zip(pvs, puts, strict=True):
            _write_to(pv, data)
            made.append(name)
    except _PutFailed as e:
        if not made:
            raise
        if not exists:
            raise _PutFailed(f"{e}; {_undo_creation(ctx, record.name, delpv)}") from None
        raise _PutFailed(f"{e}; already put, and kept: {', '.join(made)}") from None
    finally:
        _disconnect(pvs)


def _undo_creation(ctx, name: str, delpv: str) -> str:
    """Delete the PV a failed line made, through the relay's delete PV; what came of it."""
    try:
        (pv,) = _connect(ctx, [delpv])
        try:
            _write_to(pv, np.frombuffer(name.encode() + b"\0", dtype=np.uint8))
        finally:
            _disconnect([pv])
    except _PutFailed as e:
        return f"the PV it made stays: {e}"
    return "the PV it made is deleted again"
