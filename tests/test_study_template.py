"""A template of your own: loading it, registering to it, building a study template, runs that keep it."""

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from petmonai.commands import build_template_main, train3d_main
from petmonai.config import load_config
from petmonai.errors import ConfigError, DataError, PetmonaiError
from petmonai.transforms import RegisterToTemplate, correlation, load_template, mni_fdg_template
from petmonai.audit import find_registration
from petmonai.transforms import build_study_template, template_inputs, write_study_template
from petmonai.transforms import build_pipelines

REPO = Path(__file__).resolve().parents[1]


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return path


def brighter_cerebellum(voxel: float = 4.0) -> np.ndarray:
    """The MNI FDG-like image with real FDG's contrast in one respect: a bright cerebellum."""
    t = mni_fdg_template(voxel)
    return t.image * np.where(t.region("cerebellum"), 1.8, 1.0)


def test_a_template_file_replaces_the_mni_image_only(tmp_path):
    t = mni_fdg_template(4.0)
    path = save(tmp_path / "same.nii.gz", 3.0 * t.image, t.affine)  # any scale: the brain mean becomes 1
    own = load_template(path, 4.0)
    assert own.shape == t.shape and np.allclose(own.affine, t.affine)
    assert np.abs(own.image - t.image).max() < 1e-4
    assert np.array_equal(own.brain(), t.brain()) and np.array_equal(own.region("pons"), t.region("pons"))
    # on another grid it is resampled through its affine (world = MNI mm)
    coarse = load_template(path, 8.0)
    assert coarse.shape == mni_fdg_template(8.0).shape
    assert correlation(coarse.image, mni_fdg_template(8.0).image, coarse.brain()) > 0.95


