"""Hugging Face MoE architectures: config.json -> ModelConfig, and where each of our
parameters comes from in the checkpoint.

Supported ``model_type`` values: mixtral, qwen2_moe, qwen3_moe, olmoe. The defaults used for
keys a config.json leaves out are those of the transformers configuration classes.
DeepSeek-V2/V3 use multi-head latent attention, which this engine does not implement, so
they are refused with that reason rather than loaded wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference.config import ModelConfig, RouterConfig

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
_REFUSED = {
    "deepseek_v2": "multi-head latent attention (MLA) is not implemented by this engine",
    "deepseek_v3": "multi-head latent attention (MLA) is not implemented by this engine",
}
# Checkpoint tensors that hold nothing the model needs (recomputed at load time).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFCheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message lists every problem found, one per line."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{where}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class HFArchitecture:
    """Naming of one checkpoint family. Invariant: ``expert_names`` is (gate, up, down) as
    written per expert in the classic layout; ``moe_prefixes`` lists the module names a MoE
    block may be saved under, classic first (transformers 5 fused saves use ``mlp``)."""

    model_type: str
    moe_prefixes: tuple[str, ...]
    expert_names: tuple[str, str, str]


_ARCHS = {
    "mixtral": HFArchitecture("mixtral", ("block_sparse_moe", "mlp"), ("w1", "w3", "w2")),
    "qwen2_moe": HFArchitecture("qwen2_moe", ("mlp",), ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": HFArchitecture("qwen3_moe", ("mlp",), ("gate_proj", "up_proj", "down_proj")),
    "olmoe": HFArchitecture("olmoe", ("mlp",), ("gate_proj", "up_proj", "down_proj")),
}


@dataclass(frozen=True)
class TensorRecipe:
    """One parameter of ours built from checkpoint tensors. Invariant: ``sources`` is not
    empty and pairs each checkpoint name with the shape it must have. ``combine``: "cat"
    (concatenate along dim 0; one source = copy), "stack" (one source per expert), or
    "stack_pairs" (per expert: cat(gate, up) along dim 0, then stack)."""

    target: str
    sources: tuple[tuple[str, tuple[int, ...]], ...]
    combine: str = "cat"


def _get(raw: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    return default


def _rope_theta(raw: dict[str, Any], problems: list[str]) -> float:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling")
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type not in (None, "default"):
        problems.append(f"rope scaling type {rope_type!r} is not supported (only default rotary)")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _eos(raw: dict[str, Any], vocab_size: int) -> int | None:
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) and 0 <= eos < vocab_size else None


def _max_positions(raw: dict[str, Any], model_type: str) -> int:
    """A sliding window wider than every sequence is plain causal attention, so capping the
    context at the window keeps the model exact without a windowed kernel."""
    limit = int(_get(raw, "max_position_embeddings", default=4096))
    window = raw.get("sliding_window")
    windowed = raw.get("use_sliding_window", model_type == "mixtral")
    if windowed and isinstance(window, int) and window > 0:
        limit = min(limit, window)
    return limit


def _moe_layers(raw: dict[str, Any], model_type: str, num_layers: int) -> tuple[int, ...]:
    """HF rule (Qwen2/3-MoE): layer i is sparse unless listed in mlp_only_layers, when
    (i + 1) % decoder_sparse_step == 0. Mixtral and OLMoE have no dense layers."""
    if model_type in ("mixtral", "olmoe"):
        return tuple(range(num_layers))
    step = int(_get(raw, "decoder_sparse_step", default=1))
    only_mlp = set(_get(raw, "mlp_only_layers", default=[]))
    return tuple(i for i in range(num_layers) if i not in only_mlp and step > 0 and (i + 1) % step == 0)


def parse_hf_config(raw: dict[str, Any], where: str = "config.json") -> tuple[ModelConfig, HFArchitecture]:
    """Our ModelConfig for a transformers config.json dict; raises HFCheckpointError listing
    every unsupported setting."""
    model_type = raw.get("model_type")
    if model_type in _REFUSED:
        raise HFCheckpointError(where, [f"architecture {model_type!r} is not supported: {_REFUSED[model_type]}"])
    if model_type not in _ARCHS:
        raise HFCheckpointError(where, [f"unsupported architecture {model_type!r} (model_type); "
                                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"])
    problems: list[str] = []
    if _get(raw, "hidden_act", default="silu") != "silu":
        problems.append(f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    if model_type == "olmoe" and raw.get("clip_qkv") is not None:
        problems.append("olmoe clip_qkv is not supported")
    theta = _rope_theta(raw, problems)
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    num_layers = int(raw["num_hidden_layers"])
    num_experts = int(_get(raw, "num_local_experts", "num_experts", default=0))
    moe_layers = _moe_layers(raw, model_type, num_layers) if num_experts > 0 else ()
    if not moe_layers:
        problems.append("the config has no MoE layer (num_experts, decoder_sparse_step, mlp_only_layers)")
    if problems:
        raise HFCheckpointError(where, problems)
    expert_width = int(raw["intermediate_size"] if model_type in ("mixtral", "olmoe") else raw["moe_intermediate_size"])
    shared = int(raw.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
    vocab = int(raw["vocab_size"])
    config = ModelConfig(
        name=str(raw.get("_name_or_path") or model_type), vocab_size=vocab, hidden_size=hidden,
        num_layers=num_layers, num_heads=heads, num_kv_heads=int(_get(raw, "num_key_value_heads", default=heads)),
        head_dim=int(_get(raw, "head_dim", default=hidden // heads)),
        intermediate_size=int(raw["intermediate_size"]), moe_intermediate_size=expert_width,
        num_experts=num_experts, topk=int(raw["num_experts_per_tok"]),
        dense_layers=tuple(i for i in range(num_layers) if i not in moe_layers),
        shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0,
        router=RouterConfig(norm_topk_prob=model_type == "mixtral" or bool(raw.get("norm_topk_prob", False))),
        rope_theta=theta, rms_norm_eps=float(_get(raw, "rms_norm_eps", default=1e-6)),
        max_position_embeddings=_max_positions(raw, model_type),
        qk_norm={"qwen3_moe": "per_head", "olmoe": "full"}.get(model_type, "none"),
        attention_bias=bool(raw.get("qkv_bias", True)) if model_type == "qwen2_moe" else bool(raw.get("attention_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), eos_token_id=_eos(raw, vocab))
    return config, _ARCHS[model_type]


def attention_recipes(config: ModelConfig, i: int) -> list[TensorRecipe]:
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    p = f"model.layers.{i}.self_attn"
    recipes = [
        TensorRecipe(f"layers.{i}.self_attn.qkv_proj.weight",
                     ((f"{p}.q_proj.weight", (q, h)), (f"{p}.k_proj.weight", (kv, h)), (f"{p}.v_proj.weight", (kv, h)))),
        TensorRecipe(f"layers.{i}.self_attn.o_proj.weight", ((f"{p}.o_proj.weight", (h, q)),)),
        TensorRecipe(f"layers.{i}.input_layernorm.weight", ((f"model.layers.{i}.input_layernorm.weight", (h,)),)),
        TensorRecipe(f"layers.{i}.post_attention_layernorm.weight",
                     ((f"model.layers.{i}.post_attention_layernorm.weight", (h,)),)),
    ]
    if config.attention_bias:
        recipes.append(TensorRecipe(f"layers.{i}.self_attn.qkv_proj.bias",
                                    ((f"{p}.q_proj.bias", (q,)), (f"{p}.k_proj.bias", (kv,)), (f"{p}.v_proj.bias", (kv,)))))
    if config.qk_norm != "none":
        qn, kn = (d, d) if config.qk_norm == "per_head" else (q, kv)
        recipes += [TensorRecipe(f"layers.{i}.self_attn.q_norm.weight", ((f"{p}.q_norm.weight", (qn,)),)),
                    TensorRecipe(f"layers.{i}.self_attn.k_norm.weight", ((f"{p}.k_norm.weight", (kn,)),))]
    return recipes


def _swiglu(target: str, prefix: str, hidden: int, width: int) -> list[TensorRecipe]:
    return [TensorRecipe(f"{target}.gate_up_proj.weight",
                         ((f"{prefix}.gate_proj.weight", (width, hidden)), (f"{prefix}.up_proj.weight", (width, hidden)))),
            TensorRecipe(f"{target}.down_proj.weight", ((f"{prefix}.down_proj.weight", (hidden, width)),))]


def moe_prefix(arch: HFArchitecture, names: set[str], i: int) -> str:
    """The module name layer i's MoE block was saved under (the first whose router exists)."""
    for prefix in arch.moe_prefixes:
        if f"model.layers.{i}.{prefix}.gate.weight" in names:
            return f"model.layers.{i}.{prefix}"
    return f"model.layers.{i}.{arch.moe_prefixes[0]}"


