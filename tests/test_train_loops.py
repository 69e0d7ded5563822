"""Inference batching and thread scoping in the training loops."""

from __future__ import annotations

import torch

from feddistill.distill.train import encode_texts, predict_logits, torch_threads
from feddistill.models.build import Labels, build_teacher, builtin_tokenizer


def test_length_sorted_batches_return_rows_in_input_order() -> None:
    """Each row's logits match a batch-of-one forward pass, whatever its length and position."""
    tok = builtin_tokenizer(24)
    model = build_teacher("builtin:tiny", Labels(("a", "b", "c")), tok, seed=0).eval()
    texts = [" ".join(["word"] * n) for n in (9, 1, 17, 3, 3, 12, 5, 20, 2)]
    data = encode_texts(tok, texts, [0] * len(texts), max_length=24)
    logits = predict_logits(model, data, batch_size=4, device=torch.device("cpu"))
    assert logits.shape == (len(texts), 3)
    for i, text in enumerate(texts):
        alone = encode_texts(tok, [text], [0], max_length=24)
        one = predict_logits(model, alone, batch_size=1, device=torch.device("cpu"))
        torch.testing.assert_close(logits[i], one[0], rtol=1e-4, atol=1e-5)


def test_torch_threads_restores_the_previous_count() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    try:
        with torch_threads(1):
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == before
