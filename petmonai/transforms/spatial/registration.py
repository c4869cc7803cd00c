"""Spatial normalisation: every scan registered to one brain template, then intensities as SUVR.

On the shared data head position, field of view and voxel grid differ by site, and every training
site holds one class. Registering each scan to a common template (affine, SimpleITK) puts every
brain on the same grid in the same place; a reference-region normalisation (SUVR: divide by the
mean uptake of the pons or cerebellum, regions spared in MCI/AD) then replaces scanner-specific
count scales. Both are MONAI dictionary transforms for the ``preprocess`` list of a config::

    - _target_: petmonai.transforms.spatial.registration.RegisterToTemplated   # after Orientationd (and SmoothToResolutiond)
      keys: image
      voxel: 4.0
    - _target_: petmonai.transforms.spatial.normalise.ReferenceRegionNormalised
      keys: image
      region: pons
    - _target_: petmonai.transforms.spatial.normalise.MaskToTemplateBraind

The template is data-free (no leakage between folds): the MNI152 2009a grey- and white-matter
probability maps that ship inside nilearn, mixed 1 : 0.25 (FDG uptake of grey vs white matter)
and smoothed to PET resolution. A template image of your own in MNI space can replace it as the
registration target (``template.image`` in the config; :mod:`petmonai.transforms.spatial.study_template` builds one
from unlabeled scans). Registrations are cached on disk by content (see
:class:`RegisterToTemplate`), so each scan is registered once, whatever fold or run needs it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from petmonai.errors import DataError
from petmonai.runs import atomic_write_json, cache_root
from petmonai.transforms.base import FWHM_PER_SIGMA, source_file
from petmonai.transforms.spatial.template import (
    Template,
    correlation,
    load_template,
    mni_fdg_template,
    template_file_digest,
)


def _to_sitk(volume: np.ndarray, affine: np.ndarray):
    """A SimpleITK image of a RAS-affine volume (X, Y, Z); ITK's world is LPS."""
    import SimpleITK as sitk

    affine = np.asarray(affine, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = lps @ affine[:3, :3] / spacing
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume, np.float32).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction.flatten()])
    img.SetOrigin([float(v) for v in lps @ affine[:3, 3]])
    return img


def _from_sitk(img) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def _lps_matrix(tfm) -> np.ndarray:
    """4 x 4 matrix of an affine SimpleITK transform (any type, composites included), in ITK's LPS world."""
    origin = np.asarray(tfm.TransformPoint((0.0, 0.0, 0.0)))
    out = np.eye(4)
    out[:3, :3] = np.stack([np.asarray(tfm.TransformPoint(tuple(float(v) for v in e))) - origin
                            for e in np.eye(3)], axis=1)
    out[:3, 3] = origin
    return out


def _affine_transform(lps: np.ndarray):
    import SimpleITK as sitk

    tfm = sitk.AffineTransform(3)
    tfm.SetMatrix([float(v) for v in np.asarray(lps)[:3, :3].flatten()])
    tfm.SetTranslation([float(v) for v in np.asarray(lps)[:3, 3]])
    return tfm


def ras_matrix(tfm) -> np.ndarray:
    """4 x 4 RAS matrix of an affine SimpleITK transform (which maps template points to scan points
    in ITK's LPS world)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ _lps_matrix(tfm) @ flip


TRANSFORMS = ("rigid", "affine", "bspline")


def _affine_part(tfm):
    """The affine transform of a registration (the outer one of an affine + B-spline composite)."""
    import SimpleITK as sitk

    if isinstance(tfm, sitk.CompositeTransform):
        return tfm.GetNthTransform(0)
    return tfm


def _transform_to_json(tfm, kind: str) -> dict:
    """A registration as plain JSON: its affine matrix and, if deformable, the B-spline's parameters."""
    import SimpleITK as sitk

    record = {"lps_matrix": _lps_matrix(_affine_part(tfm)).tolist(), "transform": kind}
    if isinstance(tfm, sitk.CompositeTransform) and tfm.GetNumberOfTransforms() > 1:
        bspline = tfm.GetNthTransform(1)
        record["bspline_fixed"] = list(bspline.GetFixedParameters())
        record["bspline"] = list(bspline.GetParameters())
    return record


