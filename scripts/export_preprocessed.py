#!/usr/bin/env python
"""Export scans as a config preprocesses them, to train where SimpleITK/nilearn are missing (a GPU node).

    python scripts/export_preprocessed.py --data-root ../shared/data/pet2023 --output-dir /data/prep6
    python scripts/train3d.py --config /data/prep6/train3d.yaml --data-root /data/prep6/datalist.csv

The exported volumes are derived from patient data: keep them with the data, never in a repository.

The same as `petmonai export-preprocessed` (petmonai.commands); options: `python scripts/export_preprocessed.py --help`.
"""

import sys

from petmonai.commands import export_main as main

if __name__ == "__main__":
    sys.exit(main())
