"""Flower strategies over compressed updates."""

from feddistill.strategies.compressed import CompressedStrategy, RoundTraffic
from feddistill.strategies.factory import build_strategy, inner_strategy

__all__ = ["CompressedStrategy", "RoundTraffic", "build_strategy", "inner_strategy"]
