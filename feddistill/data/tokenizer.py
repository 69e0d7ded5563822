"""A word-level tokenizer built from the training texts, so no tokenizer is downloaded.

A word-level vocabulary suits the small from-scratch BERT models of this project: the embedded
corpus has a few hundred words, so sub-word merges would add nothing but noise, and building the
vocabulary is a pure count that is easy to make deterministic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from feddistill.data.errors import DataError

__all__ = ["SPECIAL_TOKENS", "build_word_tokenizer"]

# Fixed ids 0..4. [PAD] = 0 matches BertConfig's default pad_token_id.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_word_tokenizer(
    texts: Iterable[str],
    *,
    max_vocab: int = 4096,
    model_max_length: int = 128,
) -> PreTrainedTokenizerFast:
    """Build a BERT-style word-level tokenizer whose vocabulary is the words of ``texts``.

    Pipeline: lowercase → split on whitespace and punctuation → look up words (unknown → [UNK])
    → ``[CLS] $A [SEP]`` (pairs: ``[CLS] $A [SEP] $B [SEP]`` with type ids 0/1).

    The vocabulary is the special tokens (ids 0–4, see :data:`SPECIAL_TOKENS`) followed by the
    ``max_vocab - 5`` most frequent words, ties broken alphabetically. The counting is done
    here rather than by ``WordLevelTrainer`` so that the ids depend only on the texts: the same
    texts always give the same ids, whatever the order of equal counts inside the trainer.

    The result saves with ``save_pretrained(folder)`` and reloads offline with
    ``AutoTokenizer.from_pretrained(folder)``.

    Args:
        texts: training texts (iterated once).
        max_vocab: vocabulary size cap, special tokens included; must exceed 5.
        model_max_length: the length ``truncation=True`` cuts to (should not exceed the
            model's ``max_position_embeddings``).
    """
    if max_vocab <= len(SPECIAL_TOKENS):
        raise DataError(
            f"max_vocab must be greater than {len(SPECIAL_TOKENS)} (the number of special "
            f"tokens), got {max_vocab}."
        )
    if model_max_length < 3:
        raise DataError(
            f"model_max_length must be at least 3 ([CLS], one token, [SEP]), "
            f"got {model_max_length}."
        )

    backend = Tokenizer(WordLevel(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS)}))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )

    # Count words exactly as the tokenizer will see them at encoding time.
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = backend.normalizer.normalize_str(text)
        counts.update(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized))
    for token in SPECIAL_TOKENS:
        counts.pop(token.lower(), None)  # "[pad]" etc. cannot occur (brackets split), but be safe
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    words = [word for word, _ in ranked[: max_vocab - len(SPECIAL_TOKENS)]]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}

    backend.model = WordLevel(vocab=vocab, unk_token="[UNK]")
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="right",
        truncation_side="right",
    )
