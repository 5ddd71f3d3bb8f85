"""Unit tests for shard assignment (carelay.common.sharding)."""

from __future__ import annotations

from collections import Counter

import pytest

from carelay.common.sharding import shard_for

NAMES = [f"RELAY:pv{k}_f1" for k in range(10_000)]


@pytest.fixture(scope="module")
def two() -> list[int]:
    return [shard_for(n, 2) for n in NAMES]


@pytest.fixture(scope="module")
def three() -> list[int]:
    return [shard_for(n, 3) for n in NAMES]


def test_deterministic(two):
    assert [shard_for(n, 2) for n in NAMES[:500]] == two[:500]
    assert shard_for("RELAY:x_f1", 4) == shard_for("RELAY:x_f1", 4)


def test_known_values_are_pinned():
    # Changing the hash would move PVs between the shards of a running relay.
    assert [shard_for(f"RELAY:pv{k}_f1", 4) for k in range(12)] == [
        0, 0, 0, 2, 1, 1, 1, 0, 2, 0, 1, 2
    ]  # fmt: skip
    assert [shard_for(f"RELAY:pv{k}_f1", 2) for k in range(12)] == [
        0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1
    ]  # fmt: skip


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 64])
def test_in_range(n):
    for name in NAMES[:300]:
        k = shard_for(name, n)
        assert isinstance(k, int)
        assert 0 <= k < n


def test_one_shard_owns_everything():
    assert {shard_for(n, 1) for n in NAMES[:300]} == {0}


@pytest.mark.parametrize("n", [2, 4])
def test_roughly_balanced(n, two):
    counts = Counter(two if n == 2 else (shard_for(name, n) for name in NAMES))
    fair = len(NAMES) / n
    assert set(counts) == set(range(n))
    for k in range(n):
        assert abs(counts[k] - fair) <= 0.2 * fair, counts


def test_two_to_three_moves_only_to_the_new_shard(two, three):
    moved = [(a, b) for a, b in zip(two, three, strict=True) if a != b]
    assert moved, "some names must move to the new shard"
    assert all(b == 2 for _, b in moved), "a name moved between the old shards"
    # Every name on the new shard came from one of the old ones.
    assert sum(1 for b in three if b == 2) == len(moved)
    share = len(moved) / len(NAMES)
    assert abs(share - 1 / 3) <= 0.2 / 3, share


def test_moved_names_come_from_both_old_shards(two, three):
    sources = Counter(a for a, b in zip(two, three, strict=True) if a != b)
    assert sources[0] > 0 and sources[1] > 0


@pytest.mark.parametrize("n", [0, -1])
def test_fewer_than_one_shard_raises(n):
    with pytest.raises(ValueError, match="n_shards"):
        shard_for("RELAY:x_f1", n)
