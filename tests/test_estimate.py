"""fedsweep.estimate: the memory and time estimates of a training cell and the segment arithmetic."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from fedsweep import FedsweepError, estimate, modelspec

REPO = Path(__file__).resolve().parents[1]


def validated(config: dict) -> dict:
    from snakemake.utils import validate

    validate(config, schema=str(REPO / "workflow/schemas/config.schema.yaml"))
    return config


def paper_config(**resources) -> dict:
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["resources"] = resources
    return validated(config)


# ----------------------------------------------------------------------------- memory


def test_memory_of_a_tiny_cpu_cell_is_the_floor():
    shape = modelspec.model_shape("tiny-bert")
    est = estimate.estimate_memory(shape, batch_size=16, max_length=32, client_group=1, gpus=0, rows=(256, 160))
    # measured: a tiny-bert demo cell peaks at ~0.6 GB (run.json peak_memory_bytes)
    assert est.mem_mb == estimate.MEM_FLOOR_MB == 2000


def test_memory_of_bert_base_on_yelp_with_a_gpu():
    shape = modelspec.model_shape("bert-base-cased")
    est = estimate.estimate_memory(shape, batch_size=32, max_length=128, client_group=1, gpus=1,
                                  rows=(650_000, 50_000))
    mib = 2 ** 20
    state = shape.params * 28 / mib  # fp32 global + client + grads, fp64 sum, fp32 unit-update sum, checkpoint
    data = 700_000 * 128 * 32 / mib
    assert est.activations_mb == 0  # on the GPU
    assert math.isclose(est.state_mb, state) and math.isclose(est.data_mb, data)
    expected = estimate.BASE_MB_GPU + estimate.MEM_MARGIN * (state + data)
    assert est.mem_mb == math.ceil(expected / 500) * 500 == 11500
    assert est.mem_mb < 32000  # the old flat default, refused by any node with less


def test_memory_grows_with_activations_on_cpu_and_with_client_group():
    shape = modelspec.model_shape("bert-base-cased")
    kw = dict(batch_size=32, max_length=128, rows=(25_000, 25_000))
    gpu = estimate.estimate_memory(shape, client_group=1, gpus=1, **kw)
    cpu = estimate.estimate_memory(shape, client_group=1, gpus=0, **kw)
    group = estimate.estimate_memory(shape, client_group=8, gpus=0, **kw)
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
            plan = estimate.plan_cell(config, dataset, model, 1, 0, rows=rows[dataset],
                                     shape=modelspec.shape_of_config(modelspec.KNOWN_CONFIGS[model], "known"))
            assert plan.targets == (config["datasets"][dataset]["second_threshold"],)
            got = plan.minutes(plan.rounds)
            assert abs(got - (10 + (minutes - 11) / factor)) <= 1, (dataset, model, got)


def test_auto_throughput_is_relative_to_bert_base():
    bert = modelspec.shape_of_config(modelspec.KNOWN_CONFIGS["bert-base-cased"], "known")
    distil = modelspec.shape_of_config(modelspec.KNOWN_CONFIGS["distilbert-base-cased"], "known")
    albert = modelspec.shape_of_config(modelspec.KNOWN_CONFIGS["albert-base-v1"], "known")
    tp = estimate.auto_throughput
    assert tp(bert, max_length=128, gpus=1, threads=4) == estimate.GPU_REFERENCE == 400
    assert math.isclose(tp(distil, max_length=128, gpus=1, threads=4), 800)
    assert math.isclose(tp(albert, max_length=128, gpus=1, threads=4), 400)
    assert math.isclose(tp(bert, max_length=128, gpus=2, threads=4), 800)
    assert tp(bert, max_length=256, gpus=1, threads=4) < 200  # longer texts: more work per example
    tiny = modelspec.model_shape("tiny-bert")
    assert tp(tiny, max_length=32, gpus=1, threads=1) == 400 * estimate.GPU_MAX_SPEEDUP  # launch-bound cap
    # on CPUs: ~32 examples/s for MiniLM at length 32 on one thread (the demo measures 31.8)
    minilm = modelspec.shape_of_config(modelspec.config_json("minilm"), "config.json")
    assert 25 < tp(minilm, max_length=32, gpus=0, threads=1) < 40


def test_round_targets():
    assert estimate.round_targets(100, 1) == [100]
    assert estimate.round_targets(100, 3) == [34, 67, 100]
    assert estimate.round_targets(12, 2) == [6, 12]
    assert estimate.round_targets(5, 5) == [1, 2, 3, 4, 5]
    for rounds in range(1, 40):
        for s in range(1, rounds + 1):
            t = estimate.round_targets(rounds, s)
            steps = [b - a for a, b in zip([0] + t, t)]
            assert t[-1] == rounds and min(steps) >= 1 and max(steps) - min(steps) <= 1


def test_plan_segments_splits_only_what_exceeds_max_runtime():
    est = estimate.RuntimeEstimate(fixed=10, work=8438, throughput=400)  # a Yelp cell: 8448 min
    assert estimate.plan_segments(est, 100, None) == [100]
    assert estimate.plan_segments(est, 100, 9000) == [100]
    targets = estimate.plan_segments(est, 100, 2880)  # a 2-day partition
    assert targets == [34, 67, 100]
    minutes = [estimate.job_minutes(est, 100, a + 1, b, 1, 2880) for a, b in zip([0] + targets, targets)]
    assert minutes == [2879, 2795, 2795] and all(m <= 2880 for m in minutes)
    # 12 h: 12 jobs of 8-9 rounds would be ~769 min for the longest: 13 jobs of 7-8 rounds
    assert estimate.plan_segments(est, 100, 720) == estimate.round_targets(100, 13)
    # a given runtime has no start-up part: 30 min in jobs of at most 20 -> 2 jobs of 15 min
    given = estimate.RuntimeEstimate(0, 30, None)
    assert estimate.plan_segments(given, 12, 20) == [6, 12]
    assert estimate.job_minutes(given, 12, 1, 6) == 15 and estimate.job_minutes(given, 12, 1, 12, attempt=2) == 60
    with pytest.raises(FedsweepError, match="one round takes ~95 min"):
        estimate.plan_segments(estimate.RuntimeEstimate(10, 850, 400), 10, 60)


def test_job_minutes_double_per_retry_up_to_max_runtime():
    est = estimate.RuntimeEstimate(fixed=10, work=938, throughput=400)  # 948 min
    assert estimate.job_minutes(est, 200, 1, 200, attempt=1) == 949
    assert estimate.job_minutes(est, 200, 1, 200, attempt=2) == 1897
    assert estimate.job_minutes(est, 200, 1, 200, attempt=3, max_runtime=2880) == 2845
    assert estimate.job_minutes(est, 200, 1, 200, attempt=4, max_runtime=2880) == 2880


def test_plan_cell_with_max_runtime_and_per_model_settings():
    config = paper_config(max_runtime=2880)
    rows = (650_000, 50_000)
    bert = estimate.plan_cell(config, "yelp_review_full", "bert-base-cased", 1, 0, rows=rows,
                             shape=modelspec.shape_of_config(modelspec.KNOWN_CONFIGS["bert-base-cased"], "known"))
    assert bert.targets == (34, 67, 100)
    assert [bert.minutes(t) for t in bert.targets] == [2879, 2795, 2795]
    assert bert.minutes(100, attempt=2) == 2880
    assert bert.gpus == 1 and bert.mem_mb == 11500
    config["models"]["bert-base-cased"]["resources"] = {"throughput": 800, "mem_mb": 20000}
    fast = estimate.plan_cell(config, "yelp_review_full", "bert-base-cased", 1, 0, rows=rows, shape=bert.shape)
    assert fast.targets == (50, 100) and fast.mem_mb == 20000 and fast.memory is None
    # the number of jobs follows split_rows (known before any download), the minutes the rows
    split = estimate.plan_cell(config, "yelp_review_full", "bert-base-cased", 1, 0, rows=(65_000, 5_000),
                              split_rows=rows, shape=bert.shape)
    assert split.targets == fast.targets and split.minutes(50) < fast.minutes(50)


def test_retries_never_ask_more_than_the_partition_allows():
    """A retry doubles its job's time; once the workflow knows the partition's MaxTime (its check
    before the first SLURM job sets Sweep.time_limit), no request exceeds it: it would pend forever."""
    from pathlib import Path

    import yaml

    from fedsweep.config import load

    repo = Path(__file__).resolve().parents[1]
    sweep = load(yaml.safe_load((repo / "config" / "config.yaml").read_text()), repo)
    cell = sweep.cells[0]
    rounds = sweep.plan(**cell).rounds
    first, retry = sweep.job_minutes(cell, rounds, 1), sweep.job_minutes(cell, rounds, 2)
    assert retry > first
    sweep.time_limit = first + 5
    assert sweep.job_minutes(cell, rounds, 1) == first and sweep.job_minutes(cell, rounds, 2) == first + 5
