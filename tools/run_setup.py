"""Setting up a run from command-line arguments: device and ranks, model, engine, prompts."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from inference.config import EngineConfig, ModelConfig
from inference.engine import LLMEngine
from inference.errors import allocating
from inference.model import MoEGPT
from inference.parallel import ParallelGroups, ParallelLayout, ParallelLayoutError
from inference.presets import build_model, get_preset, torch_dtype
from inference.request import GREEDY_TEMPERATURE, SamplingParams
from inference.stop_strings import Detokenizer
from inference.workload import ChatRefused, PromptSpec, read_prompts_file, synthetic_prompts, with_samples
from tools.memory_plan import MemoryPlan

ModelLoader = Callable[..., MoEGPT]   # (device, dtype, seed, parallel=None) -> model (this rank's shards)


@dataclass(frozen=True)
class DistributedContext:
    """This process's rank, the world size and its device. ``layout`` splits the world into
    data-parallel replicas of ``tensor_parallel_size`` consecutive ranks (each replica serves
    its share of the requests; its leader, tp rank 0, writes the replica's outputs);
    ``groups`` are this rank's process groups (None without tensor parallelism).
    Invariant: ``layout`` is None or ``layout.world_size == world_size``."""

    rank: int
    world_size: int
    device: torch.device
    layout: ParallelLayout | None = None
    groups: ParallelGroups | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp_size(self) -> int:
        return self.layout.tp if self.layout is not None else 1

    @property
    def dp_rank(self) -> int:
        """This rank's replica: the share of the requests it serves."""
        return self.rank // self.tp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def is_replica_leader(self) -> bool:
        return self.rank % self.tp_size == 0

    def with_layout(self, layout: ParallelLayout) -> "DistributedContext":
        return dataclasses.replace(self, layout=layout)

    def with_groups(self) -> "DistributedContext":
        """Create the layout's process groups (collective: every rank calls it)."""
        if self.layout is None or self.layout.tp == 1:
            return self
        return dataclasses.replace(self, groups=ParallelGroups.build(self.layout))

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


_DEVICE_RE = re.compile(r"(cpu|cuda)(?::(\d+))?")


def parse_device(flag: str) -> torch.device:
    """--device: auto, cpu, cuda or cuda:N; ValueError naming the flag otherwise."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = _DEVICE_RE.fullmatch(flag)
    if match is None:
        raise ValueError(f"--device {flag!r} is not a device this engine runs on; use cpu, cuda, cuda:N or auto")
    if match.group(1) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {flag}, but CUDA is not available (use --device cpu)")
    if match.group(2) is not None and int(match.group(2)) >= torch.cuda.device_count():
        raise ValueError(f"--device {flag}: this machine has {torch.cuda.device_count()} CUDA devices "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return torch.device(flag)


def distributed_context(device_flag: str) -> DistributedContext:
    """Initialise torch.distributed when torchrun started several processes (gloo on CPU,
    nccl on CUDA); a single process needs no process group. A bad --device raises
    ValueError before any process group exists."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1"))
    rank = torch.distributed.get_rank() if initialized else int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = parse_device(device_flag)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world > 1 and not initialized:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank, world, device)


def parallel_layout(world_size: int, tp: int, ep: int, config: ModelConfig, *, dry_run: bool = False) -> ParallelLayout:
    """The layout of ``world_size`` ranks for ``config``; ValueError listing every problem
    (world not divisible, T not dividing the heads, E not dividing the experts ...) before
    anything is allocated. A single-process ``--dry-run`` plans one replica of ``tp`` ranks
    (to see a layout's per-rank memory before launching it)."""
    planned = tp if dry_run and world_size == 1 and isinstance(tp, int) and tp > 1 else world_size
    problems: list[str] = []
    layout = None
    try:
        layout = ParallelLayout(planned, tp, ep)
    except ParallelLayoutError as exc:
        problems += exc.problems
    try:      # the model's own constraints (nothing is split at tp = 1), reported with the world's
        if tp != 1 or ep != 1:
            problems += [p for p in ParallelLayout(tp, tp, ep).model_problems(config) if p not in problems]
    except ParallelLayoutError:
        pass  # tp / ep themselves are invalid: already reported
    if problems:
        raise ValueError(f"invalid parallel layout (world size {world_size}, --tensor-parallel-size {tp}, "
                         f"--expert-parallel-size {ep}) for model {config.name!r}:\n  " + "\n  ".join(problems))
    return layout


