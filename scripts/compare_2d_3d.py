#!/usr/bin/env python
"""Compare the 2D 50-slice ResNet-18 with the default 3D CNN (and the reference) on identical folds.

    python scripts/compare_2d_3d.py --data-root ../shared/data/pet2023 --cv subject site-pair
    python scripts/compare_2d_3d.py --data-root ../shared/data/pet2023 --quick      # minutes

The same as `petmonai compare` (petmonai.commands); options: `python scripts/compare_2d_3d.py --help`.
"""

import sys

from petmonai.commands import compare_main as main

if __name__ == "__main__":
    sys.exit(main())
