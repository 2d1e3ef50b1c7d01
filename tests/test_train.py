"""A whole cell: metrics, determinism, resume after SIGKILL, model specs, and input errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedsweep import FedsweepError
from fedsweep.cli import main
from fedsweep.partition import iid_shards, write_shards
from fedsweep.train import METRIC_COLUMNS, TrainConfig, run

TIMING = ["train_seconds", "aggregate_seconds", "eval_seconds", "peak_memory_bytes"]  # differ run to run


def _shards(root: Path, clients: int, seed: int = 0) -> str:
    path = root / f"shards_K{clients}_s{seed}.parquet"
    if not path.exists():
        write_shards(path, iid_shards(256, clients, seed), {"scheme": "iid", "seed": seed, "train_rows": 256})
    return str(path)


def _cfg(root: Path, out: Path, clients: int = 2, **kw) -> TrainConfig:
    base = dict(tokens_dir=str(root / "tokens"), shards=_shards(root, clients), model="tiny-bert",
                out_dir=str(out), rounds=3, epochs=1, batch_size=16, lr=0.05, progress="none", dataset="synth")
    base.update(kw)
    return TrainConfig(**base)


def test_metrics_content_and_learning(synth_tokens, tmp_path):
    m = run(_cfg(synth_tokens, tmp_path / "a", clients=2, rounds=6, epochs=2, batch_size=8, lr=0.03))
    assert list(m.columns[-len(METRIC_COLUMNS):]) == METRIC_COLUMNS
    assert m["round"].tolist() == list(range(7))
    assert m["test_accuracy"].between(0, 1).all() and (m["test_loss"] > 0).all()
    assert m.loc[1:, "examples"].eq(2 * 256).all()  # E=2 epochs over 2 x 128
    assert (m.loc[1:, "client_update_norm"] > 0).all()
    # Averaging shrinks drift: the mean update is no longer than the mean client update.
    assert (m.loc[1:, "mean_update_norm"] <= m.loc[1:, "client_update_norm"] + 1e-6).all()
    assert m["test_accuracy"].iloc[-1] > 0.4  # learning: chance is 0.25, its sd on 96 examples 0.044
    assert m["train_loss"].iloc[-1] < m["train_loss"].iloc[1]
    assert m["chance_accuracy"].iloc[0] < 0.35 and m["num_classes"].iloc[0] == 4
    assert (tmp_path / "a" / "run.json").exists() and (tmp_path / "a" / "checkpoint.pt").exists()


def test_same_config_same_numbers_and_seed_matters(synth_tokens, tmp_path):
    a = run(_cfg(synth_tokens, tmp_path / "a"))
    b = run(_cfg(synth_tokens, tmp_path / "b"))
    c = run(_cfg(synth_tokens, tmp_path / "c", seed=1))
    pd.testing.assert_frame_equal(a.drop(columns=TIMING), b.drop(columns=TIMING))
    assert not a["test_loss"].equals(c["test_loss"])


def test_eval_every_and_extension_resumes(synth_tokens, tmp_path):
    short = run(_cfg(synth_tokens, tmp_path / "x", rounds=2, eval_every=2))
    assert short["test_accuracy"].notna().tolist() == [True, False, True]
    longer = run(_cfg(synth_tokens, tmp_path / "x", rounds=4, eval_every=2))  # extends from round 2
    straight = run(_cfg(synth_tokens, tmp_path / "y", rounds=4, eval_every=2))
    pd.testing.assert_frame_equal(longer.drop(columns=TIMING), straight.drop(columns=TIMING))


@pytest.mark.slow
def test_resume_after_sigkill_mid_round_gives_identical_metrics(synth_tokens, tmp_path):
    args = ["--tokens-dir", str(synth_tokens / "tokens"), "--shards", _shards(synth_tokens, 4),
            "--model", "tiny-bert", "--rounds", "5", "--epochs", "1", "--batch-size", "16", "--lr", "0.05",
            "--progress", "lines"]
    straight = tmp_path / "straight"
    assert main(["train", *args, "--out-dir", str(straight)]) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedsweep", "train", *args, "--out-dir", str(killed)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    # Wait for round 2's line, then kill while round 3 trains (its checkpoint is not yet written).
    deadline = time.time() + 120
    for line in proc.stderr:
        if "round 2/5" in line or time.time() > deadline:
            break
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.parquet").exists()  # nothing that looks complete
    ckpt = torch.load(killed / "checkpoint.pt", weights_only=False)
    assert 2 <= ckpt["round"] < 5
    assert main(["train", *args, "--out-dir", str(killed)]) == 0
    a = pd.read_parquet(straight / "metrics.parquet").drop(columns=TIMING)
    b = pd.read_parquet(killed / "metrics.parquet").drop(columns=TIMING)
    pd.testing.assert_frame_equal(a, b)  # bitwise: assert_frame_equal with exact floats below
    assert (a["test_loss"].to_numpy() == b["test_loss"].to_numpy()).all()


def _signal_after_round(args: list[str], out, round_: int, sig: int) -> tuple[subprocess.Popen, str]:
    """``fedsweep ARGS`` for 50 rounds into ``out``, sent ``sig`` once round ``round_`` is logged;
    the process and the rest of its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "fedsweep", *args, "--rounds", "50", "--out-dir", str(out)],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if f"round {round_}/50" in line:
            break
    proc.send_signal(sig)
    return proc, proc.stderr.read()


