"""Admission control with hand-made replies (no Flower runtime): one test per rule.

Each shows that a round with one bad reply completes with the others and names the node and the
rule in the round's record; the honest replies aggregate exactly as without the bad one.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, Strategy
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from feddistill import keys
from feddistill.codec import encode, max_encoded_bytes, parse_spec
from feddistill.records import message_bytes, metric_record, payload_record
from feddistill.server.results import RunRecord
from feddistill.strategies import CompressedStrategy
from feddistill.strategies.admission import (
    AdmissionError,
    AdmissionPolicy,
    check_metrics,
    check_num_examples,
    direction_cosines,
    examples_cap,
    norm_bound,
    update_norm,
)
from feddistill.strategies.compressed import FLAT

# The encoder tests finiteness by a sum first, which overflows (and warns) on the huge finite
# values these tests send on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered in reduce:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered in reduce:RuntimeWarning"),
]
SCHEMA = [("layer.weight", (6, 5)), ("layer.bias", (6,))]
NONE = parse_spec("none")
HONEST = (0, 1, 2, 3)  # node ids of the honest replies; the bad one is node 9


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _arrays(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {n: (rng.uniform(-1, 1, s) * scale).astype(np.float32) for n, s in SCHEMA}


def _metrics(n: float = 10.0, **extra: object) -> dict[str, object]:
    """What the real client sends (keys.TRAIN_REPLY), plus ``extra``."""
    base = {
        keys.NUM_EXAMPLES: n,
        keys.TRAIN_LOSS: 1.0,
        keys.TRAIN_ACCURACY: 0.5,
        keys.TEACHER_FITTED: 0.0,
        keys.CLIENT_SECONDS: 1.0,
        keys.STATE_BYTES: 100.0,
        keys.ARRIVAL_EXAMPLES: 2.0,
        keys.ARRIVAL_LOSS: 1.2,
        keys.ARRIVAL_ACCURACY: 0.4,
    }
    return {**base, **extra}


def _reply(node: int, payload: np.ndarray, metrics: dict[str, object]) -> Message:
    request = Message(
        RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN
    )
    content = RecordDict(
        {keys.ARRAYS: payload_record(payload), keys.METRICS: MetricRecord(metrics)}  # type: ignore[arg-type]
    )
    return Message(content, reply_to=request)


def _eval_reply(node: int, metrics: dict[str, object]) -> Message:
    request = Message(
        RecordDict({keys.CONFIG: ConfigRecord()}),
        dst_node_id=node,
        message_type=MessageType.EVALUATE,
    )
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=request)  # type: ignore[arg-type]


def _wrapper(inner: Strategy | None = None, **kwargs: object) -> CompressedStrategy:
    rng = np.random.default_rng(0)
    wrapper = CompressedStrategy(
        inner or FedAvg(),
        schema=SCHEMA,
        initial=_arrays(rng),
        uplink=NONE,
        downlink=NONE,
        max_payload_bytes=1 << 20,
        **kwargs,  # type: ignore[arg-type]
    )
    global_w = _arrays(rng)
    wrapper._receive_global(ArrayRecord({n: Array(a) for n, a in global_w.items()}))
    return wrapper


def _honest(seed: int = 1) -> tuple[list[Message], list[dict[str, np.ndarray]]]:
    """Honest deltas: one shared direction plus each client's own noise (as clients learning
    the same task send; independent random deltas would point every which way)."""
    rng = np.random.default_rng(seed)
    shared = _arrays(np.random.default_rng(1234), 0.1)
    deltas = []
    for _ in HONEST:
        own = _arrays(rng, 0.05)
        deltas.append({n: shared[n] + own[n] for n in shared})
    replies = [
        _reply(i, encode(d, NONE).payload, _metrics()) for i, d in zip(HONEST, deltas, strict=True)
    ]
    return replies, deltas


def _assert_mean_of(wrapper: CompressedStrategy, got: ArrayRecord | None, deltas: list) -> None:
    """The round's new global is FedAvg of the honest deltas alone (equal num-examples)."""
    assert got is not None and wrapper._global is not None
    for name, _ in SCHEMA:
        mean = np.mean([d[name] for d in deltas], axis=0)
        np.testing.assert_allclose(got[name].numpy(), wrapper._global[name] + mean, atol=1e-6)