def test_bad_template_files_are_named(tmp_path):
    t = mni_fdg_template(4.0)
    with pytest.raises(DataError, match="missing.nii.gz: template file not found"):
        load_template(tmp_path / "missing.nii.gz")
    (tmp_path / "text.nii.gz").write_text("not an image")
    with pytest.raises(DataError, match="text.nii.gz: cannot read the template as NIfTI"):
        load_template(tmp_path / "text.nii.gz")
    with pytest.raises(DataError, match="two.nii.gz: a template must be one 3D volume"):
        load_template(save(tmp_path / "two.nii.gz", np.stack([t.image, t.image], -1), t.affine))
    flipped = save(tmp_path / "flipped.nii.gz", t.image[:, ::-1, :], t.affine)  # front and back swapped
    with pytest.raises(DataError, match="flipped.nii.gz: the template does not look like a brain FDG image"):
        load_template(flipped)
    half = t.affine.copy()
    half[0, 3] += 60.0  # shifted 60 mm: not in MNI space
    with pytest.raises(DataError, match=r"shifted.nii.gz: the template covers only \d+% of the MNI brain"):
        load_template(save(tmp_path / "shifted.nii.gz", t.image[: t.shape[0] // 2], half))
    with pytest.raises(DataError, match="flipped.nii.gz"):  # when the config is built, not at the first scan
        RegisterToTemplate(template_image=flipped)


def test_registration_to_a_template_file(tmp_path):
    from test_spatial import moved_template

    t = mni_fdg_template(4.0)
    path = save(tmp_path / "own.nii.gz", brighter_cerebellum(), t.affine)
    img = moved_template(image=brighter_cerebellum())  # a scan with the template's own contrast
    cache = tmp_path / "cache"
    own = RegisterToTemplate(voxel=4.0, cache_dir=cache, template_image=path)
    out = own(img)
    assert tuple(out.shape) == (1, *t.shape)
    mni = RegisterToTemplate(voxel=4.0, cache_dir=cache)
    mni(img)
    # it undoes the motion, and the registration check compares with the template's own image
    assert correlation(out[0].numpy(), own.template.image, t.brain()) > 0.97
    assert own.last_correlation > mni.last_correlation + 0.05, (own.last_correlation, mni.last_correlation)
    assert len(list(cache.glob("*.json"))) == 2  # one cache entry per template: the file's content is in the key
    # another file with the same content shares the entry
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(path.read_bytes())
    again = RegisterToTemplate(voxel=4.0, cache_dir=cache, template_image=copy)(img)
    assert torch.equal(again, out) and len(list(cache.glob("*.json"))) == 2


def phantom_config(tmp_path, *extra) -> dict:
    return load_config(None, ["spacing=[8.0, 8.0, 8.0]", "spatial_size=[24, 28, 24]", "crop_size=[20, 24, 20]",
                              "template.min_correlation=0.1", f"template.cache_dir={tmp_path / 'cache'}", *extra])


def test_build_a_study_template_from_unlabeled_scans(tiny_cohort, tmp_path):
    cfg = phantom_config(tmp_path)
    files = template_inputs([tiny_cohort / "Train" / "NC", tiny_cohort / "Train" / "MCI"])
    assert len(files) == 12
    study = build_study_template(files, cfg)
    mni = mni_fdg_template(8.0)
    assert study.image.shape == mni.shape and np.allclose(study.affine, mni.affine)
    assert abs(float(study.image[mni.brain()].mean()) - 1.0) < 1e-4
    assert len(study.used) == 12 and not study.skipped and len(study.correlations) == 12
    out = write_study_template(study, tmp_path / "study.nii.gz", cfg, iterations=1)
    record = json.loads((tmp_path / "study.nii.gz.json").read_text())
    assert record["n_used"] == 12 and record["sha1"] and record["voxel_mm"] == 8.0
    assert not list(tmp_path.glob(".study*"))  # no temporary file left

    # the phantoms match a template built from phantoms better than the MNI one
    test_scan = {"image": str(tiny_cohort / "Test" / "2.nii.gz")}
    to_mni, _ = build_pipelines(cfg)
    to_study, _ = build_pipelines(phantom_config(tmp_path, f"template.image={out}"))
    r_mni, r_study = (find_registration(p) for p in (to_mni, to_study))
    to_mni(test_scan), to_study(test_scan)
    assert r_study.last_correlation > r_mni.last_correlation + 0.1, (r_mni.last_correlation, r_study.last_correlation)

    # a second pass registers to the first mean; the same input gives the same bytes (cache-friendly)
    twice = build_study_template(files, cfg, iterations=2)
    assert np.median(list(twice.correlations.values())) >= np.median(list(study.correlations.values())) - 0.02
    assert build_study_template(files, cfg).nifti_bytes() == study.nifti_bytes()


def test_study_template_input_errors(tiny_cohort, tmp_path):
    cfg = phantom_config(tmp_path)
    with pytest.raises(PetmonaiError, match="at least 5 scans"):
        build_study_template(template_inputs([tiny_cohort / "Test"]), cfg)
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        template_inputs([tmp_path / "nowhere"])
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    files = [*template_inputs([tiny_cohort / "Train" / "NC"]), bad]
    with pytest.raises(DataError, match="bad.nii.gz: .*--skip-bad"):
        build_study_template(files, cfg)
    study = build_study_template(files, cfg, skip_bad=True)
    assert len(study.used) == 6 and study.skipped[0]["image"] == str(bad)


def test_runs_keep_their_template_and_predict_with_it(tiny_cohort, tmp_path, fast_config, capsys):
    cfg = phantom_config(tmp_path)
    source = write_study_template(build_study_template(template_inputs([tiny_cohort / "Train" / "NC"]), cfg),
                                  tmp_path / "study.nii.gz", cfg, 1)
    # the script refuses to overwrite, in one line
    assert build_template_main(["--input", str(tiny_cohort / "Train" / "NC"), "--output", str(source)]) == 2
    assert "exists; use --overwrite" in capsys.readouterr().err

    run_dir = tmp_path / "run"
    args = ["--data-root", str(tiny_cohort), "--output-dir", str(run_dir), "--device", "cpu", "--seed", "0"]
    for override in [*fast_config, "train.max_epochs=1", "report.write=false", "report.reference_model=false",
                     "template.min_correlation=0.1", f"template.cache_dir={tmp_path / 'cache'}",
                     f"template.image={source}"]:
        args += ["--set", override]
    assert train3d_main(args) == 0
    copy = run_dir / "template.nii.gz"
    assert copy.read_bytes() == source.read_bytes()
    saved = load_config(run_dir / "config.yaml")
    assert saved["template"]["image"] == str(copy.resolve())
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["template_image_sha1"] == json.loads((tmp_path / "study.nii.gz.json").read_text())["sha1"]

    # the run predicts with its own copy after the source file is gone and the folder has moved
    source.unlink()
    moved = run_dir.rename(tmp_path / "moved_run")
    spec = importlib.util.spec_from_file_location("predict_script_template", REPO / "scripts" / "predict.py")
    predict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict)
    out = tmp_path / "sub.csv"
    assert predict.main(["--run-dir", str(moved), "--input", str(tiny_cohort / "Test"), "--output", str(out),
                         "--threads", "1"]) == 0
    assert len(pd.read_csv(out)) == 3


def test_a_template_the_preprocessing_would_ignore_is_an_error(tmp_path):
    t = mni_fdg_template(4.0)
    path = save(tmp_path / "own.nii.gz", brighter_cerebellum(), t.affine)
    # an experiment config inherits the default's registration stage, which passes the template on
    preprocess, _ = build_pipelines(load_config("experiments/register_suvr.yaml", [f"template.image={path}"]))
    assert any(getattr(getattr(t, "register", None), "template_image", None) is not None for t in preprocess.transforms)
    # a registration stage of its own that leaves it out would ignore it: an error
    cfg = load_config("experiments/register_suvr.yaml", [
        f"template.image={path}", "preprocess.resample={_target_: petmonai.transforms.RegisterToTemplated, keys: image}"])
    with pytest.raises(ConfigError, match="template.image is set .*`template_image"):
        build_pipelines(cfg)
