"""Broken configs and inputs stop the workflow before any job, with one line naming the field.

A corpus of broken configs (schema and cross-field mistakes, NaN/inf, empty specs, bad
results_dir, local data files that are missing or too small for K, local model folders that are
missing or too short for max_length). Every case runs in-process through the config layer
(fedsweep.config.load, what the Snakefile calls before any job) and must raise exactly the
expected `config: ...` line. A few cases go through the wiring too: a real `snakemake --cores 1`
(not a dry run: the error must come before any job could start) in a fresh copy of the workflow
prints the same line, starts no job and leaves no output, and `fedsweep check` and `fedsweep
cluster-check` print the same line.

What changed or bad inputs do to a run through a real `snakemake` is in test_input_changes.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import copy_workflow, local_csv, small_config, snakemake, write_config, write_inputs

from fedsweep import FedsweepError
from fedsweep.cli import main
from fedsweep.config import load


def base_config() -> dict:
    return small_config()


def _set(path: str, value):
    """A change: set config[path] (dotted keys) to value."""
    def change(c: dict) -> None:
        *parents, last = path.split(".")
        node = c
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return change


def _delete(path: str):
    def change(c: dict) -> None:
        *parents, last = path.split(".")
        node = c
        for key in parents:
            node = node[key]
        del node[last]
    return change


def _dataset(name: str, entry: dict):
    def change(c: dict) -> None:
        c["datasets"] = {name: entry}
    return change


def _model(name: str, entry: dict):
    def change(c: dict) -> None:
        c["models"] = {name: entry}
    return change


def _both(*changes):
    def change(c: dict) -> None:
        for ch in changes:
            ch(c)
    return change


W = "{work}"  # the case's workdir, filled in when the expectation is checked
SYN = {"source": "synthetic", "num_classes": 4, "train_size": 128, "test_size": 64}

# (id, change to base_config(), the exact `config: ...` line)
CASES = [
    # the schema: types, ranges, names, unknown keys
    ("unknown-top-key", _set("modelz", {}),
     "config: (top level): Additional properties are not allowed ('modelz' was unexpected)"),
    ("no-datasets", _delete("datasets"), "config: (top level): 'datasets' is a required property"),
    ("no-budget", _delete("datasets.synthetic.budget"),
     "config: datasets.synthetic: 'budget' is a required property"),
    ("unknown-train-key", _set("train.learning_rate", 0.1),
     "config: train: Additional properties are not allowed ('learning_rate' was unexpected)"),
    ("lr-negative", _set("models.tiny-bert.train.lr", -1),
     "config: models.tiny-bert.train.lr=-1: -1 is less than or equal to the minimum of 0"),
    ("lr-string", _set("train.lr", "fast"), "config: train.lr='fast': 'fast' is not of type 'number'"),
    ("lr-exponent-without-point", _set("train.lr", "1e-5"),  # what YAML 1.1 makes of `lr: 1e-5`
     "config: train.lr='1e-5': '1e-5' is not of type 'number' (YAML reads a number without a '.' before its "
     "exponent as text: write 1.0e-5)"),
    ("epochs-zero", _set("train.epochs", 0), "config: train.epochs=0: 0 is less than the minimum of 1"),
    ("batch-size-float", _set("train.batch_size", 16.5),
     "config: train.batch_size=16.5: 16.5 is not of type 'integer'"),
    ("max-length-1", _set("train.max_length", 1), "config: train.max_length=1: 1 is less than the minimum of 2"),
    ("protocol", _set("train.protocol", "fast"),
     "config: train.protocol='fast': 'fast' is not one of ['standard', 'paper']"),
    ("precision", _set("train.precision", "fp16"),
     "config: train.precision='fp16': 'fp16' is not one of ['auto', 'fp32', 'tf32', 'bf16']"),
    ("target-fraction", _set("target_fraction", 1.5),
     "config: target_fraction=1.5: 1.5 is greater than the maximum of 1"),
    ("threads-zero", _set("threads.train", 0), "config: threads.train=0: 0 is less than the minimum of 1"),
    ("gpus-negative", _set("resources.gpus", -1), "config: resources.gpus=-1: -1 is less than the minimum of 0"),
    ("model-slug", _model("bad/name", {"spec": "tiny-bert"}),
     "config: models: name 'bad/name' is not a filesystem-safe slug (letters, digits, '.', '_', '-'; "
     "starting with a letter or digit)"),
    ("override-unknown-key", _set("overrides", [{"set": {"lrate": 1}}]),
     "config: overrides[0].set: Additional properties are not allowed ('lrate' was unexpected)"),
    # NaN and infinity pass JSON Schema's bounds: caught by the cross-field checks
    ("lr-nan", _set("train.lr", float("nan")), "config: train.lr=nan must be a finite number"),
    ("lr-inf", _set("models.tiny-bert.train.lr", float("inf")),
     "config: models.tiny-bert.train.lr=inf must be a finite number"),
    ("override-lr-nan", _set("overrides", [{"clients": 2, "set": {"lr": float("nan")}}]),
     "config: overrides[0].set.lr=nan must be a finite number"),
    ("throughput-inf", _set("resources.throughput", float("inf")),
     "config: resources.throughput=inf must be a finite number"),
    # cross-field checks
    ("clients-zero", _set("clients", [0, 2]), "config: clients=[0, 2]: every K must be an integer >= 1 (got 0)"),
    ("clients-repeated", _set("clients", [1, 1]), "config: clients=[1, 1]: values must be distinct"),
    ("seeds-repeated", _set("seeds", [3, 3]), "config: seeds=[3, 3]: values must be distinct"),
    ("budget-above-threshold", _set("datasets.synthetic.budget", 5),
     "config: datasets.synthetic.budget=5 exceeds datasets.synthetic.second_threshold=2"),
    ("override-model", _set("overrides", [{"model": "bert", "set": {"lr": 0.1}}]),
     "config: overrides[0].model='bert' is not in the config's models (tiny-bert)"),
    ("override-clients", _set("overrides", [{"clients": [2, 64], "set": {"lr": 0.1}}]),
     "config: overrides[0].clients=64 is not in the config's clients (1, 2)"),
    ("dirichlet-no-alpha", _set("partition", {"scheme": "dirichlet"}),
     "config: partition.alpha is required with partition.scheme=dirichlet"),
    ("iid-with-alpha", _set("partition", {"scheme": "iid", "alpha": 0.5}),
     "config: partition.alpha=0.5 is only used with partition.scheme=dirichlet / quantity_skew"),
    # algorithms and partitions (fedsweep.grid)
    ("algorithm-unknown-strategy", _set("algorithms", {"fast": {"strategy": "fedsgd"}}),
     "config: algorithms.fast.strategy='fedsgd': 'fedsgd' is not one of "
     "['fedavg', 'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad']"),
    ("algorithm-adam-no-server-lr", _set("algorithms", {"fedadam": {"strategy": "fedadam"}}),
     "config: algorithms.fedadam.server_lr=None must be set for strategy='fedadam' (a positive number; Reddi "
     "et al. tune it per task, e.g. 1e-3 to 1e-1)"),
    ("algorithm-mu-without-fedprox", _set("algorithms", {"prox": {"mu": 0.01}}),
     "config: algorithms.prox.mu=0.01 is FedProx's setting, not of client='plain' (use client=fedprox)"),
    ("algorithm-adaptive-convention-value",
     _set("algorithms", {"a": {"strategy": "fedadam", "server_lr": 0.01, "adaptive_convention": "kingma"}}),
     "config: algorithms.a.adaptive_convention='kingma': 'kingma' is not one of ['reddi', 'flower']"),
    ("algorithm-adaptive-convention-on-fedavgm",
     _set("algorithms", {"m": {"strategy": "fedavgm", "adaptive_convention": "flower"}}),
     "config: algorithms.m.adaptive_convention='flower' is a setting of strategy fedadam / fedyogi / fedadagrad, "
     "not of strategy='fedavgm'"),
    ("algorithm-flower-fedadagrad-with-momentum",
     _set("algorithms", {"g": {"strategy": "fedadagrad", "server_lr": 0.1, "adaptive_convention": "flower"}}),
     "config: algorithms.g.beta1=0.9 must be 0 with strategy='fedadagrad' and adaptive_convention='flower' "
     "(Flower's FedAdagrad has no first moment)"),
    ("algorithm-scaffold-weighting-value",
     _set("algorithms", {"s": {"client": "scaffold", "scaffold_weighting": "equal"}}),
     "config: algorithms.s.scaffold_weighting='equal': 'equal' is not one of ['size', 'uniform']"),
    ("algorithm-scaffold-weighting-without-scaffold", _set("algorithms", {"u": {"scaffold_weighting": "uniform"}}),
     "config: algorithms.u.scaffold_weighting='uniform' is SCAFFOLD's setting, not of client='plain' "
     "(use client=scaffold)"),
    ("algorithm-scaffold-weighting-with-fedprox",
     _set("algorithms", {"p": {"client": "fedprox", "mu": 0.1, "scaffold_weighting": "uniform"}}),
     "config: algorithms.p.scaffold_weighting='uniform' is SCAFFOLD's setting, not of client='fedprox' "
     "(use client=scaffold)"),
    ("algorithm-slug", _set("algorithms", {"fed avg": {}}),
     "config: algorithms: name 'fed avg' is not a filesystem-safe slug (letters, digits, '.', '_', '-'; "
     "starting with a letter or digit)"),
    ("algorithm-restricted-to-unknown-model", _set("algorithms", {"prox": {"client": "fedprox", "models": "bert"}}),
     "config: algorithms.prox.models: 'bert' is not in the config's models (tiny-bert)"),
    ("partition-and-partitions", lambda c: c.update(partition={"scheme": "iid"}, partitions={"iid": {}}),
     "config: partition and partitions are both set; give one (partition is a single entry of partitions)"),
    ("partition-shards-with-alpha", _set("partitions", {"patho": {"scheme": "shards", "alpha": 0.1}}),
     "config: partitions.patho.alpha=0.1 is only used with partitions.patho.scheme=dirichlet / quantity_skew"),
    ("partition-lognormal-no-sigma",
     _set("partitions", {"skew": {"scheme": "quantity_skew", "size_distribution": "lognormal"}}),
     "config: partitions.skew.sigma is required with partitions.skew.size_distribution=lognormal"),
    ("partition-per-client-too-many", _set("partitions", {"weak": {"scheme": "iid", "per_client": 100}}),
     "config: partitions.weak.per_client=100 x clients=2 needs 200 training rows; datasets.synthetic has 128"),
    ("partition-per-client-below-batch", _set("partitions", {"weak": {"scheme": "iid", "per_client": 8}}),
     "config: partitions.weak.per_client=8 is smaller than batch_size=16 (model tiny-bert, datasets.synthetic)"),
    ("override-unknown-algorithm", _set("overrides", [{"algorithm": "fedprox", "set": {"lr": 0.1}}]),
     "config: overrides[0].algorithm='fedprox' is not in the config's algorithms (fedavg)"),
    ("model-seeds-repeated", _set("models.tiny-bert.seeds", [1, 1]),
     "config: models.tiny-bert.seeds=[1, 1]: values must be distinct"),
    # empty specs and output folders
    ("spec-empty", _set("models.tiny-bert.spec", ""), "config: models.tiny-bert.spec='' must not be empty"),
    ("tokenizer-empty", _set("models.tiny-bert.tokenizer", " "),
     "config: models.tiny-bert.tokenizer=' ' must not be empty"),
    ("results-dir-empty", _set("results_dir", ""), "config: results_dir='' must not be empty"),
    ("results-dir-file", _set("results_dir", "afile"), "config: results_dir='afile' exists and is not a folder"),
    ("hf-home-file", _set("hf_home", "afile"), "config: hf_home='afile' exists and is not a folder"),
    # data set specs, checked as `fedsweep prepare` checks them, before any job
    ("source-unknown", _set("datasets.synthetic.spec.source", "kaggle"),
     "config: datasets.synthetic.spec.source='kaggle': 'kaggle' is not one of ['hub', 'local', 'synthetic']"),
    ("synthetic-unknown-key", _set("datasets.synthetic.spec.num_class", 4),
     "config: datasets.synthetic.spec: Additional properties are not allowed ('num_class' was unexpected)"),
    ("no-spec-no-preset", _dataset("mydata", {"budget": 1, "second_threshold": 1}),
     "config: datasets.mydata.spec: unknown data set (no spec given and no preset; presets: ag_news, imdb, "
     "yelp_review_full)"),
    ("hub-without-id", _dataset("mydata", {"spec": {"source": "hub"}, "budget": 1, "second_threshold": 1}),
     "config: datasets.mydata.spec: source=hub needs hub_id"),
    ("max-train-zero", _set("datasets.synthetic.spec.max_train", 0),
     "config: datasets.synthetic.spec: max_train=0 must be a positive integer"),
    ("local-unknown-key", _dataset("mine", {**local_csv(300), "spec": {**local_csv(300)["spec"], "max_trian": 50}}),
     "config: datasets.mine.spec: Additional properties are not allowed ('max_trian' was unexpected)"),
    ("hub-unknown-key", _dataset("imdb", {"spec": {"max_trian": 50}, "budget": 1, "second_threshold": 1}),
     "config: datasets.imdb.spec: Additional properties are not allowed ('max_trian' was unexpected)"),
    ("local-missing-file", _dataset("mine", local_csv(300, "nothere.csv")),
     f"config: datasets.mine.spec: {W}/data/300_nothere.csv: train file does not exist"),
    ("local-empty-file", _dataset("mine", {**local_csv(300), "spec": {**local_csv(300)["spec"], "test": "afile0"}}),
     f"config: datasets.mine.spec: {W}/afile0: test file is empty (0 bytes)"),
    ("local-unknown-format", _dataset("mine", {**local_csv(300), "spec": {**local_csv(300)["spec"], "test": "afile"}}),
     f"config: datasets.mine.spec: {W}/afile: unknown format '' (expected .parquet, .csv, .tsv, .jsonl or .json; "
     "text files may end in .gz, .bz2 or .xz)"),
    ("local-garbage-parquet", _dataset("mine", {**local_csv(300), "spec": {**local_csv(300)["spec"],
                                                                          "train": "data/garbage.parquet"}}),
     f"config: datasets.mine.spec: {W}/data/garbage.parquet: not a readable Parquet file "
     "(no Parquet footer: truncated, or not Parquet at all)"),
    ("local-class-names-duplicated", _dataset("mine", {**local_csv(300), "spec": {**local_csv(300)["spec"],
                                                                                "class_names": ["a", "b", "a"]}}),
     "config: datasets.mine.spec: class_names has duplicates: 'a'"),
    ("local-k-above-rows", _both(_dataset("mine", local_csv(40)), _set("clients", [1, 64])),
     "config: clients=64 exceeds the 40 training rows of datasets.mine"),
    ("local-shards-below-batch", _both(_dataset("mine", local_csv(40)), _set("clients", [1, 4])),
     "config: clients=4 splits the 40 training rows of datasets.mine into shards smaller than batch_size=16 "
     "(model tiny-bert)"),
    ("local-max-train-small", _both(
        _dataset("mine", {**local_csv(300), "spec": {**local_csv(300)["spec"], "max_train": 20}}),
        _set("clients", [1, 2])),
     "config: clients=2 splits the 20 training rows of datasets.mine into shards smaller than batch_size=16 "
     "(model tiny-bert)"),
    ("local-parquet-shards", _both(
        _dataset("mine", {"spec": {"source": "local", "train": "data/50.parquet", "test": "data/test.csv"},
                          "budget": 1, "second_threshold": 1}),
        _set("clients", [1, 4])),
     "config: clients=4 splits the 50 training rows of datasets.mine into shards smaller than batch_size=16 "
     "(model tiny-bert)"),
    ("synthetic-k-above-rows", _set("clients", [1, 200]),
     "config: clients=200 exceeds the 128 training rows of datasets.synthetic"),
    ("synthetic-shards-below-batch", _set("clients", [1, 16]),
     "config: clients=16 splits the 128 training rows of datasets.synthetic into shards smaller than "
     "batch_size=16 (model tiny-bert)"),
    # local model folders and positions
    ("model-dir-missing", _model("mine", {"spec": "./models/nothere", "tokenizer": "minilm"}),
     f"config: models.mine.spec='./models/nothere': directory '{W}/models/nothere' does not exist"),
    ("model-dir-no-config", _model("mine", {"spec": "./models/empty", "tokenizer": "minilm"}),
     f"config: models.mine.spec='./models/empty': directory '{W}/models/empty' has no config.json "
     "(save it with save_pretrained)"),
    ("tokenizer-dir-missing", _model("tiny-bert", {"tokenizer": "/nonexistent/tok"}),
     "config: models.tiny-bert.tokenizer='/nonexistent/tok': directory '/nonexistent/tok' does not exist"),
    ("max-length-above-positions", _set("train.max_length", 600),
     "config: models.tiny-bert: max_length=600 exceeds model 'tiny-bert''s 512 positions (dataset synthetic, K=1)"),
    ("local-model-short-positions", _model("short", {"spec": "./models/short", "tokenizer": "minilm"}),
     "config: models.short: max_length=32 exceeds model './models/short''s 16 positions (dataset synthetic, K=1)"),
    ("override-max-length", _set("overrides", [{"clients": 2, "set": {"max_length": 1024}}]),
     "config: models.tiny-bert: max_length=1024 exceeds model 'tiny-bert''s 512 positions (dataset synthetic, K=2)"),
    # floats where integers are meant: JSON Schema's "integer" admits 1.0; fedsweep's does not
    ("clients-float", _set("clients", [1.0, 2]), "config: clients[0]=1.0: 1.0 is not of type 'integer'"),
    ("seeds-float", _set("seeds", [0.0]), "config: seeds[0]=0.0: 0.0 is not of type 'integer'"),
    ("max-length-float", _set("train.max_length", 16.0),
     "config: train.max_length=16.0: 16.0 is not of type 'integer'"),
    ("batch-size-whole-float", _set("train.batch_size", 4.0),
     "config: train.batch_size=4.0: 4.0 is not of type 'integer'"),
    ("second-threshold-float", _set("datasets.synthetic.second_threshold", 2.0),
     "config: datasets.synthetic.second_threshold=2.0: 2.0 is not of type 'integer'"),
    ("budget-float", _set("datasets.synthetic.budget", 1.0),
     "config: datasets.synthetic.budget=1.0: 1.0 is not of type 'integer'"),
    ("model-seeds-float", _set("models.tiny-bert.seeds", [1.0]),
     "config: models.tiny-bert.seeds[0]=1.0: 1.0 is not of type 'integer'"),
    # keys YAML reads as booleans or numbers (unquoted on/off/yes/no, 2021)
    ("partition-key-bool", _set("partitions", {True: {"scheme": "iid"}}),
     "config: partitions: the key True is a boolean, not a name (YAML reads unquoted on/off/yes/no as booleans "
     "and digits as numbers): quote it"),
    ("dataset-key-number", _dataset(2021, {"spec": SYN, "budget": 1, "second_threshold": 1}),
     "config: datasets: the key 2021 is a number, not a name (YAML reads unquoted on/off/yes/no as booleans "
     "and digits as numbers): quote it"),
    # settings that would do nothing
    ("overrides-empty-list", _set("overrides", [{"clients": [], "set": {"lr": 0.1}}]),
     "config: overrides[0].clients=[]: [] is not valid under any of the given schemas"),
    ("peft-none-with-rank", _set("models.tiny-bert.peft", {"method": "none", "r": 4}),
     "config: models.tiny-bert.peft: r=4 is a LoRA setting, but method=none (use method: lora)"),
    ("warmup-as-long-as-the-cell", _set("algorithms", {"warm": {"lr_schedule": "linear", "warmup_rounds": 2}}),
     "config: algorithms.warm.warmup_rounds=2 is not shorter than the 2 rounds of datasets.synthetic "
     "(second_threshold): the whole cell would train at a fraction of the lr"),
    # knowable before any job, not only inside one
    ("quantity-skew-shard-below-a-batch", _set("partitions", {"qs": {"scheme": "quantity_skew", "alpha": 0.3}}),
     "config: partitions.qs: scheme=quantity_skew with clients=2, seed=0 makes a shard of 6 of the 128 training rows "
     "of datasets.synthetic, smaller than batch_size=16 (model tiny-bert); raise min_rows or lower clients"),
    ("label-sorted-shard-below-a-batch",
     _both(_set("clients", [1, 16]), _set("partitions", {"sh": {"scheme": "shards", "classes_per_client": 2}})),
     "config: partitions.sh: scheme=shards with clients=16, seed=0 makes a shard of 8 of the 128 training rows of "
     "datasets.synthetic, smaller than batch_size=16 (model tiny-bert); lower clients"),
    ("quantity-skew-min-rows-above-the-data",
     _set("partitions", {"qs": {"scheme": "quantity_skew", "alpha": 0.3, "min_rows": 70}}),
     "config: partitions.qs: min_rows=70 x clients=2 needs 140 rows; the data set has 128 (datasets.synthetic)"),
    ("lora-target-the-model-lacks",
     _model("tiny-llama", {"tokenizer": "minilm", "peft": {"method": "lora", "target_modules": ["query", "value"]}}),
     "config: models.tiny-llama.peft.target_modules: 'query' is no module of this llama model (LoRA can adapt: "
     "embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, score)"),
    ("lora-dotted-target-the-model-lacks",
     _model("tiny-bert2", {"spec": "tiny-bert", "tokenizer": "minilm",
                           "peft": {"method": "lora", "target_modules": "attention.self.q_proj"}}),
     "config: models.tiny-bert2.peft.target_modules: 'attention.self.q_proj' is no module of this bert model (LoRA "
     "can adapt: word_embeddings, position_embeddings, token_type_embeddings, query, key, value, dense, classifier)"),
    ("compile-with-client-group", _set("train", {"compile": True, "client_group": 4}),
     "config: train.compile=true with train.client_group=4: the compiled step trains one client at a time (set "
     "one of them back)"),
    ("negative-pad-multiple", _set("train.pad_multiple", -32),
     "config: train.pad_multiple=-32: -32 is less than the minimum of 0"),
    ("compile-not-a-boolean", _set("train.compile", "yes"),
     "config: train.compile='yes': 'yes' is not of type 'boolean'"),
    ("client-group-on-a-decoder", _model("tiny-llama", {"tokenizer": "minilm", "train": {"client_group": 2}}),
     "config: models.tiny-llama: client_group=2 (client batching) does not support decoder models; use "
     "client_group: 1 for it (dataset synthetic, K=1)"),
    ("model-name-one-letter-off", _model("tiny-bret", {"tokenizer": "minilm"}),
     "config: models.tiny-bret: 'tiny-bret' is no model fedsweep knows, no local folder and not in the Hugging "
     "Face cache; did you mean 'tiny-bert'?"),
    ("model-spec-one-letter-off", _model("mine", {"spec": "distilbert-base-casd", "tokenizer": "minilm"}),
     "config: models.mine.spec='distilbert-base-casd': 'distilbert-base-casd' is no model fedsweep knows, no local "
     "folder and not in the Hugging Face cache; did you mean 'distilbert-base-cased'?"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder with the data files and model folders the cases point at (see write_inputs)."""
    work = tmp_path_factory.mktemp("config_errors")
    write_inputs(work)
    return work


