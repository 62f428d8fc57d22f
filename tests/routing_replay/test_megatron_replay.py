"""megatron-core 0.16 on CPU (gloo, world size 1): our weights exported into a GPTModel
compute our logits, and RouterReplay driven by routing_replay.megatron forces the recorded
(or arbitrary) routing through padded batches, packed sequences and recompute backward."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
# megatron-core warns about missing Apex/TE and its own deprecations on every build
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

from inference.config import EngineConfig, RouterConfig  # noqa: E402
from inference.engine import LLMEngine  # noqa: E402
from inference.megatron_export import (UnsupportedForMegatron, causal_mask, cpu_megatron_runtime,  # noqa: E402
                                       export_to_megatron, megatron_config, packed_causal_mask,
                                       packed_position_ids)
from inference.presets import build_model, get_preset  # noqa: E402
from inference.request import SamplingParams  # noqa: E402
from routing_replay.megatron import (MegatronReplayError, MegatronRoutingReplay, release_model,  # noqa: E402
                                     replay_routing, router_replay_instances)
from routing_replay.replay_targets import complete_rows, packed_targets, padded_targets, per_layer  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def runtime():
    with cpu_megatron_runtime():
        yield


@pytest.fixture(scope="module")
def tiny():
    return build_model(get_preset("tiny-moe"), seed=3)


@pytest.fixture(scope="module")
def gpt(tiny):
    model = export_to_megatron(tiny).eval()
    yield model
    release_model(model)


def _random_routing(config, rows: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    ids = [[torch.randperm(config.num_experts, generator=gen)[:config.topk] for _ in range(config.num_moe_layers)]
           for _ in range(rows)]
    return torch.stack([torch.stack(r) for r in ids]).numpy()


class RouterMaps:
    """Collects each router's routing_map [tokens, experts]: ``maps`` in call order,
    ``per_layer[j]`` the calls of MoE layer j (recompute runs layers in reverse order)."""

    def __init__(self, model):
        from megatron.core.transformer.moe.router import TopKRouter
        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self.maps: list[torch.Tensor] = []
        self.per_layer: list[list[torch.Tensor]] = [[] for _ in routers]
        self.hooks = [m.register_forward_hook(self._hook(j)) for j, m in enumerate(routers)]

    def _hook(self, j):
        def hook(module, inputs, output):
            self.maps.append(output[1].detach().clone())
            self.per_layer[j].append(self.maps[-1])
        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


def _sets_equal(routing_map: torch.Tensor, ids: np.ndarray) -> bool:
    """routing_map [T, E] selects exactly the experts of ids [T, k] in every row."""
    expected = torch.zeros_like(routing_map).scatter_(1, torch.as_tensor(ids, dtype=torch.int64), True)
    return bool((routing_map == expected).all())


EXPORT_CASES = {
    "tiny-moe": get_preset("tiny-moe"),
    # sigmoid + expert bias + group-limited + scaling, per-head q/k norm, shared expert
    "tiny-moe-sigmoid": get_preset("tiny-moe-sigmoid"),
    # qkv bias, tied embeddings, gated shared expert (Qwen2-MoE), rope base, no renormalisation
    "qwen2-like": dataclasses.replace(get_preset("tiny-moe"), attention_bias=True, tie_word_embeddings=True,
                                      shared_expert_intermediate_size=48, shared_expert_gate=True,
                                      rope_theta=50000.0, router=RouterConfig(norm_topk_prob=False)),
    # GLM-4.5: partial rotary, qkv bias, sigmoid + bias, groups scored by their best 2, shared expert
    "glm-like": dataclasses.replace(get_preset("tiny-moe-sigmoid"), rotary_dim=8, attention_bias=True,
                                    router=dataclasses.replace(get_preset("tiny-moe-sigmoid").router, group_score_topk=2)),
    # GPT-OSS: sinks, sliding window 4 on alternate layers, biases everywhere, clamped SwiGLU experts
    "gpt-oss-like": dataclasses.replace(
        get_preset("tiny-moe"), dense_layers=(), attention_bias=True, o_proj_bias=True, attention_sinks=True,
        layer_types=("sliding_attention", "full_attention") * 2, sliding_window=4, expert_activation="swiglu_oai",
        expert_bias=True, swiglu_limit=1.5, router=RouterConfig(norm_topk_prob=True, bias=True)),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_computes_our_logits_and_routing(case):
    model = build_model(EXPORT_CASES[case], seed=1)
    gpt = export_to_megatron(model).eval()
    tokens = torch.randint(2, model.config.vocab_size, (14,), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_routing = model.forward_reference(tokens)
    maps = RouterMaps(gpt)
    with torch.no_grad():
        out = gpt(tokens[None], torch.arange(14)[None], causal_mask(1, 14))
    maps.close()
    release_model(gpt)
    torch.testing.assert_close(out[0], ref_logits, atol=ATOL, rtol=0)
    assert all(_sets_equal(m, ref_routing[:, j].numpy()) for j, m in enumerate(maps.maps))


def _engine_rollouts(model):
    engine = LLMEngine(model, EngineConfig(record_routing=True, block_size=4, num_kv_blocks=64, max_step_tokens=32))
    prompts = [[5, 9, 13, 17, 21], [40, 41], [100, 7, 7, 8, 300, 301, 2]]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=5, ignore_eos=True))
    seqs = [r.prompt_token_ids + r.output_token_ids for r in results]
    seq_len = max(map(len, seqs))
    tokens = torch.zeros(len(seqs), seq_len, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = torch.tensor(s)
    args = (tokens, torch.arange(seq_len).expand(len(seqs), -1), causal_mask(len(seqs), seq_len))
    return results, seqs, args, padded_targets([r.routing for r in results], seq_len, order="sb")


def _matches_recording(maps: RouterMaps, results, seqs) -> bool:
    seq_len = max(map(len, seqs))
    return all(_sets_equal(m.view(seq_len, len(seqs), -1)[:len(seqs[b]) - 1, b], r.routing[:, j])
               for j, m in enumerate(maps.maps) for b, r in enumerate(results))


def test_replay_of_engine_recording_in_a_padded_batch(tiny, gpt):
    results, seqs, args, targets = _engine_rollouts(tiny)
    maps = RouterMaps(gpt)
    with replay_routing(gpt, targets), torch.no_grad():
        logits = gpt(*args)
    maps.close()
    assert _matches_recording(maps, results, seqs)
    for b, (r, s) in enumerate(zip(results, seqs)):
        ref, _ = tiny.forward_reference(torch.tensor(s), torch.as_tensor(complete_rows(r.routing.astype(np.int64), len(s))))
        torch.testing.assert_close(logits[b, :len(s)], ref, atol=ATOL, rtol=0)
        # greedy decoding of the training forward reproduces the engine's tokens
        assert logits[b, len(r.prompt_token_ids) - 1:len(s) - 1].argmax(-1).tolist() == r.output_token_ids


def test_replay_overrides_a_drifted_trainer(tiny):
    """A trainer one update away (noisy weights) routes differently on its own; with
    replay it routes exactly as the engine recorded."""
    results, seqs, args, targets = _engine_rollouts(tiny)
    drifted = build_model(get_preset("tiny-moe"), seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in drifted.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1 * p.std())
    model = export_to_megatron(drifted).eval()
    free, forced = RouterMaps(model), None
    with torch.no_grad():
        model(*args)
        free.close()
        forced = RouterMaps(model)
        with replay_routing(model, targets):
            model(*args)
        forced.close()
    release_model(model)
    assert not _matches_recording(free, results, seqs)
    assert _matches_recording(forced, results, seqs)


def test_replay_forces_arbitrary_routing_in_packed_sequences(tiny, gpt):
    lengths, cu = [5, 9, 3], [0, 8, 17, 24]         # slots longer than sequences: padded THD
    routings = [_random_routing(tiny.config, n - 1, seed=n) for n in lengths]
    tokens = torch.randint(2, 500, (cu[-1],), generator=torch.Generator().manual_seed(4))
    targets = packed_targets(routings, cu_seqlens=cu)
    maps = RouterMaps(gpt)
    with replay_routing(gpt, targets), torch.no_grad():
        logits = gpt(tokens[None], packed_position_ids(cu), packed_causal_mask(cu))[0]
    maps.close()
    for j, m in enumerate(maps.maps):
        assert _sets_equal(m, targets[j])
    for i, n in enumerate(lengths):
        seq = tokens[cu[i]:cu[i] + n]
        ref, _ = tiny.forward_reference(seq, torch.as_tensor(complete_rows(routings[i].astype(np.int64), n)))
        torch.testing.assert_close(logits[cu[i]:cu[i] + n], ref, atol=ATOL, rtol=0)


def test_targets_as_per_layer_tensors_replay_the_same(tiny, gpt):
    targets = padded_targets([_random_routing(tiny.config, 7, 8)], 8)
    args = (torch.randint(2, 500, (1, 8), generator=torch.Generator().manual_seed(9)), torch.arange(8)[None],
            causal_mask(1, 8))
    with torch.no_grad():
        with replay_routing(gpt, targets):
            from_array = gpt(*args)
        with MegatronRoutingReplay(gpt) as replay:
            replay.forward(per_layer(targets))
            from_list = gpt(*args)
    torch.testing.assert_close(from_list, from_array, atol=0, rtol=0)


def test_after_replay_routers_route_normally_again(tiny, gpt):
    tokens = torch.randint(2, 500, (1, 10), generator=torch.Generator().manual_seed(5))
    args = (tokens, torch.arange(10)[None], causal_mask(1, 10))
    with torch.no_grad():
        before = gpt(*args)
        with pytest.raises(RuntimeError, match="boom"), replay_routing(gpt, padded_targets(
                [_random_routing(tiny.config, 9, 6)], 10)):
            raise RuntimeError("boom")
        after = gpt(*args)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert all(r.router_replay_action is None and r.target_topk_idx is None and not r.replay_backward_list
               for r in router_replay_instances(gpt))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_recompute_backward_replays_each_micro_batch_in_order(tiny):
    plain = export_to_megatron(tiny).train()
    recompute = export_to_megatron(tiny, recompute=True).train()
    batches = [torch.randint(2, 500, (2, 8), generator=torch.Generator().manual_seed(s)) for s in (7, 8)]
    targets = [padded_targets([_random_routing(tiny.config, 7, 10 * s + b) for b in range(2)], 8) for s in (1, 2)]
    pos, mask = torch.arange(8).expand(2, -1), causal_mask(2, 8)

    def step(model):
        maps = RouterMaps(model)
        with MegatronRoutingReplay(model) as replay:
            losses = []
            for tokens, t in zip(batches, targets):      # forwards of both micro-batches first
                replay.forward(t)
                losses.append(model(tokens, pos, mask).float().logsumexp(-1).mean())
            replay.backward()
            for loss in losses:                          # recompute pops targets in push order
                loss.backward()
        maps.close()
        return maps.per_layer

    plain_maps, recompute_maps = step(plain), step(recompute)
    assert all(len(calls) == 2 for calls in plain_maps)
    for j, calls in enumerate(recompute_maps):           # fwd mb1, fwd mb2, recompute mb1, mb2
        assert len(calls) == 4
        assert all(_sets_equal(m, targets[k % 2][j]) for k, m in enumerate(calls))
    g_plain, g_re = _grads(plain), _grads(recompute)
    assert any("router.weight" in n for n in g_re)       # R3: gradients reach the router
    assert g_plain.keys() == g_re.keys()
    for name in g_plain:
        torch.testing.assert_close(g_re[name], g_plain[name], atol=1e-5, rtol=1e-4)
    release_model(plain)
    release_model(recompute)


def test_instances_come_from_the_model_not_the_global_registry(tiny):
    from megatron.core.transformer.moe.router_replay import RouterReplay
    first = export_to_megatron(tiny)
    second = export_to_megatron(tiny)
    mine = router_replay_instances(second)
    assert len(mine) == tiny.config.num_moe_layers
    assert not set(map(id, mine)) & set(map(id, router_replay_instances(first)))
    release_model(first)
    release_model(second)
    registry = {id(r) for r in RouterReplay.global_router_replay_instances}
    assert not registry & set(map(id, mine))


def test_refusals(tiny, gpt):
    no_replay = export_to_megatron(tiny, routing_replay=False)
    with pytest.raises(MegatronReplayError, match="moe_enable_routing_replay=True"):
        router_replay_instances(no_replay)
    with pytest.raises(MegatronReplayError, match="2 target layers for 3 MoE layers"):
        with replay_routing(gpt, padded_targets([_random_routing(tiny.config, 3, 0)[:, :2]], 4)):
            pass
    olmoe_like = get_preset("olmoe-1b-7b-shape")
    with pytest.raises(UnsupportedForMegatron, match="qk_norm='full'"):
        megatron_config(olmoe_like)
    with pytest.raises(UnsupportedForMegatron, match="local .* spec cannot build MLASelfAttention"):
        megatron_config(get_preset("moonlight-16b-a3b-shape"))
    with pytest.raises(UnsupportedForMegatron, match="YaRN"):
        megatron_config(get_preset("gpt-oss-20b-shape"))
    with pytest.raises(UnsupportedForMegatron, match=r"biases on only some linear layers \['o_proj'\]"):
        megatron_config(dataclasses.replace(tiny.config, o_proj_bias=True))


@pytest.mark.parametrize("preset", ["tiny-hybrid-gdn", "tiny-hybrid-mamba"])
def test_hybrid_models_are_refused_with_the_reason(preset):
    model = build_model(get_preset(preset))
    with pytest.raises(UnsupportedForMegatron, match="recurrent layers .* neither builds on CPU"):
        export_to_megatron(model)
    with pytest.raises(UnsupportedForMegatron, match="not mapped"):
        megatron_config(dataclasses.replace(get_preset("tiny-moe"), attention_output_gate=True))


def test_megatron_core_cannot_build_hybrid_layers_on_cpu():
    """What the refusal says, tried on the installed megatron-core: its Mamba stack (Transformer
    Engine spec) fails for want of mamba_ssm, and the Gated DeltaNet block spec asserts
    Transformer Engine (and its layer needs flash-linear-attention)."""
    from megatron.core.models.mamba import MambaModel
    from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_transformer_block_with_experimental_attention_variant_spec)
    from megatron.core.ssm import gated_delta_net
    from megatron.core.transformer import TransformerConfig
    shape = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                 ffn_hidden_size=64, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    mamba = TransformerConfig(**shape, mamba_num_heads=4, mamba_head_dim=8, mamba_state_dim=8, mamba_num_groups=2)
    with pytest.raises(ImportError, match="MambaSSM is not installed"):
        MambaModel(mamba, mamba_stack_spec, vocab_size=64, max_sequence_length=64, hybrid_override_pattern="M*")
    gdn = TransformerConfig(**shape, experimental_attention_variant="gated_delta_net", linear_attention_freq=2,
                            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                            linear_value_head_dim=8)
    with pytest.raises(Exception, match="TESpecProvider|transformer engine"):
        get_transformer_block_with_experimental_attention_variant_spec(gdn)
    assert not gated_delta_net.HAVE_FLA
