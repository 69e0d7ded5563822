"""``feddistill bench-robust``: final accuracy over aggregator x attack x hostile fraction.

Every cell is one federation through Flower's simulation engine (:func:`simulate`), in this
process, one after another, on the data :func:`feddistill.bench.run.prepare_data` writes once and
the run config :func:`feddistill.bench.run.base_config` builds (checkpoints off, no local-only
baseline, one shared cache so each client's teacher is fine-tuned once for the whole matrix).
The 0% cell of each aggregator is run once and shared by every attack. A cell that raises (a
crashed server) is recorded with its error and the matrix goes on.

What each cell reports comes from its ``results.json`` (``failures``, ``failure_reasons``,
``round_failure`` and, where admission control records it, ``clipped``; absent counts as 0) and
from the saved student (non-finite parameters; accuracy on the held-out test rows).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feddistill.aggregation import SHARED_UPLINK, STRATEGIES
from feddistill.bench.run import _drop_residuals, base_config, prepare_data
from feddistill.bench.spec import BenchSetting
from feddistill.config import Config, ConfigError

log = logging.getLogger("feddistill")

DEFAULT = "default"  # the project's default strategy, as configured (fedavgm, server step 2)
AGGREGATORS = (
    "fedavg",
    DEFAULT,
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)

# Bench name -> attack.* overrides.
ATTACKS: Mapping[str, Mapping[str, Any]] = {
    "sign-flip": {"attack.kind": "sign-flip"},
    "scale-x100": {"attack.kind": "scale", "attack.scale": 100.0},
    "scale-x1e6": {"attack.kind": "scale", "attack.scale": 1e6},
    "noise": {"attack.kind": "noise", "attack.noise-std": 1.0},
    "inflate-examples": {"attack.kind": "inflate-examples", "attack.inflate": 1e6},
    "label-flip": {"attack.kind": "label-flip"},
    "free-rider": {"attack.kind": "free-rider"},
    "garbage": {"attack.kind": "garbage"},
    "extra-metric": {"attack.kind": "extra-metric"},
    "missing-metric": {"attack.kind": "missing-metric"},
    "replay": {"attack.kind": "replay"},
}
MODEL_POISONING = ("sign-flip", "scale-x100", "scale-x1e6", "noise", "inflate-examples")
FRACTIONS = (0.1, 0.2, 0.3)
NO_ATTACK = "none"

# The default matrix: the cells the targets read, and no others, so that it fits its
# 45 minutes on 2 cores (a cell is ~2 minutes). "full" is the whole product.
MATRICES = ("targets", "full")
TARGET_FRACTION = 0.2  # the project default against every attack
SIGN_FLIP_FRACTION = 0.3  # every robust rule against sign flip
TARGET_ATTACKS = (*MODEL_POISONING, "garbage", "extra-metric")


@dataclass(frozen=True)
class RobustSetting:
    """The matrix and the federation every cell runs (``bench.json`` records it)."""

    out: Path
    aggregators: tuple[str, ...] = AGGREGATORS
    attacks: tuple[str, ...] = tuple(ATTACKS)
    fractions: tuple[float, ...] = FRACTIONS
    teacher: str = "builtin:tiny"
    num_clients: int = 20
    clients_per_round: int = 10
    rounds: int = 24
    train_rows: int = 4000
    eval_rows: int = 500
    test_rows: int = 1000
    teacher_epochs: int = 6
    local_epochs: int = 2
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    quick: bool = False
    matrix: str = "targets"

    def __post_init__(self) -> None:
        if self.matrix not in MATRICES:
            raise ValueError(f"--matrix: {self.matrix!r}; allowed: {','.join(MATRICES)}")
        for name, values, allowed in (
            ("--aggregators", self.aggregators, AGGREGATORS),
            ("--attacks", self.attacks, tuple(ATTACKS)),
        ):
            unknown = [v for v in values if v not in allowed]
            if unknown or not values:
                raise ValueError(f"{name}: unknown {unknown}; allowed: {','.join(allowed)}")
        bad = [f for f in self.fractions if not 0 < f < 1]
        if bad or not self.fractions:
            raise ValueError(f"--fractions: each in (0, 1), got {list(self.fractions)}")
        if self.clients_per_round > self.num_clients:
            raise ValueError("--clients-per-round must be <= --num-clients")

    def bench_setting(self) -> BenchSetting:
        """The :class:`BenchSetting` whose data and base config every cell shares.

        Its recipe fields are the project defaults (``feddistill config``), not the AG News
        bench's, so a cell is the embedded default with only the matrix's settings changed.
        """
        return BenchSetting(
            out=self.out,
            train="embedded",
            train_rows=self.train_rows,
            eval_rows=self.eval_rows,
            test_rows=self.test_rows,
            seed=self.seed,
            teacher=self.teacher,
            student_layers=2,
            freeze_embeddings=False,
            max_length=32,
            num_clients=self.num_clients,
            clients_per_round=self.clients_per_round,
            rounds=self.rounds,
            teacher_epochs=self.teacher_epochs,
            teacher_lr=1e-3,
            teacher_batch_size=8,
            train_lr=1e-3,
            train_batch_size=8,
            local_epochs=self.local_epochs,
            # The output model is the last global, not the project's tail average: this bench
            # compares how far an attack moved the model, and a federation still learning at
            # round 18 would read the average's lag as damage (measured: FedAvg 0% round 15
            # alone 0.40, the average of rounds 12-15 0.26).
            # The smoke run trains 1 epoch a round throughout (no rising phase: 2 rounds).
            extra={
                "server.average-last": 0.0,
                **({"train.rising-epochs": 0} if self.quick else {}),
                **self.extra,
            },
        )


# ---------------------------------------------------------------------------------------------
# Cells (pure: names and overrides)
# ---------------------------------------------------------------------------------------------


def expected_hostile(fraction: float, per_round: int) -> int:
    """Attackers in a round of ``per_round`` if they are sampled in proportion (rounded up)."""
    return math.ceil(fraction * per_round - 1e-9)


def aggregator_overrides(name: str, fraction: float, per_round: int) -> tuple[dict[str, Any], str]:
    """Run-config overrides for aggregator ``name`` sized for ``fraction`` hostile, and a note.

    The robust rules are told the expected attackers per round, ``f``, (at least 1, so the 0%
    baseline runs the same rule): Krum and MultiKrum take ``f`` up to what ``n > 2f + 2``
    allows, FedTrimmedAvg trims ``f`` a side, and Bulyan, which needs ``n >= 4f + 3``, takes
    the largest ``f`` that fits (1 at 10 replies: it is then sized below 20% and 30%).
    """
    f = max(1, expected_hostile(fraction, per_round))
    if name == DEFAULT:
        return {}, "project default strategy"
    if name in ("fedavg", "fedmedian"):
        return {"server.strategy": name}, ""
    if name == "fedtrimmedavg":
        beta = min(0.49, (f + 0.01) / per_round)
        return {"server.strategy": name, "server.trim-beta": beta}, f"trims {f} a side"
    if name in ("krum", "multikrum"):
        g = min(f, max(0, (per_round - 3) // 2))
        over: dict[str, Any] = {"server.strategy": name, "server.num-malicious": g}
        if name == "multikrum" and g == 0:  # n - 0 would average every reply
            over["server.multikrum-select"] = per_round - 1
        return over, f"f = {g}"
    if name == "bulyan":
        g = min(f, max(1, (per_round - 3) // 4))
        note = f"f = {g}" + (f" (sized below the expected {f})" if g < f else "")
        return {"server.strategy": name, "server.num-malicious": g}, note
    raise ValueError(f"unknown aggregator {name!r}")


@dataclass(frozen=True)
class Cell:
    aggregator: str
    attack: str  # NO_ATTACK for the shared baseline
    fraction: float

    @property
    def name(self) -> str:
        return f"{self.aggregator}__{self.attack}__{round(100 * self.fraction)}"


def cells(setting: RobustSetting) -> list[Cell]:
    """The cells to run, within the setting's aggregators, attacks and fractions.

    ``full``: per aggregator, its 0% baseline, then every attack at every fraction.
    ``targets`` (the default): what the targets read: every aggregator at 0%; the project
    default against the model-poisoning attacks and two malformed-reply attacks at 20%; every
    robust rule (not FedAvg, not the default) against sign flip at 30%. Attacks outside
    ``TARGET_ATTACKS`` run only in ``full``.
    """
    if setting.matrix == "full":
        out: list[Cell] = []
        for agg in setting.aggregators:
            out.append(Cell(agg, NO_ATTACK, 0.0))
            out.extend(Cell(agg, a, f) for a in setting.attacks for f in setting.fractions)
        return out
    out = [Cell(agg, NO_ATTACK, 0.0) for agg in setting.aggregators]
    if DEFAULT in setting.aggregators and TARGET_FRACTION in setting.fractions:
        out += [Cell(DEFAULT, a, TARGET_FRACTION) for a in setting.attacks if a in TARGET_ATTACKS]
    if "sign-flip" in setting.attacks and SIGN_FLIP_FRACTION in setting.fractions:
        out += [
            Cell(agg, "sign-flip", SIGN_FLIP_FRACTION)
            for agg in setting.aggregators
            # the 30% target asks for a robust rule; FedAvg and the default have none to test
            if agg not in ("fedavg", DEFAULT)
        ]
    return out


def cell_overrides(setting: RobustSetting, cell: Cell) -> tuple[dict[str, Any], str]:
    """The cell's aggregator and attack settings. A robust rule sends the shared pattern
    (``SHARED_UPLINK``) unless ``--set compression.uplink`` chose an uplink for every cell:
    over top-k updates on each client's own coordinates it does not learn (measured: chance)."""
    over, note = aggregator_overrides(cell.aggregator, cell.fraction, setting.clients_per_round)
    robust = cell.aggregator in STRATEGIES and STRATEGIES[cell.aggregator].robust  # not DEFAULT
    if robust and "compression.uplink" not in setting.extra:
        over["compression.uplink"] = SHARED_UPLINK
        note = f"{note}; uplink {SHARED_UPLINK}" if note else f"uplink {SHARED_UPLINK}"
    if cell.attack != NO_ATTACK:
        over.update(ATTACKS[cell.attack])
        over.update({"attack.fraction": cell.fraction, "attack.seed": setting.seed})
    return over, note


