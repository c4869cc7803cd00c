"""Spatial normalisation: templates, cached affine registration, template-grid normalisation, study templates."""

from petmonai.transforms.spatial.template import (  # noqa: F401
    MIN_TEMPLATE_MATCH,
    REGION_BOXES_MM,
    TEMPLATE_BOX_MM,
    Template,
    WHITE_MATTER_UPTAKE,
    correlation,
    load_template,
    mni_fdg_template,
    on_grid,
    template_file_digest,
)

from petmonai.transforms.spatial.registration import (  # noqa: F401
    MIN_CORRELATION,
    RegisterToTemplate,
    RegisterToTemplated,
    TRANSFORMS,
    default_cache_dir,
    ras_matrix,
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

from petmonai.transforms.spatial.study_template import (  # noqa: F401
    MIN_SCANS,
    NIFTI_XFORM_MNI_152,
    StudyTemplate,
    build_study_template,
    registration_steps,
    template_inputs,
    write_study_template,
)
