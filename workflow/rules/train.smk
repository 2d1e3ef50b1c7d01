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
rule train:
    input:
        unpack(train_inputs),
    output:
        metrics=f"{RESULTS}/runs/{CELL_PATH}/metrics.parquet",
        summary=f"{RESULTS}/runs/{CELL_PATH}/run.json",
    log:
        f"{RESULTS}/logs/train/{CELL_PATH}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{CELL_PATH}.tsv"
    conda:
        ENV
    threads: config["threads"]["train"]
    resources:
        # SLURM: --gpus, -t and --mem (see profiles/slurm); ignored by local runs.
        gpu=lambda wildcards: cell_resources(wildcards.dataset, wildcards.model)["gpus"],
        runtime=train_runtime,
        mem_mb=train_mem_mb,
        attempt=lambda wildcards, attempt: attempt,
    params:
        tokens_dir=lambda wildcards, input: os.path.dirname(input.tokens),
        out_dir=cell_run_dir,
        spec=lambda wildcards: model_spec(wildcards.model),
        rounds=lambda wildcards: config["datasets"][wildcards.dataset][
            "second_threshold"
        ],
        args=train_args,
        launcher=train_launcher,
    shell:
        train_shell("{params.rounds}")


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
        gpu=lambda wildcards: cell_resources(wildcards.dataset, wildcards.model)["gpus"],
        runtime=segment_runtime,
        mem_mb=train_mem_mb,
        attempt=lambda wildcards, attempt: attempt,
    params:
        tokens_dir=lambda wildcards, input: os.path.dirname(input.tokens),
        out_dir=cell_run_dir,
        spec=lambda wildcards: model_spec(wildcards.model),
        args=train_args,
        launcher=train_launcher,
    shell:
        train_shell(
            "{wildcards.rounds}",
            then=" && mv -f {params.out_dir}/metrics.parquet"
            " {params.out_dir}/segments/r{wildcards.rounds}.metrics.parquet"
            " && mv -f {params.out_dir}/run.json"
            " {params.out_dir}/segments/r{wildcards.rounds}.run.json && touch {output}",
        )
