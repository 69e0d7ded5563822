"""Experiment tracking: every round's figures to TensorBoard or MLflow (``tracking.backend``).

The figures come from the round entries that :meth:`RunRecord.add_round` returns and
``results.json`` holds, and from :attr:`RunRecord.final`, so what a tracker shows equals
``results.json`` by construction; :func:`round_metrics` and :func:`final_metrics` are the only
translation. Metric names, the same for both backends (docs/tracking.md lists them):

    centralized/accuracy, centralized/loss        the server's test set
    federated/<key>, train/<key>                  the round's aggregated client metrics
    bytes/..., compression/ratio_up|down          what crossed the wire (round totals, means)
    round/replies|failures|seconds|elapsed        the round itself
    privacy/<key>                                 a round entry's ``"privacy": {"epsilon": ..}``
                                                  or ``"privacy.epsilon"``, when present
    final/<key>                                   the final figures, at the last round's step

Tracking is a side channel: a missing package is a config error before any training, but any
error of a backend while the run goes on is logged once as a warning, the tracker turns itself
off and the federation carries on.

Resume: ``OUT/tracking.json`` names the MLflow run (or the TensorBoard run folder) and the
last round logged. A resumed run continues that run, first logging the rounds the restored
record holds beyond it (the server stopped between a round's state and its tracking). MLflow
says itself which rounds it holds; TensorBoard is reopened with ``purge_step``, so a round
logged again is shown once. Steps are round numbers.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from feddistill.config import Config, ConfigError, TrackingConfig

if TYPE_CHECKING:
    from feddistill.server.results import RunRecord

log = logging.getLogger("feddistill")

STATE_FILE = "tracking.json"
# backend -> (module imported, package to install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}

# Round-entry field -> metric name. Fields not listed (per-client dicts, failure reasons) stay
# in results.json only.
ROUND_FIELDS = {
    "accuracy": "centralized/accuracy",
    "loss": "centralized/loss",
    "bytes_up": "bytes/up_total",
    "bytes_down": "bytes/down_total",
    "eval_bytes_down": "bytes/eval_down_total",
    "eval_bytes_up": "bytes/eval_up_total",
    "mean_bytes_up_per_client": "bytes/up_mean_per_client",
    "mean_bytes_down_per_client": "bytes/down_mean_per_client",
    "dense_float32_bytes_per_client": "bytes/dense_float32_per_client",
    "compression_ratio_up": "compression/ratio_up",
    "compression_ratio_down": "compression/ratio_down",
    "replies": "round/replies",
    "failures": "round/failures",
    "seconds": "round/seconds",
    "elapsed": "round/elapsed",
    "state_bytes_mean": "client_state/bytes_mean",
    "state_bytes_max": "client_state/bytes_max",
}
# Round-entry field holding a dict of figures -> metric prefix. "privacy" is the hook for the
# privacy accountant: {"privacy": {"epsilon": 1.2}} or {"privacy.epsilon": 1.2} in a round
# entry is logged as privacy/epsilon.
NESTED_FIELDS = {"federated_evaluation": "federated", "train": "train", "privacy": "privacy"}

# What MLflow accepts in a metric name; TensorBoard takes it too.
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


def require_backend(settings: TrackingConfig) -> None:
    """Raise ConfigError naming the package to install when the backend cannot be imported.

    Called before any training (first thing in ``feddistill simulate`` and
    :func:`feddistill.simulation.engine.simulate`, and when the server builds its
    :class:`Tracker`); clients never call it, so they need no tracking package.
    """
    if settings.backend == "none":
        return
    module, package = PACKAGES[settings.backend]
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"tracking.backend = {settings.backend!r} needs the {package} package, which cannot "
            f"be imported ({err}); install it with: pip install 'feddistill[tracking]'"
        ) from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _put(out: dict[str, float], name: str, value: Any) -> None:
    number = _number(value)
    if number is not None:
        out[_NAME_CHARS.sub("_", name)] = number


def round_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """The tracked figures of one results.json round entry; None and non-numbers are left out."""
    out: dict[str, float] = {}
    for key, name in ROUND_FIELDS.items():
        _put(out, name, entry.get(key))
    for key, value in entry.items():
        head, dot, rest = key.partition(".")
        if key in NESTED_FIELDS and isinstance(value, Mapping):
            for k, v in value.items():
                _put(out, f"{NESTED_FIELDS[key]}/{k}", v)
        elif dot and head in NESTED_FIELDS:
            _put(out, f"{NESTED_FIELDS[head]}/{rest}", value)
    return out


def final_metrics(final: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric field of results.json's ``final``, as ``final/<field>``."""
    out: dict[str, float] = {}
    for key, value in final.items():
        _put(out, f"final/{key}", value)
    return out


