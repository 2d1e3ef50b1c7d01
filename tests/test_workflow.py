"""The Snakemake workflow: lint, formatting, the paper grid's DAG, config errors, and the offline
demo end to end (tables, figures, and `snakemake figures` from cached metrics alone).

Every run happens in a temporary copy of the workflow files, so results never land in the repo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from helpers import ENV, ROOT, copy_workflow, job_counts, small_config, snakemake, write_config

from fedsweep.report import FIGURES


# ----------------------------------------------------------------------------- static checks


def test_lint_reports_nothing(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    proc = snakemake(work, "--lint", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Lints for" not in out, out
    assert "Congratulations, your workflow is in a good condition!" in out


def test_snakefmt_check():
    proc = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_documents_every_train_key():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    keys = set(schema["definitions"]["train"]["properties"])
    from fedsweep.trainconfig import TrainConfig

    cli_fields = set(TrainConfig.__dataclass_fields__)
    assert keys - {"max_length"} <= cli_fields  # every key maps to a `fedsweep train` option
    assert {"epochs", "batch_size", "lr", "protocol", "precision", "eval_every"} <= keys


# ----------------------------------------------------------------------------- the paper's DAG


def test_paper_grid_dry_run_has_54_training_jobs(tmp_path, monkeypatch):
    work = copy_workflow(tmp_path / "wf")
    netblock = ROOT / "tests" / "netblock"  # a sitecustomize that refuses and logs any connection
    netlog = tmp_path / "net.log"
    if (netblock / "sitecustomize.py").exists():
        monkeypatch.setitem(ENV, "PYTHONPATH", os.pathsep.join(filter(None, [str(netblock), ENV.get("PYTHONPATH")])))
        monkeypatch.setitem(ENV, "FEDSWEEP_NETLOG", str(netlog))
    proc = snakemake(work, "-n", "--quiet", "rules", timeout=300)
    assert not netlog.exists() or not netlog.read_text().strip(), netlog.read_text()
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["train"] == 54  # 3 models x 3 data sets x 6 K x 1 seed
    assert counts["prepare_data"] == 3
    # bert-base-cased and distilbert-base-cased share a tokenizer: 2 tokenisations per data set
    assert counts["tokenize"] == 6
    assert counts["partition"] == 18  # shards are shared by the models
    assert counts["report"] == 1 and counts["all"] == 1
    assert not (work / "results").exists()  # a dry run downloads nothing


def test_paper_grid_paths_and_overrides(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((work / "config/config.yaml").read_text())
    config["overrides"] = [
        {"model": "distilbert-base-cased", "dataset": "ag_news", "set": {"protocol": "paper"}},
        {"clients": [16, 32], "set": {"eval_every": 5}},
        {"model": "distilbert-base-cased", "dataset": "ag_news", "clients": 32, "set": {"eval_every": 2}},
        {"model": "albert-base-v1", "dataset": "yelp_review_full", "set": {"max_length": 256}},
    ]
    write_config(work / "config/override.yaml", config)
    proc = snakemake(work, "-n", "-p", "--configfile", "config/override.yaml", timeout=300)
    out = proc.stdout
    train_cmds = [line for line in out.splitlines() if "fedsweep train" in line]
    assert len(train_cmds) == 54
    paper = [c for c in train_cmds if '"protocol":"paper"' in c]
    assert len(paper) == 6 and all("--model distilbert-base-cased" in c and "ag_news" in c for c in paper)
    every5 = [c for c in train_cmds if '"eval_every":5' in c]
    assert len(every5) == 3 * 3 * 2 - 1  # the later, more specific entry wins for one cell
    assert sum('"eval_every":2' in c for c in train_cmds) == 1
    # the paper trains to the second threshold; budgets only matter to the report
    assert all("--rounds 200" in c for c in train_cmds if "--dataset imdb" in c)
    assert all("--rounds 100" in c for c in train_cmds if "--dataset yelp_review_full" in c)
    assert "results/tokens/ag_news/bert-base-cased_L128/meta.json" in out
    # a cell's max_length picks its tokens: one more tokenisation, used by that model's cells only
    assert job_counts(out)["tokenize"] == 6
    assert "--max-length 256 --out-dir results/tokens/yelp_review_full/albert-base-v1_L256" in out
    assert "results/tokens/yelp_review_full/albert-base-v1_L128" not in out
    assert "results/shards/imdb/iid_K32_seed0.parquet" in out
    assert "results/runs/yelp_review_full/albert-base-v1/fedavg/iid_K16_seed0/metrics.parquet" in out
    assert "checkpoint.pt" not in out  # kept in the run folder, never a declared output


def test_downloads_on_head_node_compute_jobs_offline(tmp_path, monkeypatch):
    """Data sets and models are fetched by local rules, online whatever the submitting shell says;
    every other job runs offline (HF_*_OFFLINE=1) against the same absolute HF_HOME cache; a 2-GPU
    cell is launched with torchrun."""
    monkeypatch.delitem(ENV, "HF_HOME", raising=False)  # no HF_HOME of the caller: the project's cache
    work = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((work / "config/config.yaml").read_text())
    config["models"]["albert-base-v1"]["resources"] = {"gpus": 2}
    write_config(work / "config/gpus.yaml", config)
    out = snakemake(work, "-n", "-p", "--configfile", "config/gpus.yaml", timeout=300).stdout
    cache = str(work / "cache" / "huggingface")
    shells = [line for line in out.splitlines() if " fedsweep " in line or "-m fedsweep" in line]
    fetch = [c for c in shells if "fedsweep fetch" in c]
    assert sorted(re.findall(r"--model (\S+)", " ".join(fetch))) == ["albert-base-v1", "bert-base-cased",
                                                                     "distilbert-base-cased"]
    for cmd in shells:
        online = "fedsweep fetch" in cmd or "fedsweep prepare" in cmd
        assert f"HF_HOME='{cache}'" in cmd
        assert ("HF_HUB_OFFLINE=1" in cmd) != online, cmd
        assert ("HF_DATASETS_OFFLINE=1" in cmd) != online, cmd
        assert ("unset HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE;" in cmd) == online, cmd
    snakefile_rules = (work / "workflow/rules/data.smk").read_text()
    assert re.search(r"localrules:\s+prepare_data,\s+fetch_model,", snakefile_rules)
    train = [c for c in shells if " train " in c]
    torchrun = [c for c in train if "torch.distributed.run --standalone --nproc-per-node 2 -m fedsweep train" in c]
    assert len(torchrun) == 18 and all("--model albert-base-v1" in c for c in torchrun)


def test_hf_home_config_then_environment_then_project_cache(tmp_path, monkeypatch):
    """hf_home in the config wins; else the caller's $HF_HOME is used, not overridden."""
    work = copy_workflow(tmp_path / "wf")
    config = small_config()
    write_config(work / "config/q.yaml", config)
    mine = tmp_path / "my-hf-home"
    monkeypatch.setitem(ENV, "HF_HOME", str(mine))
    out = snakemake(work, "-n", "-p", "--configfile", "config/q.yaml", timeout=300).stdout
    homes = set(re.findall(r"HF_HOME='([^']*)'", out))
    assert homes == {str(mine)}, homes
    config["hf_home"] = "shared/hf"
    write_config(work / "config/q.yaml", config)
    out = snakemake(work, "-n", "-p", "--configfile", "config/q.yaml", timeout=300).stdout
    assert set(re.findall(r"HF_HOME='([^']*)'", out)) == {str(work / "shared" / "hf")}


