"""bench-robust: the matrix, its per-cell sizing, the targets, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from feddistill.bench import robust
from feddistill.bench.robust import NO_ATTACK, Cell, RobustSetting
from feddistill.config import parse_config


def test_cells_share_one_baseline_per_aggregator(tmp_path: Path) -> None:
    setting = RobustSetting(
        out=tmp_path,
        aggregators=("fedavg", "krum"),
        attacks=("sign-flip", "noise"),
        matrix="full",
    )
    out = robust.cells(setting)
    assert len(out) == 2 * (1 + 2 * 3)
    assert [c for c in out if c.attack == NO_ATTACK] == [
        Cell("fedavg", NO_ATTACK, 0.0),
        Cell("krum", NO_ATTACK, 0.0),
    ]


def test_default_matrix_is_the_cells_the_targets_read(tmp_path: Path) -> None:
    out = robust.cells(RobustSetting(out=tmp_path))

    assert len(out) == len(set(out)) == 19
    assert {c.aggregator for c in out if c.attack == NO_ATTACK} == set(robust.AGGREGATORS)
    at_20 = {c.attack for c in out if c.aggregator == robust.DEFAULT and c.fraction == 0.2}
    assert set(robust.MODEL_POISONING) <= at_20
    sign_flip_30 = {c.aggregator for c in out if (c.attack, c.fraction) == ("sign-flip", 0.3)}
    assert sign_flip_30 == set(robust.AGGREGATORS) - {"fedavg", robust.DEFAULT}
    # each target finds its cells: none reads "not checked" once every cell has a result
    ran = [{**robust._cell_entry(RobustSetting(out=tmp_path), c), "accuracy": 0.5} for c in out]
    assert all(t["pass"] is not None for t in robust.check_targets(ran)), robust.check_targets(ran)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.3])
@pytest.mark.parametrize("aggregator", robust.AGGREGATORS)
def test_every_aggregator_is_a_valid_config_at_every_fraction(
    aggregator: str, fraction: float
) -> None:
    over, _ = robust.aggregator_overrides(aggregator, fraction, per_round=10)
    cfg = parse_config(
        {"data.num-clients": 20, "server.clients-per-round": 10.0, **over}
    )  # raises ConfigError if the rule cannot hold with 10 replies
    if aggregator in ("krum", "multikrum"):
        assert cfg.server.num_malicious == max(1, round(10 * fraction))
    if aggregator == "fedtrimmedavg":
        assert int(cfg.server.trim_beta * 10) == max(1, round(10 * fraction))
    if aggregator == "bulyan":
        assert cfg.server.num_malicious == 1  # 4f + 3 <= 10


def test_robust_cells_send_the_shared_pattern_unless_every_cell_was_given_an_uplink(
    tmp_path: Path,
) -> None:
    from feddistill.aggregation import SHARED_UPLINK

    setting = RobustSetting(out=tmp_path)
    for aggregator in robust.AGGREGATORS:
        over, note = robust.cell_overrides(setting, Cell(aggregator, "sign-flip", 0.3))
        robust_rule = aggregator not in ("fedavg", robust.DEFAULT)
        assert (over.get("compression.uplink") == SHARED_UPLINK) == robust_rule
        assert (SHARED_UPLINK in note) == robust_rule
    chosen = RobustSetting(out=tmp_path, extra={"compression.uplink": "none"})
    over, _ = robust.cell_overrides(chosen, Cell("fedmedian", NO_ATTACK, 0.0))
    assert "compression.uplink" not in over  # the base config already holds the user's


def test_summarize_rounds_counts_failures_and_treats_absent_clipped_as_zero() -> None:
    results = {
        "rounds": [
            {"failures": 1, "failure_reasons": ["node 7: invalid payload (magic): bad"]},
            {"failures": 2, "clipped": 3, "round_failure": "inner strategy raised"},
            {  # admission control's form: one entry per clipped reply / capped claim
                "failures": 0,
                "clipped": [{"node": 1, "norm": 9.0, "bound": 3.0}],
                "capped_examples": [{"node": 2, "claimed": 1e12, "cap": 500}],
            },
        ]
    }
    out = robust.summarize_rounds(results)
    assert (out["failures"], out["clipped"], out["failed_rounds"]) == (3, 4, 1)
    assert out["capped_examples"] == 1
    assert out["failure_reasons"] == {"invalid payload (magic)": 1}


def _entry(agg: str, attack: str, frac: float, acc: float | None, **kw: Any) -> dict[str, Any]:
    e = robust._cell_entry(RobustSetting(out=Path(".")), Cell(agg, attack, frac))
    e.update(accuracy=acc, finite=acc is not None)
    e.update(kw)
    return e


def test_targets_pass_and_fail_from_measured_cells() -> None:
    entries = [
        _entry("fedavg", NO_ATTACK, 0.0, 0.80),
        _entry("default", NO_ATTACK, 0.0, 0.79),
        _entry("fedmedian", NO_ATTACK, 0.0, 0.75),  # 5 points below FedAvg
        _entry("default", "sign-flip", 0.2, 0.78),
        _entry("default", "scale-x1e6", 0.2, None, crashed=True, finite=None),
        _entry("fedmedian", "sign-flip", 0.3, 0.74),
        _entry("krum", NO_ATTACK, 0.0, 0.79),
        _entry("krum", "sign-flip", 0.3, 0.77),
    ]
    got = {t["target"]: t["pass"] for t in robust.check_targets(entries)}
    assert got["0%: every aggregator within 2 points of FedAvg"] is False
    assert got["20% sign-flip: project default within 2 points of its 0%"] is True
    assert got["20% scale-x1e6: project default within 2 points of its 0%"] is False
    assert got["20% noise: project default within 2 points of its 0%"] is None  # not run
    assert got["30% sign flip: some aggregator within 3 points"] is True
    assert got["0 server crashes"] is False
    assert got["0 non-finite global models"] is True
    # FedMedian held its own 0% (0.75 -> 0.74), but that 0% is 5 points below FedAvg's: a rule
    # that learns less cannot count as the one that resists (one at chance loses nothing)
    no_krum = [e for e in entries if e["aggregator"] != "krum"]
    got = {t["target"]: t["pass"] for t in robust.check_targets(no_krum)}
    assert got["30% sign flip: some aggregator within 3 points"] is False


def _bench(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A bench-robust.json of ``entries`` with a tiny setting, for the table's tests."""
    return {
        "setting": {
            "rows": {"test": 10},
            "num_clients": 4,
            "clients_per_round": 4,
            "rounds": 1,
            "teacher": "builtin:micro",
            "date": "today",
        },
        "cells": entries,
    }


