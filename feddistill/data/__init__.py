"""Data for feddistill: the embedded corpus, loading, tokenisation and client partitioning.

Everything here is pure with respect to the run: functions take arguments and return datasets,
tokenizers or index arrays, and raise :class:`DataError` (a ``ValueError``) naming the config
option when a setting cannot work.
"""

from feddistill.data.corpus import CORPUS_LABELS, make_corpus, make_train_test
from feddistill.data.errors import DataError
from feddistill.data.partition import (
    PARTITION_SCHEMES,
    label_histogram,
    partition_indices,
    train_val_split,
)
from feddistill.data.sources import (
    SUPPORTED_FILE_TYPES,
    LabeledData,
    as_labeled_data,
    load_text_dataset,
)
from feddistill.data.tokenizer import SPECIAL_TOKENS, build_word_tokenizer

__all__ = [
    "CORPUS_LABELS",
    "PARTITION_SCHEMES",
    "SPECIAL_TOKENS",
    "SUPPORTED_FILE_TYPES",
    "DataError",
    "LabeledData",
    "as_labeled_data",
    "build_word_tokenizer",
    "label_histogram",
    "load_text_dataset",
    "make_corpus",
    "make_train_test",
    "partition_indices",
    "train_val_split",
]
