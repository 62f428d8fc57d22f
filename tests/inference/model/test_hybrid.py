"""The hybrid decoder (``inference.model.hybrid``) at model level, without the engine: what
each layer is built of, and the paged forward of prefill chunks and decode steps in one
packed batch (states carried in StatePool slots, padding rows) against the whole-sequence
reference forward. Comparisons with transformers are in tests/inference/hf."""

from __future__ import annotations

import pytest
import torch

from inference.attention_backends import EagerBackend, TritonBackend
from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.cache.kv_cache import KVCache
from inference.model.hybrid import HybridDecoderLayer
from inference.model.layers import Relu2MLP, ZeroCenteredRMSNorm
from inference.model.recurrent import GatedDeltaNet, Mamba2Mixer
from inference.presets import build_model, get_preset
from tests.inference.model.paged_steps import Chunk, PagedSteps

TOL = dict(atol=2e-4, rtol=1e-4)


def _sequences(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]


def test_layers_are_built_by_kind():
    gdn = build_model(get_preset("tiny-hybrid-gdn"))
    kinds = [(type(layer.mixer).__name__ if layer.mixer is not None else None, layer.self_attn is not None)
             for layer in gdn.layers]
    assert kinds == [("GatedDeltaNet", False)] * 3 + [(None, True)]
    assert all(layer.moe_index == i for i, layer in enumerate(gdn.layers))
    assert isinstance(gdn.norm, ZeroCenteredRMSNorm) and isinstance(gdn.layers[3].self_attn.q_norm, ZeroCenteredRMSNorm)
    assert gdn.layers[3].self_attn.output_gate_proj is not None
    mamba = build_model(get_preset("tiny-hybrid-mamba"))          # pattern ME*E-M*E
    layers = mamba.layers
    assert all(isinstance(layer, HybridDecoderLayer) for layer in layers)
    assert isinstance(layers[0].mixer, Mamba2Mixer) and layers[0].mlp is None and layers[0].post_attention_layernorm is None
    assert layers[1].mixer is None and layers[1].self_attn is None and layers[1].input_layernorm is None
    assert [layer.moe_index for layer in layers] == [None, 0, None, 1, None, None, None, 2]
    assert isinstance(layers[4].mlp, Relu2MLP) and isinstance(layers[1].mlp.shared_expert, Relu2MLP)
    assert layers[1].mlp.w13.shape == (8, 32, 64)                  # relu^2 experts: up rows only
    assert not layers[2].self_attn.use_rope and mamba.rotary.cos.shape[0] == 1
    names = {n for n, _ in mamba.named_parameters()}
    assert "layers.0.mixer.A_log" in names and not any(n.startswith("layers.0.self_attn") for n in names)


def test_classic_presets_keep_their_layers():
    model = build_model(get_preset("tiny-moe"))
    assert not model.hybrid and type(model.layers[0]).__name__ == "DecoderLayer"


@pytest.mark.parametrize("attention", ["eager", "kernels"])
@pytest.mark.parametrize("preset", ["tiny-hybrid-gdn", "tiny-hybrid-mamba"])
@pytest.mark.parametrize("mode", ["auto", "recurrent"])
def test_paged_chunks_and_decodes_equal_the_reference(preset, mode, attention):
    """Three sequences through mixed steps (a fresh prompt, continued prefill chunks,
    decodes, padding rows, one sequence idle for a step) give every token the logits and
    routing of the whole-sequence reference. ``kernels``: the CUDA backend's dispatch
    (decode and prefill kernels' torch references on CPU), which reads the metadata row of
    every query row, padding included, as the GPU kernels do."""
    model = build_model(get_preset(preset), seed=3)
    seqs = _sequences(model.config.vocab_size, [19, 16, 9], seed=4)
    backend = TritonBackend() if attention == "kernels" else EagerBackend()
    run = PagedSteps(model, seqs, block_size=4, mode=mode, attention=backend)
    ref = [model.forward_reference(torch.tensor(s)) for s in seqs]
    plan = [
        ([Chunk(0, 0, 7), Chunk(1, 0, 13)], 3),                 # fresh prompts, 3 padding rows
        ([Chunk(0, 7, 10), Chunk(1, 13, 1), Chunk(2, 0, 4)], 0),  # continued chunk, decode, fresh prompt
        ([Chunk(2, 4, 5)], 2),                                  # 0 and 1 idle: their slots must not move
        ([Chunk(0, 17, 1), Chunk(1, 14, 1)], 5),                # decode-only, padded
        ([Chunk(0, 18, 1), Chunk(1, 15, 1)], 0),
    ]
    for chunks, pad in plan:
        logits, routing = run.step(chunks, pad)
        for ch, lg, rt in zip(chunks, logits, routing):
            want_logits, want_routing = ref[ch.seq]
            torch.testing.assert_close(lg, want_logits[ch.start:ch.start + ch.n], **TOL)
            assert torch.equal(rt.sort(-1).values, want_routing[ch.start:ch.start + ch.n].sort(-1).values)
    assert run.computed == [19, 16, 9]


