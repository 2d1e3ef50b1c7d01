# checkpoint.pt stays in the run folder but is not a declared output: Snakemake leaves it alone
# when a job fails or is killed, and `fedsweep train` resumes from it when the job is rerun. A
# cell reruns for a changed setting, data set or model too: then its checkpoint is stale, and
# `--stale-checkpoint restart` starts the cell over (saying why in its log).
rule train:
    input:
        unpack(train_inputs),
    output:
        metrics=f"{RESULTS}/runs/{{dataset}}/{{model}}/K{{clients}}_seed{{seed}}/metrics.parquet",
        summary=f"{RESULTS}/runs/{{dataset}}/{{model}}/K{{clients}}_seed{{seed}}/run.json",
    log:
        f"{RESULTS}/logs/train/{{dataset}}/{{model}}/K{{clients}}_seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{dataset}}/{{model}}/K{{clients}}_seed{{seed}}.tsv"
    conda:
        ENV
    threads: config["threads"]["train"]
    resources:
        # SLURM: --gpus, -t and --mem (see profiles/slurm); ignored by local runs.
        gpu=lambda wildcards: cell_resources(wildcards.dataset, wildcards.model)["gpus"],
        runtime=train_runtime,
        mem_mb=lambda wildcards: cell_resources(wildcards.dataset, wildcards.model)[
            "mem_mb"
        ],
    params:
        tokens_dir=lambda wildcards, input: os.path.dirname(input.tokens),
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        spec=lambda wildcards: model_spec(wildcards.model),
        rounds=lambda wildcards: config["datasets"][wildcards.dataset][
            "second_threshold"
        ],
        args=train_args,
        launcher=train_launcher,
    shell:
        show_cause(
            OFFLINE_ENV + " OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"
            " {params.launcher} train --tokens-dir {params.tokens_dir} --shards {input.shards}"
            " --model {params.spec:q} --dataset {wildcards.dataset} --seed {wildcards.seed}"
            " --rounds {params.rounds} {params.args} --progress lines --stale-checkpoint restart"
            " --out-dir {params.out_dir} > {log} 2>&1"
        )
