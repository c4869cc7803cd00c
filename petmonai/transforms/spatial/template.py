"""Registration targets: the data-free MNI FDG-like template, or a template of your own."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from petmonai.errors import DataError
from petmonai.transforms.base import FWHM_PER_SIGMA

# MNI mm ranges of the template grid: the whole brain and cerebellum with a margin
TEMPLATE_BOX_MM = ((-96.0, 96.0), (-130.0, 94.0), (-78.0, 114.0))


WHITE_MATTER_UPTAKE = 0.25  # FDG: white matter takes up about a quarter of grey matter's glucose




# a template of your own must resemble the MNI FDG-like one this much inside the MNI brain (a study
# template built from the shared scans: 0.58; the MNI image flipped front to back: 0.16, upside down: -0.07)
MIN_TEMPLATE_MATCH = 0.3


_TEMPLATE_LOCK = threading.Lock()


# Reference regions as MNI boxes, intersected with grey matter (cerebellum) or the brain (pons).
# Boxes, not an atlas: no atlas ships in a PyPI package, and at 4 mm a box inside the structure is
# what an atlas label would give after PET smoothing.
REGION_BOXES_MM = {
    "cerebellum": ((-40.0, 40.0), (-88.0, -48.0), (-58.0, -28.0)),
    "pons": ((-10.0, 10.0), (-36.0, -16.0), (-42.0, -24.0)),
}


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two volumes inside ``mask``: how well a scan matches the template."""
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0


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


def on_grid(template_array: np.ndarray, grid) -> np.ndarray:
    """A template-grid array padded/cropped to ``grid`` as ``ResizeWithPadOrCropd`` does the volumes."""
    if tuple(grid) == template_array.shape:
        return template_array
    from monai.transforms import ResizeWithPadOrCrop

    return np.asarray(ResizeWithPadOrCrop(spatial_size=list(grid))(torch.as_tensor(template_array)[None]))[0]
