#!/usr/bin/env python
"""Build a study FDG template in MNI space from unlabeled scans, then train on it.

    python scripts/build_template.py --input ../shared/data/pet2023/Test --output templates/study.nii.gz --skip-bad
    python scripts/train3d.py --data-root ../shared/data/pet2023 --set template.image=templates/study.nii.gz

The template is derived from patient scans: keep it with the data, never in a repository.

The same as `petmonai build-template` (petmonai.commands); options: `python scripts/build_template.py --help`.
"""

import sys

from petmonai.commands import build_template_main as main

if __name__ == "__main__":
    sys.exit(main())