def _failure(wrapper: CompressedStrategy, node: int = 9) -> str:
    failed = dict(wrapper.traffic[1].failures)
    assert set(failed) == {node}, wrapper.traffic[1].failures
    return failed[node]


# -- rule: records and metric keys -----------------------------------------------------------------
@pytest.mark.parametrize(
    "make_inner",
    [FedAvg, FedMedian, lambda: FedTrimmedAvg(beta=0.2)],
    ids=["fedavg", "fedmedian", "fedtrimmedavg"],
)
def test_extra_metric_key_is_dropped_with_a_note_not_a_crash(make_inner, caplog) -> None:
    # Prepare: on main this reply made Flower raise InconsistentMessageReplies
    replies, deltas = _honest()
    rng = np.random.default_rng(2)
    odd_delta = _arrays(rng, 0.1)
    odd = _reply(9, encode(odd_delta, NONE).payload, _metrics(**{"new-metric": 3.0}))
    odd.content["extra-config"] = ConfigRecord({"x": 1})
    wrapper, reference = _wrapper(make_inner()), make_inner()
    # Execute
    with caplog.at_level(logging.INFO, logger="feddistill.server"):
        got, metrics = wrapper.aggregate_train(1, [*replies, odd])
    # Assert: all five aggregated, as Flower would aggregate them without the extra key/record
    assert wrapper.traffic[1].replies == 5 and not wrapper.traffic[1].failures
    handed_on = {k: v for k, v in _metrics().items() if k not in keys.ARRIVAL_KEYS}
    dense = [  # same metrics less the arrival figures (the wrapper weighs those), dense arrays
        _reply(i, np.zeros(1, np.uint8), handed_on) for i in (*HONEST, 9)
    ]
    for msg, d in zip(dense, [*deltas, odd_delta], strict=True):
        msg.content[keys.ARRAYS] = ArrayRecord(
            {n: Array(wrapper._global[n] + d[n]) for n, _ in SCHEMA}
        )
    expected, expected_metrics = reference.aggregate_train(1, dense)
    for name, _ in SCHEMA:
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), atol=1e-6)
    assert dict(metrics) == dict(expected_metrics)
    note = next(r.getMessage() for r in caplog.records if "no schema declares" in r.getMessage())
    assert "node 9" in note and "'new-metric'" in note and "'extra-config'" in note


@pytest.mark.parametrize(
    ("metrics", "rule_text"),
    [
        (
            {k: v for k, v in _metrics().items() if k != keys.NUM_EXAMPLES},
            "missing required metric 'num-examples'",
        ),
        (_metrics(**{keys.TRAIN_LOSS: math.nan}), "'train-loss' is not finite"),
        (_metrics(**{keys.TRAIN_LOSS: math.inf}), "'train-loss' is not finite"),
        (_metrics(**{keys.TRAIN_LOSS: [1.0, 2.0]}), "'train-loss' must be one number, got list"),
        (_metrics(n=2.5), "whole number >= 1"),
        (_metrics(n=-3.0), "whole number >= 1"),
    ],
    ids=["missing-key", "nan-metric", "inf-metric", "list-metric", "fractional-n", "negative-n"],
)
def test_malformed_metrics_reject_the_reply(metrics: dict, rule_text: str) -> None:
    replies, deltas = _honest()
    rng = np.random.default_rng(3)
    bad = _reply(9, encode(_arrays(rng, 0.1), NONE).payload, metrics)
    wrapper = _wrapper()
    got, _ = wrapper.aggregate_train(1, [*replies, bad])
    reason = _failure(wrapper)
    assert reason.startswith("rejected (metrics)") and rule_text in reason
    assert wrapper.traffic[1].replies == 4
    _assert_mean_of(wrapper, got, deltas)


def test_reply_without_metric_record_is_rejected() -> None:
    replies, deltas = _honest()
    bad = _reply(9, encode(_honest(5)[1][0], NONE).payload, _metrics())
    del bad.content[keys.METRICS]
    bad.content["other"] = MetricRecord(_metrics())
    wrapper = _wrapper()
    got, _ = wrapper.aggregate_train(1, [*replies, bad])
    assert "rejected (records): reply has no MetricRecord 'metrics'" in _failure(wrapper)
    _assert_mean_of(wrapper, got, deltas)


