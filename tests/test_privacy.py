"""Client-level DP: clipping with and without error feedback, noise scale, accounting, config.

The mechanism and the accountant are pure functions, tested on small arrays; the server step
(:class:`CentralPrivacy`) with hand-made replies, as tests/test_strategy.py does.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedAvgM
from flwr.supercore.task_identity import TaskIdentity

from feddistill import keys
from feddistill.aggregation import STRATEGIES
from feddistill.client.work import RoundInput, private_update
from feddistill.codec import chunk_absmax, decode, error_bound, parse_spec
from feddistill.config import ConfigError, PrivacyConfig
from feddistill.node_state import ClientState
from feddistill.privacy.accounting import (
    RoundAccountant,
    epsilon_after,
    noise_for_epsilon,
    round_event,
)
from feddistill.privacy.mechanism import (
    adaptive_clip,
    clip_to_norm,
    default_delta,
    l2_norm,
    noisy_mean,
    update_noise_multiplier,
)
from feddistill.strategies.private import CentralPrivacy
from tests.conftest import tiny_config

SCHEMA = [("layer.weight", (40, 30)), ("layer.bias", (40,))]
DP = {"privacy.mode": "central", "privacy.noise-multiplier": 1.0, "server.weighting": "uniform"}


def _update(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in SCHEMA}


# -- clipping -----------------------------------------------------------------------------------
def test_clip_to_norm_caps_large_updates_and_keeps_small_ones() -> None:
    rng = np.random.default_rng(0)
    big, small = _update(rng, 1.0), _update(rng, 1e-3)

    clipped, norm_before = clip_to_norm(big, 0.7)
    kept, small_norm = clip_to_norm(small, 0.7)

    assert norm_before == pytest.approx(l2_norm(big)) and norm_before > 0.7
    assert l2_norm(clipped) <= 0.7 and l2_norm(clipped) == pytest.approx(0.7, rel=1e-5)
    direction = clipped["layer.weight"] / big["layer.weight"]
    np.testing.assert_allclose(direction, direction.flat[0], rtol=1e-5)  # one factor: flat clip
    assert small_norm < 0.7
    for n in small:
        np.testing.assert_array_equal(kept[n], small[n])


def test_clipped_norm_never_exceeds_the_clip_whatever_the_scale_and_dtype() -> None:
    rng = np.random.default_rng(11)
    for trial in range(200):
        scale = 10.0 ** rng.uniform(-6, 6)
        dtype = np.float64 if trial % 2 else np.float32
        update = {n: (rng.standard_normal(s) * scale).astype(dtype) for n, s in SCHEMA}
        clip = float(10.0 ** rng.uniform(-6, 6))

        clipped, _ = clip_to_norm(update, clip)

        assert l2_norm(clipped) <= clip


def _client_rounds(
    tmp_path: Path, uplink: str, clip: float, rounds: int
) -> list[tuple[float, float, float]]:
    """Run the client's private_update over several rounds of large raw updates.

    Returns per round (norm of the clipped vector that was encoded, norm of the decoded
    message, the codec's stated error bound on it as an L2 norm).
    """
    cfg = tiny_config(tmp_path, **{**DP, "privacy.clip": clip, "compression.uplink": uplink})
    spec = parse_spec(uplink)
    models = SimpleNamespace(schema=SCHEMA)
    state = ClientState.open(tmp_path / "cache", "client-0")
    rng = np.random.default_rng(1)
    out = []
    for r in range(1, rounds + 1):
        raw = _update(rng, 0.5)  # norm ~17, far above the clip
        inp = RoundInput(cfg, None, "", np.zeros(0, np.uint8), r, run_id="0a1b")  # type: ignore[arg-type]
        encoded, metrics = private_update(cfg, inp, models, state, raw, spec, seed=r)  # type: ignore[arg-type]
        decoded = decode(encoded.payload, SCHEMA, max_payload_bytes=1 << 24)
        assert metrics[keys.NORM_BIT] == 1.0
        if spec.error_feedback:  # the residual saved is clipped - decoded: rebuild clipped
            residual = state.load_residual(SCHEMA, before_round=r + 1, run="0a1b")
            sent = {n: decoded[n] + residual[n] for n in decoded}
        else:
            sent = clip_to_norm(raw, clip)[0]
        bound_sq = 0.0
        for n, _ in SCHEMA:
            pos = encoded.positions[n]
            values = sent[n].ravel() if pos is None else sent[n].ravel()[pos]
            bound = error_bound(spec, chunk_absmax(values, spec.chunk), values)
            bound_sq += float(np.sum(bound**2))
        out.append((l2_norm(sent), l2_norm(decoded), math.sqrt(bound_sq)))
    return out


@pytest.mark.parametrize("uplink", ["topk:0.05+q4+ef", "topk:0.2+q8+ef", "q4+ef", "none+ef"])
def test_with_error_feedback_each_message_stays_within_clip_plus_codec_bound(
    tmp_path: Path, uplink: str
) -> None:
    # Execute: six rounds; the residual grows from the dropped 95% of each round's update.
    per_round = _client_rounds(tmp_path, uplink, clip=0.3, rounds=6)

    # Assert: clip(update + residual) is what got encoded, and the message never exceeds it by
    # more than the codec's stated value-coding error.
    for sent, message, bound in per_round:
        assert sent <= 0.3
        assert message <= 0.3 + bound + 1e-7


@pytest.mark.parametrize("uplink", ["topk:0.05+q4", "q8", "none"])
def test_without_error_feedback_each_message_stays_within_clip_plus_codec_bound(
    tmp_path: Path, uplink: str
) -> None:
    per_round = _client_rounds(tmp_path, uplink, clip=0.3, rounds=3)

    for sent, message, bound in per_round:
        assert sent <= 0.3
        assert message <= 0.3 + bound + 1e-7
    if uplink == "none":
        assert all(bound == 0 for _, _, bound in per_round)


# -- noise --------------------------------------------------------------------------------------
def test_noise_on_the_mean_has_std_sigma_clip_over_m() -> None:
    # Prepare: 3 replies of a 200,000-element model, sigma 1.3, clip 0.8, denominator m = 4.
    rng = np.random.default_rng(7)
    like = {"w": np.zeros((400, 500), np.float32)}
    updates = [{"w": (rng.standard_normal((400, 500)) * 1e-4).astype(np.float32)} for _ in range(3)]
    exact = sum(u["w"].astype(np.float64) for u in updates) / 4

    # Execute
    mean = noisy_mean(updates, ["w"], like, clip=0.8, noise_multiplier=1.3, denominator=4, rng=rng)

    # Assert: 200,000 draws give the std to ~0.3% (1 / sqrt(2 * 200000)); 1% is 6 sigma.
    noise = mean["w"] - exact
    assert float(np.std(noise)) == pytest.approx(1.3 * 0.8 / 4, rel=0.01)
    assert abs(float(np.mean(noise))) < 5 * 1.3 * 0.8 / 4 / math.sqrt(noise.size)


def test_noisy_mean_clips_every_update_again_and_divides_by_the_fixed_denominator() -> None:
    rng = np.random.default_rng(3)
    updates = [_update(rng, 5.0) for _ in range(3)]
    like = updates[0]

    mean = noisy_mean(
        updates,
        [n for n, _ in SCHEMA],
        like,
        clip=1.0,
        noise_multiplier=0.0,
        denominator=5,
        rng=rng,
    )

    expected = {n: sum(clip_to_norm(u, 1.0)[0][n] for u in updates) / 5 for n, _ in SCHEMA}
    for n, _ in SCHEMA:
        np.testing.assert_allclose(mean[n], expected[n], rtol=1e-5, atol=1e-7)
    assert l2_norm(mean) <= 3 * 1.0 / 5 + 1e-6


# -- adaptive clipping ------------------------------------------------------------------------
def test_adaptive_clip_moves_toward_the_target_quantile() -> None:
    assert adaptive_clip(1.0, 0.9, 0.5, 0.2) == pytest.approx(math.exp(-0.2 * 0.4))  # shrinks
    assert adaptive_clip(1.0, 0.1, 0.5, 0.2) > 1.0  # most clipped: grows
    assert adaptive_clip(1.0, 0.5, 0.5, 0.2) == 1.0


def test_update_noise_is_raised_so_the_pair_costs_one_gaussian_of_sigma() -> None:
    z = update_noise_multiplier(1.0, count_stddev=5.0, expected=100)

    assert z > 1.0
    assert (z**-2 + (2 * 5.0) ** -2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(ValueError):
        update_noise_multiplier(1.0, count_stddev=0.25, expected=5)


# -- accounting ---------------------------------------------------------------------------------
def test_accountant_matches_the_libraries_own_reference_point() -> None:
    # dp_accounting's rdp_privacy_accountant_test.test_compute_rdp_poisson_sampled_gaussian:
    # q = 0.01, sigma = 2.5, 50 steps, at orders 1.5, 2.5, 5, 50, 100.
    orders = [1.5, 2.5, 5, 50, 100]
    reference = [6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02]

    accountant = RoundAccountant(0.01, 2.5, 1e-5, orders=orders)

    np.testing.assert_allclose(50 * accountant._rdp, reference, rtol=0.01)
    # and the epsilon that RDP converts to, as the library computes it from those orders
    assert accountant.epsilon(50) == pytest.approx(
        float(rdp_privacy_accountant.compute_epsilon(orders, reference, 1e-5)[0]), rel=0.01
    )


def test_cached_epsilon_equals_the_accountant_composed_afresh() -> None:
    accountant = RoundAccountant(0.05, 1.1, 1e-5)

    for rounds in (1, 10, 100, 1000):
        assert accountant.epsilon(rounds) == pytest.approx(
            epsilon_after(rounds, 0.05, 1.1, 1e-5), rel=1e-9
        )


def test_epsilon_grows_monotonically_over_rounds() -> None:
    accountant = RoundAccountant(0.1, 1.0, 1e-4)

    eps = [accountant.epsilon(t) for t in range(0, 60)]

    assert eps[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(eps))


def test_noise_for_a_target_epsilon_reaches_it_and_no_less_noise_would() -> None:
    sigma = noise_for_epsilon(4.0, 1e-5, 0.05, 200)

    assert epsilon_after(200, 0.05, sigma, 1e-5) <= 4.0
    assert epsilon_after(200, 0.05, sigma, 1e-5) == pytest.approx(4.0, rel=0.01)
    assert epsilon_after(200, 0.05, sigma - 0.01, 1e-5) > 4.0
    assert round_event(0.05, sigma).sampling_probability == 0.05


def test_default_delta_is_below_one_over_n() -> None:
    assert default_delta(1000) == pytest.approx(1000**-1.1)
    assert default_delta(1000) < 1 / 1000


# -- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"privacy.mode": "local"}, "privacy.mode"),
        ({"privacy.clip": 0.0}, "privacy.clip"),
        ({"privacy.delta": 1.0}, "privacy.delta"),
        ({"privacy.target-quantile": 1.5}, "privacy.target-quantile"),
        ({**DP, "privacy.target-epsilon": 8.0}, "privacy.noise-multiplier"),  # both set
        ({**DP, "privacy.noise-multiplier": 0.0}, "privacy.noise-multiplier"),  # neither
        ({**DP, "privacy.delta": 0.5}, "privacy.delta"),  # above 1/N for 3 clients
        ({**DP, "server.weighting": "examples"}, "server.weighting"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid config {named} ="):
        tiny_config(tmp_path, **overrides)


@pytest.mark.parametrize("strategy", [k for k, v in STRATEGIES.items() if v.robust])
def test_robust_aggregators_are_refused_with_central_dp(tmp_path: Path, strategy: str) -> None:
    with pytest.raises(ConfigError, match="the noise does not protect") as err:
        tiny_config(
            tmp_path,
            **DP,
            **{"server.strategy": strategy, "data.num-clients": 20, "server.num-malicious": 1},
            **{"server.clients-per-round": 10},
        )
    assert "fedavg" in str(err.value) and "privacy.mode = 'none'" in str(err.value)


def test_mean_based_aggregators_compose_with_dp(tmp_path: Path) -> None:
    ok = [k for k, v in STRATEGIES.items() if v.composes_with_dp]
    assert set(ok) == {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}
    for strategy in ok:
        assert tiny_config(tmp_path, **DP, **{"server.strategy": strategy}).privacy.enabled


def test_privacy_is_off_by_default() -> None:
    assert not PrivacyConfig().enabled


# -- the server step ----------------------------------------------------------------------------
@pytest.fixture
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _reply(node: int, arrays: dict[str, np.ndarray], bit: float) -> Message:
    request = Message(
        RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN
    )
    metrics = MetricRecord({keys.NUM_EXAMPLES: 1.0, keys.NORM_BIT: bit, "train-loss": 0.5})
    content = RecordDict(
        {keys.ARRAYS: ArrayRecord({n: Array(a) for n, a in arrays.items()}), keys.METRICS: metrics}
    )
    return Message(content, reply_to=request)


@pytest.mark.usefixtures("_task_identity")
@pytest.mark.parametrize("make_inner", [FedAvg, lambda: FedAvgM(server_learning_rate=2.0)])
def test_inner_strategy_sees_only_the_noisy_mean(make_inner) -> None:
    # Prepare: 3 replies, expected 4 per round of 8 clients, clip 1, sigma 0.5, fixed seed.
    rng = np.random.default_rng(0)
    names = [n for n, _ in SCHEMA]
    glob = _update(rng, 1.0)
    deltas = [_update(rng, 2.0) for _ in range(3)]
    replies = [_reply(i, {n: glob[n] + d[n] for n in names}, 1.0) for i, d in enumerate(deltas)]
    settings = PrivacyConfig(mode="central", clip=1.0, noise_multiplier=0.5)
    dp = CentralPrivacy(
        settings, num_clients=8, expected=4, rounds=10, rng=np.random.default_rng(5)
    )
    expected = noisy_mean(
        deltas,
        names,
        glob,
        clip=1.0,
        noise_multiplier=0.5,
        denominator=4,
        rng=np.random.default_rng(5),
    )
    inner = make_inner()
    if isinstance(inner, FedAvgM):  # what its configure_train would remember
        inner.current_arrays = ArrayRecord({n: Array(a) for n, a in glob.items()})

    # Execute
    out = dp.privatize(1, replies, glob, names, keys.ARRAYS)
    arrays, metrics = inner.aggregate_train(1, out)

    # Assert: FedAvg lands on global + noisy mean; FedAvgM steps twice as far along it.
    step = 1.0 if isinstance(inner, FedAvg) and not isinstance(inner, FedAvgM) else 2.0
    for n in names:
        np.testing.assert_allclose(
            arrays[n].numpy(), glob[n] + step * expected[n], rtol=1e-4, atol=1e-5
        )
    assert keys.NORM_BIT not in metrics and metrics["train-loss"] == pytest.approx(0.5)
    figures = dp.figures(1)
    assert figures["clipped_fraction"] == 1.0 and figures["clip"] == 1.0
    assert figures["noise_std"] == pytest.approx(0.5 * 1.0 / 4)
    assert figures["epsilon"] == pytest.approx(epsilon_after(1, 0.5, 0.5, 8**-1.1))


def test_poisson_selection_keeps_each_message_with_rate_q() -> None:
    settings = PrivacyConfig(mode="central", noise_multiplier=1.0)
    dp = CentralPrivacy(
        settings, num_clients=1000, expected=100, rounds=1, rng=np.random.default_rng(2)
    )

    kept = [len(dp.select(list(range(1000)))) for _ in range(50)]  # type: ignore[arg-type]

    assert np.mean(kept) == pytest.approx(100, rel=0.03)  # 50 rounds x Binomial(1000, 0.1)
    assert np.std(kept) > 0  # the count varies: Poisson, not a fixed-size sample


def test_adaptive_clip_state_round_trips_and_the_guarantee_reads_plainly() -> None:
    settings = PrivacyConfig(mode="central", noise_multiplier=1.0, adaptive_clip=True, clip=0.1)
    dp = CentralPrivacy(settings, num_clients=1000, expected=100, rounds=30)
    dp.clip = 0.37

    fresh = CentralPrivacy(settings, num_clients=1000, expected=100, rounds=30)
    fresh.load_state_dict(dp.state_dict())

    assert fresh.clip == 0.37
    assert dp.update_multiplier > 1.0 and dp.count_stddev == 5.0
    text = dp.guarantee(30)
    assert text.startswith(f"(epsilon={dp.accountant.epsilon(30):.3g}, delta={1000**-1.1:.3g})-DP")
    assert "each client's whole dataset" in text and "final model and the aggregates" in text


def test_the_adaptive_clip_survives_a_checkpoint(tmp_path: Path) -> None:
    from feddistill.server.checkpoint import ServerState, load_state, save_state

    # The privacy step's state travels inside the wrapper's declared state_dict.
    strategy = {"chain": None, "inner": {}, "privacy": {"clip": 0.3}}
    state = ServerState(
        round=4, global_arrays={"w": np.ones(3, np.float32)}, parts={"strategy": strategy}
    )

    save_state(tmp_path / "s.npz", state)
    loaded = load_state(tmp_path / "s.npz")

    assert loaded is not None and loaded.parts["strategy"]["privacy"] == {"clip": 0.3}


def test_bench_privacy_runs_each_uplink_without_privacy_then_at_each_epsilon(
    tmp_path: Path,
) -> None:
    from feddistill.bench.privacy import COMPRESSED, Shape, base_config, points
    from feddistill.config import parse_config

    runs = points([2.0, 8.0], clip=0.5, delta=1e-5)

    assert [name for name, _ in runs] == [
        "compressed-nonprivate",
        "compressed-eps2",
        "compressed-eps8",
        "dense-nonprivate",
        "dense-eps2",
        "dense-eps8",
    ]
    for name, overrides in runs:  # every point is a valid config of the 1,000-client shape
        cfg = parse_config({**base_config(Shape(), tmp_path / name), **overrides})
        assert cfg.privacy.enabled == ("eps" in name)
        assert cfg.compression.uplink == (COMPRESSED if name.startswith("compressed") else "none")


class _Grid:
    """Just what FedAvg.configure_train asks of a Grid."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.mark.usefixtures("_task_identity")
def test_compressed_strategy_samples_by_poisson_and_aggregates_the_clipped_mean() -> None:
    from feddistill.codec import encode
    from feddistill.records import payload_record
    from feddistill.strategies import CompressedStrategy

    # Prepare: 8 nodes, 4 expected per round, negligible noise so the mean can be checked.
    rng = np.random.default_rng(4)
    names = [n for n, _ in SCHEMA]
    initial = _update(rng, 1.0)
    settings = PrivacyConfig(mode="central", clip=0.5, noise_multiplier=1e-9)
    dp = CentralPrivacy(settings, num_clients=8, expected=4, rounds=5, rng=rng)
    inner = FedAvg(fraction_train=1.0, min_train_nodes=8, min_available_nodes=8)
    wrapper = CompressedStrategy(
        inner,
        schema=SCHEMA,
        initial=initial,
        uplink=parse_spec("none"),
        downlink=parse_spec("none"),
        max_payload_bytes=1 << 24,
        uniform=True,
        privacy=dp,
    )
    arrays = ArrayRecord({n: Array(a) for n, a in initial.items()})
    config = ConfigRecord()

    # Execute: round 1 with replies from every sampled node, round 2 with none at all.
    sent = list(wrapper.configure_train(1, arrays, config, _Grid(list(range(1, 9)))))
    deltas = [_update(rng, 1.0) for _ in sent]
    replies = []
    for msg, delta in zip(sent, deltas, strict=True):
        content = RecordDict(
            {
                keys.ARRAYS: payload_record(encode(delta, parse_spec("none")).payload),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10.0, keys.NORM_BIT: 1.0}),
            }
        )
        replies.append(Message(content, reply_to=msg))
    new, _ = wrapper.aggregate_train(1, replies)
    skipped = wrapper.aggregate_train(2, [])

    # Assert
    assert config[keys.CLIP_NORM] == 0.5
    assert 0 < len(sent) < 8  # a Poisson sample of the 8 nodes (this seed: neither extreme)
    assert new is not None and skipped == (None, None)
    for n in names:
        clipped_sum = sum(clip_to_norm(d, 0.5)[0][n] for d in deltas)
        np.testing.assert_allclose(
            new[n].numpy(), initial[n] + clipped_sum / 4, rtol=1e-4, atol=1e-6
        )
    assert dp.figures(1)["clipped_fraction"] == 1.0
    assert dp.figures(2)["epsilon"] > dp.figures(1)["epsilon"] > 0


