"""Our routing in the layouts RL frameworks read, and vLLM / SGLang routing as ours.

Each consumer's checks are re-implemented here from its source (file paths in the
docstrings; snapshots of 2026), never imported: the test asserts that what our helpers
produce from real engine rollouts passes those checks and reaches every MoE router as the
routing the engine recorded."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.presets import build_model, get_preset
from inference.request import SamplingParams
from routing_replay import RoutingMeta, expand_to_all_layers
from routing_replay.interop import (from_sglang, from_vllm, nemo_rl_dtype, skyrl_dtype, to_nemo_rl, to_skyrl,
                                    to_slime, to_verl)
from routing_replay.replay_targets import packed_targets, padded_targets

PROMPTS = [[5, 9, 13, 17, 21], [40, 41], [100, 7, 7, 8, 300, 301, 2, 3, 4]]


@pytest.fixture(scope="module")
def engine():
    model = build_model(get_preset("tiny-moe"), seed=0)          # layer 0 dense, MoE layers 1..3
    return LLMEngine(model, EngineConfig(record_routing=True, block_size=4, num_kv_blocks=64, max_step_tokens=32))


@pytest.fixture(scope="module")
def meta(engine):
    c = engine.model_config
    return RoutingMeta(moe_layer_indices=list(c.moe_layer_indices), num_layers=c.num_layers,
                       num_experts=c.num_experts, topk=c.topk, block_size=4, dtype="uint8")


@pytest.fixture(scope="module")
def rollouts(engine):
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=i, ignore_eos=True) for i in range(len(PROMPTS))]
    results = engine.generate(PROMPTS, params)
    assert all(r.routing.shape[0] == len(r.prompt_token_ids) + len(r.output_token_ids) - 1 for r in results)
    return results


def _tokens(result) -> list[int]:
    return result.prompt_token_ids + result.output_token_ids


def _router_layer_numbers(meta: RoutingMeta) -> list[int]:
    return [i + 1 for i in meta.moe_layer_indices]     # megatron's 1-based TransformerLayer.layer_number


# ---- verl -------------------------------------------------------------------------------
def verl_router_targets(outputs, prompts, responses, num_layers, router_layer_numbers):
    """What verl hands each Megatron router, per sample (valid tokens only).

    verl/experimental/agent_loop/agent_loop.py: ``routed_experts`` must be a numpy array or a
    torch tensor ``[length, layer_num, topk]`` (TypeError otherwise); it is written into a
    zero ``[1, total_length, layer_num, topk]`` tensor at the prompt's left-padding offset
    (``start_pos < 0`` raises; rows past total_length are cut).
    verl/utils/megatron/router_replay_utils.py ``set_router_replay_data``: padding is removed
    with the attention mask; data with ``tf_config.num_layers`` layers is indexed by
    ``router.layer_number - 1``, any other layer count by the router's position i (+ the
    pipeline offset, 0 here); an index outside the data raises; targets become int64.
    """
    max_prompt, max_response = max(map(len, prompts)), max(map(len, responses))
    total = max_prompt + max_response
    per_sample = []
    for out, p, r in zip(outputs, prompts, responses):
        if not isinstance(out, (np.ndarray, torch.Tensor)):
            raise TypeError(f"Unsupported type for routed_experts: {type(out)}")
        length, layer_num, topk = out.shape
        experts = torch.from_numpy(out) if isinstance(out, np.ndarray) else out
        padded = torch.zeros(1, total, layer_num, topk, dtype=experts.dtype)
        start = max_prompt - len(p)
        if start < 0:
            raise ValueError("Invalid position range")
        end = min(start + length, total)
        padded[:, start:end] = experts[:end - start].unsqueeze(0)
        mask = torch.zeros(total, dtype=torch.bool)
        mask[start:max_prompt + len(r)] = True
        valid = padded[0][mask]                                     # [tokens, layers, topk]
        use_global = layer_num == num_layers
        targets = []
        for i, layer_number in enumerate(router_layer_numbers):
            idx = layer_number - 1 if use_global else i
            if not 0 <= idx < layer_num:
                raise ValueError(f"router replay layer index {idx} out of range for data with {layer_num} layers")
            targets.append(valid[:, idx].to(torch.int64))
        per_sample.append(targets)
    return per_sample


@pytest.mark.parametrize("all_layers", [False, True], ids=["moe-only", "all-layer"])
def test_verl_routes_every_moe_layer_as_recorded(rollouts, meta, all_layers):
    outputs = [to_verl(r.routing, meta, all_layers=all_layers) for r in rollouts]
    assert all(o.dtype == np.int16 for o in outputs)
    assert outputs[0].shape[1] == (meta.num_layers if all_layers else meta.num_moe_layers)
    got = verl_router_targets(outputs, [r.prompt_token_ids for r in rollouts], [r.output_token_ids for r in rollouts],
                              meta.num_layers, _router_layer_numbers(meta))
    for r, targets in zip(rollouts, got):
        assert len(targets) == meta.num_moe_layers
        for j, t in enumerate(targets):
            np.testing.assert_array_equal(t[:-1].numpy(), r.routing[:, j])
            assert (t[-1] == 0).all()      # verl zero-pads the last token's row itself


def test_verl_dtype_for_many_experts():
    meta = RoutingMeta(moe_layer_indices=[0], num_layers=1, num_experts=40000, topk=2, block_size=1, dtype="int32")
    routing = np.array([[[39999, 5]]], dtype=np.int32)
    out = to_verl(routing, meta)
    assert out.dtype == np.int32 and out[0, 0, 0] == 39999


# ---- slime ------------------------------------------------------------------------------
def slime_layer_replays(meta_info, tokens, existing, num_layers, topk, moe_layer_freq):
    """The routing slime's R3 gives each MoE layer's RoutingReplay, and the sample's array.

    slime/utils/misc.py ``decode_int32_meta_array``: a base64 string decodes to int32.
    slime/utils/types.py ``Sample._apply_meta_info``: ``routed_experts_start_len`` >= 0;
    rows = len(tokens) - 1 - start_len; the element count must be rows * num_layers * topk;
    with start_len > 0 the rows extend ``existing[:start_len]`` (which must hold start_len
    rows). slime/observability/rollout_data_utils.py
    ``validate_rollout_routed_experts_for_replay``: 3-D, shape[1:] == (num_layers, topk),
    rows > 0, and (topk > 1) every MoE layer of ``moe_layer_freq`` holds a non-zero id.
    slime/backends/megatron_utils/cp_utils.py ``prepare_routed_experts_for_routing_replay``:
    rows == len(tokens) - 1. slime/backends/megatron_utils/actor.py ``fill_routing_replay``:
    the i-th MoE layer's replay records column ``layer_id`` of the i-th layer with
    moe_layer_freq != 0.
    """
    flat = torch.frombuffer(bytearray(base64.b64decode(meta_info["routed_experts"].encode("ascii"))), dtype=torch.int32)
    start = int(meta_info.get("routed_experts_start_len", 0) or 0)
    if start < 0:
        raise ValueError("routed_experts_start_len must be non-negative")
    rows = max(0, len(tokens) - 1 - start)
    if flat.numel() != rows * num_layers * topk:
        raise ValueError(f"SGLang routed_experts element count does not match sample tokens: got={flat.numel()}")
    experts = flat.reshape(rows, num_layers, topk)
    if start:
        if existing is None or existing.shape[0] < start:
            raise ValueError("Existing routed experts shorter than routed_experts_start_len")
        experts = torch.cat([existing[:start], experts], dim=0)
    if experts.ndim != 3 or tuple(experts.shape[1:]) != (num_layers, topk) or experts.shape[0] == 0:
        raise ValueError(f"Invalid rollout routed-experts shape for R3: {tuple(experts.shape)}")
    moe_layers = [i for i, f in enumerate(moe_layer_freq) if f]
    if topk > 1 and any(not torch.count_nonzero(experts[:, i]) for i in moe_layers):
        raise ValueError("R3 routed-experts capture is all zero for a MoE layer")
    assert experts.shape[0] == len(tokens) - 1
    return experts, [experts[:, i] for i in moe_layers]


def _moe_layer_freq(meta):
    return [1 if i in meta.moe_layer_indices else 0 for i in range(meta.num_layers)]


def test_slime_routes_every_moe_layer_as_recorded(rollouts, meta):
    for r in rollouts:
        meta_info = to_slime(r.routing, meta)
        assert meta_info["routed_experts_start_len"] == 0
        _, layers = slime_layer_replays(meta_info, _tokens(r), None, meta.num_layers, meta.topk, _moe_layer_freq(meta))
        assert len(layers) == meta.num_moe_layers
        for j, replay in enumerate(layers):
            np.testing.assert_array_equal(replay.numpy(), r.routing[:, j])


def test_slime_multi_turn_appends_suffix_routing(engine, rollouts, meta):
    """Turn 2 re-sends turn 1 plus new tokens; the engine returns rows from routing_start =
    rows slime already holds (len(turn 1) - 1), which slime appends after them."""
    first = rollouts[0]
    held, _ = slime_layer_replays(to_slime(first.routing, meta), _tokens(first), None, meta.num_layers, meta.topk,
                                  _moe_layer_freq(meta))
    prompt2 = _tokens(first) + [60, 61, 62]
    start = held.shape[0]
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=7, ignore_eos=True)
    suffix, whole = engine.generate([prompt2, prompt2], [params, params], routing_starts=[start, 0])
    assert suffix.output_token_ids == whole.output_token_ids
    assert suffix.routing.shape[0] == whole.routing.shape[0] - start
    meta_info = to_slime(suffix.routing, meta, routing_start=suffix.routing_start)
    assert meta_info["routed_experts_start_len"] == start
    experts, layers = slime_layer_replays(meta_info, _tokens(suffix), held, meta.num_layers, meta.topk,
                                          _moe_layer_freq(meta))
    np.testing.assert_array_equal(experts.numpy(), expand_to_all_layers(whole.routing, meta, fill=0))
    with pytest.raises(ValueError, match="element count"):     # the start must travel with the rows
        slime_layer_replays(to_slime(suffix.routing, meta), _tokens(suffix), held, meta.num_layers, meta.topk,
                            _moe_layer_freq(meta))


# ---- SkyRL ------------------------------------------------------------------------------
def skyrl_compact(indices):
    """skyrl/backends/skyrl_train/utils/routed_experts.py ``compact_routed_expert_indices``:
    a NumPy array, 3-D integer, no negative id; cast to uint8 (max < 2**8), int16 (< 2**15)
    or int32."""
    if not isinstance(indices, np.ndarray):
        raise TypeError("routed expert indices must be a NumPy array")
    if indices.ndim != 3 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError("routed expert indices must be an integer [tokens, layers, topk] array")
    if int(indices.min(initial=0)) < 0:
        raise ValueError("routed expert indices must be non-negative")
    largest = int(indices.max(initial=0))
    dtype = np.uint8 if largest < 2**8 else np.int16 if largest < 2**15 else np.int32
    return np.asarray(indices, dtype=dtype, order="C")


def skyrl_decode_packed(payload):
    """skyrl/backends/skyrl_train/inference_servers/generate_wire.py
    ``decode_packed_routed_experts``: base64 of exactly prod(shape) * itemsize bytes, a 3-D
    shape, and the dtype must be the canonical one of the decoded array."""
    dtype = np.dtype(payload["dtype"])
    shape = tuple(payload["shape"])
    data = base64.b64decode(payload["data"], validate=True)
    if len(shape) != 3 or len(data) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError("invalid packed routed_experts payload")
    decoded = np.frombuffer(data, dtype=dtype).reshape(shape)
    compact = skyrl_compact(decoded)
    if compact.dtype != dtype:
        raise ValueError("packed routed_experts uses non-canonical dtype")
    return compact


def skyrl_router_targets(arrays, total_lens, model_num_layers, router_layer_numbers):
    """What SkyRL's Megatron replay gives each router, per trajectory.

    skyrl/train/dataset/preprocess.py: one NumPy array per trajectory, compacted; all share
    [layers, topk]; 0 < rows <= prompt + response; left-padded into [batch, max_total, ...].
    skyrl/backends/skyrl_train/utils/replay_utils.py ``_get_local_router_layer_indices``:
    as many routers as layers -> router i takes layer i; otherwise (dense layers) router
    takes ``layer_number - 1``, which must be inside the data's layers.
    """
    canonical = [skyrl_compact(a) for a in arrays]
    layers, topk = canonical[0].shape[1:]
    max_total = max(total_lens)
    padded = np.zeros((len(arrays), max_total, layers, topk), dtype=max((c.dtype for c in canonical),
                                                                         key=lambda d: d.itemsize))
    for b, (c, n) in enumerate(zip(canonical, total_lens)):
        if c.shape[1:] != (layers, topk):
            raise ValueError("rollout_expert_indices entries must share [layers, topk]")
        if c.shape[0] == 0 or c.shape[0] > n:
            raise ValueError(f"Trajectory {b} has {c.shape[0]} route rows for {n} tokens")
        padded[b, max_total - n:max_total - n + c.shape[0]] = c
    if model_num_layers == len(router_layer_numbers):
        indices = list(range(model_num_layers))
    else:
        indices = [n - 1 for n in router_layer_numbers]
    if any(i < 0 or i >= layers for i in indices):
        raise ValueError(f"Router replay layer indices {indices} out of range for data with {layers} layers")
    return [[padded[b, max_total - n:, i] for i in indices] for b, n in enumerate(total_lens)]


def test_skyrl_routes_every_moe_layer_as_recorded(rollouts, meta):
    arrays = [to_skyrl(r.routing, meta) for r in rollouts]
    assert all(a.dtype == np.uint8 and a.shape[1] == meta.num_layers for a in arrays)
    packed = [to_skyrl(r.routing, meta, packed=True) for r in rollouts]
    assert all(np.array_equal(skyrl_decode_packed(p), a) for p, a in zip(packed, arrays))
    got = skyrl_router_targets(arrays, [len(_tokens(r)) for r in rollouts], meta.num_layers,
                               _router_layer_numbers(meta))
    for r, targets in zip(rollouts, got):
        for j, t in enumerate(targets):
            np.testing.assert_array_equal(t[:-1], r.routing[:, j])


def test_skyrl_refuses_the_layouts_it_cannot_read(rollouts, meta):
    r = rollouts[0]
    with pytest.raises(ValueError, match="non-negative"):          # our default all-layer (-1)
        skyrl_router_targets([expand_to_all_layers(r.routing, meta)], [len(_tokens(r))], meta.num_layers,
                             _router_layer_numbers(meta))
    with pytest.raises(ValueError, match="out of range"):          # MoE-only with a dense layer
        skyrl_router_targets([r.routing], [len(_tokens(r))], meta.num_layers, _router_layer_numbers(meta))


def test_skyrl_dtype_follows_the_largest_id_not_the_expert_count():
    meta = RoutingMeta(moe_layer_indices=[1], num_layers=2, num_experts=300, topk=2, block_size=1, dtype="int16")
    small, large = np.array([[[3, 200]]], dtype=np.int16), np.array([[[3, 299]]], dtype=np.int16)
    assert skyrl_dtype(small) == np.uint8 and to_skyrl(small, meta).dtype == np.uint8
    assert to_skyrl(large, meta).dtype == np.int16
    assert skyrl_decode_packed(to_skyrl(large, meta, packed=True))[0, 1, 1] == 299


# ---- NeMo-RL / Megatron -----------------------------------------------------------------
def nemo_rl_router_targets(routed, valid_length, num_experts, model_num_layers, router_layer_numbers):
    """What NeMo-RL installs in each Megatron router for one sample.

    nemo_rl/models/generation/interfaces.py ``resolve_routed_experts_dtype`` and
    nemo_rl/models/generation/vllm/utils.py ``_as_routed_experts_tensor``: ids must fit the
    narrowest signed dtype holding num_experts - 1 (and -1). ``pad_and_align_routed_expert_indices``:
    3-D; valid_length - 1 routes expected, at most one surplus; rows past the routes get
    ``arange(topk)``, missing routes the all -1 sentinel (fallback to the live router).
    nemo_rl/models/megatron/router_replay.py ``_payload_indices_for_moe_layers``: as many
    layers as MoE layers -> MoE layer j takes column j; all layers -> ``layer_number - 1``;
    else raise. ``_validate_replay_tensor``: a row is all -1 or non-negative, holds no
    repeated id, and ids are < num_moe_experts.
    """
    dtype = torch.int8 if num_experts - 1 <= 127 else torch.int16 if num_experts - 1 <= 32767 else torch.int32
    routed = torch.as_tensor(routed)
    if routed.numel() and int(routed.max()) > torch.iinfo(dtype).max:
        raise ValueError("routed expert id exceeds the resolved carry dtype")
    routed = routed.to(dtype)
    if routed.dim() != 3:
        raise ValueError("vLLM routed_experts must have shape [tokens, num_moe_layers, topk]")
    expected = max(valid_length - 1, 0)
    if routed.shape[0] > expected + 1:
        raise ValueError("too many routed_experts routes for router replay")
    full = torch.arange(routed.shape[2], dtype=dtype).view(1, 1, -1).expand(valid_length, routed.shape[1], -1).clone()
    copied = min(expected, routed.shape[0])
    full[:copied] = routed[:copied]
    full[copied:expected] = -1
    layers = routed.shape[1]
    if layers == len(router_layer_numbers):
        payload = list(range(layers))
    elif layers == model_num_layers:
        payload = [n - 1 for n in router_layer_numbers]
    else:
        raise ValueError("routed_experts layer axis does not match a supported payload layout")
    out = []
    for idx in payload:
        t = full[:, idx]
        missing = t.eq(-1).all(-1)
        if (t.lt(0).any(-1) & ~missing).any():
            raise ValueError("routed_experts fallback rows must use the all--1 sentinel")
        kept = t[~missing].sort(-1).values
        if (kept[..., 1:] == kept[..., :-1]).any():
            raise ValueError("routed_experts contains duplicate expert ids within a token's top-k")
        if kept.numel() and (kept.min() < 0 or kept.max() >= num_experts):
            raise ValueError("routed_experts contains expert ids outside Megatron's expert range")
        out.append(t)
    return out


def test_nemo_rl_routes_every_moe_layer_as_recorded(rollouts, meta):
    for r in rollouts:
        routed = to_nemo_rl(r.routing, meta)
        assert routed.dtype == np.int8 and routed.shape == r.routing.shape
        targets = nemo_rl_router_targets(routed, len(_tokens(r)), meta.num_experts, meta.num_layers,
                                         _router_layer_numbers(meta))
        assert len(targets) == meta.num_moe_layers
        for j, t in enumerate(targets):
            np.testing.assert_array_equal(t[:-1].numpy(), r.routing[:, j])
        # the -1 expansion is the all-layer layout NeMo-RL also reads (dense layers never are)
        all_layer = nemo_rl_router_targets(expand_to_all_layers(r.routing, meta), len(_tokens(r)), meta.num_experts,
                                           meta.num_layers, _router_layer_numbers(meta))
        assert all(torch.equal(a, b) for a, b in zip(all_layer, targets))


def test_nemo_rl_dtypes():
    assert [nemo_rl_dtype(n) for n in (8, 128, 129, 32768, 32769)] == [np.int8, np.int8, np.int16, np.int16, np.int32]


# ---- vLLM and SGLang outputs as inputs to our replay ---------------------------------------
def vllm_routed_experts(routing, meta):
    """vLLM's layout of the same routing (vllm/model_executor/layers/fused_moe/
    routed_experts_capturer.py, RoutedExpertsManager): a zeroed [num_tokens - 1,
    num_hidden_layers, topk] buffer, uint8 for <= 256 experts else uint16, where each MoE
    layer's ``capture(layer_id, topk_ids)`` writes column layer_id (the global index)."""
    dtype = np.uint8 if meta.num_experts <= 256 else np.uint16
    out = np.zeros((routing.shape[0], meta.num_layers, meta.topk), dtype=dtype)
    for j, layer_id in enumerate(meta.moe_layer_indices):
        out[:, layer_id] = routing[:, j]
    return out


