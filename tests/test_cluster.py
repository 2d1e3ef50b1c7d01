"""fedsweep.cluster: the memory and time estimates, the segment arithmetic, the parsing of SLURM's
output (captured text; no SLURM needed) and `fedsweep cluster-check`'s report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from fedsweep import FedsweepError, cluster
from fedsweep.cli import main

REPO = Path(__file__).resolve().parents[1]

# `scontrol -o show partition` / `scontrol -o show node` of tests/slurm_cluster.py's cluster (Slurm 22.05).
CI_PARTITIONS = (
    "PartitionName=ci AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A "
    "DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED "
    "MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 PriorityTier=1 "
    "RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP TotalCPUs=2 "
    "TotalNodes=1 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED "
    "TRES=cpu=2,mem=21694M,node=1,billing=2\n"
)
CI_NODES = (
    "NodeName=vm Arch=x86_64 CoresPerSocket=2  CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=2.06 "
    "AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 NodeHostName=vm "
    "Version=22.05.8 OS=Linux 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=21694 AllocMem=0 "
    "FreeMem=20274 Sockets=1 Boards=1 State=IDLE ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A "
    "Partitions=ci  BootTime=2026-11-25T18:08:37 SlurmdStartTime=2026-11-25T19:02:05 "
    "LastBusyTime=2026-11-25T19:02:06 CfgTRES=cpu=2,mem=21694M,billing=2 AllocTRES= CapWatts=n/a "
    "CurrentWatts=0 AveWatts=0 ExtSensorsJoules=n/s ExtSensorsWatts=0 ExtSensorsTemp=n/s\n"
)
# A GPU cluster as Slurm 23.02 prints it: a 2-day GPU partition with a per-node memory cap, and
# the default CPU partition.
GPU_PARTITIONS = (
    "PartitionName=gpu AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=NO QoS=N/A "
    "DefaultTime=01:00:00 DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED "
    "MaxTime=2-00:00:00 MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=gpu[01-02] PriorityJobFactor=1 "
    "PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP "
    "TotalCPUs=128 TotalNodes=2 SelectTypeParameters=NONE JobDefaults=DefCpuPerGPU=8 DefMemPerNode=UNLIMITED "
    "MaxMemPerNode=480000 TRES=cpu=128,mem=1000000M,node=2,billing=128,gres/gpu=8\n"
    "PartitionName=cpu AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A "
    "DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED "
    "MaxTime=12:00:00 MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=cpu01 PriorityJobFactor=1 "
    "PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP "
    "TotalCPUs=32 TotalNodes=1 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED "
    "MaxMemPerNode=UNLIMITED TRES=cpu=32,mem=16000M,node=1,billing=32\n"
)
GPU_NODES = "".join(
    f"NodeName={name} Arch=x86_64 CoresPerSocket=32 CPUAlloc=0 CPUEfctv=64 CPUTot=64 CPULoad=0.01 "
    f"AvailableFeatures=a100 ActiveFeatures=a100 Gres=gpu:a100:4(S:0-1) NodeAddr={name} NodeHostName={name} "
    "Version=23.02.7 OS=Linux 5.14.0-362.8.1.el9_3.x86_64 #1 SMP PREEMPT_DYNAMIC Wed Nov 8 17:36:32 UTC 2023 "
    "RealMemory=500000 AllocMem=0 FreeMem=490000 Sockets=2 Boards=1 MemSpecLimit=8000 State=IDLE "
    "ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A Partitions=gpu "
    "CfgTRES=cpu=64,mem=500000M,billing=64,gres/gpu=4 AllocTRES= CapWatts=n/a\n"
    for name in ("gpu01", "gpu02")
) + (
    "NodeName=cpu01 Arch=x86_64 CoresPerSocket=16 CPUAlloc=4 CPUTot=32 Gres=(null) NodeAddr=cpu01 "
    "OS=Linux 5.14.0 #1 SMP RealMemory=16000 AllocMem=4000 State=MIXED Partitions=cpu,debug "
    "CfgTRES=cpu=32,mem=16000M,billing=32\n"
)
SACCT_DISABLED = "Slurm accounting storage is disabled\n"


def ci_cluster(accounting: bool = False, min_job_age: int | None = 300) -> cluster.ClusterInfo:
    nodes = cluster.parse_nodes(CI_NODES)
    acct = cluster.Accounting(True, "") if accounting else cluster.sacct_result(1, "", SACCT_DISABLED)
    return cluster.ClusterInfo(cluster.parse_partitions(CI_PARTITIONS, nodes), acct, min_job_age, "22.05.8")


def gpu_cluster() -> cluster.ClusterInfo:
    nodes = cluster.parse_nodes(GPU_NODES)
    return cluster.ClusterInfo(cluster.parse_partitions(GPU_PARTITIONS, nodes), cluster.Accounting(True, ""),
                               300, "23.02.7")


def validated(config: dict) -> dict:
    from snakemake.utils import validate

    validate(config, schema=str(REPO / "workflow/schemas/config.schema.yaml"))
    return config


def paper_config(**resources) -> dict:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["resources"] = resources
    return validated(config)


# ----------------------------------------------------------------------------- model shapes


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-albert", "tiny-distilbert"])
def test_parameter_count_of_the_tiny_models_is_exact(family):
    from fedsweep.models import build_model, num_parameters

    model = build_model(family, num_labels=4, seed=0)
    assert cluster.parameters_of(cluster.TINY_CONFIGS[family], num_labels=4) == num_parameters(model)
    assert cluster.model_shape(family).source == "tiny"


@pytest.mark.parametrize("name", ["bert-base-cased", "albert-base-v1", "distilbert-base-cased", "roberta-base"])
def test_parameter_count_of_the_known_hub_models_is_exact(name):
    """The table's configs, built on the meta device: the formula counts every parameter."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    known = dict(cluster.KNOWN_CONFIGS[name])
    config = AutoConfig.for_model(known.pop("model_type"), num_labels=2, **known)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    assert cluster.parameters_of(cluster.KNOWN_CONFIGS[name]) == sum(p.numel() for p in model.parameters())