def test_max_runtime_splits_long_cells_into_chains_of_jobs(tmp_path):
    """With a 2-day limit, the paper's Yelp cells of BERT and ALBERT (8448 min) run as 3 jobs, DistilBERT's
    (4229) and the AG News cells of BERT and ALBERT (3106) as 2; each job trains to its round, asks for
    its share of the time, and the next one waits for its marker. `train` stays the last job of a cell."""
    work = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((work / "config/config.yaml").read_text())
    config["resources"] = {"max_runtime": 2880}
    write_config(work / "config/chains.yaml", config)
    out = snakemake(work, "-n", "-p", "--configfile", "config/chains.yaml", timeout=300).stdout
    counts = job_counts(out)
    assert counts["train"] == 54
    assert counts["train_segment"] == 6 * (2 + 2 + 1) + 6 * (1 + 1)
    blocks = out.split("\n\n")

    def block(rule: str, output: str) -> str:
        (found,) = [b for b in blocks if f"rule {rule}:" in b and f"output: {output}" in b]
        return found

    run = "results/runs/yelp_review_full/bert-base-cased/fedavg/iid_K8_seed0"
    first = block("train_segment", f"{run}/segments/r34.done")
    second = block("train_segment", f"{run}/segments/r67.done")
    last = block("train", f"{run}/metrics.parquet")
    assert f"{run}/segments/r34.done" not in first.split("output:")[0]
    assert f"{run}/segments/r34.done" in second.split("output:")[0]
    assert f"{run}/segments/r67.done" in last.split("output:")[0]
    for text, rounds, minutes in ((first, 34, 2879), (second, 67, 2795), (last, 100, 2795)):
        assert f"--rounds {rounds} " in text and f"runtime={minutes}," in text, text
        assert f"mv -f {run}/metrics.parquet" in text or rounds == 100
    # one log per cell: each job's log is a hard link to the run folder's train.log
    assert f"ln -f {run}/train.log results/logs/train/yelp_review_full/bert-base-cased/fedavg/iid_K8_seed0.r34.log" in first
    assert "attempt 1, SLURM job ${SLURM_JOB_ID:-none}" in last
    # the header line a job writes, run as the job's shell runs it: a SLURM requeue says so
    header = re.search(r'echo "==== .*? ===="', last).group(0)
    for env, said in (({}, "SLURM job none on "), ({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2"},
                                                  "SLURM job 77 (requeued 2x) on ")):
        line = subprocess.run(["bash", "-c", header], env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                              text=True, check=True).stdout
        assert f"fedsweep train to round 100: attempt 1, {said}" in line, line
    imdb = block("train", "results/runs/imdb/bert-base-cased/fedavg/iid_K1_seed0/metrics.parquet")
    assert "segments" not in imdb.split("output:")[0] and "runtime=948," in imdb


def test_dirichlet_partition_and_results_dir(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((work / "config/config.yaml").read_text())
    del config["partitions"]  # the older single-partition block: one partition, named after its scheme
    config["partition"] = {"scheme": "dirichlet", "alpha": 0.5}
    write_config(work / "config/skew.yaml", config)
    proc = snakemake(
        work, "-n", "-p", "--configfile", "config/skew.yaml", "--config", "results_dir=out/paper", timeout=300,
    )
    out = proc.stdout
    assert "out/paper/shards/imdb/dirichlet-a0.5_K8_seed0.parquet" in out
    assert "--scheme dirichlet --alpha 0.5" in out
    assert "out/paper/runs/ag_news/bert-base-cased/fedavg/dirichlet-a0.5_K1_seed0/metrics.parquet" in out
    assert job_counts(out)["train"] == 54


def test_algorithm_and_partition_axes(tmp_path):
    """Algorithms and partitions are path levels and wildcards; restrictions, per-model seeds and
    overrides pick the cells; each cell's job gets its algorithm's and partition's settings."""
    work = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((work / "config/config.yaml").read_text())
    config["models"]["bert-base-cased"]["seeds"] = [0, 1, 2]
    config["algorithms"] = {
        "fedavg": {},
        "fedadam": {"strategy": "fedadam", "server_lr": 0.01, "models": "bert-base-cased"},
        "scaffold": {"client": "scaffold", "datasets": ["imdb"], "models": "distilbert-base-cased"},
    }
    config["partitions"] = {
        "iid": {"scheme": "iid"},
        "dir0.1": {"scheme": "dirichlet", "alpha": 0.1},
        "patho": {"scheme": "shards", "classes_per_client": 2, "models": ["bert-base-cased"]},
        "weak": {"scheme": "iid", "per_client": 500, "datasets": "ag_news"},
    }
    config["overrides"] = [{"algorithm": "fedadam", "partition": "patho", "set": {"lr": 0.001}}]
    write_config(work / "config/axes.yaml", config)
    proc = snakemake(work, "-n", "-p", "--configfile", "config/axes.yaml", timeout=300)
    out = proc.stdout
    train_cmds = [line for line in out.splitlines() if "fedsweep train" in line]
    K = 6
    bert = (2 * 3 * 3 + 2 * 1) * K * 3  # (algorithms x partitions on 3 data sets, + weak on ag_news) x K x seeds
    albert = (1 * 2 * 3 + 1) * K  # fedavg x (iid, dir0.1) x 3 data sets, + weak on ag_news
    distil = (1 * 2 * 3 + 1) * K + 1 * 2 * K  # + scaffold x (iid, dir0.1) on imdb
    assert len(train_cmds) == bert + albert + distil, len(train_cmds)
    assert job_counts(out)["train"] == len(train_cmds)
    # shards: per data set, partition, K and seed (seeds 0-2: bert's), shared by the models
    assert "results/shards/imdb/patho_K8_seed2.parquet" in out
    assert "--scheme shards --classes-per-client 2" in out
    assert "--scheme iid --per-client 500" in out and "results/shards/imdb/weak_" not in out
    assert "--scheme dirichlet --alpha 0.1" in out
    scaffold = [c for c in train_cmds if "--algorithm scaffold" in c]
    assert len(scaffold) == 2 * K and all("--model distilbert-base-cased" in c and "--dataset imdb" in c
                                          for c in scaffold)
    assert all('"client":"scaffold"' in c for c in scaffold)
    assert "results/runs/imdb/distilbert-base-cased/scaffold/dir0.1_K32_seed0/metrics.parquet" in out
    adam = [c for c in train_cmds if "--algorithm fedadam" in c]
    assert adam and all('"server_lr":0.01' in c and '"strategy":"fedadam"' in c for c in adam)
    slow = [c for c in train_cmds if '"lr":0.001' in c]
    assert slow and all("--algorithm fedadam --partition patho" in c for c in slow)
    assert len(slow) == 3 * K * 3
    fedavg = [c for c in train_cmds if "--algorithm fedavg" in c]
    # FedAvg: no algorithm setting in the cell's settings (every one at its default)
    assert fedavg and not any('"strategy"' in c or '"client"' in c for c in fedavg)


# ----------------------------------------------------------------------------- the demo, end to end


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The offline demo (config/demo.yaml) run once, whole, in a temporary copy."""
    work = copy_workflow(tmp_path_factory.mktemp("demo"))
    # Every job runs with a sitecustomize that refuses and logs any non-loopback connection.
    netblock = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "netblock"), ENV.get("PYTHONPATH")])),
                "FEDSWEEP_NETLOG": str(work / "net.log")}
    t0 = time.perf_counter()
    proc = snakemake(work, "--cores", "2", "--configfile", "config/demo.yaml", timeout=900, env=netblock)
    return work, time.perf_counter() - t0, proc


@pytest.mark.slow
def test_demo_end_to_end(demo):
    work, seconds, proc = demo
    config = yaml.safe_load((work / "config/demo.yaml").read_text())
    results = work / config.get("results_dir", "results")
    from fedsweep import grid

    grid_cells = grid.cells(config)
    cells = len(grid_cells)
    # the paper's families, MiniLM and a LoRA tiny-llama on FedAvg/iid (5 x 3 K), and tiny-bert's
    # future work on 2 seeds: fedavg on iid (3 K) and on the skewed partition (K 2, 4), scaffold on
    # the skewed partition (K 4)
    assert cells == 5 * 3 + (3 + 2 + 1) * 2 - 3
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["train"] == cells
    print(f"demo: {cells} cells in {seconds:.0f} s")

    for cell in grid_cells:
        name = grid.cell_name(cell)
        run = results / "runs" / name
        metrics = pd.read_parquet(run / "metrics.parquet")
        assert metrics["round"].max() == config["datasets"][cell["dataset"]]["second_threshold"]
        assert set(metrics["algorithm"]) == {cell["algorithm"]} and set(metrics["partition"]) == {cell["partition"]}
        assert (run / "run.json").exists() and (run / "checkpoint.pt").exists()
        assert (results / "benchmarks/train" / f"{name}.tsv").exists()
        assert (results / "logs/train" / f"{name}.log").stat().st_size > 0
        if cell["algorithm"] == "scaffold":  # the clients' control variates, on disk
            assert len(list((run / "scaffold").glob("c*.f32"))) == cell["clients"]
            assert metrics.loc[metrics["round"] > 0, "control_variate_norm"].gt(0).all()

    seeds = pd.read_csv(results / "tables/seeds.csv")
    assert (seeds["status"] == "complete").all() and len(seeds) == cells - 6  # tiny-bert's 2 seeds: one row
    llama = pd.read_parquet(results / "runs/synthetic/tiny-llama/fedavg/iid_K2_seed0/metrics.parquet")
    # LoRA: only the adapters and the head are trained and sent
    assert (llama["trainable_parameters"] < llama["total_parameters"] / 100).all()
    trained = llama[llama["round"] > 0]
    assert (trained["upload_bytes"] == 2 * 4 * trained["trainable_parameters"]).all()
    two = seeds[seeds["model"] == "tiny-bert"]
    assert len(two) == 3 + 2 + 1 and (two["ci95_high"] >= two["ci95_low"]).all()
    assert (two["ci95_high"] > two["ci95_low"]).any()  # (two seeds may agree: a zero-width interval)
    assert (seeds.loc[seeds["model"] != "tiny-bert", "ci95"] == "1 seed").all()
    assert pd.read_csv(results / "tables/missing_cells.csv").empty

    acc = pd.read_csv(results / "tables/accuracy_at_budget.csv")
    acc = acc[acc["seed"].astype(str) != "mean"]  # one row per seed (plus seed-mean rows)
    assert len(acc) == cells
    assert acc["accuracy"].between(0, 1).all()
    assert (acc["round_used"] == acc["dataset"].map({d: v["budget"] for d, v in config["datasets"].items()})).all()
    base = acc[acc["clients"] == 1]
    assert (base["ratio"] == 1).all()
    # the K=1 baselines (fedavg on iid: the skewed partition and scaffold have none) learn: above
    # chance (the test set's majority share), well above it for the first seed
    assert (base["accuracy"] > base["chance_accuracy"] + 0.1).all(), base
    first = base[(base["partition"] == "iid") & (base["algorithm"] == "fedavg") & (base["seed"].astype(str) == "0")]
    assert len(first) == 5 and (first["accuracy"] > first["chance_accuracy"] + 0.15).all(), first

    rounds = pd.read_csv(results / "tables/rounds_to_target.csv")
    rounds = rounds[rounds["seed"].astype(str) != "mean"]
    assert len(rounds) == cells
    assert rounds.loc[rounds["clients"] == 1, "reached"].all()
    # the demo shows what the paper is about: some cells never reach 90% of their baseline
    assert (~rounds["reached"].astype(bool)).any(), rounds
    assert rounds["status"].str.startswith("not reached").any(), rounds
    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (results / "figures" / f"{name}.{ext}").stat().st_size > 1000
    assert (results / "figures/accuracy_vs_clients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # No job (training included) tried to reach the network, and the models were "fetched".
    assert not (work / "net.log").exists() or not (work / "net.log").read_text().strip()
    assert {p.stem for p in (results / "models").glob("*.json")} == {"tiny-bert", "tiny-albert", "tiny-distilbert", "tiny-llama", "minilm"}

    again = snakemake(work, "-n", "--configfile", "config/demo.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr

    # `fedsweep status` in the demo's folder: every cell finished, from the run folders alone
    status = subprocess.run([sys.executable, "-m", "fedsweep", "status", "--configfile", "config/demo.yaml", "--json"],
                            cwd=work, env=ENV, capture_output=True, text=True, timeout=120)
    total = json.loads(status.stdout)["total"]
    assert (total["cells"], total["finished"], total["rounds_done"]) == (cells, cells, total["rounds"]), total


@pytest.mark.slow
def test_figures_from_cached_metrics_only(demo, tmp_path):
    src, _, _ = demo
    work = tmp_path / "wf"
    shutil.copytree(src, work, symlinks=True)  # keeps mtimes and .snakemake's records
    results = work / "results"
    for stage in ("data", "tokens", "shards", "tables", "figures"):
        shutil.rmtree(results / stage)
    metrics = sorted(results.glob("runs/*/*/*/*_K*_seed*/metrics.parquet"))
    before = {p: p.stat().st_mtime_ns for p in metrics}

    dry = snakemake(work, "figures", "-n", "--configfile", "config/demo.yaml")
    assert job_counts(dry.stdout + dry.stderr) == {"figures": 1}

    # A config change that would retrain every cell under `all` still only reruns the report.
    config = yaml.safe_load((work / "config/demo.yaml").read_text())
    config["train"]["lr"] = 0.123
    config["target_fraction"] = 0.8
    write_config(work / "config/changed.yaml", config)
    proc = snakemake(work, "figures", "--cores", "2", "--configfile", "config/changed.yaml")
    assert set(job_counts(proc.stdout + proc.stderr)) <= {"figures", "report_config"}
    for stage in ("data", "tokens", "shards"):
        assert not (results / stage).exists()
    assert {p: p.stat().st_mtime_ns for p in metrics} == before
    rounds = pd.read_csv(results / "tables/rounds_to_target.csv")
    assert (rounds["seed"].astype(str) != "mean").sum() == len(metrics)
    assert (rounds["target_accuracy"] > 0).all()
    for name in FIGURES:
        assert (results / "figures" / f"{name}.png").exists()

    # up to date now; a rewritten metrics file makes it stale again
    assert "Nothing to be done" in (p := snakemake(work, "figures", "-n", "--configfile", "config/changed.yaml")).stdout + p.stderr
    os.utime(metrics[0])
    dry = snakemake(work, "figures", "-n", "--configfile", "config/changed.yaml")
    assert job_counts(dry.stdout + dry.stderr) == {"figures": 1}


@pytest.mark.slow
def test_report_html(demo, tmp_path):
    src, _, _ = demo
    work = tmp_path / "wf"
    shutil.copytree(src, work, symlinks=True)
    snakemake(work, "--configfile", "config/demo.yaml", "--report", "report.zip", timeout=300)
    assert (work / "report.zip").stat().st_size > 10_000
