#!/usr/bin/env python
"""Cross-validate several preprocessing configurations under site-pair and subject-grouped CV.

    python scripts/experiments.py --data-root ../shared/data/pet2023 \
        --configs configs/train3d.yaml configs/experiments/mask.yaml --output-dir runs/experiments

The same as `petmonai experiments` (petmonai.commands); options: `python scripts/experiments.py --help`.
"""

import sys

from petmonai.commands import experiments_main as main

if __name__ == "__main__":
    sys.exit(main())
