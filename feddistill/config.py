"""One validated configuration, parsed once from the Flower run config.

The Flower run config is a flat mapping of dotted keys (``distill.temperature = 2.0``) coming
from ``pyproject.toml [tool.flwr.app.config]`` merged with ``--run-config`` overrides. We parse
it once into frozen dataclasses; every ``__post_init__`` rejects bad values with a message naming
the key, the value and what is allowed. The server sends the flat form to clients inside each
message, so simulation and deployment share exactly one code path and one source of truth.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from feddistill.aggregation import STRATEGIES, RobustSettingError, requirement, what_works
from feddistill.codec import CompressionSpec, parse_spec
from feddistill.codec.spec import UPLINK_ONLY_SELECTIONS


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"invalid config {key} = {value!r}: expected {allowed}")


def _check_range(
    key: str,
    value: float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    bad = not math.isfinite(value)
    if lo is not None:
        bad = bad or (value <= lo if lo_open else value < lo)
    if hi is not None:
        bad = bad or (value >= hi if hi_open else value > hi)
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_txt = "-inf" if lo is None else f"{lo:g}"
        hi_txt = "inf" if hi is None else f"{hi:g}"
        _fail(key, value, f"a number in {left}{lo_txt}, {hi_txt}{right}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, "one of " + ", ".join(repr(c) for c in choices))


def choices(typ: Any) -> tuple[str, ...] | None:
    """The values of a ``Literal[...]`` field type, None for any other type."""
    return get_args(typ) if get_origin(typ) is Literal else None


def _check_literals(section: Any, prefix: str) -> None:
    """Every ``Literal`` field of ``section`` holds one of its values: the choices are declared
    once, in the field's type, and checked here for every section alike."""
    hints = get_type_hints(type(section))
    for f in dataclasses.fields(section):
        allowed = choices(hints[f.name])
        if allowed is not None:
            key = f"{prefix}.{_key(f.name)}" if prefix else _key(f.name)
            _check_choice(key, getattr(section, f.name), allowed)


