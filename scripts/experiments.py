#!/usr/bin/env python
"""Cross-validate several preprocessing configurations under site-pair and subject-grouped CV.

    python scripts/experiments.py --data-root ../shared/data/pet2023 \
        --configs configs/train3d.yaml configs/experiments/mask.yaml --output-dir runs/experiments
"""

import argparse
import sys
from pathlib import Path

from petmonai.commands import user_errors


@user_errors
def main(argv=None) -> int:
    from petmonai.studies import PROTOCOL_ORDER, run_experiments
    from petmonai.runs import setup_logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--configs", nargs="+", type=Path, required=True)
    parser.add_argument("--cv", nargs="+", default=list(PROTOCOL_ORDER), choices=PROTOCOL_ORDER)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    setup_logging(None)
    run_experiments(args.configs, args.data_root, args.output_dir, args.cv,
                    {"max_epochs": args.max_epochs, "seed": args.seed, "device": args.device,
                     "overrides": args.overrides})
    print((args.output_dir / "experiments.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
