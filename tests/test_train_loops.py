"""Inference batching and thread scoping in the training loops."""

from __future__ import annotations

import torch

from feddistill.distill.losses import not_true_kd
from feddistill.distill.terms import (
    Distillation,
    FixedTeacher,
    LocalClasses,
    NotTrueDistillation,
    Objective,
    Term,
    Transform,
)
from feddistill.distill.train import (
    Loop,
    Tokenized,
    distill,
    encode_texts,
    param_groups,
    predict_logits,
    torch_threads,
)
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


TEXTS = ["red apple pie", "green leaf tea", "red wine glass", "green grass field"] * 2


def _two_class_run(
    teacher_logits: torch.Tensor,
    epochs: int,
    *,
    local_classes_only: bool = False,
    not_true_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, Tokenized]:
    """Distill a fresh 3-class tiny model on data holding only classes 0 and 1.

    Returns the head weights before and after, and the data.
    """
    tok = builtin_tokenizer(24)
    model = build_teacher("builtin:tiny", Labels(("a", "b", "c")), tok, seed=0)
    data = encode_texts(tok, TEXTS, [0, 1, 0, 1] * 2, max_length=24)  # class 2 never occurs
    cpu = torch.device("cpu")
    before = predict_logits(model, data, device=cpu), model.classifier.weight.detach().clone()
    terms: list[Term] = [Distillation(alpha=0.5, temperature=2.0)]
    if not_true_weight:
        terms.append(NotTrueDistillation(not_true_weight, temperature=2.0))
    transforms: list[Transform] = [LocalClasses()] if local_classes_only else []
    goal = Objective(terms, transforms, FixedTeacher(teacher_logits))
    distill(model, data, goal, Loop(epochs, lr=1e-2, batch_size=4, seed=0), device=cpu)
    after = predict_logits(model, data, device=cpu), model.classifier.weight.detach()
    return before, after, data


def _head_after_distill(local_classes_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    teacher_logits = torch.randn(len(TEXTS), 3, generator=torch.Generator().manual_seed(1))
    before, after, _ = _two_class_run(teacher_logits, 1, local_classes_only=local_classes_only)
    return before[1], after[1]


def test_local_classes_only_leaves_the_absent_class_head_untouched() -> None:
    before, after = _head_after_distill(local_classes_only=True)
    assert torch.equal(after[2], before[2])
    assert not torch.equal(after[:2], before[:2])
    before, after = _head_after_distill(local_classes_only=False)
    assert not torch.equal(after[2], before[2])  # the plain softmax does push it


def test_not_true_weight_keeps_the_received_view_of_the_other_classes() -> None:
    """With a large beta, the student's not-true distribution stays near the received model's."""
    teacher_logits = torch.tensor([[4.0, -4.0, -4.0], [-4.0, 4.0, -4.0]] * 4)

    def drift(beta: float) -> float:
        before, after, data = _two_class_run(teacher_logits, 3, not_true_weight=beta)
        return float(not_true_kd(after[0], before[0], data.labels, 2.0))

    assert drift(10.0) < 0.5 * drift(0.0)


def test_head_learns_at_its_own_rate_and_the_backbone_at_the_loop_rate() -> None:
    # Prepare: a teacher whose head (the classifier outside model.base_model) is what no
    # checkpoint holds
    tok = builtin_tokenizer(24)
    model = build_teacher("builtin:tiny", Labels(("a", "b", "c")), tok, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    # Execute
    same = param_groups(model, params, Loop(1, 1e-4, 8, 0))
    split = param_groups(model, params, Loop(1, 1e-4, 8, 0, head_lr=3e-3))
    # Assert: one group at the loop's lr unless a head lr is given; then the classifier alone
    assert len(same) == 1 and "lr" not in same[0]
    body, head = split
    head_ids = {id(p) for p in model.classifier.parameters()}
    assert {id(p) for p in head["params"]} == head_ids and head["lr"] == 3e-3
    assert not head_ids & {id(p) for p in body["params"]} and "lr" not in body
    assert len(body["params"]) + len(head["params"]) == len(params)