def test_optional_metric_missing_from_one_reply_leaves_it_out_of_the_aggregate() -> None:
    replies, _ = _honest()
    older = _reply(
        9,
        encode(_honest(6)[1][0], NONE).payload,
        {k: v for k, v in _metrics().items() if k != keys.STATE_BYTES},
    )
    wrapper = _wrapper()
    _, metrics = wrapper.aggregate_train(1, [*replies, older])
    assert wrapper.traffic[1].replies == 5 and not wrapper.traffic[1].failures
    assert metrics is not None and keys.STATE_BYTES not in metrics
    assert keys.TRAIN_LOSS in metrics


# -- rule: num-examples ----------------------------------------------------------------------------
def test_inflated_examples_are_capped_where_sizes_are_unknown() -> None:
    # Prepare: deployment, the server knows no node's data; one node claims 1e12 examples
    replies, deltas = _honest()
    rng = np.random.default_rng(4)
    liar_delta = _arrays(rng, 0.1)
    liar = _reply(9, encode(liar_delta, NONE).payload, _metrics(n=1e12))
    wrapper = _wrapper(admission=AdmissionPolicy(max_examples_factor=10.0))
    # Execute
    got, _ = wrapper.aggregate_train(1, [*replies, liar])
    # Assert: kept, but weighted as 10 x the median claim (10), not as 1e12
    stats = wrapper.traffic[1]
    assert stats.replies == 5 and not stats.failures
    assert stats.capped_examples == [(9, 10**12, 100)]
    assert got is not None and wrapper._global is not None
    weights = [10, 10, 10, 10, 100]
    for name, _ in SCHEMA:
        mixed = sum(w * d[name] for w, d in zip(weights, [*deltas, liar_delta], strict=True)) / sum(
            weights
        )
        np.testing.assert_allclose(got[name].numpy(), wrapper._global[name] + mixed, atol=1e-6)


def test_inflated_examples_are_capped_at_the_partition_size_where_it_is_known() -> None:
    # Prepare: simulation, the server knows every partition's split; one node claims 1e12
    replies, deltas = _honest()
    rng = np.random.default_rng(7)
    liar_delta = _arrays(rng, 0.1)
    liar = _reply(9, encode(liar_delta, NONE).payload, _metrics(n=1e12))
    sizes = {node: (10, 2) for node in (*HONEST, 9)}
    wrapper = _wrapper(known_examples=sizes.get)
    # Execute
    got, _ = wrapper.aggregate_train(1, [*replies, liar])
    # Assert: kept at its partition's 10 examples, the weight of every other node
    stats = wrapper.traffic[1]
    assert stats.replies == 5 and not stats.failures
    assert stats.capped_examples == [(9, 10**12, 10)]
    _assert_mean_of(wrapper, got, [*deltas, liar_delta])


def test_a_false_claim_does_not_set_the_median_the_others_are_capped_by() -> None:
    # One node of known size claims 1e12, one of unknown size 1e3: the known claim is capped
    # first, so the median that caps the unknown node is the honest 10
    replies, _ = _honest()
    rng = np.random.default_rng(11)
    known_liar, unknown_liar = _arrays(rng, 0.1), _arrays(rng, 0.1)
    sizes = {node: (10, 2) for node in (*HONEST, 8)}
    wrapper = _wrapper(known_examples=sizes.get)
    wrapper.aggregate_train(
        1,
        [
            *replies,
            _reply(8, encode(known_liar, NONE).payload, _metrics(n=1e12)),
            _reply(9, encode(unknown_liar, NONE).payload, _metrics(n=1e3)),
        ],
    )
    assert wrapper.traffic[1].capped_examples == [(8, 10**12, 10), (9, 1000, 100)]