def model_source(args: argparse.Namespace) -> tuple[ModelConfig, ModelLoader]:
    """The model's config now and a loader that builds its weights later (not in --dry-run)."""
    if args.hf_checkpoint:
        from inference.hf_loader import check_hf_checkpoint, load_hf_model
        config = check_hf_checkpoint(args.hf_checkpoint)[0]   # every header read: a bad file fails now
        return config, lambda device, dtype, seed, parallel=None: load_hf_model(args.hf_checkpoint, device=device,
                                                                           dtype=dtype, parallel=parallel)
    config = get_preset(args.model)
    return config, lambda device, dtype, seed, parallel=None: build_model(config, seed=seed, dtype=dtype, device=device,
                                                                     parallel=parallel)


def build_engine(loader: ModelLoader, config: EngineConfig, device: torch.device,
                 parallel: ParallelGroups | None = None, detokenizer: Detokenizer | None = None) -> LLMEngine:
    """Weights (this rank's shards with ``parallel``), then the engine (``detokenizer``: for
    stop strings); an allocation failure is an AllocationError naming the part."""
    with allocating("weights", "use --dtype bfloat16, a smaller model or a larger --tensor-parallel-size"):
        model = loader(device, torch_dtype(config.dtype), config.seed, parallel)
    return LLMEngine(model, config, detokenizer=detokenizer)


class CheckpointTokenizer:
    """The --hf-checkpoint tokenizer, loaded on first use and kept: a prompts file of token
    ids never reads it (unless --output-text asks for text), so checkpoints without tokenizer
    files still serve those. ``encode`` / ``encode_chat`` (the chat template, the assistant's
    turn opened) / ``decode`` and ``batch_decode`` (special tokens left out)."""

    def __init__(self, checkpoint_dir: str) -> None:
        self.checkpoint_dir = checkpoint_dir
        self._tokenizer = None

    def encode(self, text: str) -> list[int]:
        return self.load("text prompts").encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        tokenizer = self.load("chat prompts")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"chat prompts need a chat template, but the tokenizer of --hf-checkpoint "
                             f"{self.checkpoint_dir} has none (tokenizer_config.json's chat_template)")
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # noqa: BLE001 - jinja errors of the template itself (raise_exception, bad keys)
            raise ChatRefused(f"the chat template of --hf-checkpoint {self.checkpoint_dir} refused the chat: "
                              f"{type(exc).__name__}: {exc}") from None
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)   # transformers 5: a BatchEncoding

    def decode(self, ids: list[int]) -> str:
        return self.load("--output-text").decode(ids, skip_special_tokens=True)

    def batch_decode(self, batch: list[list[int]]) -> list[str]:
        """The engine's detokenizer for stop strings: one call per step."""
        return self.load("stop strings").batch_decode(batch, skip_special_tokens=True)

    def load(self, purpose: str):
        """The tokenizer; ValueError naming ``purpose`` and the directory when none loads."""
        if self._tokenizer is None:
            self._tokenizer = self._load(purpose)
        return self._tokenizer

    def _load(self, purpose: str):
        from inference.hf_loader import HFCheckpointError, load_tokenizer
        try:
            return load_tokenizer(self.checkpoint_dir)
        except HFCheckpointError as exc:
            reason = "; ".join(exc.problems)
        except (ImportError, OSError, ValueError) as exc:  # transformers missing, or files it cannot read
            reason = str(exc)
        verb = "needs" if purpose.startswith("--") else "need"
        raise ValueError(f"{purpose} {verb} a tokenizer, but --hf-checkpoint {self.checkpoint_dir} "
                         f"has none that loads: {reason}")


def checkpoint_tokenizer(args: argparse.Namespace) -> CheckpointTokenizer | None:
    return CheckpointTokenizer(args.hf_checkpoint) if args.hf_checkpoint else None


def load_prompts(args: argparse.Namespace, model_config: ModelConfig,
                 tokenizer: CheckpointTokenizer | None = None) -> list[PromptSpec]:
    """The run's requests: the prompts file's or the synthetic prompts, each prompt
    ``--samples-per-prompt`` times (``inference.workload.with_samples``)."""
    if args.prompts_file:
        prompts = read_prompts_file(args.prompts_file, tokenizer)
    else:
        prompts = synthetic_prompts(num_requests=args.num_requests, prompt_len=args.prompt_len,
                                    vocab_size=model_config.vocab_size, seed=args.seed,
                                    shared_prefix_len=args.shared_prefix_len)
    return with_samples(prompts, args.samples_per_prompt)


