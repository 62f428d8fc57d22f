"""Tile configurations of the fused MoE kernels: tuned data files, and a heuristic when no
file matches.

A tuned file (written by ``tools/tune_fused_moe.py``) covers one shape on one device:

    inference/kernels/configs/fused_moe/E=64,H=2048,I=1024,dtype=bfloat16,device=NVIDIA_H200.json

    {"meta": {"device": ..., "triton": ..., "date": ..., "command": ...},
     "configs": {"1": {"block_m": 16, "gate_up": {"block_n": 64, "block_k": 128, "group_m": 1,
                                                 "num_warps": 4, "num_stages": 4},
                       "down": {...}, "fused_ms": 0.11, "grouped_mm_ms": 0.23}, "16": ...}}

Keys of ``configs`` are token counts (rows of ``x``, not token-expert pairs); a call with
``T`` tokens uses the entry of the nearest key. ``fused_ms`` / ``grouped_mm_ms`` are the
tuner's measurements of the whole expert computation, kept so the dispatcher can prefer
``torch._grouped_mm`` where it measured faster (``prefers_grouped_mm``).

An optional top-level ``small_batch`` object configures the small-batch path
(``fused_moe_small.py``, two launches, no alignment) that ``fused_moe_experts`` runs for
``T <= max_tokens``:

    "small_batch": {"max_tokens": 4, "date": ..., "command": ...,
                    "configs": {"1": {"gate_up": {"block_n": 16, "block_k": 256, "num_warps": 4,
                                                  "num_stages": 2},
                                      "down": {...}, "small_ms": 0.02, "aligned_ms": 0.03}, ...}}

``max_tokens`` is the tuner's crossover (0: the small path never won); a file without the
object, or no file, means ``DEFAULT_SMALL_BATCH_MAX_TOKENS`` and heuristic tiles. A caller
overrides the threshold explicitly (``select_plan(max_tokens=...)``, threaded down from
``EngineConfig.fused_moe_small_batch_max_tokens``; 0 turns the small path off), so the path a
CUDA graph captures depends on its arguments and the files only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "fused_moe"
# grouped_mm must beat the fused kernel by this factor before the dispatcher switches: a
# smaller gap is within run-to-run noise of the tuner's timings.
GROUPED_MM_MARGIN = 0.97
_BLOCK_SIZES = (16, 32, 64, 128, 256)
# Conservative without a measurement: at 1-2 tokens no two pairs are likely to share an
# expert, so aligning pairs into expert blocks buys nothing.
DEFAULT_SMALL_BATCH_MAX_TOKENS = 2
_GEMV_BLOCK_N = (1, 2, 4, 8, 16, 32, 64, 128)
_GEMV_BLOCK_K = (16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class GemmTiles:
    """Launch parameters of one GEMM. Block sizes are powers of two in [16, 256] (16 is
    ``tl.dot``'s minimum); ``group_m`` consecutive row blocks share weight tiles in L2."""

    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            if getattr(self, name) not in _BLOCK_SIZES:
                raise ValueError(f"fused MoE {name} must be one of {_BLOCK_SIZES}, got {getattr(self, name)}")
        if self.group_m < 1 or self.num_warps not in (1, 2, 4, 8, 16) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"fused MoE tiles: bad group_m / num_warps / num_stages in {self}")


