"""What a client does in a round, as plain functions (the ClientApp only unpacks and packs).

train_round: rebuild the initial student, apply the downlink, make sure the local teacher is
fine-tuned (cached on disk), distill the student from it, and return the encoded update
``student_after - received_student`` of the exchanged parameters, with error feedback.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddistill import keys
from feddistill.client import hostile
from feddistill.codec import (
    CompressionSpec,
    Encoded,
    PayloadError,
    decode,
    encode,
    residual_after,
    round_pattern_seed,
    with_residual,
)
from feddistill.codec.chain import DIGEST_CHECK, apply_chain, unpack_chain
from feddistill.codec.wire import unflatten
from feddistill.config import Config, parse_config
from feddistill.distill.train import (
    Stats,
    encode_texts,
    evaluate,
    pick_device,
)
from feddistill.keys import NORM_BIT
from feddistill.models.build import Labels, get_arrays, set_arrays
from feddistill.node_state import ClientState, DownlinkCache
from feddistill.privacy.mechanism import clip_to_norm
from feddistill.recipe import (
    NodeData,
    distill_student,
    encode_train,
    partition_node,
    teacher_for_round,
)
from feddistill.run_inputs import (
    InitialModels,
    default_cache_dir,
    initial_models,
    local_file_split,
    teacher_cache_key,
)
from feddistill.secagg.distributed import NoisyField, encode_noisy, rotation_signs
from feddistill.secagg.protocol import Client as SecAggClient
from feddistill.secagg.protocol import pack
from feddistill.secagg.quantize import FieldSpec, encode_update, shared_pattern


class ClientError(RuntimeError):
    """A precondition failed on this client; the message is sent back to the server."""


@dataclass
class RoundInput:
    """Everything the server sent, already unpacked from the Flower message."""

    cfg: Config
    labels: Labels
    init_digest: str
    payload: np.ndarray
    server_round: int
    proximal_mu: float = 0.0
    run_id: str = ""  # hex; scopes residuals and a mutually trained teacher to the run
    clip_norm: float = 0.0  # privacy: this round's clip (adaptive clipping); 0: privacy.clip
    local_epochs: int = 0  # this round's local epochs (train.rising-epochs); 0: train.local-epochs
    secure: SecureInput | None = None  # secure aggregation: this round's masking step


@dataclass
class SecureInput:
    """The masking step of secure aggregation (step 2): this node's protocol state, the shares
    the other clients sent it, and the round's public pattern seed and client count."""

    client: SecAggClient
    received: dict[int, bytes]
    pattern_seed: int
    clients: int
    noise_multiplier: float = 0.0  # distributed DP: sigma, and the fewest survivors t the
    threshold: int = 0  # noise shares are sized for (each client adds variance mu / t)


def node_data(cfg: Config, labels: Labels, node_config: dict[str, Any]) -> NodeData:
    """A device reads its own ``data-path``; a simulated node its ``partition-id``."""
    cache_root = Path(str(node_config.get(keys.NODE_CACHE_DIR) or default_cache_dir(cfg)))
    if keys.DATA_PATH in node_config:
        path = str(node_config[keys.DATA_PATH])
        train, val = local_file_split(cfg, path, labels)
        key = "node-" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]
    elif keys.PARTITION_ID in node_config:
        data = partition_node(cfg, int(node_config[keys.PARTITION_ID]), cache_root)
        train, val, key = data.train, data.val, data.key
    else:
        raise ClientError(
            "node config has neither 'data-path' (a device's data file) nor 'partition-id' "
            "(a simulated node); start the SuperNode with --node-config 'data-path=\"...\"'"
        )
    if len(train) == 0:
        raise ClientError(f"client {key} has no training examples")
    return NodeData(key, train, val, cache_root)


@functools.lru_cache(maxsize=1)
def _initial(cfg_json: str, labels: tuple[str, ...]) -> InitialModels:
    """Per-process: simulation workers serve many clients with the same initial models."""
    return initial_models(parse_config(json.loads(cfg_json)), Labels(labels))


