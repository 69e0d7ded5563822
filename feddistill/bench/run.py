"""Run a benchmark: prepare shared data, run each scenario, write bench.json/.md/.png.

Every scenario sees the same rows: the sampled training subset and the per-round evaluation
subset are written as CSVs into the output folder and passed as ``data.source`` /
``data.test-source``, so the partitions (a function of the data, the seed and the partitioning
options) are identical across scenarios. One ``cache-dir`` is shared, so a client's fine-tuned
teacher is computed once for all KD scenarios and the local-only baseline.
"""

from __future__ import annotations

import copy
import csv
import datetime
import json
import logging
import os
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from feddistill.bench.report import format_table, write_plot
from feddistill.bench.spec import (
    CENTRALIZED,
    FEDERATED,
    LOCAL_ONLY,
    TEACHER_FP32,
    BenchSetting,
)
from feddistill.bench.wirecost import dense_exchange_bytes, trainable_arrays
from feddistill.config import Config, parse_config
from feddistill.models.build import FEED_FORWARD
from feddistill.report import accuracy_curve, evaluation_bytes, round_bytes_per_client
from feddistill.run_inputs import TextSplit

log = logging.getLogger("feddistill")

# The centralized teacher's reference curve covers at least epochs 1 to 5 (issue: the recipe's
# teacher must be within a point of the best of them, so the reference cannot get weaker).
CURVE_EPOCHS = 5


# ---------------------------------------------------------------------------------------------
# Data: sample once, write CSVs every scenario reads
# ---------------------------------------------------------------------------------------------


def _read(setting: BenchSetting) -> tuple[TextSplit, TextSplit, list[str]]:
    from feddistill.data import load_text_dataset, make_train_test

    if setting.train == "embedded":
        n_test = setting.test_rows or max(setting.eval_rows, 1000)
        train, test, names = make_train_test(setting.train_rows, n_test, seed=setting.seed)
        return (
            TextSplit(list(train["text"]), list(train["label"])),
            TextSplit(list(test["text"]), list(test["label"])),
            list(names),
        )
    cols = {"text_column": setting.text_column, "label_column": setting.label_column}
    tr = load_text_dataset(setting.train, split="train", **cols)
    te = load_text_dataset(setting.test, split="test", label_names=tr.label_names, **cols)
    return (
        TextSplit(list(tr.dataset["text"]), list(tr.dataset["label"])),
        TextSplit(list(te.dataset["text"]), list(te.dataset["label"])),
        list(tr.label_names),
    )


def _sample(split: TextSplit, rows: int, seed: int) -> TextSplit:
    """``rows`` rows without replacement (all of them, in file order, if rows >= len)."""
    if rows <= 0 or rows >= len(split):
        return split
    idx = np.sort(np.random.default_rng(seed).choice(len(split), size=rows, replace=False))
    return TextSplit([split.texts[i] for i in idx], [split.labels[i] for i in idx])


def _write_csv(path: Path, split: TextSplit, names: list[str]) -> None:
    # Label *names* are written so string and integer label sets both read back the same ids.
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for text, label in zip(split.texts, split.labels, strict=True):
            w.writerow([text, names[label]])


def _in_read_back_order(train_csv: Path, names: list[str], *splits: TextSplit) -> tuple[Any, ...]:
    """``names`` in the order a run reading ``train_csv`` assigns ids, and ``splits`` relabelled
    to it."""
    from feddistill.data import load_text_dataset

    read_back = list(load_text_dataset(str(train_csv), split="train").label_names)
    if sorted(read_back) != sorted(names):
        raise ValueError(f"{train_csv}: read back labels {read_back}, wrote {names}")
    new_id = [read_back.index(name) for name in names]
    relabelled = [TextSplit(s.texts, [new_id[y] for y in s.labels]) for s in splits]
    return (read_back, *relabelled)


