"""CompressionSpec validation and the text grammar of parse_spec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from feddistill.codec import CompressionSpec, parse_spec


def test_defaults_and_none() -> None:
    spec = parse_spec("none")

    assert spec == CompressionSpec()
    assert (spec.select, spec.keep, spec.bits, spec.stochastic) == ("none", 1.0, 32, False)
    assert (spec.chunk, spec.error_feedback, spec.dense_below) == (256, False, 0)
    assert spec.to_string() == "none"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("topk:0.01+q4+ef", CompressionSpec("topk", keep=0.01, bits=4, error_feedback=True)),
        (
            "topk:0.01+q4+sr+chunk:128+dense:20000+ef",
            CompressionSpec(
                "topk",
                keep=0.01,
                bits=4,
                stochastic=True,
                chunk=128,
                dense_below=20000,
                error_feedback=True,
            ),
        ),
        ("gtopk:0.1+q8", CompressionSpec("gtopk", keep=0.1, bits=8)),
        ("gtopk:0.01+block:16+q4", CompressionSpec("gtopk", keep=0.01, bits=4, block=16)),
        (
            "pattern:0.1+block:16+q4+ef",
            CompressionSpec("pattern", keep=0.1, bits=4, block=16, error_feedback=True),
        ),
        ("thresh:1e-3+fp16", CompressionSpec("thresh", eps=1e-3, bits=16)),
        ("q1+sr", CompressionSpec(bits=1, stochastic=True)),
        ("none+q2", CompressionSpec(bits=2)),
        (" ef + fp32 ", CompressionSpec(error_feedback=True)),
    ],
)
def test_parse_examples(text: str, expected: CompressionSpec) -> None:
    spec = parse_spec(text)

    assert spec == expected
    assert parse_spec(spec.to_string()) == spec


specs = st.builds(
    lambda select, keep, eps, bits, sr, chunk, ef, dense, block: CompressionSpec(
        select=select,
        keep=keep if select in ("topk", "gtopk", "pattern") else 1.0,
        eps=eps if select == "thresh" else 0.0,
        bits=bits,
        stochastic=sr and bits <= 8,
        chunk=chunk,
        error_feedback=ef,
        dense_below=dense,
        block=block if select in ("topk", "gtopk", "pattern") else 1,
    ),
    st.sampled_from(["none", "topk", "gtopk", "thresh", "pattern"]),
    st.floats(min_value=1e-9, max_value=1.0, exclude_min=False).filter(lambda v: v > 0),
    st.floats(min_value=0.0, max_value=1e30, allow_nan=False, allow_infinity=False),
    st.sampled_from([32, 16, 8, 4, 2, 1]),
    st.booleans(),
    st.integers(min_value=1, max_value=1 << 20),
    st.booleans(),
    st.integers(min_value=0, max_value=(1 << 32) - 1),
    st.integers(min_value=1, max_value=65535),
)


@given(specs)
def test_to_string_round_trips(spec: CompressionSpec) -> None:
    assert parse_spec(spec.to_string()) == spec


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("q3", "'q3'"),
        ("topk:0.1+q4+q8", "'q8'.*conflicts with 'q4'"),
        ("topk:0.1+gtopk:0.2", "'gtopk:0.2'.*conflicts"),
        ("ef+ef", "'ef'.*conflicts"),
        ("topk", "'topk'"),
        ("topk:abc", "'topk:abc'"),
        ("topk:nan", "'topk:nan'"),
        ("topk:0", "keep=0.0"),
        ("topk:1.5", "keep=1.5"),
        ("thresh:-1", "eps=-1.0"),
        ("chunk:0", "chunk=0"),
        ("chunk:1.5", "'chunk:1.5'"),
        ("dense:-3", "'dense:-3'"),
        ("none+block:8", "block=8 is only used by"),
        ("topk:0.1+block:x", "'block:x'"),
        ("q4+", "''"),
        ("", "empty"),
        ("fp16+sr", "stochastic"),
        ("sr:1", "'sr:1'"),
        ("TOPK:0.1", "'TOPK:0.1'"),
    ],
)
def test_parse_errors_name_the_token(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        parse_spec(text)

    message = str(info.value)
    assert "allowed" in message or "use" in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"select": "random"}, r"select='random'.*'none', 'topk', 'gtopk', 'thresh'"),
        ({"select": "topk", "keep": 0.0}, r"keep=0\.0.*0 < keep <= 1"),
        ({"select": "topk", "keep": True}, r"keep=True"),
        ({"keep": 0.5}, r"keep=0\.5.*only used by"),
        ({"eps": 0.1}, r"eps=0\.1.*only used by"),
        ({"select": "thresh", "eps": float("inf")}, r"eps=inf.*finite"),
        ({"bits": 3}, r"bits=3.*\(32, 16, 8, 4, 2, 1\)"),
        ({"bits": True}, r"bits=True"),
        ({"bits": 16, "stochastic": True}, r"stochastic=True is not allowed with bits=16"),
        ({"chunk": 0}, r"chunk=0.*>= 1"),
        ({"dense_below": -1}, r"dense_below=-1.*\[0, 4294967295\]"),
        ({"dense_below": 2**32}, r"dense_below=4294967296.*\[0, 4294967295\]"),
        ({"select": "topk", "keep": 0.1, "block": 0}, r"block=0.*\[1, 65535\]"),
        ({"select": "topk", "keep": 0.1, "block": 65536}, r"block=65536"),
        ({"select": "thresh", "eps": 0.1, "block": 4}, r"block=4 is only used by"),
        ({"error_feedback": 1}, r"error_feedback=1"),
    ],
)
def test_dataclass_validation_names_field_value_and_allowed(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CompressionSpec(**kwargs)


def test_spec_is_frozen_and_int_keep_normalised() -> None:
    spec = CompressionSpec("topk", keep=1)

    assert isinstance(spec.keep, float)
    with pytest.raises(AttributeError):
        spec.bits = 8  # type: ignore[misc]
