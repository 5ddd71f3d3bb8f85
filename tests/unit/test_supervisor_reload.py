"""The supervisor's SIGHUP (a reload) from its first moment: never its end."""

from __future__ import annotations

import subprocess
import sys

from carelay.common import exits


def test_a_reload_asked_during_the_start_does_not_end_the_supervisor(tmp_path):
    """SIGHUP (systemctl reload) is the supervisor's to pass on; until its handler was set,
    after a reshard of the stores, it ended the supervisor at once (SIGHUP's default),
    in the middle of the reshard too.  A child process: the SIGHUP is real."""
    code = "\n".join(
        [
            "import os, signal, sys",
            "from carelay.common.config import load_config",
            "from carelay.shard.reshard import ReshardError",
            "from carelay.supervisor import supervisor as sup",
            "def reshard(*_):",
            "    os.kill(os.getpid(), signal.SIGHUP)  # delivered before kill returns",
            "    raise ReshardError('stopped here by the test')",
            "sup.reshard = reshard",
            f"config = load_config(None, data_dir={str(tmp_path)!r})",
            "sys.exit(sup.Supervisor(config, []).run())",
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == exits.FAILED, done.stderr.decode()[-2000:]
