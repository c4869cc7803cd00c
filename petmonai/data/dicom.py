"""DICOM in: every PET series of a folder converted into a BIDS dataset, one PET file and sidecar per series.

    >>> from petmonai.data.dicom import convert_dicom
    >>> result = convert_dicom("scanner_export/", "cohort_bids/")          # doctest: +SKIP
    >>> [c["file"] for c in result["converted"]], [s["series"] for s in result["skipped"]]  # doctest: +SKIP

Scanners export a series as one file per slice. PET slices often carry their own
``RescaleSlope``/``RescaleIntercept``: a reader that applies the first slice's scaling to all of them
silently corrupts the intensities. The voxels are converted by dcm2niix, the converter the field
uses (PET2BIDS builds on it; it ships as a binary inside its PyPI package), which applies each
slice's scaling (float32 where it varies) and writes the BIDS sidecar. petmonai around it:

- reads the headers (pydicom) and groups the files by series; every series that is not PET
  (``Modality`` ``PT``: CT, MR, localisers...) is skipped and listed;
- checks each PET series' slices: one orientation and image size, evenly spaced positions along the
  slice normal (a missing slice is an error naming the series, not a silently stretched volume);
- names the output by BIDS: subject from ``PatientID``, session from ``StudyDate``
  (``sub-<PatientID>/ses-<YYYYMMDD>/pet/sub-..._ses-..._trc-<tracer>_pet.nii.gz``), unless a mapping
  file gives them; two PET series of one session get ``run-1``, ``run-2``;
- completes the sidecar from the headers (``Manufacturer``, ``ManufacturersModelName``,
  ``InstitutionName``, ``TracerName``; the site petmonai reads) and writes ``dataset_description.json``
  and ``participants.tsv`` (add the ``diagnosis`` column before training);
- writes everything into a temporary folder beside the output and renames it at the end: on any
  error nothing is left behind.

:func:`write_pet_series` writes a volume as such a series (per-slice scaling, int16), for tests and
for checking a pipeline end to end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from petmonai.data.bids import BIDS_VERSION, bids_label, sidecar_path
from petmonai.errors import DataError, PetmonaiError
from petmonai.runs import (
    atomic_write_json,
    atomic_write_text,
    get_logger,
    refuse_nonempty_folder,
    staged_folder,
)

log = get_logger("dicom")

PET_MODALITY = "PT"

SPACING_TOLERANCE = 0.01
"""Slice gaps may differ from their median by this fraction (of the median) before a series counts as uneven."""

TRACER_LABELS = {"fluorodeoxyglucose": "FDG", "fludeoxyglucose": "FDG", "18ffdg": "FDG", "fdg": "FDG",
                 "florbetapir": "AV45", "florbetaben": "FBB", "flutemetamol": "FMM", "pittsburghcompoundb": "PiB",
                 "pib": "PiB", "flortaucipir": "AV1451"}
"""BIDS ``trc-`` labels of common tracer names (``Radiopharmaceutical``); others: the name's letters and digits."""


@dataclass
class Series:
    """One DICOM series: its files and the header facts conversion needs."""

    uid: str
    files: list[Path] = field(default_factory=list)
    header: object = None        # the first file's pydicom dataset (no pixels)
    headers: list = field(default_factory=list)  # every file's, in the order of files (read once, by find_series)

    def tag(self, name: str, default: str = "") -> str:
        value = getattr(self.header, name, None)
        return default if value is None or str(value).strip() == "" else str(value).strip()

    @property
    def modality(self) -> str:
        return self.tag("Modality").upper()

    @property
    def radiopharmaceutical(self) -> str:
        """The header's ``Radiopharmaceutical`` name, '' when it names none."""
        seq = getattr(self.header, "RadiopharmaceuticalInformationSequence", None)
        return str(getattr(seq[0], "Radiopharmaceutical", "") or "") if seq else ""

    def describe(self, root: Path) -> str:
        folders = sorted({str(f.parent.relative_to(root)) for f in self.files})
        return (f"series {self.tag('SeriesNumber', '?')} '{self.tag('SeriesDescription')}' ({self.modality or '?'}, "
                f"{len(self.files)} file(s) in {', '.join(folders[:2])}{' ...' if len(folders) > 2 else ''})")


def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - a dependency of petmonai
        raise PetmonaiError("DICOM needs pydicom: pip install pydicom") from None
    return pydicom


