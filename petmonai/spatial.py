"""Spatial normalisation: every scan registered to one brain template, then intensities as SUVR.

On the shared data head position, field of view and voxel grid differ by site, and every training
site holds one class. Registering each scan to a common template (affine, SimpleITK) puts every
brain on the same grid in the same place; a reference-region normalisation (SUVR: divide by the
mean uptake of the pons or cerebellum, regions spared in MCI/AD) then replaces scanner-specific
count scales. Both are MONAI dictionary transforms for the ``preprocess`` list of a config::

    - _target_: petmonai.spatial.RegisterToTemplated   # after Orientationd (and SmoothToResolutiond)
      keys: image
      voxel: 4.0
    - _target_: petmonai.spatial.ReferenceRegionNormalised
      keys: image
      region: pons
    - _target_: petmonai.spatial.MaskToTemplateBraind

The template is data-free (no leakage between folds): the MNI152 2009a grey- and white-matter
probability maps that ship inside nilearn, mixed 1 : 0.25 (FDG uptake of grey vs white matter)
and smoothed to PET resolution. A template image of your own in MNI space can replace it as the
registration target (``template.image`` in the config; :mod:`petmonai.study_template` builds one
from unlabeled scans). Registrations are cached on disk by content (see
:class:`RegisterToTemplate`), so each scan is registered once, whatever fold or run needs it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from petmonai.errors import DataError
from petmonai.runs import atomic_write_json, cache_root
from petmonai.transforms import source_file

# MNI mm ranges of the template grid: the whole brain and cerebellum with a margin
TEMPLATE_BOX_MM = ((-96.0, 96.0), (-130.0, 94.0), (-78.0, 114.0))
# Reference regions as MNI boxes, intersected with grey matter (cerebellum) or the brain (pons).
# Boxes, not an atlas: no atlas ships in a PyPI package, and at 4 mm a box inside the structure is
# what an atlas label would give after PET smoothing.
REGION_BOXES_MM = {
    "cerebellum": ((-40.0, 40.0), (-88.0, -48.0), (-58.0, -28.0)),
    "pons": ((-10.0, 10.0), (-36.0, -16.0), (-42.0, -24.0)),
}
WHITE_MATTER_UPTAKE = 0.25  # FDG: white matter takes up about a quarter of grey matter's glucose
FWHM_PER_SIGMA = 2.3548200450309493
# a template of your own must resemble the MNI FDG-like one this much inside the MNI brain (a study
# template built from the shared scans: 0.58; the MNI image flipped front to back: 0.16, upside down: -0.07)
MIN_TEMPLATE_MATCH = 0.3
_TEMPLATE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Template:
    """A brain template on a regular RAS grid: ``image`` (X, Y, Z), ``affine`` voxel -> MNI mm."""

    image: np.ndarray
    affine: np.ndarray
    grey: np.ndarray
    white: np.ndarray
    _masks: dict = field(default_factory=dict, compare=False, repr=False)  # brain/region masks, built once

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)

    def _cached(self, key, build) -> np.ndarray:
        if key not in self._masks:
            self._masks[key] = build()  # shared by every scan: never edit in place
        return self._masks[key]

    def brain(self, margin: int = 0) -> np.ndarray:
        """Voxels more likely brain tissue than not, grown by ``margin`` voxels."""
        def build():
            mask = (self.grey + self.white) > 0.5
            if margin > 0:
                from scipy import ndimage

                mask = ndimage.binary_dilation(mask, iterations=margin)
            return mask

        return self._cached(("brain", int(margin)), build)

    def region(self, name: str) -> np.ndarray:
        """Boolean mask of a named region: ``brain``, ``cerebellum`` or ``pons``."""
        if name == "brain":
            return self.brain()
        if name not in REGION_BOXES_MM:
            raise ValueError(f"unknown region {name!r}: choose brain, {', '.join(REGION_BOXES_MM)}")
        return self._cached(("region", name), lambda: self._box_region(name))

    def _box_region(self, name: str) -> np.ndarray:
        ijk = np.indices(self.shape).reshape(3, -1)
        xyz = (self.affine[:3, :3] @ ijk + self.affine[:3, 3:4]).reshape(3, *self.shape)
        box = np.ones(self.shape, bool)
        for axis, (lo, hi) in enumerate(REGION_BOXES_MM[name]):
            box &= (xyz[axis] >= lo) & (xyz[axis] <= hi)
        tissue = self.grey > 0.5 if name == "cerebellum" else self.brain()
        return box & tissue


def _grid_points(source_affine, grid_affine: np.ndarray, shape) -> np.ndarray:
    """(3, N) coordinates, in the voxels of a volume with ``source_affine``, of every voxel of the
    grid (``grid_affine``, ``shape``): what ``ndimage.map_coordinates`` samples the volume at."""
    to_source = np.linalg.inv(np.asarray(source_affine, np.float64)) @ grid_affine
    return to_source[:3, :3] @ np.indices(shape).reshape(3, -1) + to_source[:3, 3:4]


@lru_cache(maxsize=8)
def _mni_template(voxel: float, fwhm: float) -> Template:
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template
    from scipy import ndimage

    maps = []
    for loader in (load_mni152_gm_template, load_mni152_wm_template):
        img = loader(resolution=1)
        data = np.asarray(img.dataobj, dtype=np.float32)
        maps.append(data / max(float(data.max()), 1e-6))  # probabilities in [0, 1]
    src_affine = img.affine
    shape = [int(round((hi - lo) / voxel)) for lo, hi in TEMPLATE_BOX_MM]
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = [lo + voxel / 2 for lo, _ in TEMPLATE_BOX_MM]
    coords = _grid_points(src_affine, affine, shape)  # every template voxel in source (1 mm) voxels

    def sample(data):
        return ndimage.map_coordinates(data, coords, order=1, mode="constant").reshape(shape)

    grey, white = (sample(m) for m in maps)  # tissue probabilities: masks, regions, parcels
    # the PET-like image is smoothed on the 1 mm grid before sampling: sampling first would alias
    # (at 8 mm voxels real scans then matched it with correlations of only 0.13-0.39)
    pet = sample(ndimage.gaussian_filter(maps[0] + WHITE_MATTER_UPTAKE * maps[1], sigma=fwhm / FWHM_PER_SIGMA))
    brain = (grey + white) > 0.5
    pet = pet / pet[brain].mean()
    return Template(pet.astype(np.float32), affine, grey.astype(np.float32), white.astype(np.float32))


def mni_fdg_template(voxel: float = 4.0, fwhm: float = 8.0) -> Template:
    """An FDG-PET-like MNI152 template on a ``voxel`` mm grid (48 x 56 x 48 at 4 mm), smoothed to
    ``fwhm`` mm. Built from nilearn's packaged maps (no download); cached per process.

    >>> t = mni_fdg_template(4.0)  # doctest: +SKIP
    >>> t.shape, t.region("pons").sum() > 0  # doctest: +SKIP
    ((48, 56, 48), True)
    """
    if voxel <= 0 or fwhm < 0:
        raise ValueError("template voxel must be positive and fwhm not negative")
    with _TEMPLATE_LOCK:
        return _mni_template(float(voxel), float(fwhm))


def template_file_digest(path: str | Path) -> str:
    """SHA-1 of a template file's bytes (a registration cache key part); re-read only when the
    file's size or modification time changes."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        raise DataError(path, f"template file not found ({err.strerror})") from None
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def load_template(path: str | Path, voxel: float = 4.0, fwhm: float = 8.0) -> Template:
    """A brain FDG template of your own (a NIfTI in MNI space, e.g. a study template from
    ``scripts/build_template.py``) on the template grid of ``voxel`` mm: its image, scaled to a
    brain mean of 1, replaces the MNI FDG-like image as the registration target; the brain mask,
    reference regions and parcels stay MNI152's. Cached per process by file content.

    >>> t = load_template("study_template.nii.gz", voxel=6.0)  # doctest: +SKIP
    >>> t.shape  # doctest: +SKIP
    (32, 37, 32)
    """
    digest = template_file_digest(path)
    if voxel <= 0 or fwhm < 0:
        raise ValueError("template voxel must be positive and fwhm not negative")
    with _TEMPLATE_LOCK:
        return _load_template(str(Path(path).resolve()), digest, float(voxel), float(fwhm))