def test_model_shape_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: hub models come from the table
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    minilm = cluster.model_shape("minilm")
    assert minilm.source == "config.json" and (minilm.layers, minilm.hidden) == (6, 384)
    assert abs(minilm.params - 22_714_756) < 1000  # run.json's count for the demo's 4 classes
    bert = cluster.model_shape("bert-base-cased")
    assert bert.source == "known" and bert.params == 108_310_272 + 768 * 2 + 2
    assert cluster.model_shape("google-bert/bert-base-cased").source == "known"
    assert cluster.model_shape("distilbert").layers == 6  # the paper's alias
    assert cluster.model_shape("someone/unknown-model").source == "assumed"
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**cluster.KNOWN_CONFIGS["bert-base-cased"],
                                                    "num_hidden_layers": 4}))
    local = cluster.model_shape(str(folder))
    assert local.source == "config.json" and local.layers == 4 and local.params < bert.params


# ----------------------------------------------------------------------------- memory


def test_memory_of_a_tiny_cpu_cell_is_the_floor():
    shape = cluster.model_shape("tiny-bert")
    est = cluster.estimate_memory(shape, batch_size=16, max_length=32, client_group=1, gpus=0, rows=(256, 160))
    # measured: a tiny-bert demo cell peaks at ~0.6 GB (run.json peak_memory_bytes)
    assert est.mem_mb == cluster.MEM_FLOOR_MB == 2000