# -- rule: payload size for the schema -------------------------------------------------------------
def test_payload_longer_than_the_schema_allows_is_refused_before_decoding() -> None:
    replies, deltas = _honest()
    wrapper = _wrapper()
    limit = wrapper.max_payload_bytes
    assert limit < 1 << 20  # derived from the 36-element schema, not the 1 MiB outer cap
    padded = np.concatenate([encode(deltas[0], NONE).payload, np.zeros(limit, np.uint8)])
    got, _ = wrapper.aggregate_train(1, [*replies, _reply(9, padded, _metrics())])
    reason = _failure(wrapper)
    assert reason.startswith("invalid payload (size-limit)") and str(limit) in reason
    _assert_mean_of(wrapper, got, deltas)


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(
        [
            "none",
            "fp16",
            "q8",
            "q4+chunk:7",
            "q1",
            "topk:0.01+q4+ef",
            "topk:0.3+q2",
            "gtopk:0.05+q8",
            "topk:0.2+block:4+q4",
            "gtopk:0.1+block:3",
            "thresh:0.5+q4",
            "topk:0.1+fp16+dense:40",
            "pattern:0.1+q4+ef",
            "pattern:0.3+block:4+q4",
        ]
    ),
    shapes=st.lists(
        st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4
    ),
    scale=st.sampled_from([0.0, 1e-3, 1.0, 1e5, 3e38]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_max_encoded_bytes_bounds_every_payload(spec, shapes, scale, ties, seed) -> None:
    """Huge values force float32 where float16 was asked; ties and zeros stress selection."""
    rng = np.random.default_rng(seed)
    update = {
        f"t{i}": (np.full(s, scale) if ties else rng.uniform(-1, 1, s) * scale).astype(np.float32)
        for i, s in enumerate(shapes)
    }
    schema = [(n, a.shape) for n, a in update.items()]
    parsed = parse_spec(spec)
    pattern = seed if parsed.select == "pattern" else None
    payload = encode(update, parsed, seed=seed, pattern_seed=pattern).payload
    assert payload.shape[0] <= max_encoded_bytes(schema, parsed)


def test_max_encoded_bytes_is_tight_for_dense_float32() -> None:
    rng = np.random.default_rng(0)
    update = _arrays(rng)
    assert encode(update, NONE).payload.shape[0] == max_encoded_bytes(SCHEMA, NONE)


# -- rule: update norm and finite after apply ------------------------------------------------------
def test_huge_finite_update_is_rejected_and_does_not_move_the_model() -> None:
    replies, deltas = _honest()
    scaled = {n: d * 1e6 for n, d in _honest(8)[1][0].items()}
    wrapper = _wrapper(admission=AdmissionPolicy(norm_action="reject"))
    got, _ = wrapper.aggregate_train(
        1, [*replies, _reply(9, encode(scaled, NONE).payload, _metrics())]
    )
    reason = _failure(wrapper)
    assert reason.startswith("rejected (update-norm)") and "bound" in reason
    assert set(wrapper.traffic[1].update_norms) == {*HONEST, 9}
    _assert_mean_of(wrapper, got, deltas)


def test_clip_action_scales_the_update_to_the_bound_and_records_it() -> None:
    replies, deltas = _honest()
    big = {n: d * 1e6 for n, d in _honest(8)[1][0].items()}
    wrapper = _wrapper(admission=AdmissionPolicy(max_update_norm_ratio=3.0, norm_action="clip"))
    got, _ = wrapper.aggregate_train(
        1, [*replies, _reply(9, encode(big, NONE).payload, _metrics())]
    )
    stats = wrapper.traffic[1]
    assert stats.replies == 5 and not stats.failures
    ((node, norm, bound),) = stats.clipped
    honest_norms = [update_norm(d) for d in deltas]
    assert node == 9 and norm == pytest.approx(update_norm(big))
    assert bound == pytest.approx(3.0 * sorted([*honest_norms, norm])[2])
    assert got is not None and wrapper._global is not None
    clipped = {n: big[n] * (bound / norm) for n in big}
    for name, _ in SCHEMA:
        mean = np.mean([d[name] for d in [*deltas, clipped]], axis=0)
        np.testing.assert_allclose(got[name].numpy(), wrapper._global[name] + mean, atol=1e-5)


def test_clip_to_median_gives_an_over_bound_update_the_rounds_median_norm() -> None:
    # A scaled honest update (the scale attack, or a client with a wrong learning rate) keeps
    # its direction at the say of a typical reply, not the bound's five medians
    replies, deltas = _honest()
    own = _honest(8)[1][0]
    big = {n: d * 1e6 for n, d in own.items()}
    wrapper = _wrapper()  # the default action
    assert wrapper.admission.norm_action == "clip-to-median"
    got, _ = wrapper.aggregate_train(
        1, [*replies, _reply(9, encode(big, NONE).payload, _metrics())]
    )
    stats = wrapper.traffic[1]
    assert stats.replies == 5 and not stats.failures
    ((node, norm, target),) = stats.clipped
    median = sorted([*(update_norm(d) for d in deltas), norm])[2]  # the low median of 5
    assert node == 9 and target == pytest.approx(median)
    clipped = {n: big[n] * (target / norm) for n in big}
    assert update_norm(clipped) == pytest.approx(median, rel=1e-5)
    _assert_mean_of(wrapper, got, [*deltas, clipped])


def test_absolute_norm_bound_applies_with_two_replies() -> None:
    replies, _ = _honest()
    policy = AdmissionPolicy(max_update_norm_ratio=0.0, max_update_norm=1e-3, norm_action="reject")
    wrapper = _wrapper(admission=policy)
    wrapper.aggregate_train(1, replies[:2])
    assert {n for n, _ in wrapper.traffic[1].failures} == {0, 1}


def test_update_that_overflows_the_global_is_rejected() -> None:
    # Prepare: values near float32's max pass the decoder but global + delta overflows to inf.
    # The norm bound is off here so that the finite check itself is what refuses it.
    replies, _ = _honest()
    wrapper = _wrapper(admission=AdmissionPolicy(max_update_norm_ratio=0.0))
    assert wrapper._global is not None
    overflow = {n: np.full(s, 3.4e38, np.float32) for n, s in SCHEMA}
    near_max = dict(wrapper._global, **{"layer.bias": np.abs(wrapper._global["layer.bias"]) + 1e38})
    wrapper._receive_global(ArrayRecord({n: Array(a) for n, a in near_max.items()}))
    bad = _reply(9, encode(overflow, NONE).payload, _metrics())
    # Execute
    got, _ = wrapper.aggregate_train(1, [*replies, bad])
    # Assert
    assert _failure(wrapper).startswith("rejected (non-finite)")
    assert all(np.isfinite(got[n].numpy()).all() for n, _ in SCHEMA)


# -- rule: update direction ------------------------------------------------------------------------
def test_sign_flipped_update_is_rejected_for_its_direction() -> None:
    # Prepare: four honest replies and the negation of a fifth honest update (an honest norm,
    # so the norm bound lets it through)
    replies, deltas = _honest()
    flipped = {n: -d for n, d in _honest(8)[1][0].items()}
    wrapper = _wrapper(admission=AdmissionPolicy(min_update_cosine=0.0))
    # Execute
    got, _ = wrapper.aggregate_train(
        1, [*replies, _reply(9, encode(flipped, NONE).payload, _metrics())]
    )
    # Assert: refused and named; the honest ones aggregate alone; every cosine recorded
    reason = _failure(wrapper)
    assert reason.startswith("rejected (update-direction)") and "server.min-update-cosine" in reason
    cosines = wrapper.traffic[1].update_cosines
    assert set(cosines) == {*HONEST, 9} and cosines[9] < 0 < min(cosines[n] for n in HONEST)
    _assert_mean_of(wrapper, got, deltas)


def test_direction_rule_off_at_minus_one_and_below_three_updates() -> None:
    replies, _ = _honest()
    flipped = {n: -d for n, d in _honest(8)[1][0].items()}
    bad = _reply(9, encode(flipped, NONE).payload, _metrics())
    off = _wrapper()  # the default: off
    off.aggregate_train(1, [*replies, bad])
    assert not off.traffic[1].failures and not off.traffic[1].update_cosines
    replies, _ = _honest()  # fresh messages: aggregating rebuilds the replies it was given
    bad = _reply(9, encode(flipped, NONE).payload, _metrics())
    two = _wrapper(admission=AdmissionPolicy(min_update_cosine=0.0))
    two.aggregate_train(1, [replies[0], bad])  # one against one: no majority to judge by
    assert not two.traffic[1].failures


# -- rule: the inner strategy raising --------------------------------------------------------------
class _Raising(FedAvg):
    def aggregate_train(self, server_round, replies):
        raise RuntimeError("inner bug")

    def aggregate_evaluate(self, server_round, replies):
        raise ZeroDivisionError("inner bug")


def test_inner_strategy_raising_fails_the_round_not_the_server(tmp_path) -> None:
    replies, _ = _honest()
    wrapper = _wrapper(_Raising())
    assert wrapper.aggregate_train(1, replies) == (None, None)
    evals = [
        _eval_reply(i, {keys.NUM_EXAMPLES: 5.0, keys.EVAL_LOSS: 1.0, keys.EVAL_ACCURACY: 0.5})
        for i in HONEST
    ]
    assert wrapper.aggregate_evaluate(1, evals) is None
    stats = wrapper.traffic[1]
    assert stats.aggregation_errors == [
        "train aggregation in _Raising raised RuntimeError: inner bug",
        "evaluate aggregation in _Raising raised ZeroDivisionError: inner bug",
    ]
    # and the round's record says so
    record = RunRecord(out_dir=tmp_path, config={}, header={})
    entry = record.add_round(1, 1, 0.5, 1.0, stats, 1.0, 144)
    assert entry["aggregation_errors"] == stats.aggregation_errors and entry["replies"] == 4


def _state(strategy: Strategy) -> dict[str, list[np.ndarray]]:
    from feddistill.strategies.state import strategy_state_dict

    out = {}
    for name, value in strategy_state_dict(strategy).items():
        if isinstance(value, ArrayRecord):
            value = value.to_numpy_ndarrays()
        out[name] = [np.array(v) for v in value] if value is not None else []
    return out


class _Diverging(FedAvgM):
    """FedAvgM whose step in rounds >= 2 is ruined after it has moved its own state: it
    either returns an infinite model (``mode = "inf"``) or raises (``"raise"``)."""

    mode = "inf"

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if server_round < 2:
            return arrays, metrics
        self.momentum_vector = [np.full_like(m, np.inf) for m in self.momentum_vector]
        if self.mode == "raise":
            raise FloatingPointError("step overflowed")
        return ArrayRecord(
            {k: Array(np.full_like(v.numpy(), np.inf)) for k, v in arrays.items()}
        ), metrics


@pytest.mark.parametrize("mode", ["inf", "raise"])
def test_a_failed_step_leaves_the_inner_optimizer_as_it_was(monkeypatch, mode: str) -> None:
    # Prepare: a declared-stateful inner strategy; round 1 is a normal momentum step
    from feddistill.strategies import state

    monkeypatch.setitem(state.FLOWER_STATE, _Diverging, ("current_arrays", "momentum_vector"))
    inner = _Diverging(server_momentum=0.9)
    inner.mode = mode
    wrapper = _wrapper(inner)
    assert wrapper._global is not None
    assert wrapper._global_flat is not None  # the inner strategy sees the model flattened
    inner.current_arrays = ArrayRecord({FLAT: Array(wrapper._global_flat.copy())})
    assert wrapper.aggregate_train(1, _honest(seed=1)[0])[0] is not None
    before = _state(inner)

    # Execute
    got, _ = wrapper.aggregate_train(2, _honest(seed=2)[0])

    # Assert: the round failed and FedAvgM's weights and momentum are those after round 1,
    # so round 3 steps from there instead of from an infinite momentum
    assert got is None and len(wrapper.traffic[2].aggregation_errors) == 1
    after = _state(inner)
    assert before.keys() == after.keys() == {"current_arrays", "momentum_vector"}
    for name in before:
        for a, b in zip(before[name], after[name], strict=True):
            np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(m).all() for m in inner.momentum_vector)


