"""What a benchmark runs: the setting (data, models, recipe) and the named scenarios.

Pure data, no I/O: :mod:`feddistill.bench.run` turns a :class:`BenchSetting` into runs, and the
scenario table below is the one place where a scenario's name meets its config overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from feddistill.config import TeacherConfig, TrainConfig
from feddistill.models.build import FEED_FORWARD, OFFLINE_MINILM

# Scenarios run in this order: the shared teacher cache is filled by the first KD scenario and
# reused by every later one (local-only included).
CENTRALIZED = ("centralized-teacher", "centralized-student")
LOCAL_ONLY = "local-only"
TEACHER_FP32 = "fedavg-teacher-fp32"
ALL_SCENARIOS = (
    *CENTRALIZED,
    "fedavg-student-fp32",
    "feddistill",
    "topk1-q4-noef",
    "down-topk1-q4-ef",
    "topk0.1-q4-ef",
    LOCAL_ONLY,
    TEACHER_FP32,
)
# The BenchSetting field that holds a federated scenario's round count
RoundsField = Literal["rounds", "compressed_rounds", "variant_rounds"]

# The feed-forward blocks of a BERT-style student (MiniLM, BERT): two thirds of each layer's
# weights. The AG News preset froze them in the compressed scenarios before the project froze
# them by default (model.freeze-feed-forward, 2026-12-07); its --compressed-freeze still names
# them, and freezes them where that default is turned off (docs/history.md, the AG News trials).
BERT_FFN = FEED_FORWARD

# The compression variants (ablations of feddistill's defaults) run only when asked for: with
# every teacher trained to its plateau and 4 local epochs in the early rounds, the scenarios
# before them took 55 minutes of the hour on the embedded corpus's 64-token texts on 2 cores
# (docs/benchmarks.md, 2026-12-07 night), and each variant is 20 rounds of feddistill's work.
# What stays answers issue 20's questions: the references (teacher, student, dense FedAvg,
# local-only, teacher FedAvg bytes) and feddistill.
VARIANTS = ("topk1-q4-noef", "down-topk1-q4-ef", "topk0.1-q4-ef")
DEFAULT_SCENARIOS = tuple(s for s in ALL_SCENARIOS if s not in VARIANTS)


@dataclass(frozen=True)
class FederatedScenario:
    """A federation run through ``simulate``: run-config overrides and which round count."""

    overrides: dict[str, Any]
    rounds: RoundsField
    note: str  # the intent; the codecs and strategy actually run are appended from the config

    @property
    def compressed(self) -> bool:
        return self.rounds != "rounds"


FEDERATED: dict[str, FederatedScenario] = {
    "fedavg-student-fp32": FederatedScenario(
        {
            "compression.uplink": "none",
            "compression.downlink": "none",
            "compression.downlink-protocol": "stateless",
            "distill.alpha": 1.0,
            "distill.local-classes-only": False,
            "server.strategy": "fedavg",
            "server.average-last": 0.0,
        },
        rounds="rounds",
        note="plain FedAvg of the student, float32 both ways, no teacher (distill.alpha = 1), "
        "last round's global",
    ),
    "feddistill": FederatedScenario(
        {},
        rounds="compressed_rounds",
        note="project defaults: KD from each client's fine-tuned teacher, compressed both ways",
    ),
    "topk1-q4-noef": FederatedScenario(
        {"compression.uplink": "topk:0.01+q4"},
        rounds="variant_rounds",
        note="KD; uplink top-1% + 4-bit without error feedback",
    ),
    "down-topk1-q4-ef": FederatedScenario(
        {"compression.downlink": "topk:0.01+q4"},
        rounds="variant_rounds",
        note="KD; downlink top-1% + 4-bit (chained, server-side EF)",
    ),
    "topk0.1-q4-ef": FederatedScenario(
        {"compression.uplink": "topk:0.001+q4+ef"},
        rounds="variant_rounds",
        note="KD; uplink top-0.1% + 4-bit with error feedback",
    ),
}


@dataclass(frozen=True)
class BenchSetting:
    """Everything that defines a benchmark run; written to ``bench.json`` as ``setting``.

    ``train``/``test`` are csv/json/jsonl files, or ``embedded`` for the synthetic corpus.
    ``train_rows`` rows of ``train`` are sampled (``seed``) and split over the clients;
    ``eval_rows`` rows of ``test`` give the per-round curve; the final accuracy of every
    scenario is measured on ``test_rows`` rows of ``test`` (0 = all of it).
    """

    out: Path
    train: str = "embedded"
    test: str = ""
    text_column: str = "text"
    label_column: str = "label"
    train_rows: int = 3000
    eval_rows: int = 2000
    test_rows: int = 0
    seed: int = 0
    teacher: str = OFFLINE_MINILM
    student_layers: int = 2
    freeze_embeddings: bool = True
    compressed_freeze: str = ""  # model.freeze in the compressed scenarios only
    max_length: int = 64
    num_clients: int = 10
    clients_per_round: float = 5
    partitioning: str = "dirichlet"
    alpha: float = 0.5
    rounds: int = 10
    compressed_rounds: int = 30
    # The compression variants, when asked for: 20 rounds, compared with feddistill's first 20.
    variant_rounds: int = 20
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    teacher_epochs: int = TeacherConfig().epochs  # the cap; early stopping decides
    teacher_lr: float = 1e-4
    teacher_batch_size: int = 16
    # The project's student recipe (train.lr, train.batch-size, train.local-epochs), not
    # bench-only values: the bench's former lr 3e-4, batch 32 and 1 local epoch (10 steps a
    # round on a 300-row client) left CLINC150 far lower (docs/benchmarks.md, issue 20).
    train_lr: float = TrainConfig().lr
    train_batch_size: int = TrainConfig().batch_size
    local_epochs: int = TrainConfig().local_epochs
    central_epochs: int = 3
    local_only_epochs: int = 3
    extra: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE, every scenario
    preset: str = ""

    def __post_init__(self) -> None:
        unknown = [s for s in self.scenarios if s not in ALL_SCENARIOS]
        if unknown or not self.scenarios:
            raise ValueError(
                f"--scenarios {','.join(self.scenarios)!r}: unknown {unknown}; "
                f"allowed: {','.join(ALL_SCENARIOS)}"
            )
        for name, value in (
            ("--train-rows", self.train_rows),
            ("--eval-rows", self.eval_rows),
            ("--rounds", self.rounds),
            ("--compressed-rounds", self.compressed_rounds),
            ("--variant-rounds", self.variant_rounds),
            ("--num-clients", self.num_clients),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.test_rows < 0:
            raise ValueError(
                f"--test-rows must be >= 0 (0 = the whole test file), got {self.test_rows}"
            )
        if self.train != "embedded" and not self.test:
            raise ValueError("--train FILE needs --test FILE (the held-out evaluation data)")

    def ordered_scenarios(self) -> list[str]:
        return [s for s in ALL_SCENARIOS if s in self.scenarios]

    def rounds_for(self, name: str) -> int:
        return int(getattr(self, FEDERATED[name].rounds))

    def overrides_for(self, name: str) -> dict[str, Any]:
        """Run-config overrides of a federated scenario on top of the setting's config.

        The dense student FedAvg trains every non-embedding weight, as a user of plain FedAvg
        would; ``compressed_freeze`` is part of the feddistill recipe, so only compressed
        scenarios freeze it.
        """
        sc = FEDERATED[name]
        out: dict[str, Any] = {**sc.overrides, "rounds": self.rounds_for(name)}
        if sc.compressed and self.compressed_freeze:
            out["model.freeze"] = self.compressed_freeze
        return out

    def with_(self, **changes: Any) -> BenchSetting:
        return replace(self, **changes)


# The quick variant: the default scenarios on a fifth of the data, so a smoke run ends in
# minutes on 2 CPU cores.
QUICK = {
    "train_rows": 600,
    "eval_rows": 400,
    "test_rows": 1000,
    "rounds": 3,
    "compressed_rounds": 3,
    "variant_rounds": 3,
    "local_only_epochs": 2,
    "central_epochs": 2,
    # A smoke run: the teachers stop at 3 epochs, not at their plateau (7 of at most 10 on
    # the agnews rows, 238 s of the 644 s the whole run took on 2026-12-07).
    "teacher_epochs": 3,
    "scenarios": DEFAULT_SCENARIOS,
}


def find_agnews(repo_root: Path, cwd: Path) -> Path:
    """``<repo>/../shared/data/agnews``, else the same relative to the working directory."""
    tried = []
    for base in (repo_root, cwd):
        folder = (base / ".." / "shared" / "data" / "agnews").resolve()
        tried.append(str(folder))
        if (folder / "train.csv").is_file() and (folder / "test.csv").is_file():
            return folder
    raise FileNotFoundError(
        "--preset agnews needs train.csv and test.csv in ../shared/data/agnews relative to the "
        f"repository root or the working directory; looked in {tried}. Pass --train/--test."
    )
