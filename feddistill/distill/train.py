"""Training loops: fine-tune, distill, predict, evaluate. No Flower objects, no file I/O.

Lifecycle as in torchtune's KD recipe: set up (device, dtype chosen once by the caller), train,
evaluate; the teacher is in ``eval()`` whenever it teaches, and its logits can be precomputed once
because a frozen teacher's outputs do not change between rounds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from feddistill.distill.losses import (
    KDLoss,
    kd_objective,
    not_true_kd,
    present_classes,
    prior_offset,
    restrict_logits,
)


@dataclass
class Encoded:
    """Tokenized texts: ``input_ids``/``attention_mask`` are ``[N, L]`` (right-padded)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[int],
    max_length: int,
) -> Encoded:
    if len(texts) == 0:
        z = torch.zeros((0, 1), dtype=torch.long)
        return Encoded(z, z.clone(), torch.zeros(0, dtype=torch.long))
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        padding="longest",
        return_tensors="pt",
    )
    return Encoded(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        labels=torch.as_tensor(list(labels), dtype=torch.long),
    )


def pick_device(requested: str) -> torch.device:
    """``auto`` takes CUDA when this process was given a GPU, else CPU (never an error)."""
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype is torch.float16:
        return contextlib.nullcontext()  # fp16 autocast on CPU is slow and lossy: skip it
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled training batches; inference batches by length in :func:`predict_logits`."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _slice(data: Encoded, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    mask = data.attention_mask[idx]
    width = max(int(mask.sum(dim=1).max()), 1)  # trim shared padding: big speed-up on CPU
    return {
        "input_ids": data.input_ids[idx, :width].to(device),
        "attention_mask": mask[:, :width].to(device),
    }


@dataclass
class TrainStats:
    loss: float
    accuracy: float
    examples: int


def fine_tune(
    model: PreTrainedModel,
    data: Encoded,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
    weight_decay: float = 0.0,
) -> TrainStats:
    """Plain supervised fine-tuning (the local teacher, or a CE-only baseline)."""
    return distill(
        model,
        data,
        None,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        alpha=1.0,
        temperature=1.0,
        seed=seed,
        device=device,
        precision=precision,
        weight_decay=weight_decay,
    )


def distill(
    student: PreTrainedModel,
    data: Encoded,
    teacher_logits: torch.Tensor | None,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    alpha: float,
    temperature: float,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
    weight_decay: float = 0.0,
    teacher: PreTrainedModel | None = None,
    teacher_data: Encoded | None = None,
    teacher_lr: float = 0.0,
    proximal_mu: float = 0.0,
    logit_adjust: float = 0.0,
    local_classes_only: bool = False,
    not_true_weight: float = 0.0,
) -> TrainStats:
    """Train ``student`` on ``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)``.

    ``teacher_logits`` (``[N, C]``, precomputed in eval mode) is used when given. Mutual
    distillation (FedKD, Wu et al. 2022) passes ``teacher`` instead: the teacher is then trained
    in the same loop on ``alpha * CE + (1 - alpha) * T^2 * KL(student || teacher)``.
    ``proximal_mu`` adds FedProx's ``mu/2 * ||w - w_received||^2`` (Li et al. 2020, eq. 2).
    ``logit_adjust`` (tau) trains the student's logits plus ``tau * log p(y)`` of ``data``'s
    labels (see :func:`~feddistill.distill.losses.prior_offset`); 0 turns it off.
    ``local_classes_only`` restricts both softmaxes to the classes present in ``data`` (see
    :func:`~feddistill.distill.losses.restrict_logits`).
    ``not_true_weight`` (beta) adds ``beta * T^2 * KL`` from the student as received, over the
    not-true classes (FedNTD; :func:`~feddistill.distill.losses.not_true_kd`); 0 turns it off.
    """
    if len(data) == 0:
        return TrainStats(loss=0.0, accuracy=0.0, examples=0)
    loss_fn = KDLoss(temperature)
    global_logits = None
    if not_true_weight > 0:  # the received model's view, fixed for the whole local round
        global_logits = predict_logits(student, data, device=device, precision=precision)
    student.to(device).train()
    params = [p for p in student.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    t_opt = None
    if teacher is not None:
        teacher.to(device).train()
        t_opt = torch.optim.AdamW(
            [p for p in teacher.parameters() if p.requires_grad], lr=teacher_lr
        )
    offset = None
    if logit_adjust > 0:
        offset = prior_offset(data.labels, student.config.num_labels, logit_adjust).to(device)
    present = None
    if local_classes_only:
        present = present_classes(data.labels, student.config.num_labels).to(device)
        if bool(present.all()):
            present = None  # every class occurs: the plain softmax
    gen = torch.Generator().manual_seed(seed)
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        for idx in _batches(len(data), batch_size, gen):
            batch = _slice(data, idx, device)
            labels = data.labels[idx].to(device)
            with autocast(device, precision):
                s_logits = student(**batch).logits
            if teacher is not None and t_opt is not None:
                t_batch = _slice(teacher_data or data, idx, device)
                with autocast(device, precision):
                    t_logits = teacher(**t_batch).logits
                t_loss = kd_objective(
                    loss_fn(t_logits, s_logits.detach(), labels), alpha, temperature
                )
                t_opt.zero_grad(set_to_none=True)
                t_loss.backward()
                t_opt.step()
                t_logits = t_logits.detach()
            elif teacher_logits is not None:
                t_logits = teacher_logits[idx].to(device)
            else:
                t_logits = s_logits.detach()  # alpha == 1: KD part is zero anyway
            fitted = s_logits if offset is None else s_logits + offset
            if present is not None:
                fitted = restrict_logits(fitted, present)
                t_logits = restrict_logits(t_logits, present)
            loss = kd_objective(loss_fn(fitted, t_logits, labels), alpha, temperature)
            if global_logits is not None:
                ntd = not_true_kd(s_logits, global_logits[idx].to(device), labels, temperature)
                loss = loss + not_true_weight * ntd
            if anchor:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * proximal_mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((s_logits.detach().argmax(-1) == labels).sum())
            seen += len(idx)
    if teacher is not None:
        teacher.eval()
    student.eval()
    return TrainStats(
        loss=total_loss / max(seen, 1), accuracy=correct / max(seen, 1), examples=len(data)
    )


@torch.inference_mode()
def predict_logits(
    model: PreTrainedModel,
    data: Encoded,
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
            out.append(model(**_slice(data, idx, device)).logits.float().cpu())
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


@dataclass
class EvalStats:
    """``class_correct[c]`` / ``class_rows[c]``: right predictions and rows of true class ``c``
    (per-class accuracy of the same pass; empty for no rows)."""

    loss: float
    accuracy: float
    examples: int
    class_correct: list[int] = field(default_factory=list)
    class_rows: list[int] = field(default_factory=list)


def evaluate(
    model: PreTrainedModel,
    data: Encoded,
    *,
    batch_size: int = 128,
    device: torch.device,
    precision: str = "fp32",
) -> EvalStats:
    if len(data) == 0:
        return EvalStats(loss=float("nan"), accuracy=float("nan"), examples=0)
    logits = predict_logits(model, data, batch_size=batch_size, device=device, precision=precision)
    loss = float(F.cross_entropy(logits, data.labels))
    predictions = logits.argmax(-1)
    acc = float((predictions == data.labels).float().mean())
    correct, rows = class_counts(predictions, data.labels, logits.shape[1])
    return EvalStats(
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


def accuracy_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean()) if len(labels) else float("nan")
