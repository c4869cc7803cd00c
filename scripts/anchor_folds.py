#!/usr/bin/env python
"""Pooled out-of-fold AUC of a run with each fold model anchored on unlabeled scans (an analysis).

    python scripts/anchor_folds.py --run-dir runs/real --reference ../shared/data/pet2023/Test
    python scripts/anchor_folds.py --run-dir runs/real --training-reference   # each fold's own training scans

See petmonai/studies/calibration.py: every fold model scores the same unlabeled scans, and its held-out
scores are expressed relative to them (logit minus median, or z-score), so that pooling the folds
no longer mixes probability scales. No label of the reference scans is used (they have none).

The same as `petmonai anchor-folds` (petmonai.commands); options: `python scripts/anchor_folds.py --help`.
"""

import sys

from petmonai.commands import anchor_main as main

if __name__ == "__main__":
    sys.exit(main())
