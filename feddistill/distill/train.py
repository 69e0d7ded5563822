"""Training loops: fine-tune, distill, predict, evaluate. No Flower objects, no file I/O.

Lifecycle as in torchtune's KD recipe: set up (device, dtype chosen once by the caller), train,
evaluate; the teacher is in ``eval()`` whenever it teaches, and its logits can be precomputed once
because a frozen teacher's outputs do not change between rounds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from feddistill.distill.terms import CrossEntropy, Objective, Start, Step


@dataclass
class Tokenized:
    """Tokenized texts: ``input_ids``/``attention_mask`` are ``[N, L]`` (right-padded)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def subset(data: Tokenized, idx: Sequence[int] | torch.Tensor) -> Tokenized:
    """The rows ``idx`` of ``data``."""
    i = torch.as_tensor(idx, dtype=torch.long)
    return Tokenized(data.input_ids[i], data.attention_mask[i], data.labels[i])


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[int],
    max_length: int,
) -> Tokenized:
    if len(texts) == 0:
        z = torch.zeros((0, 1), dtype=torch.long)
        return Tokenized(z, z.clone(), torch.zeros(0, dtype=torch.long))
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        padding="longest",
        return_tensors="pt",
    )
    return Tokenized(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        labels=torch.as_tensor(list(labels), dtype=torch.long),
    )


class DeviceError(RuntimeError):
    """``train.device`` asks for a device this process does not have."""


def pick_device(requested: str) -> torch.device:
    """``auto`` takes CUDA when this process was given a GPU, else CPU; ``cuda`` without a
    CUDA device is an error (a run the user asked to put on a GPU must not crawl on the CPU)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "train.device = 'cuda' but this process sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
            "use train.device = 'auto' to take a GPU where there is one, or 'cpu'"
        )
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type == "cpu":
        return None  # fp16 autocast on CPU is slow and lossy: skip it
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = _autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling where fp16 autocast runs (small fp16 gradients underflow to zero without
    it; bf16 has float32's range and needs none), a pass-through elsewhere, as nanoGPT's
    ``GradScaler(enabled=dtype == float16)``."""
    enabled = _autocast_dtype(device, precision) is torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled training batches; inference batches by length in :func:`predict_logits`."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def batch_inputs(
    data: Tokenized, idx: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    mask = data.attention_mask[idx]
    width = max(int(mask.sum(dim=1).max()), 1)  # trim shared padding: big speed-up on CPU
    return {
        "input_ids": data.input_ids[idx, :width].to(device),
        "attention_mask": mask[:, :width].to(device),
    }


@dataclass
class Stats:
    """A pass over ``examples`` rows: mean loss and accuracy (training: over every step of
    every epoch; evaluation: one pass). ``class_correct[c]`` / ``class_rows[c]``: right
    predictions and rows of true class ``c``, filled by :func:`evaluate` (per-class accuracy of
    the same pass; empty otherwise)."""

    loss: float
    accuracy: float
    examples: int
    class_correct: list[int] = field(default_factory=list)
    class_rows: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Loop:
    """How long and how fast to train: the optimizer (AdamW) and the batches."""

    epochs: int
    lr: float
    batch_size: int
    seed: int
    weight_decay: float = 0.0
    head_lr: float = 0.0  # the head's lr; 0: the lr


def param_groups(
    model: PreTrainedModel, params: list[torch.nn.Parameter], loop: Loop
) -> list[dict[str, Any]]:
    """AdamW's parameter groups: the head (every parameter outside the model's backbone,
    ``model.base_model``: the classifier a checkpoint does not hold) at ``loop.head_lr``, the
    rest at ``loop.lr``; one group when no head lr is set."""
    if loop.head_lr <= 0 or loop.head_lr == loop.lr:
        return [{"params": params}]
    backbone = {id(p) for p in model.base_model.parameters()}
    body = [p for p in params if id(p) in backbone]
    head = [p for p in params if id(p) not in backbone]
    groups: list[dict[str, Any]] = [{"params": body}] if body else []
    if head:
        groups.append({"params": head, "lr": loop.head_lr})
    return groups


def fine_tune(
    model: PreTrainedModel,
    data: Tokenized,
    loop: Loop,
    *,
    device: torch.device,
    precision: str = "fp32",
    after_epoch: Callable[[int], bool] | None = None,
) -> Stats:
    """Plain supervised fine-tuning (the local teacher, or a CE-only baseline)."""
    return distill(
        model,
        data,
        Objective([CrossEntropy()]),
        loop,
        device=device,
        precision=precision,
        after_epoch=after_epoch,
    )


