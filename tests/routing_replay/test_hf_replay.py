"""Routing replay inside transformers MoE models: the experts receive exactly the replayed
ids (0 disagreement), logits equal our model's forward with the same forced routing, and
nothing stays patched afterwards. Covers the classic families and DeepSeek-V3 / Moonlight,
GLM-4.5, GPT-OSS and MiniMax-M2, and the hybrids Qwen3-Next, Qwen3.5-MoE (multimodal
checkpoint, text forward) and Nemotron-H, whose recurrent and attention-only layers have no
router and take no targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from inference.hf_loader import load_hf_model  # noqa: E402
from routing_replay.hf import HFReplayError, moe_routers, replay_routing  # noqa: E402
from routing_replay.replay_targets import complete_rows, padded_targets  # noqa: E402
from tests.inference.hf.families import FAMILIES, make_hf_model  # noqa: E402
from tests.inference.hf.hybrid_families import MODELS as HYBRIDS, make_hybrid_model  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, pad_token_id=0)
ARCHS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=6, num_experts_per_tok=2,
                                                             intermediate_size=24)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=6, num_experts_per_tok=2,
                                                                 moe_intermediate_size=24, intermediate_size=48,
                                                                 shared_expert_intermediate_size=40, norm_topk_prob=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=6, num_experts_per_tok=3,
                                                                 moe_intermediate_size=24, intermediate_size=48)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=6, num_experts_per_tok=2, intermediate_size=24)),
}


@pytest.fixture(scope="module", params=list(ARCHS) + list(FAMILIES) + list(HYBRIDS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its saved checkpoint)."""
    if request.param in HYBRIDS:
        hf = make_hybrid_model(request.param)
    elif request.param in FAMILIES:
        hf = make_hf_model(request.param, vocab_size=128, max_position_embeddings=128)
    else:
        config_cls, model_cls, extra = ARCHS[request.param]
        hf = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra)).eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1 + 0.1 * noise if "norm" in name else noise / math.sqrt(p.shape[-1]))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_hf_model(path)


def _random_routing(config, rows: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(config.num_experts, generator=gen)[:config.topk]
                                     for _ in range(config.num_moe_layers)]) for _ in range(rows)]).numpy()


class ExpertInputs:
    """The top-k ids each MoE block's experts receive, per layer, in call order."""

    def __init__(self, hf):
        blocks = [m for m in hf.modules() if (hasattr(m, "gate") or hasattr(m, "router")) and hasattr(m, "experts")]
        self.ids: list[torch.Tensor] = []
        self.hooks = [b.experts.register_forward_pre_hook(lambda mod, args: self.ids.append(args[1].clone()))
                      for b in blocks]

    def close(self):
        for h in self.hooks:
            h.remove()


def test_replay_routes_as_recorded_and_matches_our_logits(pair):
    hf, ours = pair
    config = ours.config
    lengths, seq = [7, 4], 7
    routings = [_random_routing(config, n - 1, seed=n) for n in lengths]
    tokens = torch.zeros(2, seq, dtype=torch.long)
    mask = torch.zeros(2, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(b))
        mask[b, :n] = 1
    targets = padded_targets(routings, seq, order="bs")
    seen = ExpertInputs(hf)
    with replay_routing(hf, targets) as routers, torch.no_grad():
        out = hf(input_ids=tokens, attention_mask=mask, output_router_logits=True)
    seen.close()
    assert len(routers) == config.num_moe_layers == len(seen.ids) > 0
    for j, ids in enumerate(seen.ids):   # 0 disagreement: every expert input is the recorded id
        assert torch.equal(ids, torch.as_tensor(targets[j]))
    for b, n in enumerate(lengths):
        forced = torch.as_tensor(complete_rows(routings[b].astype(np.int64), n))
        ref, _ = ours.forward_reference(tokens[b, :n], forced_routing=forced)
        torch.testing.assert_close(out.logits[b, :n], ref, atol=1e-4, rtol=0)
    # router_logits stay the current logits (aux losses see the real router)
    assert out.router_logits[0].shape == (2 * seq, config.num_experts)


def test_gradients_reach_the_router_under_replay(pair):
    hf, ours = pair
    tokens = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    targets = padded_targets([_random_routing(ours.config, 5, seed=9)], 6, order="bs")
    hf.zero_grad()
    with replay_routing(hf, targets) as routers:
        hf(input_ids=tokens).logits.float().logsumexp(-1).mean().backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers)
    hf.zero_grad()


def test_routers_are_restored_even_on_error(pair):
    hf, ours = pair
    tokens = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = hf(input_ids=tokens).logits
        with pytest.raises(RuntimeError, match="boom"):
            with replay_routing(hf, padded_targets([_random_routing(ours.config, 4, seed=1)], 5, order="bs")):
                raise RuntimeError("boom")
        after = hf(input_ids=tokens).logits
    assert torch.equal(before, after)
    assert all("forward" not in r.__dict__ for r in moe_routers(hf))


def test_mismatched_targets_fail_clearly(pair):
    hf, ours = pair
    config = ours.config
    targets = padded_targets([_random_routing(config, 4, seed=2)], 5, order="bs")
    with pytest.raises(HFReplayError, match="router saw 12 tokens, replay targets have 5"):
        with replay_routing(hf, targets), torch.no_grad():
            hf(input_ids=torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(HFReplayError, match=f"1 target layers for {config.num_moe_layers} MoE layers"):
        with replay_routing(hf, targets[:1]):
            pass
    bad = targets.copy()
    bad[0, 0, :] = 0
    with pytest.raises(ValueError, match="repeats an expert"):
        with replay_routing(hf, bad):
            pass


def test_models_without_supported_routers_are_refused():
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(HFReplayError, match="no supported MoE router"):
        moe_routers(dense)
