"""``feddistill bench``: the machinery end to end on tiny data, and the dense-bytes count."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from feddistill.bench.cli import add_arguments, setting_from_args
from feddistill.bench.report import format_table
from feddistill.bench.run import run_bench
from feddistill.bench.spec import (
    ALL_SCENARIOS,
    BERT_FFN,
    DEFAULT_SCENARIOS,
    FEDERATED,
    QUICK,
    BenchSetting,
)
from feddistill.bench.wirecost import dense_exchange_bytes, trainable_arrays
from feddistill.data import make_corpus

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Flower frames each Array as its own object (header, shape, dtype, chunk references), the
# record and the message content add a little more: measured ~600 B per array, ~1 KB fixed.
FRAMING_PER_ARRAY = 1024
FRAMING_FIXED = 16 * 1024


def _write(path: Path, n: int, seed: int) -> None:
    texts, labels = make_corpus(n, num_classes=3, label_noise=0.0, seed=seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "topic"])
        w.writerows(zip(texts, labels, strict=True))


def test_dense_exchange_bytes_is_params_times_four_plus_framing() -> None:
    # Prepare: a micro BERT teacher's trainable arrays
    from feddistill.models.build import Labels, build_teacher, builtin_tokenizer

    tok = builtin_tokenizer(32)
    teacher = build_teacher("builtin:micro", Labels(("a", "b", "c")), tok, seed=0)
    teacher.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    arrays = trainable_arrays(teacher)
    numel = sum(p.numel() for p in teacher.parameters() if p.requires_grad)

    # Execute
    cost = dense_exchange_bytes(arrays, {"feddistill.config": "{}"})

    # Assert: frozen arrays are not shipped; both directions carry numel float32 plus framing
    assert "bert.embeddings.word_embeddings.weight" not in arrays
    assert cost.parameters == numel and cost.arrays == len(arrays)
    for size in (cost.up, cost.down):
        assert numel * 4 < size <= numel * 4 + FRAMING_PER_ARRAY * len(arrays) + FRAMING_FIXED
    assert cost.per_client_round == cost.up + cost.down


def test_dense_exchange_bytes_grows_by_the_added_floats() -> None:
    small = dense_exchange_bytes({"w": np.ones((10, 10), np.float32)})
    big = dense_exchange_bytes({"w": np.ones((10, 110), np.float32)})
    # 1000 more float32; a longer shape and length fields cost a few framing bytes more
    for grown in (big.down - small.down, big.up - small.up):
        assert 1000 * 4 <= grown <= 1000 * 4 + 16


def test_setting_rejects_unknown_scenario(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        BenchSetting(out=tmp_path, scenarios=("feddistill", "fedsgd"))


def test_rounds_per_scenario_kind(tmp_path: Path) -> None:
    setting = BenchSetting(out=tmp_path, rounds=10, compressed_rounds=30, variant_rounds=20)
    got = {name: setting.overrides_for(name)["rounds"] for name in FEDERATED}
    assert got == {
        "fedavg-student-fp32": 10,
        "feddistill": 30,
        "topk1-q4-noef": 20,
        "down-topk1-q4-ef": 20,
        "topk0.1-q4-ef": 20,
    }
    with pytest.raises(ValueError, match="--variant-rounds"):
        BenchSetting(out=tmp_path, variant_rounds=0)


def test_quick_flag_overrides_preset_and_explicit_options_win(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--quick", "--rounds", "4"])
    setting = setting_from_args(args, tmp_path, tmp_path)  # no agnews here: embedded corpus
    assert setting.train == "embedded" and setting.preset == "quick (modified: rounds=4)"
    assert setting.train_rows == QUICK["train_rows"] and setting.rounds == 4
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--preset", "agnews"])
    with pytest.raises(FileNotFoundError, match="agnews"):
        setting_from_args(args, tmp_path, tmp_path)


def test_agnews_preset_freezes_feed_forward_blocks_in_compressed_scenarios_only(
    tmp_path: Path,
) -> None:
    agnews = tmp_path / "shared" / "data" / "agnews"
    agnews.mkdir(parents=True)
    for name in ("train.csv", "test.csv"):
        (agnews / name).write_text("text,label\nhello,0\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--preset", "agnews"])
    setting = setting_from_args(args, tmp_path / "repo", tmp_path)
    assert setting.compressed_freeze == BERT_FFN and setting.preset == "agnews"
    assert setting.overrides_for("feddistill")["model.freeze"] == BERT_FFN
    assert setting.overrides_for("topk1-q4-noef")["model.freeze"] == BERT_FFN
    assert "model.freeze" not in setting.overrides_for("fedavg-student-fp32")
    args = parser.parse_args(
        ["--out", str(tmp_path / "o"), "--preset", "agnews", "--compressed-freeze", ""]
    )
    setting = setting_from_args(args, tmp_path / "repo", tmp_path)
    assert "model.freeze" not in setting.overrides_for("feddistill")
    assert setting.preset == "agnews (modified: compressed_freeze=)"


@pytest.mark.slow
def test_bench_end_to_end_on_tiny_csv(tmp_path: Path) -> None:
    # Prepare: tiny csv files with their own column names, a micro teacher
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    _write(train, 150, seed=1)
    _write(test, 90, seed=2)
    setting = BenchSetting(
        out=tmp_path / "bench",
        train=str(train),
        test=str(test),
        text_column="sentence",
        label_column="topic",
        teacher="builtin:micro",
        max_length=32,
        num_clients=3,
        clients_per_round=2,
        train_rows=120,
        eval_rows=60,
        rounds=2,
        compressed_rounds=2,
        train_batch_size=16,
        scenarios=("centralized-teacher", "feddistill", "fedavg-teacher-fp32"),
        extra={"compression.uplink": "gtopk:0.01+q4+ef"},
        compressed_freeze=BERT_FFN,
    )

    # Execute
    bench = run_bench(setting, echo=lambda _: None)

    # Assert: bench.json keys, the table, a real PNG
    out = setting.out
    saved = json.loads((out / "bench.json").read_text())
    assert saved["setting"]["rows"] == {
        "train_pool": 150,
        "test_pool": 90,
        "train": 120,
        "eval": 60,
        "test": 90,
    }
    assert {"versions", "machine", "date", "seeds", "partitioning"} <= set(saved["setting"])
    names = [s["name"] for s in saved["scenarios"]]
    assert names == ["centralized-teacher", "feddistill", "fedavg-teacher-fp32"]
    for s in saved["scenarios"]:
        for key in ("name", "accuracy", "bytes_per_client_round", "bytes_up_total", "rounds"):
            assert key in s, (s["name"], key)
        assert "error" not in s, s
    central, fed, teacher = saved["scenarios"]
    assert 0.0 <= central["accuracy"] <= 1.0
    assert 0.0 <= fed["accuracy"] <= 1.0 and fed["rounds"] == 2
    assert [p["round"] for p in fed["curve"]] == [0, 1, 2]
    assert fed["curve"][-1]["bytes_per_client"] == pytest.approx(2 * fed["bytes_per_client_round"])
    assert fed["bytes_up_total"] > 0 and fed["bytes_down_total"] > 0
    # the codecs that ran, --set included, not the scenario's description of the defaults
    assert fed["uplink"] == "gtopk:0.01+q4+ef" and "uplink gtopk:0.01+q4+ef" in fed["notes"]
    # the default's blocks, which --compressed-freeze names again: said once
    assert fed["frozen"] == "feed-forward" and "frozen feed-forward" in fed["notes"]
    assert BERT_FFN not in fed["notes"]
    assert teacher["accuracy"] is None and "not run" in teacher["notes"]
    assert teacher["bytes_per_client_round"] > 8 * saved["setting"]["rows"]["train"]
    table = (out / "bench.md").read_text()
    assert table.strip() == format_table(bench).strip()
    assert all(f"| {n} |" in table for n in names)
    png = (out / "bench.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    for name in ("train", "eval", "test"):
        assert (out / "data" / f"{name}.csv").is_file()


def test_all_scenarios_have_fixed_names() -> None:
    assert ALL_SCENARIOS == (
        "centralized-teacher",
        "centralized-student",
        "fedavg-student-fp32",
        "feddistill",
        "topk1-q4-noef",
        "down-topk1-q4-ef",
        "topk0.1-q4-ef",
        "local-only",
        "fedavg-teacher-fp32",
    )
    # The compression variants run only when asked for (the rest takes about the hour)
    assert DEFAULT_SCENARIOS == (
        "centralized-teacher",
        "centralized-student",
        "fedavg-student-fp32",
        "feddistill",
        "local-only",
        "fedavg-teacher-fp32",
    )
    assert QUICK["scenarios"] == DEFAULT_SCENARIOS


def test_shared_cache_keeps_teachers_but_not_residuals_between_scenarios(tmp_path: Path) -> None:
    # Prepare: a client's state as an earlier error-feedback scenario leaves it
    import torch

    from feddistill.bench.run import _drop_residuals
    from feddistill.node_state import ClientState

    state = ClientState.open(tmp_path, "partition-0-of-2")
    state.save_teacher("k", {"w": torch.ones(2)}, torch.zeros(3, 2))
    state.save_residual({"w": np.ones(2, np.float32)}, server_round=3, run="ab")

    # Execute
    dropped = _drop_residuals(tmp_path)

    # Assert: the next scenario's round 5 finds no residual, the teacher is still cached
    assert dropped == 1
    assert state.load_residual([("w", (2,))], before_round=5, run="ab") == {}
    assert state.load_teacher("k") is not None


def test_prepare_data_labels_match_what_runs_read_back(tmp_path: Path) -> None:
    # The embedded corpus names its classes world,sports,business,science; written to CSV and
    # read back by a run, string labels get the loader's own (sorted) ids. The bench scores
    # its models on its own rows, so those must carry the ids the runs trained with.
    from feddistill.bench.run import prepare_data
    from feddistill.data import load_text_dataset

    setting = BenchSetting(out=tmp_path, train="embedded", train_rows=200, test_rows=120)

    data = prepare_data(setting)

    for split, path in (("train", "train"), ("test", "test")):
        back = load_text_dataset(data["paths"][path], split="train")
        assert list(back.label_names) == list(data["labels"])
        assert list(back.dataset["label"]) == list(data[split].labels)
