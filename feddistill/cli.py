"""The ``feddistill`` command line.

Subcommands map onto the library; each option of ``simulate`` is a key of the run config (the
same keys ``flwr run . --run-config`` takes), and ``--set KEY=VALUE`` reaches any other key.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from feddistill import __version__
from feddistill.aggregation import STRATEGIES
from feddistill.config import Config, ConfigError, known_keys, parse_config, reference_markdown

# (flag, run-config key, type, help)
SIMULATE_OPTIONS: list[tuple[str, str, type, str]] = [
    ("--num-clients", "data.num-clients", int, "total number of simulated clients"),
    (
        "--clients-per-round",
        "server.clients-per-round",
        float,
        "clients trained per round: a count (5) or a fraction of all clients (0.1)",
    ),
    ("--rounds", "rounds", int, "number of federated rounds"),
    ("--partitioning", "data.partitioning", str, "iid, dirichlet (label skew) or shards"),
    ("--alpha", "data.alpha", float, "Dirichlet concentration (smaller = more skewed)"),
    ("--shards-per-client", "data.shards-per-client", int, "classes per client for 'shards'"),
    (
        "--dataset",
        "data.source",
        str,
        "'embedded' (offline synthetic corpus), a csv/json/jsonl/parquet file, a save_to_disk "
        "folder, or a Hugging Face hub dataset name",
    ),
    ("--test-dataset", "data.test-source", str, "centralized test set evaluated every round"),
    ("--text-column", "data.text-column", str, "text column of the dataset"),
    ("--label-column", "data.label-column", str, "label column of the dataset"),
    (
        "--teacher",
        "model.teacher",
        str,
        "teacher: hub id, local folder, builtin:tiny|micro|small, or offline:all-minilm-l6-v2",
    ),
    ("--student", "model.student", str, "'derived' (from the teacher) or a model id/folder"),
    ("--student-layers", "model.student-layers", int, "layers of a derived student"),
    (
        "--strategy",
        "server.strategy",
        str,
        ", ".join(STRATEGIES)
        + " (robust ones: server.trim-beta, server.num-malicious, server.multikrum-select;"
        " docs/aggregation.md)",
    ),
    ("--uplink", "compression.uplink", str, "uplink codec, e.g. 'topk:0.01+q4+ef' or 'none'"),
    (
        "--downlink",
        "compression.downlink",
        str,
        "downlink codec of each broadcast delta (default 'topk:0.05+q4'; e.g. 'q8', 'none')",
    ),
    (
        "--downlink-protocol",
        "compression.downlink-protocol",
        str,
        "'chain' (default): each node gets the deltas it missed, with server-side error "
        "feedback; 'stateless': every node gets 'global - initial'",
    ),
    ("--out", "output-dir", str, "output folder (results.json, student/, checkpoints/)"),
    ("--seed", "seed", int, "random seed (data, partitions, initialization, sampling)"),
    (
        "--tracking",
        "tracking.backend",
        str,
        "log every round's figures to 'tensorboard' (OUT/tensorboard) or 'mlflow' (a local "
        "store in OUT/mlflow unless tracking.uri is set); 'none' by default. Needs "
        "pip install 'feddistill[tracking]' (docs/tracking.md)",
    ),
]


def parse_value(text: str) -> Any:
    """TOML scalar like ``flwr run --run-config`` (``5``, ``0.1``, ``true``, ``"x"``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def _coerce_count(value: float) -> float | int:
    return int(value) if value >= 1 and value == int(value) else value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Run-config keys from a TOML file; ``data.alpha = 0.3`` and ``"data.alpha" = 0.3`` alike
    (unquoted dotted keys are nested tables to TOML, so they are flattened back)."""

    def flatten(table: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in table.items():
            if isinstance(value, dict):
                out.update(flatten(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    return flatten(tomllib.loads(Path(path).read_text()), "")


def simulate_config(args: argparse.Namespace) -> Config:
    flat: dict[str, Any] = {}
    if args.config:
        flat.update(load_config_file(args.config))
    for flag, key, _, _ in SIMULATE_OPTIONS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            flat[key] = _coerce_count(value) if key.endswith("clients-per-round") else value
    flat.update(parse_set(args.set or []))
    return parse_config(flat)


def cmd_simulate(args: argparse.Namespace) -> int:
    from feddistill.server.tracking import require_backend

    cfg = simulate_config(args)  # a bad config fails before Ray and torch are imported
    require_backend(cfg.tracking)  # a missing package is named before seconds of imports

    from feddistill.server.app import setup_logging
    from feddistill.simulation.engine import simulate

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    log = logging.getLogger("feddistill")
    log.info(
        "feddistill %s: %d clients, %s per round, %d rounds, %s, teacher %s -> %s",
        __version__,
        cfg.data.num_clients,
        _coerce_count(cfg.server.clients_per_round),
        cfg.rounds,
        cfg.data.partitioning,
        cfg.model.teacher,
        cfg.model.student,
    )
    started = time.time()
    results = simulate(
        cfg,
        cpus_per_client=args.cpus_per_client,
        gpus_per_client=args.gpus_per_client,
        verbose=args.verbose,
        progress=args.progress,
        ray_address=args.ray_address,
    )
    _write_report(results, cfg.output_dir, log)
    if not results.get("final") or not results.get("rounds"):
        log.error("the run did not complete; see %s", cfg.output_dir)
        return 1
    if results["final"].get("stopped"):
        log.error("the run stopped early: %s", results["final"]["stopped"]["reason"])
        return 1
    log.info("wall time %.0f s", time.time() - started)
    return 0


def _write_report(results: dict[str, Any], out_dir: str, log: logging.Logger) -> None:
    """The run's picture; a drawing failure is reported, never turned into a failed run."""
    from feddistill.report import write_report

    try:
        png, md = write_report(results, Path(out_dir).expanduser().resolve())
    except Exception as err:  # the run's results are safe in results.json whatever this does
        log.warning(
            "could not draw the report (%s: %s); retry: feddistill report %s",
            type(err).__name__,
            err,
            out_dir,
        )
        return
    log.info("report: %s, %s", md, png)


def cmd_report(args: argparse.Namespace) -> int:
    from feddistill.report import load_results, write_report

    results, folder = load_results(args.out)
    png, md = write_report(results, folder)
    print(f"{md}\n{png}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    defaults = Config().to_flat()
    if args.markdown:
        print(reference_markdown(), end="")
    elif args.toml:
        for key in known_keys():
            print(f"{key} = {json.dumps(defaults[key])}")
    else:
        width = max(len(k) for k in defaults)
        for key in known_keys():
            print(f"{key:<{width}}  {json.dumps(defaults[key])}")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``command`` (the subcommand about to run), only that optional
    command's module is imported (:data:`OPTIONAL_COMMANDS`)."""
    parser = argparse.ArgumentParser(
        prog="feddistill",
        description="Federated knowledge distillation on Flower: every client fine-tunes a local "
        "teacher and distills it into a compact student whose (compressed) update is "
        "aggregated by the server.",
    )
    parser.add_argument("--version", action="version", version=f"feddistill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser(
        "simulate",
        help="run a federation with Flower's simulation engine (Ray), on one host or a Ray cluster",
        description="Run a whole federated distillation on this machine (or, with "
        "--ray-address, on a running Ray cluster). With no options it "
        "runs the embedded default (offline synthetic corpus, 10 non-IID clients) and writes "
        "OUT/results.json, OUT/student/, OUT/checkpoints/ and the run's picture, "
        "OUT/report.png and OUT/report.md (redraw with `feddistill report OUT`).",
    )
    for flag, key, typ, help_text in SIMULATE_OPTIONS:
        sim.add_argument(flag, type=typ, default=None, help=f"{help_text} [{key}]")
    sim.add_argument(
        "--cpus-per-client",
        type=float,
        default=1.0,
        help="CPU cores reserved per client; clients run concurrently while cores last (default 1)",
    )
    sim.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        help="GPU fraction per client, e.g. 0.25 = four clients share a GPU (default 0: CPU); "
        "without a CUDA device the clients run on CPU",
    )
    sim.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        default=None,
        help="run the clients on this running Ray cluster (its head's address) instead of a "
        "Ray instance of this process; run this command on a node of the cluster and give "
        "cache-dir a folder every node sees (docs/ray-cluster.md)",
    )
    sim.add_argument(
        "--progress",
        choices=("auto", "tty", "lines", "off"),
        default="auto",
        help="round progress on stderr: one updating line on a terminal (tty), one line per "
        "round otherwise (lines); default auto",
    )
    sim.add_argument("--config", metavar="TOML", help="file of run-config keys (flat, dotted)")
    sim.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any run-config key, repeatable (see `feddistill config`)",
    )
    sim.add_argument("-v", "--verbose", action="store_true", help="show Flower and Ray logs")
    sim.set_defaults(func=cmd_simulate)

    rep = sub.add_parser(
        "report",
        help="draw OUT/report.png and OUT/report.md from OUT/results.json",
        description="Redraw a run's report from its results.json alone: report.png (accuracy "
        "per round with the output model marked, accuracy against cumulative bytes per client, "
        "bytes per round up and down, per-class accuracy of the output model) and report.md "
        "(the key figures and per-class accuracy, embedding the picture). Works on a finished "
        "run, on one still in progress (it draws the rounds done so far) and on a resumed one. "
        "`feddistill simulate` writes both at the end of every run.",
    )
    rep.add_argument(
        "out", metavar="OUT", help="a run's output folder (simulate --out), or its results.json"
    )
    rep.set_defaults(func=cmd_report)

    cfg = sub.add_parser("config", help="list every run-config key with its default")
    cfg_format = cfg.add_mutually_exclusive_group()
    cfg_format.add_argument("--toml", action="store_true", help="print as TOML lines")
    cfg_format.add_argument(
        "--markdown",
        action="store_true",
        help="print the reference (type, default, allowed values, description) as Markdown: "
        "docs/configuration.md",
    )
    cfg.set_defaults(func=cmd_config)

    _add_optional_commands(sub, command)
    return parser


