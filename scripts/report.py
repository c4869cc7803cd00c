#!/usr/bin/env python
"""Rebuild the evaluation report (report.md + figures) of a finished training run.

    python scripts/report.py runs/train3d-20240101-120000
    python scripts/report.py RUN_DIR --reference        # also run the PCA + LR reference on the run's folds
    python scripts/report.py RUN_DIR --recompute --bootstrap 5000
    python scripts/report.py RUN_DIR --reference --reference-set reference.features=regions \
        --reference-name reference_regions     # a variant of the reference beside the report's own
"""

import argparse
import sys
from pathlib import Path

from petmonai.commands import user_errors
from petmonai.trust import add_trust_options, policy_from_args


@user_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="report.py",
        description="Write report.md, roc.png, confusion.png, calibration.png and training_curves.png into a "
                    "finished run folder, from its predictions and metrics.")
    parser.add_argument("run_dir", type=Path, help="run folder written by train3d.py")
    parser.add_argument("--reference", action="store_true",
                        help="run the PCA + logistic-regression reference on the run's folds first "
                             "(when reference/ is missing or should be redone; needs the image files)")
    parser.add_argument("--data-root", default=None,
                        help="with --reference: where the images are now, if they moved since training")
    parser.add_argument("--reference-set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="with --reference: config override for the reference fit (repeatable), "
                             "e.g. reference.features=regions")
    parser.add_argument("--reference-name", default="reference",
                        help="with --reference: sub-folder for its outputs (default reference/, the one "
                             "report.md shows)")
    parser.add_argument("--recompute", action="store_true",
                        help="recompute metrics and CIs from the prediction files instead of metrics.json")
    parser.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates with --recompute")
    parser.add_argument("--no-figures", action="store_true", help="write report.md only")
    add_trust_options(parser)  # --allow-module, --trust-config: what the run folder's config may run
    args = parser.parse_args(argv)

    from petmonai.evaluation import add_reference, build_report
    from petmonai.runs import setup_logging

    setup_logging(None)
    with policy_from_args(args):
        if args.reference:
            add_reference(args.run_dir, args.data_root, args.reference_set, args.reference_name)
        path = build_report(args.run_dir, recompute=args.recompute or args.bootstrap is not None,
                            n_boot=args.bootstrap, figures=not args.no_figures)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
