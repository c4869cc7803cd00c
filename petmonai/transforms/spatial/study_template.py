"""A study FDG template: the mean of your own scans after registration to the MNI FDG template.

petmonai's default registration target is built from MNI152 tissue maps (grey matter + 0.25 x
white matter, smoothed): real FDG scans correlate with it at ~0.5 after registration, because
real uptake differs (cerebellum, thalamus, striatum). A study template averages real scans once
they are registered to it, so it has real FDG contrast and stays in MNI space; registering to it
lines scans up on what they share (the shared Train scans then match their target at ~0.88).

Build it from **unlabeled** scans (no labels are read): the challenge's Test folder, or a
hospital's archive. Built from scans outside the cross-validation, no held-out scan shapes
the preprocessing of a fold::

    python scripts/build_template.py --input ../shared/data/pet2023/Test --output templates/study.nii.gz --skip-bad
    python scripts/train3d.py --data-root ../shared/data/pet2023 --set template.image=templates/study.nii.gz

The template is derived from patient scans: keep it with the data, never in a repository.
"""

from __future__ import annotations

import gzip
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose

from petmonai.data import describe_failure, is_nifti, list_nifti
from petmonai.errors import DataError, PetmonaiError
from petmonai.runs import atomic_write_bytes, atomic_write_json, get_logger, versions
from petmonai.transforms.spatial.registration import RegisterToTemplated, correlation
from petmonai.transforms.spatial.template import template_file_digest

log = get_logger("template")


MIN_SCANS = 5           # fewer scans make a template of one person's anatomy and noise


NIFTI_XFORM_MNI_152 = 4  # the header's code for "world coordinates are MNI152 mm"


@dataclass
class StudyTemplate:
    """The mean registered scan (brain mean 1) on the template grid, and what went into it."""

    image: np.ndarray                 # (X, Y, Z) float32
    affine: np.ndarray                # template voxel -> MNI mm (RAS)
    used: list[str]
    skipped: list[dict] = field(default_factory=list)        # {"image", "problem"}
    correlations: dict[str, float] = field(default_factory=dict)  # each used scan with the result

    def match(self) -> dict:
        """How well the scans that made the template match it: median and minimum correlation."""
        corr = np.array(list(self.correlations.values()))
        return {"median": float(np.median(corr)), "min": float(corr.min())}

    def nifti_bytes(self) -> bytes:
        """The template as (gzipped) NIfTI bytes with an MNI152 sform/qform; byte-identical for identical
        images (gzip without a time stamp), so the registration cache recognises a rebuilt template."""
        import nibabel as nib

        img = nib.Nifti1Image(self.image.astype(np.float32), self.affine)
        img.set_sform(self.affine, code=NIFTI_XFORM_MNI_152)
        img.set_qform(self.affine, code=NIFTI_XFORM_MNI_152)
        return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def template_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """The NIfTI files named by ``inputs`` (folders: their ``*.nii``/``*.nii.gz``, not recursive)."""
    files: list[Path] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            files.extend(list_nifti(entry))
        elif entry.is_file() and is_nifti(entry):
            files.append(entry)
        elif entry.exists():
            raise DataError(entry, "not a NIfTI file (*.nii or *.nii.gz)")
        else:
            raise DataError(entry, "no such file or folder")
    if not files:
        raise PetmonaiError(f"no NIfTI files in {', '.join(map(str, inputs))}")
    return sorted(set(files), key=lambda p: (str(p.parent), p.name))


def registration_steps(preprocess: Compose) -> tuple[Compose, RegisterToTemplated]:
    """The config's preprocessing up to and including its registration (reading, orientation,
    resolution harmonisation, registration): what a scan looks like on the template grid."""
    steps = list(getattr(preprocess, "transforms", []))
    for i, t in enumerate(steps):
        if isinstance(t, RegisterToTemplated):
            return Compose(steps[: i + 1]), t
    raise PetmonaiError("the config's preprocess list has no petmonai.transforms.spatial.registration.RegisterToTemplated: "
                        "a study template needs registered scans")


