"""What a run will allocate, checked against the device's free memory before any weights
are built; the same plan is what ``--dry-run`` prints.

Weights, KV cache (attention layers only), routing buffer and, for hybrid models, the
recurrent state pool and the prefix cache's state checkpoints are exact sizes of the tensors
the engine allocates.
Activations and the CUDA-graph pool are estimates (a few activation tensors per token of
the step budget); they are small next to the KV cache of any real configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from inference.config import EngineConfig, ModelConfig
from inference.cache.kv_cache import KVCache
from inference.model import MoEGPT
from inference.presets import torch_dtype
from inference.cache.state_pool import state_bytes_per_sequence
from routing_replay import routing_dtype

if TYPE_CHECKING:
    from inference.parallel import ParallelLayout

KV_FLAGS = "--kv-cache-memory or --num-kv-blocks"
_FLAGS = {
    "weights": "--dtype bfloat16 or a smaller --model",
    "KV cache": KV_FLAGS,
    "routing buffer": KV_FLAGS,
    "state pool": "--max-requests",
    "state checkpoints": "--state-checkpoints",
    "activations": "--max-step-tokens or --max-requests",
    "CUDA graphs": "--max-requests, or --no-cuda-graphs",
    "piecewise CUDA graphs": "--piecewise-max-tokens, or --no-piecewise-graphs",
}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per component on ``device`` and the memory available there.

    Invariant: ``total`` is the sum of ``components``; ``available`` is None when it cannot
    be measured, and then the plan always fits.
    """

    device: str
    components: tuple[tuple[str, int, str], ...]      # (name, bytes, how it was sized)
    available: int | None
    available_source: str

    @property
    def total(self) -> int:
        return sum(size for _, size, _ in self.components)

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def problem(self) -> str | None:
        """The error message when the plan does not fit, naming the numbers and the flag."""
        if self.fits:
            return None
        name, size, _ = max(self.components, key=lambda c: c[1])
        parts = " + ".join(f"{n} {fmt_bytes(s)}" for n, s, _ in self.components if s)
        where = "host memory" if self.device.startswith("cpu") else f"{self.device} memory"
        return (f"not enough {where} for this run: {parts} = {fmt_bytes(self.total)}, but only "
                f"{fmt_bytes(self.available)} is available ({self.available_source}). The {name} "
                f"({fmt_bytes(size)}) is the largest part: lower {_FLAGS[name]}")

    def rows(self) -> list[tuple[str, str]]:
        rows = [(name, f"{fmt_bytes(size)}  ({how})") for name, size, how in self.components]
        free = "unknown" if self.available is None else f"{fmt_bytes(self.available)} ({self.available_source})"
        rows.append(("total", f"{fmt_bytes(self.total)} of {free}: " + ("fits" if self.fits else "DOES NOT FIT")))
        return rows


def count_parameters(config: ModelConfig) -> int:
    with torch.device("meta"):
        model = MoEGPT(config)
    return sum(p.numel() for p in model.parameters())


