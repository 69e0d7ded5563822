"""A tiny federation (3 clients, 2 rounds) through Flower's simulation engine (Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from feddistill.simulation.engine import simulate
from tests.conftest import tiny_config


def test_tiny_federation_end_to_end(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, **{"server.local-only": "on"})
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
        # default codec (top-1% + 4-bit up, 8-bit down): far below dense float32
        dense = r["dense_float32_bytes_per_client"]
        assert max(r["bytes_up_per_client"].values()) < dense / 10
        assert max(r["bytes_down_per_client"].values()) < dense / 2
        assert r["federated_evaluation"]["eval-accuracy"] >= 0.0
    final = results["final"]
    assert final["rounds_completed"] == 2
    assert final["accuracy"] == rounds[-1]["accuracy"]
    assert 0.0 <= final["local_only_accuracy"] <= 1.0
    assert final["bytes_up_total"] == sum(r["bytes_up"] for r in rounds)

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
