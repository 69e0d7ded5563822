"""Tests for the word-level tokenizer built from training texts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from feddistill.data import SPECIAL_TOKENS, DataError, build_word_tokenizer, make_corpus

TEXTS = [
    "The striker scored, again!",
    "The market fell; investors worried.",
    "the market rose",
]


def test_special_tokens_have_fixed_ids_and_are_set_on_the_tokenizer():
    tokenizer = build_word_tokenizer(TEXTS)

    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.cls_token) == (
        "[PAD]",
        "[UNK]",
        "[CLS]",
    )
    assert (tokenizer.sep_token, tokenizer.mask_token) == ("[SEP]", "[MASK]")
    assert tokenizer.pad_token_id == 0


def test_encoding_lowercases_splits_punctuation_and_wraps_in_cls_sep():
    tokenizer = build_word_tokenizer(TEXTS)

    ids = tokenizer("THE Market fell, unseen!")["input_ids"]

    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["[CLS]", "the", "market", "fell", ",", "[UNK]", "!", "[SEP]"]


def test_vocabulary_is_frequency_ranked_with_alphabetical_ties_and_capped():
    # "the" (3) and "market" (2) first, then count-1 words alphabetically.
    tokenizer = build_word_tokenizer(TEXTS, max_vocab=len(SPECIAL_TOKENS) + 4)

    vocab = tokenizer.get_vocab()
    ranked = sorted(vocab, key=vocab.__getitem__)[len(SPECIAL_TOKENS) :]
    assert ranked == ["the", "market", "!", ","]
    assert len(tokenizer) == len(SPECIAL_TOKENS) + 4


def test_same_texts_give_same_ids_in_any_order():
    texts, _ = make_corpus(300, seed=0)

    first = build_word_tokenizer(texts)
    second = build_word_tokenizer(reversed(texts))  # any iterable, any order

    assert first.get_vocab() == second.get_vocab()


def test_padding_truncation_and_attention_mask():
    tokenizer = build_word_tokenizer(TEXTS, model_max_length=5)

    batch = tokenizer(
        ["the market", "the market fell investors worried"], padding=True, truncation=True
    )

    # Ids: the=5, market=6 (most frequent), then count-1 words alphabetically: fell=12.
    assert batch["input_ids"] == [[2, 5, 6, 3, 0], [2, 5, 6, 12, 3]]
    assert batch["attention_mask"] == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_save_and_reload_offline_round_trip(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts, _ = make_corpus(200, seed=0)
    tokenizer = build_word_tokenizer(texts, model_max_length=32)

    # Execute
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)

    # Assert
    sample = [*texts[:5], "Totally unseen words, here."]
    kwargs = {"padding": True, "truncation": True}
    assert reloaded(sample, **kwargs) == tokenizer(sample, **kwargs)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.model_max_length == 32
    assert reloaded.pad_token_id == 0 and reloaded.mask_token == "[MASK]"


def test_output_feeds_a_bert_model():
    texts, _ = make_corpus(50, seed=0)
    tokenizer = build_word_tokenizer(texts, model_max_length=40)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        num_labels=4,
    )
    model = BertForSequenceClassification(config).eval()

    batch = tokenizer(texts[:3], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits

    assert logits.shape == (3, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_vocab": 5}, "max_vocab must be greater than 5"), ({"model_max_length": 2}, "at least")],
)
def test_invalid_arguments_raise_data_error(kwargs, match):
    with pytest.raises(DataError, match=match):
        build_word_tokenizer(TEXTS, **kwargs)