def find_series(folder: str | Path) -> list[Series]:
    """Every DICOM series under ``folder`` (recursive; files that are not DICOM are ignored), by series number."""
    pydicom = _pydicom()
    folder = Path(folder)
    if not folder.is_dir():
        raise PetmonaiError(f"{folder}: DICOM folder not found")
    series: dict[str, Series] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM (a README, a DICOMDIR without images...): not ours to convert
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid or not hasattr(ds, "Rows"):  # no image (a DICOMDIR, a structured report...)
            continue
        entry = series.setdefault(uid, Series(uid, header=ds))
        entry.files.append(path)
        entry.headers.append(ds)
    return sorted(series.values(), key=lambda s: (_int(s.tag("SeriesNumber")), s.uid))


def _int(text: str, default: int = 10**9) -> int:
    try:
        return int(float(text))
    except ValueError:
        return default


def check_slices(series: Series, root: Path) -> None:
    """One orientation and image size, and evenly spaced slice positions; :class:`DataError` naming the series."""
    pydicom = _pydicom()
    where = Path(root) / series.files[0].parent.relative_to(root)
    if len(series.files) == 1:
        return  # one file: an enhanced multi-frame object, whose frames dcm2niix orders
    heads = (series.headers if len(series.headers) == len(series.files)  # as find_series read them
             else [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files])
    try:
        iop = np.array([[float(v) for v in h.ImageOrientationPatient] for h in heads])
        ipp = np.array([[float(v) for v in h.ImagePositionPatient] for h in heads])
    except (AttributeError, ValueError, TypeError):
        raise DataError(where, f"{series.describe(root)}: a slice lacks ImageOrientationPatient or "
                               "ImagePositionPatient; cannot order the slices") from None
    if np.abs(iop - iop[0]).max() > 1e-4 or len({(int(h.Rows), int(h.Columns)) for h in heads}) > 1:
        raise DataError(where, f"{series.describe(root)}: slices of different orientation or size in one series")
    normal = np.cross(iop[0, :3], iop[0, 3:])
    positions = np.sort(ipp @ normal)
    gaps = np.diff(positions)
    median = float(np.median(gaps))
    if median <= 0 or np.abs(gaps - median).max() > SPACING_TOLERANCE * median:
        worst = int(np.argmax(np.abs(gaps - median)))
        raise DataError(where, f"{series.describe(root)}: uneven slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm "
                               f"between neighbours, median {median:.2f} mm; e.g. {gaps[worst]:.2f} mm after the "
                               f"slice at {positions[worst]:.1f} mm): missing or duplicate slices; re-export the "
                               "whole series")


def tracer_label(series: Series) -> str:
    """The ``trc-`` label of a series' radiopharmaceutical, '' when the header names none."""
    name = series.radiopharmaceutical
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return TRACER_LABELS.get(key, re.sub(r"[^A-Za-z0-9]", "", name)) if key else ""


def read_mapping(path: str | Path) -> dict[tuple[str, str], tuple[str, str]]:
    """A mapping file (CSV or TSV): ``patient_id,subject`` and optionally ``study_date,session`` per row;
    ``(patient_id, study_date or '')`` -> ``(subject, session or '')``. Errors name the file and row."""
    path = Path(path)
    try:
        table = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    except Exception as err:  # pandas raises several types for a malformed table
        raise DataError(path, f"not a readable CSV/TSV mapping ({type(err).__name__}: {err})") from None
    missing = {"patient_id", "subject"} - set(table.columns)
    if missing:
        raise DataError(path, f"missing column(s) {sorted(missing)}; a mapping has patient_id,subject"
                              "[,study_date,session]")
    out = {}
    for i, rec in table.iterrows():
        key = (rec["patient_id"].strip(), rec.get("study_date", "").strip())
        if key in out:
            raise DataError(path, f"row {i + 2}: patient {key[0]} (date '{key[1]}') is mapped twice")
        sub = re.sub(r"^sub-", "", rec["subject"].strip())
        ses = re.sub(r"^ses-", "", rec.get("session", "").strip())
        try:
            out[key] = (bids_label(sub), bids_label(ses) if ses else "")
        except PetmonaiError as err:
            raise DataError(path, f"row {i + 2}: {err}") from None
    return out


