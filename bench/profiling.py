"""``--profile``: py-spy samples every relay process during each timed phase.

py-spy (``pip install py-spy``) records each process of the server under test
(``--nonblocking``, raw collapsed stacks) from the start signal to the end of
the drivers; each recording is summarised as the functions with the most
samples on top of the stack (self) and anywhere in it (inclusive).  Profiled
runs are slower: their figures are for finding hot spots, not for the table.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_LINENO = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, out_dir: Path, rate: int = 200, native: bool = False) -> None:
        self.exe = py_spy()
        self.native = native
        self.out_dir = out_dir / "profiles"
        self.rate = rate
        self._running: list[tuple[subprocess.Popen, Path, str]] = []
        self.summaries: dict[str, str] = {}

    @property
    def available(self) -> bool:
        return self.exe is not None

    def start(self, server, tag: str) -> None:
        if not self.exe:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for role, pid in server.pids().items():
            name = f"{tag}-{role}".replace(" ", "_").replace("/", "_")
            raw = self.out_dir / f"{name}.txt"
            proc = subprocess.Popen(
                [
                    self.exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(self.rate),
                    # Native stacks need the process paused while sampled.
                    *(["--native"] if self.native else ["--nonblocking"]),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self._running.append((proc, raw, name))

    def stop(self) -> None:
        running, self._running = self._running, []
        for proc, _, _ in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc, raw, name in running:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if raw.exists():
                text = summarise(raw)
                (self.out_dir / f"{name}.summary").write_text(text)
                self.summaries[name] = text


def _frame(f: str) -> str:
    f = _LINENO.sub(")", f.strip())
    # Shorten site-packages paths to package/module.
    return re.sub(r"\((?:.*/site-packages/|.*/work/main/)?([^()]*)\)$", r"(\1)", f)


def summarise(raw: Path, top: int = 20) -> str:
    """Top functions by self and inclusive samples from a py-spy raw recording."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        n = int(m["count"])
        frames = [
            _frame(f)
            for f in m["stack"].split(";")
            if not f.startswith(("process ", "thread ")) and f.strip()
        ]
        if not frames:
            continue
        total += n
        self_n[frames[-1]] += n
        for f in set(frames):
            incl_n[f] += n
    out = [f"{raw.name}: {total} samples"]
    out.append("self (top of stack):")
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_n.most_common(top)] if total else []
    out.append("inclusive:")
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl_n.most_common(top)] if total else []
    return os.linesep.join(out) + os.linesep