@dataclass(frozen=True)
class FusedMoEConfig:
    """Tiles of both GEMMs. ``block_m`` is shared: it is the alignment of the sorted pair
    layout that both kernels read (``moe_align.py``)."""

    block_m: int
    gate_up: GemmTiles
    down: GemmTiles

    def __post_init__(self) -> None:
        if self.block_m not in _BLOCK_SIZES:
            raise ValueError(f"fused MoE block_m must be one of {_BLOCK_SIZES}, got {self.block_m}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FusedMoEConfig":
        try:
            return cls(block_m=int(d["block_m"]), gate_up=GemmTiles(**d["gate_up"]), down=GemmTiles(**d["down"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad fused MoE config {d!r}: {exc}") from exc


@dataclass(frozen=True)
class TunedEntry:
    """One token bucket of a tuned file: the config and the tuner's timings (ms)."""

    config: FusedMoEConfig
    fused_ms: float | None = None
    grouped_mm_ms: float | None = None

    @property
    def prefers_grouped_mm(self) -> bool:
        return (self.fused_ms is not None and self.grouped_mm_ms is not None
                and self.grouped_mm_ms < GROUPED_MM_MARGIN * self.fused_ms)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_file_name(num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, device_name: str) -> str:
    return f"E={num_experts},H={hidden},I={intermediate},dtype={dtype_name(dtype)},device={device_name.replace(' ', '_')}.json"


@functools.lru_cache(maxsize=16)
def device_name(index: int) -> str:
    """``torch.cuda.get_device_name`` with spaces as underscores, as in the file names."""
    return torch.cuda.get_device_name(index).replace(" ", "_")


@functools.lru_cache(maxsize=16)
def shared_memory_bytes(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def parse_tuned_file(text: str) -> tuple[tuple[int, TunedEntry], ...]:
    """Entries sorted by token count; raises ValueError naming what is wrong."""
    data = json.loads(text)
    configs = data.get("configs") if isinstance(data, dict) else None
    if not isinstance(configs, dict) or not configs:
        raise ValueError("a fused MoE config file needs a non-empty 'configs' object")
    entries = []
    for key, value in configs.items():
        if not key.isdigit() or int(key) < 1:
            raise ValueError(f"fused MoE config key {key!r} is not a positive token count")
        entries.append((int(key), TunedEntry(FusedMoEConfig.from_dict(value), value.get("fused_ms"),
                                             value.get("grouped_mm_ms"))))
    return tuple(sorted(entries, key=lambda kv: kv[0]))


# Cached by path: files are data shipped with the code; the tuner clears the cache after
# writing one.
@functools.lru_cache(maxsize=64)
def load_tuned_file(path: str) -> tuple[tuple[int, TunedEntry], ...] | None:
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return parse_tuned_file(p.read_text())
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from exc


def nearest_entry(entries: tuple[tuple[int, TunedEntry], ...], num_tokens: int) -> TunedEntry:
    return min(entries, key=lambda kv: (abs(kv[0] - num_tokens), kv[0]))[1]


def tuned_entry(num_tokens: int, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype,
                device: str, config_dir: Path = CONFIG_DIR) -> TunedEntry | None:
    """The nearest tuned bucket for this shape on ``device`` (a device name), or None."""
    entries = load_tuned_file(str(config_dir / config_file_name(num_experts, hidden, intermediate, dtype, device)))
    return nearest_entry(entries, num_tokens) if entries else None


def smem_estimate(block_m: int, tiles: GemmTiles, weight_tiles: int, elem_bytes: int) -> int:
    """Shared memory of the software pipeline: one activation and ``weight_tiles`` weight
    tiles per stage."""
    per_stage = block_m * tiles.block_k + weight_tiles * tiles.block_k * tiles.block_n
    return tiles.num_stages * per_stage * elem_bytes


def fit_shared_memory(config: FusedMoEConfig, elem_bytes: int, smem_bytes: int) -> FusedMoEConfig:
    """Fewer pipeline stages (down to 2, then smaller K tiles) until both GEMMs fit."""
    def fit(tiles: GemmTiles, weight_tiles: int) -> GemmTiles:
        while smem_estimate(config.block_m, tiles, weight_tiles, elem_bytes) > smem_bytes:
            if tiles.num_stages > 2:
                tiles = dataclasses.replace(tiles, num_stages=tiles.num_stages - 1)
            elif tiles.block_k > 16:
                tiles = dataclasses.replace(tiles, block_k=tiles.block_k // 2)
            else:
                break
        return tiles
    return dataclasses.replace(config, gate_up=fit(config.gate_up, 2), down=fit(config.down, 1))


def default_config(num_tokens: int, topk: int, num_experts: int, dtype: torch.dtype,
                   smem_bytes: int = 160 * 1024) -> FusedMoEConfig:
    """Heuristic tiles from the mean pairs per expert: 16-row blocks while experts see few
    tokens (decode: the step streams weights, padding rows cost no bandwidth), larger
    blocks as the GEMMs become compute-bound (prefill)."""
    pairs_per_expert = num_tokens * topk / num_experts
    if dtype == torch.float32:  # no tensor cores for exact fp32: small tiles, short pipeline
        bm = 16 if pairs_per_expert <= 32 else 32
        tiles = GemmTiles(block_n=32, block_k=32, group_m=1, num_warps=4, num_stages=2)
        return fit_shared_memory(FusedMoEConfig(bm, tiles, tiles), 4, smem_bytes)
    if pairs_per_expert <= 48:
        config = FusedMoEConfig(16, GemmTiles(64, 128, 1, 4, 4), GemmTiles(64, 128, 1, 4, 4))
    elif pairs_per_expert <= 192:
        config = FusedMoEConfig(32, GemmTiles(64, 128, 1, 4, 3), GemmTiles(128, 64, 1, 4, 3))
    elif pairs_per_expert <= 768:
        config = FusedMoEConfig(64, GemmTiles(64, 64, 8, 4, 3), GemmTiles(128, 64, 8, 4, 3))
    else:
        config = FusedMoEConfig(128, GemmTiles(64, 64, 8, 8, 3), GemmTiles(128, 64, 8, 8, 3))
    return fit_shared_memory(config, 2, smem_bytes)


def select_config(num_tokens: int, topk: int, num_experts: int, hidden: int, intermediate: int,
                  dtype: torch.dtype, device: torch.device, config_dir: Path = CONFIG_DIR) -> FusedMoEConfig:
    """The tuned config for this shape and device when a file has one, else the heuristic."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        entry = tuned_entry(num_tokens, num_experts, hidden, intermediate, dtype, device_name(index), config_dir)
        if entry is not None:
            return entry.config
        return default_config(num_tokens, topk, num_experts, dtype, shared_memory_bytes(index))
    return default_config(num_tokens, topk, num_experts, dtype)


@dataclass(frozen=True)
class GemvTiles:
    """Launch parameters of one small-batch kernel: each program streams ``[block_n,
    block_k]`` weight tiles (no ``tl.dot``, so any power-of-two ``block_n`` works)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.block_n not in _GEMV_BLOCK_N or self.block_k not in _GEMV_BLOCK_K:
            raise ValueError(f"small-batch MoE tiles: block_n must be one of {_GEMV_BLOCK_N} and block_k one of "
                             f"{_GEMV_BLOCK_K}, got {self.block_n} x {self.block_k}")
        if self.num_warps not in (1, 2, 4, 8, 16) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"small-batch MoE tiles: bad num_warps / num_stages in {self}")


@dataclass(frozen=True)
class SmallMoEConfig:
    """Tiles of the two small-batch kernels (``fused_moe_small.py``); passing one to
    ``fused_moe_experts`` runs that path whatever the token count."""

    gate_up: GemvTiles
    down: GemvTiles

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SmallMoEConfig":
        try:
            return cls(gate_up=GemvTiles(**d["gate_up"]), down=GemvTiles(**d["down"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad small-batch MoE config {d!r}: {exc}") from exc


@dataclass(frozen=True)
class SmallBatchData:
    """The ``small_batch`` object of a tuned file: ``max_tokens >= 0`` and per-token-count
    tiles sorted by token count (possibly empty: heuristic tiles then)."""

    max_tokens: int
    entries: tuple[tuple[int, SmallMoEConfig], ...] = ()

    def config_for(self, num_tokens: int) -> SmallMoEConfig | None:
        if not self.entries:
            return None
        return min(self.entries, key=lambda kv: (abs(kv[0] - num_tokens), kv[0]))[1]


def parse_small_batch(text: str) -> SmallBatchData | None:
    """The ``small_batch`` object of a tuned file's text, or None when it has none."""
    data = json.loads(text)
    small = data.get("small_batch") if isinstance(data, dict) else None
    if small is None:
        return None
    max_tokens = small.get("max_tokens") if isinstance(small, dict) else None
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise ValueError(f"fused MoE small_batch needs an integer max_tokens >= 0, got {small!r:.200}")
    configs = small.get("configs", {})
    if not isinstance(configs, dict):
        raise ValueError("fused MoE small_batch 'configs' must be an object")
    entries = []
    for key, value in configs.items():
        if not key.isdigit() or int(key) < 1:
            raise ValueError(f"fused MoE small_batch key {key!r} is not a positive token count")
        entries.append((int(key), SmallMoEConfig.from_dict(value)))
    return SmallBatchData(max_tokens, tuple(sorted(entries, key=lambda kv: kv[0])))


@functools.lru_cache(maxsize=64)
def load_small_batch(path: str) -> SmallBatchData | None:
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return parse_small_batch(p.read_text())
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from exc


def small_batch_data(num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, device: str,
                     config_dir: Path = CONFIG_DIR) -> SmallBatchData | None:
    """The ``small_batch`` object of the tuned file for this shape on ``device`` (a device
    name), or None."""
    return load_small_batch(str(config_dir / config_file_name(num_experts, hidden, intermediate, dtype, device)))


def check_small_batch_max_tokens(max_tokens: int | None) -> int | None:
    """``max_tokens`` if it is None or an int >= 0, else a ValueError saying so."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0):
        raise ValueError(f"small_batch_max_tokens must be None (the tuned crossover) or an int >= 0 "
                         f"(0: never the small-batch path), got {max_tokens!r}")
    return max_tokens


def small_batch_max_tokens(data: SmallBatchData | None, max_tokens: int | None = None) -> int:
    """The token count up to which the small path runs: ``max_tokens`` when given, else the
    tuned crossover, else the default."""
    if check_small_batch_max_tokens(max_tokens) is not None:
        return max_tokens
    return data.max_tokens if data is not None else DEFAULT_SMALL_BATCH_MAX_TOKENS


def _pow2_at_most(value: int, cap: int, floor: int) -> int:
    """The smallest power of two >= ``value`` (at least ``floor``), capped at ``cap``."""
    p = floor
    while p < value and p < cap:
        p *= 2
    return min(p, cap)


def default_small_config(topk: int, hidden: int, intermediate: int, dtype: torch.dtype) -> SmallMoEConfig:
    """Heuristic tiles: narrow column blocks so even one token fills the GPU with programs
    (the kernels stream weights, so the number of bytes in flight sets the speed), K tiles
    of 256-512 bytes per row, never wider than the reduced dimension needs."""
    k_bytes = 512 if dtype != torch.float32 else 256
    elem = torch.empty((), dtype=dtype).element_size()
    gate_up = GemvTiles(16, _pow2_at_most(hidden, k_bytes // elem, 16), 4, 2)
    # The down kernel holds all top-k experts' tiles at once: [topk, block_n, block_k].
    down = GemvTiles(8, _pow2_at_most(intermediate, k_bytes // elem // 2, 16), 4, 2)
    return SmallMoEConfig(gate_up, down)


def select_plan(num_tokens: int, topk: int, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype,
                device: torch.device, config_dir: Path = CONFIG_DIR,
                max_tokens: int | None = None) -> FusedMoEConfig | SmallMoEConfig:
    """What ``fused_moe_experts`` runs without an explicit config: the small-batch path up
    to the threshold, the aligned path's tiles above it. ``max_tokens`` is the threshold
    (None: the tuned crossover, else ``DEFAULT_SMALL_BATCH_MAX_TOKENS``; 0: never the small
    path); it changes which path runs, never the tiles of either."""
    small = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        small = small_batch_data(num_experts, hidden, intermediate, dtype, device_name(index), config_dir)
    if num_tokens <= small_batch_max_tokens(small, max_tokens):
        tuned = small.config_for(num_tokens) if small is not None else None
        return tuned or default_small_config(topk, hidden, intermediate, dtype)
    return select_config(num_tokens, topk, num_experts, hidden, intermediate, dtype, device, config_dir)
