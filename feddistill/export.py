"""Export a distilled student for CPU inference, and run it.

The end product of a federated run is a ``save_pretrained`` student folder. This module turns it
into a smaller, self-describing export (int8 dynamic quantization, the way PyTorch's eager-mode
``quantize_dynamic`` does it: weights stored as int8, activations quantized on the fly) and gives
one loader, :func:`load_exported`, that accepts either folder kind, so ``predict`` and the latency
figures in the README go through the same code path.

Export folder layout (``FORMAT_VERSION`` 1)::

    config.json          HF config; rebuilds the architecture and holds ``id2label``
    tokenizer.json ...   the student's tokenizer (``save_pretrained``)
    model_int8.pt        ``torch.save(quantized_model.state_dict())``; loads with weights_only=True
    model.onnx           only with ``onnx=True``: the float32 graph for onnxruntime
                         (:mod:`feddistill.export_onnx`, the optional ``feddistill[onnx]``)
    export.json          manifest: kind, quantized module types, sizes, labels, versions

With ``quantize=False`` the weights are written by ``save_pretrained`` instead (``kind`` float32).

Why ``torch.ao.quantization``: it is deprecated in favour of ``torchao``, which is not a
dependency of this project; it still works in the pinned torch range and is the only int8 path
that needs no extra package. :func:`_quantize` is the one place to change when it goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.ao.nn.quantized as nnq
import transformers
from torch.ao.quantization import (
    default_dynamic_qconfig,
    float_qparams_weight_only_qconfig,
    quantize_dynamic,
)
from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

FORMAT_VERSION = 1
MANIFEST_NAME = "export.json"
INT8_WEIGHTS_NAME = "model_int8.pt"
KIND_INT8 = "int8-dynamic"
KIND_FLOAT = "float32"
ONNX_NAME = "model.onnx"
# Files ``save_pretrained`` writes the weights to (safetensors or legacy pickle, maybe sharded);
# a glob rather than any *.bin so a Trainer checkpoint's optimizer state is not counted.
_WEIGHT_GLOBS = ("model*.safetensors", "pytorch_model*.bin")
# Module types that int8 dynamic quantization knows how to replace; names go in the manifest so
# the loader rebuilds exactly the module tree the state dict was taken from.
_QUANTIZABLE = {"Linear": torch.nn.Linear, "Embedding": torch.nn.Embedding}


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_student` wrote; sizes are weight bytes (source files vs export file)."""

    out_dir: Path
    source_bytes: int
    export_bytes: int
    quantized: bool
    onnx_path: Path | None = None
    quantized_modules: tuple[str, ...] = ()
    onnx_bytes: int = 0

    def summary(self) -> str:
        """One line for the CLI and logs, e.g. ``student 62.5 MB -> export 15.9 MB (int8 ...)``."""
        if self.quantized:
            kind = f"int8 dynamic: {', '.join(self.quantized_modules)}"
        else:
            kind = "float32, not quantized"
        line = f"student {_mb(self.source_bytes)} -> export {_mb(self.export_bytes)} ({kind})"
        if self.onnx_path is not None:
            line += f"; onnx {_mb(self.onnx_bytes)} (float32) {self.onnx_path}"
        return line


