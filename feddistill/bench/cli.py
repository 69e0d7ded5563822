"""``feddistill bench``: options, presets, and the printed table."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from feddistill.bench.spec import (
    ALL_SCENARIOS,
    BERT_FFN,
    QUICK,
    VARIANTS,
    BenchSetting,
    find_agnews,
)

DESCRIPTION = """\
Benchmark scenarios on one dataset and one partitioning: centralized teacher and student
(upper references), local-only students (the floor), plain FedAvg of the student in float32,
feddistill with its default compression, and FedAvg of the whole teacher in float32 (bytes
measured on real Flower messages, not run); the compression variants (ablations of
feddistill's defaults) only with --scenarios. Federated scenarios run through Flower's
simulation engine; all read the same sampled CSVs written into --out and share one cache of
fine-tuned client teachers. Writes bench.json, bench.md and bench.png into --out.

--preset agnews: train/test from ../shared/data/agnews (relative to the repository root or
the working directory), 3,000 train rows, 2,000 test rows for the per-round curve, final
accuracy on all 7,600 test rows, teacher offline:all-minilm-l6-v2, derived 2-layer student
with frozen embeddings, max-length 64, 10 clients Dirichlet 0.5, 5 per round. Every scenario's
derived student keeps its feed-forward blocks frozen (the project default,
model.freeze-feed-forward; --set model.freeze-feed-forward=false to train them), so only
attention, norms, pooler and head are trained and sent; the preset also names them in
--compressed-freeze, which keeps them frozen in the compressed scenarios when that default is
turned off.

--quick (smoke run, about 5-10 minutes on 2 CPU cores): the agnews files when found (else
the embedded corpus), 600 train rows, 400 eval rows, final accuracy on 1,000 test rows,
3 rounds, 2 epochs for local-only and the centralized student, teachers capped at 3
epochs. Options given explicitly override the preset."""

DEFAULTS = {f.name: f.default for f in dataclasses.fields(BenchSetting) if f.name != "out"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    d = DEFAULTS
    p.add_argument("--out", required=True, help="output folder (bench.json, bench.md, bench.png)")
    p.add_argument("--preset", choices=["agnews"], help="the standard AG News setting (above)")
    p.add_argument("--quick", action="store_true", help="smoke-run variant (above), <= 10 min")
    p.add_argument("--train", help="training file (csv/json/jsonl); default: embedded corpus")
    p.add_argument("--test", help="test file; a sample gives the curve, all of it the accuracy")
    p.add_argument("--text-column", help=f"text column (default {d['text_column']})")
    p.add_argument("--label-column", help=f"label column (default {d['label_column']})")
    p.add_argument("--teacher", help=f"hub id, folder, builtin:<name> (default {d['teacher']})")
    p.add_argument("--student-layers", type=int, help="layers of the derived student (2)")
    p.add_argument(
        "--freeze-embeddings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="freeze the student's embeddings so they are not exchanged (default on)",
    )
    p.add_argument(
        "--compressed-freeze",
        metavar="REGEX",
        help="student parameters (names matching REGEX) frozen in the compressed scenarios, "
        "so neither trained nor sent; --preset agnews: the feed-forward blocks "
        f"({BERT_FFN}); '' freezes nothing more",
    )
    p.add_argument("--max-length", type=int, help=f"tokens per text (default {d['max_length']})")
    p.add_argument("--num-clients", type=int, help=f"clients (default {d['num_clients']})")
    p.add_argument("--clients-per-round", type=float, help="clients per round (default 5)")
    p.add_argument("--partitioning", help="iid, dirichlet or shards (default dirichlet)")
    p.add_argument("--alpha", type=float, help="Dirichlet concentration (default 0.5)")
    p.add_argument("--train-rows", type=int, help="training rows sampled (default 3000)")
    p.add_argument("--eval-rows", type=int, help="test rows for the per-round curve (2000)")
    p.add_argument("--test-rows", type=int, help="test rows for the final accuracy (0 = all)")
    p.add_argument("--seed", type=int, help="seed of sampling, partitions and training (0)")
    p.add_argument(
        "--scenarios",
        help="comma-separated subset of: "
        + ",".join(ALL_SCENARIOS)
        + f" (default: all but the compression variants {','.join(VARIANTS)})",
    )
    p.add_argument(
        "--rounds", type=int, help=f"rounds of the dense scenario (default {d['rounds']})"
    )
    p.add_argument(
        "--compressed-rounds",
        type=int,
        help=f"rounds of the feddistill scenario (default {d['compressed_rounds']})",
    )
    p.add_argument(
        "--variant-rounds",
        type=int,
        help=f"rounds of the compression variants (default {d['variant_rounds']})",
    )
    p.add_argument(
        "--teacher-epochs",
        type=int,
        help="most teacher fine-tuning epochs (10; early stopping on a holdout decides)",
    )
    p.add_argument("--teacher-lr", type=float, help="teacher fine-tuning lr (1e-4)")
    p.add_argument("--lr", dest="train_lr", type=float, help="student lr (1e-3, train.lr)")
    p.add_argument(
        "--local-epochs",
        type=int,
        help=f"student epochs per round (train.local-epochs, {DEFAULTS['local_epochs']})",
    )
    p.add_argument("--central-epochs", type=int, help="centralized student epochs (3)")
    p.add_argument("--local-only-epochs", type=int, help="local-only student epochs (3)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any run-config key for every federated scenario (repeatable)",
    )


def setting_from_args(args: argparse.Namespace, repo_root: Path, cwd: Path) -> BenchSetting:
    """Defaults, then the preset, then --quick, then explicit options (last wins)."""
    from feddistill.cli import parse_set

    values: dict[str, Any] = {}
    preset = args.preset or ""
    if args.preset == "agnews" or (args.quick and not args.train):
        try:
            folder = find_agnews(repo_root, cwd)
        except FileNotFoundError:
            if args.preset:
                raise
            folder = None  # --quick without the agnews files: the embedded corpus
        if folder is not None:
            values.update(
                train=str(folder / "train.csv"),
                test=str(folder / "test.csv"),
                test_rows=0,
                compressed_freeze=BERT_FFN,
            )
            preset = preset or "agnews"
    if args.quick:
        values.update(QUICK)
        preset = f"{preset}-quick" if preset else "quick"
    changed: list[str] = []  # explicit options that depart from the preset
    for f in dataclasses.fields(BenchSetting):
        if f.name in ("out", "extra", "preset", "scenarios"):
            continue
        value = getattr(args, f.name, None)
        if value is not None:
            if value != values.get(f.name, DEFAULTS[f.name]):
                changed.append(f"{f.name}={value}")
            values[f.name] = value
    if args.scenarios:
        values["scenarios"] = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
        changed.append(f"scenarios={args.scenarios}")
    if preset and (changed or args.set):
        # Results of a modified preset must not pass for the preset's own numbers.
        preset += " (modified: " + ", ".join(changed + list(args.set)) + ")"
    return BenchSetting(
        out=Path(args.out).expanduser().resolve(),
        extra=parse_set(args.set),
        preset=preset,
        **values,
    )


def run_command(args: argparse.Namespace) -> int:
    from feddistill.bench.report import format_table
    from feddistill.bench.run import run_bench

    repo_root = Path(__file__).resolve().parents[2]
    try:
        setting = setting_from_args(args, repo_root, Path.cwd())
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"feddistill bench: {err}") from None
    _quiet_libraries()
    bench = run_bench(setting, echo=lambda line: print(line, flush=True))
    print()
    print(format_table(bench))
    print(f"\nbench.json, bench.md, bench.png in {setting.out} ({bench['seconds_total']:.0f} s)")
    return 0


def _quiet_libraries() -> None:
    """No per-file progress bars or weight-loading reports between the bench's own lines."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
