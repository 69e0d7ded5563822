"""``feddistill bench-scale``: does a simulation cost what its clients per round cost?

For each total client count the same federation shape runs twice, each in its own subprocess:

1. ``feddistill simulate`` (Flower's simulation engine on Ray), while a thread samples the
   resident memory (RSS) of that process and all its descendants (Ray's gcs/raylet and worker
   processes included) every 0.2 s: the peak is ``peak_rss_bytes``. Seconds per round are read
   from ``results.json`` (``rounds[*].seconds``), round 1 (Ray start-up, first data load) left
   out.
2. The *plain loop*: the same clients' work (``train_round`` for the sampled clients, then
   ``evaluate_round`` for the evaluated ones, ``random.sample`` per round like Flower's
   strategies) called directly, with the same parallelism as the simulation: as many worker
   processes as Ray has actors (``cpus // cpus-per-client``), each with ``cpus-per-client``
   torch threads, like a Ray actor. ``overhead_ratio`` is simulation s/round over loop s/round;
   the simulation's figure also holds the server's work (aggregation, a 200-example centralized
   evaluation), which the loop does not do. ``--repeats N`` runs both N times, alternating, and
   keeps the best s/round of each: on a small shared machine other work moves these timings.

Every run has 10 clients per round (train and evaluate), a tiny model (``builtin:micro``, one
student layer, 16 tokens) and an iid split of the embedded corpus with 10 examples per client
(capped at 50,000 examples, so 5,000 clients still get 10 each): the work per round is the same
whatever the number of clients, and only what grows with it is measured. The corpus itself does
grow with the clients (generating 50,000 examples takes ~2 s per process that needs it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from feddistill import keys

CLIENTS_PER_ROUND = 10
EXAMPLES_PER_CLIENT = 10
MAX_EXAMPLES = 50_000
TARGET_GROWTH = 1.2  # 1,000-client figures within 1.2x of the 100-client ones
TARGET_OVERHEAD = 1.3  # simulation s/round within 1.3x of the plain loop


def scale_config(num_clients: int, rounds: int, out_dir: Path, seed: int = 0) -> dict[str, Any]:
    """The flat run config of one bench run (same work per round for any ``num_clients``)."""
    return {
        "rounds": rounds,
        "seed": seed,
        "output-dir": str(out_dir),
        "checkpoints": False,
        "data.num-clients": num_clients,
        "data.num-examples": min(EXAMPLES_PER_CLIENT * num_clients, MAX_EXAMPLES),
        "data.num-test": 200,
        "data.partitioning": "iid",
        "data.min-partition-size": 2,
        "data.max-length": 16,
        "model.teacher": "builtin:micro",
        "model.student-layers": 1,
        "teacher.epochs": 1,
        "train.local-epochs": 1,
        "train.rising-epochs": 0,  # the same work every round: seconds per round compare
        "server.clients-per-round": CLIENTS_PER_ROUND,
        "server.evaluate-clients": CLIENTS_PER_ROUND,
        "server.local-only": "off",
        "server.round-timeout": 1800.0,
    }


# ---------------------------------------------------------------------------------------------
# Measuring a subprocess
# ---------------------------------------------------------------------------------------------


class TreeMemory:
    """Peak summed RSS of a process and all its descendants, sampled by a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> int:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # exited between listing and reading
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)