def config_text(config: Mapping[str, Any]) -> str:
    """The flat config as a Markdown code block of TOML lines (TensorBoard's text tab)."""
    lines = [f"    {key} = {json.dumps(config[key])}" for key in sorted(config)]
    return "\n".join(lines)


class Backend(Protocol):
    """One tracking service; :class:`Tracker` guards every call."""

    def state(self) -> dict[str, Any]:
        """What ``tracking.json`` must hold to continue this run after a resume."""
        ...

    def last_round(self) -> int | None:
        """The last round the run holds, if the backend can tell."""
        ...

    def log_config(self, config: Mapping[str, Any], step: int) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_outputs(self, student_dir: Path, results: Path) -> None: ...

    def close(self, failed: bool) -> None: ...


class TensorBoardBackend:
    """Event files in one run folder (``SummaryWriter``).

    Scalars are TensorBoard's classic float32 ``simple_value``: byte counts above 2**24 lose
    their last digits (results.json and MLflow keep them exact). TensorBoard 2.21's default
    loader shows no float64 scalars at all (``double_precision=True`` was tried), and only
    classic scalars honour ``purge_step``.
    """

    def __init__(self, logdir: str, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = logdir
        # purge_step: TensorBoard hides the earlier events at or after this step, so a round
        # logged again after a resume is shown once.
        self.writer = SummaryWriter(logdir, purge_step=purge_step)

    def state(self) -> dict[str, Any]:
        return {"logdir": self.logdir}

    def last_round(self) -> int | None:
        """Unknown without reading the event files back; ``purge_step`` covers a repeat."""
        return None

    def log_config(self, config: Mapping[str, Any], step: int) -> None:
        self.writer.add_text("config", config_text(config), step)
        self.writer.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a crash loses nothing already logged

    def log_outputs(self, student_dir: Path, results: Path) -> None:
        """TensorBoard keeps no files; the student stays in OUT/student."""

    def close(self, failed: bool) -> None:
        self.writer.close()


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's store set-up logs its SQLite migrations and SQLAlchemy deprecation warnings."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class MlflowBackend:
    """One MLflow run, through ``MlflowClient`` (no global active run, so nothing leaks into
    other code of the process that uses MLflow)."""

    BATCH = 100  # MLflow's limit of params per log_batch call

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        *,
        artifact_location: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        with _quiet_mlflow():
            self.client = MlflowClient(tracking_uri=uri)
            self.uri = uri
            if run_id is not None:
                self.run_id = run_id
                self.client.update_run(run_id, status="RUNNING")
                return
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(experiment, artifact_location=artifact_location)
            )
            run = self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
            self.run_id = run.info.run_id

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def last_round(self) -> int | None:
        """The last step of ``round/seconds`` (every round entry has one): what the run holds,
        even when the server stopped before ``tracking.json`` said so."""
        history = self.client.get_metric_history(self.run_id, ROUND_FIELDS["seconds"])
        return max((m.step for m in history), default=0)

    def log_config(self, config: Mapping[str, Any], step: int) -> None:
        """Config keys as params; params are immutable, so a resumed run logs only new keys
        and records a resumable key's new value (``rounds``) as a ``config.<key>`` tag."""
        from mlflow.entities import Param

        saved = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)) for k, v in sorted(config.items()) if k not in saved]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + self.BATCH])
        for key, value in sorted(config.items()):
            if key in saved and saved[key] != str(value):
                self.client.set_tag(self.run_id, f"config.{key}", str(value))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(name, value, now, step) for name, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_outputs(self, student_dir: Path, results: Path) -> None:
        self.client.log_artifacts(self.run_id, str(student_dir), artifact_path=student_dir.name)
        self.client.log_artifact(self.run_id, str(results))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class Tracker:
    """The run's tracker, a no-op for ``tracking.backend = "none"``.

    Lifecycle: built from the config before any training (raising ConfigError if the backend's
    package is missing) → :meth:`start` once the run record is restored → :meth:`log_round`
    after each round's results.json → :meth:`finish` with the final figures → :meth:`close`
    (also as a context manager, which marks a run that raised as failed).
    """

    def __init__(self, cfg: Config) -> None:
        require_backend(cfg.tracking)
        self.settings = cfg.tracking
        self.out = Path(cfg.output_dir)
        self.config = cfg.to_flat()
        self.backend: Backend | None = None
        self.last_round = 0
        self._finished = False

    @property
    def state_path(self) -> Path:
        return self.out / STATE_FILE

    def start(self, record: RunRecord, *, resumed: bool) -> None:
        """Open (or, resumed, reopen) the run, log the config and any rounds not yet logged."""
        if not resumed:  # a new run here: a later resume must not continue an older one
            self.state_path.unlink(missing_ok=True)
        if self.settings.backend == "none":
            return
        self._guard("start", lambda: self._start(record, resumed))

    def log_round(self, entry: Mapping[str, Any]) -> None:
        """Log one round entry of results.json, with the round number as the step."""
        self._guard("log_round", lambda: self._log_round(entry))

    def finish(self, final: Mapping[str, Any], student_dir: Path) -> None:
        """The final figures at the last round's step, and (MLflow) the student and results."""

        def go(backend: Backend) -> None:
            backend.log_metrics(final_metrics(final), self.last_round)
            backend.log_outputs(Path(student_dir), self.out / "results.json")
            self._finished = True

        self._guard("finish", lambda: go(self._backend()))

    def close(self, failed: bool = False) -> None:
        if self.backend is None:
            return
        backend, self.backend = self.backend, None
        try:
            backend.close(failed or not self._finished)
        except Exception as err:
            self._warn("close", err)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=exc_type is not None)

    # -- internals --------------------------------------------------------------------------
    def _backend(self) -> Backend:
        assert self.backend is not None
        return self.backend

    def _start(self, record: RunRecord, resumed: bool) -> None:
        saved = self._saved_state() if resumed else None
        if saved is not None:
            # Never past the restored record (the tracker logs after results.json, so it is not).
            done = record.rounds[-1]["round"] if record.rounds else 0
            self.last_round = min(int(saved["last_round"]), done)
            try:
                self.backend = self._open(saved)
                logged = self.backend.last_round()
                if logged is not None:
                    self.last_round = min(logged, done)
            except Exception as err:  # e.g. the saved MLflow run was deleted
                log.warning("tracking: cannot continue the saved run (%s); opening a new one", err)
                saved, self.last_round = None, 0
        if saved is None:
            self.backend = self._open(None)
        self._backend().log_config(self.config, self.last_round)
        self._save_state()
        for entry in record.rounds:
            if entry["round"] > self.last_round:
                self._log_round(entry)

    def _open(self, saved: Mapping[str, Any] | None) -> Backend:
        """The saved run again, or a new one named after the output folder and the time."""
        name = self.settings.backend
        run_name = f"{self.out.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if name == "tensorboard":
            if saved is not None:
                logdir = saved["logdir"]
                log.info("tracking: continuing the TensorBoard run in %s", logdir)
                return TensorBoardBackend(logdir, purge_step=self.last_round + 1)
            uri = self.settings.uri
            if "://" in uri:  # a remote log folder (gs://, s3://): no local path maths
                logdir = f"{uri.rstrip('/')}/{run_name}"
            else:
                logdir = str(
                    (Path(uri).expanduser() if uri else self.out / "tensorboard") / run_name
                )
            log.info("tracking: TensorBoard run in %s", logdir)
            return TensorBoardBackend(logdir)
        uri, artifacts = self.settings.uri, None
        if not uri:  # an embedded SQLite store: MLflow 3 refuses a plain file store by default
            store = (self.out / "mlflow").resolve()
            store.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()
        if saved is not None:
            log.info("tracking: continuing MLflow run %s at %s", saved["run_id"], uri)
            return MlflowBackend(uri, self.settings.experiment, run_name, run_id=saved["run_id"])
        from feddistill import __version__

        backend = MlflowBackend(
            uri,
            self.settings.experiment,
            run_name,
            artifact_location=artifacts,
            tags={"feddistill.version": __version__, "feddistill.output-dir": str(self.out)},
        )
        log.info(
            "tracking: MLflow run %s (experiment %r) at %s",
            backend.run_id,
            self.settings.experiment,
            uri,
        )
        return backend

    def _saved_state(self) -> dict[str, Any] | None:
        """The saved run, if it used the same backend and URI; else a new run is opened."""
        try:
            saved = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        same = saved.get("backend") == self.settings.backend and saved.get("uri") == (
            self.settings.uri
        )
        return saved if same else None

    def _save_state(self) -> None:
        # imported here: `feddistill simulate` checks the backend before importing Flower
        from feddistill.server.results import write_json_atomic

        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            self.state_path,
            {
                "backend": self.settings.backend,
                "uri": self.settings.uri,
                "last_round": self.last_round,
                **self._backend().state(),
            },
        )

    def _log_round(self, entry: Mapping[str, Any]) -> None:
        step = int(entry["round"])
        self._backend().log_metrics(round_metrics(entry), step)
        self.last_round = step
        self._save_state()

    def _guard(self, what: str, call: Callable[[], None]) -> None:
        """Run ``call``; on any error warn once, turn tracking off and let the run go on."""
        if self.backend is None and what != "start":
            return
        try:
            call()
        except Exception as err:
            self._warn(what, err)
            backend, self.backend = self.backend, None
            if backend is not None:
                with contextlib.suppress(Exception):
                    backend.close(True)

    def _warn(self, what: str, err: BaseException) -> None:
        log.warning(
            "tracking (%s): %s failed (%s: %s); the run goes on without tracking",
            self.settings.backend,
            what,
            type(err).__name__,
            err,
        )
