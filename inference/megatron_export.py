"""Our MoEGPT weights -> a megatron-core ``GPTModel`` (local, non-Transformer-Engine spec),
plus the shims that let megatron-core 0.16 run on CPU in one process (tests, tools).

megatron-core is optional: importing this module does not import it; the functions do.

Layout notes (megatron-core 0.16.1):
- ``linear_qkv`` rows are grouped per query group: ``[q heads of group g; k_g; v_g]`` for
  each g, not ``[q; k; v]`` as ours.
- SwiGLU ``linear_fc1`` is ``[gate; up]`` like ours; experts are a ``SequentialMLP``.
- Router semantics: softmax with renormalised top-k is ``moe_router_pre_softmax=False``
  (softmax over the chosen logits); without renormalisation it is ``pre_softmax=True``.
  Sigmoid routing always renormalises top-k (k > 1), so sigmoid without ``norm_topk_prob``
  cannot be expressed and is refused.
- Per-head q/k norm is megatron's ``qk_layernorm``; OLMoE's / MiniMax-M2's whole-projection
  norm has no megatron equivalent and is refused. Partial rotary (GLM-4.5) is
  ``rotary_percent``.
- GPT-OSS: sinks are the ``learnable`` softmax offset, windowed layers ``window_size`` with a
  per-layer ``window_attn_skip_freq`` list, the clamped SwiGLU ``quick_gelu`` with
  ``glu_linear_offset=1`` and ``activation_func_clamp_value``; megatron's ``add_bias_linear``
  is global, so biases must be on every linear layer (they are in GPT-OSS).
- Multi-head latent attention is refused: megatron-core 0.16's local spec builds
  ``MLASelfAttention`` with a ``DotProductAttention`` that takes no ``k_channels`` (TypeError
  at construction); MLA needs the Transformer Engine spec, which does not run on CPU.
- YaRN rotary scaling is not mapped (refused).
- Hybrid models are refused. megatron-core 0.16 has Mamba layers only in ``MambaModel``,
  whose one layer spec is Transformer Engine's and whose ``MambaMixer`` needs mamba_ssm's
  CUDA kernels (ImportError at construction without them), and Gated DeltaNet only as an
  ``experimental_attention_variant`` whose block spec asserts Transformer Engine and whose
  layer needs flash-linear-attention (Triton, CUDA) and refuses inference contexts and
  packed sequences. Neither builds on CPU. Qwen's gated attention output and zero-centred
  norms, no-rope attention, relu^2 MLPs and MLP-only layers are not mapped either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from inference.config import ModelConfig
from inference.megatron_runtime import causal_mask, cpu_megatron_runtime, packed_causal_mask, packed_position_ids
from inference.model import MoEGPT

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from inference.parallel import ParallelLayout

__all__ = ["UnsupportedForMegatron", "build_megatron_gpt", "causal_mask", "copy_weights_to_megatron",
           "cpu_megatron_runtime", "export_to_megatron", "megatron_config", "megatron_rank_state", "megatron_state",
           "megatron_weight_plan", "our_weights", "packed_causal_mask", "packed_position_ids"]


class UnsupportedForMegatron(ValueError):
    """Our model uses a feature the megatron-core GPT spec cannot express."""


def _bias_problems(config: ModelConfig) -> list[str]:
    """megatron's add_bias_linear puts a bias on every linear layer (qkv, proj, experts, router)."""
    biased = {"qkv": config.attention_bias, "o_proj": config.o_proj_bias, "experts": config.expert_bias,
              "router": config.router.bias}
    if not any(biased[k] for k in ("o_proj", "experts", "router")):
        return []
    problems = []
    if not all(biased.values()):
        problems.append(f"biases on only some linear layers {sorted(k for k, v in biased.items() if v)} "
                        "(megatron's add_bias_linear biases all of them)")
    if config.dense_layers or config.shared_expert_intermediate_size:
        problems.append("dense layers or shared experts next to biased experts (they would get biases too)")
    return problems