# -- evaluation replies ----------------------------------------------------------------------------
def test_bad_evaluation_replies_are_dropped_and_named(tmp_path) -> None:
    good = {keys.NUM_EXAMPLES: 5.0, keys.EVAL_LOSS: 1.0, keys.EVAL_ACCURACY: 0.5}
    replies = [_eval_reply(i, good) for i in HONEST]
    nan = _eval_reply(7, {**good, keys.EVAL_ACCURACY: math.nan})
    extra = _eval_reply(8, {**good, "bonus": 1.0, keys.EVAL_ACCURACY: 0.9})
    empty = _eval_reply(6, {**good, keys.NUM_EXAMPLES: 0.0, keys.EVAL_ACCURACY: 0.0})
    liar = _eval_reply(9, {**good, keys.NUM_EXAMPLES: 1e12, keys.EVAL_ACCURACY: 0.0})
    # every reply that arrived counts in the evaluation uplink, refused ones too
    sizes = {
        n: message_bytes(m)
        for n, m in zip([*HONEST, 7, 8, 6, 9], [*replies, nan, extra, empty, liar], strict=True)
    }
    wrapper = _wrapper()
    metrics = wrapper.aggregate_evaluate(1, [*replies, nan, extra, empty, liar])
    stats = wrapper.traffic[1]
    assert [n for n, _ in stats.eval_failures] == [7]
    assert "'eval-accuracy' is not finite" in stats.eval_failures[0][1]
    assert stats.eval_capped_examples == [(9, 10**12, 50)]
    # four honest at 0.5, node 8 at 0.9 (bonus key dropped), the liar at 0.0 weighted 50, not 1e12
    expected = (4 * 5 * 0.5 + 5 * 0.9 + 50 * 0.0) / (4 * 5 + 5 + 50)
    assert metrics is not None and set(metrics) == {keys.EVAL_LOSS, keys.EVAL_ACCURACY}
    assert metrics[keys.EVAL_ACCURACY] == pytest.approx(expected)
    entry = RunRecord(out_dir=tmp_path, config={}, header={}).add_round(
        1, 1, 0.5, 1.0, stats, 1.0, 144
    )
    assert entry["eval_failures"] == 1 and "node 7" in entry["eval_failure_reasons"][0]
    assert stats.eval_bytes_up == sizes  # as they arrived: node 8's with its extra key
    assert entry["eval_bytes_up"] == sum(sizes.values()) > 0


