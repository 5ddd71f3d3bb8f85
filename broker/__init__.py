"""The broker: owns the CA endpoint (pcaspy) and forwards to the shards over ZeroMQ."""