def bids_entities(series: Series, mapping: dict) -> tuple[str, str]:
    """``(subject, session)`` labels of a series: from the mapping, else PatientID and StudyDate."""
    patient, date = series.tag("PatientID"), series.tag("StudyDate")
    if (patient, date) in mapping or (patient, "") in mapping:
        sub, ses = mapping.get((patient, date)) or mapping[(patient, "")]
        if not ses and date:
            ses = bids_label(date)
        return sub, ses
    if not patient:
        raise PetmonaiError(f"{series.describe(Path('/'))}: no PatientID; give a mapping file (--mapping)")
    return bids_label(patient), bids_label(date) if date else ""


def plan_names(pet: list[Series], mapping: dict) -> list[tuple[Series, str]]:
    """Every PET series with its BIDS file stem; series sharing subject, session and tracer get ``run-<n>``."""
    keyed = []
    for s in pet:
        sub, ses = bids_entities(s, mapping)
        keyed.append((s, sub, ses, tracer_label(s)))
    counts: dict[tuple, int] = {}
    for _, sub, ses, trc in keyed:
        counts[(sub, ses, trc)] = counts.get((sub, ses, trc), 0) + 1
    seen: dict[tuple, int] = {}
    out = []
    for s, sub, ses, trc in keyed:
        key = (sub, ses, trc)
        seen[key] = seen.get(key, 0) + 1
        stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + (f"_trc-{trc}" if trc else "")
        stem += f"_run-{seen[key]}" if counts[key] > 1 else ""
        folder = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + "pet"
        out.append((s, f"{folder}/{stem}_pet"))
    return out


def dcm2niix_binary() -> str:
    try:
        import dcm2niix

        return str(dcm2niix.bin)
    except ImportError:  # pragma: no cover - a dependency of petmonai
        found = shutil.which("dcm2niix")
        if found is None:
            raise PetmonaiError("DICOM conversion needs dcm2niix: pip install dcm2niix") from None
        return found


def run_dcm2niix(series: Series, root: Path, work: Path) -> tuple[Path, dict]:
    """Convert one series with dcm2niix (its files alone, linked into ``work``); returns the NIfTI and sidecar."""
    src, out = work / "in", work / "out"
    src.mkdir(parents=True)
    out.mkdir()
    for i, f in enumerate(series.files):
        os.symlink(f.resolve(), src / f"{i:05d}.dcm")
    proc = subprocess.run([dcm2niix_binary(), "-b", "y", "-z", "y", "-f", "series", "-o", str(out), str(src)],
                          capture_output=True, text=True)
    images = sorted(out.glob("*.nii.gz"))
    if proc.returncode != 0 or len(images) != 1:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(root / series.files[0].parent.relative_to(root),
                        f"{series.describe(root)}: dcm2niix made {len(images)} image(s) instead of one "
                        f"(exit {proc.returncode}; {' | '.join(detail)})")
    side = sidecar_path(images[0])
    sidecar = json.loads(side.read_text()) if side.is_file() else {}
    return images[0], sidecar


def complete_sidecar(sidecar: dict, series: Series) -> dict:
    """dcm2niix's sidecar with the header facts petmonai and PET-BIDS read added where it left them out."""
    extra = {"Modality": series.modality, "Manufacturer": series.tag("Manufacturer"),
             "ManufacturersModelName": series.tag("ManufacturerModelName"),
             "InstitutionName": series.tag("InstitutionName"), "Units": series.tag("Units"),
             "TracerName": series.radiopharmaceutical}
    out = dict(sidecar)
    for key, value in extra.items():
        if value and not out.get(key):
            out[key] = value
    out["SeriesInstanceUID"] = series.uid
    return out


def convert_dicom(dicom_dir: str | Path, output: str | Path, mapping: str | Path | None = None,
                  overwrite: bool = False) -> dict:
    """Convert every PET series under ``dicom_dir`` into the BIDS dataset ``output`` (see the module
    docstring). Returns ``{"converted": [{"series", "file"}], "skipped": [{"series", "reason"}]}``.

    A folder without PET series, a PET series with uneven slices or one dcm2niix cannot make into a
    single image is an error naming it; nothing is written then."""
    root, output = Path(dicom_dir), Path(output)
    refuse_nonempty_folder(output, overwrite)
    all_series = find_series(root)
    pet = [s for s in all_series if s.modality == PET_MODALITY]
    skipped = [{"series": s.describe(root), "reason": f"modality {s.modality or 'unknown'}, not PET"}
               for s in all_series if s.modality != PET_MODALITY]
    if not pet:
        found = "; ".join(s["series"] for s in skipped) or "no DICOM image file at all"
        raise DataError(root, f"no PET series (Modality PT) to convert; found: {found}")
    for s in pet:
        check_slices(s, root)
    names = plan_names(pet, read_mapping(mapping) if mapping else {})
    with staged_folder(output) as staging:
        converted = _convert_all(names, root, staging)
        _write_dataset_files(staging, converted, root)
    for s in skipped:
        log.info("skipped %s: %s", s["series"], s["reason"])
    log.info("converted %d PET series into %s (%d other series skipped)", len(converted), output, len(skipped))
    return {"converted": converted, "skipped": skipped}


