"""Tests for loading local files and saved datasets into LabeledData (all offline)."""

from __future__ import annotations

import json
import socket

import datasets
import pandas as pd
import pytest

from feddistill.data import DataError, LabeledData, as_labeled_data, load_text_dataset

ROWS = {
    "sentence": ["Stocks rallied.", "The striker scored.", "A new vaccine.", "Shares fell."],
    "topic": ["business", "sports", "health", "business"],
    "extra": [1, 2, 3, 4],
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test here that tries to open a network connection."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _write(path, rows: dict) -> str:
    frame = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    elif suffix == ".parquet":
        frame.to_parquet(path)
    return str(path)


def _assert_standard_shape(data: LabeledData) -> None:
    assert data.dataset.column_names == ["text", "label"]
    assert data.dataset.features["text"].dtype == "string"
    assert data.dataset.features["label"].dtype == "int64"


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_files_load_with_custom_columns_and_sorted_string_labels(tmp_path, suffix):
    # Prepare
    source = _write(tmp_path / f"train{suffix}", ROWS)

    # Execute
    data = load_text_dataset(source, text_column="sentence", label_column="topic")

    # Assert: other columns dropped, names sorted, ids follow the names.
    _assert_standard_shape(data)
    assert data.label_names == ["business", "health", "sports"]
    assert data.num_classes == 3
    assert data.dataset["text"][:] == ROWS["sentence"]
    assert data.dataset["label"][:] == [0, 2, 1, 0]


def test_string_labels_map_through_given_label_names(tmp_path):
    source = _write(tmp_path / "client.csv", ROWS)
    run_labels = ["sports", "business", "science", "health"]

    data = load_text_dataset(
        source, text_column="sentence", label_column="topic", label_names=run_labels
    )

    assert data.label_names == run_labels
    assert data.dataset["label"][:] == [1, 0, 3, 1]


def test_string_label_outside_label_names_is_named(tmp_path):
    source = _write(tmp_path / "client.csv", ROWS)

    with pytest.raises(DataError, match=r"data.label-column='topic'.*\['health'\]"):
        load_text_dataset(
            source, text_column="sentence", label_column="topic", label_names=["business", "sports"]
        )


def test_integer_labels_are_kept_and_named_by_index(tmp_path):
    source = _write(tmp_path / "ints.jsonl", {"text": ["a b", "c d", "e f"], "label": [2, 0, 2]})

    data = load_text_dataset(source)

    _assert_standard_shape(data)
    assert data.dataset["label"][:] == [2, 0, 2]
    assert data.label_names == ["0", "1", "2"]


def test_integer_labels_outside_label_names_raise(tmp_path):
    source = _write(tmp_path / "ints.csv", {"text": ["a", "b", "c"], "label": [0, 3, 1]})

    assert load_text_dataset(source, label_names=["x", "y", "z", "w"]).label_names == [
        "x",
        "y",
        "z",
        "w",
    ]
    with pytest.raises(DataError, match=r"outside \[0, 3\).*\[3\]"):
        load_text_dataset(source, label_names=["x", "y", "z"])


def test_negative_integer_labels_raise(tmp_path):
    source = _write(tmp_path / "ints.csv", {"text": ["a", "b"], "label": [0, -1]})

    with pytest.raises(DataError, match=r"data.label-column='label'.*\[-1\]"):
        load_text_dataset(source)


def _class_label_dataset() -> datasets.Dataset:
    features = datasets.Features(
        {
            "content": datasets.Value("string"),
            "y": datasets.ClassLabel(names=["neg", "pos"]),
            "id": datasets.Value("int32"),
        }
    )
    return datasets.Dataset.from_dict(
        {"content": ["bad film", "great film", "fine"], "y": [0, 1, 1], "id": [7, 8, 9]},
        features=features,
    )


def test_saved_dataset_folder_uses_class_label_names(tmp_path):
    _class_label_dataset().save_to_disk(tmp_path / "saved")

    data = load_text_dataset(str(tmp_path / "saved"), text_column="content", label_column="y")

    _assert_standard_shape(data)
    assert data.label_names == ["neg", "pos"]
    assert data.dataset["label"][:] == [0, 1, 1]


def test_saved_dataset_dict_folder_takes_the_split(tmp_path):
    # Prepare
    train = _class_label_dataset()
    test = train.select([2])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "saved")
    source = str(tmp_path / "saved")

    # Execute
    data = load_text_dataset(source, split="test", text_column="content", label_column="y")

    # Assert
    assert data.dataset["text"][:] == ["fine"]
    with pytest.raises(DataError, match=r"data.split='validation'.*\['test', 'train'\]"):
        load_text_dataset(source, split="validation", text_column="content", label_column="y")


def test_class_label_names_that_differ_from_label_names_warn(tmp_path):
    with pytest.warns(UserWarning, match="ClassLabel with names"):
        data = as_labeled_data(
            _class_label_dataset(), text_column="content", label_column="y", label_names=["a", "b"]
        )
    assert data.label_names == ["a", "b"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"text_column": "body"}, r"data.text-column='body'.*\['sentence', 'topic', 'extra'\]"),
        (
            {"text_column": "sentence", "label_column": "y"},
            r"data.label-column='y'.*available columns",
        ),
        ({"text_column": "topic", "label_column": "topic"}, "two different columns"),
        (
            {"text_column": "extra", "label_column": "topic"},
            r"data.text-column='extra'.*not strings",
        ),
    ],
)
def test_column_errors_name_the_option_and_the_columns(tmp_path, kwargs, match):
    source = _write(tmp_path / "train.csv", ROWS)

    with pytest.raises(DataError, match=match):
        load_text_dataset(source, **{"label_column": "topic", **kwargs})


def test_float_labels_are_rejected(tmp_path):
    source = _write(tmp_path / "f.csv", {"text": ["a", "b"], "label": [0.5, 1.0]})

    with pytest.raises(DataError, match=r"data.label-column='label'.*allowed: integer labels"):
        load_text_dataset(source)


def test_empty_dataset_raises():
    empty = datasets.Dataset.from_dict(
        {"text": [], "label": []},
        features=datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.Value("int64")}
        ),
    )

    with pytest.raises(DataError, match="no rows"):
        as_labeled_data(empty)


def test_blank_or_missing_text_rows_are_counted(tmp_path):
    source = _write(
        tmp_path / "t.jsonl", {"text": ["ok", "", None, "   ", "fine"], "label": [0, 1, 0, 1, 0]}
    )

    with pytest.raises(DataError, match=r"3 of 5 rows have a missing or blank text.*\[1, 2, 3\]"):
        load_text_dataset(source)


def test_missing_labels_are_counted(tmp_path):
    source = _write(tmp_path / "t.jsonl", {"text": ["a", "b", "c"], "label": ["x", None, "y"]})

    with pytest.raises(DataError, match=r"1 rows have no label"):
        load_text_dataset(source)


def test_missing_file_and_unsupported_type_raise(tmp_path):
    with pytest.raises(DataError, match=r"data.source=.*does not exist"):
        load_text_dataset(str(tmp_path / "nope.csv"))
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'.*\.parquet"):
        load_text_dataset(str(tmp_path / "data.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not one written by"):
        load_text_dataset(str(tmp_path / "folder"))


def test_in_memory_dataset_normalises_like_a_file():
    raw = datasets.Dataset.from_dict({"txt": ["x y", "z"], "cat": ["b", "a"]})

    data = as_labeled_data(raw, text_column="txt", label_column="cat")

    _assert_standard_shape(data)
    assert data.label_names == ["a", "b"]
    assert data.dataset["label"][:] == [1, 0]
