#!/usr/bin/env python
"""Audit a PET data set before training on it.

    python scripts/audit.py --data-root ../shared/data/pet2023 --output-dir runs/audit

The same as `petmonai audit` (petmonai.commands); options: `python scripts/audit.py --help`.
"""

import sys

from petmonai.commands import audit_main as main

if __name__ == "__main__":
    sys.exit(main())
