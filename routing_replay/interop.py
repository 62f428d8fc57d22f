"""Recorded routing in the layouts RL frameworks read, and other engines' routing as ours.

Ours (``RequestResult.routing``, ``routing.npz``): one array per request,
``[rows, num_moe_layers, topk]`` in ``meta.dtype``, rows = prompt + generated - 1 -
``routing_start`` (row i is token ``routing_start + i``; the last generated token never went
through the model), column j is decoder layer ``meta.moe_layer_indices[j]``, ids in the
router's descending-score order.

| consumer            | layout                          | dense layers | dtype                      |
|---------------------|---------------------------------|--------------|----------------------------|
| ``to_verl``         | MoE-only, or all-layer          | 0            | int16 (int32 > 32767 exp.) |
| ``to_slime``        | all-layer, SGLang ``meta_info`` | 0            | int32, base64, flat        |
| ``to_skyrl``        | all-layer                       | 0            | uint8/int16/int32 by max id|
| ``to_nemo_rl``      | MoE-only (Megatron's own)       | none         | int8/int16/int32 signed    |
| ``from_vllm``       | all-layer in, ours out          | 0 (or -1)    | any integer in             |
| ``from_sglang``     | base64 flat in, ours out        | 0            | int32 (or its stated dtype)|

docs/INTEROP.md has the recipe of each (what to pass where); tests/routing_replay/
test_interop.py checks each output against that consumer's own layout checks.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from routing_replay.outputs import RoutingMeta, expand_to_all_layers
from routing_replay.replay_targets import moe_layer_columns

# Wire dtypes an SGLang server may state in ``meta_info["routed_experts_dtype"]``.
_SGLANG_DTYPES = ("uint8", "uint16", "int16", "int32")


def _int16_or_int32(num_experts: int) -> np.dtype:
    return np.dtype(np.int16 if num_experts - 1 <= np.iinfo(np.int16).max else np.int32)


def to_verl(routing: np.ndarray, meta: RoutingMeta, *, all_layers: bool = False) -> np.ndarray:
    """verl's ``TokenOutput.routed_experts`` (R3): ``[rows, layers, topk]`` int16 (int32 for
    more than 32767 experts: torch has few kernels for uint16, and verl pads and packs these
    with torch ops).

    MoE-only by default: verl then gives MoE router i column i. ``all_layers=True`` gives
    ``[rows, num_layers, topk]`` with dense layers 0 (vLLM's layout): verl then indexes by
    each router's global ``layer_number - 1``. verl zero-pads rows past ``rows`` itself, so
    the missing last row needs nothing here."""
    meta.check_array("routing", routing)
    out = expand_to_all_layers(routing, meta, fill=0) if all_layers else routing
    return out.astype(_int16_or_int32(meta.num_experts))


def to_slime(routing: np.ndarray, meta: RoutingMeta, routing_start: int = 0) -> dict[str, Any]:
    """The ``meta_info`` entries slime's ``Sample`` reads from an SGLang response:
    ``routed_experts`` (base64 of the flat row-major int32 all-layer array, dense layers 0)
    and ``routed_experts_start_len`` (our ``routing_start``). slime reshapes it to
    ``[len(tokens) - 1 - start_len, num_layers, topk]`` and, when start_len > 0, appends it
    to the first start_len rows it already holds (multi-turn: ask the engine for
    ``routing_start = rows already held``)."""
    if isinstance(routing_start, bool) or not isinstance(routing_start, int) or routing_start < 0:
        raise ValueError(f"routing_start must be an int >= 0, got {routing_start!r}")
    flat = np.ascontiguousarray(expand_to_all_layers(routing, meta, fill=0), dtype=np.int32)
    return {"routed_experts": base64.b64encode(flat.tobytes()).decode("ascii"),
            "routed_experts_start_len": routing_start}


def skyrl_dtype(routing: np.ndarray) -> np.dtype:
    """SkyRL's canonical dtype for one array, chosen by its largest id (not the expert count):
    uint8 below 2**8, int16 below 2**15, else int32."""
    largest = int(routing.max(initial=0))
    return np.dtype(np.uint8 if largest < 2**8 else np.int16 if largest < 2**15 else np.int32)


def to_skyrl(routing: np.ndarray, meta: RoutingMeta, *, packed: bool = False) -> np.ndarray | dict[str, Any]:
    """SkyRL's ``rollout_expert_indices`` entry: a numpy ``[rows, num_layers, topk]`` array,
    dense layers 0 (SkyRL refuses negative ids), in SkyRL's canonical dtype (``skyrl_dtype``).
    SkyRL indexes all-layer data by each router's ``layer_number - 1`` when the model has
    dense layers. ``packed=True`` gives its HTTP wire form ``{"data": base64, "shape",
    "dtype"}`` (``/skyrl/v1/generate`` choices' ``routed_experts``)."""
    full = expand_to_all_layers(routing, meta, fill=0)
    out = np.ascontiguousarray(full, dtype=skyrl_dtype(full))
    if not packed:
        return out
    return {"data": base64.b64encode(out.tobytes()).decode("ascii"), "shape": list(out.shape),
            "dtype": out.dtype.name}


def nemo_rl_dtype(num_experts: int) -> np.dtype:
    """NeMo-RL's carry dtype: the narrowest signed type holding every id and its -1 sentinel."""
    if num_experts - 1 <= np.iinfo(np.int8).max:
        return np.dtype(np.int8)
    return _int16_or_int32(num_experts)


def to_nemo_rl(routing: np.ndarray, meta: RoutingMeta) -> np.ndarray:
    """NeMo-RL's ``routed_experts`` for Megatron replay: MoE-only ``[rows, num_moe_layers,
    topk]`` (our layout; NeMo-RL gives Megatron MoE layer j column j) in ``nemo_rl_dtype``.
    NeMo-RL expects ``len(tokens) - 1`` rows, exactly what the engine returns."""
    meta.check_array("routing", routing)
    return routing.astype(nemo_rl_dtype(meta.num_experts))


def _as_ours(routing: Any, meta: RoutingMeta, source: str) -> np.ndarray:
    """An all-layer or MoE-only array of another engine -> ours, checked against ``meta``."""
    if isinstance(routing, torch.Tensor):
        routing = routing.detach().cpu().numpy()
    r = np.asarray(routing)
    if not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"{source} routing must hold integers, got dtype {r.dtype}")
    if r.ndim != 3 or r.shape[1] not in (meta.num_layers, meta.num_moe_layers) or r.shape[2] != meta.topk:
        raise ValueError(f"{source} routing has shape {r.shape}, expected [rows, {meta.num_layers} (all layers) or "
                         f"{meta.num_moe_layers} (MoE layers), {meta.topk}]")
    ours = moe_layer_columns(r, meta.moe_layer_indices)
    if ours.size and ours.max() >= meta.num_experts:
        raise ValueError(f"{source} routing holds expert id {int(ours.max())}; the model has {meta.num_experts}")
    return ours.astype(meta.dtype)


def from_vllm(routed_experts: Any, meta: RoutingMeta, prompt_routed_experts: Any = None) -> np.ndarray:
    """vLLM's ``CompletionOutput.routed_experts`` (``[num_tokens - 1, num_hidden_layers,
    topk]``, dense layers 0, uint8/uint16/int32 by version) -> ours (MoE-only, ``meta.dtype``),
    ready for ``replay_targets`` or ``save_routing``. vLLM versions that return the prompt's
    rows apart (``RequestOutput.prompt_routed_experts``) are joined prompt first."""
    if prompt_routed_experts is not None:
        parts = [p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
                 for p in (prompt_routed_experts, routed_experts)]
        routed_experts = np.concatenate(parts, axis=0)
    return _as_ours(routed_experts, meta, "vLLM")


def from_sglang(meta_info: Mapping[str, Any], meta: RoutingMeta) -> tuple[np.ndarray, int]:
    """SGLang's response ``meta_info`` -> (ours, routing_start). ``routed_experts`` is base64
    of a flat row-major ``[rows, num_hidden_layers, topk]`` array (int32 unless the server
    states ``routed_experts_dtype``), dense layers 0; ``routed_experts_start_len`` is the
    first token it covers (our ``routing_start``)."""
    payload = meta_info.get("routed_experts")
    if not isinstance(payload, str):
        raise ValueError("SGLang meta_info has no base64 'routed_experts' (request with return_routed_experts=True)")
    dtype_name = meta_info.get("routed_experts_dtype") or "int32"
    if dtype_name not in _SGLANG_DTYPES:
        raise ValueError(f"SGLang routed_experts_dtype {dtype_name!r} is not one of {_SGLANG_DTYPES}")
    flat = np.frombuffer(base64.b64decode(payload, validate=True), dtype=dtype_name)
    per_row = meta.num_layers * meta.topk
    if flat.size % per_row:
        raise ValueError(f"SGLang routed_experts has {flat.size} ids, not a multiple of num_layers * topk = "
                         f"{meta.num_layers} * {meta.topk}")
    start = meta_info.get("routed_experts_start_len") or 0
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"SGLang routed_experts_start_len must be an int >= 0, got {start!r}")
    return _as_ours(flat.reshape(-1, meta.num_layers, meta.topk), meta, "SGLang"), start