def _models_json(cfg: Config) -> str:
    keep = {
        k: v
        for k, v in cfg.to_flat().items()
        if k.startswith("model.") or k in ("seed", "data.max-length")
    }
    return json.dumps(keep, sort_keys=True)


def load_initial(cfg: Config, labels: Labels, expected_digest: str) -> InitialModels:
    models = _initial(_models_json(cfg), labels.names)
    if expected_digest and models.digest != expected_digest:
        raise ClientError(
            f"initial student mismatch: this client built {models.digest}, the server "
            f"{expected_digest}; teacher/student files or library versions differ across nodes"
        )
    return models


def received_arrays(
    models: InitialModels, cfg: Config, payload: np.ndarray, cache_root: Path
) -> dict[str, np.ndarray]:
    """The global student as the server sent it.

    Stateless downlink: initial weights + decoded delta. Chained downlink (the default):
    the newest model this node holds, brought up to date with the versions in the message.
    """
    limit = int(cfg.compression.max_payload_mb * 2**20)
    if not cfg.compression.chained:
        delta = decode(payload, models.schema, max_payload_bytes=limit)
        return {n: models.init_arrays[n] + delta[n] for n in models.names}
    msg = unpack_chain(payload, max_payload_bytes=limit)
    chain = msg.chain.hex()
    cache = DownlinkCache.open(cache_root)
    start, held = models.init_arrays, 0
    if msg.base is None:
        # Any version this node holds from first_needed on will do (in simulation another
        # virtual client of the host may have reached a newer one); version 0 is always at hand.
        found = cache.newest(chain, msg.first_needed, msg.target)
        if found is not None:
            held, start = found
        elif msg.first_needed > 0:
            raise ClientError(
                f"the downlink continues version {msg.first_needed} of model chain {chain}, "
                f"which is not in this node's cache ({cache.root}); the server sends the "
                "whole model next time"
            )
    try:
        arrays = apply_chain(msg, start, held, models.schema, max_payload_bytes=limit)
    except PayloadError as err:
        if err.check == DIGEST_CHECK:
            # What this node holds is not the version the server continues (e.g. a version
            # made before the server crashed and rebuilt differently after it resumed): drop
            # the chain here; the error reply makes the server send the whole model next.
            cache.drop(chain)
        raise
    if msg.target != held:
        cache.save(chain, msg.target, arrays)
    return arrays


def _round_seed(seed: int, server_round: int, client_key: str) -> int:
    """Stable across processes (unlike ``hash()``), distinct per client and round."""
    mix = hashlib.sha256(f"{seed}/{server_round}/{client_key}".encode()).hexdigest()
    return int(mix[:8], 16)