# ---------------------------------------------------------------------------------------------
# Running a cell
# ---------------------------------------------------------------------------------------------


def _count(value: Any) -> int:
    """A round's ``clipped`` / ``capped_examples``: a list of entries (admission control
    writes one per reply), a number, or absent (before admission control): 0."""
    if value is None:
        return 0
    if isinstance(value, list | tuple):
        return len(value)
    return int(value)


def summarize_rounds(results: Mapping[str, Any]) -> dict[str, Any]:
    """Failures, clipped replies, capped ``num-examples`` and failed rounds from a results.json
    (``clipped`` and ``capped_examples`` may be absent: admission control adds them)."""
    rounds = results.get("rounds", [])
    reasons: collections.Counter[str] = collections.Counter()
    for r in rounds:
        for text in r.get("failure_reasons", []):
            # "node 123: invalid payload (magic): ..." -> "invalid payload (magic)"
            reasons[text.split(": ", 1)[-1].split(":", 1)[0][:80]] += 1
    return {
        "rounds": len(rounds),
        "failures": sum(int(r.get("failures", 0)) for r in rounds),
        "clipped": sum(_count(r.get("clipped")) for r in rounds),
        "capped_examples": sum(_count(r.get("capped_examples")) for r in rounds),
        "failed_rounds": sum(1 for r in rounds if r.get("round_failure")),
        "failure_reasons": dict(reasons.most_common(5)),
        "curve": [r.get("accuracy") for r in rounds],
    }