Partitioning = Literal["iid", "dirichlet", "shards"]
PARTITIONINGS: tuple[str, ...] = get_args(Partitioning)
LayerSelection = Literal["first", "every-other"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]
Weighting = Literal["examples", "uniform"]
LocalOnly = Literal["auto", "on", "off"]
NormAction = Literal["reject", "clip", "clip-to-median"]
Mode = Literal["simulation", "deployment"]


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is split over clients."""

    source: str = "embedded"
    test_source: str = ""
    labels: str = ""
    text_column: str = "text"
    label_column: str = "label"
    num_examples: int = 4000
    num_test: int = 1000
    num_classes: int = 4
    label_noise: float = 0.1
    num_clients: int = 10
    partitioning: Partitioning = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    val_fraction: float = 0.1
    min_partition_size: int = 10
    max_length: int = 32

    def __post_init__(self) -> None:
        _check_literals(self, "data")
        if not self.source:
            _fail("data.source", self.source, "'embedded', a file path, a folder or a hub name")
        _check_range("data.num-examples", self.num_examples, lo=1)
        _check_range("data.num-test", self.num_test, lo=0)
        _check_range("data.num-classes", self.num_classes, lo=2, hi=6)
        _check_range("data.label-noise", self.label_noise, lo=0, hi=0.9)
        _check_range("data.num-clients", self.num_clients, lo=1)
        _check_range("data.alpha", self.alpha, lo=0, lo_open=True)
        _check_range("data.shards-per-client", self.shards_per_client, lo=1)
        _check_range("data.val-fraction", self.val_fraction, lo=0, hi=0.5)
        _check_range("data.min-partition-size", self.min_partition_size, lo=1)
        _check_range("data.max-length", self.max_length, lo=4, hi=4096)


@dataclass(frozen=True)
class ModelConfig:
    """Teacher and student architecture.

    ``teacher`` is a hub id, a local folder or ``builtin:<name>`` (a small config trained from
    scratch, for tests and the embedded default). ``student = "derived"`` builds the student from
    the teacher: same tokenizer and embeddings, ``student_layers`` of its layers (DistilBERT-style
    initialization), optionally frozen embeddings so only the rest is exchanged. ``freeze`` is a
    regular expression: student parameters whose names it matches (``re.search``) are frozen
    too, so neither trained nor exchanged. ``freeze_feed_forward`` (on by default) freezes the
    feed-forward blocks of a derived student (``intermediate.dense`` and the layer's
    ``output.dense``: two thirds of each layer's weights), which keep the teacher's weights;
    it applies to derived students only, whose layout is known (use ``freeze`` for another
    student). Why on: the pretrained feed-forward blocks stay as they are, a round's 1% of the
    exchanged weights covers the attention, norms and head that have to move, and a round
    moves 2.6 times fewer bytes; on CLINC150 the student ended 6.9 points higher, on AG News
    level, on the embedded corpus +4.2 and -3.8 over two seeds (docs/benchmarks.md,
    2026-12-07).
    """

    teacher: str = "builtin:tiny"
    student: str = "derived"
    student_layers: int = 2
    layer_selection: LayerSelection = "every-other"
    freeze_embeddings: bool = False
    freeze: str = ""
    freeze_feed_forward: bool = True

    def __post_init__(self) -> None:
        _check_literals(self, "model")
        if not self.teacher:
            _fail("model.teacher", self.teacher, "a hub id, a local folder or builtin:<name>")
        if not self.student:
            _fail("model.student", self.student, "'derived', a hub id, a folder or builtin:<name>")
        _check_range("model.student-layers", self.student_layers, lo=1, hi=48)
        try:
            re.compile(self.freeze)
        except re.error as exc:
            _fail("model.freeze", self.freeze, f"a regular expression over parameter names ({exc})")


@dataclass(frozen=True)
class TeacherConfig:
    """Local fine-tuning of each client's teacher (done once per client, then cached).

    Trained to a plateau (:mod:`feddistill.distill.early_stop`) on the client's validation
    split (or, when it has fewer than 20 rows, on ``holdout`` of its training rows, held out):
    training stops once that accuracy has not improved for ``patience`` epochs (but not before
    ``min_epochs``: a teacher trained from scratch can sit at the majority class for its first
    epochs, which reads as a plateau), after ``epochs`` epochs at most, or after
    ``max_minutes``; the best epoch's weights are kept. Without 20 holdout rows either, it
    trains ``epochs`` epochs on all its rows; ``patience = 0`` does so always.

    The classification head starts from random weights on top of a pretrained backbone, so it
    can learn at its own ``head_lr`` (0, the default: at ``lr``). A faster head makes better
    150-class teachers but did not make better students, so it is off by default
    (docs/benchmarks.md, "A faster head for the teacher").
    """

    epochs: int = 10
    lr: float = 1e-3
    head_lr: float = 0.0
    batch_size: int = 8
    patience: int = 2
    min_epochs: int = 5
    holdout: float = 0.1
    max_minutes: float = 5.0

    def __post_init__(self) -> None:
        _check_range("teacher.epochs", self.epochs, lo=0, hi=1000)
        _check_range("teacher.lr", self.lr, lo=0, lo_open=True, hi=1.0)
        _check_range("teacher.head-lr", self.head_lr, lo=0, hi=1.0)
        _check_range("teacher.batch-size", self.batch_size, lo=1)
        _check_range("teacher.patience", self.patience, lo=0, hi=1000)
        _check_range("teacher.min-epochs", self.min_epochs, lo=0, hi=1000)
        _check_range("teacher.holdout", self.holdout, lo=0, hi=0.5)
        _check_range("teacher.max-minutes", self.max_minutes, lo=0, lo_open=True)


@dataclass(frozen=True)
class DistillConfig:
    """``alpha * CE + (1 - alpha) * T^2 * KL`` (Hinton et al. 2015); FedKD-style mutual option.

    ``local_classes_only`` (on by default) keeps a client's absent classes out of both softmaxes:
    on the embedded default it kept the global model from forgetting a class whenever the
    sampled clients lacked it (docs/history.md, "Label-skew remedies").
    """

    alpha: float = 0.8
    temperature: float = 2.0
    mutual: bool = False
    logit_adjust: float = 0.0
    local_classes_only: bool = True
    not_true_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_range("distill.alpha", self.alpha, lo=0, hi=1)
        _check_range("distill.temperature", self.temperature, lo=0, lo_open=True, hi=100)
        _check_range("distill.logit-adjust", self.logit_adjust, lo=0, hi=10)
        _check_range("distill.not-true-weight", self.not_true_weight, lo=0, hi=100)


@dataclass(frozen=True)
class TrainConfig:
    """Client-side training of the received global student in each round.

    ``rising_epochs``: the local epochs of every round until the federated validation accuracy
    stops rising (the least-squares slope of its last 6 evaluated rounds is not above zero);
    from then on ``local_epochs``, for the rest of the run. More local work learns faster in
    rounds (CLINC150, AG News), but once the federation has learned what it can it over-fits
    each client's share (the embedded corpus), docs/aggregation.md "Local work per round" and
    docs/benchmarks.md for what it gained and cost. 0 = off: ``local_epochs`` throughout;
    below ``local_epochs`` it changes nothing (the rule adds local work, never removes it).
    Without a validation curve (``Config.validation_curve``: no validation rows, or
    distributed DP) ``local_epochs`` is used throughout.
    """

    local_epochs: int = 2
    rising_epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 8
    weight_decay: float = 0.0
    device: Device = "auto"
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        _check_literals(self, "train")
        _check_range("train.local-epochs", self.local_epochs, lo=1, hi=1000)
        _check_range("train.rising-epochs", self.rising_epochs, lo=0, hi=1000)
        _check_range("train.lr", self.lr, lo=0, lo_open=True, hi=1.0)
        _check_range("train.batch-size", self.batch_size, lo=1)
        _check_range("train.weight-decay", self.weight_decay, lo=0, hi=1.0)


AverageWhen = Literal["flat", "always"]


@dataclass(frozen=True)
class ServerConfig:
    """Round structure and the Flower strategy that aggregates (decoded) updates.

    ``lr``/``momentum`` drive FedAvgM; ``eta``/``tau`` the adaptive FedAdam/FedYogi/FedAdagrad
    (Reddi et al. 2021); ``proximal_mu`` FedProx; ``trim_beta`` FedTrimmedAvg (the share of
    replies cut from each end of every coordinate); ``num_malicious`` the attackers per round
    that Krum, MultiKrum and Bulyan are sized for; ``multikrum_select`` the replies MultiKrum
    averages (0: the round's replies minus ``num_malicious``); ``robust_step`` the server step
    the robust rules take along the move their rule makes (1: Flower's model exactly; 2 is what
    FedAvgM's ``lr`` takes by default; docs/robustness-bench.md). What the robust rules need per
    round is in :mod:`feddistill.aggregation` and checked in :class:`Config`. ``weighting``:
    each reply counts by its ``num-examples`` (FedAvg's rule) or equally (``uniform``: under
    label skew a few large clients would otherwise pull the global model toward their classes).

    The default is FedAvg with a server step of 2 (FedAvgM without momentum): averaging top-k
    updates shrinks each coordinate that only some clients sent by the share of clients that did
    not, and a step above 1 gives that back (measured against plain FedAvg: docs/history.md,
    AG News trials).

    ``average_last``: the run's output model is the average of the global models of the last
    rounds (< 1: that fraction of ``rounds``, rounded up; >= 1: a count; 0: the last global), so
    that no single round's client sample decides it (docs/aggregation.md, "Averaged output model").
    ``average_when = "flat"`` averages only if the window's federated validation accuracy shows
    no rising trend (else the last global is the output: averaging a model that is still
    learning returns an older one); ``always`` averages regardless. The validation accuracy
    is ``Config.validation_curve``'s; without one there is no trend to judge and the window is
    averaged.

    ``evaluate_clients``: federated evaluation of each round's global on that many clients (0,
    the default: none). Off by default: with the chained downlink each evaluation message carries
    the model versions its node lacks, bytes spent on measuring, where the training clients'
    arrival figures give the rules the same kind of curve, one round later, at no extra bytes
    (docs/benchmarks.md, "The bytes of federated evaluation").

    Admission control (docs/robustness.md): ``max_examples_factor`` caps a reply's
    ``num-examples`` at that multiple of the round's median claim where the server does not
    know the node's data (deployment; 0 = off); updates whose L2 norm exceeds
    ``max_update_norm_ratio`` times the round's median norm, or ``max_update_norm``, are
    scaled down to the round's median norm, to the bound, or rejected (``update_norm_action``;
    0 = that bound off); an update whose cosine with the sum of the round's other updates'
    directions is below ``min_update_cosine`` is rejected (-1 = off): a sign-flipped update has
    an honest norm.

    ``max_failed_rounds``: after that many rounds in a row left the global unchanged (no valid
    reply, or aggregation failed) the run stops early, keeps the last global as its output and
    says why in ``results.json`` (``final.stopped``): when every client refuses the run config
    or every payload is rejected, more rounds only repeat the failure (0 = never stop).
    """

    strategy: str = "fedavgm"
    clients_per_round: float = 5.0
    evaluate_clients: float = 0.0
    min_replies: int = 1
    round_timeout: float = 600.0
    lr: float = 2.0
    eta: float = 0.01
    tau: float = 1e-3
    proximal_mu: float = 0.01
    momentum: float = 0.0
    trim_beta: float = 0.2
    num_malicious: int = 1
    multikrum_select: int = 0
    robust_step: float = 1.0
    local_only: LocalOnly = "auto"
    local_only_epochs: int = 10
    weighting: Weighting = "examples"
    average_last: float = 0.25
    average_when: AverageWhen = "flat"
    max_examples_factor: float = 10.0
    max_update_norm_ratio: float = 5.0
    max_update_norm: float = 0.0
    update_norm_action: NormAction = "clip-to-median"
    min_update_cosine: float = -1.0
    max_failed_rounds: int = 3

    def __post_init__(self) -> None:
        _check_literals(self, "server")
        _check_choice("server.strategy", self.strategy, tuple(STRATEGIES))
        for key, value in (
            ("server.clients-per-round", self.clients_per_round),
            ("server.evaluate-clients", self.evaluate_clients),
        ):
            _check_range(key, value, lo=0)
            if value >= 1 and value != int(value):
                _fail(key, value, "a fraction in (0, 1) or a whole number of clients")
        if self.clients_per_round == 0:
            _fail("server.clients-per-round", 0, "a fraction in (0, 1) or a count >= 1")
        _check_range("server.min-replies", self.min_replies, lo=1)
        _check_range("server.round-timeout", self.round_timeout, lo=0, lo_open=True)
        _check_range("server.lr", self.lr, lo=0, lo_open=True)
        _check_range("server.eta", self.eta, lo=0, lo_open=True)
        _check_range("server.tau", self.tau, lo=0, lo_open=True)
        _check_range("server.proximal-mu", self.proximal_mu, lo=0)
        _check_range("server.momentum", self.momentum, lo=0, hi=1)
        # Flower's trim_mean refuses 0.5 (it would cut every reply) in every round.
        _check_range("server.trim-beta", self.trim_beta, lo=0, hi=0.5, hi_open=True)
        _check_range("server.num-malicious", self.num_malicious, lo=0, hi=10_000)
        _check_range("server.multikrum-select", self.multikrum_select, lo=0, hi=100_000)
        _check_range("server.robust-step", self.robust_step, lo=0, hi=10, lo_open=True)
        try:
            requirement(self)
        except RobustSettingError as err:
            msg = f"invalid config server.strategy = {self.strategy!r}: {err}"
            raise ConfigError(msg) from None
        _check_range("server.local-only-epochs", self.local_only_epochs, lo=1, hi=10_000)
        _check_range("server.average-last", self.average_last, lo=0, hi=100_000)
        for key, value in (
            ("server.max-examples-factor", self.max_examples_factor),
            ("server.max-update-norm-ratio", self.max_update_norm_ratio),
        ):
            _check_range(key, value, lo=0)
            if 0 < value < 1:
                _fail(key, value, "0 (off) or a factor >= 1 (below 1 refuses typical replies)")
        _check_range("server.max-update-norm", self.max_update_norm, lo=0)
        _check_range("server.min-update-cosine", self.min_update_cosine, lo=-1, hi=1)
        _check_range("server.max-failed-rounds", self.max_failed_rounds, lo=0, hi=100_000)
        if self.average_last >= 1 and self.average_last != int(self.average_last):
            _fail(
                "server.average-last",
                self.average_last,
                "0 (off), a fraction of the rounds in (0, 1) or a whole number of rounds",
            )

    def num_sampled(self, value: float, num_clients: int) -> int:
        """Clients for a round: ``value`` < 1 is a fraction of ``num_clients``, else a count."""
        count = round(value * num_clients) if value < 1 else int(value)
        return max(1, min(count, num_clients))


DownlinkProtocol = Literal["chain", "stateless"]


@dataclass(frozen=True)
class CompressionConfig:
    """Codec specs for each direction (grammar in :func:`feddistill.codec.parse_spec`) and how
    the broadcast travels.

    Defaults: clients send the top 1% of each tensor of their update, 4-bit with per-chunk
    scales, keeping what was dropped for the next round (error feedback); the server sends the
    top 5% of each tensor of ``global - broadcast`` as a chained delta with server-side error
    feedback. Five clients' 1% uplinks cover up to 5% of the weights, so a 5% downlink keeps up
    with them; at 1-2% the broadcast model lagged the global and accuracy dropped
    (docs/history.md, format-1 tables).

    ``downlink_protocol``: ``chain`` sends each node the compressed deltas it missed (server-side
    error feedback keeps what a delta left out for the next one; nodes hold the versions they
    have); ``stateless`` sends every node ``encode(global - initial)``, which any node can apply
    with nothing kept, at the price of losing what a pruned spec drops. Before this key the
    protocol was read from an ``ef`` token in the downlink spec; that spelling still reads as
    ``chain`` with a logged deprecation note and is rewritten without the token.
    """

    uplink: str = "topk:0.01+q4+ef"
    downlink: str = "topk:0.05+q4"
    downlink_protocol: DownlinkProtocol = "chain"
    max_payload_mb: float = 512.0

    def __post_init__(self) -> None:
        _check_literals(self, "compression")
        specs = {}
        for name, key, text in (
            ("uplink", "compression.uplink", self.uplink),
            ("downlink", "compression.downlink", self.downlink),
        ):
            try:
                specs[name] = parse_spec(text)
            except ValueError as err:
                raise ConfigError(f"invalid config {key} = {text!r}: {err}") from None
        down = specs["downlink"]
        if down.select in UPLINK_ONLY_SELECTIONS:
            raise ConfigError(
                f"invalid config compression.downlink = {self.downlink!r}: `{down.select}` shares "
                "the clients' coordinates of a round, for the uplink; the broadcast has one "
                "sender, so send what changed most (e.g. 'topk:0.05+q4')"
            )
        if down.error_feedback:
            plain = dataclasses.replace(down, error_feedback=False)
            if self.downlink_protocol != "chain":
                raise ConfigError(
                    f"invalid config compression.downlink = {self.downlink!r} with "
                    f"compression.downlink-protocol = {self.downlink_protocol!r}: on the "
                    "downlink `ef` was the old way to ask for the chained protocol; write "
                    f"compression.downlink = {plain.to_string()!r} (the protocol is its own key)"
                )
            logging.getLogger("feddistill").warning(
                f"compression.downlink = {self.downlink!r}: the `ef` token no longer selects "
                "the chained downlink; write compression.downlink = "
                f"{plain.to_string()!r} and compression.downlink-protocol = 'chain' (the "
                "default). Read as that (deprecated spelling).",
            )
            down = plain
            object.__setattr__(self, "downlink", plain.to_string())
        # Parsed once, here; not dataclass fields, so the flat config keeps the text.
        object.__setattr__(self, "_uplink_spec", specs["uplink"])
        object.__setattr__(self, "_downlink_spec", down)
        _check_range("compression.max-payload-mb", self.max_payload_mb, lo=0, lo_open=True)

    @property
    def chained(self) -> bool:
        """The downlink is a chain of deltas (``downlink_protocol = "chain"``)."""
        return self.downlink_protocol == "chain"

    @property
    def uplink_spec(self) -> CompressionSpec:
        """``uplink`` parsed (every consumer reads this, none parses the text again)."""
        return self._uplink_spec  # type: ignore[attr-defined,no-any-return]

    @property
    def downlink_spec(self) -> CompressionSpec:
        """``downlink`` parsed."""
        return self._downlink_spec  # type: ignore[attr-defined,no-any-return]


@dataclass(frozen=True)
class CacheConfig:
    """Node-local client state on disk (fine-tuned teachers, logits, residuals).

    ``max_mb`` bounds the cache of fine-tuned teachers per node folder (0 = unbounded): the least
    recently used are evicted and recomputed when their client is sampled again. Residuals are
    never evicted (dropping one would silently lose error feedback).
    """

    max_mb: float = 0.0

    def __post_init__(self) -> None:
        _check_range("cache.max-mb", self.max_mb, lo=0)


PrivacyMode = Literal["none", "central", "distributed"]
PRIVACY_MODES: tuple[str, ...] = get_args(PrivacyMode)


@dataclass(frozen=True)
class SecureConfig:
    """Secure aggregation (SecAgg+ over compressed updates; docs/secure-aggregation.md).

    With ``aggregation`` on, the server learns only the sum of a round's updates: each client
    sends its update on the round's shared random coordinates (``keep`` of them, drawn from a
    seed the server announces; error feedback keeps the rest), each value clipped to
    ``[-clip, clip]`` and stochastically rounded to ``bits`` bits, masked in ``Z_{2^m}`` with
    ``m = bits + ceil(log2(clients per round))``. Up to ``dropout`` of a round's clients may
    drop out after the masks are set up; beyond that the round fails (global unchanged).

    Why a tenth and not the plain uplink's 1%: a random pattern sends a coordinate once every
    ``1 / keep`` rounds on average, and at 1% the embedded default had not left chance after 13
    rounds; at 10% it learns, and the message stays over 50x below Flower's SecAgg+
    (docs/secure-aggregation.md). ``clip``: an accumulated residual sent every ~10 rounds is
    larger than one round's update; 5-bit levels over ``[-0.05, 0.05]`` are 0.003 apart.
    """

    aggregation: bool = False
    bits: int = 5
    clip: float = 0.05
    keep: float = 0.1
    dropout: float = 0.3

    def __post_init__(self) -> None:
        _check_range("secure.bits", self.bits, lo=1, hi=24)
        _check_range("secure.clip", self.clip, lo=0, lo_open=True, hi=1e6)
        _check_range("secure.keep", self.keep, lo=0, lo_open=True, hi=1)
        # Shamir threshold t = n - floor(dropout * n) must stay above n / 2: below it, the
        # shares of one client's two secrets could both be asked for by different survivors.
        _check_range("secure.dropout", self.dropout, lo=0, hi=0.5, hi_open=True)

    def threshold(self, clients: int) -> int:
        """Shares needed to recover a round of ``clients``: all but the tolerated dropouts."""
        return max(2, clients - math.floor(self.dropout * clients))


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy, DP-FedAvg style (docs/privacy.md).

    ``mode = "central"``: each client clips its update (after error feedback, before
    compression) to L2 norm ``clip``; the server samples clients by Poisson sampling (rate
    ``server.clients-per-round / data.num-clients``) and adds Gaussian noise of standard
    deviation ``noise_multiplier * clip`` to the sum of the updates (the server is trusted).
    ``noise_multiplier = 0`` derives it from ``target_epsilon`` for the planned ``rounds``.
    ``delta = 0`` means ``1 / N^1.1``. ``mode = "distributed"`` (with secure aggregation): the
    clients add integer Skellam noise inside their masked vectors instead, the server never
    sees an update (:mod:`feddistill.secagg.distributed`). ``adaptive_clip``: the clip follows the
    ``target_quantile`` of the update norms (Andrew et al. 2021) at rate ``clip_lr``, starting
    at ``clip``; the clipped count gets noise of std ``clipped_count_stddev`` (0: the
    expected clients per round / 20, the paper's choice).
    """

    mode: PrivacyMode = "none"
    clip: float = 1.0
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clipped_count_stddev: float = 0.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 0.0

    def __post_init__(self) -> None:
        _check_literals(self, "privacy")
        _check_range("privacy.clip", self.clip, lo=0, lo_open=True)
        _check_range("privacy.target-quantile", self.target_quantile, lo=0, hi=1)
        _check_range("privacy.clip-lr", self.clip_lr, lo=0, lo_open=True, hi=10)
        _check_range("privacy.clipped-count-stddev", self.clipped_count_stddev, lo=0)
        _check_range("privacy.noise-multiplier", self.noise_multiplier, lo=0, hi=1e4)
        _check_range("privacy.target-epsilon", self.target_epsilon, lo=0, hi=1e3)
        _check_range("privacy.delta", self.delta, lo=0, hi=1, hi_open=True)
        if self.mode == "none":
            return
        if (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            _fail(
                "privacy.noise-multiplier",
                self.noise_multiplier,
                "exactly one of privacy.noise-multiplier > 0 or privacy.target-epsilon > 0 "
                f"with privacy.mode = {self.mode!r} (privacy.target-epsilon = "
                f"{self.target_epsilon:g})",
            )
        if self.mode == "distributed" and self.adaptive_clip:
            raise ConfigError(
                "invalid config privacy.adaptive-clip = true with privacy.mode = 'distributed': "
                "the clipped count would have to be summed securely too (not built); expected "
                "privacy.adaptive-clip = false"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def central(self) -> bool:
        """The server adds the noise (and samples by Poisson sampling)."""
        return self.mode == "central"

    @property
    def distributed(self) -> bool:
        """The clients add the noise inside their masked vectors (secure aggregation)."""
        return self.mode == "distributed"


TrackingBackend = Literal["none", "tensorboard", "mlflow"]
TRACKING_BACKENDS: tuple[str, ...] = get_args(TrackingBackend)


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking of every round's figures (:mod:`feddistill.server.tracking`).

    ``uri`` empty: TensorBoard writes under ``OUT/tensorboard``, MLflow keeps an embedded
    SQLite store under ``OUT/mlflow``; otherwise it is passed as is (a TensorBoard log folder,
    an MLflow tracking URI such as ``http://host:5000`` or ``sqlite:///mlflow.db``). The
    backend's package is checked when the server starts, not here: clients parse this config
    too and need no tracking package.
    """

    backend: TrackingBackend = "none"
    uri: str = ""
    experiment: str = "feddistill"

    def __post_init__(self) -> None:
        _check_literals(self, "tracking")
        if not self.experiment.strip():
            _fail("tracking.experiment", self.experiment, "a non-empty experiment name")


AttackKind = Literal[
    "none",
    "sign-flip",
    "scale",
    "noise",
    "label-flip",
    "free-rider",
    "garbage",
    "extra-metric",
    "missing-metric",
    "inflate-examples",
    "replay",
]
ATTACK_KINDS: tuple[str, ...] = get_args(AttackKind)


@dataclass(frozen=True)
class AttackConfig:
    """Simulation only: turn ``fraction`` of the clients hostile (:mod:`feddistill.attacks`).

    Which partitions are hostile is a function of ``seed``, ``fraction`` and
    ``data.num-clients`` alone, so every process agrees and a run repeats. ``scale`` multiplies
    the update (``kind = "scale"``); ``noise_std`` is the standard deviation of the Gaussian
    noise added to it (``noise``); ``inflate`` multiplies the reported ``num-examples``
    (``inflate-examples``). With ``kind = "none"`` (the default) nothing here runs at all.
    """

    kind: AttackKind = "none"
    fraction: float = 0.0
    scale: float = 100.0
    noise_std: float = 1.0
    inflate: float = 1e6
    seed: int = 0

    def __post_init__(self) -> None:
        _check_literals(self, "attack")
        _check_range("attack.fraction", self.fraction, lo=0, hi=1)
        _check_range("attack.scale", self.scale, lo=-1e30, hi=1e30)
        _check_range("attack.noise-std", self.noise_std, lo=0, hi=1e30)
        _check_range("attack.inflate", self.inflate, lo=0, lo_open=True, hi=1e30)
        _check_range("attack.seed", self.seed, lo=0)

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.fraction > 0


@dataclass(frozen=True)
class Config:
    """The whole run: one instance, shared by the server and (via messages) the clients.

    ``mode`` says where client data lives: ``simulation`` partitions ``data.source`` over
    virtual nodes by ``partition-id``; ``deployment`` means each device reads its own
    ``data-path`` and the server only knows the label set (``data.labels`` or ``data.source``).
    """

    rounds: int = 30
    seed: int = 0
    mode: Mode = "simulation"
    output_dir: str = "feddistill-out"
    cache_dir: str = ""
    checkpoints: bool = True
    resume: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure: SecureConfig = field(default_factory=SecureConfig)

    def __post_init__(self) -> None:
        _check_range("rounds", self.rounds, lo=1, hi=100_000)
        _check_range("seed", self.seed, lo=0)
        _check_literals(self, "")
        if not self.output_dir:
            _fail("output-dir", self.output_dir, "a folder path")
        if self.mode == "deployment" and self.attack.kind != "none":
            raise ConfigError(
                f"invalid config attack.kind = {self.attack.kind!r}: attacks are simulation "
                "only and refused with mode = 'deployment' (real devices would send the "
                "poisoned updates); expected attack.kind = 'none' or mode = 'simulation'"
            )
        self._check_robust_rule()
        if 60.0 * self.teacher.max_minutes > self.server.round_timeout:
            raise ConfigError(
                f"invalid config teacher.max-minutes = {self.teacher.max_minutes:g}: a client "
                "fine-tunes its teacher inside its first round, which server.round-timeout = "
                f"{self.server.round_timeout:g} s ends; expected teacher.max-minutes at most "
                f"{self.server.round_timeout / 60:g}, or a larger server.round-timeout"
            )
        self._check_privacy()
        self._check_secure()

    @property
    def validation_curve(self) -> Literal["federated", "arrival", ""]:
        """Where the server reads the federated validation accuracy of each round's global,
        which the output rule and the local-work rule judge (docs/aggregation.md, "The
        validation curve"): ``federated`` with federated evaluation on
        (``server.evaluate-clients`` > 0); else ``arrival``, the training clients' own figures
        for the global they received, sent with their updates; "" when there is none (no
        validation rows, or distributed DP, whose clients report nothing but the noisy sum)."""
        if self.server.evaluate_clients > 0:
            return "federated"
        if self.data.val_fraction == 0 or self.privacy.distributed:
            return ""
        return "arrival"

    def _check_secure(self) -> None:
        """Secure aggregation gives the server a sum: only mean-based rules can use it."""
        if not self.secure.aggregation:
            return
        s = self.server
        if not STRATEGIES[s.strategy].composes_with_dp:  # the same property: the mean suffices
            ok = ", ".join(repr(k) for k, v in STRATEGIES.items() if v.composes_with_dp)
            raise ConfigError(
                f"invalid config server.strategy = {s.strategy!r} with secure.aggregation = "
                "true: the server learns only the sum of the updates, and this robust rule "
                f"needs each update on its own; expected one of {ok}"
            )
        if s.weighting != "uniform":
            raise ConfigError(
                f"invalid config server.weighting = {s.weighting!r} with secure.aggregation = "
                "true: the masked sum counts every client once (weighting by num-examples "
                "would need each client's count and update apart); expected "
                "server.weighting = 'uniform'"
            )
        if self.privacy.central:
            raise ConfigError(
                f"invalid config privacy.mode = {self.privacy.mode!r} with secure.aggregation "
                "= true: central DP adds its noise at the server to updates it can see; with "
                "secure aggregation the clients add it; expected privacy.mode = 'distributed' "
                "or 'none'"
            )
        per_round = s.num_sampled(s.clients_per_round, self.data.num_clients)
        if per_round < 3:
            _fail(
                "server.clients-per-round",
                s.clients_per_round,
                f"at least 3 clients per round with secure.aggregation = true (got {per_round}):"
                " with two, each learns the other's update from the sum",
            )

    def _check_privacy(self) -> None:
        """Central DP needs a mean-based rule, uniform weights and a delta below 1/N."""
        if not self.privacy.enabled:
            return
        if self.privacy.distributed and not self.secure.aggregation:
            raise ConfigError(
                "invalid config privacy.mode = 'distributed' with secure.aggregation = false: "
                "the clients' noise shares protect only a sum the server cannot see apart; "
                "expected secure.aggregation = true, or privacy.mode = 'central'"
            )
        s = self.server
        if not STRATEGIES[s.strategy].composes_with_dp:
            ok = ", ".join(repr(k) for k, v in STRATEGIES.items() if v.composes_with_dp)
            raise ConfigError(
                f"invalid config server.strategy = {s.strategy!r} with privacy.mode = "
                f"{self.privacy.mode!r}: the noise of central DP covers the mean of the "
                "clipped updates, but this robust rule looks at each update on its own, "
                f"which the noise does not protect; expected one of {ok}, or privacy.mode = 'none'"
            )
        if s.weighting != "uniform":
            raise ConfigError(
                f"invalid config server.weighting = {s.weighting!r} with privacy.mode = "
                f"{self.privacy.mode!r}: weighting by num-examples lets one client with many "
                "examples move the mean by more than privacy.clip / m, which the noise is "
                "calibrated for; expected server.weighting = 'uniform'"
            )
        n = self.data.num_clients
        if self.privacy.delta >= 1 / n:
            _fail(
                "privacy.delta",
                self.privacy.delta,
                f"0 (1/N^1.1) or a number below 1/data.num-clients = {1 / n:.3g}: a larger "
                "delta allows releasing one client's data whole",
            )

    def _check_robust_rule(self) -> None:
        """A robust rule that cannot hold even when every sampled client replies is an error.

        (Where only dropouts can break it, the server warns at start and fails such rounds:
        :mod:`feddistill.strategies.robust`.)
        """
        s, clients = self.server, self.data.num_clients
        req = requirement(s)
        expected = s.num_sampled(s.clients_per_round, clients)
        if req is None or expected >= req.needed:
            return
        more = f" and data.num-clients >= {req.needed}" if clients < req.needed else ""
        other = what_works(s, expected)
        other = f", or {other}" if other else f" (no setting of it works with {expected})"
        raise ConfigError(
            f"invalid config server.strategy = {s.strategy!r}: {req.rule} needs at least "
            f"{req.needed} replies per round, but a round samples {expected} "
            f"(server.clients-per-round = {s.clients_per_round:g}, data.num-clients = {clients}); "
            f"expected server.clients-per-round >= {req.needed}{more}{other}"
        )

    def to_flat(self) -> dict[str, Any]:
        """The flat, dotted-key form (what ``--run-config`` and pyproject use)."""
        return _flatten(self)

    def to_json(self) -> str:
        return json.dumps(self.to_flat(), sort_keys=True)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        return parse_config({**self.to_flat(), **overrides})


def _key(name: str) -> str:
    return name.replace("_", "-")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + _key(f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flatten(value, key + "."))
        else:
            out[key] = value
    return out


_SCALARS: dict[type, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    bool: (bool,),
    str: (str,),
}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    allowed = choices(typ)
    if allowed is not None:
        if not isinstance(value, str):  # `--set server.local-only=false` arrives as a bool
            _check_choice(key, value, allowed)
        typ = str  # which string is checked by the section (_check_literals)
    # bool is an int subclass: refuse `rounds = true` and `distill.mutual = 1` alike.
    ok = isinstance(value, _SCALARS[typ]) and (typ is bool or not isinstance(value, bool))
    if not ok:
        _fail(key, value, _TYPE_NAMES[typ])
    return float(value) if typ is float else value


def _build(cls: type, flat: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + _key(f.name)
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, flat, key + ".")
        elif key in flat:
            kwargs[f.name] = _coerce(key, flat.pop(key), typ)
    return cls(**kwargs)


def known_keys() -> list[str]:
    return sorted(Config().to_flat())


def parse_config(flat: Mapping[str, Any]) -> Config:
    """Parse a flat run config; unknown keys, wrong types and bad values raise ConfigError."""
    remaining = dict(flat)
    config = _build(Config, remaining, "")
    down = flat.get("compression.downlink")
    if (
        isinstance(down, str)
        and "compression.downlink-protocol" not in flat
        and down == config.compression.downlink  # `+ef` was already read (and noted) as chain
    ):
        logging.getLogger("feddistill").warning(
            "compression.downlink = %r goes out as a chain of deltas "
            "(compression.downlink-protocol = 'chain', the default); before that key existed a "
            "downlink spec without `ef` meant the stateless protocol: set "
            "compression.downlink-protocol = 'stateless' for it",
            down,
        )
    if remaining:
        key = sorted(remaining)[0]
        close = difflib.get_close_matches(key, known_keys(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown config key {key!r} (value {remaining[key]!r}){hint} "
            "Run `feddistill config` to list every key."
        )
    return config


def config_from_json(text: str) -> Config:
    return parse_config(json.loads(text))


# -- Reference --------------------------------------------------------------------------------
# One line per key, the only place key descriptions live: `feddistill config --markdown` renders
# them with each key's type, default and allowed values into docs/configuration.md, and a test
# fails when a key has no line here or when the doc and the code disagree.
DESCRIPTIONS: dict[str, str] = {
    "rounds": "number of federated rounds",
    "seed": "seed of the corpus sample, partitions, model initialization and client sampling",
    "mode": "`simulation`: partition `data.source` over virtual nodes; `deployment`: each "
    "SuperNode reads its own `data-path`",
    "output-dir": "folder of results.json, student/, checkpoints/ and the server state",
    "cache-dir": "node-local client state (teachers, logits, residuals); empty = OUT/cache",
    "checkpoints": "write the global student of every round to OUT/checkpoints/",
    "resume": "continue from the last completed round saved in OUT/state/",
    "data.source": "`embedded` (offline synthetic corpus), a csv/json/jsonl/parquet file, a "
    "save_to_disk folder or a hub dataset name",
    "data.test-source": "centralized test set evaluated every round (empty: the embedded "
    "corpus's own test split, none otherwise)",
    "data.labels": "comma-separated class names in class-id order (deployment: the label set)",
    "data.text-column": "text column of a file or hub dataset",
    "data.label-column": "label column of a file or hub dataset",
    "data.num-examples": "training sentences of the embedded corpus",
    "data.num-test": "test sentences of the embedded corpus",
    "data.num-classes": "classes of the embedded corpus",
    "data.label-noise": "fraction of embedded training labels flipped",
    "data.num-clients": "number of clients (simulation: virtual nodes; deployment: SuperNodes "
    "expected)",
    "data.partitioning": "`iid`, `dirichlet` label skew, or `shards` (fixed classes per client)",
    "data.alpha": "Dirichlet concentration for `dirichlet` (smaller = more skewed)",
    "data.shards-per-client": "classes per client for `shards`",
    "data.val-fraction": "share of each client's partition held out as its validation split "
    "(the run's validation curve)",
    "data.min-partition-size": "smallest client partition accepted (smaller is an error)",
    "data.max-length": "tokens per text after truncation",
    "model.teacher": "teacher: hub id, local folder, `builtin:tiny|micro|small` or "
    "`offline:all-minilm-l6-v2`",
    "model.student": "`derived` (layers of the teacher) or a model id, folder or `builtin:` spec",
    "model.student-layers": "teacher layers a derived student keeps",
    "model.layer-selection": "which layers a derived student keeps: `every-other` "
    "(DistilBERT-style) or `first`",
    "model.freeze-embeddings": "freeze the student's embeddings (not trained, not exchanged)",
    "model.freeze": "regular expression over student parameter names to freeze as well "
    "(empty: none)",
    "model.freeze-feed-forward": "freeze a derived student's feed-forward blocks (they keep the "
    "teacher's weights; not trained, not exchanged)",
    "teacher.epochs": "most epochs of local teacher fine-tuning (once per client, then cached)",
    "teacher.patience": "stop the teacher after this many epochs without a better holdout "
    "accuracy, keeping the best epoch (0: train teacher.epochs on all rows)",
    "teacher.min-epochs": "the teacher's early stopping never stops before this many epochs",
    "teacher.holdout": "share of a client's training rows the teacher's early stopping is "
    "judged on (not trained on)",
    "teacher.max-minutes": "stop the teacher's fine-tuning after the first epoch that ends past "
    "this many minutes (best epoch so far kept); below server.round-timeout",
    "teacher.lr": "learning rate of teacher fine-tuning",
    "teacher.head-lr": "learning rate of the teacher's classification head, the layer no "
    "checkpoint holds (0 = teacher.lr)",
    "teacher.batch-size": "batch size of teacher fine-tuning",
    "distill.alpha": "weight of the label loss; 1 - alpha goes to the teacher's soft labels",
    "distill.temperature": "softmax temperature T of distillation (KL scaled by T^2)",
    "distill.mutual": "FedKD-style mutual distillation: the teacher also learns from the student",
    "distill.logit-adjust": "tau of logit adjustment by the local label prior (0 = off)",
    "distill.local-classes-only": "leave classes absent from a client's data out of its "
    "softmaxes (restricted softmax)",
    "distill.not-true-weight": "beta of FedNTD not-true distillation from the received model "
    "(0 = off)",
    "train.local-epochs": "local epochs of distillation per round (once the federated "
    "validation accuracy has stopped rising, with train.rising-epochs on)",
    "train.rising-epochs": "local epochs per round until the federated validation accuracy "
    "stops rising (slope of its last 6 evaluated rounds <= 0); 0 = train.local-epochs throughout",
    "train.lr": "client learning rate (AdamW)",
    "train.batch-size": "client batch size",
    "train.weight-decay": "client AdamW weight decay",
    "train.device": "`auto` (CUDA when the node has a GPU assigned), `cpu` or `cuda`",
    "train.precision": "autocast precision on CUDA",
    "server.strategy": "Flower strategy that aggregates the decoded updates",
    "server.clients-per-round": "clients trained per round: a fraction in (0, 1) or a count",
    "server.evaluate-clients": "clients in federated evaluation per round: fraction or count; "
    "0: none, the validation curve comes from the training clients (docs/aggregation.md)",
    "server.min-replies": "fewer valid replies leave the global model unchanged",
    "server.max-failed-rounds": "the run stops after this many rounds in a row left the global "
    "unchanged (no valid reply, or aggregation failed); 0 = never",
    "server.round-timeout": "seconds to wait for a round's replies",
    "server.lr": "server learning rate (FedAvgM step; 2 = twice the mean update)",
    "server.robust-step": "server step of the robust rules along their aggregate's move "
    "(1 = Flower's rule exactly)",
    "server.eta": "server learning rate of FedAdam/FedYogi/FedAdagrad",
    "server.tau": "adaptivity tau of FedAdam/FedYogi/FedAdagrad",
    "server.proximal-mu": "proximal term mu of FedProx",
    "server.momentum": "server momentum of FedAvgM",
    "server.trim-beta": "fraction trimmed at each end by FedTrimmedAvg",
    "server.num-malicious": "attackers Krum, MultiKrum and Bulyan are sized for (f)",
    "server.multikrum-select": "replies MultiKrum averages (0 = each round's replies minus f)",
    "server.max-examples-factor": "cap on a reply's `num-examples` where the server does not "
    "know the node's data, as a multiple of the round's median claim (0 = off)",
    "server.max-update-norm-ratio": "bound on an update's L2 norm as a multiple of the "
    "round's median norm (0 = off)",
    "server.max-update-norm": "absolute bound on an update's L2 norm (0 = off)",
    "server.update-norm-action": (
        "what happens to an update over a norm bound: `clip-to-median` (scaled down to the "
        "round's median norm), `clip` (scaled down to the bound) or `reject`"
    ),
    "server.min-update-cosine": "an update whose cosine with the sum of the round's other "
    "updates' directions is below this is rejected (3 or more updates; -1 = off)",
    "server.local-only": "local-only baseline at the end: `auto` (simulations of <= 20 "
    "clients), `on`, `off`",
    "server.local-only-epochs": "epochs of each local-only student",
    "server.weighting": "weigh replies by `examples` (FedAvg's rule) or `uniform`",
    "server.average-when": "`flat`: average the last rounds only when the federated "
    "validation accuracy no longer rises over them (else the last global); `always`",
    "server.average-last": "output = average of the last rounds' globals: fraction of "
    "`rounds`, a count, or 0 for the last global",
    "compression.uplink": "codec spec of client updates (docs/compression.md)",
    "compression.downlink": "codec spec of the broadcast (each delta of the chain, or "
    "`global - initial` when stateless)",
    "compression.downlink-protocol": "`chain`: each node gets the compressed deltas it missed, "
    "with server-side error feedback; `stateless`: every node gets `global - initial`",
    "compression.max-payload-mb": "largest payload decoded; longer replies are refused",
    "cache.max-mb": "bound on cached teachers per node folder, LRU eviction (0 = unbounded)",
    "tracking.backend": "experiment tracking: `none`, `tensorboard` or `mlflow` (docs/tracking.md)",
    "tracking.uri": 'TensorBoard folder or MLflow tracking URI ("" = under the output folder)',
    "tracking.experiment": "MLflow experiment name",
    "secure.aggregation": "secure aggregation: the server learns only the sum of each round's "
    "updates (SecAgg+ over the compressed updates; docs/secure-aggregation.md)",
    "secure.bits": "bits per value of a securely aggregated update (stochastic rounding)",
    "secure.clip": "values of a securely aggregated update are clipped to [-clip, clip] "
    "(error feedback keeps the rest)",
    "secure.keep": "share of the weights a round sends under secure aggregation (a random "
    "pattern shared by the round's clients; error feedback keeps the rest)",
    "secure.dropout": "share of a round's clients that may drop out after masking; beyond it "
    "the round fails (Shamir threshold = clients - floor(dropout * clients))",
    "privacy.mode": "client-level differential privacy: `none`, `central` (the server adds the "
    "noise) or `distributed` (each client adds a share inside secure aggregation; "
    "docs/privacy.md)",
    "privacy.clip": "L2 norm C each client's update is clipped to (the start value when adaptive)",
    "privacy.adaptive-clip": "let C follow a quantile of the update norms (Andrew et al. 2021)",
    "privacy.target-quantile": "share of updates adaptive clipping aims to leave unclipped",
    "privacy.clip-lr": "learning rate of the adaptive clip",
    "privacy.clipped-count-stddev": "noise std of the clipped count (0 = expected clients per "
    "round / 20)",
    "privacy.noise-multiplier": "sigma: noise std over C (0 = derived from privacy.target-epsilon)",
    "privacy.target-epsilon": "epsilon the planned rounds may spend (sets sigma when "
    "privacy.noise-multiplier = 0)",
    "privacy.delta": "delta of the guarantee (0 = 1 / num-clients^1.1)",
    "attack.kind": "simulation only: what the hostile clients do (docs/robustness-bench.md)",
    "attack.fraction": "share of the clients that are hostile",
    "attack.scale": "factor on a hostile update (`scale`)",
    "attack.noise-std": "standard deviation of the noise a hostile client adds (`noise`)",
    "attack.inflate": "factor on a hostile client's `num-examples` (`inflate-examples`)",
    "attack.seed": "seed that picks which partitions are hostile",
}

_TYPE_LABELS = {int: "int", float: "float", bool: "bool", str: "string"}


def _allowed(key: str, typ: type) -> str:
    """What ``key`` accepts, read from the validators themselves so the reference cannot drift.

    Each key is offered a value outside every range (NaN, a huge negative integer, an empty
    string) and the ConfigError says what is allowed; a string key that accepts it takes any
    string.
    """
    if typ is bool:
        return "`true`, `false`"
    probe = {int: -(10**18), float: math.nan, str: ""}[typ]
    try:
        parse_config({key: probe})
    except ConfigError as err:
        text = str(err)
        if ": expected " in text:
            text = text.split(": expected ", 1)[1]
            if text.startswith("one of "):
                return ", ".join(f"`{c.strip(chr(39))}`" for c in text[7:].split(", "))
            return text.removeprefix("a number in ")
        if "allowed tokens: " in text:
            tokens = text.split("allowed tokens: ", 1)[1].split(", ")
            if key == "compression.downlink":  # CompressionConfig refuses these there
                tokens = [t for t in tokens if t.split(":")[0] not in UPLINK_ONLY_SELECTIONS]
            return "`+`-joined tokens: " + ", ".join(tokens)
        return text
    return "any string"


def reference() -> list[dict[str, str]]:
    """Every key with its type, default, allowed values and description (for the docs)."""
    defaults = Config().to_flat()
    missing = [k for k in known_keys() if k not in DESCRIPTIONS]
    if missing:
        raise KeyError(f"config keys without a line in feddistill.config.DESCRIPTIONS: {missing}")
    rows = []
    for key in known_keys():
        typ = type(defaults[key])
        rows.append(
            {
                "key": key,
                "type": _TYPE_LABELS[typ],
                "default": json.dumps(defaults[key]),
                "allowed": _allowed(key, typ),
                "description": DESCRIPTIONS[key],
            }
        )
    return rows


def reference_markdown() -> str:
    """docs/configuration.md: the reference table, generated (``feddistill config --markdown``)."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `feddistill config --markdown > docs/configuration.md`; do not edit.",
        "     Descriptions live in feddistill/config.py DESCRIPTIONS; tests/test_docs_config.py",
        "     fails when this file and the code disagree. -->",
        "",
        "One config, parsed once into frozen dataclasses (`feddistill/config.py`) from the flat",
        "Flower run config: `[tool.flwr.app.config]` in pyproject.toml merged with `flwr run",
        "--run-config`, or the `feddistill simulate` flags, `--config FILE.toml` and `--set",
        "KEY=VALUE`. The server sends it to the clients inside every message. An unknown key, a",
        "wrong type or a value outside what is allowed stops the run before any training, naming",
        'the key, the value and what is allowed (with a "did you mean" for a mistyped key).',
        "Ranges: `[` and `]` include the bound, `(` excludes it. `feddistill config` lists the",
        "keys with their defaults; `feddistill config --toml` prints them as TOML lines.",
        "",
        "| key | type | default | allowed | description |",
        "|---|---|---|---|---|",
    ]
    for row in reference():
        cells = [f"`{row['key']}`", row["type"], f"`{row['default']}`", row["allowed"]]
        cells.append(row["description"])
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
