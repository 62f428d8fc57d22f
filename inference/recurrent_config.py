"""Per-layer kinds of hybrid decoders and the hyper-parameters of their recurrent layers.

A hybrid decoder (Qwen3-Next / Qwen3.5: Gated DeltaNet + attention; Nemotron-H: Mamba2 +
attention + MoE) is described by two tuples of the same length as its layer list: the
token mixer of each layer (``ModelConfig.layer_types``: an attention kind, a recurrent kind
or ``none``) and its MLP (``mlp_types``, ``MLP_TYPES``). Qwen3.5 layers
have a mixer and an MLP; Nemotron-H layers have exactly one of the two. Pure dataclasses:
``inference.config`` imports this module, nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
ATTENTION_LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
GATED_DELTANET = "gated_deltanet"
MAMBA2 = "mamba2"
RECURRENT_LAYER_TYPES = (GATED_DELTANET, MAMBA2)
NO_MIXER = "none"

MOE = "moe"
DENSE = "dense"
NO_MLP = "none"
MLP_TYPES = (MOE, DENSE, NO_MLP)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive(obj: Any, names: tuple[str, ...]) -> None:
    kind = type(obj).__name__
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{kind}.{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class GatedDeltaNetConfig:
    """Gated DeltaNet (Qwen3-Next / Qwen3.5 linear attention). Each group of
    ``num_v_heads // num_k_heads`` consecutive value heads shares one query/key head.
    Per request it keeps a conv state [conv_dim, conv_kernel - 1] and a recurrent state
    [num_v_heads, head_k_dim, head_v_dim]."""

    num_k_heads: int = 2
    num_v_heads: int = 4
    head_k_dim: int = 16
    head_v_dim: int = 16
    conv_kernel: int = 4
    chunk_size: int = 64          # prefill chunk of the chunked form (math is chunk-size independent)
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _positive(self, ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim", "chunk_size"))
        _require(isinstance(self.conv_kernel, int) and self.conv_kernel >= 2,
                 f"GatedDeltaNetConfig.conv_kernel must be an int >= 2, got {self.conv_kernel!r}")
        _require(self.num_v_heads % self.num_k_heads == 0,
                 f"num_v_heads ({self.num_v_heads}) must be a multiple of num_k_heads ({self.num_k_heads})")
        _require(self.norm_eps > 0, f"GatedDeltaNetConfig.norm_eps must be > 0, got {self.norm_eps}")

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the short conv: q, k and v (not z, b, a)."""
        return 2 * self.key_dim + self.value_dim

    @property
    def in_proj_size(self) -> int:
        """Rows of the fused input projection: q, k, v, z, b, a."""
        return self.conv_dim + self.value_dim + 2 * self.num_v_heads

    @property
    def recurrent_state_shape(self) -> tuple[int, int, int]:
        return (self.num_v_heads, self.head_k_dim, self.head_v_dim)

    @property
    def conv_state_shape(self) -> tuple[int, int]:
        return (self.conv_dim, self.conv_kernel - 1)


@dataclass(frozen=True)
class Mamba2Config:
    """Mamba2 mixer (Nemotron-H). Each of ``n_groups`` groups of consecutive heads shares
    one B and one C. ``dt`` = clamp(softplus(dt_raw + dt_bias), dt_min, dt_max) in both the
    chunked and the recurrent form (``dt_max`` None: no upper bound). Per request it keeps a
    conv state [conv_dim, conv_kernel - 1] and an SSM state [num_heads, head_dim, state_size]."""

    num_heads: int = 4
    head_dim: int = 8
    state_size: int = 16
    n_groups: int = 2
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False
    norm_eps: float = 1e-5
    dt_min: float = 0.0
    dt_max: float | None = None

    def __post_init__(self) -> None:
        _positive(self, ("num_heads", "head_dim", "state_size", "n_groups", "chunk_size"))
        _require(isinstance(self.conv_kernel, int) and self.conv_kernel >= 2,
                 f"Mamba2Config.conv_kernel must be an int >= 2, got {self.conv_kernel!r}")
        _require(self.num_heads % self.n_groups == 0,
                 f"Mamba2 num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups})")
        _require(self.norm_eps > 0, f"Mamba2Config.norm_eps must be > 0, got {self.norm_eps}")
        _require(self.dt_min >= 0, f"Mamba2Config.dt_min must be >= 0, got {self.dt_min}")
        _require(self.dt_max is None or self.dt_max > self.dt_min,
                 f"Mamba2Config.dt_max must be None or > dt_min, got {self.dt_max}")

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the short conv: x, B and C (not the gate z, not dt)."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @property
    def in_proj_size(self) -> int:
        """Rows of the input projection: z (gate), x, B, C, dt."""
        return self.intermediate_size + self.conv_dim + self.num_heads

    @property
    def recurrent_state_shape(self) -> tuple[int, int, int]:
        return (self.num_heads, self.head_dim, self.state_size)

    @property
    def conv_state_shape(self) -> tuple[int, int]:
        return (self.conv_dim, self.conv_kernel - 1)


def validate_layer_kinds(num_layers: int, layer_types: tuple[str, ...], mlp_types: tuple[str, ...],
                         dense_layers: tuple[int, ...], gated_deltanet: GatedDeltaNetConfig | None,
                         mamba2: Mamba2Config | None) -> None:
    """The cross-field rules of ``ModelConfig``'s hybrid fields (``layer_types`` itself is
    checked by ModelConfig; empty ``mlp_types``: MoE except ``dense_layers``)."""
    if mlp_types:
        _require(len(mlp_types) == num_layers, f"mlp_types has {len(mlp_types)} entries, num_layers is {num_layers}")
        bad = sorted({k for k in mlp_types if k not in MLP_TYPES})
        _require(not bad, f"mlp_types: unknown kinds {bad}; allowed: {MLP_TYPES}")
        dense = tuple(i for i, kind in enumerate(mlp_types) if kind == DENSE)
        _require(dense_layers == dense,
                 f"dense_layers {dense_layers} disagree with mlp_types (dense at {dense}); pass dense_layers={dense}")
        if layer_types:
            empty = [i for i in range(num_layers) if layer_types[i] == NO_MIXER and mlp_types[i] == NO_MLP]
            _require(not empty, f"layers {empty} have neither a mixer nor an MLP")
    elif NO_MIXER in layer_types:
        _require(False, "layer_types with 'none' mixers need mlp_types (a layer must compute something)")
    _require(GATED_DELTANET not in layer_types or gated_deltanet is not None,
             "layer_types has gated_deltanet layers but gated_deltanet (GatedDeltaNetConfig) is None")
    _require(MAMBA2 not in layer_types or mamba2 is not None,
             "layer_types has mamba2 layers but mamba2 (Mamba2Config) is None")
