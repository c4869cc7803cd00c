"""How well scans registered: correlations with the template and the registration montage."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from petmonai.transforms import (
    FWHM_PER_SIGMA,
    RegisterToTemplate,
    RegisterToTemplated,
    correlation,
    on_grid,
)


def find_registration(preprocess) -> RegisterToTemplate | None:
    """The :class:`RegisterToTemplate` inside a built ``preprocess`` pipeline, if it registers."""
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, RegisterToTemplated):
            return t.register
    return None


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


#: scans drawn at most in the registration montage (a cohort of thousands would need thousands of tiles)
MONTAGE_SCANS = 59


def montage_scans(scan_ids, correlations: dict | None = None, limit: int = MONTAGE_SCANS) -> list:
    """The scans the montage draws: all of them up to ``limit``; beyond it the ``limit`` with the lowest
    template correlation (the ones to check by eye), in their own order.

    >>> montage_scans(["a", "b", "c"], {"a": 0.9, "b": 0.5, "c": 0.7}, limit=2)
    ['b', 'c']
    """
    scan_ids = list(scan_ids)
    if len(scan_ids) <= limit:
        return scan_ids
    worst = set(sorted(scan_ids, key=lambda s: (correlations or {}).get(s, 0.0))[:limit])
    return [s for s in scan_ids if s in worst]


def registration_montage(volumes: dict, register: RegisterToTemplate, path: str | Path,
                         correlations: dict | None = None, labels: dict | None = None,
                         limit: int = MONTAGE_SCANS) -> Path:
    """One PNG to check registrations by eye: the template, then each registered scan in three planes
    through the template centre, with the template brain outline drawn over it; beyond ``limit`` scans,
    the ``limit`` with the lowest template correlation (:func:`montage_scans`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = register.template
    first = np.asarray(next(iter(volumes.values())))[0]
    image, brain = on_grid(t.image, first.shape), on_grid(t.brain(), first.shape).astype(float)
    cx, cy, cz = (np.argwhere(brain > 0).mean(axis=0)).round().astype(int)
    shown = montage_scans(volumes.keys(), correlations, limit)
    tiles = [("template", image)] + [(sid, np.asarray(volumes[sid])[0]) for sid in shown]
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
    which = "" if len(shown) == len(volumes) else f"; the {len(shown)} of {len(volumes)} scans least like it"
    fig.suptitle(f"Registration to {target} (red: template brain outline{which})", fontsize=9)
    fig.tight_layout()
    fig.set_dpi(90)
    from petmonai.runs import save_figure

    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)