# The commands whose modules import the heavy parts (onnx, the benches' data readers, models and
# plots: ~5 s on 2 cores): name -> (module, its add-arguments function, its command function,
# help). Each module is imported only when its command runs, so `feddistill --help` and
# `feddistill simulate` do not pay for the others.
OPTIONAL_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "export": (
        "feddistill.export",
        "add_export_arguments",
        "run_export",
        "export a student for CPU inference (int8 dynamic)",
    ),
    "predict": (
        "feddistill.export",
        "add_predict_arguments",
        "run_predict",
        "classify text with an exported or saved student",
    ),
    "bench-serve": (
        "feddistill.bench.serving",
        "add_arguments",
        "run_command",
        "serving benchmark: size and CPU latency of float32 / int8 PyTorch and ONNX",
    ),
    "bench-scale": (
        "feddistill.bench.scale",
        "add_arguments",
        "run_command",
        "simulation scale benchmark: memory and s/round against total clients",
    ),
    "bench-privacy": (
        "feddistill.bench.privacy",
        "add_arguments",
        "run_command",
        "privacy benchmark: final accuracy vs epsilon, compressed and dense",
    ),
    "bench": (
        "feddistill.bench.cli",
        "add_arguments",
        "run_command",
        "benchmark: accuracy vs bytes, centralized / local-only / federated",
    ),
    "bench-robust": (
        "feddistill.bench.robust",
        "add_arguments",
        "run_command",
        "robustness benchmark: aggregator x attack x hostile fraction",
    ),
}
_DESCRIPTIONS = {
    "bench-scale": "For each total client count, run `feddistill simulate` (10 clients per "
    "round, tiny model) in a subprocess and measure the peak RSS of its whole process tree "
    "(Ray included) and seconds per round after the first, then the same clients' work in "
    "a plain loop for the overhead ratio.",
}


