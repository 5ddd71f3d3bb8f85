"""The ``carelay`` command line: starts, watches and stops the broker and shards."""
