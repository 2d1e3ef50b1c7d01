"""Rule report_config: write the effective config's report settings and grid (params.config,
a mapping built in workflow/rules/common.smk) as YAML, atomically."""

from _entry import run

from fedsweep.io import atomic_path


def main(snakemake) -> None:
    import yaml

    with atomic_path(snakemake.output[0]) as tmp:
        tmp.write_text(yaml.safe_dump(dict(snakemake.params.config), sort_keys=False))


run(snakemake.log[0], lambda: main(snakemake))  # noqa: F821 (Snakemake defines it)
