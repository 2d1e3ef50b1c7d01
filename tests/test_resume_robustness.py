"""What a killed or signalled run leaves behind, and what its rerun makes of it: checkpoint
format, thread counts, stale temporary files, file modes, SIGTERM at every stage, run.json."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

import fedsweep.io as fio
import fedsweep.train as ftrain
from fedsweep import FedsweepError, stop
from fedsweep.io import atomic_path, current_umask, remove_stale_temps, write_json, write_parquet
from fedsweep.partition import iid_shards, write_shards
from fedsweep.train import TrainConfig, run

TIMING = ["train_seconds", "aggregate_seconds", "eval_seconds", "peak_memory_bytes"]  # differ run to run
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _shards(root: Path, clients: int = 2) -> str:
    path = root / f"robust_shards_K{clients}.parquet"
    if not path.exists():
        write_shards(path, iid_shards(256, clients, 0), {"scheme": "iid", "seed": 0, "train_rows": 256})
    return str(path)


def _cfg(root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(tokens_dir=str(root / "tokens"), shards=_shards(root), model="tiny-bert", out_dir=str(out),
                rounds=1, epochs=1, batch_size=16, lr=0.05, progress="none", dataset="synth")
    base.update(kw)
    return TrainConfig(**base)


def _args(root: Path, out: Path, rounds: int = 2) -> list[str]:
    return ["train", "--tokens-dir", str(root / "tokens"), "--shards", _shards(root), "--model", "tiny-bert",
            "--rounds", str(rounds), "--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--progress", "lines",
            "--out-dir", str(out)]


@pytest.fixture
def threads():
    """Set torch's thread count for a test; put the original back afterwards."""
    original = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(original)


@pytest.fixture
def umask():
    original = os.umask(0o022)
    os.umask(original)
    yield os.umask
    os.umask(original)


# --- checkpoint format ---------------------------------------------------------------------------

def test_checkpoint_of_the_unaligned_format_is_refused_in_one_line(synth_tokens, tmp_path):
    out = tmp_path / "old"
    run(_cfg(synth_tokens, out))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["format"] == 2 and ckpt["layout"] == "fp32-align16" and ckpt["weights"].numel() % 16 == 0
    # What fedsweep 0.1.0 wrote: format 1, no layout, the parameters without padding.
    from fedsweep.engine import FlatParameters
    from fedsweep.models import build_model

    flat = FlatParameters(build_model("tiny-bert", 4, seed=0))
    old = {k: v for k, v in ckpt.items() if k not in ("layout", "threads", "thread_history")}
    old.update(format=1, weights=flat.unpadded(ckpt["weights"]))
    torch.save(old, out / "checkpoint.pt")
    with pytest.raises(FedsweepError) as err:
        run(_cfg(synth_tokens, out, rounds=2))
    message = str(err.value)
    assert "\n" not in message and "has format 1" in message and "delete it to start over" in message
    # A vector of the wrong length under the current format is refused too, not mis-loaded.
    torch.save({**ckpt, "weights": ckpt["weights"][:-16]}, out / "checkpoint.pt")
    with pytest.raises(FedsweepError, match=r"holds \d+ weights, the model's layout has \d+; delete it"):
        run(_cfg(synth_tokens, out, rounds=2))


