"""The Markdown table, the log-log figure and the ``docs/scale.md`` page of ``petmonai bench-scale``
(:mod:`petmonai.studies.scale`), rendered from its JSON only: every figure shown is one of the JSON's,
formatted by :func:`fmt`.

>>> fmt(0.000123456), fmt(1234.5), fmt(12)
('0.0001235', '1234', '12')
"""

from __future__ import annotations

from pathlib import Path

#: the cohort sizes measured by default
DEFAULT_SIZES = (100, 400, 1600)

#: the table's columns: (JSON key of a row, heading)
COLUMNS = (
    ("n", "scans N"),
    ("generate_s_per_scan", "generate s/scan"),
    ("cold_s_per_scan_w1", "cold preprocess s/scan, 1 worker"),
    ("cold_s_per_scan_w2", "cold preprocess s/scan, 2 workers"),
    ("worker_efficiency", "1 -> 2 worker efficiency"),
    ("registered_s_per_scan_w1", "registrations cached s/scan, 1 worker"),
    ("registered_s_per_scan_w2", "registrations cached s/scan, 2 workers"),
    ("warm_s_per_scan_w1", "warm (volume cache) s/scan, 1 worker"),
    ("cache_bytes_per_scan", "disk cache bytes/scan"),
    ("epoch_s", "epoch s"),
    ("epoch_s_per_scan", "epoch s/training scan"),
    ("predict_volumes_per_s", "prediction volumes/s"),
    ("peak_rss_mb", "training peak RSS MB (disk cache)"),
)