def test_memory_of_bert_base_on_yelp_with_a_gpu():
    shape = cluster.model_shape("bert-base-cased")
    est = cluster.estimate_memory(shape, batch_size=32, max_length=128, client_group=1, gpus=1,
                                  rows=(650_000, 50_000))
    mib = 2 ** 20
    state = shape.params * 24 / mib  # fp32 global + client + grads, fp64 sum, checkpoint copy
    data = 700_000 * 128 * 32 / mib
    assert est.activations_mb == 0  # on the GPU
    assert math.isclose(est.state_mb, state) and math.isclose(est.data_mb, data)
    expected = cluster.BASE_MB_GPU + cluster.MEM_MARGIN * (state + data)
    assert est.mem_mb == math.ceil(expected / 500) * 500 == 11000
    assert est.mem_mb < 32000  # the old flat default, refused by any node with less


def test_memory_grows_with_activations_on_cpu_and_with_client_group():
    shape = cluster.model_shape("bert-base-cased")
    kw = dict(batch_size=32, max_length=128, rows=(25_000, 25_000))
    gpu = cluster.estimate_memory(shape, client_group=1, gpus=1, **kw)
    cpu = cluster.estimate_memory(shape, client_group=1, gpus=0, **kw)
    group = cluster.estimate_memory(shape, client_group=8, gpus=0, **kw)
    # 12 layers x 32 x 128 tokens x (34 x 768 + 5 x 12 x 128) bytes at 16 bits, x2 in fp32
    assert math.isclose(cpu.activations_mb, 12 * 32 * 128 * (34 * 768 + 5 * 12 * 128) * 2 / 2 ** 20)
    assert math.isclose(group.activations_mb, 8 * cpu.activations_mb)
    assert group.state_mb > cpu.state_mb
    assert gpu.mem_mb < cpu.mem_mb < group.mem_mb


# ----------------------------------------------------------------------------- time


def test_paper_grid_runtimes_match_the_old_estimate_for_bert_and_halve_for_distilbert():
    """The numbers of the issue (948, 3106, 8448 min for BERT-base at 400 examples/s); DistilBERT
    (6 layers) does half the work, ALBERT-base the same."""
    config = paper_config()
    rows = {"imdb": (25_000, 25_000), "ag_news": (120_000, 7_600), "yelp_review_full": (650_000, 50_000)}
    expected = {"imdb": 948, "ag_news": 3106, "yelp_review_full": 8448}
    for dataset, minutes in expected.items():
        for model, factor in (("bert-base-cased", 1), ("albert-base-v1", 1), ("distilbert-base-cased", 2)):
            plan = cluster.plan_cell(config, dataset, model, 1, 0, rows=rows[dataset],
                                     shape=cluster.shape_of_config(cluster.KNOWN_CONFIGS[model], "known"))
            assert plan.targets == (config["datasets"][dataset]["second_threshold"],)
            got = plan.minutes(plan.rounds)
            assert abs(got - (10 + (minutes - 11) / factor)) <= 1, (dataset, model, got)


def test_auto_throughput_is_relative_to_bert_base():
    bert = cluster.shape_of_config(cluster.KNOWN_CONFIGS["bert-base-cased"], "known")
    distil = cluster.shape_of_config(cluster.KNOWN_CONFIGS["distilbert-base-cased"], "known")
    albert = cluster.shape_of_config(cluster.KNOWN_CONFIGS["albert-base-v1"], "known")
    tp = cluster.auto_throughput
    assert tp(bert, max_length=128, gpus=1, threads=4) == cluster.GPU_REFERENCE == 400
    assert math.isclose(tp(distil, max_length=128, gpus=1, threads=4), 800)
    assert math.isclose(tp(albert, max_length=128, gpus=1, threads=4), 400)
    assert math.isclose(tp(bert, max_length=128, gpus=2, threads=4), 800)
    assert tp(bert, max_length=256, gpus=1, threads=4) < 200  # longer texts: more work per example
    tiny = cluster.model_shape("tiny-bert")
    assert tp(tiny, max_length=32, gpus=1, threads=1) == 400 * cluster.GPU_MAX_SPEEDUP  # launch-bound cap
    # on CPUs: ~32 examples/s for MiniLM at length 32 on one thread (the demo measures 31.8)
    minilm = cluster.shape_of_config(cluster.config_json("minilm"), "config.json")
    assert 25 < tp(minilm, max_length=32, gpus=0, threads=1) < 40


