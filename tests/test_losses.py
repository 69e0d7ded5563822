"""KD loss: matches a hand computation, leaves unlabelled rows out, validates T and alpha."""

from __future__ import annotations

import math

import pytest
import torch

from feddistill.distill.losses import (
    KDLoss,
    cross_entropy,
    kd_objective,
    not_true_kd,
    present_classes,
    prior_offset,
    restrict_logits,
)


def _softmax(xs: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_matches_hand_computation() -> None:
    s = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
    t = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    y = [0, 2]
    temp = 2.0
    kd_rows, ce_rows = [], []
    for srow, trow, label in zip(s, t, y, strict=True):
        ps, pt = _softmax(srow, temp), _softmax(trow, temp)
        kd_rows.append(sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True)))
        p1 = _softmax(srow, 1.0)
        ce_rows.append(-math.log(p1[label]))
    parts = KDLoss(temp)(torch.tensor(s), torch.tensor(t), torch.tensor(y))
    assert parts.kd.item() == pytest.approx(sum(kd_rows) / 2, rel=1e-5)
    assert parts.ce.item() == pytest.approx(sum(ce_rows) / 2, rel=1e-5)
    mixed = kd_objective(parts, alpha=0.3, temperature=temp)
    expected = 0.3 * sum(ce_rows) / 2 + 0.7 * temp**2 * sum(kd_rows) / 2
    assert mixed.item() == pytest.approx(expected, rel=1e-5)


def test_identical_logits_give_zero_kd() -> None:
    x = torch.randn(4, 5)
    assert KDLoss(3.0)(x, x.clone()).kd.item() == pytest.approx(0.0, abs=1e-6)


def test_unlabelled_positions_are_left_out_of_the_cross_entropy() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    y = torch.randint(0, 3, (2, 4))
    y[0, 2:] = -100  # positions without a label (padding of a token-level task)
    y[1, 3] = -100
    parts = KDLoss(2.0)(s, t, y)
    keep = (y != -100).reshape(-1)
    direct = KDLoss(2.0)(s.reshape(-1, 3)[keep], t.reshape(-1, 3)[keep], y.reshape(-1)[keep])
    assert parts.ce.item() == pytest.approx(direct.ce.item(), rel=1e-6)
    # garbage logits at an unlabelled position do not move the cross-entropy
    s2 = s.clone()
    s2[0, 3] = 1e4
    assert KDLoss(2.0)(s2, t, y).ce.item() == pytest.approx(parts.ce.item(), rel=1e-6)


def test_a_batch_without_labels_has_zero_cross_entropy_and_a_finite_gradient() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    ce = cross_entropy(logits, torch.full((3,), -100))
    assert ce.item() == 0.0  # masked before the mean: not 0/0
    ce.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_cross_entropy_equals_torch_mean_bit_for_bit() -> None:
    """The masked mean is the same number as ``F.cross_entropy``'s own mean when every row
    has a label, so moving the mask before the reduction changed no result."""
    gen = torch.Generator().manual_seed(3)
    for n, c in ((1, 2), (8, 4), (129, 150)):
        logits = torch.randn(n, c, generator=gen) * 3
        labels = torch.randint(0, c, (n,), generator=gen)
        assert torch.equal(
            cross_entropy(logits, labels), torch.nn.functional.cross_entropy(logits, labels)
        )


def test_half_precision_logits_use_float32_softmax() -> None:
    s = torch.tensor([[30.0, -30.0]], dtype=torch.bfloat16)
    t = torch.tensor([[-30.0, 30.0]], dtype=torch.bfloat16)
    kd = KDLoss(1.0)(s, t).kd
    assert kd.dtype == torch.float32 and torch.isfinite(kd)


def test_gradient_reaches_student_only() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    kd_objective(KDLoss(2.0)(s, t, torch.tensor([0, 1, 2])), 0.5, 2.0).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_rejects_bad_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature)


def test_rejects_bad_alpha_and_shape_mismatch() -> None:
    parts = KDLoss(2.0)(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="alpha"):
        kd_objective(parts, 1.5, 2.0)
    with pytest.raises(ValueError, match="same label set"):
        KDLoss(2.0)(torch.zeros(1, 2), torch.zeros(1, 3))


def test_prior_offset_is_tau_times_smoothed_log_prior() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, 2])  # class 3 absent
    offset = prior_offset(labels, num_classes=4, tau=0.5)
    expected = 0.5 * torch.log(torch.tensor([4.0, 2.0, 3.0, 1.0]) / 10.0)
    torch.testing.assert_close(offset, expected)
    assert int(offset.argmin()) == 3  # the absent class gets the most negative offset
    assert torch.equal(prior_offset(labels, 4, 0.0), torch.zeros(4))
    with pytest.raises(ValueError, match="tau"):
        prior_offset(labels, 4, -1.0)


def test_restricted_softmax_drops_absent_classes_from_both_parts() -> None:
    labels = torch.tensor([0, 2, 2])  # classes 1 and 3 absent
    present = present_classes(labels, num_classes=4)
    assert present.tolist() == [True, False, True, False]
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4)
    parts = KDLoss(2.0)(
        restrict_logits(student, present), restrict_logits(teacher, present), labels
    )
    # Same numbers as a two-class problem over the present columns only.
    sub = KDLoss(2.0)(student[:, [0, 2]], teacher[:, [0, 2]], torch.tensor([0, 1, 1]))
    torch.testing.assert_close(parts.ce, sub.ce)
    torch.testing.assert_close(parts.kd, sub.kd)
    (parts.ce + parts.kd).backward()
    assert student.grad is not None
    assert torch.all(student.grad[:, [1, 3]] == 0)  # absent classes are not pushed down
    assert torch.all(student.grad[:, [0, 2]] != 0)


def test_not_true_kd_ignores_the_true_class() -> None:
    labels = torch.tensor([0, 2])
    glob = torch.tensor([[5.0, 1.0, 0.0], [0.3, -1.0, 4.0]])
    # Only the true class differs from the global model: nothing to distill.
    student = glob.clone()
    student[0, 0], student[1, 2] = -3.0, 9.0
    assert float(not_true_kd(student, glob, labels, 2.0)) == pytest.approx(0.0, abs=1e-6)
    # By hand: row 0 compares classes {1, 2}, row 1 classes {0, 1}, at T = 2, times T^2.
    student = torch.tensor([[0.0, 0.0, 2.0], [1.0, 1.0, 0.0]], requires_grad=True)
    loss = not_true_kd(student, glob, labels, 2.0)

    def kl(g: list[float], s: list[float]) -> torch.Tensor:
        pg = torch.softmax(torch.tensor(g) / 2, 0)
        ps = torch.softmax(torch.tensor(s) / 2, 0)
        return (pg * (pg.log() - ps.log())).sum()

    expected = 4.0 * (kl([1.0, 0.0], [0.0, 2.0]) + kl([0.3, -1.0], [1.0, 1.0])) / 2
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert student.grad is not None
    assert student.grad[0, 0] == 0 and student.grad[1, 2] == 0  # the label is left to CE
    with pytest.raises(ValueError, match="temperature"):
        not_true_kd(student, glob, labels, 0.0)