def fmt(value) -> str:
    """Every number of the report, written the same way (4 significant digits)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def render_table(results: dict) -> str:
    """``scale.md``: the measurements (one column per N) and the targets."""
    rows = results["rows"]
    keys = [(k, h) for k, h in COLUMNS if any(k in r for r in rows)]
    lines = [("| figure | " + " | ".join(f"N={r['n']}" for r in rows) + " |"), "|---|" + "---|" * len(rows)]
    lines += [f"| {heading} | " + " | ".join(fmt(r[key]) if key in r else "" for r in rows) + " |"
              for key, heading in keys[1:]]
    lines += ["", "| target | value | wanted | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {fmt(t['value'])} | {t['target']} | {'yes' if t['ok'] else 'NO'} |"
              for name, t in results["targets"].items()]
    ddp = results.get("torchrun")
    if ddp:
        lines += ["", (f"torchrun, {ddp['processes']} gloo processes, first use of N={ddp['n']} scans: each scan "
                       f"once (split) {fmt(ddp['split_s'])} s, every rank every scan (before) {fmt(ddp['all_s'])} s: "
                       f"{fmt(results['targets']['torchrun_first_use_time_share']['value'])} of the time "
                       f"(speedup {fmt(ddp['speedup'])}).")]
    m = results["machine"]
    return (f"# Scale benchmark\n\nCommand: `{results['command']}`\n\nMachine: {m['cpu']}, {results['cores']} cores, "
            f"{m['memory_gb']} GB RAM, GPU: {m['gpu'] or 'none'}; training device {results['options']['device']}, "
            f"{results['options']['epochs']} epoch(s) of fold 0.\n\n" + "\n".join(lines) + "\n")


def plot_scale(results: dict, path: str | Path) -> Path:
    """Log-log: seconds (generation, cold preprocessing, epoch) and peak memory against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from petmonai.runs import save_figure

    rows = results["rows"]
    n = [r["n"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("generate_s_per_scan", "generate"), ("cold_s_per_scan_w1", "cold preprocess, 1 worker"),
                       ("cold_s_per_scan_w2", "cold preprocess, 2 workers"),
                       ("warm_s_per_scan_w1", "warm (volume cache)")):
        if all(key in r for r in rows):
            ax_t.plot(n, [r[key] * r["n"] for r in rows], "o-", label=label)
    ax_t.plot(n, [r["epoch_s"] for r in rows], "o-", label="training epoch")
    ax_t.set(xscale="log", yscale="log", xlabel="scans N", ylabel="seconds", title="time against N")
    ax_t.legend(fontsize=8)
    ax_m.plot(n, [r["peak_rss_mb"] for r in rows], "o-", label="training peak RSS (disk cache)")
    ax_m.plot(n, [r["cache_bytes_per_scan"] * r["n"] / 2**20 for r in rows], "s--", label="disk cache size")
    ax_m.set(xscale="log", yscale="log", xlabel="scans N", ylabel="MB", title="memory and disk against N")
    ax_m.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def estimate(results: dict, scans: int = 10_000, cores: int = 16) -> dict:
    """Linear extrapolation from the per-scan costs at the largest N (:func:`render_docs` states the assumptions)."""
    large = results["rows"][-1]
    eff = large.get("worker_efficiency", 1.0)
    return {
        "scans": scans, "cores": cores,
        "preprocess_h": scans * large["cold_s_per_scan_w1"] / (cores * eff) / 3600,
        "warm_start_min": scans * large["warm_s_per_scan_w1"] / 60,
        "cache_gb": scans * large["cache_bytes_per_scan"] / 1e9,
        "memory_cache_gb_per_process": scans * large["cache_bytes_per_scan"] / 1e9,
        "cpu_epoch_min": scans * 0.8 * large["epoch_s_per_scan"] / 60,
        "peak_rss_mb": large["peak_rss_mb"],
        "efficiency": eff,
    }


NOT_MEASURED = """Not measured yet. The benchmark at N = 100, 400 and 1600 (cold and warm preprocessing with 1 and 2
workers, about 2,100 cold registrations) takes about two hours on a 2-core machine; until it has run,
this page states no figures. The command above writes them here, with a log-log plot of time and
memory against N and a worked estimate for 10,000 scans on a 16-core GPU node.
"""


def render_docs(results: dict | None) -> str:
    """``docs/scale.md``; without results, the page says what is measured and how, and no figure."""
    if results is None:
        command = "petmonai bench-scale --sizes " + " ".join(map(str, DEFAULT_SIZES)) + " --docs docs/scale.md"
        return _docs_intro(command) + "## Measurements\n\n" + NOT_MEASURED
    return _docs_intro(results["command"]) + _docs_measured(render_table(results).split("\n", 2)[2],
                                                            estimate(results))


def _docs_intro(command: str) -> str:
    return f"""# Scaling to large cohorts

How preprocessing, training and prediction grow with the number of scans N, measured by
`{command}` (synthetic phantoms; this page is generated: rebuild it with the same command).

## How petmonai scales

- **Preprocessing runs once per scan**, in `data.preprocess_workers` processes (default `auto`: the
  cores available; one torch thread each), ahead of training with `petmonai preprocess` or on the
  first training run. Registrations are cached on disk (`template.cache_dir`).
- **`data.cache: disk`** keeps the preprocessed volumes in `data.cache_dir` (default
  `$PETMONAI_CACHE/volumes`), one file per scan keyed by the input file's SHA-256 and a digest of the
  resolved `preprocess` stages: a changed setting or file never reads a stale entry, entries are
  written whole (temporary file, then rename), so a killed preprocessing resumes with the missing
  scans only. Training reads each item from disk per step: its memory does not grow with N.
- **Under torchrun** the processes split the scans, each preprocesses its share into the shared
  on-disk cache (it must be one folder that every process sees), and after a barrier all read it:
  every scan is registered once, not once per process.

"""


def _docs_measured(table: str, e: dict) -> str:
    def v(key):
        return fmt(e[key])

    return f"""## Measurements

{table}
![time and memory against N](scale.png)

## Worked estimate: 10,000 scans on a 16-core GPU node

| | estimate |
|---|---|
| first preprocessing, 16 worker processes | {v('preprocess_h')} h |
| later runs: checking the on-disk cache | {v('warm_start_min')} min |
| on-disk cache | {v('cache_gb')} GB |
| in-memory cache (`data.cache: memory`), per training process | {v('memory_cache_gb_per_process')} GB |
| training epoch (80% of the scans) on this benchmark's CPU: an upper bound for a GPU | {v('cpu_epoch_min')} min |
| training process peak memory with `data.cache: disk` | {v('peak_rss_mb')} MB |

Assumptions: linear extrapolation from the per-scan costs measured at the largest N (the targets
above check that they are constant in N); 16 workers as efficient as the measured 1 -> 2 step
({v('efficiency')}), which is optimistic where memory bandwidth or the file system limits; the same
scan size and preprocessing as the benchmark (the default config, registration at 6 mm, its
correlation check off: the threshold was set on real scans, and 1 of the first 100 phantoms falls
below it; it is registered, and costs, all the same); the GPU's training speed is not measured
here (see gpu.md), so the CPU epoch time is an upper bound.
"""
