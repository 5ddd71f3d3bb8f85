"""A fixed-capacity, right-appending ring buffer of numpy elements."""

from __future__ import annotations

import numpy as np


class RingBuffer:
    """Keeps the newest ``capacity`` elements; reads return oldest first.

    An append costs the appended elements, not the capacity: the storage is a
    preallocated array written in at most two slices.
    """

    __slots__ = ("_data", "_start", "_len")

    def __init__(self, capacity: int, dtype: np.dtype | str) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._data = np.zeros(capacity, dtype=dtype)
        self._start = 0
        self._len = 0

    @property
    def capacity(self) -> int:
        return self._data.shape[0]

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    def __len__(self) -> int:
        return self._len

    def clear(self) -> None:
        self._start = 0
        self._len = 0

    def append(self, values: np.ndarray) -> None:
        """Append ``values`` on the right; the oldest fall off the left."""
        values = np.asarray(values, dtype=self._data.dtype).reshape(-1)
        cap = self.capacity
        n = values.shape[0]
        if n == 0:
            return
        if n >= cap:
            self._data[:] = values[n - cap :]
            self._start = 0
            self._len = cap
            return
        end = (self._start + self._len) % cap
        first = min(n, cap - end)
        self._data[end : end + first] = values[:first]
        if first < n:
            self._data[: n - first] = values[first:]
        overflow = self._len + n - cap
        if overflow > 0:
            self._start = (self._start + overflow) % cap
            self._len = cap
        else:
            self._len += n

    def view(self) -> np.ndarray:
        """Contents oldest first: a view when contiguous, else a copy."""
        end = self._start + self._len
        if end <= self.capacity:
            return self._data[self._start : end]
        return np.concatenate((self._data[self._start :], self._data[: end - self.capacity]))

    def replace(self, values: np.ndarray) -> None:
        """Set the contents to the newest ``capacity`` of ``values``."""
        self.clear()
        self.append(values)