def test_round_targets():
    assert cluster.round_targets(100, 1) == [100]
    assert cluster.round_targets(100, 3) == [34, 67, 100]
    assert cluster.round_targets(12, 2) == [6, 12]
    assert cluster.round_targets(5, 5) == [1, 2, 3, 4, 5]
    for rounds in range(1, 40):
        for s in range(1, rounds + 1):
            t = cluster.round_targets(rounds, s)
            steps = [b - a for a, b in zip([0] + t, t)]
            assert t[-1] == rounds and min(steps) >= 1 and max(steps) - min(steps) <= 1


def test_plan_segments_splits_only_what_exceeds_max_runtime():
    est = cluster.RuntimeEstimate(fixed=10, work=8438, throughput=400)  # a Yelp cell: 8448 min
    assert cluster.plan_segments(est, 100, None) == [100]
    assert cluster.plan_segments(est, 100, 9000) == [100]
    targets = cluster.plan_segments(est, 100, 2880)  # a 2-day partition
    assert targets == [34, 67, 100]
    minutes = [cluster.job_minutes(est, 100, a + 1, b, 1, 2880) for a, b in zip([0] + targets, targets)]
    assert minutes == [2879, 2795, 2795] and all(m <= 2880 for m in minutes)
    # 12 h: 12 jobs of 8-9 rounds would be ~769 min for the longest: 13 jobs of 7-8 rounds
    assert cluster.plan_segments(est, 100, 720) == cluster.round_targets(100, 13)
    # a given runtime has no start-up part: 30 min in jobs of at most 20 -> 2 jobs of 15 min
    given = cluster.RuntimeEstimate(0, 30, None)
    assert cluster.plan_segments(given, 12, 20) == [6, 12]
    assert cluster.job_minutes(given, 12, 1, 6) == 15 and cluster.job_minutes(given, 12, 1, 12, attempt=2) == 60
    with pytest.raises(FedsweepError, match="one round takes ~95 min"):
        cluster.plan_segments(cluster.RuntimeEstimate(10, 850, 400), 10, 60)


def test_job_minutes_double_per_retry_up_to_max_runtime():
    est = cluster.RuntimeEstimate(fixed=10, work=938, throughput=400)  # 948 min
    assert cluster.job_minutes(est, 200, 1, 200, attempt=1) == 949
    assert cluster.job_minutes(est, 200, 1, 200, attempt=2) == 1897
    assert cluster.job_minutes(est, 200, 1, 200, attempt=3, max_runtime=2880) == 2845
    assert cluster.job_minutes(est, 200, 1, 200, attempt=4, max_runtime=2880) == 2880


def test_plan_cell_with_max_runtime_and_per_model_settings():
    config = paper_config(max_runtime=2880)
    rows = (650_000, 50_000)
    bert = cluster.plan_cell(config, "yelp_review_full", "bert-base-cased", 1, 0, rows=rows,
                             shape=cluster.shape_of_config(cluster.KNOWN_CONFIGS["bert-base-cased"], "known"))
    assert bert.targets == (34, 67, 100)
    assert [bert.minutes(t) for t in bert.targets] == [2879, 2795, 2795]
    assert bert.minutes(100, attempt=2) == 2880
    assert bert.gpus == 1 and bert.mem_mb == 11000
    config["models"]["bert-base-cased"]["resources"] = {"throughput": 800, "mem_mb": 20000}
    fast = cluster.plan_cell(config, "yelp_review_full", "bert-base-cased", 1, 0, rows=rows, shape=bert.shape)
    assert fast.targets == (50, 100) and fast.mem_mb == 20000 and fast.memory is None
    # the number of jobs follows split_rows (known before any download), the minutes the rows
    split = cluster.plan_cell(config, "yelp_review_full", "bert-base-cased", 1, 0, rows=(65_000, 5_000),
                              split_rows=rows, shape=bert.shape)
    assert split.targets == fast.targets and split.minutes(50) < fast.minutes(50)


