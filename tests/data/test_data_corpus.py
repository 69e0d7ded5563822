"""Tests for the embedded synthetic corpus: determinism, balance, noise, difficulty."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from feddistill.data import CORPUS_LABELS, DataError, make_corpus, make_train_test
from feddistill.data import corpus as corpus_module


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def test_same_seed_same_corpus_and_different_seed_differs():
    # Prepare / Execute
    first = make_corpus(300, seed=3)
    second = make_corpus(300, seed=3)
    other = make_corpus(300, seed=4)

    # Assert
    assert first == second
    assert first[0] != other[0]


def test_corpus_does_not_depend_on_python_hash_seed():
    # A fresh interpreter with another hash seed must generate the same corpus.
    code = (
        "import json; from feddistill.data.corpus import make_corpus; "
        "print(json.dumps(make_corpus(40, num_classes=6, seed=11)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout

    assert json.loads(out) == [list(part) for part in make_corpus(40, num_classes=6, seed=11)]


def test_sentences_are_8_to_30_words_and_news_like():
    texts, _ = make_corpus(2000, num_classes=8, seed=1)

    lengths = [len(text.split()) for text in texts]
    assert min(lengths) >= 8
    assert max(lengths) <= 30
    assert all(not text[0].islower() and text.endswith(".") for text in texts)


@pytest.mark.parametrize("num_classes", [2, 4, len(CORPUS_LABELS)])
def test_classes_are_balanced_without_noise(num_classes):
    _, labels = make_corpus(1001, num_classes=num_classes, label_noise=0.0, seed=0)

    counts = Counter(labels)
    assert sorted(counts) == list(range(num_classes))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_label_noise_flips_exactly_the_requested_fraction_to_other_classes():
    # Prepare: noise is applied after the texts are drawn, so texts are identical.
    clean_texts, clean = make_corpus(1000, label_noise=0.0, seed=5)
    noisy_texts, noisy = make_corpus(1000, label_noise=0.2, seed=5)

    # Execute
    flipped = [i for i, (a, b) in enumerate(zip(clean, noisy, strict=True)) if a != b]

    # Assert: exactly 20% differ, and a flipped label is always a *different* class.
    assert clean_texts == noisy_texts
    assert len(flipped) == 200
    assert set(noisy) == {0, 1, 2, 3}


def test_vocabulary_stays_small():
    texts, _ = make_corpus(5000, num_classes=len(CORPUS_LABELS), seed=0)

    vocabulary = {word for text in texts for word in _words(text)}
    assert len(vocabulary) < 2000


def test_topic_words_belong_to_exactly_one_class_and_no_other_pool():
    topic = [word for words in corpus_module._TOPIC_WORDS for word in words]
    ambiguous = [word for word, _ in corpus_module._AMBIGUOUS_WORDS]
    shared = set(corpus_module._NOUNS + corpus_module._VERBS + corpus_module._ADJECTIVES)

    assert len(corpus_module._TOPIC_WORDS) == len(CORPUS_LABELS)
    assert len(topic) == len(set(topic))
    assert len(ambiguous) == len(set(ambiguous))
    assert not (set(topic) & set(ambiguous))
    assert not ((set(topic) | set(ambiguous)) & shared)
    # Every ambiguous word is shared by at least two classes, every class has some.
    weights = np.array([w for _, w in corpus_module._AMBIGUOUS_WORDS])
    assert ((weights > 0).sum(axis=1) >= 2).all()
    assert ((weights > 0).sum(axis=0) >= 5).all()


def test_make_train_test_returns_datasets_with_clean_test_labels():
    # Execute
    train, test, names = make_train_test(400, 101, num_classes=4, label_noise=0.25, seed=2)

    # Assert: columns and dtypes.
    assert names == list(CORPUS_LABELS[:4])
    for split in (train, test):
        assert split.column_names == ["text", "label"]
        assert split.features["text"].dtype == "string"
        assert split.features["label"].dtype == "int64"
    # The training split is make_corpus with the same arguments.
    texts, labels = make_corpus(400, num_classes=4, label_noise=0.25, seed=2)
    assert train["text"][:] == texts
    assert train["label"][:] == labels
    # The test split comes from another stream and has no noise, so it is exactly balanced.
    assert not set(test["text"][:]) & set(texts)
    counts = Counter(test["label"][:])
    assert max(counts.values()) - min(counts.values()) <= 1


def test_corpus_is_learnable_but_not_trivial():
    """A bag-of-words Naive Bayes (fast, deterministic) lands well above chance, below 95%.

    The calibration figure in the corpus docstring (logistic regression, 4,000 examples) is
    about 80%; Naive Bayes matches the generator's word-independence and scores a little higher.
    """
    # Prepare
    train, test, _ = make_train_test(2000, 500, num_classes=4, label_noise=0.1, seed=0)
    vocab = {w: i for i, w in enumerate(sorted({w for t in train["text"] for w in _words(t)}))}

    def counts(texts: list[str]) -> np.ndarray:
        matrix = np.zeros((len(texts), len(vocab)))
        for row, text in enumerate(texts):
            for word in _words(text):
                if word in vocab:
                    matrix[row, vocab[word]] += 1
        return matrix

    x_train, x_test = counts(train["text"][:]), counts(test["text"][:])
    y_train, y_test = np.array(train["label"][:]), np.array(test["label"][:])

    # Execute: multinomial Naive Bayes with add-one smoothing.
    word_counts = np.stack([x_train[y_train == c].sum(axis=0) for c in range(4)]) + 1.0
    log_likelihood = np.log(word_counts / word_counts.sum(axis=1, keepdims=True))
    log_prior = np.log(np.bincount(y_train, minlength=4) / y_train.size)
    accuracy = float(((x_test @ log_likelihood.T + log_prior).argmax(axis=1) == y_test).mean())

    # Assert
    assert 0.6 < accuracy < 0.95


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_examples": -1}, "num_examples"),
        ({"num_examples": 10, "num_classes": 1}, "num_classes must be between 2 and 8"),
        ({"num_examples": 10, "num_classes": 9}, "num_classes must be between 2 and 8"),
        ({"num_examples": 10, "label_noise": 1.0}, r"label_noise must be in \[0, 1\)"),
        ({"num_examples": 10, "label_noise": float("nan")}, "label_noise"),
        ({"num_examples": 10, "seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_raise_data_error(kwargs, match):
    with pytest.raises(DataError, match=match):
        make_corpus(**kwargs)
