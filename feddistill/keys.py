"""Record keys shared by the ServerApp, the ClientApp and the strategy wrapper (one place only)."""

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

# MetricRecord entries returned by clients
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
TEACHER_VAL_ACCURACY = "teacher-val-accuracy"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
CLIENT_SECONDS = "client-seconds"
