"""Studies built on training: 2D vs 3D comparison, preprocessing experiments, calibration, benchmarks."""

from petmonai.studies.bench import (  # noqa: F401
    DENSE_BF16_PEAK,
    DataWaitTimer,
    bare_loop,
    benchmark_precision,
    benchmark_training,
    dense_bf16_peak,
    engine_loop,
    machine,
    matmul_flops,
    peak_rss_gb,
    training_step_flops,
)
from petmonai.studies.calibration import (  # noqa: F401
    SCORES,
    anchor,
    anchored_auc,
    anchored_out_of_fold,
    logit,
    mean_view_scores,
    reference_scores,
    training_scores,
)
from petmonai.studies.compare import (  # noqa: F401
    DEFAULT_MODELS,
    DIFFERENCES,
    MODELS,
    PROTOCOLS,
    QUICK_EPOCHS,
    QUICK_NATIVE,
    REFERENCE,
    check_run_model,
    compare,
    comparison_markdown,
    mean_training_loss,
    model_entry,
    paired_difference,
    parse_models,
    plot_comparison,
    plot_losses,
    protocol_results,
    quick_overrides,
    run_complete,
    split_spread,
    train_model,
    train_run,
)
from petmonai.studies.experiments import (  # noqa: F401
    PROTOCOL_ORDER,
    run_experiments,
    write_table,
)
from petmonai.studies.scale import (  # noqa: F401
    DEFAULT_SIZES,
    TARGETS,
    bench_scale,
    check_targets,
)
from petmonai.studies.scale_report import (  # noqa: F401
    render_docs,
    render_table,
)
