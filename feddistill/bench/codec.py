"""Codec micro-benchmark: size and speed of top-k + quantization on one large tensor.

Speed is reported relative to `arr.copy()` of the same tensor in the same run, so the numbers
compare across machines. The targets (checked in `format_codec_table`) are for keep = 1 % at
4 bits: encode + decode within 25x a copy, and a payload at least 250x smaller than dense
float32, all metadata included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from feddistill.codec.spec import CompressionSpec
from feddistill.codec.wire import decode, encode, schema_of

TARGET_KEEP = 0.01
TARGET_BITS = 4
TARGET_TIME_RATIO = 25.0
TARGET_SIZE_RATIO = 250.0


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def realistic_update(numel: int, seed: int = 0) -> np.ndarray:
    """A heavy-tailed float32 update: Student-t (3 dof) x 1e-3, like fine-tuning deltas."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3.0, size=numel) * 1e-3).astype(np.float32)


def run_codec_bench(
    numel: int = 10_000_000,
    keeps: Sequence[float] = (0.1, 0.01, 0.001),
    bits: Sequence[int] = (8, 4, 2, 1),
    repeats: int = 3,
    seed: int = 0,
    block: int = 1,
) -> list[dict[str, float]]:
    """Encode/decode one `numel`-element tensor per (keep, bits) setting with per-tensor top-k.

    `block` > 1 selects runs of that many elements (`CompressionSpec.block`).

    Returns one dict per setting with keep, bits, block, kept, payload_bytes, ratio (dense float32
    bytes / payload bytes), encode_s, decode_s (best of `repeats` each), copy_s (fastest
    `arr.copy()` of the tensor seen in the run, re-timed next to every setting), time_ratio
    ((encode_s + decode_s) / copy_s) and max_abs_error (largest |decoded - x| over kept
    positions: the quantization error alone, pruning excluded).
    """
    x = realistic_update(numel, seed)
    update = {"weight": x}
    schema = schema_of(update)
    rows: list[dict[str, float]] = []
    copy_s = float("inf")
    for keep in keeps:
        for b in bits:
            spec = CompressionSpec(select="topk", keep=keep, bits=b, block=block)
            # Re-time the reference copy next to every setting; the rows then all use the
            # fastest copy seen, which is the conservative baseline on a busy machine.
            copy_s = min(copy_s, _best_time(x.copy, repeats))
            encoded = encode(update, spec, seed=seed)
            encode_s = _best_time(lambda spec=spec: encode(update, spec, seed=seed), repeats)
            decoded = decode(encoded.payload, schema)
            decode_s = _best_time(lambda enc=encoded: decode(enc.payload, schema), repeats)
            positions = encoded.positions["weight"]
            got = decoded["weight"].reshape(-1)
            err = np.abs(got - x) if positions is None else np.abs(got[positions] - x[positions])
            rows.append(
                {
                    "keep": float(keep),
                    "bits": int(b),
                    "block": int(block),
                    "kept": encoded.stats.kept_total,
                    "payload_bytes": encoded.stats.payload_bytes,
                    "ratio": encoded.stats.ratio,
                    "encode_s": encode_s,
                    "decode_s": decode_s,
                    "max_abs_error": float(err.max()) if err.size else 0.0,
                }
            )
    for row in rows:
        row["copy_s"] = copy_s
        row["time_ratio"] = (row["encode_s"] + row["decode_s"]) / copy_s
    return rows


def format_codec_table(rows: Sequence[dict[str, float]]) -> str:
    """Fixed-width table of `run_codec_bench` rows plus a verdict line per target."""
    header = (
        f"{'keep':>7} {'bits':>4} {'kept':>9} {'payload_B':>11} {'ratio':>9} "
        f"{'enc_ms':>8} {'dec_ms':>8} {'copy_ms':>8} {'t/copy':>7} {'max_abs_err':>11}"
    )
    lines = [header, "-" * len(header)]
    blocks = sorted({int(r.get("block", 1)) for r in rows})
    if blocks != [1]:
        lines.insert(0, f"selection: top-k of runs of {', '.join(map(str, blocks))} elements")
    for r in rows:
        lines.append(
            f"{r['keep']:>7g} {int(r['bits']):>4d} {int(r['kept']):>9d} "
            f"{int(r['payload_bytes']):>11d} {r['ratio']:>8.1f}x "
            f"{r['encode_s'] * 1e3:>8.2f} {r['decode_s'] * 1e3:>8.2f} {r['copy_s'] * 1e3:>8.2f} "
            f"{r['time_ratio']:>6.1f}x {r['max_abs_error']:>11.3g}"
        )
    target = [
        r
        for r in rows
        if r["keep"] == TARGET_KEEP and r["bits"] == TARGET_BITS and r.get("block", 1) == 1
    ]
    label = f"keep={TARGET_KEEP:g} bits={TARGET_BITS}"
    if not target:
        lines.append(f"targets: not measured (no per-element row with {label})")
        return "\n".join(lines)
    r = target[0]
    size_ok = r["ratio"] >= TARGET_SIZE_RATIO
    time_ok = r["time_ratio"] <= TARGET_TIME_RATIO
    lines.append(
        f"size target ({label}): ratio {r['ratio']:.1f}x >= {TARGET_SIZE_RATIO:g}x: "
        f"{'MET' if size_ok else 'NOT MET'}"
    )
    lines.append(
        f"time target ({label}): encode+decode {r['time_ratio']:.1f}x copy <= "
        f"{TARGET_TIME_RATIO:g}x: {'MET' if time_ok else 'NOT MET'}"
    )
    return "\n".join(lines)
