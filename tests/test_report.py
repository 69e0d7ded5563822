"""The run report (report.png, report.md) from hand-made results.json files, per-class accuracy,
and the ``feddistill report`` command."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from feddistill.cli import main
from feddistill.distill.train import class_counts, encode_texts, evaluate, predict_logits
from feddistill.models.build import Labels, build_teacher, builtin_tokenizer
from feddistill.report import (
    MD,
    PNG,
    accuracy_curve,
    format_markdown,
    load_results,
    round_bytes_per_client,
    summary,
    write_report,
)
from feddistill.server.results import human_bytes, per_class_result

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
ACCURACIES = [0.41, 0.62, 0.81, 0.74, 0.79]
UP = [1_000.0, 1_100.0, 1_200.0, 1_300.0, 1_400.0]  # mean bytes per client and round
DOWN = [20_000.0, 9_000.0, 9_500.0, 10_000.0, 10_500.0]
DENSE = 437_008


def _round(i: int, clients: int = 2) -> dict[str, Any]:
    return {
        "round": i + 1,
        "accuracy": ACCURACIES[i],
        "loss": 1.0 - ACCURACIES[i],
        "bytes_up": UP[i] * clients,
        "bytes_down": DOWN[i] * clients,
        "eval_bytes_down": 0,
        "mean_bytes_up_per_client": UP[i],
        "mean_bytes_down_per_client": DOWN[i],
        "dense_float32_bytes_per_client": DENSE,
        "compression_ratio_up": DENSE / UP[i],
        "compression_ratio_down": DENSE / DOWN[i],
        "replies": clients - (i == 1),
        "failures": int(i == 1),
        "federated_evaluation": {"eval-accuracy": ACCURACIES[i] - 0.05},
        "seconds": 3.0,
        "elapsed": 3.0 * (i + 1),
    }


def _results(rounds: int = 5, *, finished: bool = True) -> dict[str, Any]:
    """A results.json of 5 planned rounds, as :class:`RunRecord` writes it."""
    out: dict[str, Any] = {
        "schema_version": 1,
        "labels": LABELS,
        "model": {"teacher": "builtin:tiny", "student_parameters": 109_252},
        "config": {
            "rounds": 5,
            "data.num-clients": 4,
            "data.partitioning": "dirichlet",
            "server.clients-per-round": 2,
            "compression.uplink": "topk:0.01+q4+ef",
            "compression.downlink": "topk:0.05+q4",
            "compression.downlink-protocol": "chain",
        },
        "initial": {"accuracy": 0.25, "loss": 1.39},
        "rounds": [_round(i) for i in range(rounds)],
        "final": {},
        "events": [],
    }
    if finished:
        out["final"] = {
            "accuracy": 0.8123,
            "loss": 0.5,
            "averaged_rounds": [4, 5],
            "last_round_accuracy": ACCURACIES[-1],
            "best_accuracy": max(ACCURACIES),
            "best_round": 3,
            "rounds_completed": rounds,
            "bytes_up_total": sum(r["bytes_up"] for r in out["rounds"]),
            "bytes_down_total": sum(r["bytes_down"] for r in out["rounds"]),
            "failures_total": 1,
            "seconds_total": 42.4,
            "local_only_accuracy": 0.45,
            "per_class_accuracy": {"World": 0.9, "Sports": 0.95, "Business": 0.7, "Sci/Tech": 0.6},
            "per_class_count": {"World": 250, "Sports": 240, "Business": 260, "Sci/Tech": 250},
        }
    return out


def _write(folder: Path, results: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def _assert_png(path: Path) -> None:
    image = imread(path)
    height, width = image.shape[:2]
    assert width >= 1000 and height >= 700, image.shape
    assert float(np.std(image[..., :3])) > 0.05  # drawn, not a blank canvas


def test_report_of_a_finished_run_shows_its_figures(tmp_path: Path) -> None:
    # Prepare
    run = _write(tmp_path / "run", _results())

    # Execute
    code = main(["report", str(run)])

    # Assert
    assert code == 0
    _assert_png(run / PNG)
    md = (run / MD).read_text()
    assert "complete, 5 of 5 rounds" in md
    assert "| final accuracy (output model) | 81.23% (average of the globals of rounds 4–5) |" in md
    assert "| best round | round 3: 81.00% |" in md
    assert "| last round's global | 79.00% |" in md
    assert "| local-only students (mean) | 45.00% |" in md
    assert f"| bytes up, total (all clients) | {human_bytes(2 * sum(UP))} |" in md
    assert f"| bytes down, total (all clients) | {human_bytes(2 * sum(DOWN))} |" in md
    assert f"| compression ratio, up / down | {DENSE * 5 / sum(UP):.1f}x / " in md
    assert "| failed replies | 1 |" in md
    assert "| seconds (since start) | 42 |" in md
    assert "| Sci/Tech | 60.00% | 250 |" in md and "| Sports | 95.00% | 240 |" in md
    assert f"]({PNG})" in md


def test_report_of_a_run_in_progress_draws_the_rounds_so_far(tmp_path: Path) -> None:
    # Prepare: two of five rounds, no final yet
    run = _write(tmp_path / "run", _results(2, finished=False))

    # Execute
    png, md_path = write_report(load_results(run)[0], run)

    # Assert
    _assert_png(png)
    md = md_path.read_text()
    assert "in progress, 2 of 5 rounds so far" in md
    assert "| final accuracy (output model) | — (run in progress) |" in md
    assert "| best round | round 2: 62.00% |" in md
    assert f"| bytes up, total (all clients) | {human_bytes(2 * sum(UP[:2]))} |" in md
    assert "| seconds (since start) | 6 |" in md  # the last round's elapsed
    assert "Not available yet" in md


def test_report_of_a_resumed_run_names_the_resume(tmp_path: Path) -> None:
    # Prepare
    results = _results()
    results["events"] = [{"event": "resume", "from_round": 2, "time": 0.0}]
    run = _write(tmp_path / "run", results)

    # Execute
    code = main(["report", str(run / "results.json")])  # the file itself works too

    # Assert
    assert code == 0
    _assert_png(run / PNG)
    assert "resumed after round 2" in (run / MD).read_text()


def test_report_with_no_rounds_and_no_test_set_still_draws(tmp_path: Path) -> None:
    # Prepare: a run killed before its first round, and a finished one without a test set
    empty = _results(0, finished=False)
    no_test = _results()
    for r in no_test["rounds"]:
        r["accuracy"] = None
    no_test["initial"] = {"accuracy": None, "loss": None}
    no_test["final"].update(accuracy=None, per_class_accuracy=None, per_class_count=None)

    # Execute
    for name, results in (("empty", empty), ("no-test", no_test)):
        write_report(results, tmp_path / name)

    # Assert
    for name in ("empty", "no-test"):
        _assert_png(tmp_path / name / PNG)
    assert "in progress, 0 of 5 rounds so far" in (tmp_path / "empty" / MD).read_text()
    assert "| final accuracy (output model) | — (" in (tmp_path / "no-test" / MD).read_text()


def test_accuracy_curve_accumulates_bytes_per_client_from_round_zero() -> None:
    curve = accuracy_curve(_results(3))
    assert [p["round"] for p in curve] == [0, 1, 2, 3]
    assert [p["bytes_per_client"] for p in curve] == pytest.approx(
        [0.0, UP[0] + DOWN[0], UP[0] + DOWN[0] + UP[1] + DOWN[1], sum(UP[:3]) + sum(DOWN[:3])]
    )


def test_evaluation_messages_count_in_the_bytes_per_client_and_round() -> None:
    """With the chained downlink an evaluation message carries the model versions a node
    lacks, which its next training message then need not: counting training alone hid them."""
    # Arrange: round 1 sends 2 training clients their messages and evaluates on 3 others
    results = _results(2)
    first = results["rounds"][0]
    first["bytes_down_per_client"] = {"11": 15_000, "12": 25_000}
    first["eval_bytes_down"], first["eval_bytes_up"] = 9_000, 300
    first["secure_bytes"] = {"setup": 700}

    # Act
    curve = accuracy_curve(results)
    s = summary(results)

    # Assert: the round's evaluation bytes are shared over its 2 training clients
    one = UP[0] + DOWN[0] + (9_000 + 300 + 700) / 2
    assert round_bytes_per_client(first) == pytest.approx(one)
    assert curve[1]["bytes_per_client"] == pytest.approx(one)
    assert curve[2]["bytes_per_client"] == pytest.approx(one + UP[1] + DOWN[1])
    assert s["evaluation_bytes_total"] == 10_000
    assert s["bytes_per_client_round"] == pytest.approx((one + UP[1] + DOWN[1]) / 2)
    assert "all messages" in format_markdown(results)


def test_summary_takes_totals_from_the_rounds_so_a_finished_run_agrees_with_final() -> None:
    results = _results()
    s = summary(results)
    assert s["bytes_up_total"] == results["final"]["bytes_up_total"]
    assert s["bytes_down_total"] == results["final"]["bytes_down_total"]
    assert (s["best_round"], s["best_accuracy"]) == (3, 0.81)
    assert s["failures"] == results["final"]["failures_total"]


def test_per_class_accuracy_of_evaluate_equals_a_direct_count() -> None:
    # Prepare: a tiny random model, 3 classes, 12 rows
    tok = builtin_tokenizer(16)
    labels = Labels(("a", "b", "c"))
    model = build_teacher("builtin:tiny", labels, tok, seed=0).eval()
    texts = [f"word {i} " * (1 + i % 4) for i in range(12)]
    y = [0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 2]
    data = encode_texts(tok, texts, y, max_length=16)
    cpu = torch.device("cpu")

    # Execute
    stats = evaluate(model, data, batch_size=5, device=cpu)
    result = per_class_result(stats.class_correct, stats.class_rows, list(labels.names))

    # Assert: the same as counting the predictions by hand
    predicted = predict_logits(model, data, device=cpu).argmax(-1).tolist()
    for c, name in enumerate(labels.names):
        rows = [i for i, t in enumerate(y) if t == c]
        assert result["per_class_count"][name] == len(rows)
        right = sum(predicted[i] == c for i in rows)
        assert result["per_class_accuracy"][name] == pytest.approx(right / len(rows))
    assert sum(stats.class_correct) / len(y) == pytest.approx(stats.accuracy)


def test_class_counts_leave_an_absent_class_at_zero_rows() -> None:
    correct, rows = class_counts(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]), 3)
    assert (correct, rows) == ([2, 1, 0], [3, 1, 0])
    result = per_class_result(correct, rows, ["x", "y", "z"])
    assert result["per_class_accuracy"] == {"x": 2 / 3, "y": 1.0, "z": None}
    with pytest.raises(ValueError, match="3 per-class counts for 2 labels"):
        per_class_result(correct, rows, ["x", "y"])


@pytest.mark.parametrize("kind", ["missing", "no-results", "not-json", "not-a-run"])
def test_report_command_on_a_bad_path_is_a_clear_error(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    target = tmp_path / kind
    if kind != "missing":
        target.mkdir()
    if kind == "not-json":
        (target / "results.json").write_text("{ half")
    if kind == "not-a-run":
        (target / "results.json").write_text(json.dumps({"scenarios": []}))

    # Execute
    code = main(["report", str(target)])

    # Assert
    assert code == 2
    err = capsys.readouterr().err
    assert str(target) in err
    expected = {
        "missing": "does not exist",
        "no-results": "no results.json in",
        "not-json": "is not valid JSON",
        "not-a-run": "no 'rounds' list",
    }
    assert expected[kind] in err
    assert not (target / PNG).exists()


def test_report_help_describes_the_panels(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "results.json" in text and "per-class accuracy" in text and "in progress" in text


def test_report_leaves_the_results_untouched(tmp_path: Path) -> None:
    results = _results()
    before = copy.deepcopy(results)
    write_report(results, tmp_path)
    assert results == before


def test_the_commands_of_docs_report_md_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the doc's example folder, holding a finished run
    doc = (Path(__file__).parents[1] / "docs" / "report.md").read_text()
    commands = [
        line.strip()
        for block in re.findall(r"```sh\n(.*?)```", doc, flags=re.S)
        for line in block.splitlines()
        if line.strip()
    ]
    assert commands == ["feddistill report runs/demo"]
    _write(tmp_path / "runs" / "demo", _results())
    monkeypatch.chdir(tmp_path)

    # Execute / Assert
    for line in commands:
        program, *argv = shlex.split(line)
        assert program == "feddistill"
        assert main(argv) == 0, line
    _assert_png(tmp_path / "runs" / "demo" / PNG)
