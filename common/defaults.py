"""Every default and limit of the relay, as a named constant.

``carelay.common.config`` re-exports them all, so ``from carelay.common.config
import PUT_TIMEOUT`` works as well as importing them from here.
"""

DEFAULT_PREFIX = "RELAY:"
DEFAULT_SHARDS = 2
DEFAULT_DATA_DIR = "./carelay-data"
DEFAULT_MAX_ELEMENTS = 1_000_000
DEFAULT_MAX_PVS = 10_000
DEFAULT_MAX_NAME_LENGTH = 128
DEFAULT_LOG_LEVEL = "INFO"
#: HAG membership by the peer address of a client's circuit, not the host name it claims.
DEFAULT_ACCESS_BY_IP = True
#: Whether `carelay up` also starts the PV Access front-end (`carelay pva`, carelay[pva]).
DEFAULT_PVA = False
#: Seconds between value flushes of each shard's autosave.
DEFAULT_AUTOSAVE_PERIOD = 1.0
#: A shard's autosave writes the values changed in a period in parts of about this many
#: bytes, one after the other: each part is copied for the autosave thread (buffers change
#: under later puts), and the copies must not add up to a second copy of the shard.
AUTOSAVE_PART_BYTES = 8 * 1024 * 1024
MAX_SHARDS = 64
#: Copies of a PV's values the relay holds: the owning shard's and the broker's mirror.
#: ``max_bytes`` charges each PV its values at full capacity times this, so that it bounds
#: what all the relay's processes together hold (README, "what a client can cost you").
VALUE_COPIES = 2
#: malloc arenas per process (glibc M_ARENA_MAX): threads (the autosave) share them
#: instead of each keeping freed memory of its own.
MALLOC_ARENAS = 2
#: Bytes malloc must hold free before a process gives memory back (malloc_trim, at each
#: status write): below it there is next to nothing to give back.
MALLOC_TRIM_MIN = 256 * 1024
#: Allocations (less deallocations) between two young collections of the garbage
#: collector, set after start-up in broker and shards (Python's default is 700): a burst of
#: creations then walks its new objects a few times instead of dozens.  A young collection
#: walks at most this many objects: about a quarter of a millisecond.
GC_YOUNG_THRESHOLD = 10_000
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: Seconds between heartbeats on every broker-shard link, both ways.
HEARTBEAT_INTERVAL = 0.5
#: Missed heartbeats after which a peer counts as gone.
HEARTBEAT_LIVENESS = 4
#: Seconds a shard waits for any message of a front-end it serves (which PINGs twice a
#: second) before it takes it for hung and stops serving it: what it publishes to a hung
#: one waits in the shard's memory until the front-end reads it.
PEER_SILENCE = 10 * HEARTBEAT_INTERVAL
#: Reconnect back-off of the broker's shard links (seconds).
RECONNECT_INITIAL = 0.1
RECONNECT_MAX = 5.0
#: How long a put with callback waits for its shard before it fails.
PUT_TIMEOUT = 5.0
#: How long the answer to a put with callback waits for a front-end that answers reads
#: from what it last showed (PVA) to show the change (seconds).  One that takes longer is
#: lagging: answers no longer wait for it until it catches up.
SHOWN_WAIT = 0.5
#: A request that waits for an answer carries a wall-clock expiry this many seconds before
#: the broker's own deadline (PUT_TIMEOUT); a shard drops what reaches it later, so that a
#: put the broker has failed is never applied.  It covers the time from the shard's apply
#: to the broker's reading of the answer, and the error in what the broker knows of the
#: shard's clock (broker/clock.py: at most a quarter of the margin).
EXPIRY_MARGIN = 1.0
#: A shard clock this far off the front-end's (seconds, either way) raises a MINOR alarm
#: on its ``CLOCK_OFFSET`` health PV: the relay allows for it (broker/clock.py), but the
#: shard's host keeps no time with the others (no NTP?), and the times it logs and keeps
#: (its last flush) are off.
CLOCK_OFFSET_HIGH = 1.0
#: How long a CA read waits for puts in flight to that PV before it answers.
READ_SYNC_TIMEOUT = 1.0
#: How long after its shard's link went down a put still waits for the shard to be back
#: (a restart) before it fails (seconds).
PUT_RECONNECT_GRACE = 2.0
#: Restart back-off of the supervisor (seconds), doubling up to the cap.
RESTART_BACKOFF_INITIAL = 0.25
RESTART_BACKOFF_MAX = 10.0
#: A child that ran this long is healthy again: its back-off resets.
RESTART_RESET_AFTER = 30.0
#: Grace period for children on shutdown before SIGKILL: from the child's SIGTERM, and
#: for a shard as long again each time it is seen still at work (writing, computing, or
#: waiting on its disk), so that a large last flush is not killed half way.
STOP_GRACE = 3.0
#: ... but no stop of one child lasts longer than this (s).
STOP_LIMIT = 60.0
#: How often processes write their status file.
STATUS_INTERVAL = 1.0
#: A process whose status file is this many intervals old does not answer.
STATUS_STALE_INTERVALS = 5
#: A status file older than this (seconds) belongs to a process that does not answer.
STATUS_STALE_AFTER = STATUS_INTERVAL * STATUS_STALE_INTERVALS
#: A process that rewrites its status file only when what it says changes (the supervisor)
#: touches it this often (seconds), so that it stays fresh while nothing changes.
STATUS_TOUCH_INTERVAL = STATUS_STALE_AFTER / 2
#: A status file that cannot be written is said once per this many seconds, with a count.
STATUS_FAULT_LOG_WINDOW = 60.0
#: Seconds a (re)started process may take before ``carelay status`` expects it to answer:
#: its first status file, and the broker's link, which retries after up to RECONNECT_MAX.
STARTUP_GRACE = RECONNECT_MAX + HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS + STATUS_STALE_AFTER
#: Seconds between updates of the health PVs (``<prefix>relay:``) and of ``/metrics``.
HEALTH_INTERVAL = 1.0
#: Refusals and failures kept for ``relay:ERRORS`` (newest last), and the longest line.
ERRORS_KEPT = 50
ERROR_LINE_MAX = 256
#: Where ``/metrics`` listens when ``metrics_port`` is set: loopback unless told.
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
#: ``relay:MAX_BYTES_USED`` alarm limits (percent of max_bytes).
MAX_BYTES_HIGH = 80.0
MAX_BYTES_HIHI = 95.0
#: ``relay:FD_FREE`` alarm limits, as iocStats sets them.
FD_FREE_LOW = 20
FD_FREE_LOLO = 5
#: ``relay:shard<K>:FLUSH_AGE`` alarm limits, in autosave periods.
FLUSH_AGE_HIGH_PERIODS = 5
FLUSH_AGE_HIHI_PERIODS = 20
#: A shard that restarted this many times within the window (seconds) and is not in sync
#: is FAILING (it keeps dying), not merely NOT_ANSWERING.
SHARD_FAILING_RESTARTS = 3
SHARD_FAILING_WINDOW = 60.0
#: In a data directory: the lock that one relay holds while it runs (its pid inside),
#: the lock of a broker started alone, and the token of processes started alone.
RUN_LOCK_FILE = "carelay.lock"
BROKER_LOCK_FILE = "broker.lock"
TOKEN_FILE = "carelay.token"
#: Seconds a starting broker keeps quiet about each shard getting in sync before it says
#: which shards it still waits for (when all are in sync sooner, its ready line says it).
STARTUP_QUIET = 2.0
#: Seconds the PVA server's thread waits for the loop to prepare a new channel before
#: it refuses it for now (the client searches again): the loop takes one turn for it.
PVA_OPEN_WAIT = 2.0
#: Seconds of silence from a shard (no heartbeat answered, nothing sent) after which the
#: PVA front-end makes no new channel of its PVs: the PVA server's thread, which waits
#: for a new channel's opening, then waits for no hung shard (and serves no client
#: meanwhile).  The link itself goes down after HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS.
PVA_SHARD_QUIET = 2 * HEARTBEAT_INTERVAL
#: The soft RLIMIT_NOFILE the PVA front-end sets (or the hard limit, if lower): pvxs waits
#: in epoll, a descriptor per PVA client connection, which costs it about 1.7 kB while
#: idle (65,536 of them about 110 MB); pvxs closes one that sends nothing for 40 s.
PVA_FD_LIMIT = 65_536
#: The soft RLIMIT_NOFILE a shard sets (or the hard limit, if lower): on a tcp endpoint
#: every connection to its port holds a descriptor until its handshake is done or given
#: up (SHARD_HANDSHAKE_MS), and with systemd's usual 1,024 a flood of idle connections,
#: keys or none, left it without descriptors: no broker could connect again.
SHARD_FD_LIMIT = 65_536
#: Milliseconds a connection to a shard's port has to complete its ZeroMQ handshake
#: (CurveZMQ's, with keys) before the shard closes it (libzmq's default: 30 s).
SHARD_HANDSHAKE_MS = 5_000
#: Seconds a PV that a PVA client searched for stays followed before a channel of it
#: is made (see PvaSync.searched); a client makes its channels right after its search.
PVA_SEARCH_FOLLOW = 5.0
#: Seconds between two progress lines of a long resharding or import.
PROGRESS_INTERVAL = 5.0
#: PVs that a resharding or an import into stopped stores commits at a time.
TRANSFER_CHUNK = 500
#: Seconds ``carelay import`` waits for a PV of the running relay to connect or a put
#: with callback to complete.
IMPORT_CA_TIMEOUT = 10.0
#: Seconds between two log lines about peers refused for want of the relay's token.
REFUSED_PEER_LOG_INTERVAL = 10.0
#: Bytes of memory the broker keeps refused names in (each logged once while remembered); a
#: long name is kept as a digest, so the oldest are forgotten by bytes, not by count.
REFUSED_MEMORY_BYTES = 1 << 20
#: Characters of a client's name that a log line carries at most.
LOGGED_NAME_CHARS = 128
#: Refusals logged one by one per REFUSAL_LOG_WINDOW; beyond them, one summary line.
REFUSAL_LOG_LINES = 100
REFUSAL_LOG_WINDOW = 60.0
#: What the broker's C code (PCAS) writes to stderr becomes log lines: at most
#: C_LOG_LINES per C_LOG_WINDOW seconds, each at most C_LINE_CHARS long; the rest counted.
C_LOG_LINES = 20
C_LOG_WINDOW = 60.0
C_LINE_CHARS = 200
#: PCAS waits in select(), which ignores descriptors from FD_SETSIZE on: the broker keeps
#: its soft RLIMIT_NOFILE there, so that every circuit PCAS accepts is one it serves.
FD_SETSIZE = 1024
#: Descriptors kept free for the broker's own sockets (ZeroMQ reconnects, status files)
#: beyond those it holds at start; max_clients defaults to what is left.
BROKER_FD_HEADROOM = 64
#: Default of client_idle_timeout: a circuit whose client neither sends nor acknowledges
#: anything for this long (seconds) is closed, as an IOC drops a silent client.
DEFAULT_CLIENT_IDLE_TIMEOUT = 600.0
#: A circuit that sent more than a small CA message and then fell silent (no data, no
#: acknowledgement) for this long (seconds) is closed: it may hold a large receive buffer
#: for a message it never finishes.  Live CA clients send an echo after 30 s of quiet.
CLIENT_STALL_TIMEOUT = 60.0
#: A circuit that has sent no byte this long (seconds) after connecting is no CA client
#: yet: when circuits are over max_clients, such circuits go first.
CLIENT_SILENT_GRACE = 1.0
#: Default of max_channels, the most channels one CA circuit may hold: this many per PV
#: the relay may hold (max_pvs), for a client that opens fields beside values ...
CHANNELS_PER_PV = 4
#: ... but never fewer than this.
MIN_DEFAULT_CHANNELS = 1000
#: Largest max_channels.
MAX_CHANNELS = 10_000_000
#: Seconds between two log lines about circuits refused or closed (counted meanwhile).
CIRCUIT_LOG_INTERVAL = 10.0
#: Seconds between two full scans of the broker's circuits while nothing changes.
CIRCUIT_SCAN_INTERVAL = 1.0
#: Bytes of PCAS's small per-circuit buffers: a message larger than this makes PCAS take a
#: large buffer (EPICS_CA_MAX_ARRAY_BYTES) for the circuit, kept until the circuit closes.
CA_SMALL_BUFFER = 16384
#: PCAS's large buffer: EPICS_CA_MAX_ARRAY_BYTES plus room for a CA extended header.
CA_LARGE_BUFFER_EXTRA = 24
#: Share of the byte limit (max_bytes) that the CA buffers of all circuits may pin when
#: max_clients is not set; max_clients then defaults to what that share holds ...
CA_BUFFER_SHARE = 0.25
#: ... but never to fewer circuits than this.
MIN_DEFAULT_CLIENTS = 16
#: Bytes per CA array beyond the payload, for EPICS_CA_MAX_ARRAY_BYTES.
CA_ARRAY_OVERHEAD = 16384
#: Longest unix socket path (sun_path less a margin).
MAX_IPC_PATH = 100
#: Largest EPICS_CA_MAX_ARRAY_BYTES that PCAS starts with (a signed 32-bit size).
MAX_CA_ARRAY_BYTES = 2**31 - 1
