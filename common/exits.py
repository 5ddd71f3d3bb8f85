"""Exit statuses of every carelay command and process, by name.

The numbers are part of what the relay promises (README, "Running it"): scripts,
systemd and ``carelay status`` read them.  A name says what the status means to
the one who reads it; two names may share a number where two commands answer
different questions.
"""

#: Done: the command did what it was asked, or the process stopped cleanly.
OK = 0
#: Failed: the process could not go on (a crash, a start that failed, a relay stopped with
#: a shard that did not stop cleanly).
FAILED = 1
#: A bad command line or configuration: nothing was started.
USAGE = 2
#: Refused to start: the data directory or the store is another relay's, or the set-up
#: it needs (the access security file, its group) cannot be used.  It touched nothing.
REFUSED = 2
#: A child cannot start: its store cannot be opened, or its keys cannot be loaded.  The
#: supervisor restarts it and shows it failing.
CANNOT_START = 3
#: A shard that cannot open its store.
STORE_FAILED = CANNOT_START
#: A shard that stopped with values it could not save.
UNSAVED = 4

#: ``carelay status``: every process answers.
STATUS_RUNNING = OK
#: ``carelay status``: no relay runs on the data directory.
STATUS_NOT_RUNNING = 1
#: ``carelay status``: a process is down, failing or not answering.
STATUS_PROBLEM = 3

#: ``carelay status --pv NAME``: the owning shard's store holds NAME.
PV_STORED = 0
#: ``carelay status --pv NAME``: NAME follows the rule, but no store holds it.
PV_NOT_STORED = 1
#: ``carelay status --pv NAME``: NAME does not follow the naming rule.
PV_NOT_A_NAME = 2

#: ``carelay import``: some PVs were refused; the others were imported.
IMPORT_REFUSED = 1
#: ``carelay list``, ``export`` and ``import``: nothing could be read or written.
TRANSFER_FAILED = 2