@dataclass(frozen=True)
class Prediction:
    """One classified text; ``probabilities`` maps every label name to its softmax probability."""

    text: str
    label: str
    probabilities: dict[str, float]


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_student(
    student_dir: str | Path,
    out_dir: str | Path,
    *,
    quantize: bool = True,
    quantize_embeddings: bool = True,
    onnx: bool = False,
) -> ExportReport:
    """Write a self-contained CPU export of the student in ``student_dir`` to ``out_dir``.

    ``quantize_embeddings`` also stores the embedding tables as per-row int8: in a small student
    the word embeddings, not the Linear layers, hold most of the weights (about 75% for a 2-layer
    MiniLM with its 30k vocabulary), so quantizing Linear alone shrinks it by under 20%.

    Raises:
        FileNotFoundError: ``student_dir`` does not exist.
        ValueError: ``student_dir`` is not a sequence-classification model folder, or ``out_dir``
            is the source folder itself.
        ImportError: ``onnx=True`` but the ONNX exporter's packages are not installed.
    """
    src = _existing_dir(student_dir, "student folder")
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise ValueError(f"out_dir must differ from student_dir, got {str(out)!r} for both")
    if onnx:
        from feddistill.export_onnx import EXPORT_PACKAGES, export_onnx, require

        require(EXPORT_PACKAGES, "ONNX export (--onnx)")  # fail before writing anything
    model, tokenizer = _load_pretrained(src)
    model = model.float()  # int8 dynamic kernels take float32 input; a bf16 student is upcast

    out.mkdir(parents=True, exist_ok=True)
    # The manifest is written last and marks a complete export: drop any old one first, so a
    # failure midway cannot leave an old manifest describing new, half-written files.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    # Nor may a model.onnx from an earlier export outlive a re-export without --onnx, where
    # `predict --onnx` would still find and run it.
    (out / ONNX_NAME).unlink(missing_ok=True)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)

    onnx_path = export_onnx(model, tokenizer, out / ONNX_NAME) if onnx else None

    modules: tuple[str, ...] = ()
    if quantize:
        modules = ("Linear", "Embedding") if quantize_embeddings else ("Linear",)
        qmodel = _quantize(model, modules)
        weights = out / INT8_WEIGHTS_NAME
        torch.save(qmodel.state_dict(), weights)
        export_bytes = weights.stat().st_size
    else:
        model.save_pretrained(out)
        export_bytes = weight_bytes(out)

    report = ExportReport(
        out_dir=out,
        source_bytes=weight_bytes(src),
        export_bytes=export_bytes,
        quantized=quantize,
        onnx_path=onnx_path,
        quantized_modules=modules,
        onnx_bytes=onnx_path.stat().st_size if onnx_path is not None else 0,
    )
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": KIND_INT8 if quantize else KIND_FLOAT,
        "weights": INT8_WEIGHTS_NAME if quantize else None,
        "quantized_modules": list(modules),
        "source": str(src.resolve()),
        "source_bytes": report.source_bytes,
        "export_bytes": report.export_bytes,
        "labels": label_names(model.config),
        "onnx": ONNX_NAME if onnx_path is not None else None,
        "onnx_bytes": report.onnx_bytes,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return report


class _QuantizedEmbedding(nnq.Embedding):
    """``nnq.Embedding`` that accepts non-contiguous indices.

    The int8 lookup kernel rejects strided indices, and HF BERT feeds its embeddings an
    ``expand``-ed ``token_type_ids`` buffer whenever the tokenizer returns none.
    """

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return super().forward(indices.contiguous())

    @classmethod
    def from_float(
        cls, mod: torch.nn.Module, use_precomputed_fake_quant: bool = False
    ) -> _QuantizedEmbedding:
        # The parent builds a plain nnq.Embedding whatever cls is; move its weight across.
        plain = nnq.Embedding.from_float(mod, use_precomputed_fake_quant)
        out = cls(plain.num_embeddings, plain.embedding_dim)
        out.set_weight(plain.weight())
        return out


def _quantize(model: torch.nn.Module, modules: Sequence[str]) -> torch.nn.Module:
    """Return an int8 dynamically quantized copy of ``model`` (CPU only).

    Linear layers get per-tensor int8 weights with activations quantized at run time; embeddings
    get per-row (float qparams) uint8 weights, the only scheme PyTorch supports for lookups.
    """
    qconfigs = {"Linear": default_dynamic_qconfig, "Embedding": float_qparams_weight_only_qconfig}
    unknown = sorted(set(modules) - set(_QUANTIZABLE))
    if unknown:
        raise ValueError(
            f"quantized_modules has unknown types {unknown}; allowed {sorted(_QUANTIZABLE)}"
        )
    spec = {_QUANTIZABLE[name]: qconfigs[name] for name in modules}
    mapping = get_default_dynamic_quant_module_mappings()
    mapping[torch.nn.Embedding] = _QuantizedEmbedding
    with _quiet_quantization_warnings():
        return quantize_dynamic(model.eval(), spec, dtype=torch.qint8, mapping=mapping)


@contextlib.contextmanager
def _quiet_quantization_warnings() -> Iterator[None]:
    """Silence the deprecation notices torch emits on every quantized call (see module doc)."""
    with warnings.catch_warnings():
        for message in (
            r"torch\.ao\.quantization is deprecated",
            r".*quantize_per_tensor.*",
            r"TypedStorage is deprecated",  # torch.load of packed int8 params
        ):
            warnings.filterwarnings("ignore", message=message)
        yield