# -- the pure rules --------------------------------------------------------------------------------
def test_pure_rules() -> None:
    with pytest.raises(AdmissionError, match="must be one number, got bool"):
        check_metrics(_metrics(**{keys.TRAIN_LOSS: True}), keys.TRAIN_REPLY)
    assert check_metrics(_metrics(x=1.0), keys.TRAIN_REPLY)[1] == ["x"]
    assert check_num_examples(0.0, positive=False) == 0
    with pytest.raises(AdmissionError, match="num-examples"):
        check_num_examples(0.0, positive=True)
    assert examples_cap([5, 1e12, 7], 10.0) == 70
    assert examples_cap([3, 10**12], 10.0) == 30  # low median: the liar cannot set its own cap
    assert examples_cap([3], 0.0) is None
    policy = AdmissionPolicy(max_update_norm_ratio=4.0)
    assert norm_bound([1.0, 2.0, 1e9], policy) == 8.0
    assert norm_bound([1.0, 1e9], policy) == 4.0
    assert norm_bound([0.0, 0.0, 5.0], policy) is None  # a median of 0 bounds nothing
    assert update_norm({"a": np.full(4, 3e38, np.float32)}) == pytest.approx(6e38)
    u, v = np.array([1.0, 0.0, 0.0], np.float32), np.array([0.0, 1.0, 0.0], np.float32)
    # against the sum of the others' unit directions, on the coordinates shared with them: v
    # for u (and 2u), 0 on u's coordinate; 2u + v for -u, whose shared coordinate is u's
    assert direction_cosines([u, u]) is None  # fewer than 3: no rule
    got = direction_cosines([u, 2 * u, -u, v])
    assert got is not None
    assert got == pytest.approx([0.0, 0.0, -1.0, 0.0])
    got = direction_cosines([u, u, -5 * u, np.zeros(3, np.float32)])  # norms do not vote
    assert got == pytest.approx([0.0, 0.0, -1.0, 0.0])
    # sparse updates that share one coordinate of many: the cosine is the shared part's
    a, b, c = (np.zeros(100, np.float32) for _ in range(3))
    a[[0, 1, 2]], b[[0, 50, 51]], c[[0, 80, 81]] = [1, 5, 5], [1, 5, 5], [-1, 5, 5]
    assert direction_cosines([a, b, c]) == pytest.approx([0.0, 0.0, -1.0])
    with pytest.raises(ValueError, match="min_update_cosine"):
        AdmissionPolicy(min_update_cosine=1.5)


def test_client_reply_metrics_follow_the_schema() -> None:
    # norm-bit is sent only with privacy on (tests/test_privacy.py)
    with_bit = _metrics(**{keys.NORM_BIT: 1.0})
    assert set(metric_record(keys.TRAIN_REPLY, with_bit)) == set(keys.TRAIN_REPLY.metric_keys)
    with pytest.raises(ValueError, match="unknown \\['x'\\]"):
        metric_record(keys.TRAIN_REPLY, _metrics(x=1.0))
    with pytest.raises(ValueError, match="missing \\['eval-loss'\\]"):
        metric_record(keys.EVALUATE_REPLY, {keys.NUM_EXAMPLES: 1.0, keys.EVAL_ACCURACY: 1.0})
