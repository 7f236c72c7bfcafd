"""KV-head reduction of MEA models: `reduce_kv_heads` (svd / calib, in `reduce.py`) and per-layer sensitivity for
choosing which layers to compress (`sensitivity.py`, on `each_layer_compressed_alone`)."""

from .reduce import (
    CALIB_BLOCKS,
    CALIB_LR,
    CALIB_Q_SCALE_HARSH,
    CALIB_Q_SCALE_MILD,
    CALIB_QUERY_STRIDE,
    CALIB_STEP_BLOCKS,
    CALIB_STEPS,
    METHODS,
    calib_blocks_for,
    calib_q_scale_for,
    each_layer_compressed_alone,
    parse_layers,
    reduce_kv_heads,
)
from .sensitivity import layer_sensitivity, read_report, suggest_layers

__all__ = [
    "CALIB_BLOCKS",
    "CALIB_LR",
    "CALIB_QUERY_STRIDE",
    "CALIB_Q_SCALE_HARSH",
    "CALIB_Q_SCALE_MILD",
    "CALIB_STEPS",
    "CALIB_STEP_BLOCKS",
    "METHODS",
    "calib_blocks_for",
    "calib_q_scale_for",
    "each_layer_compressed_alone",
    "layer_sensitivity",
    "parse_layers",
    "read_report",
    "reduce_kv_heads",
    "suggest_layers",
]
