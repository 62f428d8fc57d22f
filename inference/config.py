"""Configuration dataclasses: the model's shape and the engine's sizes.

Both are frozen and validate themselves in ``__post_init__``; derived values are
properties so they can never disagree with the fields they come from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from inference.recurrent_config import (
    ATTENTION_LAYER_TYPES,
    MOE,
    NO_MIXER,
    RECURRENT_LAYER_TYPES,
    GatedDeltaNetConfig,
    Mamba2Config,
    validate_layer_kinds,
)

SCORE_FUNCTIONS = ("softmax", "sigmoid")
# Mirrors inference.kernels.moe_grouped.MOE_BACKENDS (config stays free of kernel imports).
MOE_BACKENDS = ("auto", "fused_triton", "grouped_mm", "torch")
FUSED_SMALL_OPS_MODES = ("auto", "on", "off")     # inference.kernels.small_ops says what each means
QK_NORMS = ("none", "per_head", "full")
# Token mixer per layer: attention variants, and the recurrent mixers of hybrid decoders.
LAYER_TYPES = ATTENTION_LAYER_TYPES + RECURRENT_LAYER_TYPES + (NO_MIXER,)
# silu: SwiGLU; swiglu_oai: GPT-OSS's clamped SwiGLU; relu2: Nemotron-H's non-gated relu(x)^2.
EXPERT_ACTIVATIONS = ("silu", "swiglu_oai", "relu2")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class RouterConfig:
    """Top-k router semantics, following megatron-core's ``TopKRouter``.

    softmax: probabilities over all experts, top-k, optional renormalisation of the
    chosen k. sigmoid: independent scores; an expert-bias term (DeepSeek-V3) shifts the
    selection only; weights are the unbiased scores, normalised if ``norm_topk_prob``.
    Group-limited selection keeps the best ``topk_groups`` of ``num_groups`` groups first,
    a group scored by the sum of its best ``group_score_topk`` selection scores (0: megatron's
    ``topk // topk_groups``; DeepSeek-V3 and GLM-4.5 in transformers use 2). ``bias``: the
    router projection has a bias (GPT-OSS).
    """

    score_function: str = "softmax"
    norm_topk_prob: bool = True
    use_expert_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    scaling_factor: float = 1.0
    group_score_topk: int = 0
    bias: bool = False

    def __post_init__(self) -> None:
        _require(self.score_function in SCORE_FUNCTIONS,
                 f"router score_function must be one of {SCORE_FUNCTIONS}, got {self.score_function!r}")
        _require(self.num_groups >= 1, f"router num_groups must be >= 1, got {self.num_groups}")
        _require(1 <= self.topk_groups <= self.num_groups,
                 f"router topk_groups must be in [1, num_groups={self.num_groups}], got {self.topk_groups}")
        _require(self.scaling_factor > 0, f"router scaling_factor must be > 0, got {self.scaling_factor}")
        _require(self.group_score_topk >= 0, f"router group_score_topk must be >= 0, got {self.group_score_topk}")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, Moonlight). Per token the KV
    cache holds the normalised latent (``kv_lora_rank``) and one rotary key shared by all
    heads (``qk_rope_head_dim``); ``kv_b_proj`` expands the latent into per-head keys
    (``qk_nope_head_dim``) and values (``v_head_dim``). ``q_lora_rank`` 0: queries are
    projected directly (Moonlight), else through a normalised low-rank bottleneck."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _require(getattr(self, name) >= 1, f"mla {name} must be >= 1, got {getattr(self, name)}")
        _require(self.q_lora_rank >= 0, f"mla q_lora_rank must be >= 0, got {self.q_lora_rank}")
        _require(self.qk_rope_head_dim % 2 == 0, f"mla qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Elements cached per token and layer: latent, then rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class RopeScaling:
    """YaRN rotary scaling (transformers' ``rope_type: yarn``), the only scaling supported.
    Zero means "not given" for ``mscale``, ``mscale_all_dim`` and ``attention_factor``
    (the factor applied to cos/sin is then derived as transformers derives it)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float = 0.0
    truncate: bool = True

    def __post_init__(self) -> None:
        _require(self.factor >= 1.0, f"yarn factor must be >= 1, got {self.factor}")
        _require(self.original_max_position_embeddings >= 1, "yarn original_max_position_embeddings must be >= 1")
        _require(self.beta_fast > 0 and self.beta_slow > 0, "yarn beta_fast and beta_slow must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a MoE GPT decoder. Layers listed in ``dense_layers`` use a dense SwiGLU
    MLP; every other layer is a MoE layer. ``moe_layer_indices`` is derived, sorted.

    Attention is grouped-query (``num_heads`` / ``num_kv_heads`` / ``head_dim``) unless
    ``mla`` is set, in which case those three GQA fields are unused. ``rotary_dim`` 0 rotates
    the whole head (partial rotary otherwise: the first ``rotary_dim`` dims, GLM-4.5 and
    MiniMax-M2). ``layer_types`` (empty: all full) marks ``sliding_attention`` layers, which
    see the last ``sliding_window`` positions (the query's included). ``attention_sinks``:
    one learned logit per head joins every softmax denominator (GPT-OSS). Experts are SwiGLU
    (``silu``) or GPT-OSS's clamped ``swiglu_oai`` with ``expert_bias``; with ``relu2``
    (Nemotron-H) every MLP of the model (routed experts, shared expert, dense layers) is a
    non-gated ``down(relu(up(x))^2)``.

    ``attention_output_gate`` (Qwen3-Next / Qwen3.5): each query head also projects a gate,
    and the head's attention output is multiplied by its sigmoid before ``o_proj``.
    ``zero_centered_norms`` (Qwen3-Next / Qwen3.5): the decoder's RMSNorms (layer norms, q/k
    norms, final norm) store ``w`` and scale by ``1 + w``. ``use_rope`` False: attention has
    no position embedding (Nemotron-H).

    Hybrid decoders (Qwen3-Next / Qwen3.5, Nemotron-H) also use ``layer_types`` for their
    recurrent mixers (``gated_deltanet``, ``mamba2``, ``none``: an MLP-only layer) and set
    ``mlp_types`` (``moe``, ``dense`` or ``none`` per layer); then MoE layers are those with
    ``mlp_types[i] == "moe"`` and ``dense_layers`` must list exactly the dense ones.
    ``recurrent_state_dtype`` is the dtype of recurrent / SSM states (conv states use the
    model dtype)."""

    name: str = "custom"
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128          # dense-layer MLP width
    moe_intermediate_size: int = 32       # per-expert MLP width
    num_experts: int = 8
    topk: int = 2
    dense_layers: tuple[int, ...] = (0,)
    shared_expert_intermediate_size: int = 0   # 0: no shared expert
    shared_expert_gate: bool = False           # Qwen2-MoE: sigmoid gate on the shared expert
    router: RouterConfig = field(default_factory=RouterConfig)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    qk_norm: str = "none"                 # "per_head" (Qwen3), "full" (OLMoE)
    attention_bias: bool = False          # Qwen2-style qkv bias
    tie_word_embeddings: bool = False
    eos_token_id: int | None = None
    # Further ids that end a sequence like eos_token_id (chat models list several; the HF
    # loader reads config.json's and generation_config.json's eos_token_id lists).
    extra_eos_token_ids: tuple[int, ...] = ()
    rotary_dim: int = 0
    rope_scaling: RopeScaling | None = None
    mla: MLAConfig | None = None
    layer_types: tuple[str, ...] = ()
    sliding_window: int = 0
    attention_sinks: bool = False
    o_proj_bias: bool = False
    expert_activation: str = "silu"
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    mlp_types: tuple[str, ...] = ()
    gated_deltanet: GatedDeltaNetConfig | None = None
    mamba2: Mamba2Config | None = None
    recurrent_state_dtype: str = "float32"
    attention_output_gate: bool = False
    zero_centered_norms: bool = False
    use_rope: bool = True

    def __post_init__(self) -> None:
        for name, cls in (("router", RouterConfig), ("mla", MLAConfig), ("rope_scaling", RopeScaling),
                          ("gated_deltanet", GatedDeltaNetConfig), ("mamba2", Mamba2Config)):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, cls(**getattr(self, name)))
        object.__setattr__(self, "dense_layers", tuple(sorted(set(self.dense_layers))))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_types", tuple(self.mlp_types))
        object.__setattr__(self, "extra_eos_token_ids", tuple(self.extra_eos_token_ids))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "num_experts", "topk", "max_position_embeddings"):
            _require(getattr(self, name) >= 1, f"model {name} must be >= 1, got {getattr(self, name)}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        _require(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        _require(self.topk <= self.num_experts, f"topk ({self.topk}) must be <= num_experts ({self.num_experts})")
        _require(all(0 <= i < self.num_layers for i in self.dense_layers),
                 f"dense_layers {self.dense_layers} must be within [0, {self.num_layers})")
        _require(self.qk_norm in QK_NORMS, f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        r = self.router
        _require(self.num_experts % r.num_groups == 0,
                 f"num_experts ({self.num_experts}) must be divisible by router num_groups ({r.num_groups})")
        _require(self.topk <= r.topk_groups * (self.num_experts // r.num_groups),
                 "topk exceeds the experts available in the selected groups")
        if self.eos_token_id is not None:
            _require(0 <= self.eos_token_id < self.vocab_size, "eos_token_id must be inside the vocabulary")
        _require(all(_is_int(i) and 0 <= i < self.vocab_size for i in self.extra_eos_token_ids),
                 f"extra_eos_token_ids must be token ids inside the vocabulary, got {self.extra_eos_token_ids}")
        _require(not self.extra_eos_token_ids or self.eos_token_id is not None,
                 "extra_eos_token_ids need an eos_token_id")
        self._validate_attention()
        _require(self.expert_activation in EXPERT_ACTIVATIONS,
                 f"expert_activation must be one of {EXPERT_ACTIVATIONS}, got {self.expert_activation!r}")
        _require(self.swiglu_limit > 0 and self.swiglu_alpha > 0, "swiglu_alpha and swiglu_limit must be > 0")
        _require(not (self.expert_activation == "relu2" and self.expert_bias),
                 "expert_bias is only supported with expert_activation='swiglu_oai'")
        validate_layer_kinds(self.num_layers, self.layer_types, self.mlp_types, self.dense_layers,
                             self.gated_deltanet, self.mamba2)
        _require(self.recurrent_state_dtype in DTYPES,
                 f"recurrent_state_dtype must be one of {sorted(DTYPES)}, got {self.recurrent_state_dtype!r}")

    def _validate_attention(self) -> None:
        _require(0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
                 f"rotary_dim must be even and in [0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if self.layer_types:
            _require(len(self.layer_types) == self.num_layers,
                     f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            _require(not bad, f"layer_types must be among {LAYER_TYPES}, got {bad}")
        _require(self.sliding_window >= 0, f"sliding_window must be >= 0, got {self.sliding_window}")
        _require(self.sliding_window > 0 or "sliding_attention" not in self.layer_types,
                 "sliding_attention layers need sliding_window > 0")
        if self.mla is not None:
            unsupported = [name for name, on in (("qk_norm", self.qk_norm != "none"), ("rotary_dim", self.rotary_dim),
                                                 ("sliding_attention", "sliding_attention" in self.layer_types),
                                                 ("attention_sinks", self.attention_sinks),
                                                 ("attention_bias", self.attention_bias),
                                                 ("attention_output_gate", self.attention_output_gate),
                                                 ("use_rope=False", not self.use_rope)) if on]
            _require(not unsupported, f"multi-head latent attention does not combine with {unsupported}")

    def window_of(self, layer: int) -> int:
        """Sliding window of decoder layer ``layer`` (0: full attention)."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return 0

    @property
    def rope_dim(self) -> int:
        """Dimensions each rotary table row covers (per head)."""
        if self.mla is not None:
            return self.mla.qk_rope_head_dim
        return self.rotary_dim or self.head_dim

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence (unless a request sets ignore_eos)."""
        return () if self.eos_token_id is None else (self.eos_token_id, *self.extra_eos_token_ids)

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        if self.mlp_types:
            return tuple(i for i, kind in enumerate(self.mlp_types) if kind == MOE)
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    @property
    def attention_layer_indices(self) -> tuple[int, ...]:
        """Layers with paged KV (all of them unless ``layer_types`` says otherwise)."""
        if not self.layer_types:
            return tuple(range(self.num_layers))
        return tuple(i for i, kind in enumerate(self.layer_types) if kind in ATTENTION_LAYER_TYPES)

    @property
    def recurrent_layer_indices(self) -> tuple[int, ...]:
        """Layers with a per-request state (gated_deltanet or mamba2 mixers)."""
        return tuple(i for i, kind in enumerate(self.layer_types) if kind in RECURRENT_LAYER_TYPES)

    @property
    def is_hybrid(self) -> bool:
        return bool(self.recurrent_layer_indices)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache elements per token across all attention layers (multiply by the dtype
        size for bytes): K and V per kv head, or with MLA the latent and the rotary key."""
        attention_layers = len(self.attention_layer_indices)
        if self.mla is not None:
            return attention_layers * self.mla.cache_dim
        return 2 * attention_layers * self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["moe_layer_indices"] = list(self.moe_layer_indices)
        d["dense_layers"] = list(self.dense_layers)
        d["layer_types"] = list(self.layer_types)
        d["mlp_types"] = list(self.mlp_types)
        d["extra_eos_token_ids"] = list(self.extra_eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        for name in ("dense_layers", "layer_types", "mlp_types", "extra_eos_token_ids"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)


@dataclass(frozen=True)
class EngineConfig:
    """Engine sizes. ``num_kv_blocks`` is the usable block count; the KV cache holds one
    more (the dummy block that padding rows write to).

    Hybrid models only: ``state_checkpoints`` is the number of recurrent-state checkpoints
    the prefix cache keeps (None: ``max_requests``; 0: prefix hits are never reused, since
    recurrent layers cannot resume without one); ``checkpoint_interval_blocks`` spaces the
    checkpoints inside long prompts (0: automatic, ``inference.cache.hybrid_cache``)."""

    block_size: int = 16
    num_kv_blocks: int = 256
    max_requests: int = 64
    max_step_tokens: int = 512
    enable_prefix_caching: bool = True
    chunked_prefill: bool = True
    record_routing: bool = False
    routing_recorder: str = "gpu"    # "gpu" (RoutingRecorder) or "host-sync" (the Megatron-style baseline)
    cuda_graphs: bool = False
    cuda_graph_max_batch: int = 256
    padded_decode: bool = False      # decode steps through the static padded path without graphs (tests)
    # Steps with prefill chunks of up to piecewise_max_tokens tokens as piecewise CUDA graphs
    # (everything but attention captured; inference/graphs/piecewise.py). None: on with
    # cuda_graphs for models without recurrent layers. padded_prefill runs that padded path
    # eagerly, without graphs (tests).
    piecewise_graphs: bool | None = None
    piecewise_max_tokens: int = 2048
    padded_prefill: bool = False
    async_scheduling: bool | None = None   # host runs one step ahead of the GPU; None: on for CUDA
    compute_logprobs: bool = True    # log-prob of every sampled token (off only to measure its cost)
    moe_backend: str = "auto"        # routed experts on CUDA: inference.kernels.MOE_BACKENDS
    # Token count up to which the fused MoE kernels take their small-batch path (CUDA;
    # inference/kernels/fused_moe_configs.py). None: the tuned crossover, else 2; 0: never.
    fused_moe_small_batch_max_tokens: int | None = None
    fused_small_ops: str = "auto"    # router / q-k norm + rotary / add + norm kernels: inference.kernels.small_ops
    fused_kv_write: bool = True      # with them, K/V cache writes join the norm + rotary kernel (off: to measure)
    # Steps of at most this many tokens run the attention projections (qkv_proj, o_proj) as
    # one bandwidth-bound skinny GEMM (inference/kernels/skinny_linear.py; CUDA, F.linear
    # elsewhere). 0: off (nn.Linear / cuBLAS); meant for decode batches up to 16.
    skinny_linear_max_tokens: int = 0
    # MHA decode attention through the Triton kernel's tl.dot path (None: the kernel's
    # default, inference.kernels.paged_decode_triton.MHA_USE_DOT); query groups always take it.
    decode_attention_mha_dot: bool | None = None
    # Sampling through the fused Triton kernel (inference.kernels.sample_triton; top-k / top-p
    # without a sort). None: on CUDA with Triton installed; False: the torch ops (to measure).
    sampler_kernel: bool | None = None
    # Step entries the engine keeps (step_log; its summary covers every step): the oldest go
    # past this many, so an engine serving for days does not grow. 0: keep all.
    step_log_max_entries: int = 100_000
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    replica_check_interval: int = 16   # tensor parallelism: steps between schedule agreement checks
    state_checkpoints: int | None = None
    checkpoint_interval_blocks: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "num_kv_blocks", "max_requests", "max_step_tokens"):
            _require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        _require(self.max_step_tokens >= self.max_requests or self.chunked_prefill,
                 "max_step_tokens must be >= max_requests")
        _require(self.routing_recorder in ("gpu", "host-sync"),
                 f"routing_recorder must be 'gpu' or 'host-sync', got {self.routing_recorder!r}")
        _require(self.dtype in DTYPES, f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        _require(isinstance(self.replica_check_interval, int) and self.replica_check_interval >= 1,
                 f"--replica-check-interval must be >= 1, got {self.replica_check_interval}")
        _require(not self.piecewise_graphs or self.cuda_graphs,
                 "--piecewise-graphs needs --cuda-graphs")
        _require(isinstance(self.piecewise_max_tokens, int) and self.piecewise_max_tokens >= 2,
                 f"piecewise_max_tokens must be an int >= 2, got {self.piecewise_max_tokens!r}")
        _require(self.moe_backend in MOE_BACKENDS,
                 f"moe_backend must be one of {MOE_BACKENDS}, got {self.moe_backend!r}")
        _require(self.fused_moe_small_batch_max_tokens is None
                 or (_is_int(self.fused_moe_small_batch_max_tokens) and self.fused_moe_small_batch_max_tokens >= 0),
                 f"fused_moe_small_batch_max_tokens must be None (the tuned crossover) or an int >= 0 "
                 f"(0: never the small-batch path), got {self.fused_moe_small_batch_max_tokens!r}")
        _require(self.fused_small_ops in FUSED_SMALL_OPS_MODES,
                 f"fused_small_ops must be one of {FUSED_SMALL_OPS_MODES}, got {self.fused_small_ops!r}")
        _require(isinstance(self.fused_kv_write, bool), f"fused_kv_write must be a bool, got {self.fused_kv_write!r}")
        _require(_is_int(self.skinny_linear_max_tokens) and self.skinny_linear_max_tokens >= 0,
                 f"skinny_linear_max_tokens must be an int >= 0 (0: off), got {self.skinny_linear_max_tokens!r}")
        _require(_is_int(self.step_log_max_entries) and self.step_log_max_entries >= 0,
                 f"step_log_max_entries must be an int >= 0 (0: keep all), got {self.step_log_max_entries!r}")
        _require(self.decode_attention_mha_dot is None or isinstance(self.decode_attention_mha_dot, bool),
                 f"decode_attention_mha_dot must be a bool or None, got {self.decode_attention_mha_dot!r}")
        _require(self.sampler_kernel is None or isinstance(self.sampler_kernel, bool),
                 f"sampler_kernel must be a bool or None, got {self.sampler_kernel!r}")
        _require(self.state_checkpoints is None or (_is_int(self.state_checkpoints) and self.state_checkpoints >= 0),
                 f"--state-checkpoints must be an int >= 0, got {self.state_checkpoints!r}")
        _require(_is_int(self.checkpoint_interval_blocks) and self.checkpoint_interval_blocks >= 0,
                 f"--checkpoint-interval-blocks must be an int >= 0 (0: automatic), got "
                 f"{self.checkpoint_interval_blocks!r}")

    @property
    def num_state_checkpoints(self) -> int:
        """Checkpoint entries a hybrid model's prefix cache gets (none without prefix caching)."""
        if not self.enable_prefix_caching:
            return 0
        return self.max_requests if self.state_checkpoints is None else self.state_checkpoints

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64"}