# --------------------------------------------------------------------------------------------
# Loading and inference
# --------------------------------------------------------------------------------------------


def load_exported(
    model_dir: str | Path,
) -> tuple[torch.nn.Module, object, list[str]]:
    """Load an export folder or a plain ``save_pretrained`` student: (model, tokenizer, labels).

    The model is on CPU in eval mode. An export folder is recognised by its ``export.json``.

    Raises:
        FileNotFoundError: ``model_dir`` does not exist.
        ValueError: it is neither kind of folder, or its manifest is from a newer format.
    """
    folder = _existing_dir(model_dir, "model folder")
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        model, tokenizer = _load_pretrained(folder)
        return model.eval(), tokenizer, label_names(model.config)

    manifest = json.loads(manifest_path.read_text())
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path} has format_version={version!r}; this feddistill reads "
            f"versions up to {FORMAT_VERSION}"
        )
    kind = manifest.get("kind")
    if kind == KIND_FLOAT:
        model, tokenizer = _load_pretrained(folder)
    elif kind == KIND_INT8:
        config = AutoConfig.from_pretrained(folder)
        # Same module tree as at export time: float skeleton -> quantize -> load int8 weights.
        skeleton = AutoModelForSequenceClassification.from_config(config).float()
        model = _quantize(skeleton, manifest.get("quantized_modules", ["Linear"]))
        with _quiet_quantization_warnings():
            state = torch.load(folder / manifest["weights"], map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        raise ValueError(
            f"{manifest_path} has kind={kind!r}; expected {KIND_INT8!r} or {KIND_FLOAT!r}"
        )
    return model.eval(), tokenizer, label_names(model.config)


def predict(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 32,
    onnx: bool = False,
) -> list[Prediction]:
    """Classify ``texts`` with the model in ``model_dir`` (either folder kind), in input order.

    With ``onnx=True`` the folder's ``model.onnx`` runs under onnxruntime instead of PyTorch;
    tokenization, batching and the softmax are the same code either way.
    """
    if onnx:
        from feddistill.export_onnx import load_onnx

        classifier, tokenizer, labels = load_onnx(model_dir)
        return classify(
            lambda enc: torch.from_numpy(classifier.logits(enc)),
            tokenizer,
            labels,
            texts,
            max_length=max_length,
            batch_size=batch_size,
            max_positions=classifier.max_positions,
        )
    model, tokenizer, labels = load_exported(model_dir)
    return predict_loaded(
        model, tokenizer, labels, texts, max_length=max_length, batch_size=batch_size
    )


def predict_loaded(
    model: torch.nn.Module,
    tokenizer: object,
    labels: Sequence[str],
    texts: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 32,
) -> list[Prediction]:
    """:func:`predict` for an already loaded model, so callers can load once and predict often."""
    return classify(
        lambda enc: model(**enc).logits,
        tokenizer,
        labels,
        texts,
        max_length=max_length,
        batch_size=batch_size,
        max_positions=getattr(getattr(model, "config", None), "max_position_embeddings", None),
    )


def classify(
    logits_fn: Callable[[Any], torch.Tensor],
    tokenizer: Any,
    labels: Sequence[str],
    texts: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 32,
    max_positions: int | None = None,
) -> list[Prediction]:
    """Tokenize ``texts`` in batches, call ``logits_fn`` on each encoding, return predictions.

    ``logits_fn`` maps the tokenizer's output (torch tensors) to logits ``[batch, labels]``; it
    is the only part that differs between the PyTorch and the onnxruntime backend. Texts are
    truncated to ``max_length`` tokens, or to ``max_positions`` (the model's position-embedding
    count) when that is fewer: a longer input has no position embedding and would fail in
    either backend (the default student has 64 positions, the default ``max_length`` is 128).
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, got a single str")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_positions is not None:
        max_length = min(max_length, max_positions)
    predictions: list[Prediction] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            enc = tokenizer(
                batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            # Softmax in float32 whatever the model's dtype, so probabilities sum to 1 closely.
            probs = logits_fn(enc).float().softmax(dim=-1)
            for text, row in zip(batch, probs.tolist(), strict=True):
                best = max(range(len(row)), key=row.__getitem__)
                predictions.append(
                    Prediction(text, labels[best], dict(zip(labels, row, strict=True)))
                )
    return predictions


def measure_latency(model_dir: str | Path, texts: Sequence[str], *, repeats: int = 20) -> float:
    """Median seconds per sentence, batch size 1, tokenization included, on CPU.

    Every text is run once as warm-up (first calls pay for allocation and kernel selection),
    then ``repeats`` times; the median over all timed calls resists scheduler noise. Thread
    settings are torch's defaults, so figures reflect an ordinary ``predict`` call.
    """
    if not texts:
        raise ValueError("texts must hold at least one sentence, got none")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    model, tokenizer, _ = load_exported(model_dir)

    def one(text: str) -> None:
        model(**tokenizer([text], return_tensors="pt", truncation=True, max_length=128))

    timings: list[float] = []
    with torch.inference_mode():
        for text in texts:
            one(text)
        for _ in range(repeats):
            for text in texts:
                start = time.perf_counter()
                one(text)
                timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def label_names(config: PretrainedConfig) -> list[str]:
    """Label names ordered by class id, from ``config.id2label`` (keys may be str after JSON)."""
    return [name for _, name in sorted((int(k), v) for k, v in config.id2label.items())]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _existing_dir(path: str | Path, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {str(folder)!r} does not exist or is not a directory")
    return folder


def _load_pretrained(folder: Path) -> tuple[PreTrainedModel, object]:
    """``from_pretrained`` model and tokenizer, with one error that names the folder."""
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{str(folder)!r} is not a model folder: no config.json (expected a student saved "
            "with save_pretrained, or an export folder with export.json)"
        )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"could not load a sequence-classification model and tokenizer from {str(folder)!r}: "
            f"{err}"
        ) from err
    return model, tokenizer


def weight_bytes(folder: Path) -> int:
    """Bytes of the ``save_pretrained`` weight files in ``folder`` (config, tokenizer excluded)."""
    return sum(p.stat().st_size for pattern in _WEIGHT_GLOBS for p in folder.glob(pattern))


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


# --------------------------------------------------------------------------------------------
# argparse wiring (``feddistill export`` / ``feddistill predict``)
# --------------------------------------------------------------------------------------------


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``STUDENT_DIR --out DIR [--no-quantize] [--linear-only] [--onnx]`` to ``parser``."""
    parser.add_argument("student_dir", metavar="STUDENT_DIR", help="save_pretrained student folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="export folder to write")
    parser.add_argument(
        "--no-quantize", action="store_true", help="copy float32 weights instead of int8"
    )
    parser.add_argument(
        "--linear-only",
        action="store_true",
        help="quantize Linear layers only, keep embeddings float32",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write model.onnx, the float32 graph for onnxruntime (needs the optional "
        "extra: pip install 'feddistill[onnx]')",
    )
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Run ``feddistill export``; returns the process exit code."""
    try:
        report = export_student(
            args.student_dir,
            args.out,
            quantize=not args.no_quantize,
            quantize_embeddings=not args.linear_only,
            onnx=args.onnx,
        )
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"feddistill export: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {report.out_dir}")
    return 0


def add_predict_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--model DIR [--onnx] [--json] [--max-length N] TEXT...`` to ``parser``."""
    parser.add_argument("--model", required=True, metavar="DIR", help="export or student folder")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="run DIR/model.onnx with onnxruntime instead of the PyTorch weights (an export "
        "written with --onnx; needs pip install 'feddistill[onnx]')",
    )
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="text(s) to classify")
    parser.add_argument("--json", action="store_true", help="print a JSON list of predictions")
    parser.add_argument("--max-length", type=int, default=128, help="truncate to N tokens")
    return parser


def run_predict(args: argparse.Namespace) -> int:
    """Run ``feddistill predict``; one line per text: ``label<TAB>p=..  (all probs)<TAB>text``."""
    try:
        predictions = predict(args.model, args.texts, max_length=args.max_length, onnx=args.onnx)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"feddistill predict: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(p) for p in predictions], indent=2))
        return 0
    for p in predictions:
        ranked = sorted(p.probabilities.items(), key=lambda kv: kv[1], reverse=True)
        probs = ", ".join(f"{name} {prob:.2f}" for name, prob in ranked)
        print(f"{p.label}\tp={p.probabilities[p.label]:.2f}  ({probs})\t{p.text}")
    return 0
