"""What every Hugging Face family module shares: the error type, tensor recipes, the family
record, config.json readers (rotary, end-of-sequence ids, base shape) and recipes for common modules.

Defaults used for keys a config.json leaves out are those of the transformers
configuration classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from inference.config import ModelConfig, RopeScaling

# Checkpoint tensors that hold nothing the model needs (recomputed at load time).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFCheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message lists every problem found, one per line."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{where}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class TensorRecipe:
    """One parameter (or persistent buffer) of ours built from checkpoint tensors.
    Invariant: ``sources`` is not empty and pairs each checkpoint name with the shape it
    must have. ``combine``: "cat" (concatenate along dim 0; one source = copy), "stack" (one
    source per expert), or "stack_pairs" (per expert: cat(gate, up) along dim 0, then
    stack). ``transform`` then maps the combined tensor onto our layout (a permutation or
    transpose; never a change of values)."""

    target: str
    sources: tuple[tuple[str, tuple[int, ...]], ...]
    combine: str = "cat"
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class HFFamily:
    """One checkpoint family. ``parse(raw, problems)`` returns our ModelConfig, or None
    after appending to ``problems`` what it cannot express; ``layer_recipes(config, i,
    names, raw)`` covers every parameter of decoder layer i given the checkpoint's tensor
    names and config.json; ``mtp_layers(raw)`` counts next-token-prediction layers stored after the
    decoder layers or under ``mtp.`` (never served: their tensors are skipped).
    ``outer_names(names)``: the checkpoint names of the token embedding and the final norm;
    ``skipped(names)``: other tensors the text model does not serve (a vision tower), by
    what they are (skipped with a log line)."""

    model_types: tuple[str, ...]
    parse: Callable[[dict[str, Any], list[str]], ModelConfig | None]
    layer_recipes: Callable[[ModelConfig, int, set[str], dict[str, Any]], list[TensorRecipe]]
    mtp_layers: Callable[[dict[str, Any]], int] = lambda raw: 0
    outer_names: Callable[[set[str]], tuple[str, str]] = lambda names: ("model.embed_tokens.weight", "model.norm.weight")
    skipped: Callable[[set[str]], dict[str, list[str]]] = lambda names: {}


def get(raw: dict[str, Any], *names: str, default: Any = None) -> Any:
    """The first of ``names`` that the config sets (not null)."""
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    return default


def rope_fields(raw: dict[str, Any], problems: list[str], default_theta: float = 10000.0) -> dict[str, Any]:
    """rope_theta and rope_scaling (YaRN or none) from ``rope_parameters`` (transformers 5)
    or the legacy ``rope_scaling`` / ``rope_theta`` keys."""
    params = dict(raw.get("rope_parameters") or {})
    params.update({k: v for k, v in (raw.get("rope_scaling") or {}).items() if k not in params})
    rope_type = params.get("rope_type") or params.get("type")
    theta = float(params.get("rope_theta", raw.get("rope_theta", default_theta)))
    if rope_type in (None, "default"):
        return {"rope_theta": theta, "rope_scaling": None}
    if rope_type != "yarn":
        problems.append(f"rope scaling type {rope_type!r} is not supported (default rotary and yarn are)")
        return {"rope_theta": theta, "rope_scaling": None}
    original = params.get("original_max_position_embeddings")
    if original is None:
        problems.append("yarn rope scaling without original_max_position_embeddings")
        return {"rope_theta": theta, "rope_scaling": None}
    factor = params.get("factor") or int(get(raw, "max_position_embeddings", default=4096)) / original
    scaling = RopeScaling(
        factor=float(factor), original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0), mscale_all_dim=float(params.get("mscale_all_dim") or 0),
        attention_factor=float(params.get("attention_factor") or 0), truncate=bool(params.get("truncate", True)))
    return {"rope_theta": theta, "rope_scaling": scaling}


def partial_rotary_dim(raw: dict[str, Any], head_dim: int, default_factor: float = 1.0) -> int:
    """Rotated dims per head (0: all): ``partial_rotary_factor`` (in rope_parameters or at
    top level) or a legacy ``rotary_dim``."""
    if raw.get("rotary_dim"):
        dim = int(raw["rotary_dim"])
    else:
        factor = (raw.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                        raw.get("partial_rotary_factor", default_factor))
        dim = int(head_dim * float(factor))
    return 0 if dim == head_dim else dim


def eos_token_ids(raw: dict[str, Any], vocab_size: int) -> list[int]:
    """Every end-of-sequence id of a config.json or generation_config.json object: its
    ``eos_token_id`` (an int or a list; chat models list several, e.g. GLM-4.5's
    end-of-text, ``<|user|>`` and ``<|observation|>``), in order, ids outside the vocabulary
    left out."""
    eos = raw.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size))


REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def base_fields(raw: dict[str, Any], problems: list[str], model_type: str, *, act: str = "silu",
                required: tuple[str, ...] = (), eps: float = 1e-6, theta: float = 10000.0) -> dict[str, Any] | None:
    """ModelConfig fields every family reads the same way, or None (problems appended)
    when required keys are missing. Also refuses quantized checkpoints and other
    activations than ``act``. ``eps`` and ``theta`` are the family's defaults."""
    missing = [k for k in REQUIRED_KEYS + required if raw.get(k) is None]
    if missing:
        problems.append(f"config.json lacks {', '.join(missing)}")
        return None
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        problems.append(f"quantized checkpoints are not supported (quantization_config: {method}); "
                        "use a bf16 or fp32 checkpoint")
    if get(raw, "hidden_act", default=act) != act:
        problems.append(f"hidden_act {raw['hidden_act']!r} is not supported (only {act})")
    hidden, heads, vocab = int(raw["hidden_size"]), int(raw["num_attention_heads"]), int(raw["vocab_size"])
    return dict(
        name=str(raw.get("_name_or_path") or model_type), vocab_size=vocab, hidden_size=hidden,
        num_layers=int(raw["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(get(raw, "num_key_value_heads", default=heads)),
        head_dim=int(get(raw, "head_dim", default=hidden // heads)),
        rms_norm_eps=float(get(raw, "rms_norm_eps", default=eps)),
        max_position_embeddings=int(get(raw, "max_position_embeddings", default=4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), **eos_fields(eos_token_ids(raw, vocab)),
        **rope_fields(raw, problems, theta))


def eos_fields(ids: list[int]) -> dict[str, Any]:
    """ModelConfig's ``eos_token_id`` (the first id) and ``extra_eos_token_ids`` (the rest)."""
    return {"eos_token_id": ids[0] if ids else None, "extra_eos_token_ids": tuple(ids[1:])}


def build_config(problems: list[str], **fields: Any) -> ModelConfig | None:
    """ModelConfig(**fields), its validation errors turned into problems."""
    if problems:
        return None
    try:
        return ModelConfig(**fields)
    except ValueError as exc:
        problems.append(str(exc))
        return None


# ---- recipes ---------------------------------------------------------------------------
def copy(target: str, source: str, shape: tuple[int, ...], transform=None) -> TensorRecipe:
    return TensorRecipe(target, ((source, shape),), transform=transform)


def norms(i: int, hidden: int) -> list[TensorRecipe]:
    return [copy(f"layers.{i}.input_layernorm.weight", f"model.layers.{i}.input_layernorm.weight", (hidden,)),
            copy(f"layers.{i}.post_attention_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight",
                 (hidden,))]


def gqa_attention(config: ModelConfig, i: int) -> list[TensorRecipe]:
    """q/k/v/o projections (biases if configured), q/k norms, sinks, and the layer norms."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    p, t = f"model.layers.{i}.self_attn", f"layers.{i}.self_attn"
    recipes = [
        TensorRecipe(f"{t}.qkv_proj.weight",
                     ((f"{p}.q_proj.weight", (q, h)), (f"{p}.k_proj.weight", (kv, h)), (f"{p}.v_proj.weight", (kv, h)))),
        copy(f"{t}.o_proj.weight", f"{p}.o_proj.weight", (h, q)),
    ] + norms(i, h)
    if config.attention_bias:
        recipes.append(TensorRecipe(f"{t}.qkv_proj.bias",
                                    ((f"{p}.q_proj.bias", (q,)), (f"{p}.k_proj.bias", (kv,)), (f"{p}.v_proj.bias", (kv,)))))
    if config.o_proj_bias:
        recipes.append(copy(f"{t}.o_proj.bias", f"{p}.o_proj.bias", (h,)))
    if config.qk_norm != "none":
        qn, kn = (d, d) if config.qk_norm == "per_head" else (q, kv)
        recipes += [copy(f"{t}.q_norm.weight", f"{p}.q_norm.weight", (qn,)),
                    copy(f"{t}.k_norm.weight", f"{p}.k_norm.weight", (kn,))]
    if config.attention_sinks:
        recipes.append(copy(f"{t}.sinks", f"{p}.sinks", (config.num_heads,)))
    return recipes


def swiglu(target: str, prefix: str, hidden: int, width: int) -> list[TensorRecipe]:
    """A dense SwiGLU MLP saved as gate_proj / up_proj / down_proj."""
    return [TensorRecipe(f"{target}.gate_up_proj.weight",
                         ((f"{prefix}.gate_proj.weight", (width, hidden)), (f"{prefix}.up_proj.weight", (width, hidden)))),
            copy(f"{target}.down_proj.weight", f"{prefix}.down_proj.weight", (hidden, width))]


def moe_prefix(prefixes: tuple[str, ...], names: set[str], i: int, router: str = "gate.weight") -> str:
    """The module name layer i's MoE block was saved under (the first whose router exists)."""
    for prefix in prefixes:
        if f"model.layers.{i}.{prefix}.{router}" in names:
            return f"model.layers.{i}.{prefix}"
    return f"model.layers.{i}.{prefixes[0]}"


def experts(config: ModelConfig, i: int, p: str, names: set[str], expert_names: tuple[str, str, str]) -> list[TensorRecipe]:
    """Routed expert weights: classic per-expert tensors (``expert_names`` = gate, up, down)
    or the fused ``experts.gate_up_proj`` [E, 2I, H] / ``experts.down_proj`` [E, H, I] that
    transformers 5 keeps in memory and writes with ``save_original_format=False``."""
    h, e, w = config.hidden_size, config.num_experts, config.moe_intermediate_size
    t = f"layers.{i}.mlp"
    if f"{p}.experts.gate_up_proj" in names:
        return [copy(f"{t}.w13", f"{p}.experts.gate_up_proj", (e, 2 * w, h)),
                copy(f"{t}.w2", f"{p}.experts.down_proj", (e, h, w))]
    gate, up, down = expert_names
    pairs = tuple(src for x in range(e) for src in ((f"{p}.experts.{x}.{gate}.weight", (w, h)),
                                                     (f"{p}.experts.{x}.{up}.weight", (w, h))))
    return [TensorRecipe(f"{t}.w13", pairs, "stack_pairs"),
            TensorRecipe(f"{t}.w2", tuple((f"{p}.experts.{x}.{down}.weight", (h, w)) for x in range(e)), "stack")]


def first_k_dense(raw: dict[str, Any], num_layers: int, problems: list[str], default: int) -> tuple[int, ...]:
    """DeepSeek-V3 / GLM-4.5 rule: layers below ``first_k_dense_replace`` are dense."""
    k = int(get(raw, "first_k_dense_replace", default=default))
    if int(get(raw, "moe_layer_freq", default=1)) != 1:
        problems.append(f"moe_layer_freq {raw['moe_layer_freq']} is not supported (transformers ignores it; only 1)")
    if not 0 <= k < num_layers:
        problems.append(f"first_k_dense_replace {k} leaves no MoE layer among {num_layers} layers")
    return tuple(range(min(max(k, 0), num_layers)))