def test_table_and_heatmap_show_crashes_and_non_finite(tmp_path: Path) -> None:
    entries = [
        _entry("fedavg", NO_ATTACK, 0.0, 0.8),
        _entry("fedavg", "sign-flip", 0.3, None, crashed=True, finite=None),
        _entry("fedavg", "noise", 0.3, None),
    ]
    bench = _bench(entries)
    bench["targets"] = robust.check_targets(entries)
    robust.write_outputs(tmp_path, bench)
    table = (tmp_path / "bench-robust.md").read_text()
    assert "| fedavg | sign-flip | 80.00% (0/0/0) | CRASH |" in table
    assert "| fedavg | noise | 80.00% (0/0/0) | NaN |" in table
    assert "**FAIL** 0 server crashes" in table
    assert (tmp_path / "bench-robust.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_lists_only_the_attacks_each_aggregator_met() -> None:
    entries = [
        _entry("default", NO_ATTACK, 0.0, 0.8),
        _entry("default", "noise", 0.2, 0.7),
        _entry("krum", NO_ATTACK, 0.0, 0.6),
        _entry("krum", "sign-flip", 0.3, 0.5),
        _entry("fedavg", NO_ATTACK, 0.0, 0.75),
    ]
    bench = _bench(entries)
    rows = [line for line in robust.format_table(bench).splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[:2] for r in rows[1:]] == [
        ["| default", "noise"],
        ["| krum", "sign-flip"],
        ["| fedavg", "none"],
    ]


@pytest.mark.slow
def test_tiny_bench_robust_writes_outputs_and_records_a_crashed_cell(tmp_path: Path) -> None:
    # Prepare: 2 aggregators x 1 attack x 2 fractions on 4 tiny clients, 1 round; one cell's
    # run raises as a crashed server would.
    setting = RobustSetting(
        out=tmp_path / "out",
        aggregators=("fedavg", "fedmedian"),
        attacks=("sign-flip",),
        fractions=(0.25, 0.5),
        teacher="builtin:micro",
        num_clients=4,
        clients_per_round=4,
        rounds=1,
        train_rows=240,
        eval_rows=60,
        test_rows=60,
        teacher_epochs=1,
        local_epochs=1,
        extra={"model.student-layers": 1},
        matrix="full",
    )
    crash = Cell("fedmedian", "sign-flip", 0.5)

    def run_cell(runner: robust.CellRunner, cell: Cell) -> dict[str, Any]:
        if cell == crash:
            raise RuntimeError("server stopped")
        return runner(cell)

    # Execute
    bench = robust.run_matrix(setting, run_cell=run_cell, echo=lambda line: None)
    # Assert
    out = setting.out
    saved = json.loads((out / "bench-robust.json").read_text())
    assert len(saved["cells"]) == len(bench["cells"]) == 2 * (1 + 2)
    by_name = {c["name"]: c for c in saved["cells"]}
    crashed = by_name[crash.name]
    assert crashed["crashed"] and "server stopped" in crashed["error"]
    ran = [c for c in saved["cells"] if not c["crashed"]]
    assert all(c["accuracy"] is not None and c["finite"] and c["rounds"] == 1 for c in ran)
    table = (out / "bench-robust.md").read_text()
    assert "CRASH" in table and "**FAIL** 0 server crashes" in table
    assert (out / "bench-robust.png").stat().st_size > 0


def test_doc_commands_parse_to_what_the_doc_says() -> None:
    """Every example command of docs/robustness-bench.md (its ```text blocks) parses (none is
    run here: the quick one takes minutes, the full one most of an hour; the slow test above
    runs the same code)."""
    import re
    import shlex

    from feddistill.cli import build_parser, simulate_config

    doc = (Path(__file__).resolve().parents[1] / "docs" / "robustness-bench.md").read_text()
    blocks = re.findall(r"```text\n(.*?)\n```", doc, flags=re.S)
    commands = [line for b in blocks for line in b.splitlines() if line.startswith("feddistill ")]
    assert len(commands) == 3
    for text in commands:
        argv = shlex.split(text)
        assert argv[0] == "feddistill"
        args = build_parser().parse_args(argv[1:])
        if argv[1] == "simulate":
            cfg = simulate_config(args)
            assert (cfg.attack.kind, cfg.attack.fraction) == ("sign-flip", 0.2)
        else:
            setting = robust.setting_from_args(args)
            assert setting.quick == ("--quick" in argv)
            assert len(robust.cells(setting)) == (3 if setting.quick else 19)
