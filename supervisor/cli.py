"""``carelay`` command line: up, status, and the child roles broker and shard."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from carelay.common.config import LOG_LEVELS, Config, ConfigError, load_config


class _Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and one line naming the problem."""

    def error(self, message: str):
        self.exit(2, f"carelay: error: {message}\n")


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="carelay", description="EPICS Channel Access relay")
    parser.add_argument("--version", action="version", version=f"carelay {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    up = sub.add_parser("up", help="start the relay: one broker and N shards, watched")
    _config_flags(up)
    st = sub.add_parser("status", help="show the processes of a running relay")
    _config_flags(st)
    st.add_argument("--pv", metavar="NAME", help="show which shard owns the PV NAME")
    ls = sub.add_parser("list", help="list the PVs: type, count, NORD, shard, update, bytes")
    _config_flags(ls)
    ls.add_argument("glob", nargs="?", help="only names matching GLOB (with or without prefix)")
    ls.add_argument("--shard", type=int, metavar="K", help="only the PVs of shard K")
    ls.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    ex = sub.add_parser("export", help="write PVs with fields and values to stdout (JSON Lines)")
    _config_flags(ex)
    ex.add_argument("glob", nargs="?", help="only names matching GLOB (with or without prefix)")
    im = sub.add_parser("import", help="create or set the PVs of an export file")
    _config_flags(im)
    im.add_argument("file", help="a file written by carelay export")
    rl = sub.add_parser(
        "reload-acf", help="make the running broker read its access security file again"
    )
    _config_flags(rl)
    keys = sub.add_parser("keys", help="make CurveZMQ keys for shards on other hosts")
    keys.add_argument("directory", help="where to write shard.key[_secret], broker.key[_secret]")
    br = sub.add_parser("broker", help="run the CA broker (started by `carelay up`)")
    _config_flags(br)
    sh = sub.add_parser("shard", help="run one shard (started by `carelay up`)")
    sh.add_argument("index", type=int, nargs="?", help="shard index, from 0")
    sh.add_argument("--index", type=int, dest="index_flag", metavar="K", help="same as INDEX")
    _config_flags(sh)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, **{key: getattr(args, key) for key in _CONFIG_FLAGS})


def child_args(args: argparse.Namespace) -> list[str]:
    """The configuration flags of ``args``, to pass on to a child process."""
    out: list[str] = []
    for key in ("config", *_CONFIG_FLAGS):
        value = getattr(args, key)
        if value is not None:
            out += [_flag(key), str(value)]
    return out


def _run_role(config: Config, role: str, run: Callable[[], int]) -> int:
    """Run a child role; when it fails, leave its last error where `carelay status` looks."""
    from carelay.common.lifecycle import status_path, write_last_words

    try:
        code = run()
    except Exception as e:
        logging.getLogger(f"carelay.{role.split()[0]}").critical(
            "%s crashed: %s: %s", role, type(e).__name__, e, exc_info=True
        )
        code = 1
    # Exit 2 is a process that refused to start (its data directory or store is another
    # process's): the status file it would write is that process's.
    if code and code != 2:
        write_last_words(status_path(config.run_dir, role), role, code)
    return code


#: The locks of a broker or shard started alone, held until the process exits.
_held_locks: list[int] = []


def _standalone_locks(args: argparse.Namespace, config: Config) -> str | None:
    """Why this broker or shard may not run on its data directory, or None.  A child of
    ``carelay up`` runs under its parent's lock; one started alone takes its own."""
    from carelay.common.config import BROKER_LOCK_FILE
    from carelay.common.runlock import DataDirInUse, join_run, supervised

    if supervised(config.data_dir):
        return None
    try:
        _held_locks.extend(
            join_run(config.data_dir, BROKER_LOCK_FILE if args.command == "broker" else None)
        )
    except DataDirInUse as e:
        return str(e)
    except OSError as e:
        return f"cannot lock data directory {config.data_dir}: {e}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keys":
        from pathlib import Path

        from carelay.common.keys import make_keys

        try:
            made = make_keys(Path(args.directory))
        except OSError as e:
            print(f"carelay: cannot write keys: {e}", file=sys.stderr)
            return 2
        for path in made:
            print(path)
        print("copy the directory to every relay host and set keys_dir in the configuration")
        return 0
    try:
        config = config_from_args(args)
    except ConfigError as e:
        # One line, whatever the file held (a quoted TOML key may contain a newline).
        message = str(e).replace("\r", "\\r").replace("\n", "\\n")
        print(f"carelay: invalid configuration: {message}", file=sys.stderr)
        return 2
    if args.command == "up" and config.access_security is not None:
        # The broker would only find out after the relay started, and fail at every restart.
        from carelay.broker.access import check_access_security, undefined_access_group

        problem = check_access_security(config.access_security)
        if problem is not None:
            print(
                f"carelay: invalid configuration: access_security: {config.access_security} "
                f"is not a valid access security file: {problem}",
                file=sys.stderr,
            )
            return 2
        problem = undefined_access_group(config.access_security, config.access_group)
        if problem is not None:
            print(f"carelay: invalid configuration: access_group: {problem}", file=sys.stderr)
            return 2
    from carelay.common.lifecycle import setup_logging

    if args.command in ("broker", "shard") and (problem := _standalone_locks(args, config)):
        print(f"carelay: {problem}", file=sys.stderr)
        return 2
    if args.command == "reload-acf":
        from carelay.supervisor.status import reload_access

        return reload_access(config)
    if args.command == "status":
        from carelay.supervisor.status import print_owner, print_status

        if args.pv:
            return print_owner(config, args.pv)
        return print_status(config)
    if args.command in ("list", "export"):
        from carelay.supervisor.transfer import export_pvs, list_pvs

        if args.command == "list":
            return list_pvs(config, args.glob, args.shard, args.json)
        return export_pvs(config, args.glob)
    if args.command == "import":
        from pathlib import Path

        from carelay.supervisor.transfer import import_pvs

        setup_logging(config.log_level, "import")
        return import_pvs(config, Path(args.file))
    if args.command == "broker":
        setup_logging(config.log_level, "broker")
        from carelay.broker.main import run_broker

        return _run_role(config, "broker", lambda: run_broker(config))
    if args.command == "shard":
        if args.index is None:
            args.index = args.index_flag
        if args.index is None:
            print("carelay: error: shard needs its index (carelay shard K)", file=sys.stderr)
            return 2
        if not 0 <= args.index < config.shards:
            print(
                f"carelay: error: shard index {args.index} not in 0..{config.shards - 1}",
                file=sys.stderr,
            )
            return 2
        setup_logging(config.log_level, f"shard {args.index}")
        from carelay.shard.server import run_shard

        return _run_role(config, f"shard {args.index}", lambda: run_shard(config, args.index))
    setup_logging(config.log_level, "supervisor")
    from carelay.supervisor.arbiter import Supervisor

    return Supervisor(config, child_args(args)).run()


if __name__ == "__main__":
    sys.exit(main())
