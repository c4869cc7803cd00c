"""Data: discovery of a cohort (challenge folder layout, CSV, BIDS), its two classes, DICOM conversion, splits,
cached datasets, the synthetic phantom cohort."""

from petmonai.data.bids import (  # noqa: F401
    LABEL_COLUMN,
    bids_label,
    is_bids,
    parse_pet_name,
    write_bids,
)
from petmonai.data.classes import (  # noqa: F401
    UNLABELLED,
    check_classes,
    class_key,
    count_key,
    parse_label,
    prob_column,
    run_classes,
)
from petmonai.data.datasets import (  # noqa: F401
    UntrackedDataset,
    VolumeCache,
    describe_failure,
)
from petmonai.data.dicom import (  # noqa: F401
    check_slices,
    convert_dicom,
    find_series,
    write_pet_series,
)
from petmonai.data.discover import (  # noqa: F401
    ADNI_SUBJECT,
    BIDS_COLUMNS,
    COLUMNS,
    NIFTI_SUFFIXES,
    bad_files_error,
    check_file_size,
    check_shape,
    check_unique_uuids,
    content_order,
    data_options,
    discover,
    discover_bids,
    discover_layout,
    fingerprint,
    is_nifti,
    list_nifti,
    nifti_stem,
    read_datalist_csv,
    read_header,
    to_items,
    train_rows,
    verify_gzip,
)
from petmonai.data.splits import (  # noqa: F401
    FOLD_COLUMNS,
    LEAKY_PROTOCOLS,
    PROTOCOLS,
    check_no_leak,
    fold_ids,
    fold_members,
    inner_validation,
    load_folds,
    make_folds,
)
from petmonai.data.synthetic import (  # noqa: F401
    BRAIN_OFFSET_MM,
    MCI_REGIONS,
    MCI_SEVERITY,
    NC_SEVERITY,
    PARAMS_JSON,
    POSE_DEGREES,
    POSE_SHIFT_MM,
    TRUTH_COLUMNS,
    TRUTH_CSV,
    VERSION,
    cached_cohort,
    default_cohort_dir,
    generate_cohort,
    make_phantom,
)
