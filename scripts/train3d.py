#!/usr/bin/env python
"""Train and cross-validate the 3D CNN of configs/train3d.yaml on brain FDG-PET (NC vs MCI).

    python scripts/train3d.py                                   # demo on a synthetic cohort
    python scripts/train3d.py --data-root ../shared/data/pet2023 --output-dir runs/real

The same as `petmonai train` (petmonai.commands); options: `python scripts/train3d.py --help`.
"""

import sys

from petmonai.commands import train3d_main as main

if __name__ == "__main__":
    sys.exit(main())
