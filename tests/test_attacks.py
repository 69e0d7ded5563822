"""Simulated attacks: each attack's maths, its config, and the train path it hooks into."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from feddistill import attacks
from feddistill.client.work import RoundInput, train_round
from feddistill.codec import decode, encode, parse_spec
from feddistill.config import ConfigError, parse_config
from feddistill.run_inputs import initial_models, source_splits
from tests.conftest import tiny_config


def _update() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": np.ones(5, np.float32)}


# --- the maths ---------------------------------------------------------------------------------


def test_hostile_partitions_are_seeded_and_sized_by_fraction() -> None:
    # Prepare / Execute
    first = attacks.hostile_partitions(20, 0.3, seed=7)
    again = attacks.hostile_partitions(20, 0.3, seed=7)
    other = attacks.hostile_partitions(20, 0.3, seed=8)
    # Assert
    assert first == again and len(first) == 6 and first <= set(range(20))
    assert other != first
    assert attacks.hostile_partitions(20, 0.0, seed=7) == frozenset()
    assert attacks.hostile_partitions(3, 1.0, seed=0) == {0, 1, 2}
    assert attacks.is_hostile(min(first), 20, 0.3, 7)


def test_sign_flip_negates_every_array() -> None:
    u = _update()
    out = attacks.sign_flip(u)
    for k in u:
        np.testing.assert_array_equal(out[k], -u[k])


@pytest.mark.parametrize("factor", [100.0, 1e6])
def test_scaled_multiplies_and_keeps_dtype(factor: float) -> None:
    u = _update()
    out = attacks.scaled(u, factor)
    for k in u:
        assert out[k].dtype == np.float32
        np.testing.assert_allclose(out[k], u[k] * factor, rtol=1e-6)


def test_scaled_stays_finite_at_the_float32_limit() -> None:
    out = attacks.scaled({"a": np.array([1.0, -2.0, 0.0], np.float32)}, 1e39)
    big = np.finfo(np.float32).max
    np.testing.assert_array_equal(out["a"], np.array([big, -big, 0.0], np.float32))


def test_gaussian_noise_is_seeded_and_has_the_stated_spread() -> None:
    u = {"a": np.zeros((200, 200), np.float32)}
    out = attacks.gaussian_noise(u, 0.5, seed=3)
    np.testing.assert_array_equal(out["a"], attacks.gaussian_noise(u, 0.5, seed=3)["a"])
    assert abs(float(out["a"].std()) - 0.5) < 0.01
    assert abs(float(out["a"].mean())) < 0.01


@pytest.mark.parametrize("kind", sorted(attacks.UPDATE_KINDS))
def test_update_attacks_keep_the_models_key_order_so_the_payload_decodes(kind: str) -> None:
    # Keys out of sorted order, as a model's are: the noise attack returned them sorted, so its
    # payload carried another schema and the server refused it as a payload for another model,
    # before the norm rule the attack is there to test
    rng = np.random.default_rng(1)
    u = {
        "z": rng.normal(size=(6, 4)).astype(np.float32),
        "a": rng.normal(size=7).astype(np.float32),
    }
    out = attacks.attack_update(kind, u, seed=2)
    assert list(out) == list(u)
    schema = [(k, v.shape) for k, v in u.items()]
    decoded = decode(encode(out, parse_spec("none")).payload, schema)
    assert set(decoded) == set(u)


def test_zero_update_is_zero_with_the_same_shapes() -> None:
    u = _update()
    out = attacks.zero_update(u)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in u.items()}
    assert all(not v.any() for v in out.values())


def test_flip_labels_maps_each_class_to_another() -> None:
    assert attacks.flip_labels([0, 1, 2, 3], 4) == [3, 2, 1, 0]
    assert attacks.flip_labels([0, 1, 1], 2) == [1, 0, 0]


def test_garbage_payload_is_seeded_uint8_of_the_size() -> None:
    out = attacks.garbage_payload(100, seed=1)
    assert out.dtype == np.uint8 and out.size == 100
    np.testing.assert_array_equal(out, attacks.garbage_payload(100, seed=1))
    assert attacks.garbage_payload(0, seed=1).size == 1


def test_garbage_payload_is_rejected_by_the_decoder() -> None:
    from feddistill.codec import PayloadError

    schema = [("a", (3, 4)), ("b", (5,))]
    with pytest.raises(PayloadError):
        decode(attacks.garbage_payload(64, seed=0), schema, max_payload_bytes=2**20)


def test_tamper_metrics_adds_or_drops_one_key() -> None:
    honest = {"num-examples": 10.0, "train-loss": 0.5, "train-accuracy": 0.9}
    extra = attacks.tamper_metrics(honest, "extra-metric")
    missing = attacks.tamper_metrics(honest, "missing-metric")
    assert set(extra) == {*honest, attacks.EXTRA_METRIC}
    assert set(missing) == set(honest) - {attacks.DROPPED_METRIC}
    assert honest == {"num-examples": 10.0, "train-loss": 0.5, "train-accuracy": 0.9}
    with pytest.raises(ValueError, match="not a metric attack"):
        attacks.tamper_metrics(honest, "scale")


def test_inflate_examples_multiplies_num_examples_only() -> None:
    out = attacks.inflate_examples({"num-examples": 12.0, "train-loss": 1.0}, 1e6)
    assert out == {"num-examples": 1.2e7, "train-loss": 1.0}


def test_attack_update_dispatches_and_replays_the_kept_update() -> None:
    u, old = _update(), {k: v + 1 for k, v in _update().items()}
    flipped = attacks.attack_update("sign-flip", u)
    np.testing.assert_array_equal(flipped["a"], -u["a"])
    first = attacks.attack_update("replay", u, replayed=None)
    later = attacks.attack_update("replay", u, replayed=old)
    np.testing.assert_array_equal(first["a"], u["a"])
    np.testing.assert_array_equal(later["a"], old["a"])
    with pytest.raises(ValueError, match="not an update attack"):
        attacks.attack_update("garbage", u)


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("attack.kind", "backdoor"),
        ("attack.fraction", 1.5),
        ("attack.fraction", -0.1),
        ("attack.noise-std", -1.0),
        ("attack.inflate", 0.0),
        ("attack.scale", float("inf")),
        ("attack.seed", -1),
    ],
)
def test_bad_attack_settings_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"invalid config {key} = "):
        parse_config({key: value})


def test_attacks_are_refused_in_deployment_mode() -> None:
    with pytest.raises(ConfigError, match=r"attack\.kind = 'sign-flip'.*simulation only"):
        parse_config({"mode": "deployment", "data.labels": "a,b", "attack.kind": "sign-flip"})
    parse_config({"mode": "deployment", "data.labels": "a,b"})  # no attack: accepted


def test_default_config_has_no_active_attack() -> None:
    cfg = parse_config({})
    assert cfg.attack.kind == "none" and not cfg.attack.active


# --- the train path ----------------------------------------------------------------------------


def _train(tmp_path: Path, partition: int, **overrides: object) -> np.ndarray:
    """One round of partition ``partition`` on a tiny stateless-protocol config."""
    flat = {
        "compression.uplink": "none",
        "compression.downlink": "q8",
        "compression.downlink-protocol": "stateless",
        **overrides,
    }
    cfg = tiny_config(tmp_path, **{"cache-dir": str(tmp_path / "cache"), **flat})
    _, _, labels = source_splits(cfg)
    models = initial_models(cfg, labels)
    zero = {n: np.zeros_like(a) for n, a in models.init_arrays.items()}
    down = encode(zero, parse_spec(cfg.compression.downlink)).payload
    inp = RoundInput(cfg, labels, models.digest, down, server_round=1)
    payload, _ = train_round(inp, {"partition-id": partition, "num-partitions": 3})
    delta = decode(payload, models.schema, max_payload_bytes=2**30)
    return np.concatenate([delta[n].ravel() for n in models.names])


@pytest.mark.slow  # two clients' rounds, trained twice each: ~30 s of CPU
def test_honest_client_is_bit_for_bit_unchanged_and_hostile_one_flips(tmp_path: Path) -> None:
    # Prepare: with fraction 1/3 and seed 0 one of the three partitions is hostile.
    (bad,) = attacks.hostile_partitions(3, 1 / 3, seed=0)
    good = (bad + 1) % 3
    attack = {"attack.kind": "sign-flip", "attack.fraction": 1 / 3}
    # Execute
    honest_good = _train(tmp_path, good)
    attacked_good = _train(tmp_path, good, **attack)
    honest_bad = _train(tmp_path, bad)
    attacked_bad = _train(tmp_path, bad, **attack)
    # Assert
    np.testing.assert_array_equal(attacked_good, honest_good)
    assert np.abs(honest_bad).sum() > 0
    np.testing.assert_array_equal(attacked_bad, -honest_bad)


def test_a_metric_attack_skips_the_clients_own_schema_check_on_hostile_nodes_only() -> None:
    """Before this, the honest client's own check refused the tampered record, so the
    bench's extra-metric cell measured a client error, never the server's admission control."""
    from feddistill import keys
    from feddistill.client import hostile
    from feddistill.records import metric_record

    (bad,) = attacks.hostile_partitions(3, 1 / 3, seed=0)
    good = (bad + 1) % 3
    cfg = parse_config(
        {"data.num-clients": 3, "attack.kind": "extra-metric", "attack.fraction": 1 / 3}
    )

    def node(pid: int) -> dict[str, object]:
        return {"partition-id": pid, "num-partitions": 3}

    assert hostile.tampers_metrics(cfg, node(bad))
    assert not hostile.tampers_metrics(cfg, node(good))
    assert not hostile.tampers_metrics(cfg, {})  # no partition: not a simulated node
    flip = cfg.with_overrides({"attack.kind": "sign-flip"})
    assert not hostile.tampers_metrics(flip, node(bad))
    tampered = attacks.tamper_metrics({k: 1.0 for k in keys.TRAIN_REPLY.required}, "extra-metric")
    with pytest.raises(ValueError, match="unknown"):
        metric_record(keys.TRAIN_REPLY, tampered)  # what stopped the attack at the client