# ----------------------------------------------------------------------------- SLURM's output


@pytest.mark.parametrize("text, minutes", [
    ("UNLIMITED", None), ("INFINITE", None), ("NONE", None), ("30", 30), ("30:00", 30), ("30:30", 31),
    ("12:00:00", 720), ("2-00:00:00", 2880), ("1-12", 2160), ("1-12:30", 2190), ("7-00:00:01", 10081),
])
def test_parse_slurm_time(text, minutes):
    assert cluster.parse_slurm_time(text) == minutes


def test_parse_the_test_cluster():
    info = ci_cluster()
    (part,) = info.partitions
    assert (part.name, part.default, part.max_time, part.max_mem_per_node) == ("ci", True, None, None)
    (node,) = part.nodes
    assert (node.name, node.cpus, node.memory_mb, node.gpus, node.state) == ("vm", 2, 21694, 0, "IDLE")
    assert info.partition(None) is part and info.partition("gpu") is None
    # a value with spaces (OS=...) does not swallow the next keys
    record = cluster.parse_records(CI_NODES)[0]
    assert record["OS"] == "Linux 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0" and record["RealMemory"] == "21694"


def test_parse_a_gpu_cluster():
    info = gpu_cluster()
    gpu, cpu = info.partitions
    assert info.partition(None) is cpu  # Default=YES
    assert (gpu.max_time, gpu.default_time, gpu.max_mem_per_node) == (2880, 60, 480000)
    assert [n.name for n in gpu.nodes] == ["gpu01", "gpu02"] and gpu.max_gpus == 4 and gpu.max_cpus == 64
    assert gpu.nodes[0].memory_mb == 500000 - 8000  # MemSpecLimit is the system's
    assert gpu.max_memory_mb == 480000  # MaxMemPerNode caps it
    assert cpu.max_time == 720 and cpu.max_memory_mb == 16000 and cpu.max_gpus == 0
    assert cluster.gpus_of_gres("gpu:a100:4(S:0-1),gpu:v100:2") == 6
    assert cluster.gpus_of_gres("gpu:2,mps:100") == 2 and cluster.gpus_of_gres("(null)") == 0


def test_sacct_and_min_job_age():
    assert not cluster.sacct_result(1, "", SACCT_DISABLED).works
    assert cluster.sacct_result(1, "", SACCT_DISABLED).message == "Slurm accounting storage is disabled"
    assert not cluster.sacct_result(0, "", "You are not running a supported accounting_storage plugin\n").works
    assert cluster.sacct_result(0, "123|COMPLETED\n", "").works
    assert cluster.sacct_result(0, "", "").works  # no jobs in the window
    config = "MessageTimeout          = 10 sec\nMinJobAge               = 300 sec\nMpiDefault = none\n"
    assert cluster.parse_min_job_age(config) == 300
    assert cluster.parse_min_job_age("nothing") is None


def test_accounting_problem_is_the_silent_hang():
    no_acct = ci_cluster(accounting=False)
    problem = cluster.accounting_problem(no_acct, "sacct", None)
    assert "sacct fails (Slurm accounting storage is disabled)" in problem
    assert "slurm-status-command: squeue" in problem
    assert cluster.accounting_problem(no_acct, None, 10) == problem  # the plugin's default is sacct
    assert cluster.accounting_problem(no_acct, "squeue", 10) is None
    assert "MinJobAge=60 s" in cluster.accounting_problem(ci_cluster(False, min_job_age=60), "squeue", 40)
    assert cluster.accounting_problem(ci_cluster(accounting=True), None, None) is None