def distill(
    student: PreTrainedModel,
    data: Tokenized,
    objective: Objective,
    loop: Loop,
    *,
    device: torch.device,
    precision: str = "fp32",
    after_epoch: Callable[[int], bool] | None = None,
) -> Stats:
    """Train ``student`` on ``data`` to minimize ``objective`` (:mod:`feddistill.distill.terms`).

    ``after_epoch(epochs done)`` is called after each epoch (it may evaluate the model) and
    stops the training by returning True: early stopping keeps the optimizer's state, which
    restarting ``distill`` for each epoch would lose.

    Every part of the objective is started once on the student as received, then each batch
    goes: student logits, teacher logits (a mutual teacher takes its own step here), the
    transforms, the sum of the terms, one AdamW step (with loss scaling under fp16). The loss
    and accuracy sums stay on the device (float64, so no precision is lost against a Python
    float), read once at the end instead of one host sync per step.
    """
    if len(data) == 0:
        return Stats(loss=0.0, accuracy=0.0, examples=0)
    params = [p for p in student.parameters() if p.requires_grad]
    ctx = Start(student, params, data, device, precision)
    for part in objective.parts():
        part.start(ctx)  # before train(): a part may look at the received model in eval mode
    student.to(device).train()
    opt = torch.optim.AdamW(
        param_groups(student, params, loop), lr=loop.lr, weight_decay=loop.weight_decay
    )
    scaler = grad_scaler(device, precision)
    gen = torch.Generator().manual_seed(loop.seed)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for epoch in range(loop.epochs):
        for idx in _batches(len(data), loop.batch_size, gen):
            labels = data.labels[idx].to(device)
            with autocast(device, precision):
                s_logits = student(**batch_inputs(data, idx, device)).logits
            step = Step(idx, labels, s_logits, s_logits, s_logits, params)
            step.teacher_logits = objective.teacher.logits(idx, step)
            for transform in objective.transforms:
                step.fitted = transform(step.fitted)
                if transform.teacher:
                    step.teacher_logits = transform(step.teacher_logits)
            loss = objective.terms[0](step)
            for term in objective.terms[1:]:
                loss = loss + term(step)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total_loss += loss.detach().double() * len(idx)
            correct += (s_logits.detach().argmax(-1) == labels).sum()
            seen += len(idx)
        if after_epoch is not None:
            if after_epoch(epoch + 1):
                break
            student.train()
    objective.teacher.finish()
    student.eval()
    return Stats(
        loss=float(total_loss) / max(seen, 1),
        accuracy=int(correct) / max(seen, 1),
        examples=len(data),
    )


@torch.inference_mode()
def predict_logits(
    model: PreTrainedModel,
    data: Tokenized,
    *,
    batch_size: int = 128,
    device: torch.device,
    precision: str = "fp32",
) -> torch.Tensor:
    """Logits ``[N, C]`` in float32 on CPU, model in eval mode."""
    model.to(device).eval()
    if len(data) == 0:
        return torch.zeros((0, model.config.num_labels))
    # Batches of similar length waste less compute on padding (AG News at max-length 64: about
    # a fifth of the tokens); the rows go back to their input order afterwards.
    order = torch.argsort(data.attention_mask.sum(dim=1), stable=True)
    out = []
    for start in range(0, len(data), batch_size):
        idx = order[start : start + batch_size]
        with autocast(device, precision):
            out.append(model(**batch_inputs(data, idx, device)).logits.float().cpu())
    logits = torch.empty((len(data), out[0].shape[1]), dtype=torch.float32)
    logits[order] = torch.cat(out)
    return logits


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def evaluate(
    model: PreTrainedModel,
    data: Tokenized,
    *,
    batch_size: int = 128,
    device: torch.device,
    precision: str = "fp32",
) -> Stats:
    if len(data) == 0:
        return Stats(loss=float("nan"), accuracy=float("nan"), examples=0)
    logits = predict_logits(model, data, batch_size=batch_size, device=device, precision=precision)
    loss = float(F.cross_entropy(logits, data.labels))
    predictions = logits.argmax(-1)
    acc = float((predictions == data.labels).float().mean())
    correct, rows = class_counts(predictions, data.labels, logits.shape[1])
    return Stats(
        loss=loss, accuracy=acc, examples=len(data), class_correct=correct, class_rows=rows
    )


def class_counts(
    predictions: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[list[int], list[int]]:
    """Right predictions and rows per true class (``[N]`` class ids each; lists of length
    ``num_classes``), so per-class accuracy costs no second pass over the data."""
    rows = torch.bincount(labels, minlength=num_classes)
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes)
    return correct.tolist(), rows.tolist()
