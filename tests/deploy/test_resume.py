"""Kill the server mid-run and resume: the result equals an uninterrupted run, bit for bit.

Runs ``feddistill simulate`` (Flower's simulation engine) in a subprocess, SIGKILLs it and every
process under it (Ray included) once round 2 is in results.json, and reruns it with
``--set resume=true``. The resumed run must end with 4 rounds, each recorded once, and the final
global student (``checkpoints/round-0004.safetensors`` and ``student/``) must equal, bit for bit,
that of an uninterrupted run with the same seeds (``student/`` is the average of rounds 3 and 4,
so a kill after round 3 also checks the saved running sum).

What makes exact equality possible (each was a real source of difference before it was fixed):
the saved ``random`` state and inner strategy state; replies aggregated in an order that does not
depend on arrival (``ReproducibleGrid``); dropout seeded per client and round (so a client's
round is the same in a fresh worker process); error-feedback residuals kept per round (a round
redone after the kill starts from the same residual, even if a client had already saved the
next one). Every client is sampled every round: in simulation node ids are fresh random numbers
in every process, so a sampled *subset* would differ after a restart (in deployment the
SuperLink keeps node ids, and sorted ids make sampling reproducible).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.deploy.federation import BIN, Processes, base_env, kill_tree

pytestmark = pytest.mark.deploy

SETTINGS = [
    "data.num-examples=1200",  # ~2 s rounds on 2 cores: time to see round 2 and kill in round 3
    "data.num-test=100",
    "data.min-partition-size=20",
    "data.max-length=24",
    "model.teacher=builtin:micro",
    "model.student-layers=1",
    "teacher.epochs=1",
    "train.local-epochs=2",
    "train.lr=0.01",
    "server.evaluate-clients=3",
    "server.local-only=off",
    "compression.uplink=topk:0.1+q8+ef",
    "compression.downlink=topk:0.1+q8",  # the chained downlink: its state must resume too
    "server.average-last=2",  # the output averages rounds 3-4: its running sum must resume too
]


def _simulate(out: Path, *extra: str) -> list[str]:
    argv = [str(BIN / "feddistill"), "simulate", "--num-clients", "3", "--clients-per-round", "3"]
    argv += ["--rounds", "4", "--out", str(out)]
    for setting in [*SETTINGS, *extra]:
        argv += ["--set", setting]
    return argv


def _rounds(results: Path) -> list[int]:
    try:
        return [r["round"] for r in json.loads(results.read_text())["rounds"]]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def test_killed_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, processes: Processes
) -> None:
    env = base_env(tmp_path / "flwr-home")
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    # Execute: start, kill it and everything under it once round 2 is recorded, resume.
    first = processes.start("first", _simulate(killed), env)
    deadline = time.time() + 240
    while len(_rounds(killed / "results.json")) < 2:
        assert first.proc.poll() is None, first.output()
        assert time.time() < deadline, "round 2 never came:\n" + first.output()
        time.sleep(0.05)
    kill_tree(first.proc.pid)
    assert _rounds(killed / "results.json") in ([1, 2], [1, 2, 3]), "killed too late"
    processes.wait(processes.start("resumed", _simulate(killed, "resume=true"), env), 300)
    processes.wait(processes.start("uninterrupted", _simulate(whole), env), 300)

    # Assert: four rounds, each once, a resume event, and the very same final student.
    results = json.loads((killed / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4]
    (event,) = results["events"]
    assert event["event"] == "resume" and event["from_round"] in (2, 3)
    assert results["final"]["rounds_completed"] == 4
    # the run's picture, written by `feddistill simulate` at the end, shows the resume
    assert (killed / "report.png").stat().st_size > 10_000
    assert f"resumed after round {event['from_round']}" in (killed / "report.md").read_text()
    for name in ("checkpoints/round-0004.safetensors", "student/model.safetensors"):
        got, want = load_file(killed / name), load_file(whole / name)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
    reference = json.loads((whole / "results.json").read_text())
    assert [r["loss"] for r in results["rounds"]] == [r["loss"] for r in reference["rounds"]]