def prepare_data(setting: BenchSetting) -> dict[str, Any]:
    """Sample the subsets, write them under ``out/data`` and return their paths and sizes."""
    train_all, test_all, names = _read(setting)
    train = _sample(train_all, setting.train_rows, setting.seed)
    evalset = _sample(test_all, setting.eval_rows, setting.seed + 1)
    final = _sample(test_all, setting.test_rows, setting.seed + 2)
    missing = sorted(set(range(len(names))) - set(train.labels))
    if missing:
        raise ValueError(
            f"the {len(train)} sampled training rows lack classes {[names[i] for i in missing]}; "
            "raise --train-rows"
        )
    folder = setting.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "train": folder / "train.csv",
        "eval": folder / "eval.csv",
        "test": folder / "test.csv",
    }
    _write_csv(paths["train"], train, names)
    _write_csv(paths["eval"], evalset, names)
    _write_csv(paths["test"], final, names)
    # The runs read these CSVs back, and a loader gives string labels its own id order (the
    # embedded corpus's world,sports,... comes back sorted): score the bench's own rows in
    # the ids the runs' models were trained with, or every accuracy here is of permuted labels.
    names, train, final = _in_read_back_order(paths["train"], names, train, final)
    return {
        "labels": names,
        "paths": {k: str(v) for k, v in paths.items()},
        "rows": {
            "train_pool": len(train_all),
            "test_pool": len(test_all),
            "train": len(train),
            "eval": len(evalset),
            "test": len(final),
        },
        "train": train,
        "test": final,
    }


# ---------------------------------------------------------------------------------------------
# Config shared by every scenario
# ---------------------------------------------------------------------------------------------


def base_config(setting: BenchSetting, data: dict[str, Any]) -> Config:
    """The run config every scenario starts from (scenario overrides are applied on top)."""
    s = setting
    flat: dict[str, Any] = {
        "rounds": s.rounds,
        "seed": s.seed,
        "output-dir": str(s.out / "base"),
        "cache-dir": str(s.out / "cache"),
        "checkpoints": False,  # a 2-layer MiniLM checkpoint is ~60 MB a round; not needed here
        "data.source": data["paths"]["train"],
        "data.test-source": data["paths"]["eval"],
        "data.text-column": "text",
        "data.label-column": "label",
        "data.num-clients": s.num_clients,
        "data.partitioning": s.partitioning,
        "data.alpha": s.alpha,
        "data.max-length": s.max_length,
        # Each client keeps the project's validation share of its rows: its teacher stops on
        # it, and the federated evaluation on it decides the output model (server.average-when).
        # The centralized scenarios train on the whole sampled subset, so the reference sees
        # those rows too (a stronger reference, never a weaker one).
        "model.teacher": s.teacher,
        "model.student": "derived",
        "model.student-layers": s.student_layers,
        "model.freeze-embeddings": s.freeze_embeddings,
        "teacher.epochs": s.teacher_epochs,
        "teacher.lr": s.teacher_lr,
        "teacher.batch-size": s.teacher_batch_size,
        "train.lr": s.train_lr,
        "train.batch-size": s.train_batch_size,
        "train.local-epochs": s.local_epochs,
        "server.clients-per-round": s.clients_per_round,
        "server.local-only": "off",  # run once, as its own scenario
        "server.local-only-epochs": s.local_only_epochs,
        **s.extra,
    }
    if s.clients_per_round >= 1:
        flat["server.clients-per-round"] = float(int(s.clients_per_round))
    return parse_config(flat)


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


def _entry(name: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "accuracy": None,
        "bytes_per_client_round": None,
        "bytes_up_per_client_round": None,
        "bytes_down_per_client_round": None,
        "bytes_up_total": None,
        "bytes_down_total": None,
        "evaluation_bytes_total": None,
        "rounds": 0,
        "seconds": None,
        "curve": [],
        "notes": "",
    }
    base.update(fields)
    return base


