"""The ``fedsweep`` command line: one subcommand per pipeline stage.

Every subcommand validates its inputs first and reports a bad one as a single line
``fedsweep: error: ...`` (exit 2) before any compute starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from . import FedsweepError, __version__


def _spec_mapping(text: str, origin: str) -> dict:
    """The spec in ``text`` (YAML or JSON), which must be a mapping; ``origin`` names it in errors.

    JSON first: what the workflow passes is JSON, whose numbers such as ``1e-06`` (json.dumps of
    1e-6) YAML 1.1 would read as text."""
    try:
        spec = json.loads(text)
    except ValueError:
        spec = None
    try:
        spec = yaml.safe_load(text) if spec is None else spec
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FedsweepError(f"{origin}: invalid YAML{at}: {problem}") from None
    if not isinstance(spec, dict):
        got = "nothing" if spec is None else type(spec).__name__
        raise FedsweepError(f"{origin}: the spec must be a mapping (key: value), got {got}")
    return spec


def _read_spec_file(path: str) -> dict:
    spec_path = Path(path).absolute()
    try:
        text = spec_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedsweepError(f"{spec_path}: spec file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise FedsweepError(f"{spec_path}: cannot read the spec file ({reason})") from None
    return _spec_mapping(text, str(spec_path))


def _parse_spec(text: str | None, path: str | None) -> dict | None:
    if text and path:
        raise FedsweepError("give --spec or --spec-file, not both")
    if path:
        return _read_spec_file(path)
    if text:
        return _spec_mapping(text, "--spec")
    return None


def cmd_prepare(a: argparse.Namespace) -> None:
    from .data import duplicate_warning, prepare

    meta = prepare(a.name, _parse_spec(a.spec, a.spec_file), a.out_dir, base_dir=a.base_dir)
    warning = duplicate_warning(meta)
    if warning:
        print(f"fedsweep: warning: {warning}", file=sys.stderr)
    print(f"prepared {a.name}: {meta['rows']['train']} train / {meta['rows']['test']} test rows, "
          f"{meta['num_classes']} classes -> {a.out_dir}")


def cmd_tokenize(a: argparse.Namespace) -> None:
    from .tokens import tokenize

    meta = tokenize(a.data_dir, a.tokenizer, a.max_length, a.out_dir)
    print(f"tokenized {meta['dataset']} with {a.tokenizer} (L={a.max_length}): mean length "
          f"{meta['mean_length']['train']:.1f}, {100 * meta['truncated_share']['train']:.1f}% truncated -> {a.out_dir}")


def _partition_settings(a: argparse.Namespace) -> dict:
    """The partition flags given, checked by the partition rules the config uses (one line)."""
    from .schemes import SETTINGS, check
    from .settings import given_flags

    if a.clients < 1:
        raise FedsweepError(f"partition: --clients {a.clients} must be an integer >= 1")
    if a.min_size < 1:
        raise FedsweepError(f"partition: --min-size {a.min_size} must be an integer >= 1")
    if a.seed < 0:
        raise FedsweepError(f"partition: --seed {a.seed} must be an integer >= 0")
    flag = lambda key: "--" + key.replace("_", "-")  # noqa: E731
    try:
        return check(given_flags(a, SETTINGS.values()), flag, lambda key, value: f"{flag(key)} {value}")
    except FedsweepError as exc:
        raise FedsweepError(f"partition: {exc}") from None


def cmd_partition(a: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    from .data import read_meta
    from .partition import label_histogram, partition, read_shards, scheme_info, write_shards
    from .schemes import DEFAULTS

    settings = {**DEFAULTS, **_partition_settings(a)}
    meta = read_meta(a.data_dir)
    labels = pd.read_parquet(Path(a.data_dir) / "train.parquet", columns=["label"])["label"].to_numpy()
    scheme, alpha = settings.pop("scheme"), settings.pop("alpha")
    shards = partition(labels, a.clients, a.seed, scheme, alpha, min_size=a.min_size, **settings)
    info = {**scheme_info(scheme, alpha, **settings), "seed": a.seed, "train_rows": len(labels),
            "train_sha256": meta["sha256"]["train"], "dropped": int(len(labels) - sum(len(s) for s in shards))}
    write_shards(a.out, shards, info)
    hist = label_histogram(read_shards(a.out), labels, meta["num_classes"])
    share = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    sizes = sorted({len(s) for s in shards})
    sizes_text = str(sizes) if len(sizes) <= 4 else f"{sizes[0]}..{sizes[-1]} rows"
    print(f"partitioned {len(labels)} rows into {a.clients} {scheme} shards of {sizes_text} ({info['kind']}; "
          f"dropped {info['dropped']}; max class share per client {share.max():.2f}) -> {a.out}")


def _train_config(a: argparse.Namespace):
    """The run's settings: ``--settings`` (a YAML/JSON mapping of a cell's settings: what the
    workflow passes), with the flags given by hand over it; a flag that contradicts the mapping
    is an error. Every value is checked later by ``TrainConfig.validate``."""
    from .settings import given_flags
    from .trainconfig import CELL_KEYS, DECLARED, TrainConfig

    cell = _spec_mapping(a.settings, "--settings") if a.settings else {}
    unknown = [key for key in cell if key not in CELL_KEYS]
    if unknown:
        raise FedsweepError(f"--settings: unknown key {unknown[0]!r} (known: {', '.join(CELL_KEYS)})")
    flags = given_flags(a, DECLARED.values())
    if a.peft is not None:
        from .adapters import parse

        flags["peft"] = None if a.peft.strip() == "none" else _spec_mapping(a.peft, "--peft")
        parse(flags["peft"], "--peft")  # one line naming --peft's bad field, before anything loads
    for key, value in flags.items():
        if key in cell and cell[key] != value:
            raise FedsweepError(f"--settings: {key}={cell[key]!r} conflicts with --{key.replace('_', '-')} {value!r}")
    return TrainConfig(**{**cell, **flags})


def cmd_train(a: argparse.Namespace) -> None:
    from .train import run

    metrics = run(_train_config(a))
    last = metrics.dropna(subset=["test_accuracy"]).iloc[-1]
    print(f"trained {a.model} K={metrics['clients'].iloc[0]}: round {int(last['round'])} test accuracy "
          f"{last['test_accuracy']:.4f} -> {a.out_dir}")


def cmd_fetch(a: argparse.Namespace) -> None:
    from .io import write_json
    from .modelspec import MINILM_ALIASES, check_max_length, fetch

    record = fetch(a.model)
    if record["kind"] != "tiny" and a.model not in MINILM_ALIASES:  # bundled ones are known to load
        from .models import load_tokenizer

        load_tokenizer(a.model)  # the tokenizer files are in the cache (and the fast one builds)
    if a.max_length:  # now that its config.json is here: before any data is tokenised for it
        check_max_length(a.model, a.max_length, "")
    if a.out:
        write_json(a.out, record)
    print(f"fetched {a.model} ({record['kind']}): {record['path']}")


def cmd_report(a: argparse.Namespace) -> None:
    from .report import make_report

    outputs = make_report(a.metrics, a.config, a.tables_dir, a.figures_dir)
    print(json.dumps({k: str(v) for k, v in outputs.items()}, indent=1))


def cmd_check(a: argparse.Namespace) -> None:
    """The config checked as the workflow checks it (one line on a problem), then the grid's size."""
    from . import config

    files = a.configfile or ["config/config.yaml"]
    sweep = config.load(files, a.base_dir, row_cache=None)
    print(f"{' + '.join(map(str, files))}: ok")
    print("\n".join(config.summary(sweep)))


