#!/usr/bin/env python
"""Benchmark the TTA ensemble (petmonai predict) and check that test-time augmentation pays.

    python scripts/bench_predict.py --run-dir RUN --data-root ../shared/data/pet2023

Writes docs/benchmarks_inference.md (and a JSON of the raw numbers next to it); the parts it
measures: petmonai/commands/bench_predict.py.

The same as `petmonai bench-predict` (petmonai.commands); options: `python scripts/bench_predict.py --help`.
"""

import sys

from petmonai.commands import bench_predict_main as main

if __name__ == "__main__":
    sys.exit(main())
