"""Which implementation of a recurrence a layer runs: torch forms on CPU, kernels on CUDA.

- ``"chunked"`` / ``"recurrent"``: the plain-torch forms (any device; tests pick them).
- ``"auto"``: on CUDA, decode-only steps use our slot-indexed Triton step kernels
  (``inference.kernels.recurrent_decode``: state updated in place, CUDA-graph capturable)
  and other steps use flash-linear-attention's chunked kernels when ``fla`` is importable
  (``inference.kernels.recurrent_fla``) for bf16 / fp16 inputs; otherwise, and always on
  CPU, the chunked torch form. fp32 stays on the torch form because fla's chunked kernels
  multiply in tf32 (measured on the H200: 1% off an fp32 reference), and fp32 runs exist
  to be exact. The CPU path never imports ``fla``.
"""

from __future__ import annotations

import torch

from inference.kernels import recurrent_decode, recurrent_fla
from inference.model.recurrent.delta_rule import gated_delta_rule_varlen
from inference.model.recurrent.metadata import RecurrentMetadata
from inference.model.recurrent.ssd import ssd_varlen

AUTO = "auto"
CHUNKED = "chunked"
RECURRENT = "recurrent"
MODES = (AUTO, CHUNKED, RECURRENT)
_FLA_DTYPES = (torch.bfloat16, torch.float16)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"recurrent mode must be one of {MODES}, got {mode!r}")


def run_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         beta: torch.Tensor, states: torch.Tensor, meta: RecurrentMetadata,
                         mode: str, chunk_size: int) -> torch.Tensor:
    """The gated delta rule over a packed step (see ``delta_rule.gated_delta_rule_varlen``)."""
    _check_mode(mode)
    if mode == AUTO and q.is_cuda:
        if meta.decode_only and recurrent_decode.triton_available():
            n = meta.num_sequences
            return recurrent_decode.gated_delta_rule_step_triton(
                q[:n], k[:n], v[:n], g[:n], beta[:n], states, meta.state_slots, meta.has_initial_state)
        if q.dtype in _FLA_DTYPES and recurrent_fla.fla_available():
            return recurrent_fla.gated_delta_rule_varlen_fla(q, k, v, g, beta, states, meta)
    return gated_delta_rule_varlen(q, k, v, g, beta, states, meta,
                                   mode=CHUNKED if mode == AUTO else mode, chunk_size=chunk_size)


def run_ssd(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
            d: torch.Tensor | None, states: torch.Tensor, meta: RecurrentMetadata,
            mode: str, chunk_size: int) -> torch.Tensor:
    """Mamba2's SSD over a packed step (see ``ssd.ssd_varlen``)."""
    _check_mode(mode)
    if mode == AUTO and x.is_cuda:
        if meta.decode_only and recurrent_decode.triton_available():
            n = meta.num_sequences
            return recurrent_decode.ssd_step_triton(
                x[:n], dt[:n], a, b[:n], c[:n], d, states, meta.state_slots, meta.has_initial_state)
        if x.dtype in _FLA_DTYPES and recurrent_fla.fla_available():
            return recurrent_fla.ssd_varlen_fla(x, dt, a, b, c, d, states, meta)
    return ssd_varlen(x, dt, a, b, c, d, states, meta, mode=CHUNKED if mode == AUTO else mode,
                      chunk_size=chunk_size)
