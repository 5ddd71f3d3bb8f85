"""The ``carelay`` command line: one function per subcommand, one shard index."""

from __future__ import annotations

import subprocess
import sys

import pytest

from carelay.common import exits
from carelay.supervisor import cli

#: A command line for each subcommand, with what it needs.
COMMANDS = {
    "up": ["up"],
    "status": ["status"],
    "list": ["list"],
    "export": ["export"],
    "import": ["import", "FILE"],
    "reload-acf": ["reload-acf"],
    "keys": ["keys", "DIR"],
    "broker": ["broker"],
    "pva": ["pva"],
    "shard": ["shard", "--index", "0"],
}


def parse(*argv: str):
    return cli.build_parser().parse_args(argv)


def test_every_subcommand_is_listed_here():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_subcommand_has_its_own_function(command):
    func = parse(*COMMANDS[command]).func
    others = {parse(*argv).func for name, argv in COMMANDS.items() if name != command}
    assert callable(func) and func not in others


@pytest.mark.parametrize(
    ("argv", "index"),
    [(["shard", "1"], 1), (["shard", "--index", "1"], 1), (["shard", "--index=2"], 2)],
)
def test_the_shard_index_is_one_argument_in_either_form(argv, index):
    assert parse(*argv).index == index


def test_a_shard_index_given_twice_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse("shard", "1", "--index", "2")
    assert e.value.code == exits.USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("carelay: error:"), line


def test_an_invalid_configuration_is_one_line_and_usage(tmp_path, capsys):
    code = cli.main(["status", "--shards", "0", "--data-dir", str(tmp_path)])
    assert code == exits.USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("carelay: invalid configuration: shards:"), line


def test_status_of_no_relay_says_so(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "carelay.supervisor.cli", "status", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == exits.STATUS_NOT_RUNNING, r.stderr
    assert "no relay runs" in r.stdout


#: The exit statuses README promises, by name: scripts and systemd read the numbers.
PROMISED = {
    "OK": 0,
    "USAGE": 2,
    "REFUSED": 2,
    "STORE_FAILED": 3,
    "UNSAVED": 4,
    "STATUS_RUNNING": 0,
    "STATUS_NOT_RUNNING": 1,
    "STATUS_PROBLEM": 3,
    "PV_STORED": 0,
    "PV_NOT_STORED": 1,
    "PV_NOT_A_NAME": 2,
    "IMPORT_REFUSED": 1,
    "TRANSFER_FAILED": 2,
}


def test_the_exit_statuses_keep_their_numbers():
    assert {name: getattr(exits, name) for name in PROMISED} == PROMISED


#: A value for each flag that ``carelay up`` hands its children, those that may be text
#: beginning with "-" (which a child's argparse would take for an option if it came as
#: the next argument).
CHILD_FLAG_VALUES = {
    "config": "-relay.toml",
    "prefix": "-X:",
    "shards": "3",
    "data_dir": "-data",
    "max_elements": "10",
    "max_pvs": "20",
    "max_bytes": "1000000",
    "autosave_period": "0.5",
    "max_clients": "16",
    "max_channels": "5000",
    "client_idle_timeout": "60.0",
    "access_security": "-relay.acf",
    "access_by_ip": "false",
    "keys_dir": "-keys",
    "metrics_port": "9100",
    "metrics_address": "-metrics",
    "log_level": "DEBUG",
    "pva": "true",
}


def test_every_flag_has_a_value_here():
    assert set(CHILD_FLAG_VALUES) == {"config", *cli._CONFIG_FLAGS}


@pytest.mark.parametrize(
    "child", [["shard", "0"], ["shard", "--index=1"], ["broker"], ["broker", "--index=1"], ["pva"]]
)
def test_each_child_gets_the_flags_of_up_as_given(child):
    up = parse("up", *(f"--{k.replace('_', '-')}={v}" for k, v in CHILD_FLAG_VALUES.items()))
    got = parse(*child, *cli.child_args(up))
    assert {key: getattr(got, key) for key in CHILD_FLAG_VALUES} == {
        key: getattr(up, key) for key in CHILD_FLAG_VALUES
    }
