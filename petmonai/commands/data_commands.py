"""Commands on data and preprocessing: ``petmonai audit``, ``preprocess``, ``export-preprocessed``,
``build-template``, ``show-pipeline``."""

from __future__ import annotations

from pathlib import Path

from petmonai.commands import options
from petmonai.commands.registry import command


def audit_options(parser) -> None:
    options.add_data_root(parser, required=True)
    options.add_output_dir(parser, help="where audit.md and audit.json go (default: print only)")
    options.add_skip_bad(parser, help="list unreadable files instead of stopping")
    options.add_config(parser, help="also preprocess the training scans as this config does and check that no "
                                    "property of the preprocessed volumes separates the classes (after harmonisation)")


@command("audit", "Audit a PET data set before training on it.", audit_options,
         description="Audit a PET data set before training on it: scans, subjects, sites, header properties and "
                     "what separates the classes.")
def audit_command(args) -> None:
    from petmonai.commands.workflows import audit

    audit(args.data_root, output_dir=args.output_dir, skip_bad=args.skip_bad, config=args.config,
          overrides=args.overrides)


def preprocess_options(parser) -> None:
    options.add_data_root(parser, required=True)
    options.add_config(parser, help="whose preprocessing to run: the config you will train with (default: train3d)")
    options.add_skip_bad(parser, help="leave out scans that cannot be read or preprocessed (listed)")


@command("preprocess", "Preprocess a cohort once into the on-disk cache that training reads.", preprocess_options,
         description="Preprocess (decode, register, resample) every training scan once, in data.preprocess_workers "
                     "processes, into the on-disk volume cache (data.cache_dir). A later `petmonai train --set "
                     "data.cache=disk` with the same config and data reads it instead of preprocessing; scans "
                     "already there are not done again.")
def preprocess_command(args) -> None:
    from petmonai.commands.workflows import preprocess_cohort

    preprocess_cohort(args.data_root, config=args.config, overrides=args.overrides, skip_bad=args.skip_bad)


def export_options(parser) -> None:
    options.add_data_root(parser, required=True)
    options.add_output_dir(parser, required=True, help="exported volumes (Train/<class>/, Test/), datalist.csv, "
                                                       "train3d.yaml and exported.csv")
    options.add_config(parser)
    options.add_skip_bad(parser, help="leave out scans that cannot be read or preprocessed (listed in exported.csv)")


@command("export-preprocessed", "Export scans as a config preprocesses them, to train without SimpleITK/nilearn.",
         export_options,
         description="Write every scan as the config's preprocess leaves it (NIfTI) plus a config that trains on "
                     "them: training elsewhere then needs no registration stack (SimpleITK, nilearn).")
def export_command(args) -> None:
    from petmonai.commands.workflows import export_scans

    export_scans(args.data_root, args.output_dir, config=args.config, overrides=args.overrides, skip_bad=args.skip_bad)


def template_options(parser) -> None:
    options.add_inputs(parser, help="unlabeled scans (folders of *.nii[.gz] or files), e.g. the challenge's Test "
                                    "folder")
    options.add_output(parser, required=True, help="template file (.nii.gz), with OUTPUT.json beside it",
                       overwrite="replace an existing template file")
    options.add_config(parser, help="whose preprocessing registers the scans (default: train3d)")
    parser.add_argument("--iterations", type=int, default=1,
                        help="passes: each registers the scans to the previous mean again (default: 1)")
    options.add_skip_bad(parser, help="leave out scans that cannot be read or registered")


@command("build-template", "Build a study FDG template in MNI space from unlabeled scans.", template_options,
         description="Build a study FDG template in MNI space: the mean of unlabeled scans registered as the config "
                     "registers them. Train on it with --set template.image=OUTPUT.")
def template_command(args) -> None:
    from petmonai.commands.workflows import build_template

    build_template(args.input, args.output, config=args.config, overrides=args.overrides,
                   iterations=args.iterations, skip_bad=args.skip_bad, overwrite=args.overwrite)


def show_pipeline_options(parser) -> None:
    options.add_config(parser)
    parser.add_argument("--image", type=Path, required=True, help="one volume (.nii or .nii.gz)")
    options.add_output(parser, default=Path("pipeline.png"),
                       help="figure: one row per preprocessing step (default: ./pipeline.png)",
                       overwrite="replace an existing figure")


@command("show-pipeline", "Preview a config's preprocessing step by step on one volume (figure + table).",
         show_pipeline_options,
         description="Run the config's preprocess list on one volume one transform at a time; draw three "
                     "orthogonal mid slices after every step, annotated with shape, voxel size, intensity range "
                     "and the step's time, and print the same as a table.")
def show_pipeline_command(args) -> None:
    from petmonai.commands.workflows import show_pipeline

    show_pipeline(args.image, args.output, config=args.config, overrides=args.overrides, overwrite=args.overwrite)
