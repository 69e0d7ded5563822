"""The run config: parsed once, every bad value named with what is allowed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from feddistill.config import (
    Config,
    ConfigError,
    config_from_json,
    known_keys,
    parse_config,
    reference,
)

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_match_dataclass_defaults() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    assert app_config == Config().to_flat()
    assert parse_config(app_config) == Config()


def test_flat_round_trip() -> None:
    cfg = parse_config({"rounds": 3, "data.alpha": 0.25, "compression.uplink": "topk:0.1+q8"})
    assert cfg.rounds == 3 and cfg.data.alpha == 0.25
    assert config_from_json(cfg.to_json()) == cfg
    assert parse_config(cfg.to_flat()) == cfg


def test_int_accepted_for_float_keys() -> None:
    assert parse_config({"distill.temperature": 3}).distill.temperature == 3.0


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"rounds": 0}, r"rounds = 0: expected a number in \[1"),
        ({"rounds": "5"}, r"rounds = '5': expected an integer"),
        ({"rounds": True}, r"rounds = True: expected an integer"),
        ({"data.alpha": 0.0}, r"data.alpha = 0.0: expected a number in \(0"),
        ({"data.alpha": -1}, r"data.alpha = -1.0"),
        ({"data.partitioning": "zipf"}, r"data.partitioning = 'zipf'.*'iid', 'dirichlet'"),
        ({"distill.temperature": 0}, r"distill.temperature = 0.0"),
        ({"distill.alpha": 1.5}, r"distill.alpha = 1.5: expected a number in \[0, 1\]"),
        ({"distill.mutual": 1}, r"distill.mutual = 1: expected true or false"),
        ({"server.strategy": "fedsgd"}, r"server.strategy = 'fedsgd'.*'fedavg'"),
        ({"server.clients-per-round": 2.5}, r"server.clients-per-round = 2.5"),
        ({"compression.uplink": "topk:2"}, r"compression.uplink = 'topk:2'"),
        ({"compression.uplink": "zip"}, r"compression.uplink = 'zip'"),
        ({"train.precision": "fp8"}, r"train.precision = 'fp8'"),
        ({"server.local-only": False}, r"server.local-only = False: expected one of 'auto', 'on'"),
    ],
)
def test_bad_values_name_key_value_and_allowed(flat: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(flat)


def test_unknown_key_suggests_close_match() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'data.alpah'.*data.alpha"):
        parse_config({"data.alpah": 0.5})


def test_clients_per_round_fraction_or_count() -> None:
    s = parse_config({"server.clients-per-round": 0.3}).server
    assert s.num_sampled(s.clients_per_round, 10) == 3
    s = parse_config({"server.clients-per-round": 4}).server
    assert s.num_sampled(s.clients_per_round, 10) == 4
    assert s.num_sampled(s.clients_per_round, 3) == 3  # never more than exist


def test_known_keys_are_dotted_and_hyphenated() -> None:
    keys = known_keys()
    assert "distill.temperature" in keys and "data.num-clients" in keys
    assert all("_" not in k for k in keys)


def test_compression_specs_are_parsed_once_and_the_flat_config_keeps_their_text() -> None:
    import pickle

    from feddistill.codec import CompressionSpec, parse_spec

    cfg = parse_config({"compression.uplink": "topk:0.02+q8", "compression.downlink": "q8"})

    assert cfg.compression.uplink_spec == parse_spec("topk:0.02+q8")
    assert isinstance(cfg.compression.downlink_spec, CompressionSpec)
    flat = cfg.to_flat()
    assert flat["compression.uplink"] == "topk:0.02+q8" and "compression.uplink-spec" not in flat
    again = pickle.loads(pickle.dumps(cfg))  # how Ray ships it to workers
    assert again == cfg and again.compression.uplink_spec == cfg.compression.uplink_spec
    moved = cfg.with_overrides({"compression.uplink": "none"})
    assert moved.compression.uplink_spec == parse_spec("none")


def test_the_downlink_protocol_is_its_own_key_and_the_old_ef_spelling_still_reads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from feddistill.codec import parse_spec

    assert Config().compression.chained and not Config().compression.downlink_spec.error_feedback
    stateless = parse_config(
        {"compression.downlink": "q8", "compression.downlink-protocol": "stateless"}
    )
    assert not stateless.compression.chained
    # the old spelling: read as the chain, rewritten without the token, with a note saying so
    with caplog.at_level("WARNING", logger="feddistill"):
        old = parse_config({"compression.downlink": "topk:0.05+q4+ef"})
    assert old == Config() and old.to_flat()["compression.downlink"] == "topk:0.05+q4"
    assert "compression.downlink-protocol = 'chain'" in caplog.text
    assert old.compression.downlink_spec == parse_spec("topk:0.05+q4")
    # `ef` with the stateless protocol contradicts itself: refused, saying what to write
    with pytest.raises(ConfigError, match=r"write compression.downlink = 'q8'"):
        parse_config(
            {"compression.downlink": "q8+ef", "compression.downlink-protocol": "stateless"}
        )


def test_a_shared_pattern_is_an_uplink_selection_only() -> None:
    assert (
        parse_config({"compression.uplink": "pattern:0.1+q4+ef"}).compression.uplink_spec.select
        == "pattern"
    )
    with pytest.raises(ConfigError, match=r"compression.downlink = 'pattern:0.1\+q4'.*uplink"):
        parse_config({"compression.downlink": "pattern:0.1+q4"})


def test_a_downlink_spec_without_a_protocol_notes_that_the_meaning_changed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="feddistill"):
        parse_config({"compression.downlink": "q8"})
    assert "meant the stateless protocol" in caplog.text
    flat = parse_config({"compression.downlink": "q8"}).to_flat()
    caplog.clear()
    with caplog.at_level("WARNING", logger="feddistill"):  # the flat form a client gets: quiet
        parse_config(flat)
        parse_config({"compression.downlink": "q8", "compression.downlink-protocol": "chain"})
    assert caplog.text == ""


def test_choices_are_declared_once_as_literal_types_and_checked_alike() -> None:
    import dataclasses
    from typing import get_type_hints

    from feddistill.config import TrainConfig, choices

    for key, value in (
        ("train.precision", "fp8"),
        ("train.device", "tpu"),
        ("data.partitioning", "zipf"),
        ("server.local-only", "maybe"),
        ("compression.downlink-protocol", "push"),
        ("mode", "cloud"),
    ):
        with pytest.raises(ConfigError, match=f"invalid config {key} = '{value}': expected one"):
            parse_config({key: value})
    with pytest.raises(ConfigError, match=r"train\.precision"):  # built directly, checked too
        TrainConfig(precision="fp8")  # type: ignore[arg-type]
    hints = get_type_hints(TrainConfig)
    fields = {f.name: choices(hints[f.name]) for f in dataclasses.fields(TrainConfig)}
    assert fields["precision"] == ("fp32", "bf16", "fp16") and fields["lr"] is None


def test_the_reference_offers_the_shared_pattern_for_the_uplink_only() -> None:
    rows = {row["key"]: row["allowed"] for row in reference()}
    assert "pattern:F" in rows["compression.uplink"]
    assert (
        "pattern" not in rows["compression.downlink"] and "topk:F" in rows["compression.downlink"]
    )
