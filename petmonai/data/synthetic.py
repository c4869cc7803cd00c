"""Synthetic brain FDG-PET phantoms: a cohort that looks like the challenge data, made in seconds.

These are SYNTHETIC phantoms, not patient data. The demo and the tests use them when the real
data set is absent. A cohort is written in the 2023 brain-PET challenge layout::

    >>> import tempfile
    >>> from petmonai.data.synthetic import generate_cohort
    >>> folder = tempfile.TemporaryDirectory()  # e.g. "data/phantoms"
    >>> root = generate_cohort(folder.name + "/phantoms", n_nc=3, n_mci=3, n_test=2, seed=0)
    >>> sorted(p.name for p in root.iterdir())
    ['README.txt', 'Test', 'Train', 'synthetic_params.json', 'synthetic_truth.csv']
    >>> folder.cleanup()

``Train/NC/<n>.nii.gz``, ``Train/MCI/<n>.nii.gz`` and ``Test/<uuid>.nii.gz`` (``n``, ``uuid`` =
1, 2, ...), plus ``synthetic_truth.csv`` (one row per file, Test rows with their true class).

What a volume holds (world mm, RAS: x left->right, y posterior->anterior, z inferior->superior):
faint scalp, a low-uptake skull, an ellipsoidal brain whose white matter (uptake 1) lies inside a
6-8 mm cortical grey-matter shell (2.2-2.8 x white matter, with a low-frequency texture), medial
cortex along the interhemispheric fissure, thalamus and striatum (high), lateral and third
ventricles (very low), cerebellum (high, posterior-inferior) and brain stem. Every subject has
its own size (+-7 %), grey/white ratio, cortical texture and ventricle size; every scan its own
head position (a few degrees, a few mm), resolution, noise and intensity scale.

MCI lowers uptake smoothly (Gaussian profiles, sigma 14-21 mm) in the posterior cingulate /
precuneus and in both inferior parietal lobules (:data:`MCI_REGIONS`), by a per-subject
*severity* (25-40 % at the region centres for MCI, 0-4 % of NC), scaled by how grey the tissue
is (white matter loses half as much). The pattern survives resampling to 4 mm: the region/brain
uptake ratio separates the classes of the default cohort completely, while size, position,
grey/white ratio, texture, resolution and noise keep the volumes far from identical.

Acquisitions mimic the real files: shape ``(128, 128, Z, 1)`` with Z = 63 (2.40-2.54 mm slices)
or Z = 47 (3.20-3.40 mm slices), so the axial field of view is 150-160 mm; 2.0-2.6 mm in plane;
Gaussian resolution of 6-8 mm FWHM; Poisson-like noise (uint16 files also a little background
noise, float32 files none); zero outside the reconstruction circle;
big-endian uint16 (scaled to a maximum of 20000-30000) or big-endian float32; an RAS affine
(qform only, as in the real files) with a varying origin; the ADNI-style subject id
``SSS_S_NNNN`` (SSS = site) in the header field ``db_name``. Sites own one or two scanner
protocols; by default sites (and so protocols) are balanced across the classes. With
``confounded=True`` NC and MCI training scans come from disjoint sites and the protocol follows
the class (NC: uint16 / 63 slices, MCI: float32 / 47 slices), like the real data's confound;
new Test subjects then come from Test-only sites with class-independent protocols.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import uuid as _uuid
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from petmonai.errors import PetmonaiError

VERSION = "phantom-v2"


"""Tag of the generator; bump it whenever the generated images change (it names cache folders)."""


TRUTH_CSV = "synthetic_truth.csv"


PARAMS_JSON = "synthetic_params.json"


TRUTH_COLUMNS = ("split", "class_name", "uuid", "file", "subject", "site", "severity")


MCI_SEVERITY = (0.25, 0.40)


"""Range of the MCI uptake reduction at the region centres (fraction)."""


NC_SEVERITY = (0.0, 0.04)


"""Range of the same reduction for healthy controls (fraction)."""


MCI_REGIONS = (
    # name, centre (mm), sigma (mm): template brain coordinates, origin at the brain centre,
    # before the subject's scaling (x left->right, y posterior->anterior, z inferior->superior).
    ("posterior_cingulate_precuneus", (0.0, -54.0, 30.0), (14.0, 21.0, 20.0)),
    ("inferior_parietal_left", (-38.0, -50.0, 30.0), (17.0, 17.0, 17.0)),
    ("inferior_parietal_right", (38.0, -50.0, 30.0), (17.0, 17.0, 17.0)),
)


"""Hypometabolic regions of MCI: grey-matter uptake is multiplied by ``1 - severity * exp(-d^2 / 2)``."""


BRAIN_OFFSET_MM = (0.0, 8.0, -3.0)


"""Mean position of the brain centre relative to the centre of the field of view (mm)."""


POSE_DEGREES = (3.0, 2.0, 3.0)


"""Largest head rotation about x (pitch), y (roll), z (yaw), degrees (uniform, per scan)."""


POSE_SHIFT_MM = (3.0, 3.0, 3.0)


"""Largest shift of the brain centre from :data:`BRAIN_OFFSET_MM`, mm (uniform, per scan)."""


_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


# Relative uptake (white matter = 1); grey matter is the subject's ratio.
_SCALP, _SKULL, _SOFT, _CSF, _BRAINSTEM, _CEREBELLAR_WM = 0.30, 0.08, 0.15, 0.10, 1.25, 1.50


@dataclass(frozen=True)
class _Anatomy:
    """What stays the same between two scans of one subject."""

    scale: np.ndarray  # (3,) brain size factors
    gm_wm: float  # cortical grey/white uptake ratio
    cortex_mm: float  # mean cortical thickness
    ventricles: float  # ventricle size factor
    cerebellum: float  # cerebellar cortex uptake / cortical grey matter
    texture_k: np.ndarray  # (K, 3) wave vectors, rad/mm
    texture_phase: np.ndarray  # (K,)
    jitter: np.ndarray  # (8, 3) mm shifts of the deep structures

    @classmethod
    def from_seed(cls, seed: int) -> "_Anatomy":
        rng = np.random.default_rng([int(seed), 17])
        n_waves = 6
        directions = rng.normal(size=(n_waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelength = rng.uniform(22.0, 40.0, size=(n_waves, 1))
        return cls(
            scale=rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, size=3),
            gm_wm=float(rng.uniform(2.2, 2.8)),
            cortex_mm=float(rng.uniform(6.0, 8.0)),
            ventricles=float(rng.uniform(0.8, 1.4)),
            cerebellum=float(rng.uniform(0.8, 0.95)),
            texture_k=2.0 * np.pi * directions / wavelength,
            texture_phase=rng.uniform(0.0, 2.0 * np.pi, size=n_waves),
            jitter=rng.uniform(-1.5, 1.5, size=(8, 3)),
        )


def _rotation(degrees) -> np.ndarray:
    """Rotation matrix from angles (degrees) about x (pitch), y (roll) and z (yaw)."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Grid:
    """Maps voxel indices to template brain coordinates: ``p = M @ ijk + b``."""

    def __init__(self, shape, voxel_size, scale, rotation, offset_mm):
        self.shape = tuple(int(s) for s in shape)
        vox = np.asarray(voxel_size, dtype=float)
        centre = (np.asarray(self.shape) - 1) / 2.0
        to_brain = np.diag(1.0 / np.asarray(scale)) @ rotation.T  # world offset -> template mm
        self.m = to_brain @ np.diag(vox)
        self.b = -to_brain @ (vox * centre + np.asarray(offset_mm, dtype=float))
        self.m_inv = np.linalg.inv(self.m)

    def box(self, centre, radius) -> tuple[slice, slice, slice]:
        """Voxel slices that hold the template sphere ``|p - centre| <= radius``."""
        c = self.m_inv @ (np.asarray(centre, dtype=float) - self.b)
        half = radius * np.linalg.norm(self.m_inv, axis=1)
        lo = np.maximum(np.floor(c - half).astype(int), 0)
        hi = np.minimum(np.ceil(c + half).astype(int) + 1, self.shape)
        return tuple(slice(int(a), int(max(a, z))) for a, z in zip(lo, hi))

    def coords(self, box, centre=(0.0, 0.0, 0.0)):
        """Template coordinates (three float32 arrays) of the voxels in ``box``, minus ``centre``."""
        ijk = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]
        out = []
        for row in range(3):
            m = self.m[row].astype(np.float32)
            out.append(
                (m[0] * ijk[0] + np.float32(self.b[row] - centre[row]))[:, None, None]
                + (m[1] * ijk[1])[None, :, None]
                + (m[2] * ijk[2])[None, None, :]
            )
        return out