def _transform_from_json(record: dict):
    import SimpleITK as sitk

    tfm = _affine_transform(np.asarray(record["lps_matrix"]))
    if "bspline" not in record:
        return tfm
    bspline = sitk.BSplineTransform(3, 3)
    bspline.SetFixedParameters([float(v) for v in record["bspline_fixed"]])
    bspline.SetParameters([float(v) for v in record["bspline"]])
    return sitk.CompositeTransform([tfm, bspline])




def default_cache_dir() -> Path:
    """``$PETMONAI_CACHE/registration``, else ``~/.cache/petmonai/registration``."""
    return cache_root() / "registration"


MIN_CORRELATION = 0.23


"""Default of the registration check: at 6 mm the shared data's real scans correlate 0.247-0.64 with
the template, the same scans registered upside down at most 0.21 (docs/experiments.md)."""


class RegisterToTemplate(Transform):
    """Affine (or rigid, or deformable) registration of a PET volume to an MNI FDG template; returns
    the volume resampled on the template grid (``template.shape``), with an affine from template
    voxels to the points of the scanner's world they were sampled at.

    Mattes mutual information, a rigid stage then an affine stage, each over two resolution levels,
    and with ``transform="bspline"`` a cubic B-spline stage on top (``bspline_mesh`` control-grid
    cells per axis over the template's field of view: coarse, ~50 mm at the default 4; no point
    moves more than ``bspline_max_mm`` per axis beyond the affine fit),
    every voxel of the template brain in the metric (no random sampling, so a mirrored scan finds
    the mirrored transform) and one work unit per registration (the metric sums in one fixed
    order): the same input gives the same transform bit for bit, in any process on any run, and the
    cache makes later runs read it without optimising. The transform
    is cached in ``cache_dir`` (a small JSON per scan) under a hash of the input voxels, affine and
    settings, so the expensive part runs once per scan (written to a temporary file, then renamed). A registration
    whose result correlates below ``min_correlation`` with the template inside the brain is a
    :class:`DataError` naming the file: a failed registration is never fed to a model silently.
    ``template_image``: register to an FDG template of your own in MNI space instead
    (:func:`load_template`; e.g. a study template from ``scripts/build_template.py``).

    >>> from monai.data import MetaTensor
    >>> t = mni_fdg_template(4.0)  # doctest: +SKIP
    >>> img = MetaTensor(torch.as_tensor(t.image)[None], affine=torch.as_tensor(t.affine))  # doctest: +SKIP
    >>> RegisterToTemplate(voxel=4.0, cache_dir=None)(img).shape  # doctest: +SKIP
    torch.Size([1, 48, 56, 48])
    """

    def __init__(self, voxel: float = 4.0, fwhm: float = 8.0, transform: str = "affine",
                 cache_dir: str | Path | None = "default", min_correlation: float = MIN_CORRELATION,
                 iterations: int = 200, bspline_mesh: int = 4, bspline_max_mm: float = 8.0,
                 template_image: str | Path | None = None):
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)}, not {transform!r}")
        if int(bspline_mesh) < 1:
            raise ValueError(f"bspline_mesh must be a positive number of control-grid cells, not {bspline_mesh!r}")
        if not float(bspline_max_mm) > 0:
            raise ValueError(f"bspline_max_mm must be a positive displacement in mm, not {bspline_max_mm!r}")
        self.voxel, self.fwhm, self.transform = float(voxel), float(fwhm), transform
        self.bspline_mesh, self.bspline_max_mm = int(bspline_mesh), float(bspline_max_mm)
        self.cache_dir = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
        self.min_correlation, self.iterations = float(min_correlation), int(iterations)
        self.last_correlation: float | None = None
        self.template_image = Path(template_image) if template_image else None
        if self.template_image is not None:
            self.template  # a bad template file fails when the config is built, naming the file

    @property
    def template(self) -> Template:
        if self.template_image is not None:
            return load_template(self.template_image, self.voxel, self.fwhm)
        return mni_fdg_template(self.voxel, self.fwhm)

    def _key(self, volume: np.ndarray, affine: np.ndarray) -> str:
        h = hashlib.sha1()
        h.update(np.ascontiguousarray(volume, np.float32).tobytes())
        h.update(np.asarray(affine, np.float64).round(6).tobytes())
        settings = dict(voxel=self.voxel, fwhm=self.fwhm, transform=self.transform, iterations=self.iterations,
                        version=4)
        if self.transform == "bspline":  # only here, so affine and rigid cache entries stay valid
            settings.update(bspline_mesh=self.bspline_mesh, bspline_max_mm=self.bspline_max_mm)
        if self.template_image is not None:  # likewise: the MNI template's entries keep their keys
            settings.update(template_sha1=template_file_digest(self.template_image))
        h.update(json.dumps(settings, sort_keys=True).encode())
        return h.hexdigest()

    def register(self, volume: np.ndarray, affine: np.ndarray):
        """The SimpleITK transform mapping template points to points of ``volume`` (cached).

        The cache holds the transform as a 4 x 4 matrix in JSON, not an ITK transform file: ITK's
        file readers (HDF5) are not safe to call from the cache's loader threads."""
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"{self._key(volume, affine)}.json"
            if path.exists():
                try:
                    return _transform_from_json(json.loads(path.read_text()))
                except (ValueError, KeyError, OSError, TypeError, RuntimeError):
                    pass  # a damaged cache entry is recomputed and replaced
        record = _transform_to_json(self._optimise(volume, affine), self.transform)
        tfm = _transform_from_json(record)  # what the cache will give later runs, to the last digit
        if path is not None:
            try:
                atomic_write_json(path, record)
            except OSError as err:  # an unwritable cache costs time, not the run
                if not getattr(self, "_warned", False):
                    self._warned = True
                    warnings.warn(f"registration cache {self.cache_dir} not writable ({err.strerror}); every run "
                                  "will register again (set PETMONAI_CACHE or template.cache_dir)")
        return tfm

    def _optimise(self, volume: np.ndarray, affine: np.ndarray):
        import SimpleITK as sitk

        template = self.template
        fixed = _to_sitk(template.image, template.affine)
        moving = _to_sitk(volume, affine)
        # centre of mass of the bright part (the brain), not of background noise, starts the search
        bright = np.where(volume > 0.3 * np.percentile(volume, 99.5), volume, 0).astype(np.float32)
        start = sitk.CenteredTransformInitializer(fixed, _to_sitk(bright, affine), sitk.Euler3DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
        fixed_mask = _to_sitk(template.brain(margin=2).astype(np.float32), template.affine)
        fixed_mask = sitk.Cast(fixed_mask, sitk.sitkUInt8)

        def method():
            """Every stage's metric: Mattes MI over the template brain, two resolution levels."""
            reg = sitk.ImageRegistrationMethod()
            reg.SetNumberOfThreads(1)
            reg.SetNumberOfWorkUnits(1)  # one chunk: the metric's sums in one fixed order (deterministic)
            reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
            # every voxel of the (mirror-symmetric) template mask, not a random half: no sampling
            # noise, so a left-right mirrored scan registers to the mirrored transform
            reg.SetMetricSamplingStrategy(reg.NONE)
            reg.SetMetricFixedMask(fixed_mask)
            reg.SetInterpolator(sitk.sitkLinear)
            reg.SetShrinkFactorsPerLevel([2, 1])
            reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
            return reg

        def run(initial):
            reg = method()
            reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                         numberOfIterations=self.iterations,
                                                         relaxationFactor=0.5)
            reg.SetOptimizerScalesFromPhysicalShift()
            reg.SetInitialTransform(initial, inPlace=False)
            return reg.Execute(fixed, sitk.Cast(moving, sitk.sitkFloat32))

        rigid = run(start)
        if self.transform == "rigid":
            return rigid
        euler = sitk.Euler3DTransform(rigid.GetNthTransform(0))  # Execute returns a one-transform composite
        initial = sitk.AffineTransform(3)
        initial.SetCenter(euler.GetCenter())
        initial.SetMatrix(euler.GetMatrix())
        initial.SetTranslation(euler.GetTranslation())
        fitted = run(initial)
        if self.transform == "affine":
            return fitted
        affine_tfm = _affine_transform(_lps_matrix(fitted))
        # deformable: a cubic B-spline on a coarse control grid (bspline_mesh cells per axis over the
        # template's field of view, ~50 mm at 4 cells) refines the affine fit; coarse and bounded
        # (every control point moves at most bspline_max_mm per axis, so every point of the brain
        # does), because the scans are smoothed to ~9 mm: unbounded, mutual information pulled
        # parts of real brains 20-65 mm
        bspline = sitk.BSplineTransformInitializer(fixed, [self.bspline_mesh] * 3, order=3)
        reg = method()
        reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=self.iterations // 2,
                                 maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=1000,
                                 costFunctionConvergenceFactor=1e7,
                                 lowerBound=-self.bspline_max_mm, upperBound=self.bspline_max_mm)
        reg.SetMovingInitialTransform(affine_tfm)
        reg.SetInitialTransform(bspline, inPlace=True)
        reg.Execute(fixed, sitk.Cast(moving, sitk.sitkFloat32))
        return sitk.CompositeTransform([affine_tfm, bspline])  # template point -> B-spline -> affine -> scan

    def __call__(self, img):
        import SimpleITK as sitk

        name = source_file(img)
        affine = getattr(img, "affine", None)
        if affine is None:
            raise DataError(name, "no affine: put RegisterToTemplated before EnsureTyped(track_meta=false)")
        data = torch.as_tensor(img).float().cpu().numpy()
        if data.ndim != 4 or data.shape[0] != 1:
            raise DataError(name, f"registration needs one channel (1, X, Y, Z), got shape {tuple(data.shape)}")
        volume, affine = data[0], np.asarray(torch.as_tensor(affine).cpu(), np.float64)
        tfm = self.register(volume, affine)
        template = self.template
        fixed = _to_sitk(template.image, template.affine)
        out = _from_sitk(sitk.Resample(_to_sitk(volume, affine), fixed, tfm, sitk.sitkLinear, 0.0))
        # compare at the template's resolution: noise texture differs by scanner, not alignment
        from scipy import ndimage

        smooth = ndimage.gaussian_filter(out, sigma=self.fwhm / FWHM_PER_SIGMA / self.voxel)
        corr = correlation(smooth, template.image, template.brain())  # a local: cache threads share this object
        self.last_correlation = corr
        if corr < self.min_correlation:
            raise DataError(name, f"registration to the template failed: correlation {corr:.3f} "
                                  f"< {self.min_correlation:g} inside the template brain (check the scan's "
                                  "orientation and field of view)")
        meta = dict(getattr(img, "meta", {}) or {})
        meta.pop("affine", None)
        meta["registration_correlation"] = corr
        # the affine says where each template-grid voxel was sampled in the scanner's world, so a
        # map computed on this grid (Grad-CAM) resamples back onto the input file through affines only
        # (deformable: its affine part; the warp, at most bspline_max_mm per axis, is not followed back)
        world = ras_matrix(_affine_part(tfm)) @ template.affine
        return MetaTensor(torch.as_tensor(np.ascontiguousarray(out))[None], affine=torch.as_tensor(world), meta=meta)


class RegisterToTemplated(MapTransform):
    """Dictionary twin of :class:`RegisterToTemplate`."""

    def __init__(self, keys: KeysCollection = "image", voxel: float = 4.0, fwhm: float = 8.0,
                 transform: str = "affine", cache_dir: str | Path | None = "default", min_correlation: float = MIN_CORRELATION,
                 iterations: int = 200, bspline_mesh: int = 4, bspline_max_mm: float = 8.0,
                 template_image: str | Path | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.register = RegisterToTemplate(voxel, fwhm, transform, cache_dir, min_correlation, iterations,
                                           bspline_mesh, bspline_max_mm, template_image)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.register(d[key])
        return d
