"""ONNX export of a student and inference with onnxruntime: the optional ``feddistill[onnx]``.

The int8 eager export (:mod:`feddistill.export`) needs torch at serving time; an ONNX file needs
only onnxruntime, which is smaller and runs where torch does not. The graph is the *float32*
student (PyTorch's eager int8 modules have no ONNX lowering), traced by the torch.export-based
exporter (``dynamo=True``, the default since torch 2.9) with two dynamic axes, batch and
sequence, so one file serves any batch of up to ``max_position_embeddings`` tokens.

Graph signature: inputs ``input_ids`` and ``attention_mask`` (int64, ``[batch, sequence]``),
output ``logits`` (float32, ``[batch, num_labels]``). ``token_type_ids`` is not an input: a
single-sentence classifier feeds zeros, which is what the model assumes when it is absent.

:mod:`feddistill.export` imports this module only when ONNX is asked for, and every entry point
here checks its packages first and names the extra to install (:func:`require`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from feddistill.export import ONNX_NAME, _existing_dir, label_names

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
INSTALL_HINT = "pip install 'feddistill[onnx]'"
EXPORT_PACKAGES = ("onnx", "onnxscript")  # torch.onnx.export(dynamo=True) imports both
RUNTIME_PACKAGES = ("onnxruntime",)


def require(packages: Sequence[str], purpose: str) -> None:
    """Raise one ImportError naming every missing package and the extra that provides them."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"{purpose} needs {', '.join(missing)}, not installed in this environment; "
            f"install the optional extra: {INSTALL_HINT}"
        )


class _Logits(torch.nn.Module):
    """The student as ``(input_ids, attention_mask) -> logits``: the exporter wants tensors out,
    not a ``ModelOutput``, and fixed positional inputs to name."""

    def __init__(self, inner: PreTrainedModel) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


def export_onnx(model: PreTrainedModel, tokenizer: Any, path: Path) -> Path:
    """Write ``model`` (float32 on CPU; the caller casts it) to one ONNX file at ``path``.

    The sample batch only fixes dtypes and ranks; both of its axes are declared dynamic. It must
    have two rows and more than one token, since torch.export specializes axes of size 0 or 1.
    The sequence axis is capped at ``max_position_embeddings``: longer inputs have no position
    embedding, in ONNX as in PyTorch. The weights stay inside the file (ONNX's protobuf limit
    is 2 GB, far above any student here), so serving copies one file.
    """
    require(EXPORT_PACKAGES, "ONNX export")
    from torch.export import Dim

    sample = tokenizer(["an example sentence", "another"], return_tensors="pt", padding=True)
    batch = Dim("batch")
    sequence = Dim("sequence", max=int(model.config.max_position_embeddings))
    axes = {0: batch, 1: sequence}
    with _quiet_exporter():
        program = torch.onnx.export(
            _Logits(model.eval()).eval(),
            tuple(sample[name] for name in INPUT_NAMES),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes={name: axes for name in INPUT_NAMES},
            dynamo=True,
            verbose=False,
        )
    # Every node carries the exporter's debug notes (FX node, module path, Python stack trace
    # with this machine's file paths): 275 kB, 37% of the tiny student's file. Not for serving.
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    program.save(str(path), external_data=False)
    return path


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide exporter notices that do not concern the user of a correct export: a rename note
    for axes shared by both inputs, deprecations inside torch and onnxscript, and "torchvision
    is not installed" (its ops are not in a text classifier)."""
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            yield
        finally:
            registry_log.setLevel(level)


class OnnxClassifier:
    """An onnxruntime session over an exported ``model.onnx``: encoded batch -> logits.

    ``threads`` sets onnxruntime's intra-op thread count; ``None`` keeps its default (one
    thread per physical core). Inter-op parallelism stays off (sequential execution), which is
    onnxruntime's default and what a transformer's chain of ops wants.
    """

    def __init__(
        self, path: str | Path, *, threads: int | None = None, max_positions: int | None = None
    ) -> None:
        require(RUNTIME_PACKAGES, "ONNX inference")
        import onnxruntime as ort

        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None (onnxruntime's default), got {threads}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.max_positions = max_positions  # longest input the graph can embed, if known
        self.session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        unknown = sorted(set(self.input_names) - set(INPUT_NAMES))
        if unknown:
            raise ValueError(
                f"{str(self.path)!r} takes inputs {self.input_names}; feddistill feeds only "
                f"{list(INPUT_NAMES)} (was it written by `feddistill export --onnx`?)"
            )

    def logits(self, encoding: Any) -> np.ndarray:
        """Logits ``[batch, num_labels]`` for a tokenizer's output (torch or numpy tensors)."""
        feeds = {name: np.asarray(encoding[name], dtype=np.int64) for name in self.input_names}
        (out,) = self.session.run([OUTPUT_NAME], feeds)
        return out


def load_onnx(
    model_dir: str | Path, *, threads: int | None = None
) -> tuple[OnnxClassifier, Any, list[str]]:
    """Load ``model_dir/model.onnx`` with the folder's tokenizer and labels.

    Raises:
        FileNotFoundError: the folder or its ``model.onnx`` is missing (the message says how to
            write one).
        ImportError: onnxruntime is not installed.
    """
    folder = _existing_dir(model_dir, "model folder")
    path = folder / ONNX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no {ONNX_NAME}; write one with "
            f"`feddistill export STUDENT_DIR --out {folder} --onnx`"
        )
    config = AutoConfig.from_pretrained(folder)
    max_positions = getattr(config, "max_position_embeddings", None)
    classifier = OnnxClassifier(path, threads=threads, max_positions=max_positions)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return classifier, tokenizer, label_names(config)