def _run_measured(cmd: list[str], log_path: Path, timeout: float) -> tuple[int, int, float]:
    """Run ``cmd`` with output to ``log_path``; returns (returncode, peak tree RSS, seconds)."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        with TreeMemory(proc.pid) as mem:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                code = proc.wait()
    return code, mem.peak, time.perf_counter() - started


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue


def _write_toml(flat: dict[str, Any], path: Path) -> None:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in sorted(flat.items())))


def _mean_after_first(seconds: Sequence[float]) -> float | None:
    later = list(seconds[1:])
    return statistics.fmean(later) if later else None


# ---------------------------------------------------------------------------------------------
# The plain loop (runs in its own subprocess: python -m feddistill.bench.scale loop ...)
# ---------------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    """Each pool process, like a Ray actor with ``num_cpus = threads``, uses that many threads."""
    import torch

    torch.set_num_threads(threads)


def _client_task(kind: str, inp: Any, pid: int) -> None:
    from feddistill.client.work import evaluate_round, train_round

    node_config = {keys.PARTITION_ID: pid}
    if kind == "train":
        train_round(inp, node_config)
    else:
        evaluate_round(inp, node_config)


def plain_loop(flat: dict[str, Any], workers: int, threads: int) -> dict[str, Any]:
    """Every round: ``train_round`` for the sampled clients, then ``evaluate_round``."""
    from feddistill.client.work import RoundInput
    from feddistill.codec.chain import initial_downlink
    from feddistill.config import parse_config
    from feddistill.run_inputs import initial_models, source_splits
    from feddistill.server.run import resolve_paths
    from feddistill.simulation.engine import offline_environment

    offline_environment()
    _init_worker(threads)
    cfg = resolve_paths(parse_config(flat))
    t0 = time.perf_counter()
    _, _, labels = source_splits(cfg)
    corpus_seconds = time.perf_counter() - t0
    models = initial_models(cfg, labels)
    payload = initial_downlink(
        models.init_arrays, cfg.compression.downlink_spec, chained=cfg.compression.chained
    )
    n, k = cfg.data.num_clients, cfg.server.num_sampled
    per_train = k(cfg.server.clients_per_round, n)
    per_eval = k(cfg.server.evaluate_clients, n)
    rng = random.Random(cfg.seed)
    run_id = secrets.token_hex(8)  # like the server's: this loop's residuals are its own
    seconds: list[float] = []
    pool = None
    if workers > 1:
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, initializer=_init_worker, initargs=(threads,)
        )
    try:
        for server_round in range(1, cfg.rounds + 1):
            start = time.perf_counter()
            inp = RoundInput(cfg, labels, models.digest, payload, server_round, run_id=run_id)
            for kind, count in (("train", per_train), ("evaluate", per_eval)):
                pids = rng.sample(range(n), count)
                if pool is None:
                    for pid in pids:
                        _client_task(kind, inp, pid)
                else:
                    list(pool.map(_client_task, [kind] * count, [inp] * count, pids))
            seconds.append(time.perf_counter() - start)
    finally:
        if pool is not None:
            pool.shutdown()
    return {"seconds": seconds, "corpus_seconds": corpus_seconds}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def _simulate_once(
    flat: dict[str, Any], run_dir: Path, cpus_per_client: float, timeout: float
) -> dict[str, Any]:
    config_path = run_dir / "config.toml"
    _write_toml(flat, config_path)
    cmd = [
        *(sys.executable, "-m", "feddistill.cli", "simulate", "--config", str(config_path)),
        *("--cpus-per-client", str(cpus_per_client), "--progress", "off"),
    ]
    code, peak, wall = _run_measured(cmd, run_dir / "simulate.log", timeout)
    results_path = Path(flat["output-dir"]) / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    rounds = results.get("rounds", [])
    fitted = [r.get("train", {}).get(keys.TEACHER_FITTED) for r in rounds[1:]]
    fitted = [f for f in fitted if f is not None]
    return {
        "completed": code == 0 and len(rounds) == flat["rounds"],
        "returncode": code,
        "peak_rss_bytes": peak,
        "round_seconds": [r["seconds"] for r in rounds],
        "seconds_per_round": _mean_after_first([r["seconds"] for r in rounds]),
        "wall_seconds": wall,
        "teachers_fitted_fraction": statistics.fmean(fitted) if fitted else None,
        "final_cache_bytes": results.get("final", {}).get("cache_bytes"),
    }


def _loop_once(
    flat: dict[str, Any], run_dir: Path, workers: int, threads: int, timeout: float
) -> dict[str, Any]:
    config_path = run_dir / "loop.toml"
    _write_toml(flat, config_path)
    out = run_dir / "loop.json"
    cmd = [
        *(sys.executable, "-m", "feddistill.bench.scale", "loop", str(config_path)),
        *(str(workers), str(threads), str(out)),
    ]
    code, peak, _ = _run_measured(cmd, run_dir / "loop.log", timeout)
    loop = json.loads(out.read_text()) if code == 0 and out.exists() else {}
    return {
        "loop_round_seconds": loop.get("seconds"),
        "loop_seconds_per_round": _mean_after_first(loop.get("seconds", [])),
        "loop_peak_rss_bytes": peak,
        "corpus_seconds": loop.get("corpus_seconds"),
    }


def _best(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def run_scale_bench(
    clients: Sequence[int],
    rounds: int = 4,
    cpus_per_client: float = 1.0,
    work_dir: Path | None = None,
    timeout: float = 3600.0,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """One row per client count: peak RSS, s/round, loop s/round, overhead ratio, completion.

    With ``repeats`` > 1 the simulation and the loop run that many times each, alternating
    (sim, loop, loop, sim, ...), so load from other work on the machine hits both alike; the
    row keeps the fastest s/round of each kind (best of, as timing benchmarks do), the highest
    peak RSS, and every run's figures in ``runs``.
    """
    if rounds < 2:
        raise ValueError(f"--rounds must be >= 2 (round 1 is left out of s/round), got {rounds}")
    if cpus_per_client <= 0:
        raise ValueError(f"--cpus-per-client must be > 0, got {cpus_per_client}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    base = Path(work_dir or tempfile.mkdtemp(prefix="feddistill-bench-scale-"))
    from feddistill.distill.train import usable_cores

    workers = max(1, int(usable_cores() // cpus_per_client))
    threads = max(1, int(cpus_per_client))
    rows = []
    for n in clients:
        sims: list[dict[str, Any]] = []
        loops: list[dict[str, Any]] = []
        load = [os.getloadavg()[0]]
        for rep in range(repeats):
            run_dir = base / f"clients-{n}" / f"run-{rep}"
            run_dir.mkdir(parents=True, exist_ok=True)
            flat = scale_config(n, rounds, run_dir / "sim")
            loop_flat = {**flat, "output-dir": str(run_dir / "loop")}
            order = ("sim", "loop") if rep % 2 == 0 else ("loop", "sim")
            for kind in order:
                if kind == "sim":
                    sims.append(_simulate_once(flat, run_dir, cpus_per_client, timeout))
                else:
                    loops.append(_loop_once(loop_flat, run_dir, workers, threads, timeout))
                load.append(os.getloadavg()[0])
        sim_spr = _best([r["seconds_per_round"] for r in sims])
        loop_spr = _best([r["loop_seconds_per_round"] for r in loops])
        first = sims[0]
        rows.append(
            {
                "clients": n,
                "examples": scale_config(n, rounds, base)["data.num-examples"],
                "clients_per_round": CLIENTS_PER_ROUND,
                "rounds": rounds,
                "repeats": repeats,
                "completed": all(r["completed"] for r in sims),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in sims),
                "seconds_per_round": sim_spr,
                "loop_seconds_per_round": loop_spr,
                "overhead_ratio": sim_spr / loop_spr if sim_spr and loop_spr else None,
                "loop_peak_rss_bytes": max(r["loop_peak_rss_bytes"] for r in loops),
                "loop_workers": workers,
                "teachers_fitted_fraction": first["teachers_fitted_fraction"],
                "corpus_seconds": _best([r["corpus_seconds"] for r in loops]),
                # 1-minute load average of the machine around the runs: other work on a small
                # machine shows up in every timing here
                "load_average": load,
                "runs": {"simulate": sims, "loop": loops},
                "work_dir": str(base / f"clients-{n}"),
            }
        )
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def format_scale_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'clients':>8} {'examples':>9} {'peak RSS MB':>12} {'s/round':>8} {'loop s/round':>13} "
        f"{'overhead':>9} {'teachers fit':>13} {'completed':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['clients']:>8} {r['examples']:>9} {r['peak_rss_bytes'] / 2**20:>12.0f} "
            f"{_fmt(r['seconds_per_round'], '.2f'):>8} "
            f"{_fmt(r['loop_seconds_per_round'], '.2f'):>13} "
            f"{_fmt(r['overhead_ratio'], '.2f'):>8}x "
            f"{_fmt(r['teachers_fitted_fraction'], '.2f'):>13} "
            f"{'yes' if r['completed'] else 'NO':>10}"
        )
    by_n = {r["clients"]: r for r in rows}
    workers = rows[0]["loop_workers"] if rows else 0
    loads = [x for r in rows for x in r.get("load_average", [])]
    repeats = rows[0].get("repeats", 1) if rows else 1
    best = f", best of {repeats} alternating runs" if repeats > 1 else ""
    lines.append(
        f"(10 clients per round; loop = the same client work in {workers} worker processes, "
        f"the simulation's parallelism; s/round = mean after round 1{best}"
        + (f"; machine load average {min(loads):.1f}-{max(loads):.1f})" if loads else ")")
    )
    if 100 in by_n and 1000 in by_n:
        a, b = by_n[100], by_n[1000]
        rss = b["peak_rss_bytes"] / a["peak_rss_bytes"] if a["peak_rss_bytes"] else None
        spr = (
            b["seconds_per_round"] / a["seconds_per_round"]
            if a["seconds_per_round"] and b["seconds_per_round"]
            else None
        )
        ok = rss is not None and spr is not None and max(rss, spr) <= TARGET_GROWTH
        lines.append(
            f"1000 vs 100 clients: peak RSS x{_fmt(rss, '.2f')}, s/round x{_fmt(spr, '.2f')} "
            f"(target <= {TARGET_GROWTH}x): {'met' if ok else 'NOT met'}"
        )
    if 5000 in by_n:
        lines.append(f"5000 clients completed: {'yes' if by_n[5000]['completed'] else 'no'}")
    ratios = [r["overhead_ratio"] for r in rows if r["overhead_ratio"] is not None]
    if ratios:
        worst = max(ratios)
        verdict = "met" if worst <= TARGET_OVERHEAD else "NOT met"
        lines.append(
            f"overhead after round 1: worst x{worst:.2f} (target <= {TARGET_OVERHEAD}x): {verdict}"
        )
    return "\n".join(lines)


def parse_clients(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--clients expects comma-separated integers, got {text!r}") from None
    if not values or min(values) < CLIENTS_PER_ROUND:
        raise ValueError(f"--clients needs counts >= {CLIENTS_PER_ROUND}, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clients", default="100,1000,5000", help="total client counts (default 100,1000,5000)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (default 4)")
    parser.add_argument(
        "--cpus-per-client", type=float, default=1.0, help="as for simulate (default 1)"
    )
    parser.add_argument("--work-dir", help="keep runs here (default: a new temporary folder)")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds allowed per subprocess"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each kind per client count, alternating; best s/round kept (default 1)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON list")


def run_command(args: argparse.Namespace) -> int:
    rows = run_scale_bench(
        parse_clients(args.clients),
        rounds=args.rounds,
        cpus_per_client=args.cpus_per_client,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        timeout=args.timeout,
        repeats=args.repeats,
    )
    print(json.dumps(rows) if args.json else format_scale_table(rows))
    return 0


def _loop_main(argv: Sequence[str]) -> int:
    from feddistill.cli import load_config_file

    config, workers, threads, out = argv
    flat = load_config_file(config)
    result = plain_loop(flat, int(workers), int(threads))
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "loop":
        sys.exit(_loop_main(sys.argv[2:]))
    sys.exit("usage: python -m feddistill.bench.scale loop CONFIG WORKERS THREADS OUT")
