"""The engine's ``fused_small_ops`` knob: whether the fused router, q/k norm + rotary and
residual add + RMSNorm kernels (``router_topk``, ``norm_rotary``) replace their torch ops.

- "auto": on for a CUDA device with Triton, off elsewhere (the CPU path never changes);
- "on": the same, but a device that cannot run them is an error (a benchmark that asks
  for the kernels must not silently measure torch);
- "off": the torch ops everywhere (the before/after baseline).

Where a kernel does not apply to a layer (group-limited routing, zero-centred norms, ...)
that layer keeps torch in "auto" and "on" alike; ``MoEGPT.set_fused_small_ops`` reports
how many modules took each kernel.
"""

from __future__ import annotations

import torch

from inference.config import FUSED_SMALL_OPS_MODES


def fused_small_ops_enabled(mode: str, device: torch.device | str) -> bool:
    """Resolve ``mode`` for a model on ``device``."""
    if mode not in FUSED_SMALL_OPS_MODES:
        raise ValueError(f"fused_small_ops must be one of {FUSED_SMALL_OPS_MODES}, got {mode!r}")
    if mode == "off":
        return False
    from inference.kernels.router_topk import triton
    runnable = torch.device(device).type == "cuda" and triton is not None
    if mode == "on" and not runnable:
        raise ValueError(f"fused_small_ops='on' needs a CUDA device with Triton installed (device {device}); "
                         "use 'auto' or 'off'")
    return runnable