def output_text_decoder(args: argparse.Namespace, specs: list[PromptSpec],
                        tokenizer: CheckpointTokenizer | None) -> Callable[[list[int]], str] | None:
    """How results get their ``output_text``: --output-text (default: when some prompt was
    text or a chat) decodes the generated tokens with the checkpoint's tokenizer. Raises
    ValueError now, not mid-run, when the asked-for text has no tokenizer."""
    wanted = any(s.from_text for s in specs) if args.output_text is None else args.output_text
    if not wanted:
        return None
    if tokenizer is None:
        raise ValueError("--output-text needs --hf-checkpoint with a tokenizer")
    tokenizer.load("--output-text")
    return tokenizer.decode


def stop_string_detokenizer(args: argparse.Namespace, specs: list[PromptSpec],
                            tokenizer: CheckpointTokenizer | None) -> Callable[[list[list[int]]], list[str]] | None:
    """The engine's detokenizer when some request has stop strings (--stop or a prompts
    file's "stop"); ValueError now, not mid-run, when there is no tokenizer to decode with."""
    if not args.stop and not any(s.stop for s in specs):
        return None
    if tokenizer is None:
        raise ValueError("stop strings (--stop or a prompts file's \"stop\") need --hf-checkpoint with a tokenizer")
    tokenizer.load("stop strings")
    return tokenizer.batch_decode


def output_limit(args: argparse.Namespace, spec: PromptSpec) -> int:
    """max_new_tokens of one request: its own, else --max-new-tokens, else --output-len."""
    return spec.max_new_tokens or args.max_new_tokens or args.output_len


def sampling_params_for(args: argparse.Namespace, spec: PromptSpec, index: int) -> SamplingParams:
    """Sampling of the request at ``index`` of the whole workload (its seed depends on the
    index, never on which rank or attempt serves it: resumed runs sample the same tokens)."""
    seed = None if args.temperature == 0 else args.seed * 1_000_003 + index
    return SamplingParams(max_new_tokens=output_limit(args, spec), temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=seed, ignore_eos=args.ignore_eos,
                          stop_token_ids=tuple(args.stop_token_ids), logprobs=args.logprobs,
                          stop=spec.stop if spec.stop is not None else tuple(args.stop),
                          include_stop_str_in_output=args.include_stop_str_in_output,
                          prompt_logprobs=args.prompt_logprobs, logprobs_mode=args.logprobs_mode)


def degenerate_config_warnings(model_config: ModelConfig, config: EngineConfig, specs: list[PromptSpec],
                               limits: list[int]) -> list[str]:
    """Legal configurations that will not do what was probably meant: a KV cache that
    cannot hold the longest request (so max_model_len is the KV capacity)."""
    capacity = config.kv_capacity_tokens
    max_model_len = min(model_config.max_position_embeddings, capacity)
    needs = [(min(len(s.prompt_token_ids) + limit, model_config.max_position_embeddings), s.request_id)
             for s, limit in zip(specs, limits)]
    if not needs:
        return []
    need, request_id = max(needs)
    if capacity >= need:
        return []
    too_long = sum(len(s.prompt_token_ids) > capacity for s in specs)
    fails = f"; {too_long} prompts are longer than that and will fail" if too_long else ""
    return [f"the KV cache holds {capacity} tokens (--num-kv-blocks {config.num_kv_blocks} x --block-size "
            f"{config.block_size}), fewer than request {request_id!r} needs ({need} = prompt + max_new_tokens): "
            f"max_model_len is {max_model_len}, so requests stop at {max_model_len} tokens with finish_reason "
            f"\"length\"{fails}. Raise --num-kv-blocks or --kv-cache-memory"]


