"""``carelay`` command line: one function per subcommand, chosen by argparse.

Each ``run_*`` function takes the parsed arguments and returns the exit status
(common/exits.py).  A command that stops before it starts anything raises
_Refused: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from carelay.common import exits
from carelay.common.config import LOG_LEVELS, Config, ConfigError, load_config
from carelay.common.lifecycle import broker_role, setup_logging

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and one line naming the problem."""

    def error(self, message: str):
        self.exit(exits.USAGE, f"carelay: error: {message}\n")


#: Configuration keys that have a flag (``--max-pvs`` for ``max_pvs``), with argparse options.
_CONFIG_FLAGS: dict[str, dict] = {
    "prefix": {"help": "PV name prefix, separator included (default RELAY:)"},
    "shards": {"type": int, "metavar": "N", "help": "number of shard processes (default 2)"},
    "data_dir": {"metavar": "DIR", "help": "data directory (default ./carelay-data)"},
    "max_elements": {"type": int, "metavar": "N", "help": "largest element count"},
    "max_pvs": {"type": int, "metavar": "N", "help": "most PVs the relay holds"},
    "max_bytes": {
        "type": int,
        "metavar": "N",
        "help": "memory all relay processes may take for PV values (each counted twice)",
    },
    "autosave_period": {
        "type": float,
        "metavar": "S",
        "help": "seconds between value flushes (1.0)",
    },
    "max_clients": {"type": int, "metavar": "N", "help": "most CA circuits the broker holds"},
    "max_channels": {
        "type": int,
        "metavar": "N",
        "help": "most channels one CA circuit holds (4 per PV of max_pvs)",
    },
    "client_idle_timeout": {
        "type": float,
        "metavar": "S",
        "help": "seconds before a silent CA circuit is closed (600)",
    },
    "access_security": {"metavar": "FILE", "help": "EPICS access security file (.acf)"},
    "access_by_ip": {
        "type": lambda text: _boolean("access_by_ip", text),
        "metavar": "BOOL",
        "help": "match HAGs against client addresses, not claimed host names (true)",
    },
    "keys_dir": {"metavar": "DIR", "help": "CurveZMQ keys (carelay keys DIR)"},
    "metrics_port": {"type": int, "metavar": "PORT", "help": "serve Prometheus /metrics here"},
    "metrics_address": {"metavar": "ADDR", "help": "address of /metrics (127.0.0.1)"},
    "log_level": {"type": str.upper, "choices": LOG_LEVELS, "help": "log level"},
    "pva": {
        "type": lambda text: _boolean("pva", text),
        "metavar": "BOOL",
        "help": "serve PV Access too (carelay[pva]; false)",
    },
}


