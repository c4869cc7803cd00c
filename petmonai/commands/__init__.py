"""Commands: the ``petmonai`` command line (:mod:`petmonai.commands.cli`) and the workflows behind it."""

from petmonai.commands.workflows import (  # noqa: F401
    SYNTHETIC_BANNER,
    anchor_folds,
    audit,
    build_template,
    discard_unstarted_run,
    export_scans,
    finish_training,
    prepare_data,
    preprocessed_audit,
    report,
    resolve_data_root,
    resume_training,
    run_resources,
    show_pipeline,
    train,
)

from petmonai.commands.export import (  # noqa: F401
    EXPORTED_CONFIG,
    EXPORTED_DATALIST,
    LOAD_PREPROCESSED,
    export_preprocessed,
    exported_config,
    exported_datalist,
    exported_path,
    nifti_bytes,
)

from petmonai.commands.registry import (  # noqa: F401
    COMMANDS,
    Command,
    command,
    user_errors,
)

from petmonai.commands.cli import (  # noqa: F401
    COMMAND_MODULES,
    anchor_main,
    audit_main,
    bench_main,
    bench_predict_main,
    build_template_main,
    command_main,
    compare_main,
    experiments_main,
    convert_dicom_main,
    export_bundle_main,
    export_main,
    main,
    predict_main,
    report_main,
    show_pipeline_main,
    to_bids_main,
    train3d_main,
)
