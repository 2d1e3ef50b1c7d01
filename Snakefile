# fedsweep: federated fine-tuning sweeps (FedAvg over K clients) of Transformer classifiers,
# reproducing Hilmkil et al. 2021. Every computation is a `fedsweep` CLI call; this workflow
# only wires the stages together. See README.md.
from snakemake.utils import min_version

min_version("8.0")


# config/config.yaml is the default; a --configfile given on the command line REPLACES it (instead
# of being merged into it), so `--configfile config/demo.yaml` runs exactly the demo's grid.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/partition.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/slurm.smk"


# With the slurm executor: stop before any job when the cluster would hang or refuse the jobs
# (workflow/rules/slurm.smk, check_cluster).
onstart:
    check_cluster()


# When jobs failed, each one's cause from its logs (under the slurm executor a job's stderr never
# reaches this console): workflow/rules/common.smk, show_failures.
onerror:
    show_failures(log)


rule all:
    default_target: True
    input:
        final_outputs(),