def mlp_recipes(config: ModelConfig, arch: HFArchitecture, i: int, names: set[str]) -> list[TensorRecipe]:
    """Layer i's MLP: dense SwiGLU, or router + experts (classic per-expert tensors, or the
    fused ``experts.gate_up_proj`` [E, 2I, H] / ``experts.down_proj`` [E, H, I] that
    transformers 5 keeps in memory and writes with ``save_original_format=False``)."""
    h = config.hidden_size
    if i in config.dense_layers:
        return _swiglu(f"layers.{i}.mlp", f"model.layers.{i}.mlp", h, config.intermediate_size)
    e, w = config.num_experts, config.moe_intermediate_size
    p = moe_prefix(arch, names, i)
    recipes = [TensorRecipe(f"layers.{i}.mlp.router.weight", ((f"{p}.gate.weight", (e, h)),))]
    if f"{p}.experts.gate_up_proj" in names:
        recipes += [TensorRecipe(f"layers.{i}.mlp.w13", ((f"{p}.experts.gate_up_proj", (e, 2 * w, h)),)),
                    TensorRecipe(f"layers.{i}.mlp.w2", ((f"{p}.experts.down_proj", (e, h, w)),))]
    else:
        gate, up, down = arch.expert_names
        pairs = tuple(src for x in range(e) for src in ((f"{p}.experts.{x}.{gate}.weight", (w, h)),
                                                         (f"{p}.experts.{x}.{up}.weight", (w, h))))
        recipes += [TensorRecipe(f"layers.{i}.mlp.w13", pairs, "stack_pairs"),
                    TensorRecipe(f"layers.{i}.mlp.w2",
                                 tuple((f"{p}.experts.{x}.{down}.weight", (h, w)) for x in range(e)), "stack")]
    if config.shared_expert_intermediate_size > 0:
        recipes += _swiglu(f"layers.{i}.mlp.shared_expert", f"{p}.shared_expert", h, config.shared_expert_intermediate_size)
        if config.shared_expert_gate:
            recipes.append(TensorRecipe(f"layers.{i}.mlp.shared_expert_gate.weight",
                                        ((f"{p}.shared_expert_gate.weight", (1, h)),)))
    return recipes


def model_recipes(config: ModelConfig, arch: HFArchitecture, names: set[str]) -> list[TensorRecipe]:
    """Every parameter of MoEGPT(config), in model order, with its checkpoint sources."""
    h, v = config.hidden_size, config.vocab_size
    recipes = [TensorRecipe("embed_tokens.weight", (("model.embed_tokens.weight", (v, h)),))]
    for i in range(config.num_layers):
        recipes += attention_recipes(config, i) + mlp_recipes(config, arch, i, names)
    recipes.append(TensorRecipe("norm.weight", (("model.norm.weight", (h,)),)))
    if not config.tie_word_embeddings:
        recipes.append(TensorRecipe("lm_head.weight", (("lm_head.weight", (v, h)),)))
    return recipes
