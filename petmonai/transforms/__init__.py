"""PET transforms (MONAI array + dictionary twins): checks, intensity, harmonisation, spatial
normalisation to a template, 2D slices, fast augmentation, and the pipelines a config names."""

from petmonai.transforms.augment import (  # noqa: F401
    FastRandFlipd,
    FastRandSpatialCropd,
)
from petmonai.transforms.base import (  # noqa: F401
    FWHM_PER_SIGMA,
    AboveThreshold,
    CheckVolume,
    CheckVolumed,
    brain_mask,
    largest_component,
    source_file,
)
from petmonai.transforms.harmonise import (  # noqa: F401
    MaskToBrain,
    MaskToBraind,
    SmoothToResolution,
    SmoothToResolutiond,
    smoothing_sigma,
    voxel_size,
)
from petmonai.transforms.intensity import (  # noqa: F401
    ScaleIntensityToBrainMean,
    ScaleIntensityToBrainMeand,
)
from petmonai.transforms.pipeline import (  # noqa: F401
    build_evaluation,
    build_pipelines,
)
from petmonai.transforms.preview import (  # noqa: F401
    PipelineStep,
    describe_step,
    mid_slices,
    pipeline_table,
    plot_pipeline,
    preview_pipeline,
)
from petmonai.transforms.slices import (  # noqa: F401
    AxialSlices,
    AxialSlicesd,
    RandAxialSlices,
    RandAxialSlicesd,
    slice_indices,
    take_axial_slices,
)
from petmonai.transforms.spatial.normalise import (  # noqa: F401
    MaskToTemplateBrain,
    MaskToTemplateBraind,
    ParcelAverage,
    ParcelAveraged,
    ReferenceRegionNormalise,
    ReferenceRegionNormalised,
    parcel_means,
    template_parcels,
)
from petmonai.transforms.spatial.registration import (  # noqa: F401
    MIN_CORRELATION,
    TRANSFORMS,
    RegisterToTemplate,
    RegisterToTemplated,
    default_cache_dir,
    ras_matrix,
)
from petmonai.transforms.spatial.study_template import (  # noqa: F401
    MIN_SCANS,
    NIFTI_XFORM_MNI_152,
    StudyTemplate,
    build_study_template,
    registration_steps,
    template_inputs,
    write_study_template,
)
from petmonai.transforms.spatial.template import (  # noqa: F401
    MIN_TEMPLATE_MATCH,
    REGION_BOXES_MM,
    TEMPLATE_BOX_MM,
    WHITE_MATTER_UPTAKE,
    Template,
    correlation,
    load_template,
    mni_fdg_template,
    on_grid,
    template_file_digest,
)