def train_round(
    inp: RoundInput, node_config: dict[str, Any]
) -> tuple[np.ndarray, dict[str, float]]:
    t0 = time.perf_counter()
    cfg, labels = inp.cfg, inp.labels
    spec = cfg.compression.uplink_spec
    if not inp.run_id and (spec.error_feedback or cfg.distill.mutual):
        raise ClientError(
            f"the server sent no run id ({keys.RUN_ID}); error feedback and mutual distillation "
            "keep state between rounds that must belong to one run: update the server"
        )
    data = node_data(cfg, labels, node_config)
    attacker = hostile.is_hostile(cfg, node_config)  # simulation only, attack.* configured
    if attacker:
        data = hostile.training_data(cfg, len(labels.names), data)
    models = load_initial(cfg, labels, inp.init_digest)
    ref = received_arrays(models, cfg, inp.payload, data.cache_root)
    state = ClientState.open(data.cache_root, data.key)
    device = pick_device(cfg.train.device)
    s_train, t_train = encode_train(models, data.train, cfg.data.max_length)
    teacher, logits, fitted = teacher_for_round(
        cfg, labels, models, data, state, t_train, device, mutual_run=inp.run_id
    )

    student = copy.deepcopy(models.student)
    set_arrays(student, ref)
    # distributed DP sends nothing computed from the data but the noisy sum: no arrival figures
    arrival = (
        None if cfg.privacy.distributed else _on_validation(cfg, models, data, student, device)
    )
    seed = _round_seed(cfg.seed, inp.server_round, data.key)
    stats = distill_student(
        cfg,
        student,
        s_train,
        t_train,
        teacher,
        logits,
        epochs=inp.local_epochs or cfg.train.local_epochs,
        seed=seed,
        device=device,
        proximal_mu=inp.proximal_mu,
    )
    if cfg.distill.mutual:  # the teacher learned too; it never leaves the node
        assert teacher is not None
        key = teacher_cache_key(cfg, labels, data.train, val=data.val, mutual_run=inp.run_id)
        fine_tuned = teacher_cache_key(cfg, labels, data.train, val=data.val)
        state.save_teacher(
            key, {k: v.cpu() for k, v in teacher.state_dict().items()}, None, keep=(fine_tuned,)
        )

    after = get_arrays(student, models.names)
    update = {n: after[n] - ref[n] for n in models.names}
    if attacker:
        update = hostile.update(cfg, update, state.root, inp.server_round, data.key)
    if inp.secure is not None:
        payload, privacy_metrics = secure_update(inp, models, state, update, seed), {}
    else:
        encoded, privacy_metrics = private_update(cfg, inp, models, state, update, spec, seed)
        payload = encoded.payload

    if cfg.privacy.distributed:
        # The server is not trusted: nothing computed from the data leaves but the noisy sum
        # (the example count is reported as 1; weighting is uniform under secure aggregation).
        return payload, {keys.NUM_EXAMPLES: 1.0}
    assert arrival is not None
    metrics = {  # keys.TRAIN_REPLY declares these
        **privacy_metrics,
        keys.NUM_EXAMPLES: float(len(data.train)),
        keys.TRAIN_LOSS: stats.loss,
        keys.TRAIN_ACCURACY: stats.accuracy,
        keys.TEACHER_FITTED: float(fitted),
        keys.CLIENT_SECONDS: time.perf_counter() - t0,
        keys.STATE_BYTES: float(state.disk_bytes()),
        keys.ARRIVAL_EXAMPLES: float(arrival.examples),
        keys.ARRIVAL_LOSS: arrival.loss if arrival.examples else 0.0,
        keys.ARRIVAL_ACCURACY: arrival.accuracy if arrival.examples else 0.0,
    }
    if attacker:
        payload, metrics = hostile.reply(cfg, payload, metrics, inp.server_round, data.key)
    # The cached initial models stay on CPU (only deep copies were moved to the device), so
    # dropping these copies and emptying the allocator's cache leaves an idle worker no GPU memory.
    del teacher, student
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return payload, metrics


def private_update(
    cfg: Config,
    inp: RoundInput,
    models: InitialModels,
    state: ClientState,
    update: dict[str, np.ndarray],
    spec: CompressionSpec,
    seed: int,
) -> tuple[Encoded, dict[str, float]]:
    """Error feedback, then (with privacy on) clipping, then compression.

    The order is what keeps the release at sensitivity ``C`` (docs/privacy.md): the residual
    is added first, the sum is clipped to ``C``, and only the clipped vector is encoded, so the
    message is a function of a vector of norm <= ``C``. The new residual is
    ``clipped - decoded``: the codec's error on that clipped vector, never the part the clip
    cut off, so no unclipped information reaches a later message either.
    """
    if spec.error_feedback:
        residual = state.load_residual(models.schema, before_round=inp.server_round, run=inp.run_id)
        update = with_residual(update, residual)
    extra: dict[str, float] = {}
    if cfg.privacy.central:
        clip = inp.clip_norm if inp.clip_norm > 0 else cfg.privacy.clip
        update, norm = clip_to_norm(update, clip)
        extra[NORM_BIT] = float(norm > clip)
    pattern = round_pattern_seed(cfg.seed, inp.server_round) if spec.select == "pattern" else None
    encoded = encode(update, spec, seed=seed, pattern_seed=pattern)
    if spec.error_feedback:
        state.save_residual(
            residual_after(update, encoded.decoded), inp.server_round, run=inp.run_id
        )
    return encoded, extra