def sglang_meta_info(routing, meta, start=0, dtype=None):
    """SGLang's response: its host cache is a zeroed int32 [tokens, num_hidden_layers, topk]
    buffer written per layer_id; rows [start_len, seqlen - 1) go out as base64 of the flat
    bytes (python/sglang/srt/layers/moe/routed_experts_capturer.py; newer servers may send
    another ``routed_experts_dtype``)."""
    full = np.zeros((routing.shape[0], meta.num_layers, meta.topk), dtype=dtype or np.int32)
    full[:, meta.moe_layer_indices] = routing
    info = {"routed_experts": base64.b64encode(full.tobytes()).decode("utf-8"), "routed_experts_start_len": start}
    if dtype is not None:
        info["routed_experts_dtype"] = np.dtype(dtype).name
    return info


def test_vllm_and_sglang_routing_gives_our_targets(rollouts, meta):
    ours = [r.routing for r in rollouts]
    vllm = [vllm_routed_experts(r, meta) for r in ours]
    for a, b in zip(ours, vllm):
        np.testing.assert_array_equal(from_vllm(b, meta), a)
        assert from_vllm(b, meta).dtype == a.dtype
        split = a.shape[0] // 2
        np.testing.assert_array_equal(from_vllm(torch.from_numpy(b[split:]), meta, prompt_routed_experts=b[:split]), a)
        for dtype in (None, np.uint8):
            got, start = from_sglang(sglang_meta_info(a, meta, dtype=dtype), meta)
            np.testing.assert_array_equal(got, a)
            assert start == 0
    got, start = from_sglang(sglang_meta_info(ours[0][3:], meta, start=3), meta)
    assert start == 3 and np.array_equal(got, ours[0][3:])
    seq = max(r.shape[0] for r in ours) + 1
    indices = meta.moe_layer_indices
    np.testing.assert_array_equal(packed_targets(vllm, moe_layer_indices=indices), packed_targets(ours))
    np.testing.assert_array_equal(padded_targets(vllm, seq, moe_layer_indices=indices), padded_targets(ours, seq))


