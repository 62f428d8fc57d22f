"""What each gloo rank runs in the multi-rank tests, and the inputs both sides share.

A ``Case`` is a model config and a layout. Every rank of the world builds its shards of
``MoEGPT(config, parallel=groups)`` for each case, loads them from the case's safetensors
file (the single-process model's state dict, saved by the test), runs the checks and returns
the outputs by name. The test computes the same quantities with the unsharded model and
compares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inference.attention_backends import EagerBackend
from inference.config import MLAConfig, ModelConfig, RouterConfig
from inference.model.context import AttentionMetadata, ForwardContext
from inference.model.gpt import allocate_model
from inference.parallel import (ColumnParallelLinear, GroupHandle, ParallelGroups, ParallelLayout, RowParallelLinear,
                                SafetensorsCheckpoint, load_full, load_shards)
from inference.presets import get_preset

# Shared expert with a gate, whole-projection q/k norm (OLMoE), qkv bias, tied embeddings,
# a vocabulary no TP size divides, sigmoid routing with expert bias and groups (DeepSeek).
RICH = ModelConfig(
    name="tp-rich", vocab_size=509, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=128, moe_intermediate_size=32, num_experts=16, topk=4, dense_layers=(0,),
    shared_expert_intermediate_size=64, shared_expert_gate=True, qk_norm="full", attention_bias=True,
    tie_word_embeddings=True, max_position_embeddings=256, eos_token_id=None,
    router=RouterConfig(score_function="sigmoid", use_expert_bias=True, num_groups=4, topk_groups=2,
                        scaling_factor=2.5))
# GPT-OSS-like: sinks, a sliding window shorter than the prompt, qkv and o_proj biases,
# router bias, biased clamped-SwiGLU experts.
OSS = ModelConfig(
    name="tp-oss", vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=64, moe_intermediate_size=32, num_experts=8, topk=2, dense_layers=(0,),
    router=RouterConfig(bias=True), attention_bias=True, o_proj_bias=True, attention_sinks=True,
    layer_types=("sliding_attention", "full_attention", "sliding_attention"), sliding_window=4,
    expert_activation="swiglu_oai", expert_bias=True, max_position_embeddings=256)
# DeepSeek-V3-like: multi-head latent attention with a q bottleneck, partial-rope keys,
# sigmoid routing with expert bias, a shared expert.
MLA = ModelConfig(
    name="tp-mla", vocab_size=400, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=4, head_dim=24,
    intermediate_size=128, moe_intermediate_size=32, num_experts=8, topk=2, dense_layers=(0,),
    shared_expert_intermediate_size=32,
    mla=MLAConfig(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, q_lora_rank=24),
    router=RouterConfig(score_function="sigmoid", use_expert_bias=True, scaling_factor=2.0),
    max_position_embeddings=256)
# Hybrids (only their MoE layers split): Gated DeltaNet + gated attention + SwiGLU shared
# expert with a gate; Mamba2 + attention without rotary + relu^2 experts and shared expert.
CONFIGS = {"tiny": get_preset("tiny-moe"), "sigmoid": get_preset("tiny-moe-sigmoid"), "rich": RICH, "oss": OSS,
           "mla": MLA, "gdn": get_preset("tiny-hybrid-gdn"), "mamba": get_preset("tiny-hybrid-mamba")}
SEEDS = {"tiny": 0, "sigmoid": 1, "rich": 2, "oss": 3, "mla": 4, "gdn": 5, "mamba": 6}
PROMPT_LEN, CHUNK, GREEDY_TOKENS, BLOCK_SIZE = 11, 7, 3, 4
EXACT = ("moe_routing", "routing", "greedy", "paged_routing")
# Outputs that collectives leave replicated: every rank of a replica must agree bit for bit.
REPLICATED = ("embed", "attention", "dense_mlp", "moe", "moe_replay", "logits_head", "logits", "routing",
              "greedy", "paged_logits", "paged_routing")


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
        logits, _ = model.forward_reference(torch.tensor(seq, device=tokens.device))
        seq.append(int(logits[-1].argmax()))
    return seq[len(tokens):]


def _paged_meta(start: int, stop: int, num_blocks: int, device: torch.device) -> AttentionMetadata:
    """One request whose tokens ``start..stop`` are computed now, in blocks 0, 1, 2, ..."""
    i32 = dict(dtype=torch.int32, device=device)
    return AttentionMetadata(
        slot_mapping=torch.arange(start, stop, device=device), block_tables=torch.arange(num_blocks, **i32).view(1, -1),
        query_start_loc=torch.tensor([0, stop - start], **i32),
        seq_lens=torch.tensor([stop], **i32), query_start_loc_host=[0, stop - start],
        seq_lens_host=[stop], max_query_len=stop - start, max_seq_len=stop, decode_only=stop - start == 1)


def _layer_cache(config: ModelConfig, attn, blocks: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's paged cache as ``KVCache`` lays it out: K and V of this rank's KV heads,
    or the MLA rows (latent + rotary key, replicated) and their latent view."""
    if config.mla is not None:
        rows = torch.zeros(blocks, BLOCK_SIZE, 1, config.mla.cache_dim, device=device)
        return rows, rows[..., :config.mla.kv_lora_rank]
    shape = (blocks, BLOCK_SIZE, attn.num_kv_heads, config.head_dim)
    return torch.zeros(shape, device=device), torch.zeros(shape, device=device)


