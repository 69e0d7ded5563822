"""What to keep and how finely to quantize it: `CompressionSpec` and its one-line text form.

The text form is what goes into the Flower run config (`codec.uplink = "topk:0.01+q4+ef"`), so
it is parsed once, strictly, into a frozen dataclass; everything downstream trusts the dataclass.

Grammar: ``"none"`` or tokens joined by ``+`` (order free, each at most once)::

    none | topk:F | gtopk:F | thresh:E      selection (keep all / per-tensor top-k / global top-k /
    | pattern:F                             keep |w| >= E / a random F of each tensor, the same on
                                            every client of a round); at most one
    fp32 | fp16 | q8 | q4 | q2 | q1         value coding; at most one
    sr                                      stochastic (unbiased) rounding, needs q8/q4/q2/q1
    chunk:N                                 values per quantization scale (default 256)
    block:N                                 select runs of N elements, not single ones
                                            (needs topk/gtopk/pattern; default 1)
    dense:N                                 tensors with < N elements go unpruned (default 0)
    ef                                      error feedback (recorded; applied by the caller)

Absent tokens take the defaults of `CompressionSpec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SELECTIONS: tuple[str, ...] = ("none", "topk", "gtopk", "thresh", "pattern")
# The selections that keep a fraction ``keep`` of each tensor (or of all of them, gtopk).
FRACTION_SELECTIONS: tuple[str, ...] = ("topk", "gtopk", "pattern")
# The selections only an uplink may use: a pattern shared by a round's clients has no meaning
# for the broadcast, which has one sender (the config refuses them for the downlink).
UPLINK_ONLY_SELECTIONS: tuple[str, ...] = ("pattern",)
BIT_WIDTHS: tuple[int, ...] = (32, 16, 8, 4, 2, 1)
QUANTIZED_BITS: tuple[int, ...] = (8, 4, 2, 1)

_BITS_TOKENS: dict[str, int] = {"fp32": 32, "fp16": 16, "q8": 8, "q4": 4, "q2": 2, "q1": 1}
_TOKEN_HELP = (
    "none, topk:F, gtopk:F, thresh:E, pattern:F, fp32, fp16, q8, q4, q2, q1, sr, chunk:N, "
    "block:N, dense:N, ef"
)
MAX_BLOCK = 65535  # a u16 in the payload header
MAX_DENSE_BELOW = 2**32 - 1  # a u32 in the payload header


@dataclass(frozen=True)
class CompressionSpec:
    """How one model update is pruned and quantized before it goes on the wire.

    Attributes:
        select: "none" keeps every element; "topk" keeps the `keep` fraction of largest
            magnitudes of each tensor; "gtopk" keeps the `keep` fraction of largest magnitudes
            across all non-dense tensors together (Deep Gradient Compression, Lin et al. 2018,
            arXiv:1712.01887, uses one threshold per layer; the global variant lets layers that
            changed more keep more); "thresh" keeps |w| >= `eps`; "pattern" keeps a random
            `keep` fraction of each tensor's units drawn from the ``pattern_seed`` given to
            `encode`, so every client of a round sends the same coordinates (what a
            coordinate-wise robust rule needs: the median of 1%-sparse top-k updates on
            different coordinates is zero almost everywhere; docs/robustness-bench.md).
        keep: kept fraction in (0, 1] for topk/gtopk/pattern; must stay 1.0 otherwise.
        eps: magnitude threshold >= 0 for thresh; must stay 0.0 otherwise.
        bits: 32 = float32, 16 = float16, 8/4 = symmetric signed integers with one absmax scale
            per `chunk` kept values, 2 = ternary {-1, 0, +1}·scale, 1 = sign·scale.
        stochastic: unbiased stochastic rounding instead of round-to-nearest (bits 8/4/2/1).
        chunk: kept values sharing one float32 scale.
        error_feedback: the caller adds the previous residual before encoding (see
            `with_residual` / `residual_after`); the codec itself only records the choice.
        dense_below: tensors with fewer elements are sent whole as float16 (float32 when
            `bits` is 32, so a lossless spec stays lossless) — biases, norms, small heads.
        block: topk/gtopk rank runs of `block` consecutive elements of a tensor (by their sum
            of squares) and keep whole runs. A position then names a run, so positions cost
            about (log2(1/keep) + 1.5) / block bits per kept value: at keep 1% that is 0.5 bits
            at block 16 against 8.1 at block 1 (positions.py). The price is a coarser choice:
            a run is kept for its total, not for each of its elements.
    """

    select: str = "none"
    keep: float = 1.0
    eps: float = 0.0
    bits: int = 32
    stochastic: bool = False
    chunk: int = 256
    error_feedback: bool = False
    dense_below: int = 0
    block: int = 1

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ValueError(
                f"CompressionSpec.select={self.select!r} is not allowed; use one of {SELECTIONS}"
            )
        keep = _as_float("keep", self.keep)
        if not 0.0 < keep <= 1.0:
            raise ValueError(
                f"CompressionSpec.keep={self.keep!r} is not allowed; use 0 < keep <= 1"
            )
        if self.select not in FRACTION_SELECTIONS and keep != 1.0:
            raise ValueError(
                f"CompressionSpec.keep={self.keep!r} is only used by select 'topk'/'gtopk'/"
                "'pattern' "
                f"(select is {self.select!r}); leave keep at 1.0"
            )
        eps = _as_float("eps", self.eps)
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(
                f"CompressionSpec.eps={self.eps!r} is not allowed; use a finite eps >= 0"
            )
        if self.select != "thresh" and eps != 0.0:
            raise ValueError(
                f"CompressionSpec.eps={self.eps!r} is only used by select 'thresh' "
                f"(select is {self.select!r}); leave eps at 0.0"
            )
        if isinstance(self.bits, bool) or self.bits not in BIT_WIDTHS:
            raise ValueError(
                f"CompressionSpec.bits={self.bits!r} is not allowed; use one of {BIT_WIDTHS}"
            )
        if not isinstance(self.stochastic, bool):
            raise ValueError(
                f"CompressionSpec.stochastic={self.stochastic!r} is not allowed; use True/False"
            )
        if self.stochastic and self.bits not in QUANTIZED_BITS:
            raise ValueError(
                f"CompressionSpec.stochastic=True is not allowed with bits={self.bits}; "
                f"use bits in {QUANTIZED_BITS} or stochastic=False"
            )
        _check_int("chunk", self.chunk, 1)
        if not isinstance(self.error_feedback, bool):
            raise ValueError(
                f"CompressionSpec.error_feedback={self.error_feedback!r} is not allowed; "
                "use True/False"
            )
        _check_int("dense_below", self.dense_below, 0, MAX_DENSE_BELOW)
        _check_int("block", self.block, 1, MAX_BLOCK)
        if self.block > 1 and self.select not in FRACTION_SELECTIONS:
            raise ValueError(
                f"CompressionSpec.block={self.block} is only used by select 'topk'/'gtopk'/"
                "'pattern' "
                f"(select is {self.select!r}); leave block at 1"
            )
        # Normalise ints to floats so `CompressionSpec(keep=1)` equals its parsed text form.
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "eps", eps)

    def to_string(self) -> str:
        """Canonical text form; `parse_spec(spec.to_string()) == spec` for every valid spec."""
        tokens: list[str] = []
        if self.select in FRACTION_SELECTIONS:
            tokens.append(f"{self.select}:{_format_float(self.keep)}")
        elif self.select == "thresh":
            tokens.append(f"thresh:{_format_float(self.eps)}")
        if self.bits != 32:
            tokens.append({v: k for k, v in _BITS_TOKENS.items()}[self.bits])
        if self.stochastic:
            tokens.append("sr")
        if self.chunk != 256:
            tokens.append(f"chunk:{self.chunk}")
        if self.block != 1:
            tokens.append(f"block:{self.block}")
        if self.dense_below != 0:
            tokens.append(f"dense:{self.dense_below}")
        if self.error_feedback:
            tokens.append("ef")
        return "+".join(tokens) if tokens else "none"


def _check_int(field: str, value: object, low: int, high: int | None = None) -> None:
    """Refuse a non-integer (bools included) or one outside [low, high]."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(
            f"CompressionSpec.{field}={value!r} is not allowed; use an integer {allowed}"
        )


