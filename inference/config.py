"""Configuration dataclasses: the model's shape and the engine's sizes.

Both are frozen and validate themselves in ``__post_init__``; derived values are
properties so they can never disagree with the fields they come from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCORE_FUNCTIONS = ("softmax", "sigmoid")
QK_NORMS = ("none", "per_head", "full")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class RouterConfig:
    """Top-k router semantics, following megatron-core's ``TopKRouter``.

    softmax: probabilities over all experts, top-k, optional renormalisation of the
    chosen k. sigmoid: independent scores; an expert-bias term (DeepSeek-V3) shifts the
    selection only; weights are the unbiased scores, normalised if ``norm_topk_prob``.
    Group-limited selection keeps the best ``topk_groups`` of ``num_groups`` groups first.
    """

    score_function: str = "softmax"
    norm_topk_prob: bool = True
    use_expert_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        _require(self.score_function in SCORE_FUNCTIONS,
                 f"router score_function must be one of {SCORE_FUNCTIONS}, got {self.score_function!r}")
        _require(self.num_groups >= 1, f"router num_groups must be >= 1, got {self.num_groups}")
        _require(1 <= self.topk_groups <= self.num_groups,
                 f"router topk_groups must be in [1, num_groups={self.num_groups}], got {self.topk_groups}")
        _require(self.scaling_factor > 0, f"router scaling_factor must be > 0, got {self.scaling_factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a MoE GPT decoder. Layers listed in ``dense_layers`` use a dense SwiGLU
    MLP; every other layer is a MoE layer. ``moe_layer_indices`` is derived, sorted."""

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

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            object.__setattr__(self, "router", RouterConfig(**self.router))
        object.__setattr__(self, "dense_layers", tuple(sorted(set(self.dense_layers))))
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

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token across all layers, per element byte (multiply by dtype size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["moe_layer_indices"] = list(self.moe_layer_indices)
        d["dense_layers"] = list(self.dense_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "dense_layers" in kwargs:
            kwargs["dense_layers"] = tuple(kwargs["dense_layers"])
        if isinstance(kwargs.get("router"), dict):
            kwargs["router"] = RouterConfig(**kwargs["router"])
        return cls(**kwargs)


@dataclass(frozen=True)
class EngineConfig:
    """Engine sizes. ``num_kv_blocks`` is the usable block count; the KV cache holds one
    more (the dummy block that padding rows write to)."""

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
    async_scheduling: bool | None = None   # host runs one step ahead of the GPU; None: on for CUDA
    compute_logprobs: bool = True    # log-prob of every sampled token (off only to measure its cost)
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "num_kv_blocks", "max_requests", "max_step_tokens"):
            _require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        _require(self.max_step_tokens >= self.max_requests or self.chunked_prefill,
                 "max_step_tokens must be >= max_requests")
        _require(self.routing_recorder in ("gpu", "host-sync"),
                 f"routing_recorder must be 'gpu' or 'host-sync', got {self.routing_recorder!r}")
        _require(self.dtype in DTYPES, f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64"}