@lru_cache(maxsize=8)
def _load_template(path: str, digest: str, voxel: float, fwhm: float) -> Template:
    import nibabel as nib
    from scipy import ndimage

    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises several types for a file that is not NIfTI
        raise DataError(path, f"cannot read the template as NIfTI ({type(err).__name__}: {err})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"a template must be one 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(path, "the template has NaN or infinite voxels")
    mni = _mni_template(voxel, fwhm)
    brain = mni.brain()
    coords = _grid_points(img.affine, mni.affine, mni.shape)  # every template voxel in the file's voxels
    inside = np.all((coords > -0.5) & (coords < np.array(data.shape)[:, None] - 0.5), axis=0).reshape(mni.shape)
    covered = float(inside[brain].mean())
    if covered < 0.9:
        raise DataError(path, f"the template covers only {covered:.0%} of the MNI brain: it must be in MNI space "
                              "(world coordinates in MNI mm)")
    image = ndimage.map_coordinates(data, coords, order=1, mode="nearest").reshape(mni.shape)
    mean = float(image[brain].mean())
    if not mean > 0:
        raise DataError(path, f"the template has no uptake inside the MNI brain (mean {mean:.3g})")
    image = image / mean
    match = correlation(image, mni.image, brain)
    if match < MIN_TEMPLATE_MATCH:
        raise DataError(path, f"the template does not look like a brain FDG image in MNI space: correlation "
                              f"{match:.2f} < {MIN_TEMPLATE_MATCH} with the MNI FDG template inside its brain "
                              "(check orientation and affine)")
    return Template(image.astype(np.float32), mni.affine, mni.grey, mni.white)


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


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two volumes inside ``mask``: how well a scan matches the template."""
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0


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


def _check_grid(img, template: Template, what: str) -> None:
    if tuple(img.shape[1:]) != template.shape:
        raise DataError(source_file(img), f"{what} needs the volume on the template grid {template.shape} "
                                          f"(put RegisterToTemplated before it), got {tuple(img.shape[1:])}")


class ReferenceRegionNormalise(Transform):
    """SUVR: divide a registered volume by its mean uptake in a reference region of the template
    (``pons`` or ``cerebellum``, spared in MCI/AD; ``brain``: proportional scaling by the whole brain).

    >>> out = ReferenceRegionNormalise("pons")(registered)  # doctest: +SKIP
    """

    def __init__(self, region: str = "pons", voxel: float = 4.0, fwhm: float = 8.0):
        self.region_name, self.voxel, self.fwhm = region, float(voxel), float(fwhm)
        mni_fdg_template(self.voxel, self.fwhm).region(region)  # an unknown region fails when the config is built

    def __call__(self, img):
        template = mni_fdg_template(self.voxel, self.fwhm)
        _check_grid(img, template, "reference-region normalisation")
        mask = torch.as_tensor(template.region(self.region_name), device=img.device)
        mean = torch.as_tensor(img).float()[0][mask].mean()
        if not torch.isfinite(mean) or mean <= 0:
            raise DataError(source_file(img), f"no uptake in the {self.region_name} reference region "
                                              f"(mean {float(mean):.3g}): registration or scan is wrong")
        return img / mean


class ReferenceRegionNormalised(MapTransform):
    """Dictionary twin of :class:`ReferenceRegionNormalise`."""

    def __init__(self, keys: KeysCollection = "image", region: str = "pons", voxel: float = 4.0, fwhm: float = 8.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.normalise = ReferenceRegionNormalise(region, voxel, fwhm)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalise(d[key])
        return d


class MaskToTemplateBrain(Transform):
    """Zero a registered volume outside the template brain (grown by ``margin`` voxels): after
    registration the same voxels are kept for every scan, whatever the scanner's field of view."""

    def __init__(self, margin: int = 1, voxel: float = 4.0, fwhm: float = 8.0):
        self.margin, self.voxel, self.fwhm = int(margin), float(voxel), float(fwhm)

    def __call__(self, img):
        template = mni_fdg_template(self.voxel, self.fwhm)
        _check_grid(img, template, "the template brain mask")
        keep = torch.as_tensor(template.brain(self.margin), device=img.device)[None]
        return img * keep.to(img.dtype)


class MaskToTemplateBraind(MapTransform):
    """Dictionary twin of :class:`MaskToTemplateBrain`."""

    def __init__(self, keys: KeysCollection = "image", margin: int = 1, voxel: float = 4.0, fwhm: float = 8.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask = MaskToTemplateBrain(margin, voxel, fwhm)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.mask(d[key])
        return d


def template_parcels(n: int = 64, voxel: float = 4.0, fwhm: float = 8.0, grid=None, seed: int = 0) -> np.ndarray:
    """See :func:`_template_parcels`; cached per process (the k-means takes seconds)."""
    return _template_parcels(int(n), float(voxel), float(fwhm), None if grid is None else tuple(int(g) for g in grid),
                             int(seed))


@lru_cache(maxsize=16)
def _template_parcels(n: int, voxel: float, fwhm: float, grid, seed: int) -> np.ndarray:
    """Integer label map (0 = outside, 1..n) that splits the template's grey matter into ``n``
    compact parcels: k-means of the left hemisphere's voxel positions, mirrored to the right, so
    parcel ``k`` and ``k + n/2`` are left/right twins. Data-free (no fold can leak into it).
    ``grid``: pad/crop the map as ``ResizeWithPadOrCropd(spatial_size=grid)`` pads/crops the volumes.

    >>> labels = template_parcels(64)  # doctest: +SKIP
    >>> means = np.bincount(labels.ravel(), weights=volume.ravel()) / np.bincount(labels.ravel())  # doctest: +SKIP
    """
    from sklearn.cluster import KMeans

    if n < 2 or n % 2:
        raise ValueError(f"parcels come in left/right pairs: an even number >= 2, not {n}")
    t = mni_fdg_template(voxel, fwhm)
    ijk = np.argwhere(t.grey > 0.5)
    xyz = ijk @ t.affine[:3, :3].T + t.affine[:3, 3]
    left = xyz[:, 0] < 0
    centres = KMeans(n // 2, n_init=4, random_state=seed).fit(xyz[left]).cluster_centers_
    centres = np.concatenate([centres, centres * np.array([-1.0, 1.0, 1.0])])
    nearest = ((xyz[:, None, :] - centres[None]) ** 2).sum(-1)
    # a voxel takes the nearest parcel of its own hemisphere (the midline does not mix them)
    nearest[left, n // 2:] = np.inf
    nearest[~left, : n // 2] = np.inf
    labels = np.zeros(t.shape, np.int64)
    labels[tuple(ijk.T)] = nearest.argmin(1) + 1
    if grid is not None and tuple(grid) != t.shape:
        from monai.transforms import ResizeWithPadOrCrop

        labels = np.asarray(ResizeWithPadOrCrop(spatial_size=list(grid))(torch.as_tensor(labels)[None]))[0]
    return labels.astype(np.int64)  # shared (cached): never edit in place


def parcel_means(volume: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean of ``volume`` in each parcel 1..labels.max() (the region-level features)."""
    labels, volume = np.asarray(labels).ravel(), np.asarray(volume, np.float64).reshape(-1)
    if volume.size != labels.size:
        raise ValueError(f"volume of {volume.size} voxels on a parcel map of {labels.size}: not the template grid")
    n = int(labels.max())
    sums = np.bincount(labels, weights=volume, minlength=n + 1)[1:]
    counts = np.bincount(labels, minlength=n + 1)[1:]
    return sums / np.maximum(counts, 1)


class ParcelAverage(Transform):
    """Replace every grey-matter voxel of a registered volume by the mean of its parcel
    (:func:`template_parcels`) and zero the rest: the network sees regional uptake only, no
    voxel-scale texture (noise and reconstruction differ by scanner, not by diagnosis).

    >>> out = ParcelAverage(64)(registered)  # doctest: +SKIP
    """

    def __init__(self, n: int = 64, voxel: float = 4.0, fwhm: float = 8.0):
        self.n, self.voxel, self.fwhm = int(n), float(voxel), float(fwhm)

    def __call__(self, img):
        template = mni_fdg_template(self.voxel, self.fwhm)
        _check_grid(img, template, "parcel averaging")
        labels = template_parcels(self.n, self.voxel, self.fwhm, grid=img.shape[1:])
        means = parcel_means(torch.as_tensor(img).float().cpu().numpy()[0], labels)
        table = torch.as_tensor(np.concatenate([[0.0], means]), dtype=img.dtype, device=img.device)
        out = table[torch.as_tensor(labels, device=img.device)][None]
        return MetaTensor(out, meta=dict(img.meta)) if isinstance(img, MetaTensor) else out


class ParcelAveraged(MapTransform):
    """Dictionary twin of :class:`ParcelAverage`."""

    def __init__(self, keys: KeysCollection = "image", n: int = 64, voxel: float = 4.0, fwhm: float = 8.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.average = ParcelAverage(n, voxel, fwhm)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.average(d[key])
        return d


def find_registration(preprocess) -> RegisterToTemplate | None:
    """The :class:`RegisterToTemplate` inside a built ``preprocess`` pipeline, if it registers."""
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, RegisterToTemplated):
            return t.register
    return None


def on_grid(template_array: np.ndarray, grid) -> np.ndarray:
    """A template-grid array padded/cropped to ``grid`` as ``ResizeWithPadOrCropd`` does the volumes."""
    if tuple(grid) == template_array.shape:
        return template_array
    from monai.transforms import ResizeWithPadOrCrop

    return np.asarray(ResizeWithPadOrCrop(spatial_size=list(grid))(torch.as_tensor(template_array)[None]))[0]


def template_correlations(volumes: dict, register: RegisterToTemplate) -> dict[str, float]:
    """Per scan: correlation of the preprocessed (registered) volume with the template inside the
    template brain, at the template's resolution. The registration QC figure, and a property the
    audit checks: it must not separate the classes either."""
    from scipy import ndimage

    t = register.template
    grids: dict = {}  # the template on each volume grid, padded once
    out = {}
    for sid, vol in volumes.items():
        vol = np.asarray(vol, np.float32)[0]
        if vol.shape not in grids:
            grids[vol.shape] = (on_grid(t.image, vol.shape), on_grid(t.brain(), vol.shape).astype(bool))
        image, brain = grids[vol.shape]
        smooth = ndimage.gaussian_filter(vol, sigma=register.fwhm / FWHM_PER_SIGMA / register.voxel)
        out[sid] = correlation(smooth, image, brain)
    return out


def registration_montage(volumes: dict, register: RegisterToTemplate, path: str | Path,
                         correlations: dict | None = None, labels: dict | None = None) -> Path:
    """One PNG to check every registration by eye: the template, then each registered scan in three
    planes through the template centre, with the template brain outline drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = register.template
    first = np.asarray(next(iter(volumes.values())))[0]
    image, brain = on_grid(t.image, first.shape), on_grid(t.brain(), first.shape).astype(float)
    cx, cy, cz = (np.argwhere(brain > 0).mean(axis=0)).round().astype(int)
    tiles = [("template", image)] + [(sid, np.asarray(v)[0]) for sid, v in volumes.items()]
    cols = 6
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols * 3, figsize=(cols * 3 * 1.1, rows * 1.3))
    axes = np.atleast_2d(axes)
    for ax in axes.flat:
        ax.axis("off")
    for i, (name, vol) in enumerate(tiles):
        r, c = divmod(i, cols)
        vmax = float(np.percentile(vol[brain > 0], 99)) or 1.0
        for j, (sl, outline) in enumerate(((vol[:, :, cz], brain[:, :, cz]), (vol[:, cy, :], brain[:, cy, :]),
                                            (vol[cx, :, :], brain[cx, :, :]))):
            ax = axes[r, c * 3 + j]
            ax.imshow(sl.T, origin="lower", cmap="gray", vmin=0, vmax=vmax)
            ax.contour(outline.T, levels=[0.5], colors="tab:red", linewidths=0.4)
        title = name
        if correlations and name in correlations:
            title += f" r={correlations[name]:.2f}"
        if labels and name in labels:
            title += f" ({labels[name]})"
        axes[r, c * 3 + 1].set_title(title, fontsize=6)
    target = register.template_image.name if register.template_image is not None else "the MNI FDG template"
    fig.suptitle(f"Registration to {target} (red: template brain outline)", fontsize=9)
    fig.tight_layout()
    fig.set_dpi(90)
    from petmonai.report import save_figure

    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


__all__ = ["Template", "template_parcels", "ParcelAverage", "ParcelAveraged", "find_registration", "template_correlations", "registration_montage", "parcel_means", "mni_fdg_template", "load_template", "template_file_digest", "RegisterToTemplate", "RegisterToTemplated", "ReferenceRegionNormalise",
           "ReferenceRegionNormalised", "MaskToTemplateBrain", "MaskToTemplateBraind", "correlation",
           "default_cache_dir", "TEMPLATE_BOX_MM", "REGION_BOXES_MM"]
