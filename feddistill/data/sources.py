"""Load a labelled text dataset from a local file, a saved dataset folder or the Hugging Face hub.

Every source ends up in the same shape, :class:`LabeledData`: a ``datasets.Dataset`` with exactly
the columns ``text`` (string) and ``label`` (int64, ids ``0..num_classes-1``) plus the label
names. Downstream code (tokenisation, partitioning, training) then never sees source-specific
column names or label encodings.

Choices worth knowing:

* Local files are read with the packaged ``csv`` / ``json`` / ``parquet`` builders of
  ``datasets.load_dataset``; they read the file and never touch the network, whether or not
  ``HF_DATASETS_OFFLINE`` is set. A file always yields its single split; ``split`` applies to
  saved ``DatasetDict`` folders and to hub datasets.
* Rows with a missing or blank text, or a missing label, are an error rather than silently
  dropped: a federated client that quietly trains on fewer rows than its operator expects is
  harder to debug than one that refuses to start and says which column and how many rows.
* String labels are mapped to ids in sorted order of the distinct strings, so the same label
  set gives the same ids on every client, whatever order the rows come in. A client that must
  use the run's label set passes ``label_names``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from feddistill.data.errors import DataError

__all__ = ["SUPPORTED_FILE_TYPES", "LabeledData", "as_labeled_data", "load_text_dataset"]

# File suffix -> packaged builder of datasets.load_dataset.
SUPPORTED_FILE_TYPES: dict[str, str] = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}

_STRING_DTYPES = ("string", "large_string")
_INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_MAX_LISTED = 10  # how many offending values an error message lists

_FEATURES = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})


@dataclass(frozen=True)
class LabeledData:
    """A text classification dataset in the project's one standard shape.

    Attributes:
        dataset: exactly two columns, ``text`` (string) and ``label`` (int64 in
            ``[0, len(label_names))``).
        label_names: ``label_names[i]`` is the name of class ``i``.
    """

    dataset: datasets.Dataset
    label_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def load_text_dataset(
    source: str,
    *,
    split: str = "train",
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> LabeledData:
    """Load ``source`` and normalise it to :class:`LabeledData`.

    Args:
        source: a ``.csv``, ``.json`` (array or JSON lines), ``.jsonl`` or ``.parquet`` file; a
            folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``; or
            otherwise a Hugging Face hub dataset name (needs network access or a warm cache).
        split: the split of a saved ``DatasetDict`` or of a hub dataset (ignored for files and
            for a saved single ``Dataset``).
        text_column: column holding the text; renamed to ``text``.
        label_column: column holding the label (integers, a ``ClassLabel`` or strings);
            renamed to ``label``.
        label_names: the label set to use instead of the one found in the data (for example
            the run's label set on a client). String labels are mapped through it; integer
            labels must lie in ``[0, len(label_names))``.

    Raises:
        DataError: the source, a column, a label or a row cannot be used; the message names
            the option (``data.source``, ``data.split``, ``data.text-column``,
            ``data.label-column``), the value and what is allowed.
    """
    raw = _load_raw(source, split)
    return as_labeled_data(
        raw,
        text_column=text_column,
        label_column=label_column,
        label_names=label_names,
        source=source,
    )


def _load_raw(source: str, split: str) -> datasets.Dataset:
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DataError(
                f"data.source={source!r} is a folder but not one written by "
                f"Dataset.save_to_disk or DatasetDict.save_to_disk ({err})."
            ) from err
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"data.split={split!r} is not a split of {source!r}; "
                    f"available splits: {sorted(loaded)}."
                )
            return loaded[split]
        return loaded

    suffix = path.suffix.lower()
    looks_like_path = suffix in SUPPORTED_FILE_TYPES or source.startswith(("/", ".", "~"))
    if path.is_file() and suffix in SUPPORTED_FILE_TYPES:
        return datasets.load_dataset(
            SUPPORTED_FILE_TYPES[suffix], data_files=str(path), split="train"
        )
    if path.is_file():
        raise DataError(
            f"data.source={source!r} has an unsupported file type {suffix!r}; allowed: "
            f"{sorted(SUPPORTED_FILE_TYPES)} files or a save_to_disk folder."
        )
    if looks_like_path:
        raise DataError(f"data.source={source!r} does not exist.")

    # A hub dataset name. Not reachable offline, so not covered by the tests.
    loaded = datasets.load_dataset(source, split=split)
    if not isinstance(loaded, datasets.Dataset):  # e.g. an IterableDataset
        raise DataError(f"data.source={source!r} did not load as a datasets.Dataset.")
    return loaded


def as_labeled_data(
    dataset: datasets.Dataset,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    source: str = "the dataset",
) -> LabeledData:
    """Normalise an in-memory ``datasets.Dataset`` to :class:`LabeledData`.

    This is the column and label handling of :func:`load_text_dataset` on its own (same
    arguments and errors), for datasets built in code. ``source`` only names the data in
    error messages.
    """
    columns = list(dataset.column_names)
    for option, column in (("data.text-column", text_column), ("data.label-column", label_column)):
        if column not in columns:
            raise DataError(
                f"{option}={column!r} is not a column of {source}; available columns: {columns}."
            )
    if text_column == label_column:
        raise DataError(
            f"data.text-column and data.label-column are both {text_column!r}; they must name "
            f"two different columns of {source} (available: {columns})."
        )
    if len(dataset) == 0:
        raise DataError(f"{source} has no rows; a dataset needs at least one example.")

    texts = _read_texts(dataset, text_column, source)
    labels, names = _read_labels(dataset, label_column, label_names, source)
    table = {"text": texts, "label": labels}
    return LabeledData(
        dataset=datasets.Dataset.from_dict(table, features=_FEATURES), label_names=names
    )


def _read_texts(dataset: datasets.Dataset, column: str, source: str) -> list[str]:
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in _STRING_DTYPES):
        raise DataError(
            f"data.text-column={column!r} of {source} holds {feature}, not strings; "
            f"name the column that holds the text."
        )
    texts: list[str | None] = dataset[column][:]
    blank = [i for i, text in enumerate(texts) if text is None or not text.strip()]
    if blank:
        raise DataError(
            f"data.text-column={column!r} of {source}: {len(blank)} of {len(texts)} rows have "
            f"a missing or blank text (first rows: {blank[:_MAX_LISTED]}); remove or fill them."
        )
    return texts  # type: ignore[return-value]  # no None left


def _read_labels(
    dataset: datasets.Dataset,
    column: str,
    label_names: Sequence[str] | None,
    source: str,
) -> tuple[np.ndarray, list[str]]:
    """Return int64 label ids and the label names (index = id)."""
    if label_names is not None:
        label_names = [str(name) for name in label_names]
        if not label_names or len(set(label_names)) != len(label_names):
            raise DataError(
                f"label_names must be a non-empty list of distinct names, got {label_names}."
            )

    feature = dataset.features[column]
    values = dataset[column][:]
    missing = [i for i, value in enumerate(values) if value is None]
    if missing:
        raise DataError(
            f"data.label-column={column!r} of {source}: {len(missing)} rows have no label "
            f"(first rows: {missing[:_MAX_LISTED]}); remove or fill them."
        )

    if isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype in _INT_DTYPES
    ):
        ids = np.asarray(values, dtype=np.int64)
        found_names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        if label_names is not None:
            if found_names is not None and list(found_names) != label_names:
                warnings.warn(
                    f"data.label-column={column!r} of {source} is a ClassLabel with names "
                    f"{found_names}, but label_names={label_names} was given; the integer ids "
                    f"are kept and read with label_names.",
                    stacklevel=3,
                )
            names = label_names
        elif found_names is not None:
            names = list(found_names)
        else:
            names = [str(i) for i in range(max(int(ids.max()), -1) + 1)]
        bad = np.unique(ids[(ids < 0) | (ids >= len(names))])
        if bad.size:
            raise DataError(
                f"data.label-column={column!r} of {source} has integer labels outside "
                f"[0, {len(names)}) (the label set {names}): {bad[:_MAX_LISTED].tolist()}."
            )
        return ids, names

    if isinstance(feature, datasets.Value) and feature.dtype in _STRING_DTYPES:
        if label_names is None:
            names = sorted(set(values))
        else:
            names = label_names
            unknown = sorted(set(values) - set(names))
            if unknown:
                raise DataError(
                    f"data.label-column={column!r} of {source} has labels that are not in the "
                    f"label set {names}: {unknown[:_MAX_LISTED]}"
                    f"{' ...' if len(unknown) > _MAX_LISTED else ''}."
                )
        to_id = {name: i for i, name in enumerate(names)}
        return np.fromiter((to_id[v] for v in values), dtype=np.int64, count=len(values)), names

    raise DataError(
        f"data.label-column={column!r} of {source} holds {feature}; allowed: integer labels, "
        f"a ClassLabel, or string labels."
    )
