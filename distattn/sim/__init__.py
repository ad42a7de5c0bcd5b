"""Cluster projections: every scheme on 8-1024 GPUs from the traffic formulas the code uses.

- `cluster`: devices (FLOP/s, memory, call-length efficiency) and alpha-beta links, presets, calibration
  from a measured benchmark;
- `model`: one attention layer (forward + backward) per scheme, its traffic from the scheme object's
  `comm_bytes` and its compute from exact causal pair counts of the scheme's layout;
- `training`: a whole training step of a model (dense layers, attention, gradient all-reduce) and the
  largest context that fits device memory;
- `validate`: comparison with published relative results;
- `cli`: `distattn simulate`.
"""
from distattn.sim.cluster import PRESETS, Cluster, Device, Link, calibrate, get_cluster
from distattn.sim.model import AttnWorkload, LayerTime, layer_time, single_device_time
from distattn.sim.training import MODELS, ModelSpec, StepTime, max_context, step_time

__all__ = ["PRESETS", "Cluster", "Device", "Link", "calibrate", "get_cluster", "AttnWorkload", "LayerTime",
           "layer_time", "single_device_time", "MODELS", "ModelSpec", "StepTime", "max_context", "step_time"]