class Runner:
    """Holds what scenarios share: config, encoded final test set, the centralized teacher."""

    def __init__(self, setting: BenchSetting, data: dict[str, Any]) -> None:
        from feddistill.distill.train import encode_texts, pick_device
        from feddistill.models.build import Labels
        from feddistill.run_inputs import initial_models

        self.setting = setting
        self.data = data
        self.cfg = base_config(setting, data)
        self.labels = Labels(tuple(data["labels"]))
        self.models = initial_models(self.cfg, self.labels)
        self.device = pick_device(self.cfg.train.device)
        maxlen = self.cfg.data.max_length
        test: TextSplit = data["test"]
        train: TextSplit = data["train"]
        self.test = encode_texts(self.models.student_tokenizer, test.texts, test.labels, maxlen)
        self.train = encode_texts(self.models.student_tokenizer, train.texts, train.labels, maxlen)
        self.t_train = self.train  # a derived student shares the teacher's tokenizer
        if self.models.teacher_tokenizer is not self.models.student_tokenizer:
            self.t_train = encode_texts(
                self.models.teacher_tokenizer, train.texts, train.labels, maxlen
            )
        self.t_test = self.test
        if self.models.teacher_tokenizer is not self.models.student_tokenizer:
            self.t_test = encode_texts(
                self.models.teacher_tokenizer, test.texts, test.labels, maxlen
            )
        self.central_teacher: Any = None
        self.teacher_fit: Any = None
        self.teacher_curve: list[float] = []  # test accuracy after each epoch

    # -- centralized -------------------------------------------------------------------------
    def _fit_central_teacher(self) -> None:
        from feddistill.distill.train import evaluate
        from feddistill.recipe import fit_teacher

        teacher = copy.deepcopy(self.models.teacher)

        def watch(epoch: int) -> None:  # the reference curve: test accuracy after each epoch
            acc = evaluate(teacher, self.t_test, device=self.device).accuracy
            self.teacher_curve.append(acc)
            print(f"    centralized teacher: epoch {epoch}: test accuracy {acc:.4f}", flush=True)

        # The clients' recipe (early stopping on its own holdout), run on to CURVE_EPOCHS
        # epochs when it stops earlier, for the curve only: the weights kept are the recipe's.
        # Not time-capped: teacher.max-minutes bounds a client's first round, not the union.
        self.teacher_fit = fit_teacher(
            self.cfg,
            teacher,
            self.t_train,
            self.device,
            watch=watch,
            at_least=CURVE_EPOCHS,
            timed=False,
        )
        self.central_teacher = teacher

    def centralized_teacher(self) -> dict[str, Any]:
        from feddistill.distill.train import evaluate

        if self.central_teacher is None:
            self._fit_central_teacher()
        acc = evaluate(self.central_teacher, self.t_test, device=self.device).accuracy
        t, fit = self.cfg.teacher, self.teacher_fit
        assert fit is not None
        best = max(self.teacher_curve[:CURVE_EPOCHS])
        return _entry(
            "centralized-teacher",
            accuracy=acc,
            epochs=fit.epochs,
            best_epoch=fit.best_epoch,
            stopped=fit.stopped,
            holdout_accuracy=fit.holdout_accuracy,
            epoch_curve=self.teacher_curve,
            best_of_curve=best,
            notes=f"teacher fine-tuned on the union of client data ({len(self.train)} rows) by "
            f"the clients' recipe: {fit.epochs} epoch(s) run, epoch {fit.best_epoch} kept "
            f"({fit.stopped}; holdout of {fit.holdout_rows} rows, patience {t.patience}, at "
            f"most {t.epochs}), lr {t.lr:g}, batch {t.batch_size}; test accuracy after epochs "
            f"1-{len(self.teacher_curve)}: "
            + " ".join(f"{a:.4f}" for a in self.teacher_curve)
            + f" (best of 1-{CURVE_EPOCHS}: {best:.4f}); no federation",
        )

    def centralized_student(self) -> dict[str, Any]:
        from feddistill.distill.train import evaluate, predict_logits
        from feddistill.recipe import distill_student

        if self.central_teacher is None:
            self._fit_central_teacher()
        logits = predict_logits(self.central_teacher, self.t_train, device=self.device)
        student = copy.deepcopy(self.models.student)
        c = self.cfg
        # The local-only baseline's recipe (the clients' own, without the federated-only term)
        # on the union of the clients' data.
        distill_student(
            c,
            student,
            self.train,
            self.t_train,
            None,
            logits,
            epochs=self.setting.central_epochs,
            seed=c.seed,
            device=self.device,
            federated=False,
        )
        acc = evaluate(student, self.test, device=self.device).accuracy
        return _entry(
            "centralized-student",
            accuracy=acc,
            notes=f"derived student distilled from the centralized teacher on the union "
            f"({self.setting.central_epochs} epochs, lr {c.train.lr:g}, alpha "
            f"{c.distill.alpha:g}, T {c.distill.temperature:g}); no federation",
        )

    # -- local-only --------------------------------------------------------------------------
    def local_only(self) -> dict[str, Any]:
        from feddistill.recipe import local_only_accuracies
        from feddistill.server.run import resolve_paths

        cfg = resolve_paths(self.cfg)
        accs = local_only_accuracies(cfg, self.labels, self.models, self.test)
        return _entry(
            LOCAL_ONLY,
            accuracy=statistics.fmean(accs),
            bytes_per_client_round=0,
            bytes_up_total=0,
            bytes_down_total=0,
            accuracy_std=statistics.pstdev(accs),
            accuracy_min=min(accs),
            accuracy_max=max(accs),
            per_client=accs,
            notes=f"mean over {len(accs)} clients, each student distilled from its own teacher "
            f"on its own data only ({cfg.server.local_only_epochs} epochs); no communication",
        )

    # -- federated ---------------------------------------------------------------------------
    def federated(self, name: str) -> dict[str, Any]:
        from transformers import AutoModelForSequenceClassification

        from feddistill.distill.train import evaluate
        from feddistill.simulation.engine import simulate

        sc = FEDERATED[name]
        out = self.setting.out / name
        _drop_residuals(Path(self.cfg.cache_dir))
        cfg = self.cfg.with_overrides({**self.setting.overrides_for(name), "output-dir": str(out)})
        results = simulate(cfg)
        student = AutoModelForSequenceClassification.from_pretrained(out / "student")
        acc = evaluate(student, self.test, device=self.device).accuracy
        # The codecs and strategy come from the config that ran, so a --set override shows.
        c = cfg.compression
        return _entry(
            name,
            accuracy=acc,
            **_traffic(results),
            uplink=c.uplink,
            downlink=f"{c.downlink} ({c.downlink_protocol})",
            strategy=cfg.server.strategy,
            frozen=_frozen(cfg),
            exchanged_parameters=results["model"]["exchanged_parameters"],
            notes=f"{sc.note}; uplink {c.uplink}, downlink {c.downlink} ({c.downlink_protocol}), "
            f"{cfg.server.strategy}" + (f"; frozen {_frozen(cfg)}" if _frozen(cfg) else ""),
        )

    # -- bytes only ----------------------------------------------------------------------------
    def teacher_fp32(self) -> dict[str, Any]:
        from feddistill.records import RUN_ID_BYTES, server_config

        arrays = trainable_arrays(self.models.teacher)
        config = server_config(
            self.cfg.to_json(), self.data["labels"], self.models.digest, bytes(RUN_ID_BYTES)
        )
        cost = dense_exchange_bytes(arrays, config)
        return _entry(
            TEACHER_FP32,
            bytes_per_client_round=cost.per_client_round,
            bytes_up_per_client_round=cost.up,
            bytes_down_per_client_round=cost.down,
            parameters=cost.parameters,
            notes=f"not run: over the time budget. Bytes are exact: Flower messages carrying "
            f"the teacher's {cost.parameters:,} trainable parameters ({cost.arrays} arrays) "
            f"as float32, sized with feddistill.records.message_bytes",
        )


