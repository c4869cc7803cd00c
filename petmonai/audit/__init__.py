"""Audit: what separates the classes before (headers, subjects, sites) and after preprocessing."""

from petmonai.audit.datalist import (  # noqa: F401
    AUC_WARN,
    AUDIT_VERSION,
    MARKER_FRACTION,
    MARKER_MIN_SCANS,
    NO_DB_NAME,
    REQUIRED_COLUMNS,
    UNKNOWN,
    audit_datalist,
    audit_markdown,
    audit_text,
    property_separability,
    rank_auc,
    write_audit,
)
from petmonai.audit.preprocessed import (  # noqa: F401
    preprocessed_separability,
    volume_properties,
)
from petmonai.audit.registration import (  # noqa: F401
    find_registration,
    registration_montage,
    template_correlations,
)
