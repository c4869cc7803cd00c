"""``petmonai convert-dicom`` and ``petmonai to-bids``: a cohort into BIDS, from scanner DICOM or from the
challenge layout (or the synthetic phantom cohort).

    petmonai convert-dicom DICOM_DIR --output BIDS_DIR [--mapping ids.csv]
    petmonai to-bids ../shared/data/pet2023 --output pet2023_bids [--link] [--rename NC=CN --rename MCI=AD]
    petmonai to-bids --synthetic --output phantoms_bids

User errors end the command with one line on stderr and exit status 2; nothing is written then.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from petmonai.commands import options
from petmonai.commands.registry import command
from petmonai.errors import PetmonaiError


def convert_dicom_options(parser) -> None:
    parser.add_argument("dicom_dir", type=Path, help="folder of DICOM files (searched recursively)")
    options.add_output(parser, required=True, help="the BIDS dataset to write (new or empty folder)",
                       overwrite="replace an existing output folder")
    parser.add_argument("--mapping", type=Path, default=None,
                        help="CSV/TSV with columns patient_id,subject[,study_date,session]: BIDS labels instead of "
                             "PatientID and StudyDate")


@command("convert-dicom", "Convert every PET series of a DICOM folder into a BIDS dataset (dcm2niix).",
         convert_dicom_options, reads_configs=False,
         description="Convert every PET series (Modality PT) under a DICOM folder into a BIDS dataset (dcm2niix; "
                     "each slice's RescaleSlope/Intercept applied): sub-<PatientID>/ses-<StudyDate>/pet/"
                     "..._pet.nii.gz with its JSON sidecar. Other series (CT, MR, localisers) are skipped and listed.")
def convert_dicom_command(args) -> None:
    from petmonai.data import LABEL_COLUMN
    from petmonai.data.dicom import convert_dicom
    from petmonai.runs import setup_logging

    setup_logging(None)
    result = convert_dicom(args.dicom_dir, args.output, mapping=args.mapping, overwrite=args.overwrite)
    for item in result["converted"]:
        print(f"converted {item['series']} -> {args.output / item['file']}")
    for item in result["skipped"]:
        print(f"skipped {item['series']}: {item['reason']}")
    print(f"{len(result['converted'])} PET series converted, {len(result['skipped'])} other series skipped. "
          f"Add a '{LABEL_COLUMN}' column to {args.output / 'participants.tsv'} (or sessions.tsv) to train on it.")


def _renames(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise PetmonaiError(f"--rename '{pair}': expected OLD=NEW, e.g. --rename NC=CN")
        out[old.strip()] = new.strip()
    return out


def to_bids_options(parser) -> None:
    parser.add_argument("data_root", nargs="?", default=None, help="challenge-layout folder or CSV datalist")
    parser.add_argument("--synthetic", action="store_true", help="write the synthetic phantom cohort instead")
    options.add_output(parser, required=True, help="the BIDS dataset to write (new or empty folder)",
                       overwrite="replace an existing output folder")
    parser.add_argument("--tracer", default="FDG", help="trc- entity of every file (default FDG; '' for none)")
    parser.add_argument("--link", action="store_true", help="symbolic links to the source files instead of copies")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="write class OLD as NEW, e.g. --rename NC=CN --rename MCI=AD (repeatable)")
    options.add_set(parser, help="config entries for reading the source, e.g. --set data.classes=[CN,AD]")


@command("to-bids", "Write a challenge-layout cohort (or the synthetic phantoms) as a BIDS dataset.",
         to_bids_options,
         description="Write a cohort in the challenge layout (Train/<class>, Test) or a CSV datalist as a BIDS "
                     "dataset: subject from the header's db_name, one session per scan, the class in "
                     "sessions.tsv (n/a for Test), the site in participants.tsv. --synthetic writes the phantom "
                     "cohort (a template of the layout).")
def to_bids_command(args) -> None:
    from petmonai.config import default_config_path, load_config
    from petmonai.data import discover, generate_cohort, run_classes, write_bids
    from petmonai.runs import setup_logging

    setup_logging(None)
    if (args.data_root is None) == (not args.synthetic):
        raise PetmonaiError("give either DATA_ROOT or --synthetic")
    cfg = load_config(default_config_path(), args.overrides)
    read = {"classes": run_classes(cfg)}
    common = dict(tracer=args.tracer or None, rename=_renames(args.rename), overwrite=args.overwrite)
    if args.synthetic:
        with tempfile.TemporaryDirectory(prefix="petmonai-phantoms-") as tmp:
            root = generate_cohort(Path(tmp) / "phantoms", **cfg["data"]["synthetic"])
            out = write_bids(discover(root, **read), args.output, name="petmonai SYNTHETIC phantoms", **common)
    else:
        out = write_bids(discover(args.data_root, **read), args.output, link=args.link,
                         name=f"{Path(args.data_root).name} as BIDS", **common)
    print(f"wrote the BIDS dataset {out}")
