#!/usr/bin/env python
"""Predict NC vs MCI for new brain FDG-PET volumes with a trained run's fold ensemble.

    python scripts/predict.py --run-dir runs/real --input ../shared/data/pet2023/Test --output out/submission.csv

Writes out/submission.csv (uuid,label) and, named after it, out/submission.probabilities.csv,
out/submission.provenance.json (and .skipped.csv, .saliency/).

The same as `petmonai predict` (petmonai.commands); options: `python scripts/predict.py --help`.
"""

import sys

from petmonai.commands import predict_main as main

if __name__ == "__main__":
    sys.exit(main())
