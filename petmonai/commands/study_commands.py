"""Studies and benchmarks: ``petmonai compare``, ``experiments``, ``bench``, ``bench-predict``, ``bench-scale``."""

from __future__ import annotations

from pathlib import Path

from petmonai.commands import options
from petmonai.commands.registry import command


def compare_options(parser) -> None:
    from petmonai.studies import (
        DEFAULT_MODELS,
        MODELS,
        PROTOCOLS,
        QUICK_EPOCHS,
        REFERENCE,
    )

    options.add_data_root(parser, help="real data (default: the synthetic demo cohort)")
    parser.add_argument("--cv", nargs="+", choices=PROTOCOLS, default=["subject"],
                        help="protocol(s), e.g. subject site-pair")
    keys = "; ".join(f"{k}: {name} (configs/{config})" for k, (name, config) in MODELS.items())
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated subset of {keys}; {REFERENCE}: the PCA + LR reference "
                             "(default: %(default)s)")
    parser.add_argument("--folds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeated CV: every model on the same folds of every repeat")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="epoch budget of every CNN (default: each config's own)")
    options.add_device(parser)
    options.add_seed(parser)
    options.add_set(parser, help="config override applied to every model")
    options.add_output_dir(parser, help="default: runs/compare-<time>")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_EPOCHS} epochs and smaller inputs: the whole comparison in minutes")
    parser.add_argument("--config-3d", type=Path, default=None, help="3D config (default configs/train3d.yaml)")
    parser.add_argument("--config-2d", type=Path, default=None,
                        help="2D config (default configs/train2d_registered.yaml)")


@command("compare", "Compare 2D and 3D CNNs (and the reference) on identical folds.",
         compare_options,
         description="Train the default 3D CNN, the 3D ResNet-18, a 2D ResNet-18 on the same registered inputs "
                     "and recipe, the native 2D models and the PCA + LR reference on identical folds; write "
                     "comparison.md, comparison.png, comparison_loss.png, comparison.json.")
def compare_command(args) -> None:
    from petmonai.runs import setup_logging, timestamped_dir
    from petmonai.studies import QUICK_EPOCHS, compare

    setup_logging(None)
    out = args.output_dir or timestamped_dir("compare")
    max_epochs = args.max_epochs if args.max_epochs is not None else (QUICK_EPOCHS if args.quick else None)
    study = {"folds": args.folds, "repeats": args.repeats, "device": args.device, "seed": args.seed,
             "max_epochs": max_epochs, "overrides": args.overrides, "quick": args.quick,
             "configs": {k: v for k, v in (("3d", args.config_3d), ("2d", args.config_2d)) if v is not None}}
    compare(args.data_root, out, protocols=args.cv, models=args.models.split(","), options=study)
    print((out / "comparison.md").read_text())


def experiments_options(parser) -> None:
    from petmonai.studies import PROTOCOL_ORDER

    options.add_data_root(parser, help="real data (default: the synthetic demo cohort)")
    parser.add_argument("--configs", nargs="+", type=Path, required=True,
                        help="configs to compare (files or shipped names, e.g. train3d experiments/mask)")
    parser.add_argument("--cv", nargs="+", default=list(PROTOCOL_ORDER), choices=PROTOCOL_ORDER)
    options.add_output_dir(parser, required=True, help="one run folder per protocol and config, and experiments.md")
    parser.add_argument("--max-epochs", type=int, default=None)
    options.add_seed(parser)
    options.add_device(parser)
    options.add_set(parser, help="config override applied to every configuration")


@command("experiments", "Cross-validate several preprocessing configurations under site-pair and subject CV.",
         experiments_options)
def experiments_command(args) -> None:
    from petmonai.runs import setup_logging
    from petmonai.studies import run_experiments

    setup_logging(None)
    run_experiments(args.configs, args.data_root, args.output_dir, args.cv,
                    {"max_epochs": args.max_epochs, "seed": args.seed, "device": args.device,
                     "overrides": args.overrides})
    print((args.output_dir / "experiments.md").read_text())