class CellRunner:
    """What cells share: the base config and the encoded test rows."""

    def __init__(self, setting: RobustSetting, data: dict[str, Any]) -> None:
        from feddistill.distill.train import encode_texts, pick_device
        from feddistill.models.build import Labels
        from feddistill.run_inputs import initial_models

        self.setting = setting
        self.cfg = base_config(setting.bench_setting(), data)
        models = initial_models(self.cfg, Labels(tuple(data["labels"])))
        test = data["test"]
        maxlen = self.cfg.data.max_length
        self.test = encode_texts(models.student_tokenizer, test.texts, test.labels, maxlen)
        self.device = pick_device(self.cfg.train.device)

    def config(self, cell: Cell) -> Config:
        over, _ = cell_overrides(self.setting, cell)
        out = self.setting.out / "cells" / cell.name
        return self.cfg.with_overrides({**over, "output-dir": str(out)})

    def __call__(self, cell: Cell) -> dict[str, Any]:
        import numpy as np
        from transformers import AutoModelForSequenceClassification

        from feddistill.distill.train import evaluate
        from feddistill.simulation.engine import simulate

        cfg = self.config(cell)
        _drop_residuals(Path(self.cfg.cache_dir))
        results = simulate(cfg)
        student = AutoModelForSequenceClassification.from_pretrained(
            Path(cfg.output_dir) / "student"
        )
        finite = all(np.isfinite(p.detach().numpy()).all() for p in student.parameters())
        acc = evaluate(student, self.test, device=self.device).accuracy if finite else None
        return {"accuracy": acc, "finite": finite, **summarize_rounds(results)}