@torch.no_grad()
def paged_run(model, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Prefill in two chunks, then decode the remaining tokens one by one through the KV
    cache; returns the logits of every position and the routing staged per step."""
    c, dev = model.config, tokens.device
    num_blocks = -(-len(tokens) // BLOCK_SIZE)
    caches = [_layer_cache(c, layer.self_attn, num_blocks + 1, dev) for layer in model.layers]
    bounds = [0, CHUNK] + list(range(CHUNK + 1, len(tokens) + 1))
    logits, routing = [], []
    for a, b in zip(bounds, bounds[1:]):
        staging = torch.empty(b - a, c.num_moe_layers, c.topk, dtype=torch.int64, device=dev)
        ctx = ForwardContext(_paged_meta(a, b, num_blocks, dev), caches, EagerBackend(), staging)
        hidden = model(tokens[a:b], torch.arange(a, b, device=dev), ctx)
        logits.append(model.compute_logits(hidden))
        routing.append(staging)
    return torch.cat(logits).cpu().numpy(), torch.cat(routing).cpu().numpy()


@torch.no_grad()
def layer_outputs(model, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """Block by block on the same inputs: embedding, attention and dense MLP of layer 0,
    the first MoE layer (routing, output, replayed output), the head."""
    c, dev = model.config, tokens.device
    h = model.embed_tokens(tokens)
    x = model.layers[0].input_layernorm(h)
    rope = model.rotary.tables(torch.arange(len(tokens), device=dev))
    moe = model.layers[c.moe_layer_indices[0]].mlp
    routing = torch.empty(len(tokens), c.topk, dtype=torch.int64, device=dev)
    forced = forced_routing(c, len(tokens))[:, 0].to(dev)
    out = {"embed": h, "attention": model.layers[0].self_attn.forward_full(x, rope),
           "dense_mlp": model.layers[0].mlp(x), "moe": moe(x, routing, reference=True), "moe_routing": routing,
           "moe_replay": moe(x, forced_topk_ids=forced, reference=True), "logits_head": model.compute_logits(x)}
    return {k: v.cpu().numpy() for k, v in out.items()}


@torch.no_grad()
def model_outputs(model, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """What the tests compare for one (model, prompt): every block, whole forwards, greedy
    tokens, replay and the paged path."""
    out = layer_outputs(model, tokens)
    logits, routing = model.forward_reference(tokens)
    replay_logits, _ = model.forward_reference(tokens, forced_routing(model.config, len(tokens)).to(tokens.device))
    seq = torch.cat([tokens, torch.tensor(greedy(model, tokens, GREEDY_TOKENS), device=tokens.device)])
    paged_logits, paged_routing = paged_run(model, seq)
    out.update(logits=logits.cpu().numpy(), routing=routing.cpu().numpy(), replay_logits=replay_logits.cpu().numpy(),
               greedy=seq[len(tokens):].cpu().numpy(), paged_logits=paged_logits, paged_routing=paged_routing)
    return out


def linear_inputs(device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    inputs = {"weight": torch.randn(24, 32, generator=gen), "bias": torch.randn(24, generator=gen),
              "x": torch.randn(5, 32, generator=gen)}
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def linear_outputs(tp: GroupHandle, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Biased linears over the whole world: row-parallel reduced by itself or by the caller
    (bias counted once), column-parallel gathered. All three must equal ``F.linear``."""
    inputs = linear_inputs(device)
    weights = {"weight": inputs["weight"], "bias": inputs["bias"]}
    row, deferred = (RowParallelLinear(32, 24, tp, bias=True, reduce=r, device=device) for r in (True, False))
    column = ColumnParallelLinear(32, [24], tp, bias=True, device=device)
    for layer in (row, deferred, column):
        load_full(layer, weights)
    (a, b), = row.cols
    x_local = inputs["x"][:, a:b]
    out = {"row": row(x_local), "row_deferred": tp.all_reduce(deferred(x_local)),
           "column": tp.all_gather(column(inputs["x"]), dim=-1)}
    return {k: v.cpu().numpy() for k, v in out.items()}


def run_cases(rank: int, world_size: int, cases: list[Case], checkpoints: dict[str, str],
              device: str = "cpu") -> dict[str, np.ndarray]:
    """Rank side of the multi-rank tests: every case's outputs, keyed ``case/output``
    (``device="cuda"``: this rank's GPU, under NCCL)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    world = ParallelGroups.build(ParallelLayout(world_size, world_size))
    results = {f"linear/{k}": v for k, v in linear_outputs(world.tp, dev).items()}
    for case in cases:
        config = CONFIGS[case.config]
        groups = ParallelGroups.build(ParallelLayout(world_size, case.tp, case.ep))
        model = allocate_model(config, dev, torch.float32, groups).eval()
        with SafetensorsCheckpoint({n: checkpoints[case.config] for n in _names(checkpoints[case.config])}) as ck:
            load_shards(model, {n: ck.source(n) for n in ck.files})
        outputs = model_outputs(model, prompt(config, groups.coords.dp_rank).to(dev))
        results.update({f"{case.name}/{k}": v for k, v in outputs.items()})
        results[f"{case.name}/dp_rank"] = np.array(groups.coords.dp_rank)
    return results


def _names(path: str) -> list[str]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def assert_case_matches(case: Case, results: list[dict[str, np.ndarray]], expected, rtol: float = 1e-4,
                        atol: float = 2e-5) -> None:
    """Every rank's outputs of ``case`` equal ``expected(config, dp_rank)`` (the unsharded
    model's): ids and tokens exactly, values within fp32 reordering error."""
    for rank, out in enumerate(results):
        ref = expected(case.config, int(out[f"{case.name}/dp_rank"]))
        assert set(ref) == {k.split("/", 1)[1] for k in out if k.startswith(case.name + "/")} - {"dp_rank"}
        for key, want in ref.items():
            got, where = out[f"{case.name}/{key}"], f"{case.name} rank {rank}: {key}"
            assert got.shape == want.shape, where
            if key in EXACT:
                assert np.array_equal(got, want), f"{where} differs from the single-process run"
            else:
                np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=where)


def assert_replicas_identical(cases: list[Case], results: list[dict[str, np.ndarray]]) -> int:
    """Replicated outputs are bit-identical across each replica's ranks; returns the
    comparisons made."""
    checked, size = 0, len(results)
    for case in cases:
        replicas: dict[int, list[dict]] = {}
        for out in results:
            replicas.setdefault(int(out[f"{case.name}/dp_rank"]), []).append(out)
        assert len(replicas) == size // case.tp and all(len(r) == case.tp for r in replicas.values())
        for members in replicas.values():
            for key in REPLICATED:
                first = members[0][f"{case.name}/{key}"]
                for other in members[1:]:
                    assert np.array_equal(first, other[f"{case.name}/{key}"]), \
                        f"{case.name}: {key} differs across TP ranks"
                    checked += 1
    return checked