def _activation_bytes_per_token(mc: ModelConfig, elem: int) -> int:
    widest_mlp = max(mc.intermediate_size, mc.topk * mc.moe_intermediate_size, mc.shared_expert_intermediate_size)
    qkv = (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim
    return elem * (8 * mc.hidden_size + 3 * widest_mlp + qkv) + 8 * mc.num_experts


def plan_memory(mc: ModelConfig, config: EngineConfig, device: torch.device, *, local_processes: int = 1,
                layout: "ParallelLayout | None" = None, rank: int = 0) -> MemoryPlan:
    """The memory plan of ``config`` serving model ``mc`` on ``device``: with a
    tensor-parallel ``layout``, global rank ``rank``'s (its weight shards, its KV heads; a
    hybrid model's attention, KV cache and recurrent state are replicated: whole on every rank)."""
    dtype = torch_dtype(config.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    kv_config, shards = mc, ""
    if layout is not None and layout.tp > 1:
        from inference.parallel.attention import local_attention_config
        from inference.parallel.plan import rank_weight_elements
        params = rank_weight_elements(mc, layout, rank)
        kv_config = local_attention_config(mc, layout, layout.coords(rank).tp_rank)
        shards = f" (rank {rank}'s shards, tp={layout.tp} ep={layout.ep})"
    else:
        params = count_parameters(mc)
    kv_block = KVCache.bytes_per_block(kv_config, config.block_size, dtype)
    components = [
        ("weights", params * elem, f"{params:,} parameters x {elem} B{shards}"),
        ("KV cache", kv_block * (config.num_kv_blocks + 1),
         f"{config.num_kv_blocks} blocks (+1 dummy) x {config.block_size} tokens x "
         f"{fmt_bytes(kv_block // config.block_size)}/token{kv_layout(kv_config)} = {config.kv_capacity_tokens:,} tokens"),
    ]
    if config.record_routing:
        route_elem = torch.empty((), dtype=routing_dtype(mc.num_experts)).element_size()
        per_token = mc.num_moe_layers * mc.topk * route_elem
        rows = (config.num_kv_blocks + 1) * config.block_size + config.max_step_tokens
        components.append(("routing buffer", per_token * rows,
                           f"{per_token} B/token, {100.0 * per_token * rows / max(components[1][1], 1):.2f}% of KV"))
    components += _state_components(mc, config, dtype)
    per_token_act = _activation_bytes_per_token(mc, elem)
    logits = min(config.max_requests, config.max_step_tokens) * mc.vocab_size * 4 * 3
    components.append(("activations", config.max_step_tokens * per_token_act + logits,
                       f"estimate for a step of {config.max_step_tokens} tokens"))
    if config.cuda_graphs:
        batch = min(config.max_requests, config.cuda_graph_max_batch, config.max_step_tokens)
        components.append(("CUDA graphs", 2 * (batch * per_token_act + logits),
                           f"estimate for a graph pool up to batch {batch}"))
    piecewise = config.piecewise_graphs if config.piecewise_graphs is not None else (
        config.cuda_graphs and not mc.is_hybrid)
    if piecewise:
        tokens = min(config.piecewise_max_tokens, config.max_step_tokens)
        # the static q and attention-output buffers: a query row is the head, or MLA's
        # absorbed latent + rotary part
        q_row = mc.head_dim if mc.mla is None else mc.mla.kv_lora_rank + mc.mla.qk_rope_head_dim
        q_out = 2 * tokens * mc.num_heads * q_row * elem
        components.append(("piecewise CUDA graphs", 2 * tokens * per_token_act + q_out,
                           f"estimate for graph pools of steps up to {tokens} tokens"))
    available, source = available_memory(device, local_processes)
    return MemoryPlan(str(device), tuple(components), available, source)


def _state_components(mc: ModelConfig, config: EngineConfig, dtype: torch.dtype) -> list[tuple[str, int, str]]:
    """Hybrid models: one state slot per running request (+1 dummy) and the checkpoints."""
    if not mc.is_hybrid:
        return []
    per_seq = state_bytes_per_sequence(mc, dtype)
    layers = f"{len(mc.recurrent_layer_indices)} recurrent layers, {mc.recurrent_state_dtype} states"
    checkpoints = config.num_state_checkpoints
    return [("state pool", per_seq * (config.max_requests + 1),
             f"{config.max_requests} slots (+1 dummy) x {fmt_bytes(per_seq)} ({layers})"),
            ("state checkpoints", per_seq * checkpoints,
             f"{checkpoints} prefix-cache checkpoints x {fmt_bytes(per_seq)}"
             + ("" if config.enable_prefix_caching else " (prefix caching off)"))]


def kv_layout(config: ModelConfig) -> str:
    """What one token's KV is made of, for the plan's KV row."""
    if config.mla is not None:
        return f" (MLA: latent {config.mla.kv_lora_rank} + rotary key {config.mla.qk_rope_head_dim} per layer)"
    layers = ("" if len(config.attention_layer_indices) == config.num_layers
              else f", {len(config.attention_layer_indices)} attention layers of {config.num_layers}")
    return f" (K and V: {config.num_kv_heads} kv heads x {config.head_dim} per layer{layers})"


def available_memory(device: torch.device, local_processes: int = 1) -> tuple[int | None, str]:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA; on CPU MemAvailable
    of /proc/meminfo (else free physical pages), shared by the processes of this host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device} per torch.cuda.mem_get_info"
    share = f", shared by {local_processes} processes" if local_processes > 1 else ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // local_processes, f"MemAvailable in /proc/meminfo{share}"
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None, "unknown on this platform"
    return pages // local_processes, f"free physical memory{share}"


def fmt_bytes(n: float) -> str:
    """``512 B``, ``1.5 KiB`` ... ``977.0 GiB`` (never a larger unit: GiB is what flags take)."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:,.1f} {unit}"