def test_request_problems_are_one_line_each():
    info = gpu_cluster()
    fits = cluster.JobRequest("training job imdb/bert/K1_seed0", 11000, 948, 1, "gpu")
    assert cluster.request_problems(fits, info) == []
    big = cluster.JobRequest("training job imdb/bert/K1_seed0", 600_000, 3000, 8, "gpu", "resources.mem_mb")
    mem, time, gpus = cluster.request_problems(big, info)
    assert mem == ("training job imdb/bert/K1_seed0 asks for mem_mb=600000 (resources.mem_mb), more than any node "
                   "of partition gpu has (480000 MB): set it to at most 480000, or leave resources.mem_mb at auto")
    assert "asks for 3000 min, partition gpu allows 2880 (MaxTime): set resources.max_runtime: 2880" in time
    assert "8 GPU(s), partition gpu has at most 4 GPUs per node" in gpus
    cpu_only = cluster.JobRequest("training job x", 8000, 60, 1, None)  # the default partition: cpu
    assert "partition cpu has no GPUs" in cluster.request_problems(cpu_only, info)[0]
    missing = cluster.request_problems(cluster.JobRequest("job", 1, 1, 0, "nope"), info)
    assert missing == ["job: partition 'nope' does not exist (partitions: gpu, cpu)"]
    assert all("\n" not in p for p in mem + time + gpus)


# ----------------------------------------------------------------------------- cluster-check


def test_report_on_a_cluster_without_accounting(tmp_path):
    """The profile as shipped (no slurm-status-command) on the test cluster: the hang is a
    problem, and the settings say squeue."""
    config = validated(yaml.safe_load((REPO / "config/demo.yaml").read_text()))
    profile = cluster.read_profiles([REPO / "profiles/slurm"])
    rep = cluster.check_cluster_report(ci_cluster(), profile=profile, profile_names=["profiles/slurm"],
                                       config=config, config_names=["config/demo.yaml"], base_dir=tmp_path)
    text = "\n".join(rep.lines)
    assert "sacct fails (Slurm accounting storage is disabled): status queries need squeue" in text
    assert "  slurm-status-command: squeue" in text
    assert "--slurm-status-command squeue --default-resources slurm_partition=ci" in text
    assert "synthetic            minilm" in text  # the demo's cells, one line per data set and model
    assert "gpus: 0   # partition ci has no GPUs" in text
    assert len(rep.problems) == 1 and "sacct fails" in rep.problems[0]
    # with the CI overlay (squeue) there is nothing left to fix
    both = cluster.read_profiles([REPO / "profiles/slurm", REPO / "profiles/slurm-ci"])
    rep = cluster.check_cluster_report(ci_cluster(), profile=both, profile_names=["slurm", "slurm-ci"],
                                       config=config, config_names=["config/demo.yaml"], base_dir=tmp_path)
    assert rep.problems == []


def test_report_flags_requests_larger_than_the_partition(tmp_path):
    config = paper_config()
    rep = cluster.check_cluster_report(gpu_cluster(), profile={}, profile_names=[], config=config,
                                       config_names=["config/config.yaml"], base_dir=tmp_path, partition="gpu")
    text = "\n".join(rep.lines)
    assert "54 training cell(s) on partition gpu" in text and "max_runtime: 2880" in text
    # the Yelp and AG News cells of BERT and ALBERT exceed 2 days; DistilBERT's Yelp cells too
    assert any("yelp_review_full/bert-base-cased/fedavg/iid_K1_seed0 asks for 8448 min" in p for p in rep.problems)
    assert rep.problems[-1] == "config: set resources.max_runtime: 2880 (partition gpu's MaxTime)"
    chained = cluster.check_cluster_report(gpu_cluster(), profile={}, profile_names=[],
                                           config=paper_config(max_runtime=2880), config_names=["c"],
                                           base_dir=tmp_path, partition="gpu")
    assert chained.problems == []
    assert "2879+2795+2795" in "\n".join(chained.lines)
    small = cluster.check_cluster_report(gpu_cluster(), profile={}, profile_names=[],
                                         config=paper_config(mem_mb=600000, max_runtime=2880),
                                         config_names=["c"], base_dir=tmp_path, partition="gpu")
    assert len(small.problems) == 54 and "asks for mem_mb=600000 (resources.mem_mb)" in small.problems[0]