@pytest.mark.slow
def test_ctrl_c_saves_the_last_round_like_sigterm(synth_tokens, tmp_path):
    """Ctrl-C in a terminal (SIGINT): one line saying what was saved, exit 130, no traceback."""
    out = tmp_path / "c"
    args = ["train", "--tokens-dir", str(synth_tokens / "tokens"), "--shards", _shards(synth_tokens, 2),
            "--model", "tiny-bert", "--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--progress", "lines"]
    proc, rest = _signal_after_round(args, out, 1, signal.SIGINT)
    assert proc.wait(timeout=60) == 130, rest
    assert "SIGINT: saved round" in rest and "KeyboardInterrupt" not in rest and "Traceback" not in rest, rest
    assert torch.load(out / "checkpoint.pt", weights_only=False)["round"] >= 1


@pytest.mark.slow
def test_sigterm_saves_last_round_exits_143_and_resumes_bitwise(synth_tokens, tmp_path):
    out = tmp_path / "t"
    args = ["train", "--tokens-dir", str(synth_tokens / "tokens"), "--shards", _shards(synth_tokens, 2),
            "--model", "tiny-bert", "--epochs", "1", "--batch-size", "16", "--lr", "0.05",
            "--checkpoint-every", "100", "--progress", "lines"]
    proc, rest = _signal_after_round(args, out, 2, signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, rest
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["round"] >= 2 and len(ckpt["metrics"]) == ckpt["round"] + 1  # saved though every=100
    assert f"SIGTERM: saved round {ckpt['round']} to" in rest and not (out / "metrics.parquet").exists()
    # The rerun (one round further) ends where an uninterrupted run ends, to the bit.
    rounds = str(ckpt["round"] + 1)
    assert main([*args, "--rounds", rounds, "--out-dir", str(out)]) == 0
    assert main([*args, "--rounds", rounds, "--out-dir", str(tmp_path / "straight")]) == 0
    a = pd.read_parquet(out / "metrics.parquet").drop(columns=TIMING)
    b = pd.read_parquet(tmp_path / "straight" / "metrics.parquet").drop(columns=TIMING)
    pd.testing.assert_frame_equal(a, b)
    assert torch.equal(torch.load(out / "checkpoint.pt", weights_only=False)["weights"],
                       torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["weights"])


@pytest.mark.parametrize("model", ["tiny-albert", "tiny-distilbert"])
def test_other_families_train(synth_tokens, tmp_path, model):
    m = run(_cfg(synth_tokens, tmp_path / model, model=model, rounds=1))
    assert m["test_accuracy"].between(0, 1).all() and len(m) == 2


def test_pretrained_minilm_and_saved_directory_specs(synth_tokens, tmp_path):
    from fedsweep.models import build_model, num_parameters

    minilm = build_model("minilm", 4, seed=0)
    assert 22_000_000 < num_parameters(minilm) < 23_500_000
    # The pre-trained encoder weights are loaded, not random: same values under two seeds.
    other = build_model("minilm", 4, seed=1)
    assert torch.equal(minilm.bert.embeddings.word_embeddings.weight, other.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(minilm.classifier.weight, other.classifier.weight)  # the new head is seeded
    saved = tmp_path / "saved"
    build_model("tiny-distilbert", 4, seed=0).save_pretrained(saved)
    m = run(_cfg(synth_tokens, tmp_path / "dir", model=str(saved), rounds=1))
    assert len(m) == 2


@pytest.mark.parametrize("change, message", [
    ({"rounds": 0}, "rounds=0 must be a positive integer"),
    ({"epochs": -1}, "epochs=-1"),
    ({"lr": 0.0}, "lr=0.0 must be a positive number"),
    ({"lr": float("nan")}, "lr=nan"),
    ({"protocol": "fast"}, "protocol='fast'"),
    ({"precision": "fp8"}, "precision='fp8'"),
    ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"}, "device="),
    ({"model": "./no/such/dir"}, "model './no/such/dir'"),
    ({"model": "not-a-real-org/not-a-model"}, "cannot load"),
    ({"batch_size": 200}, "no full batch of batch_size=200"),
    ({"tokens_dir": "/nonexistent"}, "has no meta.json"),
    ({"shards": "/nonexistent.parquet"}, "does not exist"),
])
def test_train_errors_before_compute(synth_tokens, tmp_path, change, message):
    out = tmp_path / "e"
    with pytest.raises(FedsweepError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run(_cfg(synth_tokens, out, **change))
    assert not (out / "metrics.parquet").exists() and not (out / "checkpoint.pt").exists()


def test_too_many_clients_for_a_batch(synth_tokens, tmp_path):
    with pytest.raises(FedsweepError, match="clients=32 leaves a shard of 8 examples, no full batch"):
        run(_cfg(synth_tokens, tmp_path / "k", clients=32, batch_size=16))


def test_checkpoint_from_other_config_is_refused(synth_tokens, tmp_path):
    run(_cfg(synth_tokens, tmp_path / "r", rounds=1))
    with pytest.raises(FedsweepError, match=r"different config \(lr: 0\.05 != 0\.1\); refusing to resume"):
        run(_cfg(synth_tokens, tmp_path / "r", rounds=2, lr=0.1))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synth_tokens, tmp_path):
    out = tmp_path / "nan"
    # Round 1 with a sane lr, then the same run extended with an absurd lr is refused as a
    # config change; so provoke the blow-up directly: huge lr diverges within a few rounds.
    with pytest.raises(FedsweepError, match=r"loss is not finite at round \d+ \(client \d+\); stopped"):
        run(_cfg(synth_tokens, out, lr=1e12, rounds=5))
    assert not (out / "metrics.parquet").exists()
    if (out / "checkpoint.pt").exists():
        ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
        assert torch.isfinite(ckpt["weights"]).all()


def test_cli_train_error_is_one_line(synth_tokens, tmp_path, capsys):
    rc = main(["train", "--tokens-dir", str(synth_tokens / "tokens"), "--shards", _shards(synth_tokens, 2),
               "--model", "tiny-bert", "--out-dir", str(tmp_path), "--rounds", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "fedsweep: error: train: rounds=0 must be a positive integer"


def test_an_exploding_loss_is_marked_diverged_everywhere(synth_tokens, tmp_path, capsys):
    """lr 1e6: the training loss explodes (~1e7) while the accuracy sits at chance. The cell ends
    (exit 0: its numbers are what they are) but says so on stderr, in run.json, in metrics.parquet
    and in the report's tables, instead of passing for an ordinary low accuracy."""
    import json

    from fedsweep.report import make_report

    out = tmp_path / "boom"
    args = ["train", "--tokens-dir", str(synth_tokens / "tokens"), "--shards", _shards(synth_tokens, 1),
            "--model", "tiny-bert", "--epochs", "1", "--batch-size", "16", "--lr", "1e6", "--rounds", "2",
            "--progress", "none", "--out-dir", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: diverged at round 1: training loss" in err and "x the initial" in err, err
    diverged = json.loads((out / "run.json").read_text())["diverged"]
    assert diverged["round"] == 1 and diverged["train_loss"] > 100 * diverged["initial_loss"]
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert list(metrics["diverged"]) == [False, True, True]
    config = tmp_path / "report.yaml"
    config.write_text("datasets: {synth: {budget: 2, second_threshold: 2}}\n")
    make_report([str(out / "metrics.parquet")], str(config), str(tmp_path / "tables"), str(tmp_path / "figures"))
    rounds = pd.read_csv(tmp_path / "tables" / "rounds_to_target.csv")
    assert (rounds["status"] == "diverged at round 1").all()
    assert (pd.read_csv(tmp_path / "tables" / "accuracy_at_budget.csv")["diverged_round"] == 1).all()