def test_stale_checkpoint_is_refused_or_restarted_as_asked(synth_tokens, tmp_path, capsys):
    """Another lr, or other weights under the same local model path, make a checkpoint stale: by hand it
    is refused in one line; with stale_checkpoint=restart (the workflow) the cell starts over and ends
    exactly as a fresh run of the new settings does."""
    from transformers import AutoModelForSequenceClassification

    from fedsweep.models import tiny_config

    out = tmp_path / "cell"
    run(_cfg(synth_tokens, out, rounds=1))
    with pytest.raises(FedsweepError, match=r"from a different config \(lr: 0.05 != 0.07\); refusing to resume"):
        run(_cfg(synth_tokens, out, rounds=1, lr=0.07))
    capsys.readouterr()
    before = torch.load(out / "checkpoint.pt", weights_only=False)
    restarted = run(_cfg(synth_tokens, out, rounds=1, lr=0.07, stale_checkpoint="restart"))
    err = capsys.readouterr().err
    assert "warning: checkpoint " in err and "from a different config (lr: 0.05 != 0.07); its results (metrics " \
           "of every round) are kept in " in err and "starting over (stale_checkpoint=restart)" in err
    # the earlier settings' results are not lost: their checkpoint (every round's metrics) is aside
    (kept,) = (out / "replaced").glob("*/checkpoint.pt")
    assert str(kept) in err
    assert json.loads((kept.parent / "progress.json").read_text())["round"] == 1  # its sidecar went with it
    assert pd.DataFrame(torch.load(kept, weights_only=False)["metrics"]).equals(pd.DataFrame(before["metrics"]))
    fresh = run(_cfg(synth_tokens, tmp_path / "fresh", rounds=1, lr=0.07))
    pd.testing.assert_frame_equal(restarted.drop(columns=TIMING), fresh.drop(columns=TIMING))

    # A local model folder whose weights were replaced: same spec string, other fingerprint.
    folder = tmp_path / "mybert"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(tiny_config("tiny-bert", 4)).save_pretrained(folder)
    local = tmp_path / "local"
    run(_cfg(synth_tokens, local, model=str(folder), rounds=1))
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(tiny_config("tiny-bert", 4)).save_pretrained(folder)
    with pytest.raises(FedsweepError, match=r"from a different config \(model_fingerprint: 'local:"):
        run(_cfg(synth_tokens, local, model=str(folder), rounds=2))


# --- thread counts -------------------------------------------------------------------------------

def test_resume_at_another_thread_count_warns_and_is_recorded(synth_tokens, tmp_path, threads, capsys):
    out = tmp_path / "t"
    threads(1)
    run(_cfg(synth_tokens, out, rounds=1))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["threads"] == 1
    first = json.loads((out / "run.json").read_text())
    assert first["threads"] == 1 and first["threads_at_checkpoint"] is None
    assert first["thread_history"] == [{"from_round": 1, "threads": 1}]
    capsys.readouterr()

    threads(2)
    run(_cfg(synth_tokens, out, rounds=2))
    err = capsys.readouterr().err
    assert "resuming at 2 threads after 1: the result is exact only to rounding" in err
    assert len([line for line in err.splitlines() if "threads after" in line]) == 1
    summary = json.loads((out / "run.json").read_text())
    assert summary["threads"] == 2 and summary["threads_at_checkpoint"] == 1
    assert summary["thread_history"] == [{"from_round": 1, "threads": 1}, {"from_round": 2, "threads": 2}]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["threads"] == 2 and ckpt["thread_history"] == [[1, 1], [2, 2]]

    run(_cfg(synth_tokens, out, rounds=3))  # the same count again: silent, the history kept
    assert "threads after" not in capsys.readouterr().err
    summary = json.loads((out / "run.json").read_text())
    assert summary["threads_at_checkpoint"] == 2 and len(summary["thread_history"]) == 2


# --- stale temporary files -----------------------------------------------------------------------

