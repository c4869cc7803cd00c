"""Grad-CAM saliency of the fold ensemble, mapped back onto each input volume.

>>> from petmonai.inference.predictor import predict
>>> predict("runs/real", ["Test/"], "out/submission.csv", saliency=True)   # out/submission.saliency/<uuid>_gradcam.*  # doctest: +SKIP

Per volume and per fold model, MONAI :class:`monai.visualize.GradCAM` maps the evidence for one
class (``inference.saliency_class``: the predicted label by default, or always one of the run's classes) on the
whole preprocessed volume, as the run's evaluator saw it, and on its test-time flips (each map
flipped back). Each map is scaled to a maximum of 1 and the maps are averaged over flips and
models. The target layer (``inference.saliency_layer``, ``auto``) is the one the model registered
(:mod:`petmonai.models.registry`): ``layer3`` of the MONAI ResNet (its ``layer4`` has only
2x2x2 voxels for the 48x56x48 training volume, which gives a nearly uniform map) and
``features.block4`` of the small SFCN (4x5x4 voxels on the default 6 mm grid); a network of your
own gets its last convolution (:func:`petmonai.models.saliency_layer`).

The mean map lives on the preprocessed grid (4 mm, cropped to the brain); it is resampled
(trilinear) onto the voxel grid of the input file through the affines of both grids, so
``<uuid>_gradcam.nii.gz`` has the input's shape, affine and header and overlays the input in any
viewer. ``<uuid>_gradcam.png`` shows axial, coronal and sagittal planes through the map's peak,
over the PET, with a colour bar. Maps are restricted to the brain (voxels above 30 % of the
PET's robust maximum) and scaled to a maximum of 1 there.
"""

from __future__ import annotations

import copy
import gzip
import io
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy.ndimage import map_coordinates

from petmonai import CLASS_NAMES
from petmonai.data import prob_column
from petmonai.errors import PetmonaiError
from petmonai.models import saliency_layer
from petmonai.runs import atomic_write_bytes, get_logger

log = get_logger("saliency")