def _add_optional_commands(sub: argparse._SubParsersAction, command: str | None) -> None:
    """Every optional command is listed; only ``command``'s (all of them for None) gets its
    arguments, which imports its module."""
    for name, (module, add, run, help_text) in OPTIONAL_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=_DESCRIPTIONS.get(name))
        if command is None or command == name:
            loaded = importlib.import_module(module)
            getattr(loaded, add)(p)
            p.set_defaults(func=getattr(loaded, run))

    bc = sub.add_parser("bench-codec", help="codec benchmark: size and speed on a big update")
    bc.add_argument("--numel", type=int, default=10_000_000, help="elements (default 10M)")
    bc.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    bc.add_argument(
        "--block",
        type=int,
        default=1,
        help="select runs of N elements (codec token block:N); the targets are for 1 (default)",
    )
    bc.add_argument("--json", action="store_true", help="print one JSON list")
    bc.set_defaults(func=cmd_bench_codec)


def cmd_bench_codec(args: argparse.Namespace) -> int:
    from feddistill.bench.codec import format_codec_table, run_codec_bench

    rows = run_codec_bench(numel=args.numel, repeats=args.repeats, block=args.block)
    print(json.dumps(rows) if args.json else format_codec_table(rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The subcommand is the first word that is not an option (the top level has no option
    # that takes a value); "" when there is none, so no optional module is imported.
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as err:
        print(f"feddistill: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # DataError, ModelError, PayloadError are ValueErrors
        print(f"feddistill: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
