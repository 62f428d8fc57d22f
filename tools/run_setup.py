"""Setting up a run from command-line arguments: device and ranks, model, engine, prompts."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch

from inference.config import EngineConfig, ModelConfig
from inference.engine import LLMEngine
from inference.kv_cache import KVCache
from inference.model import MoEGPT
from inference.presets import build_model, get_preset, torch_dtype
from inference.request import SamplingParams
from inference.workload import PromptSpec, read_prompts_file, synthetic_prompts

ModelLoader = Callable[[torch.device, torch.dtype, int], MoEGPT]


@dataclass(frozen=True)
class DistributedContext:
    """This process's rank, the world size and its device (data parallel over requests)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def distributed_context(device_flag: str) -> DistributedContext:
    """Initialise torch.distributed when torchrun started several processes (gloo on CPU,
    nccl on CUDA); a single process needs no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag == "auto":
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_flag)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but CUDA is not available (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank, world, device)


def model_source(args: argparse.Namespace) -> tuple[ModelConfig, ModelLoader]:
    """The model's config now and a loader that builds its weights later (not in --dry-run)."""
    if args.hf_checkpoint:
        from inference.hf_loader import load_hf_config, load_hf_model
        config = load_hf_config(args.hf_checkpoint)
        return config, lambda device, dtype, seed: load_hf_model(args.hf_checkpoint, device=device, dtype=dtype)
    config = get_preset(args.model)
    return config, lambda device, dtype, seed: build_model(config, seed=seed, dtype=dtype, device=device)


def build_engine(loader: ModelLoader, config: EngineConfig, device: torch.device) -> LLMEngine:
    model = loader(device, torch_dtype(config.dtype), config.seed)
    return LLMEngine(model, config)


class _CheckpointTokenizer:
    """The --hf-checkpoint tokenizer, loaded on the first ``encode`` and kept: a prompts file
    of token ids never reads it, so checkpoints without tokenizer files still serve those."""

    def __init__(self, checkpoint_dir: str) -> None:
        self.checkpoint_dir = checkpoint_dir
        self._tokenizer = None

    def encode(self, text: str) -> list[int]:
        if self._tokenizer is None:
            self._tokenizer = self._load()
        return self._tokenizer.encode(text)

    def _load(self):
        from inference.hf_loader import HFCheckpointError, load_tokenizer
        try:
            return load_tokenizer(self.checkpoint_dir)
        except HFCheckpointError as exc:
            reason = "; ".join(exc.problems)
        except (ImportError, OSError, ValueError) as exc:  # transformers missing, or files it cannot read
            reason = str(exc)
        raise ValueError(f"text prompts need a tokenizer, but --hf-checkpoint {self.checkpoint_dir} "
                         f"has none that loads: {reason}")


def load_prompts(args: argparse.Namespace, model_config: ModelConfig) -> list[PromptSpec]:
    if args.prompts_file:
        tokenizer = _CheckpointTokenizer(args.hf_checkpoint) if args.hf_checkpoint else None
        return read_prompts_file(args.prompts_file, tokenizer)
    return synthetic_prompts(num_requests=args.num_requests, prompt_len=args.prompt_len,
                             vocab_size=model_config.vocab_size, seed=args.seed,
                             shared_prefix_len=args.shared_prefix_len)


def sampling_params_for(args: argparse.Namespace, spec: PromptSpec, index: int) -> SamplingParams:
    limit = spec.max_new_tokens or args.max_new_tokens or args.output_len
    seed = None if args.temperature == 0 else args.seed * 1_000_003 + index
    return SamplingParams(max_new_tokens=limit, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=seed, ignore_eos=args.ignore_eos)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"--kv-cache-memory: cannot read {text!r}; use a number with B, KB, MB, GB, KiB, MiB or GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _count_parameters(config: ModelConfig) -> int:
    with torch.device("meta"):
        model = MoEGPT(config)
    return sum(p.numel() for p in model.parameters())


def describe_memory_plan(model_config: ModelConfig, config: EngineConfig, num_requests: int) -> str:
    """The --dry-run report: what would be allocated, without allocating it."""
    from routing_replay import routing_dtype
    elem = torch.empty((), dtype=torch_dtype(config.dtype)).element_size()
    params = _count_parameters(model_config)
    kv_block = KVCache.bytes_per_block(model_config, config.block_size, torch_dtype(config.dtype))
    kv_total = kv_block * (config.num_kv_blocks + 1)
    route_elem = torch.empty((), dtype=routing_dtype(model_config.num_experts)).element_size()
    per_token_route = model_config.num_moe_layers * model_config.topk * route_elem
    route_total = per_token_route * ((config.num_kv_blocks + 1) * config.block_size + config.max_step_tokens)
    rows = [
        ("model", f"{model_config.name}: {model_config.num_layers} layers ({model_config.num_moe_layers} MoE, "
                  f"layers {list(model_config.moe_layer_indices)}), {model_config.num_experts} experts top-{model_config.topk}"),
        ("weights", f"{params:,} parameters x {elem} B = {_fmt_bytes(params * elem)}"),
        ("KV cache", f"{config.num_kv_blocks} blocks (+1 dummy) x {config.block_size} tokens x "
                     f"{_fmt_bytes(kv_block // config.block_size)}/token{_kv_layout(model_config)} = "
                     f"{_fmt_bytes(kv_total)} ({config.kv_capacity_tokens:,} tokens)"),
        ("routing buffer", (f"{per_token_route} B/token -> {_fmt_bytes(route_total)} "
                            f"({100.0 * route_total / kv_total:.2f}% of KV)") if config.record_routing else "off (--record-routing not given)"),
        ("engine", f"device={config.device} dtype={config.dtype} max_requests={config.max_requests} "
                   f"max_step_tokens={config.max_step_tokens} prefix_caching={config.enable_prefix_caching} "
                   f"cuda_graphs={config.cuda_graphs} async_scheduling="
                   f"{config.device.startswith('cuda') if config.async_scheduling is None else config.async_scheduling}"),
        ("workload", f"{num_requests} requests"),
    ]
    width = max(len(k) for k, _ in rows)
    return "dry run: configuration is valid; memory plan\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _kv_layout(config: ModelConfig) -> str:
    if config.mla is not None:
        return f" (MLA: latent {config.mla.kv_lora_rank} + rotary key {config.mla.qk_rope_head_dim} per layer)"
    return f" (K and V: {config.num_kv_heads} kv heads x {config.head_dim} per layer)"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
