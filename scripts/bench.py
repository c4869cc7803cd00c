#!/usr/bin/env python
"""Measure training speed and memory; write docs/benchmarks.md.

    python scripts/bench.py --data-root ../shared/data/pet2023

The same as `petmonai bench` (petmonai.commands); options: `python scripts/bench.py --help`.
"""

import sys

from petmonai.commands import bench_main as main

if __name__ == "__main__":
    sys.exit(main())