def test_vllm_and_sglang_inputs_that_do_not_match_the_model_are_refused(rollouts, meta):
    a = rollouts[0].routing
    vllm = vllm_routed_experts(a, meta)
    with pytest.raises(ValueError, match="expected \\[rows, 4 \\(all layers\\) or 3"):
        from_vllm(vllm[:, :2], meta)
    wrong = vllm.copy()
    wrong[:, 0] = 1                                       # the "dense" layer routes: wrong model or indices
    with pytest.raises(ValueError, match="one fill value"):
        from_vllm(wrong, meta)
    too_big = vllm.copy()
    too_big[0, 1, 0] = meta.num_experts
    with pytest.raises(ValueError, match="expert id 8"):
        from_vllm(too_big, meta)
    info = sglang_meta_info(a, meta)
    with pytest.raises(ValueError, match="not a multiple"):
        from_sglang({**info, "routed_experts": base64.b64encode(b"\0" * 12).decode()}, meta)
    with pytest.raises(ValueError, match="routed_experts_dtype"):
        from_sglang({**info, "routed_experts_dtype": "float32"}, meta)
    with pytest.raises(ValueError, match="return_routed_experts"):
        from_sglang({}, meta)


def test_zero_filled_all_layer_array_without_indices_is_refused_by_the_replay():
    transformers = pytest.importorskip("transformers")
    from routing_replay.hf import HFReplayError, replay_routing
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                         num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=8, intermediate_size=16, mlp_only_layers=[0])
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    meta = RoutingMeta(moe_layer_indices=[1, 2], num_layers=3, num_experts=4, topk=2, block_size=1, dtype="uint8")
    recorded = np.array([[[0, 1], [2, 3]], [[3, 2], [1, 0]], [[1, 3], [0, 2]]], dtype=np.uint8)   # 4 tokens
    vllm = vllm_routed_experts(recorded, meta)
    with pytest.raises(HFReplayError, match="3 target layers for 2 MoE layers.*moe_layer_indices"):
        with replay_routing(model, padded_targets([vllm], 4, order="bs")):
            pass
    seen = []
    hooks = [blk.experts.register_forward_pre_hook(lambda mod, args: seen.append(args[1].sort(-1).values))
             for blk in model.modules() if hasattr(blk, "gate") and hasattr(blk, "experts")]
    with replay_routing(model, padded_targets([vllm], 4, order="bs", moe_layer_indices=[1, 2])), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    for j, ids in enumerate(seen):
        np.testing.assert_array_equal(ids[:3].numpy(), np.sort(recorded[:, j].astype(np.int64), -1))