def gradcam_maps(nets: Sequence[torch.nn.Module], volumes: Sequence[torch.Tensor], target_layer: str,
                 class_idx: Sequence[int], flips: Sequence[tuple[int, ...]] = ((),),
                 device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Mean Grad-CAM map per volume over ``nets`` and ``flips``, on the volume's own grid.

    ``volumes`` are preprocessed ``(C, X, Y, Z)`` tensors, ``class_idx`` the class per volume.
    Returns float32 arrays ``(X, Y, Z)`` scaled to a maximum of 1 (all zero if no voxel supports
    the class).
    """
    from monai.visualize import GradCAM

    device = torch.device(device)
    sums = [np.zeros(tuple(v.shape[1:]), dtype=np.float64) for v in volumes]
    for net in nets:
        # a private copy: GradCAM leaves its hooks on the module it is given
        local = copy.deepcopy(net).to(device=device, memory_format=torch.contiguous_format).float().eval()
        names = dict(local.named_modules())
        if target_layer not in names:
            raise PetmonaiError(f"saliency layer '{target_layer}' is not a module of the network "
                                f"(e.g. {', '.join(n for n in list(names)[1:] if '.' not in n)})")
        cam = GradCAM(nn_module=local, target_layers=target_layer, postprocessing=lambda x: x)
        for i, volume in enumerate(volumes):
            for flip in flips:
                dims = [a + 2 for a in flip]
                x = volume[None].to(device)
                x = torch.flip(x, dims) if flip else x
                with torch.enable_grad():
                    m = cam(x, class_idx=int(class_idx[i]))
                m = torch.flip(m, dims) if flip else m
                m = m.detach().float().cpu().numpy()[0, 0]
                peak = float(m.max())
                if peak > 0:
                    sums[i] += m / peak
        del cam, local
    out = []
    for s in sums:
        peak = float(s.max())
        out.append((s / peak if peak > 0 else s).astype(np.float32))
    return out


def resample_to_input(values: np.ndarray, values_affine: np.ndarray, input_affine: np.ndarray,
                      input_shape: Sequence[int]) -> np.ndarray:
    """Trilinear resampling of a map on one voxel grid onto another, through their voxel-to-world
    affines (0 outside the map)."""
    shape = tuple(int(s) for s in input_shape[:3])
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=0)
    ijk1 = np.concatenate([ijk.reshape(3, -1), np.ones((1, int(np.prod(shape))))], axis=0)
    to_map = np.linalg.inv(values_affine) @ input_affine
    coords = (to_map @ ijk1)[:3]
    out = map_coordinates(values.astype(np.float32), coords, order=1, mode="constant", cval=0.0)
    return out.reshape(shape).astype(np.float32)


def nifti_bytes(data: np.ndarray, reference: nib.Nifti1Image, gz: bool = True) -> bytes:
    """A float32 NIfTI with the reference image's shape, affine and header (db_name, codes)."""
    header = reference.header.copy()
    if header.endianness != "<":
        header = header.as_byteswapped("<")  # many inputs are big-endian; write little-endian float32
    header.set_data_dtype(np.dtype("<f4"))
    img = type(reference)(data.reshape(reference.shape).astype(np.float32), reference.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0.0, float(data.max()) if data.size else 0.0
    img.header["descrip"] = b"petmonai Grad-CAM"
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw


def montage_png(pet: np.ndarray, cam: np.ndarray, affine: np.ndarray, title: str, cam_label: str) -> bytes:
    """Axial, coronal and sagittal planes through the map's peak, the map over the PET (RAS view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # display in the closest canonical (RAS) orientation, whatever the file's voxel order
    ornt = nib.orientations.io_orientation(affine)
    pet = nib.orientations.apply_orientation(pet, ornt)
    cam = nib.orientations.apply_orientation(cam, ornt)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[np.argsort(ornt[:, 0])]
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    planes = [
        ("axial", pet[:, :, peak[2]], cam[:, :, peak[2]], zooms[1] / zooms[0], ("L", "R"), f"z={peak[2]}"),
        ("coronal", pet[:, peak[1], :], cam[:, peak[1], :], zooms[2] / zooms[0], ("L", "R"), f"y={peak[1]}"),
        ("sagittal", pet[peak[0], :, :], cam[peak[0], :, :], zooms[2] / zooms[1], ("P", "A"), f"x={peak[0]}"),
    ]
    vmax_pet = float(np.percentile(pet, 99.5)) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), constrained_layout=True)
    overlay = None
    for ax, (name, p, c, aspect, (left, right), where) in zip(axes, planes):
        # columns: the plane's first axis (left -> right, or posterior -> anterior); rows upwards
        ax.imshow(p.T, cmap="gray", origin="lower", aspect=aspect, vmin=0, vmax=vmax_pet, interpolation="nearest")
        masked = np.ma.masked_less(c.T, 0.05)
        overlay = ax.imshow(masked, cmap="inferno", origin="lower", aspect=aspect, vmin=0, vmax=1, alpha=0.55,
                            interpolation="bilinear")
        ax.set_title(f"{name} ({where})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.01, 0.5, left, transform=ax.transAxes, color="w", va="center")
        ax.text(0.97, 0.5, right, transform=ax.transAxes, color="w", va="center")
    cbar = fig.colorbar(overlay, ax=list(axes), shrink=0.8, pad=0.01)
    cbar.set_label(cam_label)
    fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def brain_only(values: np.ndarray, pet: np.ndarray) -> np.ndarray:
    """The map inside the brain (:func:`petmonai.transforms.base.brain_mask` of the input PET: voxels
    above 30 % of a robust maximum), rescaled to a maximum of 1 there. Coarse Grad-CAM layers
    otherwise spread over the whole field of view, skull and air included."""
    from petmonai.transforms import brain_mask

    mask = brain_mask(torch.from_numpy(np.ascontiguousarray(pet))).numpy()
    out = np.where(mask, values, 0.0).astype(np.float32)
    peak = float(out.max()) if out.size else 0.0
    return out / peak if peak > 0 else out


def saliency_class(option: str, label: str, classes=CLASS_NAMES) -> int:
    """The output unit Grad-CAM maps: the predicted ``label``'s, or the class ``option`` names."""
    name = label if option == "predicted" else option
    return list(classes).index(name)


def write_saliency(run, prepared, table: pd.DataFrame, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Grad-CAM NIfTI + PNG montage per prepared volume, in ``out_dir`` (each file atomic)."""
    if run.strategy.name != "sliding_window_3d":
        raise PetmonaiError(f"--saliency: Grad-CAM maps are implemented for 3D volume models, not views "
                            f"'{run.strategy.name}'")
    if run.options["saliency_layer"] in (None, "auto"):  # a network of your own: its last convolution
        run.options["saliency_layer"] = saliency_layer(run.cfg["model"], run.models[0].net)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_uuid = table.set_index("uuid")
    option = str(run.options["saliency_class"])
    classes = [saliency_class(option, by_uuid.loc[p.item.uuid, "label"], run.classes) for p in prepared]
    flips = getattr(run.strategy, "flips", [()])
    written = []
    batch = 8  # volumes per pass over the models: bounded memory, models copied once per batch
    for start in range(0, len(prepared), batch):
        chunk = prepared[start:start + batch]
        maps = gradcam_maps([m.net for m in run.models], [p.volume for p in chunk], str(run.options["saliency_layer"]),
                            classes[start:start + batch], flips, run.device)
        for prep, cam, cls in zip(chunk, maps, classes[start:start + batch]):
            if prep.affine is None:
                raise PetmonaiError(f"{prep.item.path}: the run's preprocessing does not keep the image geometry, "
                                    "so the saliency map cannot be mapped back onto the input")
            ref = nib.load(str(prep.item.path))
            pet = np.asarray(ref.dataobj, dtype=np.float32).reshape(ref.shape[:3])
            mapped = brain_only(resample_to_input(cam, prep.affine, ref.affine, ref.shape), pet)
            stem = f"{prep.item.uuid}_gradcam"
            nii = atomic_write_bytes(out_dir / f"{stem}.nii.gz", nifti_bytes(mapped, ref))
            row = by_uuid.loc[prep.item.uuid]
            empty = "" if mapped.max() > 0 else " (no voxel supports this class)"
            positive, name = run.classes[1], run.classes[cls]
            title = (f"uuid {prep.item.uuid}: P({positive}) = {row[prob_column(run.classes)]:.2f} -> {row['label']}   "
                     f"Grad-CAM ({run.options['saliency_layer']}) for {name}{empty}, "
                     f"{len(run.models)} model(s) x {len(flips)} flip(s)")
            png = atomic_write_bytes(out_dir / f"{stem}.png",
                                     montage_png(pet, mapped, ref.affine, title, f"Grad-CAM, {name} (max 1)"))
            written += [nii, png]
    return written