def _frozen(cfg: Config) -> str:
    """What of the student beyond its embeddings is frozen: the feed-forward blocks
    (``model.freeze-feed-forward``, derived students) and ``model.freeze`` (not named twice
    where it is the same blocks, as ``--preset agnews`` sets it)."""
    ffn = cfg.model.student == "derived" and cfg.model.freeze_feed_forward
    parts = ["feed-forward"] if ffn else []
    if cfg.model.freeze and not (ffn and cfg.model.freeze == FEED_FORWARD):
        parts.append(cfg.model.freeze)
    return " + ".join(parts)


def _drop_residuals(cache_dir: Path) -> int:
    """Delete error-feedback residuals (``clients/<key>/residual-<round>.npz``, see
    :mod:`feddistill.node_state`) left by an earlier scenario in the shared cache.

    A client first sampled in round r of a scenario would otherwise add the residual of another
    scenario's earlier round to its update. Fine-tuned teachers stay: they are the point of
    sharing the cache.
    """
    dropped = 0
    for path in cache_dir.glob("clients/*/residual-*.npz"):
        path.unlink(missing_ok=True)
        dropped += 1
    return dropped


def _traffic(results: dict[str, Any]) -> dict[str, Any]:
    """Bytes and the per-round curve from a results.json."""
    rounds = results["rounds"]
    up = [r["mean_bytes_up_per_client"] for r in rounds]
    down = [r["mean_bytes_down_per_client"] for r in rounds]
    curve = accuracy_curve(results)
    n = max(len(rounds), 1)
    final = results["final"]
    return {
        # every message of the round, evaluation included (report.round_bytes_per_client)
        "bytes_per_client_round": sum(round_bytes_per_client(r) for r in rounds) / n,
        "bytes_up_per_client_round": sum(up) / n,
        "bytes_down_per_client_round": sum(down) / n,
        "bytes_up_total": final["bytes_up_total"],
        "bytes_down_total": final["bytes_down_total"],
        "evaluation_bytes_total": sum(evaluation_bytes(r) for r in rounds),
        "rounds": final["rounds_completed"],
        "curve": curve,
        "eval_accuracy_final": final["accuracy"],
        "eval_accuracy_best": final["best_accuracy"],
        "failures": final["failures_total"],
    }


