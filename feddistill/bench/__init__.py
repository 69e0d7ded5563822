"""``feddistill bench``: accuracy against bytes for centralized, local-only and federated runs."""

from feddistill.bench.run import run_bench
from feddistill.bench.spec import ALL_SCENARIOS, BenchSetting
from feddistill.bench.wirecost import DenseCost, dense_exchange_bytes

__all__ = ["ALL_SCENARIOS", "BenchSetting", "DenseCost", "dense_exchange_bytes", "run_bench"]
