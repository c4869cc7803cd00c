"""Inference: test-time views, the fold ensemble that predicts new scans, saliency maps."""

from petmonai.inference.views import (  # noqa: F401
    FLIP_PRESETS,
    RandomSlices2D,
    SlidingWindowFlips3D,
    ViewStrategy,
    default_views,
    flips_form_group,
    parse_flips,
    register_views,
    window_starts,
)

from petmonai.inference.predictor import (  # noqa: F401
    FoldModel,
    HeldOutViews,
    InputFile,
    LoadedRun,
    MCI_INDEX,
    PROBABILITIES,
    PROBABILITY_COLUMNS,
    PROVENANCE,
    PredictionResult,
    Prepared,
    SALIENCY_DIR,
    SKIPPED,
    SUBMISSION,
    apply_tracking_affine,
    check_extent,
    check_outputs,
    check_submission_text,
    collect_inputs,
    cpu_has_bf16,
    fold_checkpoints,
    inference_device,
    label_of,
    load_models,
    load_run,
    model_view_probabilities,
    network_view_probabilities,
    optimise_network,
    output_paths,
    parse_set_overrides,
    predict,
    predict_out_of_fold,
    predict_views,
    prediction_provenance,
    prepare_all,
    preprocess_file,
    preprocess_path,
    resolve_options,
    run_threshold,
    sha256_file,
    strategy_name,
    summarise_views,
    torch_threads,
    training_subjects,
)

from petmonai.inference.saliency import (  # noqa: F401
    brain_only,
    gradcam_maps,
    montage_png,
    nifti_bytes,
    resample_to_input,
    saliency_class,
    write_saliency,
)

from petmonai.inference.bundle import (  # noqa: F401
    BUNDLE_COLUMNS,
    ProbabilityWriter,
    ScreenedDataset,
    ViewEnsemble,
    bundle_inputs,
    screen_inputs,
)

from petmonai.inference.bundle_export import (  # noqa: F401
    SCHEMA_FILE,
    SCHEMA_URL,
    export_bundle,
)