def _ellipsoid(grid: _Grid, vol, centre, semi, value) -> None:
    """Set ``vol`` to ``value`` inside the template ellipsoid (centre, semi-axes in mm)."""
    box = grid.box(centre, max(semi))
    x, y, z = grid.coords(box, centre)
    inside = (x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2 <= 1.0
    vol[box][inside] = value


def _hypometabolism(grid: _Grid, vol, centre, sigma, severity, gm) -> None:
    """Lower grey-matter uptake by ``severity * exp(-d^2/2)`` (d: distance in sigmas).

    The reduction is scaled by how grey the tissue is (0 at white matter uptake 1, 1 at
    ``gm``), so the cortex fades against the white matter, as in hypometabolism.
    """
    box = grid.box(centre, 3.0 * max(sigma))
    x, y, z = grid.coords(box, centre)
    d2 = (x / sigma[0]) ** 2 + (y / sigma[1]) ** 2 + (z / sigma[2]) ** 2
    sub = vol[box]
    greyness = np.clip((sub - 1.0) / np.float32(gm - 1.0), 0.0, 1.0)
    sub *= 1.0 - np.float32(severity) * (0.5 + 0.5 * greyness) * np.exp(-0.5 * d2)


def _render(grid: _Grid, anat: _Anatomy, severity: float) -> np.ndarray:
    """Noise-free, unsmoothed uptake (white matter = 1) on the grid."""
    vol = np.zeros(grid.shape, dtype=np.float32)
    gm = anat.gm_wm

    # Head: scalp (outer 5 mm), skull (next 4 mm), soft tissue / CSF inside.
    head_c, head_top, head_bottom, head_xy = (0.0, -2.0, -5.0), 78.0, 82.0, (80.0, 98.0)
    box = grid.box(head_c, max(head_xy + (head_top, head_bottom)))
    x, y, z = grid.coords(box, head_c)
    az = np.where(z > 0, head_top, head_bottom)
    r = np.sqrt((x / head_xy[0]) ** 2 + (y / head_xy[1]) ** 2 + (z / az) ** 2)
    depth = np.sqrt(x * x + y * y + z * z) * (1.0 / np.maximum(r, 1e-3) - 1.0)  # mm to the surface
    sub = vol[box]
    sub[depth > 0] = _SCALP
    sub[depth > 5] = _SKULL
    sub[depth > 9] = _SOFT

    # Cerebrum: an ellipsoid, flatter below; white matter inside a grey-matter shell.
    ax, ay, az_top, az_bottom = 67.0, 84.0, 58.0, 42.0
    box = grid.box((0, 0, 0), ay)
    x, y, z = grid.coords(box)
    r = np.sqrt((x / ax) ** 2 + (y / ay) ** 2 + (z / np.where(z > 0, az_top, az_bottom)) ** 2)
    depth = np.sqrt(x * x + y * y + z * z) * (1.0 / np.maximum(r, 1e-3) - 1.0)
    texture = np.zeros_like(x)
    for (kx, ky, kz), phase in zip(anat.texture_k.astype(np.float32), anat.texture_phase):
        texture += np.cos(kx * x + ky * y + kz * z + np.float32(phase))
    texture *= np.float32(np.sqrt(2.0 / len(anat.texture_phase)))  # unit variance
    thickness = anat.cortex_mm + 0.75 * texture
    # Medial cortex along the fissure, except in the arch of the corpus callosum and below it.
    medial = (z > -15.0) & (((y + 3.0) / 42.0) ** 2 + ((z - 10.0) / 17.0) ** 2 > 1.0)
    half_fissure = 1.0
    cortex_depth = np.where(medial, np.minimum(depth, np.abs(x) - half_fissure), depth)
    brain = depth > 0
    sub = vol[box]
    sub[brain] = 1.0
    grey = brain & (cortex_depth < thickness)
    sub[grey] = (gm * (1.0 + 0.05 * texture))[grey]
    sub[brain & medial & (np.abs(x) <= half_fissure)] = _CSF

    # Deep grey nuclei (left, right), then the ventricles.
    j = anat.jitter
    for side, sign in enumerate((-1.0, 1.0)):
        _ellipsoid(grid, vol, (sign * 11.0, -14.0, 4.0) + j[side], (8.0, 12.0, 8.0), 0.95 * gm)  # thalamus
        _ellipsoid(grid, vol, (sign * 24.0, 4.0, 2.0) + j[2 + side], (7.0, 15.0, 10.0), 1.05 * gm)  # putamen
        _ellipsoid(grid, vol, (sign * 13.0, 13.0, 11.0) + j[4 + side], (5.0, 10.0, 8.0), 0.95 * gm)  # caudate
        v = anat.ventricles
        _ellipsoid(grid, vol, (sign * 7.5, -4.0, 14.0) + j[6], (4.5 * v, 24.0, 6.0 * v), _CSF)  # lateral
    _ellipsoid(grid, vol, (0.0, -10.0, 2.0) + j[7], (1.5 * anat.ventricles, 10.0, 7.0), _CSF)  # third

    # Cerebellum (cortex around a white-matter core) and brain stem.
    _ellipsoid(grid, vol, (0.0, -52.0, -38.0), (50.0, 30.0, 22.0), anat.cerebellum * gm)
    _ellipsoid(grid, vol, (0.0, -46.0, -34.0), (18.0, 10.0, 7.0), _CEREBELLAR_WM)
    _ellipsoid(grid, vol, (0.0, -20.0, -50.0), (9.0, 11.0, 36.0), _BRAINSTEM)

    # Hypometabolism.
    if severity:
        for _, centre, sigma in MCI_REGIONS:
            _hypometabolism(grid, vol, centre, sigma, severity, gm)
    return vol


def make_phantom(
    rng=None,
    mci: bool = False,
    *,
    severity: float | None = None,
    anatomy_seed: int | None = None,
    shape=(128, 128, 63),
    voxel_size=(2.06, 2.06, 2.43),
    fwhm_mm: float = 7.0,
    noise: float = 0.05,
    background_noise: float = 0.005,
) -> np.ndarray:
    """One synthetic FDG-PET volume (float32, ``shape``, white matter ~ 1, cortex ~ 2.5).

    >>> vol = make_phantom(0, mci=True, shape=(128, 128, 47), voxel_size=(2.1, 2.1, 3.3))
    >>> vol.shape, vol.dtype
    ((128, 128, 47), dtype('float32'))

    Args:
        rng: ``numpy.random.Generator`` or seed; draws the head position and the noise (and the
            anatomy and severity when they are not given).
        mci: draw ``severity`` from the MCI range (25-40 %) instead of the NC range (0-4 %).
        severity: grey-matter uptake reduction at the centres of :data:`MCI_REGIONS`
            (fraction; white matter loses half as much); overrides ``mci``.
        anatomy_seed: the subject; two calls with one seed image one brain (in other positions).
        shape, voxel_size: the grid (3D) and its spacing in mm; the brain sits near its centre.
        fwhm_mm: Gaussian resolution (mm, isotropic; converted to voxels per axis).
        noise: relative noise at the cortical uptake level; its standard deviation grows as the
            square root of the intensity (Poisson-like).
        background_noise: standard deviation of the extra noise everywhere in the
            reconstruction circle, relative to the cortical level. Outside the circle: 0.
    """
    rng = np.random.default_rng(rng)
    if anatomy_seed is None:
        anatomy_seed = int(rng.integers(2**31))
    if severity is None:
        severity = float(rng.uniform(*(MCI_SEVERITY if mci else NC_SEVERITY)))
    anat = _Anatomy.from_seed(anatomy_seed)
    rotation = _rotation(rng.uniform(-1.0, 1.0, size=3) * POSE_DEGREES)
    offset = np.asarray(BRAIN_OFFSET_MM) + rng.uniform(-1.0, 1.0, size=3) * POSE_SHIFT_MM
    grid = _Grid(shape, voxel_size, anat.scale, rotation, offset)

    vol = _render(grid, anat, severity)
    vol = gaussian_filter(vol, sigma=fwhm_mm * _FWHM_TO_SIGMA / np.asarray(voxel_size, float), truncate=3.0)
    level = np.float32(anat.gm_wm)
    variance = np.float32(noise**2) * level * np.maximum(vol, 0.0) + np.float32((background_noise * level) ** 2)
    sd = np.sqrt(variance)
    vol += sd * rng.standard_normal(vol.shape, dtype=np.float32)

    # Reconstruction circle: a centred disc in every slice, zero outside.
    nx, ny = shape[0], shape[1]
    radius = min(nx * voxel_size[0], ny * voxel_size[1], 300.0) / 2.0
    x = (np.arange(nx) - (nx - 1) / 2.0) * voxel_size[0]
    y = (np.arange(ny) - (ny - 1) / 2.0) * voxel_size[1]
    vol *= ((x[:, None] ** 2 + y[None, :] ** 2) <= radius**2)[:, :, None]
    return vol


@dataclass(frozen=True)
class _Protocol:
    dtype: str  # '>u2' or '>f4'
    n_slices: int  # 63 or 47
    voxel_xy: float
    voxel_z: float
    fwhm_mm: float
    origin: tuple  # mm, before the per-scan shift


@dataclass(frozen=True)
class _Scan:
    split: str  # Train / Test
    class_name: str
    uuid: int
    subject: str
    site: str
    severity: float
    anatomy_seed: int
    scan_seed: int
    protocol: _Protocol

    @property
    def file(self) -> str:
        folder = f"Train/{self.class_name}" if self.split == "Train" else "Test"
        return f"{folder}/{self.uuid}.nii.gz"


_FAMILIES = (("u2", 63), ("u2", 47), ("f4", 47), ("u2", 63), ("f4", 63))


def _protocol(rng, family) -> _Protocol:
    dtype, n_slices = family
    if n_slices == 63:
        voxel_z = rng.uniform(2.40, 2.54)
    else:
        voxel_z = rng.uniform(3.20, 3.40)
    voxel_xy = rng.uniform(2.0, 2.6)
    if rng.random() < 0.5:  # scanner-centred origin, or an arbitrary one as in some real files
        origin = tuple(-(np.array([128, 128, n_slices]) - 1) / 2.0 * [voxel_xy, voxel_xy, voxel_z])
    else:
        origin = tuple(rng.uniform(-300.0, 500.0, size=3))
    return _Protocol(
        ">" + dtype, n_slices, round(float(voxel_xy), 4), round(float(voxel_z), 4),
        float(rng.uniform(6.0, 8.0)), tuple(round(float(o), 2) for o in origin),
    )


def _make_sites(rng, n, families, codes) -> dict[str, list[_Protocol]]:
    """``n`` sites (3-digit codes from ``codes``), each with one or two protocols."""
    sites = {}
    for k in range(n):
        first = _protocol(rng, families[k % len(families)])
        protocols = [first]
        if rng.random() < 0.4:  # a second scanner / protocol at the same site
            protocols.append(_protocol(rng, families[int(rng.integers(len(families)))]))
        sites[codes.pop()] = protocols
    return sites


def _assign_sites(class_names, sites: dict[str, list[str]]) -> list[str]:
    """The k-th subject of a class goes to ``sites[class][k mod n]``.

    With one site list for both classes, the k-th NC and the k-th MCI subject share a site:
    site and class are independent by design.
    """
    counters = {}
    out = []
    for name in class_names:
        k = counters.get(name, 0)
        counters[name] = k + 1
        out.append(sites[name][k % len(sites[name])])
    return out


def _interleave(n_nc: int, n_mci: int) -> list[str]:
    order = []
    for k in range(max(n_nc, n_mci)):
        order += (["NC"] if k < n_nc else []) + (["MCI"] if k < n_mci else [])
    return order


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def _plan(n_nc, n_mci, n_test, repeat_fraction, seed, confounded) -> list[_Scan]:
    """Every scan of the cohort: who, where, how (deterministic in ``seed``)."""
    rng = np.random.default_rng([int(seed), 1])
    codes = [f"{c:03d}" for c in rng.permutation(np.arange(2, 200))[:16]]
    numbers = iter(int(n) for n in rng.permutation(np.arange(1, 10000)))

    u2_63, f4_47 = (("u2", 63),), (("f4", 47),)
    if confounded:
        train_sites = {"NC": _make_sites(rng, 3, u2_63, codes), "MCI": _make_sites(rng, 4, f4_47, codes)}
    else:
        shared = _make_sites(rng, 6, _FAMILIES, codes)
        train_sites = {"NC": shared, "MCI": shared}
    test_only = _make_sites(rng, 2, _FAMILIES, codes)
    all_sites = {**train_sites["NC"], **train_sites["MCI"], **test_only}

    def new_subject(class_name, site):
        low, high = MCI_SEVERITY if class_name == "MCI" else NC_SEVERITY
        return {
            "class_name": class_name, "site": site, "subject": f"{site}_S_{next(numbers):04d}",
            "severity": float(rng.uniform(low, high)), "anatomy_seed": int(rng.integers(2**31)), "visits": 0,
        }

    def visit(subject, split):
        """A scan of ``subject``; a repeat visit uses the site's other protocol where it has one."""
        protocols = all_sites[subject["site"]]
        protocol = protocols[subject["visits"] % len(protocols)]
        severity = subject["severity"] * (1.0 if subject["visits"] == 0 else float(rng.uniform(0.9, 1.15)))
        subject["visits"] += 1
        return dict(split=split, class_name=subject["class_name"], subject=subject["subject"],
                    site=subject["site"], severity=round(severity, 4), anatomy_seed=subject["anatomy_seed"],
                    scan_seed=int(rng.integers(2**63)), protocol=protocol)

    # Train: n_c scans per class, of which about n_c * f / (1 + f) are second visits.
    counts = {"NC": n_nc, "MCI": n_mci}
    n_repeats = {c: min(_round(n * repeat_fraction / (1.0 + repeat_fraction)), n // 2) for c, n in counts.items()}
    n_subjects = {c: counts[c] - n_repeats[c] for c in counts}
    order = _interleave(n_subjects["NC"], n_subjects["MCI"])
    site_of = _assign_sites(order, {c: list(train_sites[c]) for c in ("NC", "MCI")})
    subjects = [new_subject(c, s) for c, s in zip(order, site_of)]
    scans = {"NC": [], "MCI": []}
    for subject in subjects:
        scans[subject["class_name"]].append(visit(subject, "Train"))
    for c in ("NC", "MCI"):
        mine = [s for s in subjects if s["class_name"] == c]
        for k in rng.permutation(len(mine))[: n_repeats[c]]:
            scans[c].append(visit(mine[int(k)], "Train"))

    # Test: other visits of Train subjects, and new subjects (classes and sites balanced).
    n_revisits = min(_round(n_test * repeat_fraction), len(subjects))
    test = [visit(subjects[int(k)], "Test") for k in rng.permutation(len(subjects))[:n_revisits]]
    n_new = n_test - n_revisits
    order = _interleave((n_new + 1) // 2, n_new // 2)
    if rng.random() < 0.5:
        order = ["MCI" if c == "NC" else "NC" for c in order]
    test_sites = list(test_only) if confounded else list(test_only) + list(train_sites["NC"])
    site_of = _assign_sites(order, {"NC": test_sites, "MCI": test_sites})
    test += [visit(new_subject(c, s), "Test") for c, s in zip(order, site_of)]

    plan = []
    for c in ("NC", "MCI"):
        for n, k in enumerate(rng.permutation(len(scans[c])), start=1):
            plan.append(_Scan(uuid=n, **scans[c][int(k)]))
    for n, k in enumerate(rng.permutation(len(test)), start=1):
        plan.append(_Scan(uuid=n, **test[int(k)]))
    return plan


def _write_scan(scan: _Scan, path: Path) -> None:
    p = scan.protocol
    rng = np.random.default_rng(scan.scan_seed)
    voxel = (p.voxel_xy, p.voxel_xy, p.voxel_z)
    fwhm = float(np.clip(p.fwhm_mm + rng.uniform(-0.3, 0.3), 6.0, 8.0))
    vol = make_phantom(
        rng, severity=scan.severity, anatomy_seed=scan.anatomy_seed, shape=(128, 128, p.n_slices),
        voxel_size=voxel, fwhm_mm=fwhm, noise=float(rng.uniform(0.03, 0.08)),
        background_noise=0.004 if p.dtype == ">u2" else 0.0,  # float32 files: zero outside the head
    )
    if p.dtype == ">u2":
        scale = rng.uniform(20000.0, 30000.0) / max(float(vol.max()), 1e-6)
        data = np.rint(np.clip(vol, 0.0, None) * scale).astype(">u2")
    else:
        data = (vol * np.float32(rng.uniform(2500.0, 6000.0))).astype(">f4")
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = np.asarray(p.origin) + rng.uniform(-30.0, 30.0, size=3)

    header = nib.Nifti1Header(endianness=">")
    header.set_data_dtype(p.dtype)
    img = nib.Nifti1Image(data[..., None], None, header)
    img.set_qform(affine, code=1)  # like the real files: qform (scanner), no sform
    img.set_sform(None, code=0)
    img.header.set_xyzt_units("mm", "sec")
    img.header["db_name"] = scan.subject.encode()
    img.header["descrip"] = f"SYNTHETIC petmonai {VERSION}".encode()
    img.header["scl_slope"], img.header["scl_inter"] = np.nan, np.nan
    img.header["pixdim"][4] = 0.0  # one frame, no frame duration: as in the real files
    nib.save(img, str(path))


_README = """\
SYNTHETIC brain FDG-PET phantoms -- NOT patient data.

Generated by petmonai.data.synthetic ({version}) for demos and tests: simple geometric brain phantoms
(scalp, skull, cortex, white matter, deep grey nuclei, ventricles, cerebellum) with simulated
scanner resolution and noise. "MCI" phantoms have reduced uptake in the posterior cingulate /
precuneus and both inferior parietal lobules; "NC" phantoms (almost) none. No result obtained
on these files says anything about real patients.

Layout: Train/NC/<n>.nii.gz, Train/MCI/<n>.nii.gz, Test/<uuid>.nii.gz; the true class, subject
id (also in the NIfTI header field db_name), site and severity of every file are in
{truth}.

Parameters:
{params}
"""


def _check_params(n_nc, n_mci, n_test, repeat_fraction, seed, confounded) -> dict:
    for name, value, low in (("n_nc", n_nc, 1), ("n_mci", n_mci, 1), ("n_test", n_test, 0)):
        if int(value) != value or value < low:
            raise PetmonaiError(f"synthetic cohort: {name} must be an integer >= {low}, got {value!r}")
    if not 0.0 <= float(repeat_fraction) <= 1.0:
        raise PetmonaiError(f"synthetic cohort: repeat_fraction must be in [0, 1], got {repeat_fraction!r}")
    return {
        "version": VERSION, "n_nc": int(n_nc), "n_mci": int(n_mci), "n_test": int(n_test),
        "repeat_fraction": float(repeat_fraction), "seed": int(seed), "confounded": bool(confounded),
    }


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; a complete ``out_dir`` (or an empty one) is replaced."""
    old = None
    if out_dir.exists():
        if (out_dir / TRUTH_CSV).exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{_uuid.uuid4().hex[:8]}")
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()  # empty (checked by the caller)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / TRUTH_CSV).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same cohort first
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def generate_cohort(
    out_dir,
    n_nc: int = 20,
    n_mci: int = 20,
    n_test: int = 12,
    repeat_fraction: float = 0.2,
    seed: int = 0,
    confounded: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic cohort in the challenge layout; return ``out_dir``.

    >>> import tempfile, pandas
    >>> from pathlib import Path
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = generate_cohort(Path(tmp.name) / "pet", n_nc=4, n_mci=4, n_test=3, seed=1)
    >>> truth = pandas.read_csv(root / "synthetic_truth.csv", dtype=str)
    >>> truth.columns.tolist()
    ['split', 'class_name', 'uuid', 'file', 'subject', 'site', 'severity']
    >>> truth["split"].value_counts().to_dict()
    {'Train': 8, 'Test': 3}
    >>> tmp.cleanup()

    Args:
        out_dir: the cohort folder. It is written as a temporary sibling and renamed into
            place, so it is either absent or complete. A complete folder (one that holds
            ``synthetic_truth.csv``) is returned as it is unless ``overwrite``; it must have been
            made with the same parameters, else :class:`PetmonaiError`.
        n_nc, n_mci: scans per class in ``Train`` (a fraction of them are second visits).
        n_test: scans in ``Test``; ``round(n_test * repeat_fraction)`` of them are other
            visits of Train subjects, the others new subjects of both classes.
        repeat_fraction: fraction of subjects with a second scan (same anatomy, severity
            within 10-15 %, another acquisition).
        seed: everything (plan, anatomy, acquisitions, noise) follows from it: same seed, same
            voxels.
        confounded: Train NC and MCI from disjoint sites with class-specific protocols
            (NC uint16 / 63 slices, MCI float32 / 47 slices). Otherwise sites and protocols
            are balanced across the classes.
        overwrite: regenerate a complete ``out_dir``.
    """
    params = _check_params(n_nc, n_mci, n_test, repeat_fraction, seed, confounded)
    out_dir = Path(out_dir).expanduser()
    if (out_dir / TRUTH_CSV).exists() and not overwrite:
        try:
            recorded = json.loads((out_dir / PARAMS_JSON).read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded is not None and recorded != params:
            raise PetmonaiError(
                f"{out_dir}: holds a synthetic cohort made with {recorded}, not {params}; "
                "use another folder or overwrite=True"
            )
        return out_dir
    foreign = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if foreign and not (out_dir / TRUTH_CSV).exists():
        raise PetmonaiError(f"{out_dir}: exists and is not a synthetic cohort; refusing to replace it")

    plan = _plan(n_nc, n_mci, n_test, repeat_fraction, seed, confounded)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        for folder in ("Train/NC", "Train/MCI", "Test"):
            (tmp / folder).mkdir(parents=True)
        for scan in plan:
            _write_scan(scan, tmp / scan.file)
        with open(tmp / TRUTH_CSV, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(TRUTH_COLUMNS)
            for s in plan:
                row = [s.split, s.class_name, s.uuid, s.file, s.subject, s.site, f"{s.severity:.4f}"]
                writer.writerow(row)
        (tmp / PARAMS_JSON).write_text(json.dumps(params, indent=1) + "\n")
        listing = "\n".join(f"  {k}: {v}" for k, v in params.items())
        (tmp / "README.txt").write_text(_README.format(version=VERSION, truth=TRUTH_CSV, params=listing))
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def default_cohort_dir(seed: int = 0, **params) -> Path:
    """Cache folder for a cohort: ``$PETMONAI_CACHE`` (or ``~/.cache/petmonai``)/synthetic/<tag>.

    >>> default_cohort_dir(seed=0, n_nc=8).name  # version tag + short hash of all parameters
    'phantom-v2-7c09f98c76'

    ``params`` are :func:`generate_cohort` keywords (``n_nc``, ``n_mci``, ``n_test``,
    ``repeat_fraction``, ``confounded``); left out, they take its defaults, so equal cohorts
    share one folder.
    """
    defaults = {
        name: p.default for name, p in inspect.signature(generate_cohort).parameters.items()
        if name not in ("out_dir", "overwrite", "seed")
    }
    unknown = set(params) - set(defaults)
    if unknown:
        raise TypeError(f"default_cohort_dir: unknown parameter(s) {sorted(unknown)}")
    full = _check_params(**{**defaults, **params, "seed": seed})
    digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:10]
    from petmonai.runs import cache_root

    return cache_root() / "synthetic" / f"{VERSION}-{digest}"


def cached_cohort(seed: int = 0, **params) -> Path:
    """The cohort in its :func:`default_cohort_dir`, generated on first use.

    >>> root = cached_cohort(seed=0)  # ~/.cache/petmonai/synthetic/phantom-v2-.../  # doctest: +SKIP
    """
    return generate_cohort(default_cohort_dir(seed, **params), seed=seed, **params)