# ---------------------------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------------------------


def describe(setting: BenchSetting, data: dict[str, Any], cfg: Config) -> dict[str, Any]:
    import flwr
    import torch
    import transformers

    from feddistill import __version__

    return {
        "preset": setting.preset or None,
        "quick": "quick" in setting.preset,
        "dataset": {
            "train": setting.train,
            "test": setting.test or None,
            "written": data["paths"],
            "labels": data["labels"],
        },
        "rows": data["rows"],
        "per_round_evaluation": f"{data['rows']['eval']} rows of the test file (curve)",
        "final_evaluation": f"{data['rows']['test']} rows of the test file (accuracy)",
        "partitioning": {
            "num_clients": setting.num_clients,
            "clients_per_round": setting.clients_per_round,
            "scheme": setting.partitioning,
            "alpha": setting.alpha,
        },
        "seeds": {
            "seed": setting.seed,
            "train_sample": setting.seed,
            "eval_sample": setting.seed + 1,
            "test_sample": setting.seed + 2,
        },
        "teacher": setting.teacher,
        "student": (
            f"derived: {setting.student_layers} layers ({cfg.model.layer_selection}), "
            f"freeze-embeddings={str(setting.freeze_embeddings).lower()}"
            + (
                f", compressed scenarios also freeze {setting.compressed_freeze!r}"
                if setting.compressed_freeze
                else ""
            )
        ),
        "rounds": {
            "dense": setting.rounds,
            "feddistill": setting.compressed_rounds,
            "other compressed": setting.variant_rounds,
        },
        "scenarios": setting.ordered_scenarios(),
        "config": cfg.to_flat(),
        "versions": {
            "feddistill": __version__,
            "flwr": flwr.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def run_bench(setting: BenchSetting, *, echo: Any = print) -> dict[str, Any]:
    """Run every selected scenario in order; bench.json is rewritten after each one.

    A failing scenario is recorded with its error and the others still run.
    """
    t_start = time.time()
    setting.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(setting)
    runner = Runner(setting, data)
    bench: dict[str, Any] = {
        "setting": describe(setting, data, runner.cfg),
        "scenarios": [],
    }
    echo(
        f"bench: {data['rows']['train']} train rows over {setting.num_clients} clients, "
        f"{data['rows']['eval']} eval rows, {data['rows']['test']} test rows; "
        f"teacher {setting.teacher}; output {setting.out}",
    )
    for name in setting.ordered_scenarios():
        echo(f"[{time.time() - t_start:7.0f} s] {name}: running ...")
        t0 = time.time()
        try:
            entry = _run_one(runner, name)
        except Exception as err:  # one broken scenario must not lose the others
            log.error("scenario %s failed:\n%s", name, traceback.format_exc())
            entry = _entry(name, notes=f"failed: {type(err).__name__}: {err}", error=str(err))
        entry["seconds"] = time.time() - t0
        bench["scenarios"].append(entry)
        acc = "n/a" if entry["accuracy"] is None else f"{entry['accuracy']:.4f}"
        echo(
            f"[{time.time() - t_start:7.0f} s] {name}: accuracy {acc}, {entry['seconds']:.0f} s",
        )
        bench["seconds_total"] = time.time() - t_start
        write_outputs(setting.out, bench)
    return bench


def _run_one(runner: Runner, name: str) -> dict[str, Any]:
    if name in FEDERATED:
        return runner.federated(name)
    if name == CENTRALIZED[0]:
        return runner.centralized_teacher()
    if name == CENTRALIZED[1]:
        return runner.centralized_student()
    if name == LOCAL_ONLY:
        return runner.local_only()
    if name == TEACHER_FP32:
        return runner.teacher_fp32()
    raise ValueError(f"unknown scenario {name!r}")


def write_outputs(out: Path, bench: dict[str, Any]) -> None:
    (out / "bench.json").write_text(json.dumps(bench, indent=2))
    (out / "bench.md").write_text(format_table(bench) + "\n")
    write_plot(bench, out / "bench.png")
