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
    """The spec in ``text`` (YAML or JSON), which must be a mapping; ``origin`` names it in errors."""
    try:
        spec = yaml.safe_load(text)
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


def _check_partition_flags(a: argparse.Namespace) -> None:
    """Bad or inapplicable partition flags, named as the user typed them (one line, exit 2)."""
    from .partition import SCHEMES, SIZE_DISTRIBUTIONS

    def bad(flag: str, value, why: str) -> FedsweepError:
        return FedsweepError(f"partition: {flag} {value} {why}")

    if a.scheme not in SCHEMES:
        raise bad("--scheme", a.scheme, f"is not one of {', '.join(SCHEMES)}")
    if a.size_distribution not in SIZE_DISTRIBUTIONS:
        raise bad("--size-distribution", a.size_distribution, f"is not one of {', '.join(SIZE_DISTRIBUTIONS)}")
    uses_alpha = a.scheme == "dirichlet" or (a.scheme == "quantity_skew" and a.size_distribution == "dirichlet")
    uses_sigma = a.scheme == "quantity_skew" and a.size_distribution == "lognormal"
    for flag, value, needed, used in (
        ("--alpha", a.alpha, uses_alpha, uses_alpha),
        ("--sigma", a.sigma, uses_sigma, uses_sigma),
        ("--classes-per-client", a.classes_per_client, False, a.scheme == "shards"),
    ):
        if value is None and needed:
            raise FedsweepError(f"partition: --scheme {a.scheme}"
                                + (f" --size-distribution {a.size_distribution}" if a.scheme == "quantity_skew" else "")
                                + f" needs {flag}")
        if value is not None and not used:
            raise bad(flag, value, f"is not used by --scheme {a.scheme}"
                      + (f" --size-distribution {a.size_distribution}" if a.scheme == "quantity_skew" else ""))
        if value is not None and not value > 0:
            raise bad(flag, value, "must be > 0")
    if a.size_distribution != "dirichlet" and a.scheme != "quantity_skew":
        raise bad("--size-distribution", a.size_distribution, "is only used with --scheme quantity_skew")
    for flag, value in (("--clients", a.clients), ("--classes-per-client", a.classes_per_client),
                        ("--per-client", a.per_client), ("--min-rows", a.min_rows), ("--min-size", a.min_size)):
        if value is not None and value < 1:
            raise bad(flag, value, "must be an integer >= 1")


