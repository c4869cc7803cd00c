"""A preview of a whole preprocessing pipeline, one step at a time, for transform authors.

Every transform of a config's ``preprocess`` list (the same objects training builds) runs on one
volume in turn; after each step the volume is described (shape, voxel size, intensity range, the
step's time) and three orthogonal mid slices are kept, then drawn one row per step:

>>> steps = preview_pipeline(build_pipelines(cfg)[0], "scan.nii.gz")      # doctest: +SKIP
>>> plot_pipeline(steps, "preview.png"); print(pipeline_table(steps))     # doctest: +SKIP

From the command line: ``petmonai show-pipeline --config C --image X.nii.gz --output preview.png``.
Times are wall-clock seconds of this run: a step with a disk cache of its own (the registration,
``template.cache_dir``) is slower the first time a volume is seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose

from petmonai.errors import ConfigError, DataError

AXES = ("axis 0 (x)", "axis 1 (y)", "axis 2 (z)")  # the slice across each voxel axis (RAS after Orientationd)


@dataclass
class PipelineStep:
    """The volume after one transform of the pipeline."""
    index: int                            # 1-based position in the pipeline
    name: str                             # the transform's class name
    shape: tuple[int, ...]                # the array's shape (channel first once a step adds it)
    spacing: tuple[float, ...] | None     # voxel size in mm from the affine; None: the array carries none
    vmin: float
    vmax: float
    p1: float                             # 1st and 99th percentiles of the intensities
    p99: float
    seconds: float
    slices: list[np.ndarray]              # mid slices across axis 0, 1, 2 (one for a 2D array)
    dtype: str = ""


def _volume_of(value) -> tuple[np.ndarray, tuple[float, ...] | None, str]:
    """The spatial array (the first channel of a 4D array), its voxel size (the column norms of its
    affine: after a registration, a template voxel's size in the scan's space) and dtype."""
    spacing = None
    affine = getattr(value, "affine", None)
    if affine is not None:
        a = torch.as_tensor(affine, dtype=torch.float64)
        spacing = tuple(float(s) for s in torch.linalg.norm(a[:-1, :-1], dim=0))
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    dtype = str(array.dtype)
    if array.ndim > 3:  # a channel of size 1, first (channel-first) or last (as a 4D NIfTI loads)
        array = np.squeeze(array, axis=tuple(a for a in (0, array.ndim - 1) if array.shape[a] == 1))
    while array.ndim > 3:  # several channels: the first
        array = array[0]
    return np.asarray(array, dtype=np.float32), spacing, dtype


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The three orthogonal slices through the centre of a 3D array (the array itself if 2D)."""
    if volume.ndim < 3:
        return [volume]
    return [np.take(volume, volume.shape[axis] // 2, axis=axis) for axis in range(3)]


def describe_step(index: int, name: str, value, seconds: float) -> PipelineStep:
    """A :class:`PipelineStep` of ``value`` (a tensor or array) after transform ``name``."""
    volume, spacing, dtype = _volume_of(value)
    if spacing is not None and len(spacing) != volume.ndim:
        spacing = None
    shape = tuple(int(s) for s in np.shape(value))
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        vmin = vmax = p1 = p99 = float("nan")
    else:
        vmin, vmax = float(finite.min()), float(finite.max())
        p1, p99 = (float(v) for v in np.percentile(finite, [1, 99]))
    return PipelineStep(index, name, shape, spacing, vmin, vmax, p1, p99, seconds, mid_slices(volume), dtype)


def preview_pipeline(pipeline, image: str | Path, key: str = "image") -> list[PipelineStep]:
    """Run ``pipeline`` (a MONAI Compose or a list of dictionary transforms) on ``{key: image}`` one
    transform at a time (``compose(data, start=i, end=i + 1)``); the volume after every step. A step that fails is a
    :class:`petmonai.errors.DataError` naming the file, the step and the problem."""
    from petmonai.data import describe_failure

    image = Path(image)
    if not image.is_file():
        raise DataError(image, "not found (show-pipeline --image needs one volume file)")
    pipeline = pipeline if isinstance(pipeline, Compose) else Compose(list(pipeline))
    if not pipeline.transforms:
        raise ConfigError("the preprocess list is empty: nothing to show")
    data, steps = {key: str(image)}, []
    for index, transform in enumerate(pipeline.transforms, start=1):
        name = type(transform).__name__
        t0 = time.perf_counter()
        try:  # one step, by the Compose's own machinery (as petmonai.inference.predictor.apply_tracking_affine)
            data = pipeline(data, start=index - 1, end=index)
        except Exception as err:  # MONAI wraps the transform's own error: report its innermost message
            raise DataError(image, f"step {index} ({name}) failed: {describe_failure(err)}") from None
        seconds = time.perf_counter() - t0
        if not isinstance(data, dict) or key not in data:
            raise DataError(image, f"step {index} ({name}) returned {type(data).__name__} without '{key}': "
                                   "a preprocess step must return one dictionary")
        steps.append(describe_step(index, name, data[key], seconds))
    return steps


def _fmt(values, digits: int = 3) -> str:
    return "x".join(f"{v:.{digits}g}" for v in values)


def step_fields(step: PipelineStep) -> dict[str, str]:
    """The step's figures as text, for the table and the figure alike."""
    return {"step": str(step.index), "transform": step.name, "shape": "x".join(map(str, step.shape)),
            "voxel": f"{_fmt(step.spacing)} mm" if step.spacing else "none (no affine)",
            "min": f"{step.vmin:.4g}", "max": f"{step.vmax:.4g}", "p1-p99": f"{step.p1:.4g} to {step.p99:.4g}",
            "dtype": step.dtype, "ms": f"{1000 * step.seconds:.1f}"}


def pipeline_table(steps: list[PipelineStep]) -> str:
    """Fixed-width text table, one line per step."""
    rows = [step_fields(s) for s in steps]
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}

    def line(r: dict) -> str:
        return "  ".join(r[c].rjust(widths[c]) if c in ("step", "ms") else r[c].ljust(widths[c])
                         for c in columns).rstrip()

    return "\n".join([line({c: c for c in columns}), *(line(r) for r in rows)])


def plot_pipeline(steps: list[PipelineStep], path: str | Path, title: str = "") -> Path:
    """One row per step: its three mid slices, drawn voxel for voxel (the array as the next step sees
    it, grey scale from the step's min to max), titled with the step's figures; written atomically."""
    from petmonai.runs import _new_figure, save_figure

    ncols = max(len(s.slices) for s in steps)
    fig, axes = _new_figure(3.0 * ncols, 2.5 * len(steps) + 0.4, ncols=ncols, nrows=len(steps))
    for row, step in zip(axes, steps):
        f = step_fields(step)
        row[0].set_ylabel(f"{step.index}. {step.name}", fontsize=8)
        row[ncols // 2].set_title(f"shape {f['shape']} | voxel {f['voxel']} | {f['ms']} ms\n"
                                  f"range {f['min']} to {f['max']} (p1-p99 {f['p1-p99']})", fontsize=7)
        for axis, ax in enumerate(row):
            ax.set_xticks([]), ax.set_yticks([])
            if axis >= len(step.slices):
                ax.set_axis_off()
                continue
            lo, hi = (step.vmin, step.vmax) if np.isfinite(step.vmin) and step.vmax > step.vmin else (None, None)
            ax.imshow(step.slices[axis].T, origin="lower", cmap="gray", vmin=lo, vmax=hi)
            if step is steps[-1] and len(step.slices) == 3:
                ax.set_xlabel(f"mid slice across {AXES[axis]}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
