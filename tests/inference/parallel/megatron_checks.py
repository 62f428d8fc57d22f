"""Rank side of the sharded megatron-core export test: each gloo rank initialises megatron's
parallel state for a layout, exports its TP/EP shard of the tiny model with sequence
parallelism, runs a padded batch freely and with replay of its ``sequence_parallel_slice``
of given targets, and returns the logits and the routing its routers chose."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from inference.megatron_export import causal_mask, cpu_megatron_runtime, export_to_megatron
from inference.parallel import ParallelLayout
from inference.presets import build_model, get_preset
from routing_replay.replay_targets import sequence_parallel_slice

MODEL_SEED = 3


def _routing_maps(model) -> tuple[list[torch.Tensor], list]:
    """Each megatron router's routing_map [local tokens, experts], in call order."""
    from megatron.core.transformer.moe.router import TopKRouter
    maps: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: maps.append(out[1].detach().clone()))
             for m in model.modules() if isinstance(m, TopKRouter)]
    return maps, hooks


def _ids(routing_map: torch.Tensor, topk: int) -> np.ndarray:
    """The chosen experts of each row, sorted (a routing map is a set per token)."""
    return np.sort(routing_map.nonzero()[:, 1].view(-1, topk).numpy(), axis=-1)


def run_megatron_cases(rank: int, world_size: int, layouts: list[tuple[int, int]], tokens: np.ndarray,
                       forced: np.ndarray) -> dict[str, np.ndarray]:
    warnings.filterwarnings("ignore")
    from routing_replay.megatron import release_model, replay_routing
    config = get_preset("tiny-moe")
    model = build_model(config, seed=MODEL_SEED)
    batch, seq_len = tokens.shape
    args = (torch.as_tensor(tokens), torch.arange(seq_len).expand(batch, -1), causal_mask(batch, seq_len))
    out: dict[str, np.ndarray] = {}
    for tp, ep in layouts:
        layout = ParallelLayout(world_size, tp, ep)
        tp_rank = layout.coords(rank).tp_rank
        with cpu_megatron_runtime(layout):
            gpt = export_to_megatron(model, layout=layout, sequence_parallel=True, parallel_output=False).eval()
            maps, hooks = _routing_maps(gpt)
            with torch.no_grad():
                logits = gpt(*args)
                free = list(maps)
                maps.clear()
                with replay_routing(gpt, sequence_parallel_slice(forced, tp_rank, tp)):
                    gpt(*args)
            for h in hooks:
                h.remove()
            release_model(gpt)
        key = f"tp{tp}-ep{ep}"
        out[f"{key}/logits"] = logits[..., :config.vocab_size].numpy()
        out[f"{key}/free"] = np.stack([_ids(m, config.topk) for m in free])
        out[f"{key}/forced"] = np.stack([_ids(m, config.topk) for m in maps])
        out[f"{key}/tp_rank"] = np.array(tp_rank)
    return out
