"""``petmonai export-bundle``: a trained run as a MONAI bundle that MONAI's own tools run.

    petmonai export-bundle --run-dir runs/real --output bundles/fdg_nc_mci
    python -m monai.bundle run --config_file bundles/fdg_nc_mci/configs/inference.json \\
        --bundle_root bundles/fdg_nc_mci --dataset_dir ../shared/data/pet2023/Test --output_dir out
"""

from __future__ import annotations

from pathlib import Path

from petmonai.commands import options
from petmonai.commands.registry import command
from petmonai.errors import PetmonaiError


def export_bundle_options(p) -> None:
    p.add_argument("--run-dir", type=Path, required=True, help="finished training run folder")
    options.add_output(p, required=True, help="the bundle folder to write", overwrite="replace an existing bundle folder")
    p.add_argument("--version", default=None, help="the bundle's version (default 0.1.0)")
    p.add_argument("--authors", default=None, help="authors named in metadata.json and LICENSE")
    p.add_argument("--copyright", default=None, help="copyright line of metadata.json and LICENSE")
    p.add_argument("--license", type=Path, default=None, metavar="FILE",
                   help="a LICENSE text of your own (default: the training data's terms apply, no warranty)")
    options.add_set(p, metavar="inference.KEY=VALUE",
                    help="test-time views other than the run config's, e.g. --set inference.flips=all (repeatable)")


@command("export-bundle", "Write a finished run as a MONAI bundle that `python -m monai.bundle run` runs.",
         export_bundle_options,
         description="Write a finished training run as a MONAI bundle (configs/inference.json, configs/metadata.json, "
                     "models/model.pt, docs/README.md model card, LICENSE) that `python -m monai.bundle run` "
                     "runs: the run's preprocessing, its fold ensemble and test-time views, as petmonai predict.")
def export_bundle_command(args) -> None:
    from petmonai.inference import export_bundle, parse_set_overrides
    from petmonai.inference.bundle_export import BUNDLE_VERSION
    from petmonai.runs import setup_logging

    setup_logging(None)
    license_text = None
    if args.license is not None:
        try:
            license_text = args.license.read_text()
        except OSError as err:
            raise PetmonaiError(f"--license {args.license}: cannot be read ({err.strerror or err})") from None
    out = export_bundle(args.run_dir, args.output, overwrite=args.overwrite,
                        options=parse_set_overrides(args.overrides), version=args.version or BUNDLE_VERSION,
                        authors=args.authors, copyright=args.copyright, license_text=license_text)
    print(f"bundle written: {out}\nrun it: python -m monai.bundle run --config_file {out}/configs/inference.json "
          f"--bundle_root {out} --dataset_dir FOLDER --output_dir OUT")