def cmd_status(a: argparse.Namespace) -> None:
    """Where a sweep stands: its cells finished, running, failed and not started (head node, no torch)."""
    from .status import status

    if a.stalled_after <= 0:
        raise FedsweepError(f"status: --stalled-after {a.stalled_after:g} must be a number of minutes > 0")
    print(status(a.configfile or ["config/config.yaml"], a.base_dir, as_json_output=a.json, every_cell=a.all,
                 stalled_after=a.stalled_after * 60))


def cmd_cluster_check(a: argparse.Namespace) -> None:
    """What the SLURM cluster offers, the profile settings to use, and the problems (exit 1)."""
    from . import cluster_check, config, slurm

    if a.calibrate:
        print("\n".join(cluster_check.calibration_report(a.calibrate)))
        return
    workdir = Path(a.workflow_dir)
    default_config = workdir / "config" / "config.yaml"
    configfiles = a.configfile or ([default_config] if default_config.exists() else [])
    profiles = a.profile if a.profile is not None else (
        [workdir / "profiles/slurm"] if (workdir / "profiles/slurm/config.yaml").exists() else [])
    profile = slurm.read_profiles(profiles)
    sweep = config.load(configfiles, ".") if configfiles else None
    info = slurm.query_cluster()
    report = cluster_check.check_cluster_report(
        info, profile=profile, profile_names=[str(p) for p in profiles], sweep=sweep,
        config_names=[str(c) for c in configfiles], partition=a.partition,
        accounts=slurm.user_accounts(), status_command=a.slurm_status_command)
    print("\n".join(report.lines))
    if report.problems:
        problems = cluster_check.summarize_problems(report.problems)
        print(f"\n{len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        raise SystemExit(1)
    print("\nno problems: the jobs fit this cluster")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsweep", description=__doc__)
    p.add_argument("--version", action="version", version=f"fedsweep {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _data_commands(sub)
    _train_command(sub)
    _sweep_commands(sub)
    return p


def _data_commands(sub) -> None:
    """prepare, tokenize and partition: a data set, its tokens, its client shards."""
    from .schemes import SETTINGS
    from .settings import add_flags

    s = sub.add_parser("prepare", help="load a data set into normalised Parquet + meta.json")
    s.add_argument("--name", required=True, help="data set name (a hub preset: imdb, yelp_review_full, ag_news)")
    s.add_argument("--spec", help="YAML/JSON mapping overriding the preset (source, hub_id, train, test, text, label, ...)")
    s.add_argument("--spec-file", help="the spec as a YAML file")
    s.add_argument("--base-dir", help="folder relative local file paths start from (default: the working directory)")
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("tokenize", help="tokenise a prepared data set once per tokenizer and max length")
    s.add_argument("--data-dir", required=True)
    s.add_argument("--tokenizer", required=True, help="model spec whose tokenizer to use")
    s.add_argument("--max-length", type=int, default=128)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("partition", help="split the training set into K client shards")
    s.add_argument("--data-dir", required=True)
    s.add_argument("--clients", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    add_flags(s, SETTINGS.values())
    s.add_argument("--min-size", type=int, default=1, help="smallest acceptable shard")
    s.add_argument("--out", required=True, help="output Parquet (one row per kept training example)")
    s.set_defaults(func=cmd_partition)


def _train_command(sub) -> None:
    """train: its flags derive from the declarations (fedsweep.settings, .algorithm)."""
    from . import algorithm, settings
    from .settings import add_flags

    s = sub.add_parser("train", help="run one cell (resumes from its checkpoint)")
    add_flags(s, settings.RUN.values(), required=settings.RUN_REQUIRED)
    s.add_argument("--settings", help="the cell's settings as one YAML/JSON mapping (what the workflow passes): "
                                      "any of the options below, with _ (e.g. {lr: 0.01, strategy: fedadam, "
                                      "server_lr: 0.01, peft: {method: lora, r: 8}})")
    add_flags(s.add_argument_group("training"), settings.JOB_TRAIN.values())
    add_flags(s.add_argument_group("algorithm (README: Algorithms; defaults: FedAvg with plain SGD clients)"),
              algorithm.SETTINGS.values())
    s.add_argument("--peft", help="parameter-efficient fine-tuning as a YAML/JSON mapping, e.g. {method: lora, "
                                  "r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, v_proj], "
                                  "aggregation: exact, base_dtype: bf16} (aggregation: fedit, ffa or exact; "
                                  "base_dtype: fp32 or bf16); none (default): full fine-tuning")
    s.set_defaults(func=cmd_train)


STATUS_HELP = """Where a sweep stands, read from the run folders of its config's cells (no Snakemake
state, no torch: run it on the head node, or on a grid copied from a cluster with rsync -a).

A cell is finished (metrics.parquet and run.json, to the data set's second_threshold; flagged if it
diverged), failed (its log's last line says its job ended: `fedsweep: error: ...`, a Python
exception, slurmstepd, CANCELLED, out of memory, `SIGTERM: saved round N`; or nothing was written
for longer than --stalled-after and 3 of its rounds: a job killed without a word), running
(started, written since), or not started. A rerun resumes failed cells from their checkpoints.
Remaining time: the examples left at the median examples/s of finished cells of the same model,
else the cluster estimate (resources.runtime).

--json prints one object: configfiles, results_dir, time (of the status, seconds since the epoch),
stalled_after_seconds; total and groups (one per data set x model x algorithm x partition: its keys,
cells, finished, running, failed, not_started, diverged, rounds_done, rounds, seconds_spent,
seconds_remaining, remaining_from: cells counted from measured examples/s or from the estimate);
cells (one per cell: name, dataset, model, algorithm, partition, clients, seed, state, round,
rounds, last_write, age_seconds, last_line, diverged, note, seconds_spent, seconds_remaining,
remaining_from)."""


def _sweep_commands(sub) -> None:
    """fetch, report, check, status and cluster-check: what the workflow's head node runs around the cells."""
    s = sub.add_parser("fetch", help="download a model's weights and tokenizer into the HF cache (head node)")
    s.add_argument("--model", required=True)
    s.add_argument("--max-length", type=int, default=0,
                   help="check that the model has this many positions (0: no check)")
    s.add_argument("--out", help="marker JSON written when done")
    s.set_defaults(func=cmd_fetch)

    s = sub.add_parser("report", help="tables and figures from the metrics of finished cells")
    s.add_argument("--metrics", nargs="*", required=True, help="metrics.parquet files (or folders to search)")
    s.add_argument("--config", required=True, help="the workflow config (budgets, targets, chance levels)")
    s.add_argument("--tables-dir", required=True)
    s.add_argument("--figures-dir", required=True)
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("check", help="check a workflow config as the workflow does, before any job, and print "
                                     "the grid's size (cells, jobs, estimated GPU-hours)")
    s.add_argument("--configfile", nargs="+", help="the config file(s), later ones winning (default: "
                                                   "config/config.yaml)")
    s.add_argument("--base-dir", default=".", help="where relative paths of the config start (where snakemake "
                                                   "runs: the repository root)")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("status", help="where a sweep stands, from its run folders: cells finished, running, "
                                      "failed and not started, rounds, time spent and remaining",
                       description=STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--configfile", nargs="+", help="the config file(s), later ones winning (default: "
                                                   "config/config.yaml)")
    s.add_argument("--base-dir", default=".", help="where relative paths of the config start (where snakemake "
                                                   "runs: the repository root)")
    s.add_argument("--json", action="store_true", help="one JSON object for scripts (keys above)")
    s.add_argument("--all", action="store_true", help="list every running, failed and diverged cell (default: "
                                                      "the first 20 of each)")
    s.add_argument("--stalled-after", type=float, default=30, metavar="MINUTES",
                   help="a started cell with no line saying it ended is running while it wrote within this "
                        "long or 3 of its rounds, whichever is longer (default: 30)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("cluster-check", help="SLURM: what the cluster offers and the profile settings to use "
                                             "(run on the login node before the first `snakemake --profile slurm`)")
    s.add_argument("--configfile", nargs="+", help="the workflow config(s) whose training jobs to check "
                                                   "(default: config/config.yaml)")
    s.add_argument("--profile", action="append", help="Snakemake profile folder(s), later ones winning "
                                                      "(default: profiles/slurm)")
    s.add_argument("--partition", help="check the training jobs against this partition (default: the "
                                       "profile's slurm_partition, else the cluster's default)")
    s.add_argument("--workflow-dir", default=".", help="the repository (Snakefile, workflow/, config/, profiles/)")
    s.add_argument("--slurm-status-command", choices=["sacct", "squeue"],
                   help="the snakemake flag of the same name, if you give it on the command line (over the profile)")
    s.add_argument("--calibrate", metavar="RESULTS_DIR",
                   help="instead: the training throughput of finished cells (run.json), per model, as config")
    s.set_defaults(func=cmd_cluster_check)


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # the `fedsweep` process itself, not a caller in Python
    argv = sys.argv[1:] if argv is None else list(argv)
    from . import stop  # imports only `signal`: installed before torch, so SIGTERM is never lost

    # Only `train` stops gracefully on SIGTERM and SIGINT; every other command keeps the defaults.
    owns_stop = argv[:1] == ["train"] and not stop.handler_installed() and stop.install_stop_handler()
    try:
        return _main(argv)
    finally:
        # A caller in Python gets its handlers back. The process keeps ours to its end: a SIGTERM
        # after the final writes must not kill it during interpreter shutdown (rc -15, a failed
        # job to SLURM and Snakemake, for a complete cell).
        if owns_stop and not as_program:
            stop.uninstall_stop_handler()


# The flags that name what a command writes: a folder, or a file (whose folder is made).
OUTPUT_FOLDERS = ("out_dir", "tables_dir", "figures_dir")
OUTPUT_FILES = ("out",)


def _check_outputs(args: argparse.Namespace) -> None:
    """``~`` expanded in the output paths, and a path that cannot be written as asked refused in
    one line before any work (a file where a folder goes, a folder where a file goes)."""
    for dest in OUTPUT_FOLDERS + OUTPUT_FILES:
        value = getattr(args, dest, None)
        if not value:
            continue
        path = Path(value).expanduser()
        setattr(args, dest, str(path))
        flag = "--" + dest.replace("_", "-")
        folder = path if dest in OUTPUT_FOLDERS else path.parent
        for above in (folder, *folder.parents):
            if above.exists() and not above.is_dir():
                raise FedsweepError(f"{flag} {value}: {above} is a file, not a folder")
        if dest in OUTPUT_FILES and path.is_dir():
            raise FedsweepError(f"{flag} {value}: is a folder, not a file")


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_outputs(args)
        args.func(args)
    except OSError as exc:
        # A file system refusal met later (permissions, a full disk): one line, not a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"fedsweep: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except FedsweepError as exc:
        # One line, whatever a library's message embedded in it holds.
        print(f"fedsweep: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
