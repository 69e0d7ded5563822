"""The CUDA path of a client round: bf16 autocast on the GPU, nothing kept there afterwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from feddistill.client.work import RoundInput, evaluate_round, load_initial, train_round
from feddistill.codec.chain import initial_downlink
from feddistill.run_inputs import source_splits
from feddistill.server.run import resolve_paths
from tests.conftest import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_client_round_on_cuda_in_bf16_leaves_no_gpu_memory_behind(tmp_path: Path) -> None:
    # Prepare
    cfg = resolve_paths(
        tiny_config(
            tmp_path,
            **{
                "train.device": "cuda",
                "train.precision": "bf16",
                "compression.uplink": "topk:0.1+q8+ef",
            },
        )
    )
    _, _, labels = source_splits(cfg)
    models = load_initial(cfg, labels, "")
    payload = initial_downlink(
        models.init_arrays, cfg.compression.downlink_spec, chained=cfg.compression.chained
    )
    torch.cuda.reset_peak_memory_stats()

    # Execute: two clients in a row, as one worker serves them
    inp = RoundInput(cfg, labels, models.digest, payload, 1, run_id="a1")
    _, first = train_round(inp, {"partition-id": 0})
    after_first = torch.cuda.memory_allocated()
    _, second = train_round(inp, {"partition-id": 1})
    evaluation = evaluate_round(inp, {"partition-id": 1})

    # Assert: it ran on the GPU, learned something finite, and kept nothing there
    assert torch.cuda.max_memory_allocated() > 0
    for metrics in (first, second):
        assert np.isfinite(metrics["train-loss"]) and metrics["teacher-fitted"] == 1.0
    assert 0.0 <= evaluation["eval-accuracy"] <= 1.0
    assert torch.cuda.memory_allocated() <= after_first  # no growth from client to client
    for model in (models.student, models.teacher):  # the cached initial models stay on CPU
        assert all(p.device.type == "cpu" for p in model.parameters())
