#!/usr/bin/env python
"""Audit a PET data set before training on it.

    python scripts/audit.py --data-root ../shared/data/pet2023 --output-dir runs/audit
"""

import sys

from petmonai.commands import audit_main

if __name__ == "__main__":
    sys.exit(audit_main())
