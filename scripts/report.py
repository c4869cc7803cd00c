#!/usr/bin/env python
"""Rebuild the evaluation report (report.md + figures) of a finished training run.

    python scripts/report.py runs/train3d-20240101-120000
    python scripts/report.py RUN_DIR --reference        # also run the PCA + LR reference on the run's folds
    python scripts/report.py RUN_DIR --recompute --bootstrap 5000
    python scripts/report.py RUN_DIR --reference --reference-set reference.features=regions \
        --reference-name reference_regions     # a variant of the reference beside the report's own

The same as `petmonai report` (petmonai.commands); options: `python scripts/report.py --help`.
"""

import sys

from petmonai.commands import report_main as main

if __name__ == "__main__":
    sys.exit(main())
