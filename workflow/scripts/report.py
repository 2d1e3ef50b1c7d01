"""Rules report and figures: the tables and figures (fedsweep.report.make_report) from a list of
metrics files: the grid's (rule report: its inputs) or those on disk now (rule figures: params)."""

from _entry import run

from fedsweep.report import make_report


def main(snakemake) -> None:
    metrics = list(snakemake.input.get("metrics", None) or snakemake.params.metrics)
    outputs = make_report(metrics, snakemake.input.config, snakemake.params.tables_dir,
                          snakemake.params.figures_dir)
    for name, path in outputs.items():
        print(f"{name}: {path}")


run(snakemake.log[0], lambda: main(snakemake))  # noqa: F821 (Snakemake defines it)
