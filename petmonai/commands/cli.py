"""Command-line entry points (``scripts/*.py`` and the ``petmonai-*`` console scripts).

User errors (:class:`petmonai.errors.PetmonaiError`) end the command with one clear line and
exit status 2, never a traceback.
"""

from __future__ import annotations
import argparse
import functools
import sys
from pathlib import Path
from petmonai.errors import PetmonaiError
from petmonai.trust import add_trust_options, policy_from_args


def user_errors(main):
    """Run ``main``; print a user error as one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except PetmonaiError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config (default: configs/train3d.yaml; configs/demo3d.yaml without --data-root)")
    parser.add_argument("--data-root", default=None,
                        help="competition-layout folder (Train/NC, Train/MCI, Test) or CSV datalist "
                             "(image,label[,subject,site]); omitted: a synthetic phantom cohort")
    parser.add_argument("--output-dir", type=Path, default=None, help="run folder (default: runs/<name>-<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue a killed run where it stopped (its own config, data and folds)")
    parser.add_argument("--cv", choices=["subject", "site-pair", "scan"], default=None, help="CV protocol")
    parser.add_argument("--folds", type=int, default=None, help="number of CV folds")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of subject-grouped K-fold (new seeds)")
    parser.add_argument("--folds-file", default=None, help="reuse the folds.csv of an earlier run")
    parser.add_argument("--allow-leaky", action="store_true", help="permit the leaky scan-level protocol")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--device", default=None, help="auto | cpu | cuda")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable volumes, listing them in the run folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override any config entry, e.g. --set train.lr=1e-3 (repeatable)")
    add_trust_options(parser)  # --allow-module, --trust-config (petmonai.trust)


@user_errors
def train3d_main(argv=None) -> int:
    from petmonai.commands.workflows import train_command

    parser = argparse.ArgumentParser(
        prog="train3d.py",
        description="Train and cross-validate the 3D CNN of the config (default: the small 3D SFCN of "
                    "configs/train3d.yaml), NC vs MCI on brain FDG-PET. "
                    "Without --data-root it runs a demo on a generated SYNTHETIC phantom cohort.")
    add_training_options(parser)
    args = parser.parse_args(argv)
    with policy_from_args(args):
        train_command(args, default_config="train3d.yaml", demo_config="demo3d.yaml", prefix="train3d")
    return 0


@user_errors
def audit_main(argv=None) -> int:
    from petmonai.commands.workflows import audit_command

    parser = argparse.ArgumentParser(prog="audit.py", description="Audit a PET data set before training on it: "
                                     "scans, subjects, sites, header properties and what separates the classes.")
    parser.add_argument("--data-root", required=True, help="competition-layout folder or CSV datalist")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where audit.md and audit.json go (default: print only)")
    parser.add_argument("--skip-bad", action="store_true", help="list unreadable files instead of stopping")
    parser.add_argument("--config", type=Path, default=None,
                        help="also preprocess the training scans as this config does and check that no property "
                             "of the preprocessed volumes separates the classes (after harmonisation)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override of --config")
    args = parser.parse_args(argv)
    audit_command(args)
    return 0


@user_errors
def export_main(argv=None) -> int:
    from petmonai.config import default_config_path, load_config
    from petmonai.commands.export import export_preprocessed
    from petmonai.runs import setup_logging

    parser = argparse.ArgumentParser(prog="export_preprocessed.py", description="Write every scan as the config's "
                                     "preprocess leaves it (NIfTI) plus a config that trains on them: training "
                                     "elsewhere then needs no registration stack (SimpleITK, nilearn).")
    parser.add_argument("--data-root", required=True, help="competition-layout folder or CSV datalist")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="exported volumes (Train/<class>/, Test/), datalist.csv, train3d.yaml and exported.csv")
    parser.add_argument("--config", type=Path, default=default_config_path())
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out scans that cannot be read or preprocessed (listed in exported.csv)")
    args = parser.parse_args(argv)
    setup_logging(None)
    cfg = load_config(args.config, [*args.overrides, f"data.root={args.data_root}"])
    export_preprocessed(cfg, args.output_dir, skip_bad=args.skip_bad)
    return 0


@user_errors
def build_template_main(argv=None) -> int:
    from petmonai.config import default_config_path, load_config
    from petmonai.runs import setup_logging
    from petmonai.transforms import build_study_template, template_inputs, write_study_template

    parser = argparse.ArgumentParser(prog="build_template.py", description="Build a study FDG template in MNI "
                                     "space: the mean of unlabeled scans registered as the config registers them. "
                                     "Train on it with --set template.image=OUTPUT.")
    parser.add_argument("--input", nargs="+", required=True, metavar="DIR_OR_FILE",
                        help="unlabeled scans (folders of *.nii[.gz] or files), e.g. the challenge's Test folder")
    parser.add_argument("--output", type=Path, required=True, help="template file (.nii.gz), with OUTPUT.json beside it")
    parser.add_argument("--config", type=Path, default=default_config_path(),
                        help="whose preprocessing registers the scans (default: configs/train3d.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--iterations", type=int, default=1,
                        help="passes: each registers the scans to the previous mean again (default: 1)")
    parser.add_argument("--skip-bad", action="store_true", help="leave out scans that cannot be read or registered")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing template file")
    args = parser.parse_args(argv)
    setup_logging(None)
    if args.output.exists() and not args.overwrite:
        raise PetmonaiError(f"{args.output} exists; use --overwrite to replace it")
    cfg = load_config(args.config, args.overrides)
    if cfg["template"].get("image"):
        raise PetmonaiError(f"the config registers to template.image={cfg['template']['image']}; build a study "
                            "template from the MNI template (template.image: null)")
    files = template_inputs(args.input)
    template = build_study_template(files, cfg, skip_bad=args.skip_bad, iterations=args.iterations)
    write_study_template(template, args.output, cfg, args.iterations)
    match = template.match()
    print(f"{args.output}: mean of {len(template.used)} registered scans ({len(template.skipped)} skipped); "
          f"their correlation with it: median {match['median']:.2f}, min {match['min']:.2f}")
    return 0


@user_errors
def anchor_main(argv=None) -> int:
    import json

    from petmonai.studies import anchored_auc, anchored_out_of_fold
    from petmonai.runs import atomic_write_csv, atomic_write_json, setup_logging

    parser = argparse.ArgumentParser(prog="anchor_folds.py", description="Pooled out-of-fold AUC of a run with each "
                                     "fold model's scores anchored on unlabeled reference scans (an analysis).")
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished train3d.py run")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--reference", nargs="+", metavar="DIR_OR_FILE",
                           help="unlabeled scans every fold model scores, e.g. the challenge's Test folder")
    source.add_argument("--training-reference", action="store_true",
                           help="anchor each fold model on its own training scans instead (no external scans)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON of the AUCs (and a CSV of the scores beside it)")
    args = parser.parse_args(argv)
    setup_logging(None)
    table = anchored_out_of_fold(args.run_dir, None if args.training_reference else args.reference)
    reference = "each fold's training scans" if args.training_reference else [str(r) for r in args.reference]
    result = {"run_dir": str(args.run_dir), "reference": reference, "auc": anchored_auc(table)}
    if args.output:
        atomic_write_csv(args.output.with_suffix(".csv"), table)
        atomic_write_json(args.output, result)
    print(json.dumps(result["auc"], indent=1))
    return 0


@user_errors
def compare_main(argv=None) -> int:
    import time

    from petmonai.studies import DEFAULT_MODELS, PROTOCOLS, QUICK_EPOCHS, compare
    from petmonai.runs import setup_logging

    parser = argparse.ArgumentParser(
        prog="compare_2d_3d.py",
        description="Train the 2D 50-slice ResNet-18, the default 3D CNN and the PCA + LR reference on identical "
                    "folds with the same epoch budget; write comparison.md, comparison.png, comparison.json.")
    parser.add_argument("--data-root", default=None, help="real data (default: the synthetic demo cohort)")
    parser.add_argument("--cv", nargs="+", choices=PROTOCOLS, default=["subject"], help="protocol(s), e.g. subject site-pair")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated subset of 3d, 2d, 2d-baseline, reference (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="epoch budget of every CNN (default: each config's own, 30 for 3d and 2d)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="config override applied to every model")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: runs/compare-<time>")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_EPOCHS} epochs and smaller inputs: the whole comparison in minutes")
    parser.add_argument("--config-3d", type=Path, default=None, help="3D config (default configs/train3d.yaml)")
    parser.add_argument("--config-2d", type=Path, default=None, help="2D config (default configs/train2d.yaml)")
    args = parser.parse_args(argv)
    setup_logging(None)
    out = args.output_dir or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    options = {"folds": args.folds, "repeats": args.repeats, "device": args.device, "seed": args.seed,
               "max_epochs": args.max_epochs if args.max_epochs is not None else (QUICK_EPOCHS if args.quick else None),
               "overrides": args.overrides, "quick": args.quick,
               "configs": {k: v for k, v in (("3d", args.config_3d), ("2d", args.config_2d)) if v is not None}}
    compare(args.data_root, out, protocols=args.cv, models=args.models.split(","), options=options)
    print((out / "comparison.md").read_text())
    return 0