def _broken(case_id: str) -> dict:
    change = {c[0]: c[1] for c in CASES}[case_id]
    config = base_config()
    change(config)
    return config


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case_id, expected", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_broken_config_is_one_line_before_any_job(inputs, monkeypatch, case_id, expected):
    monkeypatch.chdir(inputs)  # where snakemake runs: relative paths start here
    before = sorted(inputs.rglob("*"))
    with pytest.raises(FedsweepError) as err:
        load(_broken(case_id), inputs)
    assert str(err.value) == expected.replace(W, str(inputs))
    assert sorted(inputs.rglob("*")) == before  # nothing written


def test_convention_and_weighting_settings_reach_the_cells():
    """The counterparts of the cases above: accepted where they apply, and handed to the cells' jobs."""
    from fedsweep import grid

    config = base_config()
    config["algorithms"] = {
        "adam-flower": {"strategy": "fedadam", "server_lr": 0.01, "adaptive_convention": "flower"},
        "adagrad-flower": {"strategy": "fedadagrad", "server_lr": 0.1, "beta1": 0, "adaptive_convention": "flower"},
        "scaffold-uniform": {"client": "scaffold", "scaffold_weighting": "uniform"},
    }
    sweep = load(config, ".", inputs=False)
    settings = {c["algorithm"]: grid.cell_settings(config, c) for c in sweep.cells}
    assert settings["adam-flower"]["adaptive_convention"] == "flower"
    assert settings["adagrad-flower"]["adaptive_convention"] == "flower"
    assert settings["scaffold-uniform"]["scaffold_weighting"] == "uniform"