def test_tracking_logs_the_round_privacy_figures() -> None:
    from feddistill.server.tracking import round_metrics

    entry = {"round": 3, "privacy": {"epsilon": 1.5, "delta": 1e-5, "clipped_fraction": None}}

    metrics = round_metrics(entry)

    assert metrics["privacy/epsilon"] == 1.5 and metrics["privacy/delta"] == 1e-5
    assert "privacy/clipped_fraction" not in metrics  # None (no reply this round) is left out


def test_the_formulas_equal_flowers_own_helpers() -> None:
    # Flower keeps these in a module outside its public API; the project computes them itself
    # and this test keeps the two equal.
    flower = pytest.importorskip("flwr.supercore.differential_privacy")
    from feddistill.privacy.mechanism import l2_norm, noise_std

    rng = np.random.default_rng(3)
    arrays = {"a": rng.standard_normal((4, 5)).astype(np.float32), "b": rng.standard_normal(7)}

    assert l2_norm(arrays) == pytest.approx(flower.get_norm(list(arrays.values())), rel=1e-6)
    assert noise_std(1.3, 0.5, 50) == flower.compute_stdv(1.3, 0.5, 50)
    _, expected = flower.compute_adaptive_noise_params(1.0, 100, 5.0)
    assert update_noise_multiplier(1.0, count_stddev=5.0, expected=100) == pytest.approx(expected)