def cmd_partition(a: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    from .data import read_meta
    from .partition import label_histogram, partition, read_shards, scheme_info, write_shards

    _check_partition_flags(a)
    meta = read_meta(a.data_dir)
    labels = pd.read_parquet(Path(a.data_dir) / "train.parquet", columns=["label"])["label"].to_numpy()
    options = {"classes_per_client": a.classes_per_client or 2, "size_distribution": a.size_distribution,
               "sigma": a.sigma, "min_rows": a.min_rows, "per_client": a.per_client}
    shards = partition(labels, a.clients, a.seed, a.scheme, a.alpha, min_size=a.min_size, **options)
    info = {**scheme_info(a.scheme, a.alpha, **options), "seed": a.seed, "train_rows": len(labels),
            "train_sha256": meta["sha256"]["train"], "dropped": int(len(labels) - sum(len(s) for s in shards))}
    write_shards(a.out, shards, info)
    hist = label_histogram(read_shards(a.out), labels, meta["num_classes"])
    share = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    sizes = sorted({len(s) for s in shards})
    sizes_text = str(sizes) if len(sizes) <= 4 else f"{sizes[0]}..{sizes[-1]} rows"
    print(f"partitioned {len(labels)} rows into {a.clients} {a.scheme} shards of {sizes_text} ({info['kind']}; "
          f"dropped {info['dropped']}; max class share per client {share.max():.2f}) -> {a.out}")


def _algorithm_spec(a: argparse.Namespace, fields: dict) -> dict:
    """Merge ``--algorithm-spec`` (a YAML/JSON mapping of algorithm settings) into ``fields``."""
    from .algorithm import DEFAULTS

    if not a.algorithm_spec:
        return fields
    spec = _spec_mapping(a.algorithm_spec, "--algorithm-spec")
    for key, value in spec.items():
        if key not in DEFAULTS:
            raise FedsweepError(f"--algorithm-spec: unknown key {key!r} (known: {', '.join(DEFAULTS)})")
        if key in fields and fields[key] != value:
            raise FedsweepError(f"--algorithm-spec: {key}={value!r} conflicts with --{key.replace('_', '-')} "
                                f"{fields[key]!r}")
    return {**fields, **spec}


def _peft_spec(text: str | None) -> dict | None:
    """``--peft``: a YAML/JSON mapping ({method: lora, r: 16, ...}) or ``none``, checked here."""
    if text is None:
        return None
    from .lora import parse

    spec = None if text.strip() == "none" else _spec_mapping(text, "--peft")
    parse(spec, "--peft")  # one line naming a bad field, before anything loads
    return spec


def cmd_train(a: argparse.Namespace) -> None:
    from .train import TrainConfig, run

    fields = {k: v for k, v in vars(a).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    fields["peft"] = _peft_spec(a.peft)
    metrics = run(TrainConfig(**_algorithm_spec(a, fields)))
    last = metrics.dropna(subset=["test_accuracy"]).iloc[-1]
    print(f"trained {a.model} K={metrics['clients'].iloc[0]}: round {int(last['round'])} test accuracy "
          f"{last['test_accuracy']:.4f} -> {a.out_dir}")


def cmd_fetch(a: argparse.Namespace) -> None:
    from .io import write_json
    from .models import fetch, load_tokenizer
    from .preflight import check_max_length

    record = fetch(a.model)
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


def cmd_cluster_check(a: argparse.Namespace) -> None:
    """What the SLURM cluster offers, the profile settings to use, and the problems (exit 1)."""
    from . import cluster

    if a.calibrate:
        print("\n".join(cluster.calibration_report(a.calibrate)))
        return
    workdir = Path(a.workflow_dir)
    default_config = workdir / "config" / "config.yaml"
    configfiles = a.configfile or ([default_config] if default_config.exists() else [])
    profiles = a.profile if a.profile is not None else (
        [workdir / "profiles/slurm"] if (workdir / "profiles/slurm/config.yaml").exists() else [])
    profile = cluster.read_profiles(profiles)
    config = cluster.load_workflow_config(configfiles, workdir) if configfiles else None
    info = cluster.query_cluster()
    report = cluster.check_cluster_report(
        info, profile=profile, profile_names=[str(p) for p in profiles], config=config,
        config_names=[str(c) for c in configfiles], base_dir=".", partition=a.partition,
        accounts=cluster.user_accounts())
    print("\n".join(report.lines))
    if report.problems:
        problems = cluster.summarize_problems(report.problems)
        print(f"\n{len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        raise SystemExit(1)
    print("\nno problems: the jobs fit this cluster")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsweep", description=__doc__)
    p.add_argument("--version", action="version", version=f"fedsweep {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

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
    s.add_argument("--scheme", default="iid",
                   help="iid (the paper), dirichlet (label skew), shards (sort by label, classes_per_client "
                        "pieces per client) or quantity_skew (i.i.d. labels, skewed sizes)")
    s.add_argument("--alpha", type=float,
                   help="Dirichlet concentration (dirichlet; quantity_skew with --size-distribution dirichlet)")
    s.add_argument("--classes-per-client", type=int, help="shards: label-sorted pieces per client (default 2)")
    s.add_argument("--size-distribution", default="dirichlet",
                   help="quantity_skew: client shares from dirichlet (--alpha) or lognormal (--sigma)")
    s.add_argument("--sigma", type=float, help="quantity_skew, lognormal: standard deviation of log share")
    s.add_argument("--min-rows", type=int, default=1, help="quantity_skew: rows every client gets at least")
    s.add_argument("--per-client", type=int,
                   help="N rows per client (a seeded K x N subset; the total grows with K: weak scaling)")
    s.add_argument("--min-size", type=int, default=1, help="smallest acceptable shard")
    s.add_argument("--out", required=True, help="output Parquet (one row per kept training example)")
    s.set_defaults(func=cmd_partition)

    s = sub.add_parser("train", help="run one FedAvg cell (resumes from its checkpoint)")
    s.add_argument("--tokens-dir", required=True)
    s.add_argument("--shards", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--rounds", type=int, required=True)
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--protocol", choices=["standard", "paper"])
    s.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16"])
    s.add_argument("--eval-every", type=int)
    s.add_argument("--eval-batch-size", type=int)
    s.add_argument("--client-group", type=int,
                   help="train this many clients at once as one vmapped model (GPU; 1 = one after another)")
    s.add_argument("--seed", type=int)
    s.add_argument("--device")
    s.add_argument("--dataset", help="data set name recorded in the metrics")
    s.add_argument("--partition", help="the partition's name (slug), recorded in metrics and run.json (default iid)")
    s.add_argument("--checkpoint-every", type=int)
    s.add_argument("--no-keep-checkpoint", dest="keep_checkpoint", action="store_false", default=None)
    s.add_argument("--progress", choices=["auto", "bar", "lines", "none"])
    s.add_argument("--stale-checkpoint", choices=["error", "restart"],
                   help="a checkpoint made with other settings, data or model: refuse it (error, the default) "
                        "or delete it and start over (restart, what the workflow passes)")
    g = s.add_argument_group("algorithm (README: Algorithms; defaults: FedAvg with plain SGD clients)")
    g.add_argument("--algorithm", help="the algorithm's name (slug), recorded in metrics and run.json")
    g.add_argument("--algorithm-spec", help="the algorithm settings as one YAML/JSON mapping (keys as the "
                                            "options below with _, e.g. {strategy: fedadam, server_lr: 0.01})")
    g.add_argument("--strategy", help="server: fedavg, fedavgm, fedadam, fedyogi, fedadagrad")
    g.add_argument("--server-lr", type=float, help="server learning rate (fedavgm: default 1; adaptive: required)")
    g.add_argument("--server-momentum", type=float, help="fedavgm: server momentum (default 0)")
    g.add_argument("--beta1", type=float, help="fedadam/fedyogi/fedadagrad: first-moment decay (0.9)")
    g.add_argument("--beta2", type=float, help="fedadam/fedyogi: second-moment decay (0.99)")
    g.add_argument("--tau", type=float, help="fedadam/fedyogi/fedadagrad: adaptivity; v starts at tau^2 (1e-3)")
    g.add_argument("--client", help="client update: plain, fedprox, scaffold")
    g.add_argument("--mu", type=float, help="fedprox: proximal weight")
    g.add_argument("--client-optimizer", help="sgd or adamw (reset for every client every round)")
    g.add_argument("--adam-beta1", type=float)
    g.add_argument("--adam-beta2", type=float)
    g.add_argument("--adam-eps", type=float)
    g.add_argument("--weight-decay", type=float, help="adamw: decoupled weight decay (0)")
    g.add_argument("--lr-schedule", help="client lr over rounds: constant or linear (decay to the last round)")
    g.add_argument("--warmup-rounds", type=int, help="linear warmup of the client lr over this many rounds")
    g.add_argument("--clients-per-round", type=int, help="clients sampled per round (0 = all)")
    g.add_argument("--client-fraction", type=float, help="or this fraction of the clients per round")
    s.add_argument("--peft", help="parameter-efficient fine-tuning as a YAML/JSON mapping, e.g. {method: lora, "
                                  "r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, v_proj], "
                                  "aggregation: exact, base_dtype: bf16} (aggregation: fedit, ffa or exact; "
                                  "base_dtype: fp32 or bf16); none (default): full fine-tuning")
    s.set_defaults(func=cmd_train)

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

    s = sub.add_parser("cluster-check", help="SLURM: what the cluster offers and the profile settings to use "
                                             "(run on the login node before the first `snakemake --profile slurm`)")
    s.add_argument("--configfile", nargs="+", help="the workflow config(s) whose training jobs to check "
                                                   "(default: config/config.yaml)")
    s.add_argument("--profile", action="append", help="Snakemake profile folder(s), later ones winning "
                                                      "(default: profiles/slurm)")
    s.add_argument("--partition", help="check the training jobs against this partition (default: the "
                                       "profile's slurm_partition, else the cluster's default)")
    s.add_argument("--workflow-dir", default=".", help="the repository (Snakefile, workflow/, config/, profiles/)")
    s.add_argument("--calibrate", metavar="RESULTS_DIR",
                   help="instead: the training throughput of finished cells (run.json), per model, as config")
    s.set_defaults(func=cmd_cluster_check)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from . import stop  # imports only `signal`: installed before torch, so SIGTERM is never lost

    # Only `train` stops gracefully on SIGTERM; every other command keeps the default (die).
    owns_stop = argv[:1] == ["train"] and not stop.handler_installed() and stop.install_stop_handler()
    try:
        return _main(argv)
    finally:
        if owns_stop:
            stop.uninstall_stop_handler()


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except FedsweepError as exc:
        # One line, whatever a library's message embedded in it holds.
        print(f"fedsweep: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
