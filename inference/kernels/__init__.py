"""Fast attention and MoE kernels, each with a plain-torch reference that runs anywhere.

The un-suffixed entry points dispatch by device and dtype: Triton / ``torch._grouped_mm``
on CUDA where they apply, the sync-free torch paths elsewhere. All of them are free of
host syncs and safe to capture in CUDA graphs (``prefill_attention`` is not meant to be
captured, but does not sync either).
"""

from inference.kernels.moe_grouped import (
    grouped_mm_supported,
    moe_experts_dense,
    moe_experts_gathered,
    moe_experts_grouped,
    moe_experts_grouped_mm,
    moe_experts_reference,
)
from inference.kernels.mla_decode_triton import (
    mla_decode_attention,
    mla_decode_attention_reference,
    mla_decode_attention_triton,
)
from inference.kernels.paged_decode_triton import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
    triton_available,
)
from inference.kernels.prefill_attention import (
    prefill_attention,
    prefill_attention_reference,
    prefill_attention_triton,
)

__all__ = [
    "grouped_mm_supported",
    "mla_decode_attention",
    "mla_decode_attention_reference",
    "mla_decode_attention_triton",
    "moe_experts_dense",
    "moe_experts_gathered",
    "moe_experts_grouped",
    "moe_experts_grouped_mm",
    "moe_experts_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_decode_attention_triton",
    "prefill_attention",
    "prefill_attention_reference",
    "prefill_attention_triton",
    "triton_available",
]
