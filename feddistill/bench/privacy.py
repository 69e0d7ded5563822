"""``feddistill bench-privacy``: final accuracy against epsilon, with and without compression.

For each uplink (the default compressed one and ``none``) the same federation runs once
without privacy and once per target epsilon (``privacy.target-epsilon``: the server derives
the noise multiplier for the planned rounds), all with uniform weighting so the non-private
point differs from the private ones only by clipping and noise. Each run goes through
Flower's simulation engine in this process (:func:`feddistill.simulation.engine.simulate`).
Writes ``privacy-bench.json`` and ``privacy-bench.md`` into ``--out``.

Default shape (issue 17): the embedded corpus over 1,000 iid clients (10 examples each), 50
per round, the tiny ``builtin:micro`` model, delta 1e-5. ``--quick``: 10 clients, 5 per round,
2 rounds, one epsilon: a smoke run of the command, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from feddistill.config import parse_config
from feddistill.simulation.scale import scale_config

COMPRESSED = "topk:0.01+q4+ef"
UPLINKS = (COMPRESSED, "none")


def base_config(
    clients: int, per_round: int, rounds: int, out: Path, cache: Path | None = None
) -> dict[str, Any]:
    """The flat run config every point shares: ``bench-scale``'s runs (same work per round
    for any number of clients), with ``per_round`` clients, uniform weighting (privacy refuses
    examples-weighting) and a larger test set for the accuracy curve.

    ``cache``: one cache folder for every point, so each client's teacher is fine-tuned once
    for the whole bench (the points differ in privacy and uplink only, neither of which is in
    the teacher's cache key); residuals are keyed by run, so points never share those."""
    flat = {
        **scale_config(clients, rounds, out),
        "data.num-test": 500,
        "server.clients-per-round": float(per_round),
        "server.evaluate-clients": float(min(per_round, 10)),
        "server.weighting": "uniform",
    }
    if cache is not None:
        flat["cache-dir"] = str(cache)
    return flat


def points(epsilons: list[float], clip: float, delta: float) -> list[tuple[str, dict[str, Any]]]:
    """(name, overrides) of every run: each uplink, non-private then each epsilon."""
    out = []
    for uplink in UPLINKS:
        tag = "compressed" if uplink == COMPRESSED else "dense"
        out.append((f"{tag}-nonprivate", {"compression.uplink": uplink}))
        for eps in epsilons:
            out.append(
                (
                    f"{tag}-eps{eps:g}",
                    {
                        "compression.uplink": uplink,
                        "privacy.mode": "central",
                        "privacy.clip": clip,
                        "privacy.target-epsilon": eps,
                        "privacy.delta": delta,
                    },
                )
            )
    return out


def run_privacy_bench(
    out: Path,
    *,
    clients: int,
    per_round: int,
    rounds: int,
    epsilons: list[float],
    clip: float,
    delta: float,
) -> list[dict[str, Any]]:
    from feddistill.simulation.engine import simulate

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in points(epsilons, clip, delta):
        flat = {**base_config(clients, per_round, rounds, out / name, out / "cache"), **overrides}
        cfg = parse_config(flat)
        t0 = time.time()
        results = simulate(cfg)
        last = results["rounds"][-1] if results["rounds"] else {}
        privacy = last.get("privacy") or {}
        rows.append(
            {
                "name": name,
                "uplink": cfg.compression.uplink,
                "target_epsilon": cfg.privacy.target_epsilon or None,
                "epsilon": privacy.get("epsilon"),
                "delta": privacy.get("delta"),
                "noise_multiplier": privacy.get("noise_multiplier"),
                "accuracy": results["final"]["accuracy"],
                "seconds": time.time() - t0,
                "seconds_per_round": [r["seconds"] for r in results["rounds"]],
                "privacy_seconds_per_round": [
                    (r["privacy"]["seconds_mechanism"] or 0.0) + r["privacy"]["seconds_accounting"]
                    for r in results["rounds"]
                    if "privacy" in r
                ],
            }
        )
        (out / "privacy-bench.json").write_text(json.dumps(rows, indent=2))
    (out / "privacy-bench.md").write_text(format_table(rows))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | uplink | epsilon | noise multiplier | final accuracy | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "inf" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3g}"
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        lines.append(
            f"| {r['name']} | {r['uplink']} | {eps} | {sigma} | {acc} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke run (10 clients, 2 rounds)")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--per-round", type=int, default=50)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--epsilons", default="1,2,4,8", help="comma-separated target epsilons")
    p.add_argument("--clip", type=float, default=0.5, help="privacy.clip")
    p.add_argument("--delta", type=float, default=1e-5, help="privacy.delta")


def run_command(args: argparse.Namespace) -> int:
    clients, per_round, rounds = args.clients, args.per_round, args.rounds
    epsilons = [float(x) for x in args.epsilons.split(",") if x.strip()]
    delta = args.delta
    if args.quick:
        clients, per_round, rounds, epsilons, delta = 10, 5, 2, epsilons[-1:], 0.0
    rows = run_privacy_bench(
        Path(args.out),
        clients=clients,
        per_round=per_round,
        rounds=rounds,
        epsilons=epsilons,
        clip=args.clip,
        delta=delta,
    )
    print(format_table(rows))
    return 0