def _boolean(key: str, text: str) -> bool:
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    try:
        return value[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{key}: expected true or false, got {text!r}") from None


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    for key, options in _CONFIG_FLAGS.items():
        p.add_argument(_flag(key), **options)


def package_version() -> str:
    """The installed carelay's version, from its package metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("carelay")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _KeepGiven(argparse.Action):
    """An optional positional that leaves its destination alone when it is not given, so
    that ``carelay shard K`` and ``carelay shard --index K`` fill the one ``index``."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is not None:
            setattr(namespace, self.dest, values)


#: The help of the optional GLOB of ``list`` and ``export``.
_GLOB_HELP = "only names matching GLOB (with or without prefix)"


def _command(sub, name: str, run: Callable, summary: str, config: bool = True):
    """The subparser of command ``name`` (``summary`` in the help), which ``run`` carries
    out; ``config``: with the configuration flags."""
    p = sub.add_parser(name, help=summary)
    if config:
        _config_flags(p)
    p.set_defaults(func=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="carelay", description="EPICS Channel Access relay")
    parser.add_argument("--version", action="version", version=f"carelay {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _command(sub, "up", run_up, "start the relay: its CA brokers, PVA and shards, watched")
    st = _command(sub, "status", run_status, "show the processes of a running relay")
    st.add_argument("--pv", metavar="NAME", help="show which shard owns the PV NAME")
    ls = _command(sub, "list", run_list, "list the PVs: type, count, NORD, shard, update, bytes")
    ls.add_argument("glob", nargs="?", help=_GLOB_HELP)
    ls.add_argument("--shard", type=int, metavar="K", help="only the PVs of shard K")
    ls.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    ex = _command(
        sub, "export", run_export, "write PVs with fields and values to stdout (JSON Lines)"
    )
    ex.add_argument("glob", nargs="?", help=_GLOB_HELP)
    im = _command(sub, "import", run_import, "create or set the PVs of an export file")
    im.add_argument("file", help="a file written by carelay export")
    _command(
        sub,
        "reload-acf",
        run_reload_acf,
        "make every front-end of the running relay read its access security file again",
    )
    keys = _command(
        sub, "keys", run_keys, "make CurveZMQ keys for shards on other hosts", config=False
    )
    keys.add_argument(
        "directory", metavar="DIR", help="where to write shard.key[_secret], broker.key[_secret]"
    )
    keys.add_argument(
        "--force",
        action="store_true",
        help="replace keys that are in DIR already (without --force they are kept and the "
        "command exits 2); every host then needs the new keys, or its processes' links are "
        "refused once they or their peers restart",
    )
    br = _command(sub, "broker", run_broker_role, "run a CA broker (started by `carelay up`)")
    br.add_argument("--index", type=int, default=0, metavar="K", help="which [[ca]] broker, from 0")
    _command(sub, "pva", run_pva_role, "run the PV Access front-end (started by `carelay up`)")
    sh = _command(
        sub, "shard", run_shard_role, "run one shard (started by `carelay up`)", config=False
    )
    index = sh.add_mutually_exclusive_group()
    # `carelay up` starts `carelay shard K`, so that ps shows which shard a process is.
    index.add_argument("index", type=int, nargs="?", action=_KeepGiven, help="as --index")
    index.add_argument("--index", type=int, dest="index", metavar="K", help="shard index, from 0")
    _config_flags(sh)
    return parser


class _Refused(Exception):
    """A command that stops before it starts anything: its message is the one line said."""


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, **{key: getattr(args, key) for key in _CONFIG_FLAGS})


def _config(args: argparse.Namespace) -> Config:
    """The configuration of ``args``; _Refused, naming the key, when it is invalid."""
    try:
        return config_from_args(args)
    except ConfigError as e:
        # One line, whatever the file held (a quoted TOML key may contain a newline).
        message = str(e).replace("\r", "\\r").replace("\n", "\\n")
        raise _Refused(f"invalid configuration: {message}") from None


def _check_doors_here(config: Config, indices) -> None:
    """_Refused when a CA door this host starts names an address it does not have: its
    broker's PCAS would abort at every restart, saying why only on its stderr."""
    from carelay.common.configcheck import check_doors_here

    try:
        check_doors_here(config.ca, indices)
    except ConfigError as e:
        raise _Refused(f"invalid configuration: {e}") from None


def child_args(args: argparse.Namespace) -> list[str]:
    """The configuration flags of ``args``, to pass on to a child process: each as one
    ``--flag=value`` argument, so that a value beginning with "-" (``--prefix=-X:``) is
    not taken for an option."""
    out: list[str] = []
    for key in ("config", *_CONFIG_FLAGS):
        value = getattr(args, key)
        if value is not None:
            out.append(f"{_flag(key)}={value}")
    return out


def _run_role(config: Config, role: str, run: Callable[[], int]) -> int:
    """Run a child role; when it fails, leave its last error where `carelay status` looks."""
    from carelay.common.lifecycle import status_path, write_last_words

    try:
        code = run()
    except Exception as e:
        log.critical("%s crashed: %s: %s", role, type(e).__name__, e, exc_info=True)
        code = exits.FAILED
    # A process that refused to start (its data directory or store is another process's):
    # the status file it would write is that process's.
    if code not in (exits.OK, exits.REFUSED):
        write_last_words(status_path(config.run_dir, role), role, code)
    return code


#: The locks of a broker or shard started alone, held until the process exits.
_held_locks: list[int] = []


def _standalone_locks(config: Config, lock_file: str | None) -> None:
    """Take the locks of a broker or shard started alone on its data directory; _Refused
    when it may not run there.  A child of ``carelay up`` runs under its parent's lock."""
    from carelay.common.runlock import DataDirInUse, join_run, supervised

    if supervised(config.data_dir):
        return
    try:
        _held_locks.extend(join_run(config.data_dir, lock_file))
    except DataDirInUse as e:
        raise _Refused(str(e)) from None
    except OSError as e:
        raise _Refused(f"cannot lock data directory {config.data_dir}: {e}") from None


def run_keys(args: argparse.Namespace) -> int:
    """``carelay keys DIR``: make the CurveZMQ keys."""
    from pathlib import Path

    from carelay.common.keys import KeysExist, make_keys

    try:
        made = make_keys(Path(args.directory), force=args.force)
    except KeysExist as e:
        raise _Refused(
            f"keys not written: {e} (a relay may be using them); --force replaces them, "
            "and every host then needs the new ones"
        ) from None
    except OSError as e:
        raise _Refused(f"cannot write keys: {e}") from None
    for path in made:
        print(path)
    print("copy the directory to every relay host and set keys_dir in the configuration")
    return exits.OK


def _check_access_security(config: Config) -> list[str]:
    """_Refused when the access security file or group is unusable: the broker would only
    find out after the relay started, and fail at every restart.  Returns what to warn
    of: rules of the relay's group that grant its clients nothing."""
    if config.access_security is None:
        return []
    from carelay.broker import acf
    from carelay.broker.access import check_access_security, undefined_access_group

    problem = check_access_security(config.access_security)
    if problem is not None:
        raise _Refused(
            f"invalid configuration: access_security: {config.access_security} "
            f"is not a valid access security file: {problem}"
        )
    problem = undefined_access_group(config.access_security, config.access_group)
    if problem is not None:
        raise _Refused(f"invalid configuration: access_group: {problem}")
    try:
        rules = acf.parse(acf.read_acf(config.access_security))
    except (OSError, acf.AcfError) as e:
        if not config.pva:
            return []  # only the PVA front-end reads it so; EPICS loads it
        # EPICS loads it: the PVA front-end's reading of it must too.
        raise _Refused(
            f"invalid configuration: access_security: {config.access_security} "
            f"cannot be read as EPICS reads it: {e}"
        ) from None
    low = [r for r in rules.rules_of(config.access_group) if r.level < acf.CLIENT_LEVEL]
    if not any(r.access for r in low):
        return []
    return [
        f"access security: a RULE(0, ...) of {config.access_security} grants the relay's "
        "clients nothing: pcaspy adds every CA client at level 1, and the PVA front-end "
        "does the same; write RULE(1, ...)"
    ]


def run_up(args: argparse.Namespace) -> int:
    """``carelay up``: the supervisor, which starts and watches the shards and the broker."""
    config = _config(args)
    if config.pva and importlib.util.find_spec("p4p") is None:
        # Else the PVA front-end would fail at every restart, for want of a package.
        from carelay.broker.pva.run import NEEDS_P4P

        raise _Refused(f"invalid configuration: pva: {NEEDS_P4P}")
    warnings = _check_access_security(config)
    _check_doors_here(config, range(len(config.ca)))
    setup_logging(config.log_level, "supervisor")
    for line in warnings:
        log.warning("%s", line)
    from carelay.supervisor.supervisor import Supervisor

    return Supervisor(config, child_args(args)).run()


def run_status(args: argparse.Namespace) -> int:
    """``carelay status [--pv NAME]``."""
    config = _config(args)
    from carelay.supervisor.status import print_owner, print_status

    if args.pv:
        return print_owner(config, args.pv)
    return print_status(config)


def run_list(args: argparse.Namespace) -> int:
    """``carelay list [GLOB]``."""
    from carelay.supervisor.transfer import list_pvs

    return list_pvs(_config(args), args.glob, args.shard, args.json)


def run_export(args: argparse.Namespace) -> int:
    """``carelay export [GLOB]``."""
    from carelay.supervisor.transfer import export_pvs

    return export_pvs(_config(args), args.glob)


def run_import(args: argparse.Namespace) -> int:
    """``carelay import FILE``."""
    from pathlib import Path

    config = _config(args)
    setup_logging(config.log_level, "import")
    from carelay.supervisor.transfer import import_pvs

    return import_pvs(config, Path(args.file))


def run_reload_acf(args: argparse.Namespace) -> int:
    """``carelay reload-acf``: SIGHUP to each front-end of the running relay."""
    from carelay.supervisor.status import reload_access

    return reload_access(_config(args))


def run_broker_role(args: argparse.Namespace) -> NoReturn:
    """``carelay broker``: the CA broker, as a child of ``carelay up`` or alone."""
    from carelay.common.config import BROKER_LOCK_FILE

    config = _config(args)
    index = args.index
    if not 0 <= index < config.brokers:
        raise _Refused(f"error: broker index {index} not in 0..{config.brokers - 1}")
    if config.ca:
        _check_doors_here(config, [index])
    role = broker_role(index)
    _standalone_locks(config, BROKER_LOCK_FILE if index == 0 else f"broker-{index}.lock")
    if config.ca:
        # PCAS reads its port and interfaces from the environment when the server is made.
        door = config.ca[index]
        os.environ["EPICS_CAS_SERVER_PORT"] = str(door.port)
        if door.interfaces:
            os.environ["EPICS_CAS_INTF_ADDR_LIST"] = " ".join(door.interfaces)
        else:
            os.environ.pop("EPICS_CAS_INTF_ADDR_LIST", None)
    setup_logging(config.log_level, role)
    from carelay.broker.main import run_broker

    _exit_now(_run_role(config, role, lambda: run_broker(config, index)))


def run_pva_role(args: argparse.Namespace) -> NoReturn:
    """``carelay pva``: the PV Access front-end, as a child of ``carelay up`` or alone."""
    config = _config(args)
    _standalone_locks(config, "pva.lock")
    setup_logging(config.log_level, "pva")
    from carelay.broker.pva.run import run_pva

    _exit_now(_run_role(config, "pva", lambda: run_pva(config)))


def _exit_now(code: int) -> NoReturn:
    """End a front-end once it has stopped, without the interpreter's teardown.

    Its PVs are done with (its sockets closed), but freeing them one by one, a C++ object
    each, took longer than the supervisor's grace: with 300,000 PVs every clean stop of
    the CA broker ended in a SIGKILL.  What it sent last may still be in ZeroMQ's I/O
    thread: ending the context waits for that to go, up to the linger its sockets were
    closed with (a socket left open goes at once).  The log is flushed last."""
    import zmq

    zmq.Context.instance().destroy(linger=0)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def run_shard_role(args: argparse.Namespace) -> int:
    """``carelay shard --index K`` (or ``carelay shard K``): one shard."""
    config = _config(args)
    _standalone_locks(config, None)
    if args.index is None:
        raise _Refused("error: shard needs its index (carelay shard --index K)")
    if not 0 <= args.index < config.shards:
        raise _Refused(f"error: shard index {args.index} not in 0..{config.shards - 1}")
    role = f"shard {args.index}"
    setup_logging(config.log_level, role)
    from carelay.shard.server import run_shard

    return _run_role(config, role, lambda: run_shard(config, args.index))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _Refused as e:
        print(f"carelay: {e}", file=sys.stderr)
        return exits.USAGE


if __name__ == "__main__":
    sys.exit(main())
