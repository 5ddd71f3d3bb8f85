"""``python -m bench``: the benchmark suite (see bench/suite.py and docs/benchmarks.md)."""

import sys

if __name__ == "__main__":
    # Spawned client processes import this module as __mp_main__: they must not run it.
    from bench.suite import main

    sys.exit(main())
