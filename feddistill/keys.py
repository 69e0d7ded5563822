"""Record keys shared by the ServerApp, the ClientApp and the strategy wrapper (one place only)."""

ARRAYS = "arrays"  # ArrayRecord key, as Flower's strategies use by default
CONFIG = "config"  # ConfigRecord key
METRICS = "metrics"  # MetricRecord key of replies
PAYLOAD = "payload"  # the single uint8 Array inside a compressed ArrayRecord

# ConfigRecord entries sent by the server
RUN_CONFIG = "feddistill.config"  # the flat run config, JSON
LABELS = "feddistill.labels"  # the run's label names, JSON list
INIT_DIGEST = "feddistill.init-digest"  # hash of the initial exchanged student weights
SERVER_ROUND = "server-round"  # set by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # set by FedProx
CLIP_NORM = "feddistill.clip-norm"  # privacy: this round's clipping norm (adaptive clipping)

# MetricRecord entries returned by clients
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
TEACHER_VAL_ACCURACY = "teacher-val-accuracy"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
CLIENT_SECONDS = "client-seconds"
NORM_BIT = "norm-bit"  # privacy: 1.0 if the client's update was clipped this round, else 0.0
