"""Full-sequence attention without a KV cache: the math the paged paths are checked against.

Written out as matmul, mask and softmax (transformers' eager attention), sharing no code
with ``inference.paged_attention`` or the kernels.
"""

from __future__ import annotations

import torch


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int = 0,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a whole sequence. q: [S, heads, dk]; k: [S, kv_heads, dk];
    v: [S, kv_heads, dv]. ``window`` > 0: position p sees p - window + 1 .. p.
    ``sinks`` [heads]: a logit per head joining the softmax and then dropped."""
    seq, heads, _ = q.shape
    group = heads // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)       # [heads, S, dk]
    v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.float().transpose(0, 1) @ k.transpose(1, 2) * scale       # [heads, S, S]
    pos = torch.arange(seq, device=q.device)
    allowed = pos[None, :] <= pos[:, None]
    if window > 0:
        allowed &= pos[None, :] > pos[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink_col = sinks.float().reshape(heads, 1, 1).expand(heads, seq, 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v).transpose(0, 1).to(q.dtype)                       # [S, heads, dv]