HYBRID_REFUSAL = ("megatron-core 0.16 builds Mamba layers only in MambaModel with its Transformer Engine spec and "
                  "mamba_ssm's CUDA kernels, and Gated DeltaNet only as a Transformer-Engine-only experimental "
                  "attention variant that needs flash-linear-attention; neither builds on CPU, and the export of "
                  "hybrid models is not implemented")


def _hybrid_problems(config: ModelConfig) -> list[str]:
    problems = []
    if config.is_hybrid:
        problems.append(f"recurrent layers {list(config.recurrent_layer_indices)} ({HYBRID_REFUSAL})")
    features = {"attention_output_gate": config.attention_output_gate,
                "zero_centered_norms": config.zero_centered_norms, "use_rope=False": not config.use_rope,
                "expert_activation='relu2'": config.expert_activation == "relu2",
                "mlp_types (per-layer MLP kinds)": bool(config.mlp_types)}
    unmapped = [name for name, on in features.items() if on]
    if unmapped:
        problems.append(f"{', '.join(unmapped)} not mapped to megatron-core")
    return problems


def _check_supported(config: ModelConfig) -> None:
    problems = _hybrid_problems(config)
    if config.mla is not None:
        problems.append("multi-head latent attention: megatron-core 0.16's local (non-Transformer-Engine) spec "
                        "cannot build MLASelfAttention (its DotProductAttention takes no k_channels), and the "
                        "Transformer Engine spec does not run on CPU")
    if config.qk_norm == "full":
        problems.append("qk_norm='full' (OLMoE, MiniMax-M2) has no megatron-core equivalent (qk_layernorm is per head)")
    if config.router.score_function == "sigmoid" and not config.router.norm_topk_prob and config.topk > 1:
        problems.append("sigmoid routing without norm_topk_prob (megatron always renormalises sigmoid top-k)")
    r = config.router
    if r.num_groups > 1 and r.group_score_topk not in (0, config.topk // r.topk_groups):
        problems.append(f"groups scored by their best {r.group_score_topk} experts (megatron uses topk // "
                        f"topk_groups = {config.topk // r.topk_groups})")
    if config.rope_scaling is not None:
        problems.append("YaRN rotary scaling is not mapped to megatron-core")
    if config.expert_activation == "swiglu_oai" and config.swiglu_alpha != 1.702:
        problems.append(f"clamped SwiGLU with alpha {config.swiglu_alpha} (megatron's quick_gelu uses 1.702)")
    problems += _bias_problems(config)
    if problems:
        raise UnsupportedForMegatron("cannot export to megatron-core: " + "; ".join(problems))


def _attention_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Sliding windows and sinks (GPT-OSS) in TransformerConfig terms."""
    kwargs: dict[str, Any] = {}
    if config.sliding_window and any(config.window_of(i) for i in range(config.num_layers)):
        kwargs.update(window_size=(config.sliding_window - 1, 0),
                      window_attn_skip_freq=[int(config.window_of(i) > 0) for i in range(config.num_layers)])
    if config.attention_sinks:
        kwargs["softmax_type"] = "learnable"
    return kwargs


def _mlp_kwargs(config: ModelConfig) -> dict[str, Any]:
    if config.expert_activation == "swiglu_oai":
        from megatron.core.activations import quick_gelu
        return dict(activation_func=quick_gelu, glu_linear_offset=1.0, activation_func_clamp_value=config.swiglu_limit,
                    add_bias_linear=True)
    return dict(activation_func=F.silu, add_bias_linear=False)


def megatron_config(config: ModelConfig, *, params_dtype: torch.dtype = torch.float32,
                    routing_replay: bool = True, recompute: bool = False, layout: "ParallelLayout | None" = None,
                    sequence_parallel: bool = False, **overrides: Any) -> "TransformerConfig":
    """The TransformerConfig of a GPTModel equivalent to ours (dropout off, no aux loss,
    fp32 router logits like ours, allgather dispatcher: with expert parallelism the tokens
    are all-gathered over the EP group, as our replicas hold them). ``layout``: the
    tensor/expert-parallel sizes of ``inference.parallel`` (megatron_layout.py maps them)."""
    from megatron.core.transformer import TransformerConfig
    _check_supported(config)
    r = config.router
    parallel: dict[str, Any] = {}
    if layout is not None:
        from inference.parallel.megatron_layout import megatron_parallel_kwargs
        if not layout.megatron_compatible(config):
            raise UnsupportedForMegatron(f"megatron-core cannot shard {config.name!r} over tp={layout.tp}, "
                                         f"ep={layout.ep} (it splits KV heads and never replicates them)")
        parallel = megatron_parallel_kwargs(layout)
    kwargs: dict[str, Any] = dict(**parallel, sequence_parallel=sequence_parallel,
        num_layers=config.num_layers, hidden_size=config.hidden_size, num_attention_heads=config.num_heads,
        num_query_groups=config.num_kv_heads, kv_channels=config.head_dim, ffn_hidden_size=config.intermediate_size,
        moe_ffn_hidden_size=config.moe_intermediate_size, num_moe_experts=config.num_experts,
        moe_router_topk=config.topk,
        moe_layer_freq=[0 if i in config.dense_layers else 1 for i in range(config.num_layers)],
        normalization="RMSNorm", layernorm_epsilon=config.rms_norm_eps, gated_linear_unit=True,
        add_qkv_bias=config.attention_bias, **_mlp_kwargs(config), **_attention_kwargs(config),
        qk_layernorm=config.qk_norm == "per_head",
        moe_router_score_function=r.score_function,
        moe_router_pre_softmax=r.score_function == "softmax" and not r.norm_topk_prob,
        moe_router_enable_expert_bias=r.use_expert_bias,
        moe_router_num_groups=r.num_groups if r.num_groups > 1 else None,
        moe_router_group_topk=r.topk_groups if r.num_groups > 1 else None,
        moe_router_topk_scaling_factor=r.scaling_factor if r.scaling_factor != 1.0 else None,
        moe_shared_expert_intermediate_size=config.shared_expert_intermediate_size or None,
        moe_shared_expert_gate=config.shared_expert_gate,
        moe_token_dispatcher_type="allgather", moe_enable_routing_replay=routing_replay, moe_router_dtype="fp32",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_fusion=False,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True, apply_rope_fusion=False, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False)
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_megatron_gpt(config: ModelConfig, tconfig: "TransformerConfig", vocab_size: int | None = None,
                       parallel_output: bool = True) -> "GPTModel":
    """An uninitialised-weights GPTModel of our shape (local spec, neox rotary), this rank's
    shards under an initialised tensor-parallel state. ``vocab_size``: the (padded) size to
    build with (``megatron_vocab_size`` under TP); ``parallel_output``: logits stay split
    over the vocabulary (what training's vocab-parallel cross entropy takes)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    spec = get_gpt_decoder_block_spec(tconfig, use_transformer_engine=False, normalization="RMSNorm")
    return GPTModel(config=tconfig, transformer_layer_spec=spec, vocab_size=vocab_size or config.vocab_size,
                    max_sequence_length=config.max_position_embeddings, position_embedding_type="rope",
                    rotary_percent=config.rope_dim / config.head_dim, rotary_base=int(config.rope_theta),
                    share_embeddings_and_output_weights=config.tie_word_embeddings, parallel_output=parallel_output)


def _grouped_qkv(qkv: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Our [q; k; v] rows -> megatron's per-group [q_g; k_g; v_g] rows (weight or bias)."""
    d, g = config.head_dim, config.num_kv_heads
    per_group = config.num_heads // g
    q, k, v = qkv.split([config.num_heads * d, g * d, g * d])
    q = q.reshape(g, per_group * d, *q.shape[1:])
    k, v = k.reshape(g, d, *k.shape[1:]), v.reshape(g, d, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(qkv.shape)


# (our tensor name, megatron names, how): "copy" one tensor as it is; "qkv" regroup
# [q; k; v] rows per query group; "stack" our [E, ...] tensor is megatron's per-expert list.
WeightPlan = list[tuple[str, tuple[str, ...], str]]


def megatron_weight_plan(model: MoEGPT) -> WeightPlan:
    """How every weight of ``model`` (router expert biases included) maps onto megatron-core
    GPTModel parameter names (local spec). One plan serves both directions: the export
    (``megatron_state``) and the refit from a trained GPTModel
    (``inference.weight_sync.named_tensors_from_megatron``). ``model`` may live on the meta
    device: only its structure is read."""
    c = model.config
    if _hybrid_problems(c):
        raise UnsupportedForMegatron("cannot map to megatron-core: " + "; ".join(_hybrid_problems(c)))
    plan: WeightPlan = [("embed_tokens.weight", ("embedding.word_embeddings.weight",), "copy")]
    for i, layer in enumerate(model.layers):
        p, o, attn = f"decoder.layers.{i}", f"layers.{i}", layer.self_attn
        sa = f"{p}.self_attention"
        plan += [(f"{o}.input_layernorm.weight", (f"{p}.input_layernorm.weight",), "copy"),
                 (f"{o}.self_attn.qkv_proj.weight", (f"{sa}.linear_qkv.weight",), "qkv")]
        if attn.qkv_proj.bias is not None:
            plan.append((f"{o}.self_attn.qkv_proj.bias", (f"{sa}.linear_qkv.bias",), "qkv"))
        plan.append((f"{o}.self_attn.o_proj.weight", (f"{sa}.linear_proj.weight",), "copy"))
        if attn.o_proj.bias is not None:
            plan.append((f"{o}.self_attn.o_proj.bias", (f"{sa}.linear_proj.bias",), "copy"))
        if attn.sinks is not None:
            plan.append((f"{o}.self_attn.sinks", (f"{sa}.core_attention.softmax_offset",), "copy"))
        if attn.q_norm is not None:
            plan += [(f"{o}.self_attn.q_norm.weight", (f"{sa}.q_layernorm.weight",), "copy"),
                     (f"{o}.self_attn.k_norm.weight", (f"{sa}.k_layernorm.weight",), "copy")]
        plan.append((f"{o}.post_attention_layernorm.weight", (f"{p}.pre_mlp_layernorm.weight",), "copy"))
        plan += _mlp_plan(layer, c, p, o)
    plan.append(("norm.weight", ("decoder.final_layernorm.weight",), "copy"))
    if not c.tie_word_embeddings:
        plan.append(("lm_head.weight", ("output_layer.weight",), "copy"))
    return plan


def _mlp_plan(layer, c: ModelConfig, p: str, o: str) -> WeightPlan:
    mlp = layer.mlp
    if layer.moe_index is None:
        return [(f"{o}.mlp.gate_up_proj.weight", (f"{p}.mlp.linear_fc1.weight",), "copy"),
                (f"{o}.mlp.down_proj.weight", (f"{p}.mlp.linear_fc2.weight",), "copy")]
    plan: WeightPlan = [(f"{o}.mlp.router.weight", (f"{p}.mlp.router.weight",), "copy")]
    if mlp.router.bias is not None:
        plan.append((f"{o}.mlp.router.bias", (f"{p}.mlp.router.bias",), "copy"))
    if mlp.router.expert_bias is not None:
        plan.append((f"{o}.mlp.router.expert_bias", (f"{p}.mlp.router.expert_bias",), "copy"))
    experts = f"{p}.mlp.experts.local_experts"
    fc = [("w13", "linear_fc1.weight"), ("w2", "linear_fc2.weight")]
    if mlp.b13 is not None:
        fc += [("b13", "linear_fc1.bias"), ("b2", "linear_fc2.bias")]
    plan += [(f"{o}.mlp.{ours}", tuple(f"{experts}.{e}.{theirs}" for e in range(c.num_experts)), "stack")
             for ours, theirs in fc]
    if mlp.shared_expert is not None:
        plan += [(f"{o}.mlp.shared_expert.gate_up_proj.weight", (f"{p}.mlp.shared_experts.linear_fc1.weight",), "copy"),
                 (f"{o}.mlp.shared_expert.down_proj.weight", (f"{p}.mlp.shared_experts.linear_fc2.weight",), "copy")]
    if mlp.shared_expert_gate is not None:
        plan.append((f"{o}.mlp.shared_expert_gate.weight", (f"{p}.mlp.shared_experts.gate_weight",), "copy"))
    return plan


def our_weights(model: MoEGPT) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` by name, plus the routers' expert-bias buffers."""
    weights = dict(model.named_parameters())
    weights.update((n, b) for n, b in model.named_buffers() if n.endswith("expert_bias"))
    return weights


def megatron_state(model: MoEGPT) -> dict[str, torch.Tensor]:
    """Our weights under megatron-core GPTModel parameter names (local spec)."""
    ours = our_weights(model)
    sd: dict[str, torch.Tensor] = {}
    for name, targets, how in megatron_weight_plan(model):
        tensor = ours[name]
        if how == "stack":
            sd.update((target, tensor[e]) for e, target in enumerate(targets))
        else:
            sd[targets[0]] = _grouped_qkv(tensor, model.config) if how == "qkv" else tensor
    return sd


_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _rank_shard(name: str, full: torch.Tensor, local_shape: torch.Size, rank: int) -> torch.Tensor:
    """Part ``rank`` of ``full`` for a local tensor of ``local_shape``: the one dimension
    that differs is split evenly (megatron's column / row parallel layers); a SwiGLU
    ``linear_fc1`` splits its gate and up halves separately."""
    dims = [d for d, (a, b) in enumerate(zip(full.shape, local_shape)) if a != b]
    if not dims:
        return full
    if len(dims) > 1 or full.shape[dims[0]] % local_shape[dims[0]]:
        raise ValueError(f"{name}: a local shard {list(local_shape)} of {list(full.shape)} is not an even split")
    d = dims[0]
    parts = full.shape[d] // local_shape[d]
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")) and d == 0:
        return torch.cat([half.chunk(parts, dim=0)[rank] for half in full.chunk(2, dim=0)])
    return full.chunk(parts, dim=d)[rank]


def megatron_rank_state(model: MoEGPT, gpt: "GPTModel") -> dict[str, torch.Tensor]:
    """This rank's part of ``megatron_state(model)`` for the GPTModel megatron built under
    its initialised parallel state: vocabulary rows padded then split over TP, heads and
    MLP widths split over TP, local expert ``l`` = global expert ``ep_rank * N / E + l``
    split over the expert-TP ranks (megatron_layout.py)."""
    from megatron.core import parallel_state as ps
    full = megatron_state(model)
    targets = dict(gpt.named_parameters())
    targets.update((n, b) for n, b in gpt.named_buffers() if n.endswith("expert_bias"))
    tp_rank, etp_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    first_expert = ps.get_expert_model_parallel_rank() * (model.config.num_experts // ps.get_expert_model_parallel_world_size())
    out = {}
    for name, target in targets.items():
        source, expert = name, ".mlp.experts.local_experts." in name
        if expert:
            head, rest = name.split(".local_experts.", 1)
            local, tail = rest.split(".", 1)
            source = f"{head}.local_experts.{first_expert + int(local)}.{tail}"
        if source not in full:
            continue       # reported by copy_weights_to_megatron
        tensor = full[source]
        if name in _VOCAB_ROWS:
            padded = target.shape[0] * ps.get_tensor_model_parallel_world_size()
            tensor = torch.cat([tensor, tensor.new_zeros(padded - tensor.shape[0], *tensor.shape[1:])])
        out[name] = _rank_shard(name, tensor, target.shape, etp_rank if expert else tp_rank)
    return out


@torch.no_grad()
def copy_weights_to_megatron(model: MoEGPT, gpt: "GPTModel", sharded: bool = False) -> None:
    """Copy every weight (``sharded``: this rank's shards, ``megatron_rank_state``); raises
    ValueError naming any parameter left uncopied or any shape that disagrees (a silent
    partial copy would corrupt a comparison)."""
    targets = dict(gpt.named_parameters())
    targets.update((n, b) for n, b in gpt.named_buffers() if n.endswith("expert_bias"))
    source = megatron_rank_state(model, gpt) if sharded else megatron_state(model)
    problems = [f"no megatron parameter {n}" for n in source if n not in targets]
    problems += [f"{n}: ours {list(t.shape)}, megatron {list(targets[n].shape)}"
                 for n, t in source.items() if n in targets and targets[n].shape != t.shape]
    problems += [f"megatron parameter {n} has no source" for n, p in gpt.named_parameters() if n not in source]
    if problems:
        raise ValueError("weights do not map onto the megatron model:\n  " + "\n  ".join(problems))
    for name, tensor in source.items():
        targets[name].copy_(tensor.to(targets[name].dtype))


def export_to_megatron(model: MoEGPT, *, params_dtype: torch.dtype = torch.float32, routing_replay: bool = True,
                       recompute: bool = False, layout: "ParallelLayout | None" = None, sequence_parallel: bool = False,
                       parallel_output: bool = True, **overrides: Any) -> "GPTModel":
    """A megatron-core GPTModel computing what ``model`` (the whole, unsharded model)
    computes; needs an initialised model-parallel state (``cpu_megatron_runtime(layout)`` on
    CPU). With ``layout`` (the inference replica's ``ParallelLayout``) it is this rank's
    TP/EP shard of it, the same heads, experts and vocabulary rows as the inference rank's
    (``inference.parallel.megatron_layout``); with ``sequence_parallel`` each TP rank routes
    its slice of the tokens (``routing_replay.replay_targets.sequence_parallel_slice``).
    In bf16/fp16 it comes wrapped in megatron's ``Float16Module``, as training runs it."""
    from megatron.core.transformer.module import Float16Module
    tconfig = megatron_config(model.config, params_dtype=params_dtype, routing_replay=routing_replay,
                              recompute=recompute, layout=layout, sequence_parallel=sequence_parallel, **overrides)
    vocab = None
    if layout is not None:
        from inference.parallel.megatron_layout import megatron_vocab_size
        _check_megatron_state(layout)
        vocab = megatron_vocab_size(model.config, layout)
    gpt = build_megatron_gpt(model.config, tconfig, vocab, parallel_output)
    copy_weights_to_megatron(model, gpt, sharded=layout is not None)
    return Float16Module(tconfig, gpt) if params_dtype in (torch.bfloat16, torch.float16) else gpt




def _check_megatron_state(layout: "ParallelLayout") -> None:
    """megatron's initialised groups must be ``layout``'s, this rank at the same coordinates."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    c = layout.coords(dist.get_rank())
    have = (ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank(),
            ps.get_expert_tensor_parallel_rank())
    want = (layout.tp, layout.ep, c.tp_rank, c.ep_rank, c.etp_rank)
    if have != want:
        raise ValueError(f"megatron's parallel state (tp, ep, tp rank, ep rank, etp rank) {have} is not the layout's "
                         f"{want}: initialise it with megatron_parallel_kwargs(layout)")
