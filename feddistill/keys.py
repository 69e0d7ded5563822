"""Record keys shared by the ServerApp, the ClientApp and the strategy wrapper (one place only).

Also what each kind of reply may carry (`TRAIN_REPLY`, `EVALUATE_REPLY`): the client app builds
its replies from these schemas and the server's admission control
(:mod:`feddistill.strategies.admission`) checks every reply against the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

ARRAYS = "arrays"  # ArrayRecord key, as Flower's strategies use by default
CONFIG = "config"  # ConfigRecord key
METRICS = "metrics"  # MetricRecord key of replies
PAYLOAD = "payload"  # the single uint8 Array inside a compressed ArrayRecord

# ConfigRecord entries sent by the server
RUN_CONFIG = "feddistill.config"  # the flat run config, JSON
LABELS = "feddistill.labels"  # the run's label names, JSON list
INIT_DIGEST = "feddistill.init-digest"  # hash of the initial exchanged student weights
RUN_ID = "feddistill.run-id"  # 8 random bytes naming the run: new for a fresh run, kept on resume
SERVER_ROUND = "server-round"  # set by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # set by FedProx
CLIP_NORM = "feddistill.clip-norm"  # privacy: this round's clipping norm (adaptive clipping)
LOCAL_EPOCHS = "feddistill.local-epochs"  # this round's local epochs (train.rising-epochs)
# secure aggregation: the ConfigRecord of a protocol step (feddistill.strategies.secure)
SECAGG = "feddistill.secagg"

# Node config entries (a SuperNode's --node-config; Flower sets partition-id in simulation)
PARTITION_ID = "partition-id"  # a simulated node's partition of data.source
DATA_PATH = "data-path"  # a device's own data file
NODE_CACHE_DIR = "cache-dir"  # a device's folder for its state (teachers, residuals)

# MetricRecord entries returned by clients
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
TEACHER_VAL_ACCURACY = "teacher-val-accuracy"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
CLIENT_SECONDS = "client-seconds"
TEACHER_FITTED = "teacher-fitted"  # 1.0 when the client fine-tuned its teacher this round
STATE_BYTES = "state-bytes"  # node-local client state on disk after the round
NORM_BIT = "norm-bit"  # privacy: 1.0 if the client's update was clipped this round, else 0.0
# The global a training client received, on its validation split before it trains: the
# validation curve of the previous round's global at no extra bytes (docs/aggregation.md)
ARRIVAL_LOSS = "arrival-loss"
ARRIVAL_ACCURACY = "arrival-accuracy"
ARRIVAL_EXAMPLES = "arrival-examples"  # validation rows; 0: the client has none
ARRIVAL_KEYS = (ARRIVAL_EXAMPLES, ARRIVAL_LOSS, ARRIVAL_ACCURACY)


@dataclass(frozen=True)
class ReplySchema:
    """The records and metric keys one kind of reply carries, and nothing else.

    ``payload``: the reply has the ArrayRecord ``ARRAYS`` holding the single uint8 ``PAYLOAD``
    array (train replies) or no ArrayRecord at all (evaluate replies). Metrics live in the one
    MetricRecord ``METRICS``: every ``required`` key must be there; ``optional`` keys may be
    left out (an older client); anything else is unknown and dropped by the server.
    """

    payload: bool
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return self.required + self.optional


# num-examples is what Flower's strategies weight by: a reply without it cannot be aggregated.
TRAIN_REPLY = ReplySchema(
    payload=True,
    required=(NUM_EXAMPLES,),
    optional=(
        TRAIN_LOSS,
        TRAIN_ACCURACY,
        TEACHER_FITTED,
        CLIENT_SECONDS,
        STATE_BYTES,
        NORM_BIT,
        *ARRIVAL_KEYS,
    ),
)
# An evaluation reply exists to report these three.
EVALUATE_REPLY = ReplySchema(payload=False, required=(NUM_EXAMPLES, EVAL_LOSS, EVAL_ACCURACY))