def test_lora_without_peft_installed_is_one_line(inputs, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    monkeypatch.chdir(inputs)
    config = base_config()
    config["models"]["tiny-llama"] = {"tokenizer": "minilm", "peft": {"method": "lora"}}
    with pytest.raises(FedsweepError) as err:
        load(config, inputs)
    assert str(err.value) == ("config: models.tiny-llama.peft: LoRA needs the peft package, which is not installed "
                              "here (pip install peft, or pip install -e '.[lora]')")


def test_tilde_in_results_dir_is_the_home_folder(inputs, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(inputs)
    config = base_config()
    config["results_dir"] = "~/sweeps/results"
    assert load(config, inputs).config["results_dir"] == str(tmp_path / "sweeps" / "results")


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "line 3: the key 'lr' is given twice in one mapping (first at line 2); "
                                          "YAML would silently keep the last"),
    ("partitions:\n  on: {scheme: iid}\n", "line 2: the key 'on' is read as True (bool), not as a name (YAML reads "
                                            "unquoted on/off/yes/no as booleans and digits as numbers): quote it, 'on'"),
    ("", "the file is empty; a config is a mapping (models:, datasets:, ...)"),
    ("- models\n", "the config must be a mapping (key: value), got a list"),
    ("models: {a: [}\n", "invalid YAML at line 1, column 14: expected the node content, but found"),
])
def test_config_files_are_read_strictly_with_file_and_line(tmp_path, capsys, monkeypatch, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["check", "--configfile", "bad.yaml"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"fedsweep: error: --configfile 'bad.yaml': {message}"), line


def test_snakemake_reads_its_config_files_strictly_too(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    text = yaml.safe_dump(base_config(), sort_keys=False) + "seeds: [0]\nseeds: [1]\n"
    (work / "config/dup.yaml").write_text(text)
    proc = snakemake(work, "-n", "--configfile", "config/dup.yaml", check=False, timeout=180)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "given twice" in line]
    assert proc.returncode != 0 and len(lines) == 1, proc.stdout + proc.stderr
    assert "--configfile" in lines[0] and "the key 'seeds' is given twice" in lines[0]


# Through the wiring: the Snakefile, `fedsweep check` and `fedsweep cluster-check` (before it asks
# SLURM anything) print the config layer's line, identically.
WIRED = ["unknown-top-key", "lr-negative", "clients-repeated", "local-missing-file", "model-dir-missing"]


@pytest.mark.parametrize("case_id", WIRED)
def test_snakemake_and_the_checks_print_the_same_line(tmp_path, monkeypatch, capsys, case_id):
    expected = dict((c[0], c[2]) for c in CASES)[case_id]
    work = copy_workflow(tmp_path / "wf")
    write_inputs(work)
    write_config(work / "config/bad.yaml", _broken(case_id))
    proc = snakemake(work, "--cores", "1", "--configfile", "config/bad.yaml", check=False, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert [line for line in out.splitlines() if line.startswith("config: ")] == [expected.replace(W, str(work))], out
    assert "Job stats:" not in out and "localrule " not in out and "\nrule " not in out, out
    assert not (work / "results").exists()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM here: cluster-check must stop at the config first
    for command in ("check", "cluster-check"):
        assert main([command, "--configfile", "config/bad.yaml"]) == 2
        assert capsys.readouterr().err.splitlines() == [f"fedsweep: error: {expected.replace(W, str(work))}"]


def test_schema_mirrors_the_spec_keys_of_every_source():
    """The config schema's per-source spec keys are exactly those `fedsweep prepare` accepts."""
    from fedsweep.dataspec import SPEC_KEYS

    root = Path(__file__).resolve().parents[1]
    schema = yaml.safe_load((root / "workflow/schemas/config.schema.yaml").read_text())
    spec = schema["properties"]["datasets"]["additionalProperties"]["properties"]["spec"]
    by_source = {}
    for rule in spec["allOf"]:
        condition = rule["if"]
        source = condition["properties"]["source"]["const"] if "properties" in condition else "hub"
        by_source[source] = set(rule["then"]["properties"])
    assert by_source == {source: set(keys) for source, keys in SPEC_KEYS.items()}
