"""DICOM in (petmonai.data.dicom, ``convert-dicom``): synthetic PT series written with pydicom from the
package's phantoms, with per-slice rescale slopes, converted back; bad exports are one error, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from petmonai.commands import convert_dicom_main
from petmonai.data import discover_bids, make_phantom, write_pet_series
from petmonai.data.dicom import convert_dicom


def _oblique_affine() -> np.ndarray:
    """2.5 x 2.5 x 3.3 mm voxels, tilted 8 degrees about x, off-centre: a plain RAS diagonal would hide
    axis and sign errors."""
    a = np.radians(8.0)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([2.5, 2.5, 3.3])
    affine[:3, 3] = [-78.0, -95.0, -40.0]
    return affine


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    vol = make_phantom(0, mci=True, shape=(64, 72, 40), voxel_size=(2.5, 2.5, 3.3)) * 4000.0
    vol[:, :, 25:] *= 3.0  # slices of very different range: their rescale slopes differ threefold
    return vol.astype(np.float32), _oblique_affine()


@pytest.fixture(scope="module")
def export(phantom, tmp_path_factory) -> Path:
    """One patient: two PET studies (two dates) and a CT series to skip."""
    vol, affine = phantom
    root = tmp_path_factory.mktemp("dicom") / "export"
    write_pet_series(vol, affine, root / "study1" / "pet", patient_id="PAT-7", study_date="20230105",
                     series_number=3, institution="Hospital A")
    write_pet_series(vol * 0.9, affine, root / "study2" / "pet", patient_id="PAT-7", study_date="20240210",
                     series_number=5, institution="Hospital A")
    write_pet_series(vol, affine, root / "study1" / "ct", patient_id="PAT-7", study_date="20230105",
                     series_number=2, modality="CT")
    (root / "README.txt").write_text("not DICOM")
    return root


def _world(img: nib.Nifti1Image) -> nib.Nifti1Image:
    return nib.as_closest_canonical(img)


def test_series_carry_per_slice_slopes(export, phantom):
    """The export is the hard case: one slice's slope applied to another slice is far off."""
    files = sorted((export / "study1" / "pet").glob("*.dcm"))
    slopes = [float(pydicom.dcmread(f).RescaleSlope) for f in files]
    assert slopes[30] / slopes[20] > 2.5
    stored = pydicom.dcmread(files[30]).pixel_array.astype(np.float64).T
    truth = phantom[0][:, :, 30]
    assert np.abs(stored * slopes[30] - truth).max() <= slopes[30]                 # its own slope: exact
    assert np.abs(stored * slopes[20] - truth).max() > 0.5 * truth.max()           # another slice's: corrupt


def test_convert_dicom_matches_the_source_volume(export, phantom, tmp_path, capsys):
    vol, affine = phantom
    out = tmp_path / "bids"
    assert convert_dicom_main([str(export), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped series 2 'CT 2' (CT, 40 file(s) in study1/ct): modality CT, not PET" in printed
    first = out / "sub-PAT7" / "ses-20230105" / "pet" / "sub-PAT7_ses-20230105_trc-FDG_pet.nii.gz"
    second = out / "sub-PAT7" / "ses-20240210" / "pet" / "sub-PAT7_ses-20240210_trc-FDG_pet.nii.gz"
    assert first.is_file() and second.is_file()
    source = _world(nib.Nifti1Image(vol, affine))
    for path, scale in ((first, 1.0), (second, 0.9)):
        got = _world(nib.load(path))
        assert got.get_data_dtype() == np.float32  # slopes vary: float32, not one global int scaling
        np.testing.assert_allclose(got.affine, source.affine, atol=1e-3)
        step = scale * np.abs(vol).max() / 32767  # the coarsest slice's quantisation step
        assert np.abs(got.get_fdata() - scale * source.get_fdata()).max() <= step
    sidecar = json.loads(first.with_name(first.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Modality"] == "PT" and sidecar["InstitutionName"] == "Hospital A"
    assert sidecar["TracerName"] == "Fluorodeoxyglucose" and sidecar["Manufacturer"] == "petmonai"
    df = discover_bids(out, labels=False)
    assert list(df["session"]) == ["20230105", "20240210"] and set(df["subject"]) == {"sub-PAT7"}
    assert set(df["site"]) == {"Hospital A"} and set(df["tracer"]) == {"FDG"}


def test_mapping_file_names_subject_and_session(export, tmp_path):
    mapping = tmp_path / "ids.csv"
    mapping.write_text("patient_id,study_date,subject,session\nPAT-7,20230105,001,baseline\nPAT-7,20240210,001,m12\n")
    result = convert_dicom(export, tmp_path / "bids", mapping=mapping)
    assert [c["file"] for c in result["converted"]] == [
        "sub-001/ses-baseline/pet/sub-001_ses-baseline_trc-FDG_pet.nii.gz",
        "sub-001/ses-m12/pet/sub-001_ses-m12_trc-FDG_pet.nii.gz"]


def test_two_series_of_one_session_get_runs(phantom, tmp_path):
    vol, affine = phantom
    for n in (4, 6):
        write_pet_series(vol[::2, ::2], affine @ np.diag([2, 2, 1, 1]), tmp_path / "dcm" / str(n), patient_id="P1",
                         study_date="20220101", series_number=n)
    result = convert_dicom(tmp_path / "dcm", tmp_path / "bids")
    assert [Path(c["file"]).name for c in result["converted"]] == [
        "sub-P1_ses-20220101_trc-FDG_run-1_pet.nii.gz", "sub-P1_ses-20220101_trc-FDG_run-2_pet.nii.gz"]


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_no_pet_series_is_one_error(phantom, tmp_path, capsys):
    vol, affine = phantom
    write_pet_series(vol, affine, tmp_path / "dcm" / "ct", patient_id="P1", series_number=2, modality="CT")
    out = tmp_path / "bids"
    assert convert_dicom_main([str(tmp_path / "dcm"), "--output", str(out)]) == 2
    line = _one_error(capsys)
    assert "dcm: no PET series (Modality PT) to convert; found: series 2 'CT 2' (CT, 40 file(s) in ct)" in line
    assert not out.exists() and not list(tmp_path.glob(".bids*"))


def test_missing_slice_is_one_error(phantom, tmp_path, capsys):
    vol, affine = phantom
    write_pet_series(vol, affine, tmp_path / "dcm" / "pet", patient_id="P1", series_number=3, skip_slices=(17,))
    out = tmp_path / "bids"
    assert convert_dicom_main([str(tmp_path / "dcm"), "--output", str(out)]) == 2
    line = _one_error(capsys)
    assert "series 3 'PT 3' (PT, 39 file(s) in pet): uneven slice spacing (3.30-6.60 mm" in line
    assert not out.exists()
