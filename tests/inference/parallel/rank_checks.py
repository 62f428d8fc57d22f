"""What each gloo rank runs in the multi-rank tests, and the inputs both sides share.

A ``Case`` is a model config and a layout. Every rank of the world builds its shards of
``TPMoEGPT`` for each case, loads them from the case's safetensors file (the single-process
model's state dict, saved by the test), runs the checks and returns the outputs by name. The
test computes the same quantities with the unsharded model and compares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inference.config import ModelConfig, RouterConfig
from inference.model.context import AttentionMetadata, ForwardContext
from inference.paged_attention import paged_attention_eager
from inference.parallel import ParallelGroups, ParallelLayout, SafetensorsCheckpoint, load_shards
from inference.presets import get_preset
from tests.inference.parallel.tp_model import TPMoEGPT

# Shared expert with a gate, whole-projection q/k norm (OLMoE), qkv bias, tied embeddings,
# a vocabulary no TP size divides, sigmoid routing with expert bias and groups (DeepSeek).
RICH = ModelConfig(
    name="tp-rich", vocab_size=509, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=128, moe_intermediate_size=32, num_experts=16, topk=4, dense_layers=(0,),
    shared_expert_intermediate_size=64, shared_expert_gate=True, qk_norm="full", attention_bias=True,
    tie_word_embeddings=True, max_position_embeddings=256, eos_token_id=None,
    router=RouterConfig(score_function="sigmoid", use_expert_bias=True, num_groups=4, topk_groups=2,
                        scaling_factor=2.5))
CONFIGS = {"tiny": get_preset("tiny-moe"), "sigmoid": get_preset("tiny-moe-sigmoid"), "rich": RICH}
SEEDS = {"tiny": 0, "sigmoid": 1, "rich": 2}
PROMPT_LEN, CHUNK, GREEDY_TOKENS, BLOCK_SIZE = 11, 7, 3, 4


@dataclass(frozen=True)
class Case:
    config: str
    tp: int
    ep: int

    @property
    def name(self) -> str:
        return f"{self.config}-tp{self.tp}-ep{self.ep}"


def prompt(config: ModelConfig, dp_rank: int) -> torch.Tensor:
    """Each replica serves its own prompt."""
    gen = torch.Generator().manual_seed(1000 + dp_rank)
    return torch.randint(2, config.vocab_size, (PROMPT_LEN,), generator=gen)


def forced_routing(config: ModelConfig, seq_len: int) -> torch.Tensor:
    """Valid replay targets: topk distinct experts per row."""
    gen = torch.Generator().manual_seed(7)
    scores = torch.rand(seq_len, config.num_moe_layers, config.num_experts, generator=gen)
    return scores.topk(config.topk, dim=-1).indices


def greedy(model, tokens: torch.Tensor, n: int) -> list[int]:
    seq = tokens.tolist()
    for _ in range(n):
        logits, _ = model.forward_reference(torch.tensor(seq))
        seq.append(int(logits[-1].argmax()))
    return seq[len(tokens):]


def _paged_meta(start: int, stop: int, num_blocks: int) -> AttentionMetadata:
    """One request whose tokens ``start..stop`` are computed now, in blocks 0, 1, 2, ..."""
    slots = torch.arange(start, stop)
    return AttentionMetadata(
        slot_mapping=slots, block_tables=torch.arange(num_blocks, dtype=torch.int32).view(1, -1),
        query_start_loc=torch.tensor([0, stop - start], dtype=torch.int32),
        seq_lens=torch.tensor([stop], dtype=torch.int32), query_start_loc_host=[0, stop - start],
        seq_lens_host=[stop], max_query_len=stop - start, max_seq_len=stop, decode_only=stop - start == 1)


@torch.no_grad()
def paged_run(model, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Prefill in two chunks, then decode the remaining tokens one by one through the KV
    cache; returns the logits of every position and the routing staged per step."""
    c = model.config
    num_blocks = -(-len(tokens) // BLOCK_SIZE)
    kv_heads = model.layers[0].self_attn.num_kv_heads
    caches = [(torch.zeros(num_blocks + 1, BLOCK_SIZE, kv_heads, c.head_dim),
               torch.zeros(num_blocks + 1, BLOCK_SIZE, kv_heads, c.head_dim)) for _ in range(c.num_layers)]
    bounds = [0, CHUNK] + list(range(CHUNK + 1, len(tokens) + 1))
    logits, routing = [], []
    for a, b in zip(bounds, bounds[1:]):
        staging = torch.empty(b - a, c.num_moe_layers, c.topk, dtype=torch.int64)
        ctx = ForwardContext(_paged_meta(a, b, num_blocks), caches, paged_attention_eager, staging)
        hidden = model(tokens[a:b], torch.arange(a, b), ctx)
        logits.append(model.compute_logits(hidden))
        routing.append(staging)
    return torch.cat(logits).numpy(), torch.cat(routing).numpy()


@torch.no_grad()
def layer_outputs(model, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """Block by block on the same inputs: embedding, attention and dense MLP of layer 0,
    the first MoE layer (routing, output, replayed output), the head."""
    c = model.config
    h = model.embed_tokens(tokens)
    x = model.layers[0].input_layernorm(h)
    rope = model.rotary.tables(torch.arange(len(tokens)))
    moe = model.layers[c.moe_layer_indices[0]].mlp
    routing = torch.empty(len(tokens), c.topk, dtype=torch.int64)
    forced = forced_routing(c, len(tokens))[:, 0]
    return {"embed": h.numpy(), "attention": model.layers[0].self_attn.forward_full(x, rope).numpy(),
            "dense_mlp": model.layers[0].mlp(x).numpy(),
            "moe": moe(x, routing, reference=True).numpy(), "moe_routing": routing.numpy(),
            "moe_replay": moe(x, forced_topk_ids=forced, reference=True).numpy(),
            "logits_head": model.compute_logits(x).numpy()}


@torch.no_grad()
def model_outputs(model, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """What the tests compare for one (model, prompt): every block, whole forwards, greedy
    tokens, replay and the paged path."""
    out = layer_outputs(model, tokens)
    logits, routing = model.forward_reference(tokens)
    replay_logits, _ = model.forward_reference(tokens, forced_routing(model.config, len(tokens)))
    seq = torch.cat([tokens, torch.tensor(greedy(model, tokens, GREEDY_TOKENS))])
    paged_logits, paged_routing = paged_run(model, seq)
    out.update(logits=logits.numpy(), routing=routing.numpy(), replay_logits=replay_logits.numpy(),
               greedy=seq[len(tokens):].numpy(), paged_logits=paged_logits, paged_routing=paged_routing)
    return out


def run_cases(rank: int, world_size: int, cases: list[Case], checkpoints: dict[str, str]) -> dict[str, np.ndarray]:
    """Rank side of the multi-rank tests: every case's outputs, keyed ``case/output``."""
    results: dict[str, np.ndarray] = {}
    for case in cases:
        config = CONFIGS[case.config]
        groups = ParallelGroups.build(ParallelLayout(world_size, case.tp, case.ep))
        model = TPMoEGPT(config, groups).eval()
        with SafetensorsCheckpoint({n: checkpoints[case.config] for n in _names(checkpoints[case.config])}) as ck:
            load_shards(model, {n: ck.source(n) for n in ck.files})
        results.update({f"{case.name}/{k}": v for k, v in model_outputs(model, prompt(config, groups.coords.dp_rank)).items()})
        results[f"{case.name}/dp_rank"] = np.array(groups.coords.dp_rank)
    return results


def _names(path: str) -> list[str]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return list(f.keys())
