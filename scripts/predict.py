#!/usr/bin/env python
"""Predict NC vs MCI for new brain FDG-PET volumes with a trained run's fold ensemble.

    python scripts/predict.py --run-dir runs/real --input ../shared/data/pet2023/Test --output out/submission.csv

Writes submission.csv (uuid,label), probabilities.csv, prediction_provenance.json (and skipped.csv,
saliency/) next to --output. Test-time views: sliding windows of the training crop x flips.
"""

import argparse
import sys
from pathlib import Path

from petmonai.commands import user_errors
from petmonai.trust import add_trust_options, policy_from_args


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="predict.py",
        description="Write the challenge submission (uuid,label) for NIfTI volumes with every fold model of a "
                    "training run, its own preprocessing and test-time augmentation (sliding windows x flips).")
    p.add_argument("--run-dir", type=Path, required=True, help="training run folder (scripts/train3d.py --output-dir)")
    p.add_argument("--input", nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="folder(s) of <uuid>.nii[.gz] files and/or single files")
    p.add_argument("--output", type=Path, default=Path("submission.csv"),
                   help="submission CSV; probabilities.csv, prediction_provenance.json, skipped.csv and saliency/ "
                        "go into the same folder (default: ./submission.csv)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out volumes that cannot be used (listed in skipped.csv) instead of stopping")
    p.add_argument("--saliency", action="store_true",
                   help="also write Grad-CAM maps per volume (NIfTI on the input grid + PNG montage) to saliency/")
    g = p.add_argument_group("test-time augmentation (defaults: the run config's inference: section)")
    g.add_argument("--windows", choices=["grid", "center", "whole"], default=None,
                   help="grid: sliding windows of the training crop covering the volume (default); center: one "
                        "centred window; whole: the whole preprocessed volume, as the training evaluator")
    g.add_argument("--overlap", type=float, default=None, help="overlap of neighbouring windows, 0 <= o < 1 (0.5)")
    g.add_argument("--flips", default=None,
                   help="test-time flips: none, lr (left-right, default), all (8), or axis combinations like 0,1,0+1")
    g.add_argument("--folds", default=None, help="comma-separated fold numbers to use (default: all)")
    g.add_argument("--threshold", type=float, default=None, help="decision threshold on P(MCI) (default: the run's)")
    g.add_argument("--batch-size", type=int, default=None, help="views per forward pass")
    g.add_argument("--device", default=None, help="auto | cpu | cuda")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is often faster on a CPU shared with other jobs")
    g.add_argument("--amp", choices=["auto", "true", "false"], default=None,
                   help="auto: autocast on CUDA, fp32 on CPU; true: also bf16 on a CPU that has it; false: fp32")
    g.add_argument("--saliency-class", choices=["MCI", "NC", "predicted"], default=None,
                   help="class whose evidence Grad-CAM maps (default: the predicted label)")
    g.add_argument("--saliency-layer", default=None, help="Grad-CAM target layer (default: by model, features.block4 of the 3D SFCN, layer3 of a ResNet)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="inference.KEY=VALUE",
                   help="any inference option, e.g. --set inference.workers=1 (repeatable)")
    add_trust_options(p)  # --allow-module, --trust-config: what the run folder's config may run
    return p.parse_args(argv)


@user_errors
def main(argv=None) -> int:
    from petmonai.inference import parse_set_overrides, predict
    from petmonai.runs import setup_logging

    args = parse_args(argv)
    setup_logging(None)
    options = parse_set_overrides(args.overrides)
    options.update({k: v for k, v in {
        "windows": args.windows, "overlap": args.overlap, "flips": args.flips, "threshold": args.threshold,
        "batch_size": args.batch_size, "device": args.device, "amp": args.amp, "threads": args.threads,
        "saliency_class": args.saliency_class, "saliency_layer": args.saliency_layer,
        "folds": [int(f) for f in args.folds.split(",") if f.strip()] if args.folds else None,
    }.items() if v is not None})
    with policy_from_args(args):
        result = predict(args.run_dir, args.input, args.output, overwrite=args.overwrite, skip_bad=args.skip_bad,
                         saliency=args.saliency, options=options)
    n_in = len(result.table) + len(result.skipped)
    print(f"{n_in} input volume(s): {len(result.table)} predicted, {len(result.skipped)} skipped "
          f"({result.seconds:.1f}s) -> {result.paths['submission']}")
    for rec in result.skipped.itertuples(index=False):
        print(f"skipped: {rec.file}: {rec.problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