def secure_update(
    inp: RoundInput,
    models: InitialModels,
    state: ClientState,
    update: dict[str, np.ndarray],
    seed: int,
) -> np.ndarray:
    """Error feedback, the round's shared pattern, clipping and stochastic rounding, then the
    masks (:mod:`feddistill.secagg`); what the pattern and the clip left out is the residual.

    With distributed DP the pattern's values are clipped to ``privacy.clip``, rotated, rounded
    to integers and given this client's share of the noise
    (:mod:`feddistill.secagg.distributed`); the noise and the rounding draw from OS entropy,
    and the residual keeps only the encoding's error on the clipped values (as central DP).
    """
    sec, cfg = inp.secure, inp.cfg
    assert sec is not None
    s = cfg.secure
    residual = state.load_residual(models.schema, before_round=inp.server_round, run=inp.run_id)
    flat = np.concatenate([np.ravel(update[n] + residual.get(n, 0.0)) for n in models.names])
    pattern = shared_pattern(sec.pattern_seed, inp.server_round, flat.size, s.keep)
    spec: FieldSpec | NoisyField
    if cfg.privacy.distributed:
        spec = NoisyField(
            s.bits, cfg.privacy.clip, len(pattern), sec.clients, sec.threshold,
            sec.noise_multiplier,
        )  # fmt: skip
        rng = np.random.default_rng(secrets.randbits(128))
        signs = rotation_signs(sec.pattern_seed, inp.server_round, spec.padded)
        values, clipped, counted = encode_noisy(flat[pattern], spec, signs, rng, rng)
        rest = flat.copy()
        rest[pattern] = clipped - counted
    else:
        spec = FieldSpec(s.bits, s.clip, sec.clients)
        values, rest = encode_update(flat, pattern, spec, np.random.default_rng(seed))
    state.save_residual(unflatten(models.names, rest, dict(models.schema)), inp.server_round,
                        run=inp.run_id)  # fmt: skip
    masked = sec.client.masked_input(values, sec.received, spec)
    return np.frombuffer(pack(masked, spec), dtype=np.uint8)


def _on_validation(
    cfg: Config, models: InitialModels, data: NodeData, student: Any, device: torch.device
) -> Stats:
    """``student`` on this client's validation split (no rows: ``examples`` 0).

    A training client runs it on the global it received before it trains: that gives the
    server the previous round's global on the round's clients at no extra bytes, where a
    federated-evaluation message would carry the model versions to other nodes
    (docs/aggregation.md, "The validation curve")."""
    val = encode_texts(
        models.student_tokenizer, data.val.texts, data.val.labels, cfg.data.max_length
    )
    return evaluate(student, val, device=device, precision=cfg.train.precision)


def evaluate_round(inp: RoundInput, node_config: dict[str, Any]) -> dict[str, float]:
    """Federated evaluation: the received global student on this client's validation split."""
    cfg, labels = inp.cfg, inp.labels
    data = node_data(cfg, labels, node_config)
    models = load_initial(cfg, labels, inp.init_digest)
    student = copy.deepcopy(models.student)
    set_arrays(student, received_arrays(models, cfg, inp.payload, data.cache_root))
    device = pick_device(cfg.train.device)
    stats = _on_validation(cfg, models, data, student, device)
    del student
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {  # keys.EVALUATE_REPLY declares these
        keys.NUM_EXAMPLES: float(stats.examples),
        keys.EVAL_LOSS: stats.loss if stats.examples else 0.0,
        keys.EVAL_ACCURACY: stats.accuracy if stats.examples else 0.0,
    }
