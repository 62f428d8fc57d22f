"""Which part of a full (unsharded) tensor one rank holds, and reading that part.

A ``TensorShard`` is a box product: along each dimension the rank holds the concatenation of
some ``[start, stop)`` ranges of the full tensor (a merged ``[gate; up]`` weight holds two
row ranges; an expert weight holds a range of experts and a range of intermediate rows).
The same description serves both loading paths: slicing a full tensor already in memory, and
reading only those boxes from a safetensors file (``safe_open(...).get_slice``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

Range = tuple[int, int]
Box = tuple[slice, ...]
BoxReader = Callable[[Box], torch.Tensor]


@dataclass(frozen=True)
class TensorShard:
    """This rank's part of a tensor of shape ``full_shape``: along dim ``d`` the
    concatenation of ``ranges[d]`` (``None``: the whole dimension). Ranges may run past the
    full size (vocabulary padding): those rows read as zeros. Invariant: the local tensor's
    shape is ``local_shape``, and ranges lie in ``[0, inf)`` with ``start <= stop``."""

    full_shape: tuple[int, ...]
    ranges: tuple[tuple[Range, ...] | None, ...]

    def __post_init__(self) -> None:
        if len(self.ranges) != len(self.full_shape):
            raise ValueError(f"shard of a {len(self.full_shape)}-d tensor needs {len(self.full_shape)} range lists")
        for dim_ranges in self.ranges:
            if dim_ranges is not None and any(not 0 <= a <= b for a, b in dim_ranges):
                raise ValueError(f"bad shard ranges {dim_ranges}")

    @classmethod
    def replicated(cls, shape: Sequence[int]) -> "TensorShard":
        return cls(tuple(shape), (None,) * len(shape))

    @classmethod
    def along(cls, shape: Sequence[int], **dims: Sequence[Range]) -> "TensorShard":
        """``TensorShard.along(shape, dim0=[(a, b)], dim1=[(c, d), (e, f)])``."""
        ranges: list[tuple[Range, ...] | None] = [None] * len(shape)
        for key, value in dims.items():
            ranges[int(key.removeprefix("dim"))] = tuple((int(a), int(b)) for a, b in value)
        return cls(tuple(shape), tuple(ranges))

    @property
    def is_replicated(self) -> bool:
        return all(r is None for r in self.ranges)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(n if r is None else sum(b - a for a, b in r) for n, r in zip(self.full_shape, self.ranges))

    def boxes(self) -> Iterator[tuple[Box, Box]]:
        """``(full_box, local_box)`` pairs covering the shard's rows inside the full tensor
        (padding past the full size is left out: it stays zero)."""
        per_dim: list[list[tuple[slice, slice]]] = []
        for n, dim_ranges in zip(self.full_shape, self.ranges):
            if dim_ranges is None:
                per_dim.append([(slice(0, n), slice(0, n))])
                continue
            pieces, offset = [], 0
            for a, b in dim_ranges:
                stop = min(b, n)
                if stop > a:
                    pieces.append((slice(a, stop), slice(offset, offset + stop - a)))
                offset += b - a
            per_dim.append(pieces)
        for combo in product(*per_dim):
            yield tuple(c[0] for c in combo), tuple(c[1] for c in combo)

    def read(self, reader: BoxReader, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """The local tensor, built from ``reader(full_box)`` for each box."""
        if all(r is None or r == ((0, n),) for n, r in zip(self.full_shape, self.ranges)):
            return reader(tuple(slice(0, n) for n in self.full_shape)).to(device=device, dtype=dtype)
        out = torch.zeros(self.local_shape, dtype=dtype, device=device)
        for full_box, local_box in self.boxes():
            out[local_box] = reader(full_box).to(device=device, dtype=dtype)
        return out

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``full`` (a new tensor with ``full``'s dtype and device)."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(f"full tensor has shape {list(full.shape)}, the shard expects {list(self.full_shape)}")
        return self.read(lambda box: full[box], dtype=full.dtype, device=full.device)

    def numel_read(self) -> int:
        """Elements read from the full tensor (padding excluded)."""
        total = 0
        for full_box, _ in self.boxes():
            n = 1
            for s in full_box:
                n *= s.stop - s.start
            total += n
        return total


def row_ranges(block_sizes: Sequence[int], parts: int, index: int) -> tuple[Range, ...]:
    """Part ``index`` of each of consecutive row blocks (``[gate; up]``: two blocks), each
    split evenly over ``parts``."""
    ranges, offset = [], 0
    for size in block_sizes:
        if size % parts:
            raise ValueError(f"a block of {size} rows does not split over {parts} ranks")
        step = size // parts
        ranges.append((offset + index * step, offset + (index + 1) * step))
        offset += size
    return tuple(ranges)


def declare_shards(module: nn.Module, shards: Mapping[str, TensorShard]) -> None:
    """Record the shards of ``module``'s own parameters when it is not an
    ``inference.parallel`` layer (an attention module's per-head sinks): the loader reads
    them with each layer's ``tensor_shards()``. Stored on the instance, never globally."""
    module.__dict__.setdefault(_DECLARED, {}).update(shards)


def module_shards(module: nn.Module) -> dict[str, TensorShard]:
    """Shards of the parameters ``module`` owns directly (others are replicated)."""
    shards = dict(module.__dict__.get(_DECLARED, {}))
    if hasattr(module, "tensor_shards"):
        shards.update(module.tensor_shards())
    return shards


_DECLARED = "_declared_tensor_shards"
