# checkpoint.pt stays in the run folder but is not a declared output: Snakemake leaves it alone
# when a job fails or is killed, and `fedsweep train` resumes from it when the job is rerun. A
# cell reruns for a changed setting, data set or model too: then its checkpoint is stale, and
# `--stale-checkpoint restart` starts the cell over (saying why in its log).
#
# A cell whose estimated time exceeds resources.max_runtime runs as a chain of jobs: each
# train_segment job trains up to the round in its marker's name (rounds are not part of the
# checkpoint's settings, so the next job resumes from checkpoint.pt), keeps that job's
# metrics.parquet and run.json under segments/, and the last job (rule train) trains to the
# second threshold. Every other cell is one train job.


# The shell command of a training job. Every job of a cell (each attempt, requeue and chain
# link) appends to one log, train.log in the run folder, which {log} is a hard link to: Snakemake
# deletes {log} before each job, the history stays. A header line per job says which attempt and
# SLURM job it is; `fedsweep train` itself says from which round it resumes. The cell's settings
# are one JSON value ({params.settings}).
TRAIN_JOB = (
    "touch {params.out_dir}/train.log;"
    " ln -f {params.out_dir}/train.log {log} 2>/dev/null || cp {params.out_dir}/train.log {log};"
    " echo \"==== $(date '+%F %T') fedsweep train to round {params.rounds}: attempt {resources.attempt},"
    " SLURM job ${{SLURM_JOB_ID:-none}}"
    '${{SLURM_RESTART_COUNT:+ (requeued ${{SLURM_RESTART_COUNT}}x)}} on $(hostname) ====" >> {log}; '
    + OFFLINE_ENV
    + " OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
    " {params.launcher} train --tokens-dir {params.tokens_dir} --shards {input.shards}"
    " --model {params.spec:q} --dataset {wildcards.dataset} --seed {wildcards.seed}"
    " --algorithm {wildcards.algorithm} --partition {wildcards.partition}"
    " --rounds {params.rounds} --settings {params.settings:q} --progress lines"
    " --stale-checkpoint restart --out-dir {params.out_dir} >> {log} 2>&1"
    # this job's warnings (a diverged cell, earlier results kept aside, another thread count) on
    # the console too: the lines after the log's last header
    " && {{ awk '/^==== /{{n = NR}} {{line[NR] = $0}} END {{for (i = n; i <= NR; i++)"
    " if (line[i] ~ /warning: /) print line[i]}}' {log} >&2 || true; }}"
)


# A chain link keeps its job's metrics and run.json under segments/ and leaves its marker.
KEEP_SEGMENT = (
    " && mv -f {params.out_dir}/metrics.parquet"
    " {params.out_dir}/segments/r{wildcards.rounds}.metrics.parquet"
    " && mv -f {params.out_dir}/run.json"
    " {params.out_dir}/segments/r{wildcards.rounds}.run.json && touch {output}"
)


# What both training rules share: threads, resources (SLURM --gpus, -t, --mem; ignored by local
# runs) and params.
TRAIN_RESOURCES = dict(
    gpu=lambda wildcards: cell_plan(wildcards).gpus,
    # minutes (fedsweep.config.Sweep.job_minutes; a chain link's up to its round)
    runtime=lambda wildcards, attempt: SWEEP.job_minutes(
        cell_of(wildcards),
        int(wildcards.get("rounds", cell_plan(wildcards).rounds)),
        attempt,
    ),
    mem_mb=lambda wildcards: cell_plan(wildcards).mem_mb,
    attempt=lambda wildcards, attempt: attempt,
)
TRAIN_PARAMS = dict(
    tokens_dir=lambda wildcards, input: os.path.dirname(input.tokens),
    out_dir=lambda wildcards: run_dir(cell_of(wildcards)),
    spec=lambda wildcards: model_spec(wildcards.model),
    settings=cell_settings,
    launcher=train_launcher,
)


rule train:
    input:
        unpack(job_inputs),
    output:
        metrics=f"{RESULTS}/runs/{CELL_PATH}/metrics.parquet",
        summary=f"{RESULTS}/runs/{CELL_PATH}/run.json",
        layers=f"{RESULTS}/runs/{CELL_PATH}/layers.parquet",
    log:
        f"{RESULTS}/logs/train/{CELL_PATH}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{CELL_PATH}.tsv"
    conda:
        ENV
    threads: config["threads"]["train"]
    resources:
        **TRAIN_RESOURCES,
    params:
        **TRAIN_PARAMS,
        rounds=lambda wildcards: config["datasets"][wildcards.dataset][
            "second_threshold"
        ],
    shell:
        show_cause(TRAIN_JOB)


rule train_segment:
    input:
        unpack(segment_inputs),
    output:
        f"{RESULTS}/runs/{CELL_PATH}/segments/r{{rounds}}.done",
    log:
        f"{RESULTS}/logs/train/{CELL_PATH}.r{{rounds}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{CELL_PATH}.r{{rounds}}.tsv"
    conda:
        ENV
    threads: config["threads"]["train"]
    resources:
        **TRAIN_RESOURCES,
    params:
        **TRAIN_PARAMS,
        rounds=lambda wildcards: wildcards.rounds,
    shell:
        show_cause(f"{TRAIN_JOB}{KEEP_SEGMENT}")