def test_atomic_path_killed_mid_write_leaves_a_temp_that_the_next_run_removes(synth_tokens, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # A real SIGKILL inside atomic_path, as during a checkpoint write.
    script = textwrap.dedent(f"""
        import os, signal
        from fedsweep.io import atomic_path
        with atomic_path({str(out / "checkpoint.pt")!r}) as tmp:
            tmp.write_bytes(b"x" * 100_000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == -signal.SIGKILL
    stale = list(out.glob(".checkpoint.pt.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size == 100_000
    (out / ".run.json.abc_1234.tmp").write_text("{")
    kept = [out / ".notes.txt.abcd1234.tmp", out / "scratch.tmp", out / ".checkpoint.pt.tmp",
            out / "sub" / ".checkpoint.pt.abcd1234.tmp"]
    for path in kept:
        path.parent.mkdir(exist_ok=True)
        path.write_text("not fedsweep's")
    capsys.readouterr()
    run(_cfg(synth_tokens, out))
    assert "removed 2 stale temporary file(s)" in capsys.readouterr().err
    assert not list(out.glob(".checkpoint.pt.*.tmp")) and not list(out.glob(".run.json.*.tmp"))
    assert all(path.exists() for path in kept)  # other names, other folders: left alone
    assert (out / "checkpoint.pt").exists()


def test_remove_stale_temps_matches_atomic_path_names_only(tmp_path):
    (tmp_path / ".a.parquet.q1w2e3r4.tmp").write_text("")
    (tmp_path / ".b.json.zzzzzzzz.tmp").write_text("")
    (tmp_path / ".b.json.zzzz.tmp").write_text("")  # not mkstemp's 8 characters
    (tmp_path / ".c.ABCDEFGH.tmp").write_text("")  # mkstemp uses lower case
    assert [p.name for p in remove_stale_temps(tmp_path, ["a.parquet"])] == [".a.parquet.q1w2e3r4.tmp"]
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".b.json.zzzzzzzz.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.json.zzzz.tmp", ".c.ABCDEFGH.tmp"]
    assert remove_stale_temps(tmp_path / "missing") == []


# --- file modes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    write_json(tmp_path / "a.json", {"x": 1})
    write_parquet(tmp_path / "b.parquet", pd.DataFrame({"x": [1]}))
    with atomic_path(tmp_path / "c.pt") as tmp:
        torch.save({"x": 1}, tmp)
    with open(tmp_path / "plain", "w"):
        pass
    for name in ("a.json", "b.parquet", "c.pt", "plain"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert current_umask() == mask  # reading it left it as it was


def test_umask_fallback_without_proc(tmp_path, umask, monkeypatch):
    umask(0o002)

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(fio, "open", no_proc, raising=False)  # shadows the builtin in fedsweep.io only
    assert current_umask() == 0o002
    assert os.umask(0o002) == 0o002  # put back


def test_run_outputs_are_group_readable_under_umask_002(synth_tokens, tmp_path, umask):
    umask(0o002)
    out = tmp_path / "m"
    run(_cfg(synth_tokens, out))
    for name in ("checkpoint.pt", "metrics.parquet", "run.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o664, name


# --- run.json ------------------------------------------------------------------------------------

def test_run_json_records_label_names_and_data_provenance(synth_tokens, tmp_path):
    out = tmp_path / "j"
    run(_cfg(synth_tokens, out))
    summary = json.loads((out / "run.json").read_text())
    meta = json.loads((synth_tokens / "tokens" / "meta.json").read_text())
    assert summary["class_names"] == meta["class_names"] and len(summary["class_names"]) == 4
    assert summary["data"]["dataset"] == meta["dataset"] == "synth"
    data_meta = json.loads((synth_tokens / "data" / "meta.json").read_text())
    assert summary["data_sha256"] == meta["source_sha256"] == data_meta["sha256"]
    assert set(summary["data_sha256"]) == {"train", "test"}
    assert summary["data"]["tokens_sha256"] == meta["sha256"] and summary["data"]["tokenizer"] == "tiny-bert"


# --- SIGTERM -------------------------------------------------------------------------------------

def test_stop_module_imports_nothing_heavy():
    code = ("import sys, fedsweep.stop as s; assert s.install_stop_handler(); "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'pandas', 'transformers')]; "
            "print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def _term_during(target: str, args: list[str], *, install_first: bool = False) -> subprocess.CompletedProcess:
    """``python -m fedsweep ARGS`` in a subprocess that sends itself SIGTERM when ``target`` runs:
    "imports" (after the handler is installed, as cli.main will, before torch is imported), or
    a function of fedsweep.train ("load_split": data load, "evaluate_classes": the round-0 evaluation,
    "write_parquet": the final writes)."""
    if target == "imports":
        hook = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    else:
        hook = textwrap.dedent(f"""
            import os, signal
            import fedsweep.train as t
            original = t.{target}
            def {target}(*a, **k):
                os.kill(os.getpid(), signal.SIGTERM)
                return original(*a, **k)
            t.{target} = {target}
        """)
    script = "\n".join([
        "import runpy, sys",
        "from fedsweep.stop import install_stop_handler",
        "install_stop_handler()" if install_first else "",
        hook,
        f"sys.argv = ['fedsweep', *{args!r}]",
        "runpy.run_module('fedsweep', run_name='__main__', alter_sys=True)",
    ])
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC})


@pytest.mark.slow
@pytest.mark.parametrize("target", ["imports", "load_split", "evaluate_classes"])
def test_sigterm_before_round_1_finished_says_nothing_saved(synth_tokens, tmp_path, target):
    out = tmp_path / target
    proc = _term_during(target, _args(synth_tokens, out), install_first=target == "imports")
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "SIGTERM: stopped before round 1 finished; nothing saved" in proc.stderr
    assert "saved round" not in proc.stderr
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.parquet").exists()


@pytest.mark.slow
def test_sigterm_during_final_writes_completes_them(synth_tokens, tmp_path):
    out = tmp_path / "final"
    proc = _term_during("write_parquet", _args(synth_tokens, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SIGTERM during the final writes: they completed" in proc.stderr
    assert (out / "metrics.parquet").exists() and (out / "run.json").exists()
    pd.testing.assert_frame_equal(  # ... and they are the uninterrupted run's
        pd.read_parquet(out / "metrics.parquet").drop(columns=TIMING),
        run(_cfg(synth_tokens, tmp_path / "plain", rounds=2)).drop(columns=TIMING))


def test_sigterm_in_process_before_new_rounds_keeps_the_checkpoint(synth_tokens, tmp_path, monkeypatch, capsys):
    """run() installs the handler itself when no one did, and puts the previous one back."""
    out = tmp_path / "r"
    run(_cfg(synth_tokens, out, rounds=1))
    before = torch.load(out / "checkpoint.pt", weights_only=False)
    original = ftrain.build_model

    def build_model(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **k)

    monkeypatch.setattr(ftrain, "build_model", build_model)
    handler = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(_cfg(synth_tokens, out, rounds=3))
    assert exit_.value.code == 143
    err = capsys.readouterr().err
    assert "SIGTERM: stopped before round 2 finished; round 1 is in" in err and "(from an earlier run)" in err
    after = torch.load(out / "checkpoint.pt", weights_only=False)
    assert after["round"] == 1 and torch.equal(after["weights"], before["weights"])
    assert signal.getsignal(signal.SIGTERM) == handler and not stop.stop_requested()


@pytest.mark.parametrize("every", [1, 100])
def test_sigterm_mid_round_saves_the_last_round_and_resumes_bitwise(synth_tokens, tmp_path, monkeypatch, capsys,
                                                                   every):
    """A stop between SGD steps of round 3 leaves round 2 in the checkpoint (saved at its end with
    checkpoint_every=1, at the stop with 100: "saved round 2" either way, as tests/test_slurm.py
    expects) and the rerun ends where an uninterrupted run ends, to the bit."""
    import fedsweep.rounds as frounds

    out = tmp_path / "mid"
    original = frounds.train_round

    def train_round(*a, round_, **k):
        if round_ == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the next step boundary stops it
        return original(*a, round_=round_, **k)

    monkeypatch.setattr(frounds, "train_round", train_round)
    with pytest.raises(SystemExit) as exit_:
        run(_cfg(synth_tokens, out, rounds=4, checkpoint_every=every))
    assert exit_.value.code == 143
    assert "SIGTERM: saved round 2 to" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["round"] == 2
    monkeypatch.setattr(frounds, "train_round", original)
    resumed = run(_cfg(synth_tokens, out, rounds=4, checkpoint_every=every))
    straight = run(_cfg(synth_tokens, tmp_path / "straight", rounds=4, checkpoint_every=every))
    pd.testing.assert_frame_equal(resumed.drop(columns=TIMING), straight.drop(columns=TIMING))
    assert torch.equal(torch.load(out / "checkpoint.pt", weights_only=False)["weights"],
                       torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["weights"])


def test_handler_installed_by_the_caller_is_reused_and_a_served_request_is_forgotten(synth_tokens, tmp_path,
                                                                                     monkeypatch, capsys):
    """As the command line does: install_stop_handler() before run(). run() keeps that handler
    (it is the caller's to remove) and forgets the request it served, so the caller can go on."""
    previous = signal.getsignal(signal.SIGTERM)
    assert stop.install_stop_handler() and stop.handler_installed()
    try:
        installed = signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. during the imports, before run() starts
        assert stop.stop_requested()
        with pytest.raises(SystemExit) as exit_:
            run(_cfg(synth_tokens, tmp_path / "a"))
        assert exit_.value.code == 143
        assert "stopped before round 1 finished; nothing saved" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) == installed and not stop.stop_requested()
        assert len(run(_cfg(synth_tokens, tmp_path / "a"))) == 2  # not stopped again
    finally:
        stop.uninstall_stop_handler()
    assert signal.getsignal(signal.SIGTERM) == previous and not stop.handler_installed()