def _convert_all(names: list[tuple[Series, str]], root: Path, staging: Path) -> list[dict]:
    converted = []
    with tempfile.TemporaryDirectory(prefix="petmonai-dcm2niix-") as work:
        for i, (series, stem) in enumerate(names):
            image, sidecar = run_dcm2niix(series, root, Path(work) / str(i))
            target = staging / f"{stem}.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(image), target)
            atomic_write_json(staging / f"{stem}.json", complete_sidecar(sidecar, series))
            converted.append({"series": series.describe(root), "file": f"{stem}.nii.gz",
                              "subject": stem.split("/")[0]})
    return converted


def _write_dataset_files(staging: Path, converted: list[dict], root: Path) -> None:
    atomic_write_json(staging / "dataset_description.json", {
        "Name": f"PET converted from {root.name}", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "GeneratedBy": [{"Name": "petmonai convert-dicom", "Description": "dcm2niix, one PET file per series"}]})
    subjects = sorted({c["subject"] for c in converted})
    atomic_write_text(staging / "participants.tsv", pd.DataFrame({"participant_id": subjects}).to_csv(
        sep="\t", index=False))


def write_pet_series(volume: np.ndarray, affine: np.ndarray, folder: str | Path, *, patient_id: str,
                     study_date: str = "20240101", series_number: int = 1, modality: str = PET_MODALITY,
                     tracer: str = "Fluorodeoxyglucose", per_slice_scaling: bool = True, study_uid: str | None = None,
                     manufacturer: str = "petmonai", model: str = "synthetic", institution: str = "",
                     skip_slices=()) -> list[Path]:
    """Write a 3D volume (RAS ``affine``, world mm) as a DICOM series, one file per slice along its third axis.

    Stored as int16 with each slice's own ``RescaleSlope`` (``per_slice_scaling``; else one slope for the
    volume), as PET scanners do; ``skip_slices`` leaves slices out (a broken export). Returns the files."""
    pydicom = _pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.asarray(volume, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)  # DICOM patient space is LPS
    zooms = np.linalg.norm(lps[:3, :3], axis=0)
    series_uid, study_uid, frame_uid = generate_uid(), study_uid or generate_uid(), generate_uid()
    global_slope = max(float(np.abs(volume).max()), 1e-12) / 32767
    written = []
    for k in range(volume.shape[2]):
        if k in set(skip_slices):
            continue
        plane = volume[:, :, k].T  # DICOM rows follow the second axis, columns the first
        slope = max(float(np.abs(plane).max()), 1e-12) / 32767 if per_slice_scaling else global_slope
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.128"  # PET image storage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.Modality, ds.PatientID, ds.PatientName, ds.StudyDate = modality, patient_id, patient_id, study_date
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series_uid, study_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = series_number, k + 1, f"{modality} {series_number}"
        ds.Manufacturer, ds.ManufacturerModelName, ds.InstitutionName = manufacturer, model, institution
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0.0, 0.0, k, 1.0])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in np.r_[lps[:3, 0] / zooms[0], lps[:3, 1] / zooms[1]]]
        ds.PixelSpacing, ds.SliceThickness = [float(zooms[1]), float(zooms[0])], float(zooms[2])
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.Units = f"{slope:.10g}", "0", "BQML"
        if modality == PET_MODALITY and tracer:
            info = Dataset()
            info.Radiopharmaceutical = tracer
            ds.RadiopharmaceuticalInformationSequence = [info]
        ds.PixelData = np.round(plane / float(f"{slope:.10g}")).astype("<i2").tobytes()
        path = folder / f"{series_number:03d}_{k + 1:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        written.append(path)
    return written
