#!/usr/bin/env python
"""Write a trained run as a MONAI bundle that MONAI's own runner runs.

    python scripts/export_bundle.py --run-dir runs/real --output bundles/fdg_nc_mci
"""

import sys

from petmonai.commands import export_bundle_main as main

if __name__ == "__main__":
    sys.exit(main())
