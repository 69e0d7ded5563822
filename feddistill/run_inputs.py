"""What server and clients both need: the run's labels, each node's data, the initial models.

Kept apart from the Flower apps so simulation and deployment call the very same functions, and so
tests can use them without a Flower runtime.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from feddistill.codec.chain import model_digest
from feddistill.config import Config, DataConfig
from feddistill.data import (
    DataError,
    load_text_dataset,
    make_train_test,
    partition_indices,
    train_val_split,
)
from feddistill.models.build import (
    Labels,
    build_student,
    build_teacher,
    exchanged_names,
    get_arrays,
    load_tokenizer,
)


@dataclass(frozen=True)
class TextSplit:
    """Texts and integer labels of one split on one node."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for text, label in zip(self.texts, self.labels, strict=True):
            h.update(f"{label}\t{text}\n".encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _data_key(cfg: DataConfig, seed: int) -> str:
    return json.dumps({**cfg.__dict__, "seed": seed}, sort_keys=True)


@functools.lru_cache(maxsize=2)
def _source_splits(key: str) -> tuple[TextSplit, TextSplit | None, tuple[str, ...]]:
    """Train and (optional) test split of the configured source.

    Cached per process because simulation workers (Ray actors) serve many clients in a row and
    re-reading a file for each would dominate small rounds; the cache holds the immutable source
    only, never per-client state.
    """
    spec = json.loads(key)
    seed = spec.pop("seed")
    cfg = DataConfig(**spec)
    if cfg.source == "embedded":
        train, test, names = make_train_test(
            cfg.num_examples,
            cfg.num_test,
            num_classes=cfg.num_classes,
            label_noise=cfg.label_noise,
            seed=seed,
        )
        return (
            TextSplit(list(train["text"]), list(train["label"])),
            TextSplit(list(test["text"]), list(test["label"])) if len(test) else None,
            tuple(names),
        )
    train_data = load_text_dataset(
        cfg.source, split="train", text_column=cfg.text_column, label_column=cfg.label_column
    )
    names = tuple(train_data.label_names)
    test: TextSplit | None = None
    if cfg.test_source:
        test_data = load_text_dataset(
            cfg.test_source,
            split="test",
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            label_names=names,
        )
        test = TextSplit(list(test_data.dataset["text"]), list(test_data.dataset["label"]))
    ds = train_data.dataset
    return TextSplit(list(ds["text"]), list(ds["label"])), test, names


def source_splits(cfg: Config) -> tuple[TextSplit, TextSplit | None, Labels]:
    train, test, names = _source_splits(_data_key(cfg.data, cfg.seed))
    return train, test, Labels(names)


@functools.lru_cache(maxsize=2)
def _partitions(key: str) -> tuple[np.ndarray, ...]:
    spec = json.loads(key)
    seed = spec.pop("seed")
    cfg = DataConfig(**spec)
    train, _, _ = _source_splits(key)
    return tuple(
        partition_indices(
            np.asarray(train.labels),
            num_partitions=cfg.num_clients,
            scheme=cfg.partitioning,
            alpha=cfg.alpha,
            shards_per_client=cfg.shards_per_client,
            seed=seed,
            min_partition_size=cfg.min_partition_size,
        )
    )


def partitions(cfg: Config) -> tuple[np.ndarray, ...]:
    """Indices of every client's partition; raises DataError naming a bad option."""
    return _partitions(_data_key(cfg.data, cfg.seed))


def _partition_indices(cfg: Config, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of one simulated client's training and validation examples."""
    if not 0 <= partition_id < cfg.data.num_clients:
        raise DataError(
            f"partition-id {partition_id} outside [0, {cfg.data.num_clients}): the federation "
            f"has more nodes than data.num-clients = {cfg.data.num_clients}"
        )
    idx = partitions(cfg)[partition_id]
    return train_val_split(idx, val_fraction=cfg.data.val_fraction, seed=cfg.seed + partition_id)


def partition_example_counts(cfg: Config) -> list[tuple[int, int]]:
    """(training, validation) examples of every simulated client, by partition id: the
    ``num-examples`` an honest client reports for training and for evaluation."""
    counts = []
    for pid in range(cfg.data.num_clients):
        tr, va = _partition_indices(cfg, pid)
        counts.append((len(tr), len(va)))
    return counts


def partition_split(cfg: Config, partition_id: int) -> tuple[TextSplit, TextSplit]:
    """Train/validation split of one simulated client's partition."""
    tr, va = _partition_indices(cfg, partition_id)
    train, _, _ = source_splits(cfg)
    pick = lambda ids: TextSplit([train.texts[i] for i in ids], [train.labels[i] for i in ids])  # noqa: E731
    return pick(tr), pick(va)


def parse_labels(text: str) -> Labels:
    """``data.labels``: comma-separated class names, in class-id order (``"world,sports"``)."""
    names = tuple(name.strip() for name in text.split(","))
    if not text.strip() or any(not name for name in names):
        raise DataError(
            f"data.labels={text!r} has an empty name; expected comma-separated class names "
            "such as 'world,sports,business'"
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"data.labels={text!r} names {duplicates} more than once")
    if len(names) < 2:
        raise DataError(f"data.labels={text!r} names {len(names)} class; a classifier needs >= 2")
    return Labels(names)


def server_data(cfg: Config) -> tuple[TextSplit | None, Labels]:
    """What the server knows about the data: the centralized test split (or None) and labels.

    In simulation both come from ``data.source``. In deployment the data stays on the devices:
    labels come from ``data.labels``, else from ``data.source`` if the server can read it, and
    the test split only from ``data.test-source`` (without it there is no centralized
    evaluation and accuracies are null in results.json).
    """
    if cfg.mode == "simulation":
        _, test, labels = source_splits(cfg)
        return test, labels
    d = cfg.data
    if d.labels:
        labels = parse_labels(d.labels)
    else:
        try:  # the test source is read below, with these labels
            labels = source_splits(cfg.with_overrides({"data.test-source": ""}))[2]
        except (DataError, OSError) as err:  # OSError: a hub name, offline
            raise DataError(
                "mode = 'deployment' needs the label set: set data.labels (e.g. "
                f'data.labels="world,sports") or a data.source the server can read ({err})'
            ) from err
    if not d.test_source:
        return None, labels
    test = load_text_dataset(
        d.test_source,
        split="test",
        text_column=d.text_column,
        label_column=d.label_column,
        label_names=list(labels.names),
    ).dataset
    return TextSplit(list(test["text"]), list(test["label"])), labels


def local_file_split(cfg: Config, path: str, labels: Labels) -> tuple[TextSplit, TextSplit]:
    """A device's own data file (node config ``data-path``), checked against the run's labels.

    Raises DataError naming the path: missing or empty file, missing column, unknown label.
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"data-path {path!r} does not exist on this node (node config data-path)")
    if file.is_file() and file.stat().st_size == 0:
        raise DataError(f"data-path {path!r} is an empty file (node config data-path)")
    try:
        data = load_text_dataset(
            str(file),
            split="train",
            text_column=cfg.data.text_column,
            label_column=cfg.data.label_column,
            label_names=list(labels.names),
        )
    except DataError as err:
        raise DataError(f"data-path {path!r}: {err}") from err
    except ValueError as err:  # raised by `datasets`, e.g. for a CSV with only a header
        raise DataError(f"data-path {path!r} could not be read ({err}); has it any rows?") from err
    ds = data.dataset
    idx = np.arange(len(ds))
    tr, va = train_val_split(idx, val_fraction=cfg.data.val_fraction, seed=cfg.seed)
    texts, ys = list(ds["text"]), list(ds["label"])
    return (
        TextSplit([texts[i] for i in tr], [ys[i] for i in tr]),
        TextSplit([texts[i] for i in va], [ys[i] for i in va]),
    )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@dataclass
class InitialModels:
    """The initial teacher and student, as every node rebuilds them from the config."""

    teacher: PreTrainedModel
    teacher_tokenizer: PreTrainedTokenizerBase
    student: PreTrainedModel
    student_tokenizer: PreTrainedTokenizerBase
    names: list[str]
    init_arrays: dict[str, np.ndarray]
    digest: str

    @property
    def schema(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(self.init_arrays[n].shape)) for n in self.names]


def initial_models(cfg: Config, labels: Labels) -> InitialModels:
    m = cfg.model
    t_tok = load_tokenizer(m.teacher, cfg.data.max_length)
    teacher = build_teacher(m.teacher, labels, t_tok, cfg.seed)
    s_tok = t_tok if m.student == "derived" else load_tokenizer(m.student, cfg.data.max_length)
    student = build_student(m, teacher, labels, cfg.seed, s_tok)
    teacher.eval()
    student.eval()
    names = exchanged_names(student)
    arrays = get_arrays(student, names)
    # The same digest as the chained downlink's: a client proves it rebuilt this student.
    digest = model_digest(arrays, names).hex()
    return InitialModels(teacher, t_tok, student, s_tok, names, arrays, digest)


def teacher_cache_key(
    cfg: Config,
    labels: Labels,
    train: TextSplit,
    *,
    val: TextSplit | None = None,
    mutual_run: str = "",
) -> str:
    """The key of a cached teacher: every setting that changes its weights is in it.

    Without ``mutual_run``: the fine-tuned teacher (teacher model and ``teacher.*``, seed, labels,
    data and the validation split its early stopping reads, tokenization, ``train.precision``
    of the fine-tuning, torch version). With it: that
    teacher as run ``mutual_run``'s mutual distillation (``distill.mutual``) has trained it
    further, which depends on everything that run did, so it belongs to that run alone and is
    never stored under, or read as, the fine-tuned teacher's key.
    """
    spec: dict[str, Any] = {
        "teacher": cfg.model.teacher,
        "hp": cfg.teacher.__dict__,
        "seed": cfg.seed,
        "labels": labels.names,
        "data": train.fingerprint(),
        "val": None if val is None else val.fingerprint(),
        "max_length": cfg.data.max_length,
        "precision": cfg.train.precision,
        "torch": torch.__version__.split("+")[0],
    }
    if mutual_run:
        spec["mutual"] = {"run": mutual_run}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir(cfg: Config) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "cache"
