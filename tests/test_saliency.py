"""Grad-CAM maps of the fold ensemble, mapped back onto the input volume (petmonai.inference.saliency)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from petmonai.errors import PetmonaiError
from petmonai.inference import collect_inputs, load_run, output_paths, predict, preprocess_file
from petmonai.inference import gradcam_maps, resample_to_input
from test_inference import tiny_run_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def saliency_run(tiny, tmp_path_factory):
    run_dir, cohort = tiny
    out = tmp_path_factory.mktemp("saliency") / "submission.csv"
    files = [cohort / "Test" / "3.nii.gz", cohort / "Test" / "4.nii.gz"]
    result = predict(run_dir, files, out, saliency=True, options={"threads": 1, "flips": "lr"})
    return result, out, files


def test_gradcam_nifti_has_the_input_grid(saliency_run):
    result, out, files = saliency_run
    for path in files:
        uuid = path.name.split(".")[0]
        ref = nib.load(str(path))
        cam = nib.load(str(result.paths["saliency"] / f"{uuid}_gradcam.nii.gz"))
        assert cam.shape == ref.shape  # (128, 128, Z, 1), as the input file
        np.testing.assert_allclose(cam.affine, ref.affine, atol=1e-5)
        assert cam.header.get_data_dtype() == np.dtype("<f4")
        data = cam.get_fdata()
        assert np.isfinite(data).all() and data.min() >= 0 and data.max() == pytest.approx(1.0, abs=1e-6)
        # the map lies inside the head: nothing where the PET is background
        pet = np.asarray(ref.dataobj, dtype=np.float32)
        assert data[pet < 0.05 * pet.max()].max() == 0
    prov = json.loads(result.paths["provenance"].read_text())
    # the run's network is a `_target_` entry of its own: Grad-CAM targets its last spatial convolution
    assert prov["saliency"]["files"] == 4 and prov["saliency"]["target_layer"] == "layer4.0.conv2"


def test_montage_png(saliency_run):
    result, out, files = saliency_run
    for path in files:
        png = result.paths["saliency"] / f"{path.name.split('.')[0]}_gradcam.png"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        import matplotlib.image

        assert matplotlib.image.imread(str(png)).shape[1] > 600  # three panels side by side


def test_geometry_round_trip(tiny):
    """The preprocessed volume mapped back through both affines lies on the original PET."""
    run_dir, cohort = tiny
    run = load_run(run_dir, with_models=False)
    path = cohort / "Test" / "6.nii.gz"
    prep = preprocess_file(collect_inputs([path])[0], run)
    ref = nib.load(str(path))
    back = resample_to_input(prep.volume[0].numpy(), prep.affine, ref.affine, ref.shape)
    orig = np.asarray(ref.dataobj, dtype=np.float32).reshape(ref.shape[:3])
    inside = back > 0
    assert inside.mean() > 0.1
    assert np.corrcoef(back[inside], orig[inside])[0, 1] > 0.9
    # a one-voxel shift of the map would correlate clearly worse
    shifted = np.roll(back, 3, axis=0)
    assert np.corrcoef(shifted[inside], orig[inside])[0, 1] < np.corrcoef(back[inside], orig[inside])[0, 1]


def test_flipped_maps_and_unknown_layer(tiny):
    run_dir, cohort = tiny
    run = load_run(run_dir, {"threads": 1})
    prep = preprocess_file(collect_inputs([cohort / "Test" / "4.nii.gz"])[0], run)
    nets = [m.net for m in run.models]
    (plain,) = gradcam_maps(nets, [prep.volume], "layer4", [1], [(), (0,)])
    (mirror,) = gradcam_maps(nets, [torch.flip(prep.volume, [1])], "layer4", [1], [(), (0,)])
    np.testing.assert_allclose(mirror, plain[::-1], atol=1e-4)  # flips in the set: the map mirrors exactly
    assert plain.shape == tuple(prep.volume.shape[1:]) and plain.max() == pytest.approx(1.0)
    with pytest.raises(PetmonaiError, match="layer9"):
        gradcam_maps(nets, [prep.volume], "layer9", [1])


def test_saliency_outputs_need_overwrite(tiny, saliency_run):
    run_dir, _ = tiny
    result, out, files = saliency_run
    before = sorted(p.name for p in result.paths["saliency"].iterdir())
    with pytest.raises(PetmonaiError, match=r"submission\.saliency"):
        predict(run_dir, files[:1], out, saliency=True, options={"threads": 1})
    assert pd.read_csv(out)["uuid"].tolist() == [3, 4]
    assert sorted(p.name for p in result.paths["saliency"].iterdir()) == before
    # another prediction into the same folder gets a saliency folder of its own
    assert output_paths(out.parent / "again.csv", saliency=True)["saliency"] == out.parent / "again.saliency"
