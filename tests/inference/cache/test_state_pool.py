"""StatePool: slot bookkeeping invariants, tensor layout, zeroing, layer views."""

from __future__ import annotations

import random

import pytest
import torch

from inference.errors import NoFreeStateSlotsError
from inference.model.recurrent import GatedDeltaNet, Mamba2Mixer, RecurrentMetadata
from inference.presets import get_preset
from inference.cache.state_pool import StatePool, state_bytes_per_sequence, state_specs


def test_specs_of_the_tiny_hybrids():
    gdn = get_preset("tiny-hybrid-gdn")
    specs = {s.name: s for s in state_specs(gdn, torch.bfloat16)}
    assert set(specs) == {"gated_deltanet.conv", "gated_deltanet.recurrent"}
    assert specs["gated_deltanet.conv"].layers == (0, 1, 2)
    assert specs["gated_deltanet.conv"].shape == (2 * 2 * 16 + 4 * 16, 3)
    assert specs["gated_deltanet.conv"].dtype == torch.bfloat16
    assert specs["gated_deltanet.recurrent"].shape == (4, 16, 16)
    assert specs["gated_deltanet.recurrent"].dtype == torch.float32
    # 3 layers x (conv 128 x 3 bf16 + recurrent 4 x 16 x 16 fp32)
    assert state_bytes_per_sequence(gdn, torch.bfloat16) == 3 * (128 * 3 * 2 + 4 * 16 * 16 * 4)
    mamba = get_preset("tiny-hybrid-mamba")
    specs = {s.name: s for s in state_specs(mamba, torch.float32)}
    assert specs["mamba2.ssm"].layers == (0, 5) and specs["mamba2.ssm"].shape == (4, 16, 16)
    assert specs["mamba2.conv"].shape == (4 * 16 + 2 * 2 * 16, 3)
    assert state_specs(get_preset("tiny-moe"), torch.float32) == []


def test_tensors_have_a_dummy_slot_and_layer_views_alias_them():
    config = get_preset("tiny-hybrid-mamba")
    pool = StatePool.for_model(config, num_slots=5, model_dtype=torch.float32)
    assert pool.tensors["mamba2.ssm"].shape == (2, 6, 4, 16, 16)
    assert pool.dummy_slot == 5
    conv, ssm = pool.layer_states(5)
    ssm[3].fill_(2.0)
    assert torch.all(pool.tensors["mamba2.ssm"][1, 3] == 2.0)
    assert conv.is_contiguous() and ssm.is_contiguous()
    assert pool.nbytes == 6 * pool.bytes_per_slot
    with pytest.raises(KeyError, match="no recurrent state"):
        pool.layer_states(2)


def test_allocate_free_invariants_under_random_traffic():
    pool = StatePool.for_model(get_preset("tiny-hybrid-gdn"), num_slots=6, model_dtype=torch.float32)
    rng = random.Random(0)
    held: dict[int, int] = {}
    handed_out = set()
    for step in range(300):
        if held and (rng.random() < 0.45 or pool.num_free == 0):
            owner = rng.choice(sorted(held))
            assert pool.free(owner) == held.pop(owner)
        else:
            owner = step
            slot = pool.allocate(owner)
            assert slot not in held.values() and slot != pool.dummy_slot
            held[owner] = slot
            handed_out.add(slot)
        pool.check_invariants()
        assert pool.num_used == len(held)
        assert all(pool.slot_of(o) == s and pool.owner_of(s) == o for o, s in held.items())
    assert handed_out == set(range(6))


def test_exhaustion_and_misuse_leave_the_pool_unchanged():
    pool = StatePool.for_model(get_preset("tiny-hybrid-gdn"), num_slots=2, model_dtype=torch.float32)
    pool.allocate("a")
    pool.allocate("b")
    with pytest.raises(NoFreeStateSlotsError):
        pool.allocate("c")
    with pytest.raises(ValueError, match="already holds"):
        pool.allocate("a")
    with pytest.raises(ValueError, match="holds no state slot"):
        pool.free("c")
    pool.check_invariants()
    assert pool.num_free == 0 and pool.slot_of("c") is None
    with pytest.raises(ValueError, match="num_slots"):
        StatePool([], num_slots=0)
    with pytest.raises(ValueError, match="state slot"):
        pool.zero(3)


def test_allocate_zeroes_what_the_previous_owner_left():
    pool = StatePool.for_model(get_preset("tiny-hybrid-gdn"), num_slots=1, model_dtype=torch.float32)
    slot = pool.allocate("a")
    for t in pool.tensors.values():
        t.fill_(5.0)
    pool.free("a")
    assert pool.allocate("b") == slot
    for t in pool.tensors.values():
        assert torch.all(t[:, slot] == 0)
        assert torch.all(t[:, pool.dummy_slot] == 5.0)


@pytest.mark.parametrize("preset", ["tiny-hybrid-gdn", "tiny-hybrid-mamba"])
def test_layers_run_on_pool_views_and_each_request_keeps_its_own_state(preset):
    """Two requests interleaved through one pool give the same outputs as each run alone."""
    config = get_preset(preset)
    torch.manual_seed(0)
    layer_index = config.recurrent_layer_indices[0]
    layer = (GatedDeltaNet(config.hidden_size, config.gated_deltanet) if config.gated_deltanet
             else Mamba2Mixer(config.hidden_size, config.mamba2))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    xs = [torch.randn(9, config.hidden_size), torch.randn(9, config.hidden_size)]

    def alone(x):
        pool = StatePool.for_model(config, 1, torch.float32)
        slot = pool.allocate("r")
        return layer(x, RecurrentMetadata.build([9], [slot], [False]), *pool.layer_states(layer_index))

    pool = StatePool.for_model(config, 3, torch.float32)
    slots = [pool.allocate(i) for i in range(2)]
    with torch.no_grad():
        expected = [alone(x) for x in xs]
        first = layer(torch.cat([xs[0][:4], xs[1][:6]]), RecurrentMetadata.build([4, 6], slots, [False, False]),
                      *pool.layer_states(layer_index))
        second = layer(torch.cat([xs[0][4:], xs[1][6:]]), RecurrentMetadata.build([5, 3], slots, [True, True]),
                       *pool.layer_states(layer_index))
    torch.testing.assert_close(torch.cat([first[:4], second[:5]]), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([first[4:], second[5:]]), expected[1], rtol=1e-5, atol=1e-5)
