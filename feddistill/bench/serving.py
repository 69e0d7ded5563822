"""``feddistill bench-serve``: size on disk and CPU latency of the three ways to serve a student.

The backends are the float32 PyTorch student (``save_pretrained`` folder), the int8 dynamic
PyTorch export and the float32 ONNX file under onnxruntime, all three written by
:func:`feddistill.export.export_student` from the same student. Latency is the model call alone
(one forward pass and nothing else) on inputs tokenized beforehand, so the backends are compared
on what differs between them; the tokenizer, which all three share, is timed on its own row.

Batch 1 cycles through ``SENTENCES`` sentences of the embedded corpus, one per call; batch N
pads the first N of them together (the padding the ``predict`` path uses). Each cell is the
median of ``repeats`` timed calls after one untimed pass over the inputs (first calls pay for
allocation and kernel selection). Threads: 1 intra-op thread, and each runtime's default
(torch: ``torch.get_num_threads()`` at start; onnxruntime: one per physical core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

SENTENCES = 32  # distinct corpus sentences the inputs are drawn from
CORPUS_SEED = 7
BACKENDS = ("pytorch-float32", "pytorch-int8", "onnxruntime-float32")
DESCRIPTION = """\
Export a student (int8 PyTorch + ONNX) and measure, for the float32 PyTorch student, the int8
dynamic PyTorch export and the ONNX file under onnxruntime: weight file size, and the median
milliseconds of one model call (tokenization excluded; the shared tokenizer has its own row) at
each batch size, with 1 intra-op thread and with each runtime's default. Batch 1 cycles through
32 embedded-corpus sentences; batch N pads the first N together. Needs the optional extra:
pip install 'feddistill[onnx]'. Timings are only as quiet as the machine: run it with nice on
an otherwise idle host, or say that it was shared."""


@dataclass(frozen=True)
class Cell:
    """One measurement: ``backend`` at ``batch`` with ``threads`` ("1" or "default")."""

    backend: str
    batch: int
    threads: str
    median_ms: float
    runs: int


@dataclass(frozen=True)
class ServeBench:
    """Everything ``bench-serve`` measured; ``sizes`` are bytes of each backend's weight file."""

    student_dir: str
    export_dir: str
    sizes: dict[str, int]
    cells: list[Cell]
    default_threads: int
    cpu_count: int | None
    tokens: dict[int, tuple[int, int]]  # batch -> (shortest, longest) padded input length

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "cells": [asdict(c) for c in self.cells]}


def student_from_config(teacher: str, out: Path) -> Path:
    """Save the *initial* derived student of the default run config with ``model.teacher``.

    Its weights are untrained, which changes neither its size nor its latency (dense kernels
    do the same work whatever the values); a trained ``OUT/student`` can be passed instead.
    """
    from feddistill.config import parse_config
    from feddistill.models.build import save_student
    from feddistill.run_inputs import initial_models, server_data

    cfg = parse_config({"model.teacher": teacher})
    models = initial_models(cfg, server_data(cfg)[1])
    save_student(models.student, models.student_tokenizer, out)
    return out


def run_serve_bench(
    student_dir: str | Path,
    export_dir: str | Path,
    *,
    repeats: int = 50,
    batch_sizes: Sequence[int] = (1, 32),
) -> ServeBench:
    """Measure the student in ``student_dir`` and its export in ``export_dir``.

    ``export_dir`` must hold an int8 export with ``model.onnx`` (``feddistill export
    STUDENT_DIR --out DIR --onnx``); :func:`prepare` writes one.
    """
    from feddistill.data import make_corpus
    from feddistill.export import INT8_WEIGHTS_NAME, ONNX_NAME, load_exported, weight_bytes
    from feddistill.export_onnx import OnnxClassifier

    check_arguments(repeats, batch_sizes)
    student, export = Path(student_dir), Path(export_dir)
    float_model, tokenizer, _ = load_exported(student)
    int8_model, _, _ = load_exported(export)
    max_length = min(128, int(float_model.config.max_position_embeddings))
    texts, _ = make_corpus(SENTENCES, seed=CORPUS_SEED)

    def encode(batch: list[str]) -> Any:
        return tokenizer(
            batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )

    inputs = {
        b: [encode(texts[i : i + 1]) for i in range(SENTENCES)] if b == 1 else [encode(texts[:b])]
        for b in batch_sizes
    }
    default_threads = torch.get_num_threads()
    cells: list[Cell] = []
    try:
        for threads in ("1", "default"):
            torch.set_num_threads(1 if threads == "1" else default_threads)
            onnx = OnnxClassifier(export / ONNX_NAME, threads=1 if threads == "1" else None)
            runners: dict[str, Callable[[Any], object]] = {
                "pytorch-float32": lambda enc: float_model(**enc).logits,
                "pytorch-int8": lambda enc: int8_model(**enc).logits,
                "onnxruntime-float32": onnx.logits,
            }
            for backend, run in runners.items():
                for b, encs in inputs.items():
                    median = _median_ms(run, encs, repeats)
                    cells.append(Cell(backend, b, threads, median, repeats))
            for b in batch_sizes:  # the first b sentences (batch 1: always the first)
                batch = texts[:b]
                median = _median_ms(lambda _, batch=batch: encode(batch), [None], repeats)
                cells.append(Cell("tokenizer", b, threads, median, repeats))
    finally:
        torch.set_num_threads(default_threads)
    return ServeBench(
        student_dir=str(student),
        export_dir=str(export),
        sizes={
            "pytorch-float32": weight_bytes(student),
            "pytorch-int8": (export / INT8_WEIGHTS_NAME).stat().st_size,
            "onnxruntime-float32": (export / ONNX_NAME).stat().st_size,
        },
        cells=cells,
        default_threads=default_threads,
        cpu_count=os.cpu_count(),
        tokens={b: _length_range(inputs[b]) for b in inputs},
    )


