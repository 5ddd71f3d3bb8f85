"""What broker and shard share and what has no I/O: naming, config, wire protocol."""
