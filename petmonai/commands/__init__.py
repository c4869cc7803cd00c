"""Commands: the ``petmonai`` command line and the workflows behind it."""

from petmonai.commands.workflows import (  # noqa: F401
    SYNTHETIC_BANNER,
    audit_command,
    cli_overrides,
    discard_unstarted_run,
    finish_training,
    prepare_data,
    preprocessed_audit,
    resolve_data_root,
    resume_command,
    run_resources,
    train_command,
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

from petmonai.commands.cli import (  # noqa: F401
    add_training_options,
    anchor_main,
    audit_main,
    build_template_main,
    compare_main,
    export_main,
    train3d_main,
    user_errors,
)
