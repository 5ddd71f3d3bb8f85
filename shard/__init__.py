"""A shard: the source of truth for the PVs it owns.  Never imports pcaspy."""
