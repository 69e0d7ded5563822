"""Student derivation, exchanged parameters, deterministic initial models, update/apply parity."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from feddistill.config import ConfigError, parse_config
from feddistill.models.build import (
    FEED_FORWARD,
    Labels,
    ModelError,
    build_student,
    build_teacher,
    builtin_tokenizer,
    exchanged_names,
    get_arrays,
    select_layers,
    set_arrays,
)
from feddistill.run_inputs import initial_models

LABELS = Labels(("a", "b", "c"))


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer(32)


def test_select_layers() -> None:
    assert select_layers(6, 2, "first") == [0, 1]
    assert select_layers(6, 2, "every-other") == [0, 3]
    assert select_layers(6, 3, "every-other") == [0, 2, 4]
    assert select_layers(4, 4, "every-other") == [0, 1, 2, 3]
    with pytest.raises(ModelError, match="student-layers = 7 exceeds the teacher's 6"):
        select_layers(6, 7, "first")


@pytest.mark.parametrize("how", ["first", "every-other"])
def test_derived_student_copies_teacher_layers(tokenizer, how: str) -> None:
    cfg = parse_config(
        {"model.teacher": "builtin:tiny", "model.student-layers": 2, "model.layer-selection": how}
    )
    teacher = build_teacher("builtin:tiny", LABELS, tokenizer, seed=0)
    student = build_student(cfg.model, teacher, LABELS, 0, tokenizer)
    assert student.config.num_hidden_layers == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for s_idx, t_idx in enumerate(select_layers(4, 2, how)):
        name = "attention.self.query.weight"
        torch.testing.assert_close(
            s_state[f"bert.encoder.layer.{s_idx}.{name}"],
            t_state[f"bert.encoder.layer.{t_idx}.{name}"],
        )
    torch.testing.assert_close(
        s_state["bert.embeddings.word_embeddings.weight"],
        t_state["bert.embeddings.word_embeddings.weight"],
    )
    assert student.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_frozen_embeddings_are_not_exchanged(tokenizer) -> None:
    teacher = build_teacher("builtin:tiny", LABELS, tokenizer, seed=0)
    frozen = build_student(
        parse_config({"model.freeze-embeddings": True}).model, teacher, LABELS, 0, tokenizer
    )
    names = exchanged_names(frozen)
    assert names and not any("embeddings" in n for n in names)
    assert "classifier.weight" in names
    trainable = build_student(parse_config({}).model, teacher, LABELS, 0, tokenizer)
    assert any("embeddings" in n for n in exchanged_names(trainable))


def test_freeze_pattern_removes_matching_parameters_from_the_exchange(tokenizer) -> None:
    teacher = build_teacher("builtin:tiny", LABELS, tokenizer, seed=0)
    ffn = r"intermediate\.dense|layer\.\d+\.output\.dense"
    cfg = parse_config({"model.freeze-embeddings": True, "model.freeze": ffn}).model
    names = exchanged_names(build_student(cfg, teacher, LABELS, 0, tokenizer))
    assert names and not any(re.search(ffn, n) for n in names)
    assert any("attention.output.dense" in n for n in names)
    assert "classifier.weight" in names
    with pytest.raises(ModelError, match="matches no parameter"):
        build_student(parse_config({"model.freeze": "nope"}).model, teacher, LABELS, 0, tokenizer)
    with pytest.raises(ModelError, match="leaves no trainable parameter"):
        build_student(parse_config({"model.freeze": "."}).model, teacher, LABELS, 0, tokenizer)


def test_a_derived_student_keeps_its_feed_forward_blocks_off_the_wire_by_default(
    tokenizer,
) -> None:
    teacher = build_teacher("builtin:tiny", LABELS, tokenizer, seed=0)
    default = build_student(parse_config({}).model, teacher, LABELS, 0, tokenizer)
    names = exchanged_names(default)
    assert names and not any(re.search(FEED_FORWARD, n) for n in names)
    assert any("attention.output.dense" in n for n in names)  # the attention still learns
    # frozen means the teacher's weights, kept: the derived layer 0 is the teacher's layer 0
    student_ff = dict(default.named_parameters())["bert.encoder.layer.0.intermediate.dense.weight"]
    teacher_ff = dict(teacher.named_parameters())["bert.encoder.layer.0.intermediate.dense.weight"]
    assert torch.equal(student_ff, teacher_ff) and not student_ff.requires_grad
    off = parse_config({"model.freeze-feed-forward": False}).model
    assert any(
        re.search(FEED_FORWARD, n)
        for n in exchanged_names(build_student(off, teacher, LABELS, 0, tokenizer))
    )
    # another student's layout is not known: the default leaves it whole
    other = parse_config({"model.student": "builtin:tiny"}).model
    assert any(
        re.search(FEED_FORWARD, n)
        for n in exchanged_names(build_student(other, teacher, LABELS, 0, tokenizer))
    )


def test_bad_freeze_pattern_is_a_named_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.freeze"):
        parse_config({"model.freeze": "(unclosed"})


def test_initial_models_identical_on_every_node(tmp_path) -> None:
    cfg = parse_config(
        {"model.teacher": "builtin:micro", "model.student-layers": 1, "output-dir": str(tmp_path)}
    )
    a, b = initial_models(cfg, LABELS), initial_models(cfg, LABELS)
    assert a.digest == b.digest and a.names == b.names
    c = initial_models(cfg.with_overrides({"seed": 1}), LABELS)
    assert c.digest != a.digest


def test_get_set_arrays_round_trip_and_shape_check(tokenizer) -> None:
    teacher = build_teacher("builtin:micro", LABELS, tokenizer, seed=0)
    names = exchanged_names(teacher)
    arrays = get_arrays(teacher, names)
    shifted = {n: a + 1.0 for n, a in arrays.items()}
    set_arrays(teacher, shifted)
    back = get_arrays(teacher, names)
    assert all(np.array_equal(back[n], shifted[n]) for n in names)
    with pytest.raises(ModelError, match="shape"):
        set_arrays(teacher, {names[0]: np.zeros((1, 1), np.float32)})


def test_update_then_apply_reconstructs_client_model(tokenizer) -> None:
    """Client sends student_after - received; server's global + delta is the client's model."""
    teacher = build_teacher("builtin:micro", LABELS, tokenizer, seed=0)
    names = exchanged_names(teacher)
    received = get_arrays(teacher, names)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    after = get_arrays(teacher, names)
    update = {n: after[n] - received[n] for n in names}
    rebuilt = {n: received[n] + update[n] for n in names}
    for n in names:
        np.testing.assert_allclose(rebuilt[n], after[n], rtol=0, atol=1e-6)


def test_unknown_builtin_is_named(tokenizer) -> None:
    with pytest.raises(ModelError, match="builtin:huge"):
        build_teacher("builtin:huge", LABELS, tokenizer, seed=0)
