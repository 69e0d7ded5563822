"""What the trust work costs an honest run: ``python -m feddistill.bench.trustcost OUT [ARGS]``.

Runs ``feddistill simulate --out OUT ARGS`` (``server.local-only`` off) in this process with a
timer around every server call that exists only for admission control or for state scoped to its
run (:data:`TRUST_CALLS`), and prints their time per round against the rounds' wall time, next to
the wrapper's four hooks for scale. The server runs in this process, so the timers see all of its
calls; the clients run in Ray's workers and are not timed (their share, one chain digest and one
check of their own reply a round, is timed alone in docs/robustness.md).

Why a direct timing and not two whole runs: the trust work is milliseconds of a round of seconds,
and two runs of the same code differ by more than that (100.3 s and 107.9 s for rounds 2-30 of
the embedded default on 2026-12-02).
"""

from __future__ import annotations

import collections
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feddistill.codec import chain
from feddistill.strategies import compressed

# (owner, attribute): calls made only for admission control (docs/robustness.md, rules 1-8) or
# for the run-scoped chain (the digest the server computes of each version it sends).
TRUST_CALLS: tuple[tuple[Any, str], ...] = (
    (compressed.CompressedStrategy, "_admit"),  # rules 1-3: records, metrics, num-examples
    (compressed.CompressedStrategy, "_cap_examples"),  # rule 3 in deployment
    (compressed, "update_norm"),  # rule 6
    (compressed, "norm_bound"),
    (compressed.CompressedStrategy, "_aligned"),  # rule 6b
    (compressed, "all_finite"),  # rules 7 and 8
    (compressed.CompressedStrategy, "_inner_state"),  # rule 8: the copy put back on a failure
    (chain, "model_digest"),  # the chain's digest of each version
)
HOOKS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")


def instrument(
    calls: tuple[tuple[Any, str], ...], totals: dict[str, float], counts: collections.Counter
) -> Callable[[], None]:
    """Wrap each ``owner.attribute`` with a timer adding into ``totals``/``counts`` (keyed by
    the attribute's name); returns the function that puts the originals back."""
    originals = [(owner, name, getattr(owner, name)) for owner, name in calls]

    def timed(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start
                counts[name] += 1

        return call

    for owner, name, f in originals:
        setattr(owner, name, timed(name, f))

    def restore() -> None:
        for owner, name, f in originals:
            setattr(owner, name, f)

    return restore


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    from feddistill.cli import main as cli_main

    out, rest = Path(argv[0]), argv[1:]
    totals: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    hooks = tuple((compressed.CompressedStrategy, h) for h in HOOKS)
    restore = instrument(TRUST_CALLS + hooks, totals, counts)
    try:
        rc = cli_main(["simulate", "--set", "server.local-only=off", "--out", str(out), *rest])
    finally:
        restore()
    if rc:
        return rc
    seconds = [r["seconds"] for r in json.loads((out / "results.json").read_text())["rounds"]]
    n = len(seconds)
    later = sorted(seconds[1:] or seconds)
    trust = sum(totals[name] for _, name in TRUST_CALLS)
    median = later[len(later) // 2]
    print(f"\n{n} rounds; rounds 2-{n}: {sum(seconds[1:]):.1f} s, median {median:.2f} s")
    print("| server call | calls | ms per round |")
    print("|---|---:|---:|")
    for name in sorted(totals, key=totals.__getitem__, reverse=True):
        kind = "hook " if name in HOOKS else ""
        print(f"| {kind}{name} | {counts[name]} | {1000 * totals[name] / n:.2f} |")
    print(
        f"trust work in the server: {1000 * trust / n:.2f} ms per round, "
        f"{100 * trust / sum(seconds):.3f}% of the rounds' wall time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