def sample_group_warnings(args: argparse.Namespace, model_config: ModelConfig) -> list[str]:
    """RL groups that will not do what was probably meant (compute their prompt once)."""
    n = args.samples_per_prompt
    if n == 1:
        return []
    warnings = []
    if args.temperature < GREEDY_TEMPERATURE:
        warnings.append(f"--samples-per-prompt {n} with greedy decoding (--temperature {args.temperature}) gives "
                        f"{n} identical samples of each prompt; set --temperature")
    if args.prompt_logprobs:
        warnings.append("--prompt-logprobs requests take no prefix-cache hits, so each of the "
                        f"{n} samples of a prompt computes the whole prompt")
    elif not args.enable_prefix_caching:
        warnings.append(f"without prefix caching each of the {n} samples of a prompt computes the whole prompt")
    elif model_config.is_hybrid:
        # docs/ARCHITECTURE.md: hybrids hash a block when its chunk lands, not when it is scheduled
        warnings.append(f"{model_config.name} is a hybrid model: a prefix hit needs the recurrent-state checkpoint "
                        f"of a computed chunk, so the {n} samples of a prompt admitted in the same step each compute "
                        f"the prompt (only samples admitted later hit it)")
    return warnings


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"--kv-cache-memory: cannot read {text!r}; use a number with B, KB, MB, GB, KiB, MiB or GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _hybrid_row(model_config: ModelConfig, config: EngineConfig) -> str:
    from inference.cache.hybrid_cache import auto_checkpoint_interval
    from inference.cache.kv_cache import KVCache
    from inference.cache.state_pool import state_bytes_per_sequence
    dtype = torch_dtype(config.dtype)
    interval = config.checkpoint_interval_blocks or auto_checkpoint_interval(
        state_bytes_per_sequence(model_config, dtype), KVCache.bytes_per_block(model_config, config.block_size, dtype))
    how = "" if config.checkpoint_interval_blocks else " (auto)"
    return (f"recurrent layers {list(model_config.recurrent_layer_indices)}, attention layers "
            f"{list(model_config.attention_layer_indices)}; {config.num_state_checkpoints} state checkpoints, at each "
            f"prompt's last full block and every {interval} blocks{how}")


def describe_memory_plan(model_config: ModelConfig, config: EngineConfig, plan: MemoryPlan, num_requests: int,
                         output_verdict: str | None = None, layout: ParallelLayout | None = None) -> str:
    """The --dry-run report: what would be allocated (without allocating it) and whether it
    fits, plus the --output-dir verdict; with tensor parallelism the plan is this rank's,
    followed by every rank's (``inference.parallel.plan``)."""
    rows = [("model", f"{model_config.name}: {model_config.num_layers} layers ({model_config.num_moe_layers} MoE, "
                      f"layers {list(model_config.moe_layer_indices)}), {model_config.num_experts} experts "
                      f"top-{model_config.topk}")]
    rows += plan.rows()
    if not config.record_routing:
        rows.insert(len(rows) - 1, ("routing buffer", "off (--record-routing not given)"))
    async_scheduling = config.device.startswith("cuda") if config.async_scheduling is None else config.async_scheduling
    rows += [("engine", f"device={config.device} dtype={config.dtype} max_requests={config.max_requests} "
                        f"max_step_tokens={config.max_step_tokens} prefix_caching={config.enable_prefix_caching} "
                        f"cuda_graphs={config.cuda_graphs} async_scheduling={async_scheduling}"),
             ("workload", f"{num_requests} requests")]
    if model_config.is_hybrid:
        rows.insert(len(rows) - 1, ("hybrid", _hybrid_row(model_config, config)))
    if layout is not None and layout.tp > 1:
        from inference.parallel.layout import replicates_blocks
        hybrid = ("; only the MoE layers split, attention, recurrent layers, dense MLPs and their state "
                  "replicated on every rank" if replicates_blocks(model_config) else "")
        rows.append(("parallel", f"world {layout.world_size} = {layout.dp} data-parallel replica(s) x tensor-parallel "
                                 f"{layout.tp}; experts over expert-parallel {layout.ep} (expert-TP {layout.etp})"
                                 + hybrid))
    if output_verdict:
        rows.append(("output dir", output_verdict))
    width = max(len(k) for k, _ in rows)
    text = "memory plan" + (" (rank 0)" if layout is not None and layout.tp > 1 else "") + "\n"
    text += "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
    if layout is not None and layout.tp > 1:
        from inference.parallel.plan import describe_rank_plans, memory_plan
        lines = describe_rank_plans(memory_plan(model_config, config, layout)).splitlines()
        text += ("\nper-rank plan (weights, KV cache, routing buffer, recurrent state)\n"
                 + "\n".join(f"  {line}" for line in lines))
    return text
