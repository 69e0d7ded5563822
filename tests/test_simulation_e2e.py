"""A tiny federation (3 clients, 2 rounds) through Flower's simulation engine (Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from feddistill.simulation.engine import simulate
from tests.conftest import tiny_config


def test_tiny_federation_end_to_end(tmp_path: Path) -> None:
    # server.average-last = 0: the output model is the last global (per-class counts of its round)
    cfg = tiny_config(tmp_path, **{"server.local-only": "on", "server.average-last": 0})
    results = simulate(cfg)

    out = Path(cfg.output_dir)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results
    assert results["config"] == cfg.to_flat() | {
        "output-dir": str(out.resolve()),
        "cache-dir": str((out / "cache").resolve()),
    }
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(r) >= {
            "round",
            "accuracy",
            "loss",
            "bytes_up",
            "bytes_down",
            "seconds",
            "failures",
        }
        assert r["failures"] == 0 and r["replies"] == 3
        assert 0.0 <= r["accuracy"] <= 1.0
        assert len(r["bytes_up_per_client"]) == 3 and len(r["bytes_down_per_client"]) == 3
        # default codec (top-1% + 4-bit up, chained top-5% + 4-bit down): far below float32
        dense = r["dense_float32_bytes_per_client"]
        assert max(r["bytes_up_per_client"].values()) < dense / 10
        assert max(r["bytes_down_per_client"].values()) < dense / 2
        assert r["federated_evaluation"]["eval-accuracy"] >= 0.0
    final = results["final"]
    assert final["rounds_completed"] == 2
    assert final["accuracy"] == rounds[-1]["accuracy"]
    assert 0.0 <= final["local_only_accuracy"] <= 1.0
    assert final["bytes_up_total"] == sum(r["bytes_up"] for r in rounds)
    _assert_per_class_agrees(final, results["labels"])

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "round-0001.safetensors",
        "round-0002.safetensors",
    ]
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    assert student.config.id2label[0] == results["labels"][0]
    batch = tokenizer(["the team won the final match"], return_tensors="pt")
    with torch.no_grad():
        probs = student(**batch).logits.softmax(-1)
    assert probs.shape == (1, len(results["labels"]))
    # client state lives on disk, one folder per sampled client
    clients = sorted(p.name for p in (out / "cache" / "clients").iterdir())
    assert clients == [f"partition-{i}-of-3" for i in range(3)]


def _assert_per_class_agrees(final: dict[str, Any], labels: list[str]) -> None:
    """Per-class accuracy of the output model, weighted by its test rows, is its accuracy."""
    counts, per_class = final["per_class_count"], final["per_class_accuracy"]
    assert list(counts) == list(per_class) == labels
    rows = sum(counts.values())
    assert rows > 0
    weighted = sum(per_class[n] * c for n, c in counts.items() if c) / rows
    assert weighted == pytest.approx(final["accuracy"], abs=1e-6)  # float32 mean


def test_two_runs_of_the_same_config_sample_the_same_clients(tmp_path: Path) -> None:
    """Simulated node ids are random per process; ordering nodes by partition id makes the
    seeded client sample, and so the whole run, repeat (4 clients, 2 per round, 3 rounds).

    The runs also average their last two rounds' globals (``server.average-last = 2``): the
    exported student is that average, the per-round checkpoints stay each round's global.
    """
    from safetensors.numpy import load_file

    overrides = {
        "rounds": 3,
        "data.num-clients": 4,
        "server.clients-per-round": 2.0,
        "server.evaluate-clients": 0.0,
        "server.local-only": "off",
        "server.average-last": 2,
    }
    finals = []
    for name in ("a", "b"):
        cfg = tiny_config(tmp_path / name, **overrides)
        results = simulate(cfg)
        assert [r["replies"] for r in results["rounds"]] == [2, 2, 2]
        out = Path(cfg.output_dir)
        finals.append(load_file(out / "checkpoints" / "round-0003.safetensors"))
        final = results["final"]
        assert final["averaged_rounds"] == [2, 3]
        assert final["last_round_accuracy"] == results["rounds"][-1]["accuracy"]
        assert 0.0 <= final["accuracy"] <= 1.0
        _assert_per_class_agrees(final, results["labels"])

        r2 = load_file(out / "checkpoints" / "round-0002.safetensors")
        exported = load_file(out / "student" / "model.safetensors")
        moved = [k for k in r2 if not np.array_equal(r2[k], finals[-1][k])]
        assert moved, "the two averaged rounds should differ"
        for key in moved:
            np.testing.assert_allclose(
                exported[key], (r2[key] + finals[-1][key]) / 2, rtol=1e-6, atol=1e-7
            )
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        assert (finals[0][key] == finals[1][key]).all(), key