def _length_range(encodings: list[Any]) -> tuple[int, int]:
    lengths = [int(e["input_ids"].shape[1]) for e in encodings]
    return min(lengths), max(lengths)


def check_arguments(repeats: int, batch_sizes: Sequence[int]) -> None:
    """Raise ValueError for settings the bench cannot run (before anything is exported)."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > SENTENCES:
        raise ValueError(
            f"--batch-sizes must each lie in [1, {SENTENCES}], got {list(batch_sizes)}"
        )


def _median_ms(fn: Callable[[Any], object], inputs: list[Any], repeats: int) -> float:
    """Median milliseconds of ``fn(x)``, cycling through ``inputs``, after one untimed pass."""
    timings: list[float] = []
    with torch.inference_mode():
        for x in inputs:
            fn(x)
        for i in range(repeats):
            x = inputs[i % len(inputs)]
            start = time.perf_counter()
            fn(x)
            timings.append(time.perf_counter() - start)
    return 1e3 * statistics.median(timings)


def format_table(bench: ServeBench) -> str:
    """Markdown: one row per backend, size and one latency column per (batch, threads)."""
    keys = sorted({(c.batch, c.threads) for c in bench.cells}, key=lambda k: (k[0], k[1] != "1"))
    by_key = {(c.backend, c.batch, c.threads): c.median_ms for c in bench.cells}
    default = f"default ({bench.default_threads})"
    header = ["backend", "size on disk"] + [
        f"batch {b}, {'1 thread' if t == '1' else default + ' threads'} (ms)" for b, t in keys
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for backend in (*BACKENDS, "tokenizer"):
        size = bench.sizes.get(backend)
        row = [backend, f"{size / 1e6:.2f} MB" if size is not None else "(shared)"]
        row += [f"{by_key[(backend, b, t)]:.2f}" for b, t in keys]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# argparse wiring
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    source = p.add_mutually_exclusive_group()
    source.add_argument("--student", metavar="DIR", help="a save_pretrained student folder")
    source.add_argument(
        "--teacher",
        default="builtin:tiny",
        metavar="SPEC",
        help="measure the initial student the default run config derives from this teacher "
        "(default builtin:tiny; e.g. offline:all-minilm-l6-v2)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="keep the student, the export and serve-bench.json/.md here (default: a temp dir)",
    )
    p.add_argument("--repeats", type=int, default=50, help="timed calls per cell (default 50)")
    p.add_argument(
        "--batch-sizes",
        default="1,32",
        help=f"comma-separated batch sizes, each in [1, {SENTENCES}] (default 1,32)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def prepare(out: Path, student: str | None, teacher: str) -> tuple[Path, Path]:
    """The student folder (given, or derived from ``teacher``) and its int8 + ONNX export."""
    from feddistill.export import export_student

    student_dir = Path(student) if student else student_from_config(teacher, out / "student")
    export_student(student_dir, out / "export", onnx=True)
    return student_dir, out / "export"


def run_command(args: argparse.Namespace) -> int:
    try:
        batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    except ValueError as err:
        raise ValueError(
            f"--batch-sizes expects integers like 1,32, not {args.batch_sizes!r}"
        ) from err
    check_arguments(args.repeats, batch_sizes)
    with tempfile.TemporaryDirectory(prefix="feddistill-serve-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        student_dir, export_dir = prepare(out, args.student, args.teacher)
        bench = run_serve_bench(
            student_dir, export_dir, repeats=args.repeats, batch_sizes=batch_sizes
        )
        table = format_table(bench)
        if args.out:
            (out / "serve-bench.json").write_text(json.dumps(bench.to_json(), indent=2) + "\n")
            (out / "serve-bench.md").write_text(table + "\n")
    if args.json:
        print(json.dumps(bench.to_json(), indent=2))
    else:
        source = args.student or f"initial student derived from {args.teacher}"
        tokens = ", ".join(
            f"batch {b}: {lo}-{hi}" if lo != hi else f"batch {b}: {lo}"
            for b, (lo, hi) in bench.tokens.items()
        )
        print(
            f"{source}; {bench.cpu_count} CPUs; median of {args.repeats} calls per cell; "
            f"tokens per input ({tokens})"
        )
        print(table)
    return 0