def bench_options(parser) -> None:
    options.add_data_root(parser, help="real data (default: the synthetic cohort)")
    options.add_config(parser)
    options.add_device(parser, default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    options.add_output(parser, default=Path("docs/benchmarks.md"),
                       help="Markdown report, with a JSON of the figures beside it (default: docs/benchmarks.md)")


@command("bench", "Measure training speed and memory; write docs/benchmarks.md.", bench_options)
def bench_command(args) -> None:
    from petmonai.commands.bench import bench

    print(bench(args.config, args.data_root, args.device, args.epochs, args.output, args.overrides, args.invocation))


def bench_predict_options(parser) -> None:
    parser.add_argument("--run-dir", type=Path, default=None, help="a finished (5-fold) training run (required)")
    parser.add_argument("--inputs", type=Path, default=None, help="folder of volumes to predict (default: synthetic)")
    parser.add_argument("--volumes", type=int, default=100, help="synthetic volumes for the full run")
    parser.add_argument("--factor-volumes", type=int, default=6, help="volumes for the factor costs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--full", default="center:all,whole:all,grid:lr,grid:all",
                        help="full-run configurations WINDOWS:FLIPS, comma-separated ('' to skip)")
    parser.add_argument("--skip-factors", action="store_true")
    parser.add_argument("--skip-oof", action="store_true")
    options.add_output(parser, default=Path("docs/benchmarks_inference.md"),
                       help="Markdown report, with a JSON of the figures beside it "
                            "(default: docs/benchmarks_inference.md)")
    parser.add_argument("--note", default=None, help="a paragraph of interpretation to add after the AUC table")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="measure nothing: render the Markdown again from a JSON this command wrote (with --note)")


@command("bench-predict", "Benchmark the TTA ensemble of petmonai predict and check that test-time augmentation "
         "pays.", bench_predict_options)
def bench_predict_command(args) -> None:
    from petmonai.commands.bench_predict import bench_predict, rerender
    from petmonai.errors import PetmonaiError

    if args.from_json is not None:
        return rerender(args.from_json, args.output, args.note)
    if args.run_dir is None:
        raise PetmonaiError("bench-predict: --run-dir is required (a finished training run)")
    bench_predict(args.run_dir, inputs=args.inputs, volumes=args.volumes, factor_volumes=args.factor_volumes,
                  threads=args.threads, full=args.full, factors=not args.skip_factors, oof=not args.skip_oof,
                  output=args.output, note=args.note, command=args.invocation)


def bench_scale_options(parser) -> None:
    from petmonai.studies import DEFAULT_SIZES

    parser.add_argument("--sizes", nargs="+", type=int, default=list(DEFAULT_SIZES),
                        help="cohort sizes N (synthetic scans; default: %(default)s)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2],
                        help="preprocessing worker processes to compare (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of fold 0 trained per size (default: 2)")
    parser.add_argument("--torchrun-size", type=int, default=None,
                        help="cohort size of the 2-process torchrun comparison (default: the smallest; 0: skip it)")
    options.add_device(parser, default="cpu")
    options.add_seed(parser)
    options.add_set(parser, help="config override for every measurement")
    options.add_output_dir(parser, help="scale.json, scale.md, scale.png (default: runs/scale-<time>)")
    parser.add_argument("--docs", type=Path, default=None, help="also render this page from the results "
                        "(docs/scale.md)")
    parser.add_argument("--keep", action="store_true", help="keep the cohorts and caches (in OUTPUT/.work-*)")


@command("bench-scale", "Measure how preprocessing, training and prediction scale with the number of scans.",
         bench_scale_options,
         description="For each N of --sizes: a synthetic cohort generated, preprocessed cold and warm with 1 and 2 "
                     "workers, one fold trained from the on-disk cache (epoch time, peak memory), its held-out scans "
                     "predicted; the issue's targets checked; scale.json, scale.md and a log-log plot written.")
def bench_scale_command(args) -> None:
    from petmonai.runs import setup_logging, timestamped_dir
    from petmonai.studies import bench_scale

    setup_logging(None)
    out = args.output_dir or timestamped_dir("scale")
    bench_scale(out, sizes=args.sizes, workers=args.workers, epochs=args.epochs, device=args.device,
                overrides=args.overrides, seed=0 if args.seed is None else args.seed, torchrun_size=args.torchrun_size, command=args.invocation,
                docs=args.docs, keep=args.keep)
    print((out / "scale.md").read_text())
