"""Pruned and quantized model updates as one uint8 array: the pure codec (no Flower objects).

`encode` / `decode` move a whole update; `CompressionSpec` / `parse_spec` say how; the
error-feedback helpers and `save_arrays` / `load_arrays` support the client's residual. Module
docs: spec.py (grammar), selection.py (top-k), quant.py (value coding and error bounds),
positions.py (position coding costs), wire.py (byte layout and validation).
"""

from .errors import PayloadError
from .feedback import load_arrays, residual_after, save_arrays, with_residual
from .positions import bitmap_bits_per_value, rice_bits_per_value
from .quant import chunk_absmax, error_bound
from .spec import CompressionSpec, parse_spec
from .wire import (
    FORMAT_VERSION,
    Encoded,
    EncodeStats,
    decode,
    dense_float32_bytes,
    encode,
    max_encoded_bytes,
    pattern_units,
    round_pattern_seed,
    schema_hash,
    schema_of,
)

__all__ = [
    "FORMAT_VERSION",
    "CompressionSpec",
    "EncodeStats",
    "Encoded",
    "PayloadError",
    "bitmap_bits_per_value",
    "chunk_absmax",
    "decode",
    "dense_float32_bytes",
    "encode",
    "error_bound",
    "load_arrays",
    "max_encoded_bytes",
    "parse_spec",
    "pattern_units",
    "residual_after",
    "rice_bits_per_value",
    "round_pattern_seed",
    "save_arrays",
    "schema_hash",
    "schema_of",
    "with_residual",
]
