rule partition:
    input:
        train=f"{RESULTS}/data/{{dataset}}/train.parquet",
        meta=f"{RESULTS}/data/{{dataset}}/meta.json",
    output:
        f"{RESULTS}/shards/{{dataset}}/{{partition}}_K{{clients}}_seed{{seed}}.parquet",
    log:
        f"{RESULTS}/logs/partition/{{dataset}}/{{partition}}_K{{clients}}_seed{{seed}}.log",
    conda:
        ENV
    resources:
        runtime=10,  # minutes (SLURM -t); summed when jobs are grouped
        # grouped SLURM jobs (profiles/slurm: resources serial=1) run one after another
        serial=1,
    params:
        data_dir=lambda wildcards, input: os.path.dirname(input.meta),
        # the partition's scheme and parameters (fedsweep.config.Sweep.partition_args)
        args=lambda wc: SWEEP.partition_args(
            wc.dataset, wc.partition, wc.clients, wc.seed
        ),
    shell:
        show_cause(
            OFFLINE_ENV
            + " fedsweep partition --data-dir {params.data_dir} --clients {wildcards.clients}"
            " --seed {wildcards.seed} {params.args}"
            " --out {output} > {log} 2>&1"
        )
