"""Bytes of Flower's SecAgg+ masked-vector reply for a model, built with Flower's own code.

Flower's SecAgg+ (``flwr.client.mod.secure_aggregation.secaggplus_mod``, stage 2) quantizes
every weight with ``quantize`` into ``[0, quantization_range)``, adds int64 masks from
``pseudo_rand_gen`` and sends each array as ``ndarray_to_bytes`` of the int64 result in a
ConfigRecord. This builds that reply for the given shapes with those same functions and sizes
it like every other message here (:func:`feddistill.records.message_bytes`), so the figure is
Flower's message format exactly, not an estimate. Its other stages (keys, shares, unmasking)
are of the same kind and size as ours and are left out, which only flatters Flower.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from feddistill.flower_compat import lent_task_identity, secaggplus
from feddistill.records import message_bytes

FLOWER_QUANTIZATION_RANGE = 4_194_304  # SecAggPlusWorkflow's defaults (flwr 1.42)
FLOWER_MODULUS_RANGE = 4_294_967_296


def flower_masked_reply_bytes(
    shapes: Sequence[tuple[int, ...]], *, clipping_range: float = 8.0, seed: int = 0
) -> int:
    """Serialized bytes of one client's SecAgg+ stage-2 reply for arrays of ``shapes``."""
    rng = np.random.default_rng(seed)
    update = [rng.normal(0, 0.01, size=s).astype(np.float32) for s in shapes]
    f = secaggplus
    quantized = f.quantize(update, clipping_range, FLOWER_QUANTIZATION_RANGE)
    mask = f.pseudo_rand_gen(b"\x00" * 32, FLOWER_MODULUS_RANGE, [a.shape for a in quantized])
    masked = f.parameters_mod(f.parameters_addition(quantized, mask), FLOWER_MODULUS_RANGE)
    arrays = [f.ndarray_to_bytes(a) for a in masked]
    content = RecordDict({"secaggplus": ConfigRecord({f.masked_parameters_key: arrays})})
    with lent_task_identity():  # Message() needs one; it is not counted
        return message_bytes(Message(content, dst_node_id=1, message_type="train"))
