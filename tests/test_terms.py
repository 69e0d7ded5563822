"""The training objective as terms: the recipe's config maps to parts, a new term is one class,
fp16 scales its loss, and a device the user asked for is there or the run stops."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from feddistill.distill.terms import (
    Distillation,
    FixedTeacher,
    LocalClasses,
    LogitAdjustment,
    NotTrueDistillation,
    Objective,
    Proximal,
    SelfTargets,
    Start,
    Step,
)
from feddistill.distill.train import (
    DeviceError,
    Loop,
    Tokenized,
    _autocast_dtype,
    distill,
    encode_texts,
    grad_scaler,
    pick_device,
)
from feddistill.models.build import Labels, build_teacher, builtin_tokenizer
from feddistill.recipe import objective
from tests.conftest import tiny_config

TEXTS = ["red apple pie", "green leaf tea", "red wine glass", "green grass field"] * 2


def _model_and_data() -> tuple[PreTrainedModel, Tokenized]:
    tok = builtin_tokenizer(24)
    model = build_teacher("builtin:tiny", Labels(("a", "b", "c")), tok, seed=0)
    return model, encode_texts(tok, TEXTS, [0, 1, 2, 1] * 2, max_length=24)


def test_the_config_names_each_part_of_the_objective(tmp_path: Path) -> None:
    _, data = _model_and_data()
    logits = torch.zeros(len(data), 4)
    plain = objective(
        tiny_config(tmp_path, **{"distill.local-classes-only": False}), None, logits, data
    )
    assert [type(t) for t in plain.terms] == [Distillation]
    assert plain.transforms == [] and isinstance(plain.teacher, FixedTeacher)

    cfg = tiny_config(tmp_path, **{"distill.logit-adjust": 1.0, "distill.not-true-weight": 0.5})
    full = objective(cfg, None, logits, data, proximal_mu=0.1)
    assert [type(t) for t in full.terms] == [Distillation, NotTrueDistillation, Proximal]
    assert [type(t) for t in full.transforms] == [LogitAdjustment, LocalClasses]
    # the local-only baseline leaves the term about the received global model out
    local = objective(cfg, None, logits, data, federated=False)
    assert [type(t) for t in local.terms] == [Distillation]
    assert isinstance(objective(cfg, None, None, data).teacher, SelfTargets)


@dataclass
class Spy:
    """A new term in a few lines: it adds nothing to the loss and records what it saw."""

    started: int = 0
    steps: int = 0

    def start(self, ctx: Start) -> None:
        self.started += 1
        assert not ctx.student.training  # parts see the model as received, before train()

    def __call__(self, step: Step) -> torch.Tensor:
        self.steps += 1
        assert step.fitted.shape == step.teacher_logits.shape == (len(step.idx), 3)
        return step.student_logits.sum() * 0.0


def test_a_new_term_is_one_class_and_the_loop_calls_it_each_step() -> None:
    model, data = _model_and_data()
    model.eval()
    spy = Spy()
    goal = Objective([Distillation(0.5, 2.0), spy], [LocalClasses()], SelfTargets())
    stats = distill(model, data, goal, Loop(2, 1e-3, 4, 0), device=torch.device("cpu"))
    assert spy.started == 1 and spy.steps == 2 * 2  # 8 rows, batches of 4, two epochs
    assert stats.examples == 8 and 0.0 <= stats.accuracy <= 1.0
    assert not model.training  # eval mode again afterwards


def test_a_strong_proximal_term_keeps_the_weights_near_the_received_ones() -> None:
    def moved(mu: float) -> float:
        model, data = _model_and_data()
        before = [p.detach().clone() for p in model.parameters()]
        terms = [Distillation(1.0, 1.0)] + ([Proximal(mu)] if mu else [])
        distill(model, data, Objective(terms), Loop(3, 1e-2, 4, 0), device=torch.device("cpu"))
        return sum(
            float(((p.detach() - b) ** 2).sum())
            for p, b in zip(model.parameters(), before, strict=True)
        )

    assert moved(100.0) < 0.5 * moved(0.0)


def test_loss_scaling_runs_only_where_fp16_autocast_runs() -> None:
    cpu = torch.device("cpu")
    for precision in ("fp32", "bf16", "fp16"):  # fp16 autocast is skipped on the CPU
        assert not grad_scaler(cpu, precision).is_enabled()
    assert _autocast_dtype(torch.device("cuda"), "fp16") is torch.float16  # scaled there
    assert _autocast_dtype(torch.device("cuda"), "bf16") is torch.bfloat16  # bf16: no scaler


def test_cuda_asked_for_without_cuda_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"train.device = 'cuda'.*'auto'"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"  # auto falls back, quietly
    assert pick_device("cpu").type == "cpu"


def test_simulation_with_cuda_clients_needs_gpus_for_them(tmp_path: Path) -> None:
    from feddistill.simulation.engine import simulate

    cfg = tiny_config(tmp_path, **{"train.device": "cuda"})
    with pytest.raises(ValueError, match=r"train.device = 'cuda'.*--gpus-per-client"):
        simulate(cfg, gpus_per_client=0.0)
