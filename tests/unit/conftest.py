"""Shared settings for the unit tests."""

from hypothesis import settings

# No example database in the working tree, no per-example deadline (CI machines vary).
settings.register_profile("carelay-unit", database=None, deadline=None)
settings.load_profile("carelay-unit")
