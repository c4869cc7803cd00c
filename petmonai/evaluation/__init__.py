"""Evaluation: metrics with subject-bootstrap CIs, the reference model, the report."""

from petmonai.evaluation.metrics import (  # noqa: F401
    METRIC_KEYS,
    METRIC_LABELS,
    PROTOCOL_TEXT,
    metric_labels,
    protocol_text,
    THRESHOLD_MODES,
    brier_score,
    calibration_bins,
    classification_metrics,
    evaluate_cv,
    fold_thresholds,
    paired_auc_difference,
    parse_threshold,
    scored_predictions,
    spread,
    subject_bootstrap,
    tune_threshold,
    weighted_metrics,
)

from petmonai.evaluation.reference import (  # noqa: F401
    FEATURES,
    MODEL_NAME,
    PREPROCESSING,
    build_reference_model,
    reference_features,
    reference_settings,
    resample_transforms,
    run_reference_cv,
)

from petmonai.evaluation.report import (  # noqa: F401
    CLASS_COLOURS,
    CNN_NAME,
    COLOURS,
    FIGURES,
    PROTOCOL_TITLES,
    REFERENCE_NAME,
    add_reference,
    build_report,
    colour,
    plot_calibration,
    plot_confusion,
    plot_roc,
    plot_training_curves,
    run_model_name,
)