def _as_float(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"CompressionSpec.{field}={value!r} is not allowed; use a number")
    return float(value)


def _format_float(value: float) -> str:
    # repr is the shortest text that round-trips; drop the '+' of large exponents ("1e+20")
    # because '+' separates tokens.
    return repr(float(value)).replace("e+", "e")


def parse_spec(text: str) -> CompressionSpec:
    """Parse ``"gtopk:0.01+q4+sr+block:16+dense:20000+ef"`` (grammar: module docstring).

    Raises:
        ValueError: naming the offending token and listing the allowed ones, for an unknown,
            duplicated, conflicting or malformed token, or an out-of-range number.
    """
    if not isinstance(text, str):
        raise ValueError(f"compression spec must be a string, got {text!r}")
    body = text.strip()
    if not body:
        raise ValueError(f"empty compression spec {text!r}; allowed tokens: {_TOKEN_HELP}")
    fields: dict[str, object] = {}
    seen: dict[str, str] = {}  # group -> token that set it, to name both in conflicts

    def claim(group: str, token: str) -> None:
        if group in seen:
            raise ValueError(
                f"token {token!r} conflicts with {seen[group]!r} in compression spec {text!r} "
                f"(at most one {group} token); allowed tokens: {_TOKEN_HELP}"
            )
        seen[group] = token

    for raw in body.split("+"):
        token = raw.strip()
        name, sep, arg = token.partition(":")
        if name == "none" and not sep:
            claim("selection", token)
            fields["select"] = "none"
        elif name in ("topk", "gtopk", "thresh", "pattern") and sep:
            claim("selection", token)
            value = _parse_number(token, arg, text)
            fields["select"] = name
            fields["eps" if name == "thresh" else "keep"] = value
        elif name in _BITS_TOKENS and not sep:
            claim("bits", token)
            fields["bits"] = _BITS_TOKENS[name]
        elif name == "sr" and not sep:
            claim("sr", token)
            fields["stochastic"] = True
        elif name == "ef" and not sep:
            claim("ef", token)
            fields["error_feedback"] = True
        elif name in ("chunk", "block", "dense") and sep:
            claim(name, token)
            field = {"chunk": "chunk", "block": "block", "dense": "dense_below"}[name]
            fields[field] = _parse_int(token, arg, text)
        else:
            raise ValueError(
                f"unknown or malformed token {token!r} in compression spec {text!r}; "
                f"allowed tokens: {_TOKEN_HELP}"
            )
    try:
        return CompressionSpec(**fields)  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"compression spec {text!r}: {err}") from None


def _parse_number(token: str, arg: str, text: str) -> float:
    try:
        value = float(arg)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(
            f"token {token!r} in compression spec {text!r} needs a finite number after ':'; "
            f"allowed tokens: {_TOKEN_HELP}"
        )
    return value


def _parse_int(token: str, arg: str, text: str) -> int:
    if not (arg.isascii() and arg.isdigit()):
        raise ValueError(
            f"token {token!r} in compression spec {text!r} needs a non-negative integer after "
            f"':'; allowed tokens: {_TOKEN_HELP}"
        )
    return int(arg)