def test_profiles_merge_like_snakemake():
    merged = cluster.read_profiles([REPO / "profiles/slurm", REPO / "profiles/slurm-ci"])
    assert merged["slurm-status-command"] == "squeue" and merged["executor"] == "slurm"
    assert cluster.resource_items(merged["default-resources"])["slurm_partition"] == "ci"
    assert cluster.resource_items(["slurm_partition=gpu", "mem_mb=8000"]) == {"slurm_partition": "gpu",
                                                                              "mem_mb": "8000"}
    assert cluster.set_resources_of(merged, "train") == {"gpu": 0}
    assert cluster.set_resources_of({"set-resources": ["train:slurm_partition=gpu", "x:y=1"]}, "train") == {
        "slurm_partition": "gpu"}


def _run_json(path: Path, rate: float, device: str, world: int = 1, peak: int = 0) -> None:
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"train_examples_per_second": rate, "device": device,
                                               "world_size": world, "peak_memory_bytes": peak}))


def test_calibrate_reads_finished_cells(tmp_path, capsys):
    runs = tmp_path / "results" / "runs"
    _run_json(runs / "imdb/bert-base-cased/fedavg/iid_K1_seed0", 700.0, "NVIDIA H100 80GB HBM3")
    _run_json(runs / "imdb/bert-base-cased/fedavg/iid_K2_seed0", 760.0, "NVIDIA H100 80GB HBM3")
    _run_json(runs / "ag_news/bert-base-cased/fedavg/iid_K1_seed0", 740.0, "NVIDIA H100 80GB HBM3")
    _run_json(runs / "imdb/distilbert-base-cased/fedavg/iid_K1_seed0", 2 * 1500.0, "NVIDIA H100 80GB HBM3", world=2)
    _run_json(runs / "synthetic/tiny-bert/fedavg/iid_K1_seed0", 475.0, "x86_64", peak=626 * 2 ** 20)
    (runs / "imdb/bert-base-cased/fedavg/iid_K1_seed0/segments").mkdir()  # a chain's parts are not cells
    (runs / "imdb/bert-base-cased/fedavg/iid_K1_seed0/segments/r10.run.json").write_text("{}")
    found = {c.model: c for c in cluster.calibrate(tmp_path / "results")}
    assert found["bert-base-cased"].throughput == 740.0 and found["bert-base-cased"].cells == 3
    assert found["distilbert-base-cased"].throughput == 1500.0  # per GPU
    assert found["tiny-bert"].peak_mb == 626 and found["bert-base-cased"].peak_mb is None
    assert main(["cluster-check", "--calibrate", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "    resources: {throughput: 740}   # NVIDIA H100 80GB HBM3, 3 cell(s)" in out
    assert yaml.safe_load("\n".join(out.split("models:\n", 1)[1].splitlines())) is not None


def test_cluster_check_without_slurm_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    monkeypatch.chdir(REPO)
    assert main(["cluster-check", "--configfile", "config/demo.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedsweep: error: cluster-check: scontrol not found: run this on a SLURM login node"]


def test_cluster_check_config_errors_are_one_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": {"tiny-bert": {}}, "datasets": {"d": {"budget": 1}}}))
    monkeypatch.chdir(REPO)
    assert main(["cluster-check", "--configfile", str(bad)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fedsweep: error: config: datasets/d: 'second_threshold' is a required property")