def _cell_entry(setting: RobustSetting, cell: Cell) -> dict[str, Any]:
    _, note = cell_overrides(setting, cell)
    return {
        "name": cell.name,
        "aggregator": cell.aggregator,
        "attack": cell.attack,
        "fraction": cell.fraction,
        "note": note,
        "accuracy": None,
        "finite": None,
        "crashed": False,
        "error": None,
        "rounds": 0,
        "failures": 0,
        "clipped": 0,
        "capped_examples": 0,
        "failed_rounds": 0,
        "failure_reasons": {},
        "curve": [],
        "seconds": None,
    }


def run_matrix(
    setting: RobustSetting,
    *,
    run_cell: Callable[[CellRunner, Cell], dict[str, Any]] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every cell; ``bench-robust.json`` (and .md, .png) is rewritten after each.

    ``run_cell(runner, cell)`` (tests) stands in for ``runner(cell)``, the simulation of one
    cell; whatever either raises is recorded as that cell's crash.
    """
    t_start = time.time()
    setting.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(setting.bench_setting())
    runner = CellRunner(setting, data)
    run = run_cell or (lambda r, c: r(c))
    todo = cells(setting)
    bench: dict[str, Any] = {
        "setting": {
            **{
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(setting).items()
            },
            "rows": data["rows"],
            "cells": len(todo),
            "config": runner.cfg.to_flat(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "cells": [],
    }
    echo(
        f"bench-robust: {len(todo)} cells, {setting.num_clients} clients "
        f"({setting.clients_per_round} per round), {setting.rounds} rounds, "
        f"teacher {setting.teacher}; output {setting.out}"
    )
    for i, cell in enumerate(todo, 1):
        entry = _cell_entry(setting, cell)
        t0 = time.time()
        try:
            runner.config(cell)
        except ConfigError as err:  # e.g. Bulyan with too few clients per round: not run
            entry.update(skipped=str(err))
            bench["cells"].append(entry)
            echo(f"{i}/{len(todo)} {cell.name}: skipped: {err}")
            continue
        try:
            entry.update(run(runner, cell))
        except Exception as err:  # a crashed cell is a result, not the end of the bench
            log.error("cell %s crashed:\n%s", cell.name, traceback.format_exc())
            entry.update(crashed=True, error=f"{type(err).__name__}: {err}"[:500])
        entry["seconds"] = time.time() - t0
        bench["cells"].append(entry)
        bench["seconds_total"] = time.time() - t_start
        bench["targets"] = check_targets(bench["cells"])
        write_outputs(setting.out, bench)
        acc = "crashed" if entry["crashed"] else _pct(entry["accuracy"])
        echo(
            f"[{time.time() - t_start:6.0f} s] {i}/{len(todo)} {cell.name}: {acc}, "
            f"failures {entry['failures']}, clipped {entry['clipped']}, {entry['seconds']:.0f} s"
        )
    return bench


# ---------------------------------------------------------------------------------------------
# Targets, table, heat map
# ---------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _find(entries: list[dict[str, Any]], agg: str, attack: str, frac: float) -> dict | None:
    for e in entries:
        if e["aggregator"] == agg and e["attack"] == attack and math.isclose(e["fraction"], frac):
            return e
    return None


def _acc(e: dict[str, Any] | None) -> float | None:
    return None if e is None or e["crashed"] else e["accuracy"]


def _ran(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if not e.get("skipped")]


def check_targets(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's "done" checks, from the measured cells only (missing cells: not checked)."""
    out: list[dict[str, Any]] = []
    entries = _ran(entries)

    def add(name: str, ok: bool | None, detail: str) -> None:
        out.append({"target": name, "pass": ok, "detail": detail})

    base = _acc(_find(entries, "fedavg", NO_ATTACK, 0.0))
    aggs = sorted({e["aggregator"] for e in entries})
    if base is None:
        add("0%: every aggregator within 2 points of FedAvg", None, "no FedAvg 0% cell")
    else:
        gaps = {a: _acc(_find(entries, a, NO_ATTACK, 0.0)) for a in aggs}
        bad = {a: v for a, v in gaps.items() if v is None or base - v > 0.02}
        detail = ", ".join(f"{a} {_pct(v)}" for a, v in gaps.items()) + f" (fedavg {_pct(base)})"
        add("0%: every aggregator within 2 points of FedAvg", not bad, detail)
    own = _acc(_find(entries, DEFAULT, NO_ATTACK, 0.0))
    for attack in MODEL_POISONING:
        e = _find(entries, DEFAULT, attack, 0.2)
        name = f"20% {attack}: project default within 2 points of its 0%"
        if e is None or own is None:
            add(name, None, "cell not run")
            continue
        v = _acc(e)
        add(name, v is not None and own - v <= 0.02, f"{_pct(v)} vs {_pct(own)}")
    flips = {
        a: (_acc(_find(entries, a, "sign-flip", 0.3)), _acc(_find(entries, a, NO_ATTACK, 0.0)))
        for a in aggs
    }
    flips = {a: v for a, v in flips.items() if _find(entries, a, "sign-flip", 0.3)}
    if not flips:
        add("30% sign flip: some aggregator within 3 points", None, "no 30% sign-flip cell")
    else:
        # A rule that learns nothing at 0% cannot lose 3 points to an attack: it holds only if
        # its own 0% is within the first target's 2 points of FedAvg's.
        def learns(b: float | None) -> bool:
            return b is not None and (base is None or base - b <= 0.02)

        held = [
            a
            for a, (v, b) in flips.items()
            if v is not None and b is not None and b - v <= 0.03 and learns(b)
        ]
        detail = ", ".join(
            f"{a} {_pct(v)} (0%: {_pct(b)}{'' if learns(b) else ', below FedAvg 0%'})"
            for a, (v, b) in flips.items()
        )
        add("30% sign flip: some aggregator within 3 points", bool(held), detail)
    crashed = [e["name"] for e in entries if e["crashed"]]
    add("0 server crashes", not crashed, ", ".join(crashed) or f"{len(entries)} cells")
    nonfinite = [e["name"] for e in entries if e["finite"] is False]
    add("0 non-finite global models", not nonfinite, ", ".join(nonfinite) or "none")
    return out


def format_table(bench: dict[str, Any]) -> str:
    """One row per aggregator x attack, one column per fraction (0% is the shared baseline)."""
    s = bench["setting"]
    fracs = sorted({e["fraction"] for e in bench["cells"] if e["attack"] != NO_ATTACK})
    head = (
        f"Final accuracy on {s['rows']['test']} test rows; {s['num_clients']} clients, "
        f"{s['clients_per_round']} per round, {s['rounds']} rounds, teacher {s['teacher']} "
        f"({s['date']}). A cell reads `accuracy (failures/clipped/capped)`: replies dropped, "
        "updates clipped and `num-examples` claims capped over the run; `CRASH` is a server that "
        "stopped, `NaN` a non-finite global model.\n\n"
        "| aggregator | attack | 0% | " + " | ".join(f"{round(100 * f)}%" for f in fracs) + " |\n"
        "|---|---|" + "---:|" * (len(fracs) + 1)
    )
    lines = [head]

    def show(e: dict[str, Any] | None) -> str:
        if e is None:
            return ""
        if e.get("skipped"):
            return "skipped"
        if e["crashed"]:
            return "CRASH"
        if e["finite"] is False:
            return "NaN"
        counts = f"{e['failures']}/{e['clipped']}/{e.get('capped_examples', 0)}"
        return f"{_pct(e['accuracy'])} ({counts})"

    aggs = list(dict.fromkeys(e["aggregator"] for e in bench["cells"]))
    attacks = list(dict.fromkeys(e["attack"] for e in bench["cells"] if e["attack"] != NO_ATTACK))
    for agg in aggs:
        base = show(_find(bench["cells"], agg, NO_ATTACK, 0.0))
        # only the attacks this aggregator met (the default matrix runs few per aggregator)
        met = [a for a in attacks if any(_find(bench["cells"], agg, a, f) for f in fracs)]
        for attack in met or [NO_ATTACK]:
            row = [show(_find(bench["cells"], agg, attack, f)) for f in fracs]
            lines.append(f"| {agg} | {attack} | {base} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append(format_targets(bench.get("targets", [])))
    return "\n".join(lines)


def format_targets(targets: list[dict[str, Any]]) -> str:
    mark = {True: "PASS", False: "FAIL", None: "not checked"}
    return "\n".join(f"- **{mark[t['pass']]}** {t['target']}: {t['detail']}" for t in targets)


def write_heatmap(bench: dict[str, Any], path: Path) -> None:
    """Rows: aggregator x attack; columns: 0% and each fraction; colour: final accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    entries = bench["cells"]
    fracs = [0.0, *sorted({e["fraction"] for e in entries if e["attack"] != NO_ATTACK})]
    aggs = list(dict.fromkeys(e["aggregator"] for e in entries))
    attacks = list(dict.fromkeys(e["attack"] for e in entries if e["attack"] != NO_ATTACK))
    attacks = attacks or [NO_ATTACK]
    rows = [(g, a) for g in aggs for a in attacks]
    grid = np.full((len(rows), len(fracs)), np.nan)
    text = [["" for _ in fracs] for _ in rows]
    for i, (g, a) in enumerate(rows):
        for j, f in enumerate(fracs):
            e = _find(entries, g, NO_ATTACK if f == 0 else a, f)
            if e is None:
                continue
            if e.get("skipped"):
                text[i][j] = "skip"
            elif e["crashed"]:
                text[i][j] = "CRASH"
            elif e["finite"] is False:
                text[i][j] = "NaN"
            elif e["accuracy"] is not None:
                grid[i, j] = e["accuracy"]
                text[i][j] = f"{100 * e['accuracy']:.1f}"
    fig, ax = plt.subplots(figsize=(max(5.5, 2.6 + 1.1 * len(fracs)), 1.6 + 0.3 * len(rows)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(fracs)):
            v = grid[i, j]
            color = "crimson" if not np.isfinite(v) else "black" if v > 0.6 else "white"
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(len(fracs)), [f"{round(100 * f)}%" for f in fracs])
    ax.set_yticks(range(len(rows)), [f"{g} / {a}" for g, a in rows], fontsize=7)
    ax.set_xlabel("hostile fraction of clients")
    fig.colorbar(im, ax=ax, label="final accuracy")
    ax.set_title("final accuracy (blank: crashed, non-finite or not run)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, bench: dict[str, Any]) -> None:
    (out / "bench-robust.json").write_text(json.dumps(bench, indent=2))
    (out / "bench-robust.md").write_text(format_table(bench) + "\n")
    write_heatmap(bench, out / "bench-robust.png")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

QUICK: dict[str, Any] = {
    "aggregators": (DEFAULT,),
    "attacks": ("sign-flip", "extra-metric"),
    "fractions": (0.3,),
    "teacher": "builtin:micro",
    "num_clients": 6,
    "clients_per_round": 6,
    "rounds": 2,
    "train_rows": 600,
    "eval_rows": 200,
    "test_rows": 300,
    "teacher_epochs": 1,
    "local_epochs": 1,
}

DESCRIPTION = f"""\
Robustness benchmark: final accuracy of aggregator x attack x hostile fraction on the
embedded corpus. Each cell is one federation through Flower's simulation engine with
attack.* set (simulation only), the rest of the project defaults (KD from each client's
fine-tuned teacher, compressed both ways), checkpoints and the local-only baseline off; every
cell shares the written data and one cache of fine-tuned teachers; the 0% cell of each
aggregator is the shared baseline. Writes bench-robust.json, bench-robust.md (table and the
pass/fail targets) and bench-robust.png (heat map) into --out, after every cell.

Default matrix (--matrix targets, 19 cells, ~2 minutes each on 2 cores): every aggregator
at 0%; the project default against {",".join(TARGET_ATTACKS)} at 20%;
every robust rule against sign-flip at 30%. --matrix full: every aggregator
({",".join(AGGREGATORS)}) x attack ({",".join(ATTACKS)}) x fraction
({",".join(f"{f:g}" for f in FRACTIONS)}), 238 cells. Both: 20 clients, 10 per round,
24 rounds, teacher builtin:tiny, 4,000 train rows, 1,000 test rows; the output model is the
last round's global (server.average-last = 0).

--quick (smoke run, 3 cells: each starts Ray): aggregator default; attacks
sign-flip,extra-metric; fraction 0.3; 6 clients all sampled, 2 rounds, teacher builtin:micro
(1 epoch), 600 train rows, 300 test rows. Options given explicitly override it.
See docs/robustness-bench.md."""


def add_arguments(p: Any) -> None:
    import argparse

    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", default="bench-robust-out", help="output folder")
    p.add_argument("--json", action="store_true", help="print bench-robust.json, not the table")
    p.add_argument("--quick", action="store_true", help="smoke-run matrix (above)")
    p.add_argument(
        "--matrix",
        choices=MATRICES,
        help="targets (default): only the cells the targets read; full: every aggregator x "
        "attack x fraction",
    )
    p.add_argument("--aggregators", help="comma-separated subset of: " + ",".join(AGGREGATORS))
    p.add_argument("--attacks", help="comma-separated subset of: " + ",".join(ATTACKS))
    p.add_argument("--fractions", help="comma-separated hostile fractions in (0, 1)")
    p.add_argument("--teacher", help="builtin:tiny|micro|small or a model id")
    for flag in (
        "num-clients",
        "clients-per-round",
        "rounds",
        "train-rows",
        "eval-rows",
        "test-rows",
        "teacher-epochs",
        "local-epochs",
        "seed",
    ):
        p.add_argument(f"--{flag}", type=int)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any run-config key for every cell (repeatable)",
    )


def setting_from_args(args: Any) -> RobustSetting:
    from feddistill.cli import parse_set

    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("aggregators", "attacks"):
        if getattr(args, name):
            values[name] = tuple(x.strip() for x in getattr(args, name).split(",") if x.strip())
    if args.fractions:
        values["fractions"] = tuple(float(x) for x in args.fractions.split(",") if x.strip())
    for f in dataclasses.fields(RobustSetting):
        if f.name in ("out", "aggregators", "attacks", "fractions", "extra", "quick", "matrix"):
            continue
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return RobustSetting(
        out=Path(args.out).expanduser().resolve(),
        extra=parse_set(args.set),
        quick=bool(args.quick),
        matrix=args.matrix or ("full" if args.quick else "targets"),
        **values,
    )


def run_command(args: Any) -> int:
    from feddistill.bench.cli import _quiet_libraries

    try:
        setting = setting_from_args(args)
    except ValueError as err:
        raise SystemExit(f"feddistill bench-robust: {err}") from None
    _quiet_libraries()
    echo = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    bench = run_matrix(setting, echo=echo)
    if args.json:
        print(json.dumps(bench, indent=2))
    else:
        print()
        print(format_table(bench))
        print(f"\nbench-robust.json/.md/.png in {setting.out} ({bench['seconds_total']:.0f} s)")
    return 0
