# All three read small files (the config, the cells' metrics) and plot for a minute at most: on the
# head node they start at once, where a cluster job would first wait in the queue.
localrules:
    report_config,
    report,
    figures,


# The effective config (the config files, --config overrides and the schema's defaults) that
# `fedsweep report` reads for budgets, second thresholds and the target fraction.
rule report_config:
    output:
        f"{RESULTS}/report_config.yaml",
    log:
        f"{RESULTS}/logs/report/report_config.log",
    conda:
        ENV
    params:
        config=sweep_config.report_settings(config, CELLS),
    script:
        "../scripts/report_config.py"


# Tables and figures of the whole grid: needs (and so schedules) every cell.
rule report:
    input:
        metrics=all_metrics(),
        config=f"{RESULTS}/report_config.yaml",
    output:
        **report_outputs(),
    log:
        f"{RESULTS}/logs/report/report.log",
    conda:
        ENV
    params:
        tables_dir=lambda wildcards, output: os.path.dirname(output.accuracy_at_budget),
        figures_dir=lambda wildcards, output: os.path.dirname(
            output.accuracy_vs_clients_png
        ),
    script:
        "../scripts/report.py"


# `snakemake figures`: the same tables and figures from whatever metrics.parquet exist now
# under results/runs (globbed when the DAG is built). They are params, not inputs: as inputs
# they would tie this job to the train rule, which would rerun cells (and rebuild their data,
# tokens and shards) whenever the config changed. The stamp (paths, sizes, mtimes) reruns
# this job when any metrics file is added or rewritten.
rule figures:
    input:
        config=f"{RESULTS}/report_config.yaml",
    output:
        **report_outputs(),
    log:
        f"{RESULTS}/logs/report/figures.log",
    conda:
        ENV
    params:
        metrics=cached_metrics,
        stamp=lambda wildcards: sweep_report.metrics_stamp(cached_metrics(wildcards)),
        tables_dir=lambda wildcards, output: os.path.dirname(output.accuracy_at_budget),
        figures_dir=lambda wildcards, output: os.path.dirname(
            output.accuracy_vs_clients_png
        ),
    script:
        "../scripts/report.py"


ruleorder: report > figures