def test_decode_batch_of_several_sequences_takes_the_batched_step():
    model = build_model(get_preset("tiny-hybrid-mamba"), seed=5)
    seqs = _sequences(model.config.vocab_size, [6, 8, 7], seed=6)
    run = PagedSteps(model, seqs)
    ref = [model.forward_reference(torch.tensor(s))[0] for s in seqs]
    run.step([Chunk(0, 0, 5), Chunk(1, 0, 7), Chunk(2, 0, 6)])
    logits, _ = run.step([Chunk(0, 5, 1), Chunk(1, 7, 1), Chunk(2, 6, 1)], pad=1)   # decode_only
    for s, lg in enumerate(logits):
        torch.testing.assert_close(lg, ref[s][-1:], **TOL)


def test_recurrent_layers_need_the_recurrent_context():
    model = build_model(get_preset("tiny-hybrid-gdn"))
    run = PagedSteps(model, [[3, 4, 5]])
    run.states = {}          # a context without recurrent metadata / states
    with pytest.raises(ValueError, match="needs ForwardContext.recurrent"):
        run.step([Chunk(0, 0, 3)])


def test_reference_forward_replays_forced_routing():
    model = build_model(get_preset("tiny-hybrid-mamba"), seed=7)
    tokens = torch.tensor(_sequences(model.config.vocab_size, [10], seed=8)[0])
    logits, routing = model.forward_reference(tokens)
    forced = torch.roll(routing, 1, dims=-1).flip(0)        # another valid routing per token
    replayed_logits, replayed = model.forward_reference(tokens, forced_routing=forced)
    assert torch.equal(replayed, forced) and not torch.allclose(replayed_logits, logits)
    again, _ = model.forward_reference(tokens, forced_routing=routing)
    torch.testing.assert_close(again, logits, atol=0, rtol=0)


def test_the_engine_keeps_kv_for_attention_layers_only_and_a_state_slot_per_request():
    model = build_model(get_preset("tiny-hybrid-gdn"))
    c = model.config
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=8, block_size=4, max_requests=3, state_checkpoints=5))
    kv = engine.kv_cache
    assert sorted(kv.per_layer) == list(c.attention_layer_indices) and len(c.recurrent_layer_indices) > 0
    assert kv.storage.shape[0] == len(c.attention_layer_indices)
    assert kv.nbytes == KVCache.bytes_per_block(c, 4, torch.float32) * 9
    pool, store = engine._state.state_pool, engine._state.checkpoints
    assert pool.num_slots == 3 and store.capacity == 5
    assert sorted(engine.sequence_cache.layer_states) == list(c.recurrent_layer_indices)


def test_recurrent_modules_keep_no_state_between_calls():
    model = build_model(get_preset("tiny-hybrid-gdn"), seed=9)
    tokens = torch.tensor(_sequences(model.config.vocab_size, [12], seed=10)[0])
    first = model.forward_reference(tokens)[0]
    assert all(not list(m.buffers()) for m in model.modules() if isinstance(m, GatedDeltaNet))
    torch.testing.assert_close(model.forward_reference(tokens)[0], first, atol=0, rtol=0)
