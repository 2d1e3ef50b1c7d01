# Downloads run on the head node (compute nodes often have no internet), into HF_HOME.
localrules:
    prepare_data,
    fetch_model,


# A local data set's files are inputs: editing one reruns its data, tokens, shards and cells.
rule prepare_data:
    input:
        lambda wildcards: SWEEP.data_files.get(wildcards.dataset, []),
    output:
        train=f"{RESULTS}/data/{{dataset}}/train.parquet",
        test=f"{RESULTS}/data/{{dataset}}/test.parquet",
        meta=f"{RESULTS}/data/{{dataset}}/meta.json",
    log:
        f"{RESULTS}/logs/prepare_data/{{dataset}}.log",
    conda:
        ENV
    params:
        spec=lambda wildcards: json.dumps(
            config["datasets"][wildcards.dataset].get("spec", {}), sort_keys=True
        ),
        # the files' content: one replaced by a file with an older mtime reruns it too
        digests=lambda wildcards: SWEEP.data_digests.get(wildcards.dataset),
        out_dir=lambda wildcards, output: os.path.dirname(output.meta),
    shell:
        show_cause(
            ONLINE_ENV
            + " fedsweep prepare --name {wildcards.dataset} --spec {params.spec:q}"
            " --out-dir {params.out_dir} > {log} 2>&1"
            # its warnings (test texts in the training set, ...) on the console too, not only the log
            " && {{ grep -h '^fedsweep: warning' {log} >&2 || true; }}"
        )


# A model's weights and tokenizer into the cache (a no-op record for bundled, tiny and local
# ones), checking the longest max_length against its positions. A local model folder's files
# are inputs: editing them reruns the cells of that model.
rule fetch_model:
    input:
        lambda wildcards: SWEEP.model_files.get(wildcards.spec_slug, []),
    output:
        f"{RESULTS}/models/{{spec_slug}}.json",
    log:
        f"{RESULTS}/logs/fetch_model/{{spec_slug}}.log",
    conda:
        ENV
    params:
        spec=lambda wildcards: FETCH[wildcards.spec_slug],
        digests=lambda wildcards: SWEEP.model_digests.get(wildcards.spec_slug),
        max_length=lambda wildcards: max_length_of_spec(FETCH[wildcards.spec_slug]),
    shell:
        show_cause(
            ONLINE_ENV
            + " fedsweep fetch --model {params.spec:q} --max-length {params.max_length}"
            " --out {output} > {log} 2>&1"
        )


rule tokenize:
    input:
        tokenizer=f"{RESULTS}/models/{{tokenizer}}.json",
        train=f"{RESULTS}/data/{{dataset}}/train.parquet",
        test=f"{RESULTS}/data/{{dataset}}/test.parquet",
        meta=f"{RESULTS}/data/{{dataset}}/meta.json",
    output:
        train=f"{RESULTS}/tokens/{{dataset}}/{{tokenizer}}_L{{max_length}}/train.parquet",
        test=f"{RESULTS}/tokens/{{dataset}}/{{tokenizer}}_L{{max_length}}/test.parquet",
        meta=f"{RESULTS}/tokens/{{dataset}}/{{tokenizer}}_L{{max_length}}/meta.json",
    log:
        f"{RESULTS}/logs/tokenize/{{dataset}}/{{tokenizer}}_L{{max_length}}.log",
    conda:
        ENV
    threads: config["threads"]["tokenize"]
    resources:
        runtime=tokenize_runtime,
        # grouped SLURM jobs (profiles/slurm: resources serial=1) run one after another
        serial=1,
    params:
        tokenizer=lambda wildcards: TOKENIZERS[wildcards.tokenizer],
        data_dir=lambda wildcards, input: os.path.dirname(input.meta),
        out_dir=lambda wildcards, output: os.path.dirname(output.meta),
    shell:
        show_cause(
            OFFLINE_ENV + " RAYON_NUM_THREADS={threads} OMP_NUM_THREADS={threads}"
            " fedsweep tokenize --data-dir {params.data_dir} --tokenizer {params.tokenizer:q}"
            " --max-length {wildcards.max_length} --out-dir {params.out_dir} > {log} 2>&1"
        )