def _registered_scans(files: Sequence[Path], steps: Compose, brain: np.ndarray, skip_bad: bool):
    vols, used, skipped = [], [], []
    for path in files:
        try:
            image = np.asarray(torch.as_tensor(steps({"image": str(path)})["image"]).float())[0]
        except Exception as err:  # a MONAI-wrapped DataError, a damaged file, a failed registration
            problem = describe_failure(err)
            if not skip_bad:
                raise DataError(path, f"{problem} (--skip-bad leaves such scans out of the template)") from None
            log.warning("%s: skipped: %s", path, problem)
            skipped.append({"image": str(path), "problem": problem})
            continue
        mean = float(image[brain].mean())
        if not mean > 0:
            raise DataError(path, f"no uptake inside the template brain after registration (mean {mean:.3g})")
        vols.append(image / mean)  # proportional scaling: every scan weighs the same
        used.append(str(path))
    return vols, used, skipped


def build_study_template(files: Sequence[str | Path], cfg: dict, skip_bad: bool = False,
                         iterations: int = 1) -> StudyTemplate:
    """Register every file as ``cfg``'s preprocessing does, scale each to a brain mean of 1 and
    average them on the template grid. With ``iterations`` > 1 the scans are registered again to
    the previous mean and averaged again (each pass sharpens the template a little).

    >>> t = build_study_template(template_inputs(["Test/"]), load_config(), skip_bad=True)  # doctest: +SKIP
    >>> t.image.shape, len(t.used)  # doctest: +SKIP
    ((32, 37, 32), 78)
    """
    from petmonai.transforms.pipeline import build_pipelines

    if int(iterations) < 1:
        raise PetmonaiError(f"iterations must be at least 1, not {iterations}")
    files = [Path(f) for f in files]
    if len(files) < MIN_SCANS:
        raise PetmonaiError(f"a study template needs at least {MIN_SCANS} scans, got {len(files)}")
    steps, registration = registration_steps(build_pipelines(cfg)[0])
    register = registration.register
    with tempfile.TemporaryDirectory(prefix="petmonai-template-") as tmp:
        for it in range(int(iterations)):
            target = register.template
            vols, used, skipped = _registered_scans(files, steps, target.brain(), skip_bad)
            if len(vols) < MIN_SCANS:
                raise PetmonaiError(f"only {len(vols)} of {len(files)} scans registered; a study template needs "
                                    f"at least {MIN_SCANS}")
            image = np.mean(vols, axis=0).astype(np.float32)
            result = StudyTemplate(image, target.affine.copy(), used, skipped)
            log.info("template pass %d of %d: mean of %d registered scans (%d skipped)", it + 1, iterations,
                     len(used), len(skipped))
            if it + 1 < int(iterations):  # the next pass registers to this mean
                path = Path(tmp) / f"pass{it + 1}.nii.gz"
                path.write_bytes(result.nifti_bytes())
                register.template_image = path
    brain = target.brain()
    result.correlations = {p: correlation(v, result.image, brain) for p, v in zip(used, vols)}
    return result


def write_study_template(template: StudyTemplate, output: str | Path, cfg: dict, iterations: int) -> Path:
    """The template NIfTI (written to a temporary file, then renamed) and a JSON record beside it
    (``<output>.json``: the scans used and skipped, each scan's match, settings and versions)."""
    output = Path(output)
    if not output.name.endswith((".nii", ".nii.gz")):
        raise PetmonaiError(f"{output}: the template must be written as .nii or .nii.gz")
    data = template.nifti_bytes()
    if output.name.endswith(".nii"):
        data = gzip.decompress(data)
    atomic_write_bytes(output, data)
    atomic_write_json(output.with_name(output.name + ".json"), {
        "template": str(output),
        "sha1": template_file_digest(output),
        "space": "MNI152 (RAS mm), the petmonai template grid",
        "shape": list(template.image.shape),
        "voxel_mm": float(cfg["spacing"][0]),
        "iterations": int(iterations),
        "n_used": len(template.used),
        "used": template.used,
        "skipped": template.skipped,
        "correlation_with_template": {**template.match(), "per_scan": template.correlations},
        "template_config": cfg["template"],
        "versions": versions(),
    })
    return output
